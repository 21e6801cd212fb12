//! Executors run dispatched requests: one executor per GPU, driven by that
//! GPU's scheduler worker. The CPU executor does real arithmetic on the host;
//! the CUDA executor runs the same operations on an NVIDIA GPU.

use std::time::Duration;

use crate::guest::GuestBufs;
use crate::protocol::{DeviceInfo, Opcode, Status};

pub mod cpu;
pub mod ops;
pub mod remoting;

pub use cpu::CpuExecutor;

/// One request as an executor sees it: already validated against the
/// header, with its payload and output as guest buffer views.
#[derive(Debug)]
pub struct Request {
    pub vm_id: u32,
    pub opcode: Opcode,
    pub tag: u64,
    /// Exactly `payload_len` bytes from the request header.
    pub payload: GuestBufs,
    /// Every writable byte after the response header.
    pub output: GuestBufs,
}

/// The part of an executor's contract the scheduler relies on.
pub trait Executor: Send {
    /// What GET_INFO reports.
    fn info(&self) -> DeviceInfo;

    /// Runs one request to completion (bounded by `limit`) and returns how
    /// many output bytes it wrote, or the status that ends it.
    fn execute(&mut self, req: &Request, limit: Duration) -> Result<u32, Status>;

    /// The VM's frontend went away: release whatever the executor holds for it.
    fn release_vm(&mut self, _vm_id: u32) {}
}

/// `--executor` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorChoice {
    /// CUDA when a GPU and libcuda are present, otherwise CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CUDA executor requested but not available: {0}")]
    CudaUnavailable(String),
}

/// Builds the executor for GPU `gpu_index`.
pub fn create(
    choice: ExecutorChoice,
    gpu_index: u32,
    exec_limit: Duration,
) -> Result<Box<dyn Executor>, Error> {
    match choice {
        ExecutorChoice::Cpu => Ok(Box::new(CpuExecutor::new(gpu_index, exec_limit))),
        ExecutorChoice::Cuda => Err(Error::CudaUnavailable(
            "this build has no CUDA executor".into(),
        )),
        ExecutorChoice::Auto => {
            log::info!(
                "gpu {gpu_index}: no CUDA executor available, falling back to the CPU executor"
            );
            Ok(Box::new(CpuExecutor::new(gpu_index, exec_limit)))
        }
    }
}
