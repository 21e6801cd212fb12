//! CUDA remoting on the GPU (opcodes 0x02xx): each VM gets its own
//! non-primary CUDA context, created on first use, with its handle tables and
//! quota ([`VmTables`]). A fault or timeout tears the context down (its
//! handles become NOT_FOUND). Payloads come through a [`Reader`] and outputs
//! go through a [`Writer`], so the same code serves guest memory (in a
//! worker: its own mapping of the VM's table, `worker/table.rs`) and the
//! plain bytes of the worker's pipe. Copies go in pieces that each lie in
//! one registration, queued and waited for once (`api::copy_pieces`).
//!
//! This runs guest code: in the daemon it runs only inside a VM's worker
//! process (`worker/`), never in a process that holds other VMs' memory
//! (see `isolation.rs`).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUdeviceptr, CUresult};
use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;

use super::api::{self, ApiState, Fail};
use super::meter::{self, Meter};
use super::{bind, check, check_device, Error};
use crate::bytes::{Reader, Writer};
use crate::executor::remoting::{self as wire, Param, VmTables};
use crate::executor::Tenant;
use crate::protocol::{Opcode, Status};

/// A module of a VM and the device memory its load took (charged to the
/// VM's quota, see `meter.rs`).
#[derive(Clone)]
struct Loaded {
    module: Arc<CudaModule>,
    charge: u64,
}

/// Remoting state of one VM.
struct VmState {
    tables: VmTables<CUdeviceptr, Loaded>,
    /// CUDA API (0x03xx) objects; they share the context and the quota.
    api: ApiState,
    ctx: Option<Arc<CudaContext>>,
}

impl VmState {
    /// A VM with nothing yet: handles from the VM's own range, no context.
    fn new(vm_id: u32) -> Self {
        VmState {
            tables: VmTables::new(vm_id, 0),
            api: ApiState::new(u64::from(vm_id) << 32),
            ctx: None,
        }
    }
}

/// Counters, for tests and status displays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemotingStats {
    /// Per-VM contexts created (first use and rebuilds).
    pub contexts_created: u64,
    /// Per-VM contexts torn down after a fault or timeout.
    pub contexts_faulted: u64,
}

/// Where a CUDA error in a VM's context leaves the VM.
fn vm_error(e: DriverError) -> (Status, bool) {
    use sys::cudaError_enum as E;
    match e.0 {
        E::CUDA_ERROR_OUT_OF_MEMORY => (Status::NoResources, false),
        E::CUDA_ERROR_NOT_FOUND => (Status::NotFound, false),
        E::CUDA_ERROR_INVALID_VALUE
        | E::CUDA_ERROR_INVALID_HANDLE
        | E::CUDA_ERROR_INVALID_IMAGE
        | E::CUDA_ERROR_INVALID_PTX
        | E::CUDA_ERROR_INVALID_SOURCE
        | E::CUDA_ERROR_NO_BINARY_FOR_GPU
        | E::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
        | E::CUDA_ERROR_JIT_COMPILATION_DISABLED
        | E::CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND
        | E::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => (Status::BadRequest, false),
        // Illegal address, launch failure, illegal instruction, assert, ...:
        // the context is unusable.
        _ => (Status::DeviceError, true),
    }
}

/// Remoting calls of the VMs of one GPU.
pub struct RemotingExecutor {
    gpu_index: u32,
    vms: HashMap<u32, VmState>,
    /// Inside a worker process: a timeout ends the process, so the context
    /// (whose teardown may wait for the kernel) is left to the driver.
    worker_mode: bool,
    stats: RemotingStats,
    /// Measures what module loads take (`meter.rs`).
    meter: Meter,
}

impl RemotingExecutor {
    pub fn new(gpu_index: u32) -> Result<Self, Error> {
        check_device(gpu_index)?;
        Ok(RemotingExecutor {
            gpu_index,
            vms: HashMap::new(),
            worker_mode: false,
            stats: RemotingStats::default(),
            meter: Meter::open(gpu_index),
        })
    }

