//! The control panel: the configuration database and the `vgpu-admin` CLI.

pub mod cli;
pub mod qemu;
pub mod scan;
pub mod store;
pub mod top;
