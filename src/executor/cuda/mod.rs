//! The CUDA executor: the contract's built-in operations on one NVIDIA GPU
//! through cudarc's driver API, in the executor's own context (the device's
//! primary context) on one stream. One job per module:
//!
//! * `kernels.rs`: the built-in kernels and the requests that run them;
//! * `memory.rs`: growable buffers, guest-memory registration, copies;
//! * `batch.rs`: batches of small requests under one synchronize;
//! * `remoting.rs`: CUDA remoting (guest kernels) with a context per VM;
//! * `meter.rs`: what a module load takes in device memory (charged to the
//!   VM's quota), and the limits of a VM's context.
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
pub(crate) mod memory;
mod meter;
mod remoting;

use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use super::{
    ops, past_limit, Executor, ExecutorCounters, Fault, Registrar, Registration, Request, Tenant,
};
use crate::bytes::{Reader, Writer};
use crate::guest::GuestMem;
use crate::protocol::{DeviceInfo, ExecutorKind, Opcode, Status};

pub use batch::{BATCH_PTX, BATCH_SLOTS};
pub use blas::cublas_present;
pub use kernels::KERNELS_PTX;
pub use meter::{Meter, CTX_MALLOC_HEAP_BYTES, CTX_PRINTF_FIFO_BYTES, CTX_STACK_BYTES};
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

/// CUresults that say the device itself is gone or unusable: device
/// unavailable (46: fell off the bus, Xid 79; or taken by an exclusive
/// process), no device (100) and invalid device (101) after a reset,
/// deinitialised (4), uncorrectable ECC (214, Xid 48).
const DEVICE_LOST: &[u32] = &[4, 46, 100, 101, 214];

/// CUresults after which a context is unusable ("the process must be
/// terminated and relaunched", or at least the context rebuilt): illegal
/// address (700), launch timeout (702), context destroyed (709), assert
/// (710), hardware stack error, illegal instruction, misaligned address,
/// invalid address space, invalid PC, launch failure (714–719), invalid
/// context (201), unknown (999).
const STICKY: &[u32] = &[201, 700, 702, 709, 710, 714, 715, 716, 717, 718, 719, 999];

/// True when `code` leaves its context unusable (or says the device is gone).
pub(crate) fn ends_context(code: u32) -> bool {
    DEVICE_LOST.contains(&code) || STICKY.contains(&code)
}

