//! The CUDA executor: the contract's built-in operations on one NVIDIA GPU
//! through cudarc's driver API, in the executor's own context (the device's
//! primary context) on one stream. One job per module:
//!
//! * `kernels.rs`: the built-in kernels and the requests that run them;
//! * `memory.rs`: growable buffers, guest-memory registration, copies;
//! * `batch.rs`: batches of small requests under one synchronize;
//! * `remoting.rs`: CUDA remoting (guest kernels) with a context per VM.
//!
//! Remoting runs guest code, so the daemon never runs it here: the wrapper
//! of `isolation.rs` sends those opcodes to a worker process per VM, which
//! runs [`RemotingExecutor`] and nothing else. This executor answers them
//! UNSUPPORTED when used alone.
//!
//! Nothing here calls into CUDA before `is_culib_present()` said the driver
//! library exists, so a machine without libcuda gets an error, never a panic.

mod api;
mod api_blas;
mod batch;
mod blas;
mod kernels;
mod memory;
mod remoting;

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use super::{
    ops, past_limit, Executor, ExecutorCounters, Registrar, Registration, Request, Tenant,
};
use crate::bytes::{Reader, Writer};
use crate::guest::GuestMem;
use crate::protocol::{DeviceInfo, ExecutorKind, Opcode, Status};

pub use batch::{BATCH_PTX, BATCH_SLOTS};
pub use blas::cublas_present;
pub use kernels::KERNELS_PTX;
pub use remoting::{RemotingExecutor, RemotingStats};

use batch::Batch;
use kernels::Kernels;
use memory::{CudaRegistrar, Device, Grow, Pinned, Registrations};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the CUDA driver library (libcuda.so) is not present")]
    NoDriver,
    #[error("no CUDA device {index} ({count} present)")]
    NoDevice { index: u32, count: i32 },
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
}

/// Counters, for tests and status displays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaStats {
    /// Copies done by DMA straight from or to registered guest memory.
    pub zero_copy: u64,
    /// Copies staged through the executor's pinned buffer.
    pub staged: u64,
    /// Bytes of guest memory registered now.
    pub registered_bytes: u64,
    /// Per-VM remoting contexts created (first use and rebuilds): worker
    /// processes started, with process isolation.
    pub vm_contexts_created: u64,
    /// Per-VM remoting contexts torn down after a fault or timeout.
    pub vm_contexts_faulted: u64,
    /// Batches run by `execute_batch`, and the requests in them.
    pub batches: u64,
    pub batched_requests: u64,
}

/// True when the driver library can be loaded (checked before any CUDA call).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; no CUDA call is made.
    unsafe { sys::is_culib_present() }
}

/// Checks that the driver library is there (before any CUDA call) and that
/// GPU `gpu_index` exists.
fn check_device(gpu_index: u32) -> Result<(), Error> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    let count = CudaContext::device_count()?;
    if i64::from(gpu_index) >= i64::from(count) {
        return Err(Error::NoDevice {
            index: gpu_index,
            count,
        });
    }
    Ok(())
}

fn check(r: CUresult) -> Result<(), DriverError> {
    r.result()
}

/// Makes `ctx` current on this thread. Unlike `CudaContext::bind_to_thread`
/// this does not report errors that cudarc recorded earlier in drops.
fn bind(ctx: &CudaContext) -> Result<(), DriverError> {
    let cur = result::ctx::get_current()?;
    if cur != Some(ctx.cu_ctx()) {
        // SAFETY: the context is alive (we hold it).
        unsafe { result::ctx::set_current(ctx.cu_ctx()) }?;
    }
    Ok(())
}

pub struct CudaExecutor {
    gpu_index: u32,
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    batch: Batch,
    dev_in: Grow<Device>,
    dev_out: Grow<Device>,
    staging: Grow<Pinned>,
    staging_logged: bool,
    /// cuBLAS for SGEMM, when libcublas is present.
    blas: Option<blas::Blas>,
    regs: Registrations,
    stats: CudaStats,
}

impl CudaExecutor {
    /// Opens GPU `gpu_index`. Call it on the thread that will drive the
    /// executor (the context is made current there).
    pub fn new(gpu_index: u32, exec_limit: Duration) -> Result<Self, Error> {
        check_device(gpu_index)?;
        let ctx = CudaContext::new(gpu_index as usize)?;
        let stream = ctx.new_stream()?;
        let kernels = Kernels::load(&ctx)?;
        let batch = Batch::new(gpu_index, &ctx)?;
        let (major, minor) = ctx.compute_capability()?;
        let info = DeviceInfo {
            executor: ExecutorKind::Cuda,
            gpu_index,
            memory_total: ctx.total_mem()? as u64,
            compute_capability: ((major as u32) << 16) | (minor as u32 & 0xffff),
            exec_limit_ms: u32::try_from(exec_limit.as_millis()).unwrap_or(u32::MAX),
            name: ctx.name()?,
        };
        let mut ex = CudaExecutor {
            gpu_index,
            info,
            ctx,
            stream,
            kernels,
            batch,
            dev_in: Grow::default(),
            dev_out: Grow::default(),
            staging: Grow::default(),
            staging_logged: false,
            blas: None,
            regs: Registrations::default(),
            stats: CudaStats::default(),
        };
        ex.blas = blas::Blas::new(gpu_index, &ex.ctx);
        ex.dev_in.ensure(1)?;
        ex.dev_out.ensure(1)?;
        log::info!(
            "gpu{gpu_index}: CUDA executor on {} (sm_{major}{minor}, {} MiB)",
            ex.info.name,
            ex.info.memory_total >> 20
        );
        Ok(ex)
    }

