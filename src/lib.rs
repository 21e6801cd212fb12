//! vgpu: share NVIDIA GPUs among VMs through a virtio device served by a
//! vhost-user backend. See `docs/protocol.md` for the device contract.

pub mod admin;
pub mod backend_channel;
pub mod bytes;
pub mod chain;
pub mod config;
pub mod control;
pub mod daemon;
pub mod executor;
pub mod guest;
pub mod metrics;
pub mod protocol;
pub mod scheduler;
pub mod scm;
pub mod sd_notify;
pub mod stats;
pub mod sync;
pub mod vhu_vgpu;
pub mod vm;
pub mod vm_socket;