/// What an error in a context means for the code that owns it: `None`
/// when the context can go on (a bad argument, out of memory...). One list
/// for the daemon's executor and the remoting workers (`api.rs`).
pub fn fault_of(e: DriverError) -> Option<Fault> {
    let code = e.0 as u32;
    if DEVICE_LOST.contains(&code) {
        Some(Fault::Device(format!("{e} ({code})")))
    } else if STICKY.contains(&code) {
        Some(Fault::Context(format!("{e} ({code})")))
    } else {
        None
    }
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

/// Makes `ctx` current and bounds its limits (stack, device malloc heap,
/// printf FIFO; see `meter.rs`).
pub fn bound_context_limits(ctx: &CudaContext) -> Result<(), CUresult> {
    bind(ctx).map_err(|e| e.0)?;
    meter::bound_context_limits()
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
    /// The first error that made this executor unusable ([`fault_of`]).
    /// Set from `&self` paths (error mapping inside closures), hence a Cell.
    fault: std::cell::Cell<Option<Fault>>,
    /// Keep last: dropped after everything above.
    reset: ResetOnDrop,
}

impl CudaExecutor {
    /// Opens GPU `gpu_index`. Call it on the thread that will drive the
    /// executor (the context is made current there).
    pub fn new(gpu_index: u32, exec_limit: Duration) -> Result<Self, Error> {
        check_device(gpu_index)?;
        match CudaExecutor::open(gpu_index, exec_limit) {
            Err(Error::Driver(e)) if fault_of(e).is_some() => {
                // The primary context is still poisoned (a sticky error
                // that an executor's drop could not reset): reset it, once.
                log::warn!("gpu{gpu_index}: context unusable ({e}): resetting it");
                let dev = result::device::get(gpu_index as i32)?;
                // SAFETY: plain driver call on an existing device.
                let r = unsafe { sys::cuDevicePrimaryCtxReset_v2(dev) };
                log::warn!("gpu{gpu_index}: primary context reset: {r:?}");
                let again = CudaExecutor::open(gpu_index, exec_limit);
                if let Err(Error::Driver(e)) = &again {
                    if fault_of(*e).is_some() {
                        // Measured on the H200 (driver 580): after a sticky
                        // error no new context of this process works, reset
                        // or not; only a new process gets the GPU back.
                        log::error!(
                            "gpu{gpu_index}: the CUDA driver refuses every new context of this process after the sticky error ({e}); restart the daemon to bring this GPU back (its VMs get DEVICE_ERROR until then; other GPUs are unaffected)"
                        );
                    }
                }
                again
            }
            other => other,
        }
    }

    fn open(gpu_index: u32, exec_limit: Duration) -> Result<Self, Error> {
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
        let dev = ctx.cu_device();
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
            fault: std::cell::Cell::new(None),
            reset: ResetOnDrop {
                gpu: gpu_index,
                dev,
                armed: None,
            },
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

    /// Test hook for fault handling: runs the SCALAR_ADD kernel with a null
    /// output pointer in the executor's own context, the write to address 0
    /// that a null device buffer once caused. The result is a real sticky
    /// CUDA_ERROR_ILLEGAL_ADDRESS (700), which ends this executor through
    /// the same path as any other ([`Executor::fault`]). Answers the status
    /// the request would have got.
    #[doc(hidden)]
    pub fn inject_null_write(&mut self) -> Result<u32, Status> {
        bind(&self.ctx).map_err(|e| self.own_error(e))?;
        let (mut a, mut b, mut out) = (1i32, 2i32, 0u64);
        let mut params = [
            &mut a as *mut i32 as *mut c_void,
            &mut b as *mut i32 as *mut c_void,
            &mut out as *mut u64 as *mut c_void,
        ];
        self.launch(&self.kernels.scalar_add, (1, 1, 1), (1, 1, 1), &mut params)
            .map_err(|e| self.own_error(e))?;
        self.sync().map_err(|e| self.own_error(e))?;
        Ok(0)
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
    /// guest's, so it is logged loudly. A sticky one (or one that says the
    /// device is gone) is recorded: [`Executor::fault`] then tells the GPU's
    /// worker to rebuild the executor.
    fn own_error(&self, e: DriverError) -> Status {
        log::error!(
            "gpu{}: CUDA error in the executor context: {e}",
            self.gpu_index
        );
        if let Some(f) = fault_of(e) {
            let first = self.fault.take();
            self.fault.set(first.or(Some(f)));
        }
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

    fn fault(&self) -> Option<Fault> {
        let f = self.fault.take();
        self.fault.set(f.clone());
        f
    }

    /// Synchronizes the whole context: a device that fell off the bus (or
    /// a sticky error) shows here and is recorded as the executor's fault.
    fn probe(&mut self) {
        let r = bind(&self.ctx).and_then(|()| result::ctx::synchronize());
        if let Err(e) = r {
            self.own_error(e);
        }
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
        // A sticky error leaves the primary context broken for whoever
        // retains it next: reset it once every object of ours in it is gone
        // (the last field's drop, see `ResetOnDrop`).
        if let Some(f) = self.fault.take() {
            self.reset.armed = Some(f);
        }
    }
}

/// Resets the device's primary context when dropped, if armed: the last
/// field of [`CudaExecutor`], so it runs after the stream, modules, cuBLAS
/// and buffers were destroyed (their destruction fails harmlessly in a
/// broken context). Without it the next `CudaContext::new` would retain
/// the same poisoned context. Nothing else in the daemon uses the primary
/// context: guest code runs in worker processes.
struct ResetOnDrop {
    gpu: u32,
    dev: sys::CUdevice,
    armed: Option<Fault>,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.armed.take() {
            // SAFETY: plain driver call on the device the executor opened.
            let r = unsafe { sys::cuDevicePrimaryCtxReset_v2(self.dev) };
            log::warn!("gpu{}: primary context reset after {f}: {r:?}", self.gpu);
        }
    }
}