    /// The executor of a worker process: one VM, and the process ends after
    /// a fault or timeout.
    pub fn for_worker(gpu_index: u32, vm_id: u32, first_handle: u64) -> Result<Self, Error> {
        let mut ex = Self::new(gpu_index)?;
        ex.worker_mode = true;
        let st = ex.vm_state(vm_id);
        st.tables.start_at(first_handle);
        st.api = ApiState::new((u64::from(vm_id) << 32) | (first_handle & 0xffff_ffff));
        Ok(ex)
    }

    /// [`Self::for_worker`] with a context the worker created before it
    /// knew its VM (a warm spare, see `worker/spare.rs`), its limits already
    /// bounded, and a meter opened before the seccomp filter.
    pub fn for_worker_in(
        gpu_index: u32,
        vm_id: u32,
        first_handle: u64,
        ctx: Arc<CudaContext>,
        meter: Meter,
    ) -> Self {
        let mut ex = RemotingExecutor {
            gpu_index,
            vms: HashMap::new(),
            worker_mode: true,
            stats: RemotingStats {
                contexts_created: 1,
                ..RemotingStats::default()
            },
            meter,
        };
        let st = ex.vm_state(vm_id);
        st.tables.start_at(first_handle);
        st.ctx = Some(ctx);
        ex
    }

    pub fn stats(&self) -> RemotingStats {
        self.stats
    }

    /// Runs one remoting call for `tenant`; the quota comes with every call,
    /// so a change applies at once (memory already allocated stays).
    pub fn call(
        &mut self,
        tenant: Tenant,
        opcode: Opcode,
        payload: Reader,
        output: &mut Writer,
        limit: Duration,
    ) -> Result<u32, Status> {
        let vm = tenant.vm_id;
        self.vm_state(vm).tables.quota.limit = tenant.gpu_mem_quota;
        let deadline = Instant::now() + limit;
        if opcode.is_cuda_api() {
            return self.cuda_api(vm, opcode, payload, output, deadline);
        }
        match opcode {
            Opcode::MemAlloc => self.alloc(vm, payload, output),
            Opcode::MemFree => self.free(vm, payload),
            Opcode::MemcpyHtoD => self.htod(vm, payload),
            Opcode::MemcpyDtoH => self.dtoh(vm, payload, output),
            Opcode::ModuleLoad => self.module_load(vm, payload, output),
            Opcode::ModuleUnload => self.module_unload(vm, payload),
            Opcode::Launch => self.launch(vm, payload, deadline),
            Opcode::Synchronize => self.sync(vm, payload, deadline),
            _ => Err(Status::Unsupported),
        }
    }

    /// The VM's frontend went away: its context, handles and memory go.
    pub fn release_vm(&mut self, vm_id: u32) {
        self.teardown(vm_id);
        self.vms.remove(&vm_id);
    }

    fn vm_state(&mut self, vm_id: u32) -> &mut VmState {
        self.vms.entry(vm_id).or_insert_with(|| VmState::new(vm_id))
    }

    /// The VM's context, created on first use and bound to this thread.
    fn vm_ctx(&mut self, vm_id: u32) -> Result<Arc<CudaContext>, Status> {
        let gpu = self.gpu_index;
        let st = self.vm_state(vm_id);
        let ctx = match &st.ctx {
            Some(c) => c.clone(),
            None => {
                let ctx = CudaContext::new_non_primary(gpu as usize, 0).map_err(|e| {
                    log::error!("gpu{gpu}: cannot create a context for vm{vm_id}: {e}");
                    Status::NoResources
                })?;
                bind(&ctx).map_err(|_| Status::NoResources)?;
                meter::bound_context_limits().map_err(|e| {
                    log::error!("gpu{gpu}: cannot bound the context limits of vm{vm_id}: {e:?}");
                    Status::NoResources
                })?;
                log::info!("gpu{gpu}: created CUDA context for vm{vm_id}");
                st.ctx = Some(ctx.clone());
                self.stats.contexts_created += 1;
                ctx
            }
        };
        bind(&ctx).map_err(|e| self.fault(vm_id, e))?;
        Ok(ctx)
    }

