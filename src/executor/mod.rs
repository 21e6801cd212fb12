//! Executors run dispatched requests: one executor per GPU, driven by that
//! GPU's scheduler worker. The CPU executor does real arithmetic on the host;
//! the CUDA executor runs the same operations on an NVIDIA GPU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::guest::{GuestBufs, GuestMem};
use crate::protocol::{DeviceInfo, Opcode, Status};

pub mod cpu;
pub mod cuda;
pub mod cuda_api;
pub mod isolation;
pub mod ops;
pub mod remoting;
pub mod worker;

pub use cpu::CpuExecutor;
pub use cuda::CudaExecutor;
pub use isolation::{CudaConfig, Isolated, IsolatedCuda, Isolation};

/// The VM a request runs for, and the limits its settings give it. It
/// travels with the job from the VM to the executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant {
    pub vm_id: u32,
    /// Device memory the VM's CUDA remoting may hold, in bytes.
    pub gpu_mem_quota: u64,
}

/// One request as an executor sees it: already validated against the
/// header, with its payload and output as guest buffer views.
#[derive(Debug)]
pub struct Request {
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

    /// Runs one request for `tenant` to completion and returns how many
    /// output bytes it wrote, or the status that ends it. The executor alone
    /// decides a TIMEOUT: past `limit` it stops the work where it can and
    /// answers TIMEOUT instead of a late result (see [`past_limit`]).
    fn execute(&mut self, tenant: Tenant, req: &Request, limit: Duration) -> Result<u32, Status>;

    /// True when `req` may run as part of a batch ([`Executor::execute_batch`]).
    /// The scheduler only batches consecutive jobs for which this holds.
    fn batchable(&self, _req: &Request) -> bool {
        false
    }

    /// Runs several requests (each `batchable`) in the given order and
    /// returns one result per request, in the same order. An executor may
    /// overlap them (the CUDA executor queues all their GPU work and
    /// synchronizes once); the default runs them one by one.
    fn execute_batch(
        &mut self,
        batch: &[(Tenant, &Request)],
        limit: Duration,
    ) -> Vec<Result<u32, Status>> {
        batch
            .iter()
            .map(|&(tenant, req)| self.execute(tenant, req, limit))
            .collect()
    }

    /// The VM's frontend went away: release whatever the executor holds for it
    /// (guest memory registrations, its CUDA context, handles, device memory).
    fn release_vm(&mut self, _vm_id: u32) {}

    /// The VM's memory table is now `mem` (after SET_MEM_TABLE). The CUDA
    /// executor registers its regions with the driver for zero-copy DMA and
    /// unregisters the previous table's; calling it again with the same `Arc`
    /// does nothing. Requests whose buffers lie in another (older) table still
    /// work, through a staging copy.
    fn map_guest_memory(&mut self, _vm_id: u32, _mem: &Arc<GuestMem>) {}

    /// Whether the executor can go on serving. The GPU's worker asks after
    /// every piece of work: `Some` ends this executor (the running request
    /// already has its answer, DEVICE_ERROR), answers everything queued
    /// DEVICE_ERROR, and builds a new one (docs/gpu.md, "GPU health").
    fn fault(&self) -> Option<Fault> {
        None
    }

    /// Checks that the device still works (after a fault elsewhere, such as
    /// a remoting worker's), recording a [`Executor::fault`] if not.
    fn probe(&mut self) {}
    /// The VM's registration choice (`register=all|staging`), told with
    /// every memory table before it is registered, whichever the choice:
    /// an executor that hands guest memory on (the CUDA remoting workers,
    /// which map their VM's table) pins it only where the VM allows.
    fn memory_policy(&mut self, _vm_id: u32, _register: bool) {}

    /// Running totals for status and metrics.
    fn counters(&self) -> ExecutorCounters {
        ExecutorCounters::default()
    }

    /// Registration off the execution thread: an executor that registers
    /// guest memory returns a [`Registrar`] that another thread (the GPU's
    /// registration thread in the scheduler) may call while this executor
    /// keeps executing. `None`: the executor has nothing to register, and
    /// [`Executor::map_guest_memory`] is called instead.
    fn registrar(&self) -> Option<Arc<dyn Registrar>> {
        None
    }

    /// Takes a registration made by [`Executor::registrar`] for `vm_id` into
    /// use: from now on copies of that table DMA straight from guest pages.
    /// Returns what must be dropped (unregistered) off the execution thread:
    /// the registration it replaces, or `reg` itself when it is not one of
    /// this executor's.
    fn attach_memory(&mut self, _vm_id: u32, reg: Registration) -> Option<Registration> {
        Some(reg)
    }

    /// Stops using the VM's registration (the stream is idle between
    /// requests, so no copy uses it any more) and hands it back, to be
    /// dropped (unregistered) off the execution thread.
    fn detach_memory(&mut self, _vm_id: u32) -> Option<Registration> {
        None
    }
}

