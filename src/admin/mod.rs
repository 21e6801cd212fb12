//! The control panel: the configuration database and the `vgpu-admin` CLI.

pub mod cli;
pub mod pool_wide;
pub mod qemu;
pub mod scan;
pub mod store;
pub mod top;
pub mod xapi;
pub mod xapi_follow;
pub mod xapi_rpc;
