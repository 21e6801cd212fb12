//! The control panel: the configuration database and the `vgpu-admin` CLI.

pub mod store;