/// Why an executor cannot go on serving ([`Executor::fault`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Its own state is broken, the GPU probably is not: a sticky CUDA
    /// error in the daemon's context (illegal address, launch failure...),
    /// a panic. Rebuilt at once; the GPU shows RECOVERING meanwhile.
    Context(String),
    /// The device is gone or unusable: it fell off the bus or was reset
    /// (`CUDA_ERROR_DEVICE_UNAVAILABLE`, `CUDA_ERROR_NO_DEVICE`),
    /// uncorrectable ECC. The GPU shows FAILED until a rebuild succeeds.
    Device(String),
}

impl Fault {
    pub fn reason(&self) -> &str {
        match self {
            Fault::Context(r) | Fault::Device(r) => r,
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Context(r) => write!(f, "executor fault: {r}"),
            Fault::Device(r) => write!(f, "device lost: {r}"),
        }
    }
}

/// A VM's memory table registered with the driver. Dropping it unregisters
/// the memory, which takes time too: the scheduler drops it on the GPU's
/// registration thread.
pub type Registration = Box<dyn std::any::Any + Send>;

/// Registers guest memory for an executor, on a thread of the caller's
/// choosing (never the one that executes).
pub trait Registrar: Send + Sync {
    /// Registers every region of `mem` (pinning all of it); slow: 0.35–0.6 s
    /// per GiB measured on the H200 host.
    fn register(&self, vm_id: u32, mem: &Arc<GuestMem>) -> Registration;
}

/// Running totals of an executor, published by its GPU's worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ExecutorCounters {
    /// CUDA worker processes started (first remoting call, after a fault).
    pub worker_starts: u64,
    /// Remoting calls that ended their worker (fault or timeout).
    pub worker_faults: u64,
    /// Guest memory registered with the driver for zero-copy DMA, bytes.
    pub registered_bytes: u64,
    /// Request payload and output bytes that crossed the CUDA workers'
    /// pipes (with the VM's memory table passed, only guest ranges do).
    pub worker_pipe_bytes: u64,
}

/// True when work that started at `start` ran past `limit`: nothing preempts
/// a built-in operation, so one that ends late answers TIMEOUT, never a late
/// result.
pub fn past_limit(start: Instant, limit: Duration) -> bool {
    start.elapsed() > limit
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
    CudaUnavailable(#[source] cuda::Error),
    /// An executor of another kind (a caller's own factory) cannot start.
    #[error("executor not available: {0}")]
    Unavailable(String),
}

/// Builds the executor of a GPU (by index), on the thread that will drive
/// it; called again after a fault to rebuild it (docs/gpu.md).
pub type Factory = Arc<dyn Fn(u32) -> Result<Box<dyn Executor>, Error> + Send + Sync>;

/// Builds the executor for GPU `gpu_index`, with the default CUDA settings.
/// Call it on the thread that will drive the executor.
pub fn create(
    choice: ExecutorChoice,
    gpu_index: u32,
    exec_limit: Duration,
) -> Result<Box<dyn Executor>, Error> {
    create_with(choice, gpu_index, exec_limit, &CudaConfig::default())
}

/// [`create`] with explicit CUDA settings.
pub fn create_with(
    choice: ExecutorChoice,
    gpu_index: u32,
    exec_limit: Duration,
    config: &CudaConfig,
) -> Result<Box<dyn Executor>, Error> {
    match choice {
        ExecutorChoice::Cpu => Ok(Box::new(CpuExecutor::new(gpu_index, exec_limit))),
        ExecutorChoice::Cuda => CudaExecutor::new(gpu_index, exec_limit)
            .map(|e| Box::new(Isolated::new(e, config)) as Box<dyn Executor>)
            .map_err(Error::CudaUnavailable),
        ExecutorChoice::Auto => match CudaExecutor::new(gpu_index, exec_limit) {
            Ok(e) => Ok(Box::new(Isolated::new(e, config))),
            Err(e) => {
                log::info!(
                    "gpu{gpu_index}: CUDA executor not available ({e}), falling back to the CPU executor"
                );
                Ok(Box::new(CpuExecutor::new(gpu_index, exec_limit)))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ExecutorKind;

    #[test]
    fn fallback_without_libcuda() {
        if cuda::driver_present() {
            // A GPU machine: tests/gpu.rs covers this case.
            return;
        }
        let ex = create(ExecutorChoice::Auto, 0, Duration::from_secs(1)).unwrap();
        assert_eq!(ex.info().executor, ExecutorKind::Cpu);
        let err = create(ExecutorChoice::Cuda, 0, Duration::from_secs(1))
            .err()
            .expect("no CUDA executor without libcuda");
        assert!(err.to_string().contains("libcuda"), "{err}");
        let ex = create(ExecutorChoice::Cpu, 3, Duration::from_secs(1)).unwrap();
        assert_eq!(ex.info().gpu_index, 3);
    }
}