    pub fn stats(&self) -> CudaStats {
        self.stats
    }

    /// True when SGEMM runs through cuBLAS (libcublas present).
    pub fn uses_cublas(&self) -> bool {
        self.blas.is_some()
    }

    /// SGEMM through the built-in kernel from now on (the fallback when
    /// libcublas is absent; for tests and the bench).
    pub fn disable_cublas(&mut self) {
        if bind(&self.ctx).is_ok() {
            let _ = self.stream.synchronize();
        }
        self.blas = None;
    }

    /// The executor's own context (for benchmarks that compare against
    /// direct cudarc use on the same context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The executor's stream (for the bench's direct comparisons).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Launches a built-in kernel on the executor's stream.
    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        params: &mut [*mut c_void],
    ) -> Result<(), DriverError> {
        // SAFETY: the kernels' signatures match the parameter lists built by
        // the callers, and every buffer they touch is sized for the request.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid,
                block,
                0,
                self.stream.cu_stream(),
                params,
            )
        }
    }

    fn sync(&self) -> Result<(), DriverError> {
        self.stream.synchronize()
    }

    /// An error in the executor's own context: the daemon's code, not the
    /// guest's, so it is logged loudly.
    fn own_error(&self, e: DriverError) -> Status {
        log::error!(
            "gpu{}: CUDA error in the executor context: {e}",
            self.gpu_index
        );
        match e.0 {
            sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Status::NoResources,
            _ => Status::DeviceError,
        }
    }
}

impl Executor for CudaExecutor {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn execute(&mut self, tenant: Tenant, req: &Request, limit: Duration) -> Result<u32, Status> {
        let start = Instant::now();
        let vm = tenant.vm_id;
        bind(&self.ctx).map_err(|e| self.own_error(e))?;
        let payload = Reader::Guest(&req.payload);
        let out_cap = req.output.len();
        let res = match req.opcode {
            // PING measures the request path: no GPU work.
            Opcode::Ping => Ok(0),
            Opcode::GetInfo => ops::write_info(&mut Writer::Guest(&req.output), &self.info),
            Opcode::BusyWait => self.busy_wait(req, limit),
            Opcode::ScalarAddI32 => self.scalar_add(vm, req),
            Opcode::VectorAddF32 => {
                let n = ops::vector_add_len(payload, out_cap)?;
                self.elementwise(vm, req, None, n)
            }
            Opcode::SaxpyF32 => {
                let (n, a) = ops::saxpy_shape(payload, out_cap)?;
                self.elementwise(vm, req, Some(a), n)
            }
            Opcode::SgemmF32 => {
                let d = ops::sgemm_shape(payload, out_cap)?;
                self.sgemm(vm, req, d)
            }
            // Remoting runs guest code: never here (see isolation.rs).
            _ => Err(Status::Unsupported),
        };
        match res {
            // BUSY_WAIT bounds itself and answers TIMEOUT past the limit.
            Ok(_) if req.opcode != Opcode::BusyWait && past_limit(start, limit) => {
                Err(Status::Timeout)
            }
            other => other,
        }
    }

    /// PING and SCALAR_ADD_I32: tiny work whose cost is launch, copy and
    /// synchronization, which a batch shares.
    fn batchable(&self, req: &Request) -> bool {
        matches!(req.opcode, Opcode::Ping | Opcode::ScalarAddI32)
    }

    fn execute_batch(
        &mut self,
        batch: &[(Tenant, &Request)],
        limit: Duration,
    ) -> Vec<Result<u32, Status>> {
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(BATCH_SLOTS) {
            out.extend(self.batch_chunk(chunk, limit));
        }
        self.stats.batches += 1;
        self.stats.batched_requests += batch.len() as u64;
        out
    }

    fn release_vm(&mut self, vm_id: u32) {
        self.unmap_memory(vm_id);
    }

    fn map_guest_memory(&mut self, vm_id: u32, mem: &Arc<GuestMem>) {
        self.map_memory(vm_id, mem);
    }

    fn counters(&self) -> ExecutorCounters {
        ExecutorCounters {
            registered_bytes: self.stats.registered_bytes,
            ..ExecutorCounters::default()
        }
    }

    fn registrar(&self) -> Option<Arc<dyn Registrar>> {
        Some(Arc::new(CudaRegistrar {
            ctx: self.ctx.clone(),
            gpu: self.gpu_index,
        }))
    }

    fn attach_memory(&mut self, vm_id: u32, reg: Registration) -> Option<Registration> {
        self.attach(vm_id, reg)
    }

    fn detach_memory(&mut self, vm_id: u32) -> Option<Registration> {
        self.detach(vm_id)
    }
}

impl Drop for CudaExecutor {
    fn drop(&mut self) {
        for vm in self.regs.vms() {
            self.unmap_memory(vm);
        }
        if bind(&self.ctx).is_ok() {
            let _ = self.stream.synchronize();
            self.blas = None;
            self.dev_in.release();
            self.dev_out.release();
            self.staging.release();
            self.batch.release();
        }
    }
}