    /// Tears down a VM's context and forgets its handles.
    fn teardown(&mut self, vm_id: u32) {
        if let Some(st) = self.vms.get_mut(&vm_id) {
            let (_buffers, modules) = st.tables.reset();
            // Buffers go with the context; modules unload first, and the
            // cuBLAS handle is destroyed in it.
            if let Some(ctx) = st.ctx.take() {
                if bind(&ctx).is_ok() {
                    st.api.release_blas();
                    drop(modules);
                }
                drop(ctx);
            }
            // The API's objects go with the context as well.
            st.api.clear();
        }
    }

    /// Maps a CUDA error in a VM's context to a status, tearing the context
    /// down when the error poisons it.
    fn fault(&mut self, vm_id: u32, e: DriverError) -> Status {
        let (status, teardown) = vm_error(e);
        if teardown {
            log::warn!(
                "gpu{}: vm{vm_id}: {e}; tearing down its CUDA context",
                self.gpu_index
            );
            self.stats.contexts_faulted += 1;
            self.teardown(vm_id);
        } else {
            log::debug!("gpu{}: vm{vm_id}: {e}", self.gpu_index);
        }
        status
    }

    /// Waits for the VM context's work until `deadline`. Past it the context
    /// is torn down (which ends the work) and TIMEOUT returned.
    fn wait(&mut self, vm_id: u32, deadline: Instant) -> Result<(), Status> {
        let mut spins = 0u32;
        loop {
            // SAFETY: the VM's context is current; the null stream is its own.
            match unsafe { sys::cuStreamQuery(std::ptr::null_mut()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                err => return Err(self.fault(vm_id, DriverError(err))),
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "gpu{}: vm{vm_id}: work past the execution limit; tearing down its context",
                    self.gpu_index
                );
                self.stats.contexts_faulted += 1;
                if !self.worker_mode {
                    // May wait for the kernel; a worker just exits instead.
                    self.teardown(vm_id);
                }
                return Err(Status::Timeout);
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// A CUDA API call (0x03xx) in the VM's context.
    fn cuda_api(
        &mut self,
        vm: u32,
        opcode: Opcode,
        payload: Reader,
        out: &mut Writer,
        deadline: Instant,
    ) -> Result<u32, Status> {
        let max = match opcode {
            Opcode::CuCommandBuffer => crate::executor::cuda_api::MAX_COMMAND_BUFFER_LEN,
            Opcode::CuModuleLoad => crate::executor::cuda_api::MAX_IMAGE_LEN,
            _ => crate::executor::cuda_api::MAX_COPY_LEN + 8,
        };
        let res = if opcode == Opcode::CuMemcpyHtoD {
            // Straight from the payload's pages, without a copy first.
            self.vm_ctx(vm)?;
            let st = self.vm_state(vm);
            api::memcpy_htod(&st.api, payload, out)
        } else {
            let p = payload.to_vec_max(max)?;
            self.vm_ctx(vm)?;
            // Not `vm_state`: the meter is borrowed beside the VM's state.
            let st = self.vms.entry(vm).or_insert_with(|| VmState::new(vm));
            let meter = &self.meter;
            api::call(
                &mut st.api,
                &mut st.tables.quota,
                meter,
                opcode,
                &p,
                out,
                deadline,
            )
        };
        match res {
            Ok(n) => Ok(n),
            Err(Fail::Status(s)) => Err(s),
            Err(Fail::Driver(e)) => Err(self.fault(vm, e)),
            Err(Fail::Timeout) => {
                log::warn!(
                    "gpu{}: vm{vm}: command buffer past the execution limit",
                    self.gpu_index
                );
                self.stats.contexts_faulted += 1;
                if !self.worker_mode {
                    self.teardown(vm);
                }
                Err(Status::Timeout)
            }
        }
    }

    fn alloc(&mut self, vm: u32, p: Reader, out: &mut Writer) -> Result<u32, Status> {
        let size = wire::parse_alloc(&p.to_vec_max(8)?)?;
        if out.capacity() < 8 {
            return Err(Status::TooLarge);
        }
        let bytes = usize::try_from(size).map_err(|_| Status::NoResources)?;
        self.vm_state(vm).tables.reserve(size)?;
        let ptr = self.vm_ctx(vm).and_then(|_| {
            // SAFETY: allocation in the VM's current context.
            unsafe { result::malloc_sync(bytes) }.map_err(|e| self.fault(vm, e))
        });
        let st = self.vm_state(vm);
        let ptr = match ptr {
            Ok(p) => p,
            Err(s) => {
                st.tables.quota.release(size);
                return Err(s);
            }
        };
        let h = st.tables.add_buffer(size, ptr)?;
        out.write_output(&h.to_le_bytes())
    }

    fn free(&mut self, vm: u32, p: Reader) -> Result<u32, Status> {
        let h = wire::parse_handle(&p.to_vec_max(8)?)?;
        let buf = self.vm_state(vm).tables.free_buffer(h)?;
        self.vm_ctx(vm)?;
        // SAFETY: the VM's allocation, current context, no work pending
        // (every launch is waited for).
        unsafe { result::free_sync(buf.dev) }.map_err(|e| self.fault(vm, e))?;
        Ok(0)
    }

    fn htod(&mut self, vm: u32, p: Reader) -> Result<u32, Status> {
        let mut hdr = [0u8; wire::HTOD_HDR_SIZE];
        p.read_at(0, &mut hdr)?;
        let (h, offset) = wire::parse_htod_header(&hdr)?;
        let len = p.len() - wire::HTOD_HDR_SIZE;
        let buf = self.vm_state(vm).tables.buffer(h)?.clone();
        wire::check_range(buf.size, offset, len as u64)?;
        self.vm_ctx(vm)?;
        let ranges = p.host_ranges(wire::HTOD_HDR_SIZE, len)?;
        // SAFETY: source bytes kept alive by `ranges`; destination range
        // checked against the buffer's size.
        let r = unsafe {
            api::copy_pieces(
                ranges.iter().map(|(p, n)| (p as usize, n)),
                buf.dev + offset,
                true,
            )
        };
        drop(ranges);
        check(r).map_err(|e| self.fault(vm, e))?;
        Ok(0)
    }

    fn dtoh(&mut self, vm: u32, p: Reader, out: &mut Writer) -> Result<u32, Status> {
        let (h, offset, len) = wire::parse_dtoh(&p.to_vec_max(24)?)?;
        let buf = self.vm_state(vm).tables.buffer(h)?.clone();
        wire::check_range(buf.size, offset, len)?;
        let len = usize::try_from(len).map_err(|_| Status::TooLarge)?;
        let out_len = u32::try_from(len).map_err(|_| Status::TooLarge)?;
        if out.capacity() < len {
            return Err(Status::TooLarge);
        }
        self.vm_ctx(vm)?;
        let ranges = out.host_ranges(0, len)?;
        // SAFETY: as in htod, the other way.
        let r = unsafe {
            api::copy_pieces(
                ranges.iter().map(|(p, n)| (p as usize, n)),
                buf.dev + offset,
                false,
            )
        };
        drop(ranges);
        check(r).map_err(|e| self.fault(vm, e))?;
        Ok(out_len)
    }

    fn module_load(&mut self, vm: u32, p: Reader, out: &mut Writer) -> Result<u32, Status> {
        let text = wire::parse_ptx(&p.to_vec_max(wire::MAX_PTX_LEN)?)?;
        let text = text.into_string().map_err(|_| Status::BadRequest)?;
        if out.capacity() < 8 {
            return Err(Status::TooLarge);
        }
        self.vm_state(vm).tables.can_add_module()?;
        let ctx = self.vm_ctx(vm)?;
        // The worker serves this VM alone, on this thread: nothing else of
        // this process allocates between the two readings (meter.rs).
        let before = self.meter.reading();
        let module = ctx
            .load_module(Ptx::from_src(text))
            .map_err(|e| self.fault(vm, e))?;
        let charge = self.meter.since(before);
        let tables = &mut self.vm_state(vm).tables;
        if let Err(e) = tables.quota.charge(charge) {
            // Unloaded here (the module drops with the context current);
            // the guest learns only that its quota does not hold it.
            drop(module);
            log::info!("vm{vm}: module load refused: its globals take {charge} bytes ({e})");
            return Err(e.into());
        }
        let h = match tables.add_module(Loaded { module, charge }) {
            Ok(h) => h,
            Err(e) => {
                tables.quota.release(charge);
                return Err(e.into());
            }
        };
        out.write_output(&h.to_le_bytes())
    }

    fn module_unload(&mut self, vm: u32, p: Reader) -> Result<u32, Status> {
        let h = wire::parse_handle(&p.to_vec_max(8)?)?;
        let loaded = self.vm_state(vm).tables.remove_module(h)?;
        self.vm_state(vm).tables.quota.release(loaded.charge);
        self.vm_ctx(vm)?;
        drop(loaded);
        Ok(0)
    }

    fn launch(&mut self, vm: u32, p: Reader, deadline: Instant) -> Result<u32, Status> {
        let l = wire::parse_launch(&p.to_vec_max(wire::MAX_LAUNCH_LEN)?)?;
        let name = l.name.to_str().map_err(|_| Status::BadRequest)?.to_owned();
        let module = self.vm_state(vm).tables.module(l.module)?.module.clone();
        // Parameter values, each in its own 8-byte aligned storage.
        let mut values: Vec<Vec<u64>> = Vec::with_capacity(l.params.len());
        {
            let tables = &self.vm_state(vm).tables;
            for prm in &l.params {
                values.push(match prm {
                    Param::Buffer(h) => vec![tables.buffer(*h)?.dev],
                    Param::Bytes(b) => {
                        let mut v = vec![0u64; b.len().div_ceil(8)];
                        for (i, byte) in b.iter().enumerate() {
                            v[i / 8] |= u64::from(*byte) << (8 * (i % 8));
                        }
                        v
                    }
                });
            }
        }
        self.vm_ctx(vm)?;
        let f = module.load_function(&name).map_err(|e| self.fault(vm, e))?;
        // The stack this kernel can make the driver reserve, charged first.
        match super::meter::charge_stack(f.cu_function(), &mut self.vm_state(vm).tables.quota) {
            Ok(()) => {}
            Err(super::meter::StackRefused::OverQuota) => return Err(Status::NoResources),
            Err(super::meter::StackRefused::Driver(e)) => {
                return Err(self.fault(vm, DriverError(e)))
            }
        }
        // The kernel's own parameter list must match what the guest sent, or
        // the driver would read past our values: every index below the count
        // has the guest's size, and the index at the count does not exist.
        for i in 0..=l.params.len() {
            let (mut off, mut size) = (0usize, 0usize);
            // SAFETY: valid function of a live module; out-of-range indexes
            // are reported as CUDA_ERROR_INVALID_VALUE.
            let r = unsafe { sys::cuFuncGetParamInfo(f.cu_function(), i, &mut off, &mut size) };
            let ok = match (l.params.get(i), r) {
                (Some(prm), CUresult::CUDA_SUCCESS) => size == prm.size(),
                (None, CUresult::CUDA_ERROR_INVALID_VALUE) => true,
                (None, CUresult::CUDA_SUCCESS) => false,
                (Some(_), CUresult::CUDA_ERROR_INVALID_VALUE) => false,
                (_, err) => return Err(self.fault(vm, DriverError(err))),
            };
            if !ok {
                log::debug!(
                    "vm{vm}: {name}: parameter {i} does not match the kernel (size {size})"
                );
                return Err(Status::BadRequest);
            }
        }
        let mut ptrs: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        // SAFETY: parameter count and sizes checked against the kernel; the
        // kernel runs in the VM's own context and can touch only its memory.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (l.grid[0], l.grid[1], l.grid[2]),
                (l.block[0], l.block[1], l.block[2]),
                l.shared_mem_bytes,
                std::ptr::null_mut(),
                &mut ptrs,
            )
        }
        .map_err(|e| self.fault(vm, e))?;
        self.wait(vm, deadline)?;
        Ok(0)
    }

    fn sync(&mut self, vm: u32, p: Reader, deadline: Instant) -> Result<u32, Status> {
        if !p.is_empty() {
            return Err(Status::BadRequest);
        }
        self.vm_ctx(vm)?;
        self.wait(vm, deadline)?;
        Ok(0)
    }
}

impl Drop for RemotingExecutor {
    fn drop(&mut self) {
        let vms: Vec<u32> = self.vms.keys().copied().collect();
        for vm in vms {
            self.release_vm(vm);
        }
    }
}
