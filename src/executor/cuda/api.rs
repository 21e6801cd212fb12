//! The CUDA API (opcodes 0x03xx) on the GPU: raw device pointers, modules
//! loaded from whole images, streams, events and command buffers, in the
//! VM's own context (inside its worker process). Parsing and the tables are
//! in `executor/cuda_api.rs`; this file makes the driver calls.
//!
//! Every 0x03xx output starts with a reply (`result`, `done`): a CUDA error
//! the driver reports for the guest's values (a bad image, an invalid launch
//! configuration) or that the host finds itself (a range outside every
//! allocation, an unknown handle) is answered with status OK and that
//! CUresult, as the CUDA API would report it. Errors that poison the context
//! (illegal address, ...) end the call as a fault (`Fail::Driver`), and the
//! worker with it.

use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

use cudarc::driver::result::DriverError;
use cudarc::driver::sys::{self, CUdevice, CUresult};

use super::api_blas::VmBlas;
use super::meter::Meter;
use crate::bytes::{Reader, Writer};
use crate::executor::cuda_api::{self as api, cu, ApiTables, Command, ParamLayout, Record};
use crate::executor::remoting::Quota;
use crate::protocol::{Opcode, Status};

/// Raw CUDA objects, kept as addresses so that the tables are `Send` (they
/// are only used on the worker's one thread, with the context current).
/// A module comes with the device memory its load took (its charge).
pub type RawTables = ApiTables<(usize, u64), usize, usize, usize>;

/// The CUDA API state of one VM: its tables, and its cuBLAS handle once a
/// GEMM or CU_BLAS_INIT asked for one (`api_blas.rs`).
#[derive(Debug)]
pub struct ApiState {
    tables: RawTables,
    blas: Option<VmBlas>,
}

impl std::ops::Deref for ApiState {
    type Target = RawTables;
    fn deref(&self) -> &RawTables {
        &self.tables
    }
}

impl std::ops::DerefMut for ApiState {
    fn deref_mut(&mut self) -> &mut RawTables {
        &mut self.tables
    }
}

impl ApiState {
    /// See [`ApiTables::new`].
    pub fn new(base: u64) -> Self {
        ApiState {
            tables: ApiTables::new(base),
            blas: None,
        }
    }

    /// Destroys the cuBLAS handle; call with the VM's context current,
    /// before the context goes.
    pub fn release_blas(&mut self) {
        if let Some(b) = self.blas.take() {
            b.destroy();
        }
    }

    /// Forgets every object (their context is gone or going). A cuBLAS
    /// handle not released before is left behind (its context is gone).
    pub fn clear(&mut self) {
        if self.blas.take().is_some() {
            log::debug!("cuBLAS handle left with its lost context");
        }
        self.tables.clear();
    }

    /// The VM's cuBLAS handle, created on first use in its context.
    fn blas(&mut self) -> Result<&mut VmBlas, Outcome> {
        if self.blas.is_none() {
            self.blas = Some(VmBlas::create().map_err(host)?);
        }
        self.blas.as_mut().ok_or(host(cu::NOT_SUPPORTED))
    }
}

/// How a CUDA API call fails as a request.
pub enum Fail {
    /// The request itself is wrong (or the output too small).
    Status(Status),
    /// The context is poisoned: the caller tears it down.
    Driver(DriverError),
    /// The work ran past the execution limit.
    Timeout,
}

impl From<Status> for Fail {
    fn from(s: Status) -> Fail {
        Fail::Status(s)
    }
}

impl From<api::Error> for Fail {
    fn from(e: api::Error) -> Fail {
        Fail::Status(e.status())
    }
}

/// A CUDA error for the guest, or the end of the context.
enum Outcome {
    Cuda(u32),
    Fatal(DriverError),
}

/// CUresults after which the context is unusable: the list of
/// `cuda/mod.rs` ([`super::ends_context`]), shared with the daemon's own
/// executor. Everything else is the guest's error to handle, answered as
/// its CUresult.
fn poisons_context(code: u32) -> bool {
    super::ends_context(code)
}

fn classify(r: CUresult) -> Result<(), Outcome> {
    match r {
        CUresult::CUDA_SUCCESS => Ok(()),
        e if poisons_context(e as u32) => Err(Outcome::Fatal(DriverError(e))),
        e => Err(Outcome::Cuda(e as u32)),
    }
}

/// Writes a reply with `data`, or the CUDA error alone.
fn answer(out: &mut Writer, r: Result<Vec<u8>, Outcome>) -> Result<u32, Fail> {
    let bytes = match r {
        Ok(data) => api::reply(cu::SUCCESS, 0, &data),
        Err(Outcome::Cuda(code)) => api::reply(code, 0, &[]),
        Err(Outcome::Fatal(e)) => return Err(Fail::Driver(e)),
    };
    Ok(out.write_output(&bytes)?)
}

fn host(code: u32) -> Outcome {
    Outcome::Cuda(code)
}

/// Runs one CUDA API call with the VM's context current.
pub fn call(
    st: &mut ApiState,
    quota: &mut Quota,
    meter: &Meter,
    opcode: Opcode,
    p: &[u8],
    out: &mut Writer,
    deadline: Instant,
) -> Result<u32, Fail> {
    if out.capacity() < api::REPLY_SIZE {
        return Err(Fail::Status(Status::TooLarge));
    }
    let r = match opcode {
        Opcode::CuDeviceInfo => {
            if !p.is_empty() {
                return Err(Status::BadRequest.into());
            }
            device_info()
        }
        Opcode::CuMemAlloc => mem_alloc(st, quota, api::parse_u64(p, "MEM_ALLOC is 8 bytes")?),
        Opcode::CuMemFree => mem_free(st, quota, api::parse_u64(p, "MEM_FREE is 8 bytes")?),
        Opcode::CuMemcpyHtoD => {
            let (dst, data) = api::parse_htod(p)?;
            if !st.allocations.contains(dst, data.len() as u64) {
                Err(host(cu::INVALID_VALUE))
            } else {
                // SAFETY: the destination range lies in one of the VM's
                // allocations; the source is the payload.
                classify(unsafe {
                    sys::cuMemcpyHtoD_v2(dst, data.as_ptr() as *const c_void, data.len())
                })
                .map(|_| Vec::new())
            }
        }
        Opcode::CuMemcpyDtoH => {
            let c = api::exact::<api::CopyWire>(p, "MEMCPY_DTOH is 16 bytes")?;
            let (src, len) = (u64::from(c.dptr), u64::from(c.len));
            if len > api::MAX_COPY_LEN as u64 {
                return Err(Status::TooLarge.into());
            }
            let len = len as usize;
            if out.capacity() < api::REPLY_SIZE + len {
                return Err(Status::TooLarge.into());
            }
            if !st.allocations.contains(src, len as u64) {
                Err(host(cu::INVALID_VALUE))
            } else {
                return dtoh_sync(out, src, len);
            }
        }
        Opcode::CuModuleLoad => module_load(st, quota, meter, &api::parse_image(p)?),
        Opcode::CuModuleUnload => {
            let h = api::parse_u64(p, "MODULE_UNLOAD is 8 bytes")?;
            match st.modules.remove(h) {
                None => Err(host(cu::INVALID_HANDLE)),
                Some((m, charge)) => {
                    st.functions.retain(|_, f| f.module != h);
                    st.allocations.remove_module(h);
                    quota.release(charge);
                    // SAFETY: a module of this context, no longer in any table.
                    classify(unsafe { sys::cuModuleUnload(m as sys::CUmodule) }).map(|_| Vec::new())
                }
            }
        }
        Opcode::CuGetFunction => get_function(st, quota, p)?,
        Opcode::CuGetGlobal => get_global(st, p)?,
        Opcode::CuFuncAttribute => {
            let a = api::exact::<api::FuncAttrWire>(p, "FUNC_ATTRIBUTE is 16 bytes")?;
            if u32::from(a.reserved) != 0 {
                return Err(Status::BadRequest.into());
            }
            match st.functions.get(a.function.into()) {
                None => Err(host(cu::INVALID_HANDLE)),
                Some(f) => func_attribute(f.raw, u32::from(a.attribute) as c_int),
            }
        }
        Opcode::CuOccupancy => {
            let o = api::exact::<api::OccupancyWire>(p, "OCCUPANCY is 16 bytes")?;
            match st.functions.get(o.function.into()) {
                None => Err(host(cu::INVALID_HANDLE)),
                Some(f) => {
                    let mut n: c_int = 0;
                    // SAFETY: a function of this context; plain out-parameter.
                    classify(unsafe {
                        sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                            &mut n,
                            f.raw as sys::CUfunction,
                            u32::from(o.block_size) as c_int,
                            u32::from(o.dynamic_smem) as usize,
                        )
                    })
                    .map(|_| n.to_le_bytes().to_vec())
                }
            }
        }
        Opcode::CuStreamCreate => {
            let c = api::exact::<api::CreateWire>(p, "STREAM_CREATE is 8 bytes")?;
            if st.streams.is_full() {
                Err(host(cu::OUT_OF_MEMORY))
            } else {
                let mut s: sys::CUstream = std::ptr::null_mut();
                // SAFETY: plain out-parameter; flags and priority are checked
                // by the driver.
                let r = classify(unsafe {
                    sys::cuStreamCreateWithPriority(
                        &mut s,
                        u32::from(c.flags),
                        u32::from(c.priority) as i32,
                    )
                });
                r.and_then(|_| register(st, |t, h| t.streams.insert(h, s as usize)))
            }
        }
        Opcode::CuStreamDestroy => {
            let h = api::parse_u64(p, "STREAM_DESTROY is 8 bytes")?;
            match st.streams.remove(h) {
                None => Err(host(cu::INVALID_HANDLE)),
                // SAFETY: a stream of this context, no longer in the table.
                Some(s) => classify(unsafe { sys::cuStreamDestroy_v2(s as sys::CUstream) })
                    .map(|_| Vec::new()),
            }
        }
        Opcode::CuEventCreate => {
            let c = api::exact::<api::CreateWire>(p, "EVENT_CREATE is 8 bytes")?;
            if st.events.is_full() {
                Err(host(cu::OUT_OF_MEMORY))
            } else {
                let mut e: sys::CUevent = std::ptr::null_mut();
                // SAFETY: plain out-parameter; flags are checked by the driver.
                let r = classify(unsafe { sys::cuEventCreate(&mut e, u32::from(c.flags)) });
                r.and_then(|_| register(st, |t, h| t.events.insert(h, e as usize)))
            }
        }
        Opcode::CuEventDestroy => {
            let h = api::parse_u64(p, "EVENT_DESTROY is 8 bytes")?;
            match st.events.remove(h) {
                None => Err(host(cu::INVALID_HANDLE)),
                // SAFETY: an event of this context, no longer in the table.
                Some(e) => classify(unsafe { sys::cuEventDestroy_v2(e as sys::CUevent) })
                    .map(|_| Vec::new()),
            }
        }
        Opcode::CuEventElapsed => {
            let e = api::exact::<api::EventPairWire>(p, "EVENT_ELAPSED is 16 bytes")?;
            match (st.events.get(e.start.into()), st.events.get(e.end.into())) {
                (Some(&a), Some(&b)) => {
                    let mut ms = 0f32;
                    // SAFETY: two events of this context; plain out-parameter.
                    classify(unsafe {
                        sys::cuEventElapsedTime_v2(&mut ms, a as sys::CUevent, b as sys::CUevent)
                    })
                    .map(|_| ms.to_bits().to_le_bytes().to_vec())
                }
                _ => Err(host(cu::INVALID_HANDLE)),
            }
        }
        Opcode::CuMemInfo => {
            if !p.is_empty() {
                return Err(Status::BadRequest.into());
            }
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: plain out-parameters.
            classify(unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }).map(|_| {
                // The VM sees no more than its quota allows.
                let left = quota.limit.saturating_sub(quota.used);
                let total = (total as u64).min(quota.limit);
                let free = (free as u64).min(left);
                let mut v = free.to_le_bytes().to_vec();
                v.extend(total.to_le_bytes());
                v
            })
        }
        Opcode::CuCommandBuffer => return command_buffer(st, p, out, deadline),
        Opcode::CuBlasInit => {
            if !p.is_empty() {
                return Err(Status::BadRequest.into());
            }
            st.blas().map(|b| b.version.to_le_bytes().to_vec())
        }
        _ => return Err(Status::Unsupported.into()),
    };
    answer(out, r)
}

/// Takes a fresh handle and stores the new object under it.
fn register(st: &mut ApiState, put: impl FnOnce(&mut ApiState, u64)) -> Result<Vec<u8>, Outcome> {
    let h = st.next_handle().ok_or(host(cu::OUT_OF_MEMORY))?;
    put(st, h);
    Ok(h.to_le_bytes().to_vec())
}

type RawAttrFn = unsafe extern "C" fn(*mut c_int, c_int, CUdevice) -> CUresult;
type RawFuncAttrFn = unsafe extern "C" fn(*mut c_int, c_int, sys::CUfunction) -> CUresult;

/// A driver entry point by name, with integer attribute arguments: cudarc
/// types attributes as Rust enums, which cannot hold the numbers this
/// driver knows and cudarc does not.
///
/// # Safety
/// `T` must be the C signature of `name`.
unsafe fn raw_symbol<T: Copy>(name: &[u8]) -> Option<T> {
    // SAFETY: the caller names the signature; the library stays loaded for
    // the life of the process (cudarc keeps it in a static).
    unsafe { sys::culib().get::<T>(name).ok().map(|s| *s) }
}

fn device_info() -> Result<Vec<u8>, Outcome> {
    let mut dev: CUdevice = 0;
    // SAFETY: plain out-parameter; the VM's context is current.
    classify(unsafe { sys::cuCtxGetDevice(&mut dev) })?;
    let mut w = api::DeviceInfoWire {
        api_version: api::API_VERSION.into(),
        attr_count: (api::ATTR_COUNT as u32).into(),
        ..Default::default()
    };
    let mut total = 0usize;
    // SAFETY: plain out-parameter.
    classify(unsafe { sys::cuDeviceTotalMem_v2(&mut total, dev) })?;
    w.total_mem = (total as u64).into();
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer holds 255 bytes and a NUL.
    classify(unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 255, dev) })?;
    for (d, s) in w.name.iter_mut().zip(name.iter()) {
        *d = *s as u8;
    }
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: plain out-parameter.
    classify(unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, dev) })?;
    for (d, s) in w.uuid.iter_mut().zip(uuid.bytes.iter()) {
        *d = *s as u8;
    }
    let mut v = vm_memory::ByteValued::as_slice(&w).to_vec();
    // SAFETY: the documented signature of cuDeviceGetAttribute, with the
    // attribute as the C int it is.
    let get: Option<RawAttrFn> = unsafe { raw_symbol(b"cuDeviceGetAttribute\0") };
    for i in 0..api::ATTR_COUNT {
        let mut val: c_int = 0;
        if let Some(get) = get {
            // SAFETY: plain out-parameter; an attribute the driver does not
            // know is CUDA_ERROR_INVALID_VALUE, reported as 0.
            if unsafe { get(&mut val, i as c_int, dev) } != CUresult::CUDA_SUCCESS {
                val = 0;
            }
        }
        v.extend(val.to_le_bytes());
    }
    Ok(v)
}

fn mem_alloc(st: &mut ApiState, quota: &mut Quota, size: u64) -> Result<Vec<u8>, Outcome> {
    if size == 0 {
        return Err(host(cu::INVALID_VALUE));
    }
    if st.allocations.len() >= api::MAX_ALLOCATIONS || quota.charge(size).is_err() {
        return Err(host(cu::OUT_OF_MEMORY));
    }
    let Ok(bytes) = usize::try_from(size) else {
        quota.release(size);
        return Err(host(cu::OUT_OF_MEMORY));
    };
    let mut dptr: sys::CUdeviceptr = 0;
    // SAFETY: plain out-parameter; allocation in the VM's current context.
    if let Err(e) = classify(unsafe { sys::cuMemAlloc_v2(&mut dptr, bytes) }) {
        quota.release(size);
        return Err(e);
    }
    st.allocations.insert(dptr, size, None);
    Ok(dptr.to_le_bytes().to_vec())
}

fn mem_free(st: &mut ApiState, quota: &mut Quota, dptr: u64) -> Result<Vec<u8>, Outcome> {
    let Some(size) = st.allocations.remove(dptr) else {
        return Err(host(cu::INVALID_VALUE));
    };
    quota.release(size);
    // SAFETY: one of the VM's allocations, now out of the table; cuMemFree
    // waits for work that may still use it.
    classify(unsafe { sys::cuMemFree_v2(dptr) }).map(|_| Vec::new())
}

fn dtoh_sync(out: &mut Writer, src: u64, len: usize) -> Result<u32, Fail> {
    out.write_at(
        0,
        vm_memory::ByteValued::as_slice(&api::ReplyWire::default()),
    )?;
    let ranges = out.host_ranges(api::REPLY_SIZE, len)?;
    // SAFETY: the source range lies in one of the VM's allocations; the
    // destination is the output buffer's own memory, kept by `ranges`.
    let r = unsafe { copy_pieces(ranges.iter().map(|(p, n)| (p as usize, n)), src, false) };
    drop(ranges);
    match classify(r) {
        Ok(()) => Ok((api::REPLY_SIZE + len) as u32),
        Err(e) => answer(out, Err(e)),
    }
}

/// Copies between host ranges and device memory from `dev` on, in pieces
/// that each lie in one registration of this process
/// (`memory::registration_piece`), queued on the null
/// stream and waited for once: registered guest pages move by DMA at the
/// link's rate; other memory goes through the driver's staging. Waits even
/// after a failed piece, so that no queued copy outlives its source.
///
/// # Safety
/// The host ranges stay valid until this returns, `dev..dev+total` is
/// device memory of the current context, and `to_device` says the way.
pub(crate) unsafe fn copy_pieces(
    ranges: impl Iterator<Item = (usize, usize)>,
    dev: u64,
    to_device: bool,
) -> CUresult {
    let stream: sys::CUstream = std::ptr::null_mut();
    let mut done = 0u64;
    let mut first_err = CUresult::CUDA_SUCCESS;
    for (ptr, n) in ranges.flat_map(|(p, n)| super::memory::dma_pieces(p, n)) {
        // SAFETY: per the caller's contract.
        let r = unsafe {
            if to_device {
                sys::cuMemcpyHtoDAsync_v2(dev + done, ptr as *const c_void, n, stream)
            } else {
                sys::cuMemcpyDtoHAsync_v2(ptr as *mut c_void, dev + done, n, stream)
            }
        };
        if r != CUresult::CUDA_SUCCESS {
            first_err = r;
            break;
        }
        done += n as u64;
    }
    // SAFETY: the current context's null stream.
    let r = unsafe { sys::cuStreamSynchronize(stream) };
    if first_err != CUresult::CUDA_SUCCESS {
        first_err
    } else {
        r
    }
}

/// CU_MEMCPY_HTOD straight from the payload's memory: in a worker that maps
/// its VM's table, the guest's own pages, by DMA once registered; no copy
/// of the bytes is made first.
pub fn memcpy_htod(st: &ApiState, p: Reader, out: &mut Writer) -> Result<u32, Fail> {
    if out.capacity() < api::REPLY_SIZE {
        return Err(Fail::Status(Status::TooLarge));
    }
    let dst: vm_memory::endian::Le64 = p.read_obj(0)?;
    let dst = u64::from(dst);
    let len = p.len() - 8;
    if len > api::MAX_COPY_LEN {
        return Err(Status::TooLarge.into());
    }
    let r = if !st.allocations.contains(dst, len as u64) {
        Err(host(cu::INVALID_VALUE))
    } else {
        let ranges = p.host_ranges(8, len)?;
        // SAFETY: the destination range lies in one of the VM's
        // allocations; the source is the payload, kept by `ranges`.
        classify(unsafe { copy_pieces(ranges.iter().map(|(p, n)| (p as usize, n)), dst, true) })
            .map(|_| Vec::new())
    };
    answer(out, r)
}

/// Loads a module and charges what its load took (its `.global` arrays) to
/// the quota; one that does not fit is unloaded and answered
/// CUDA_ERROR_OUT_OF_MEMORY, as an allocation past the quota is (the guest
/// learns nothing about the memory left).
fn module_load(
    st: &mut ApiState,
    quota: &mut Quota,
    meter: &Meter,
    image: &[u8],
) -> Result<Vec<u8>, Outcome> {
    if st.modules.is_full() {
        return Err(host(cu::OUT_OF_MEMORY));
    }
    let mut m: sys::CUmodule = std::ptr::null_mut();
    // One VM, one thread: nothing else of this process allocates between
    // the two readings (meter.rs).
    let before = meter.reading();
    // SAFETY: the image is NUL-terminated (parse_image) so PTX text cannot be
    // read past its end; fatbins and cubins are parsed by the driver, which
    // validates their headers and sizes against what it reads.
    classify(unsafe { sys::cuModuleLoadData(&mut m, image.as_ptr() as *const c_void) })?;
    let charge = meter.since(before);
    let unload = |m: sys::CUmodule| {
        // SAFETY: the module just loaded, in no table.
        let _ = unsafe { sys::cuModuleUnload(m) };
    };
    if quota.charge(charge).is_err() {
        unload(m);
        log::info!("module load refused: its globals take {charge} bytes, past the quota");
        return Err(host(cu::OUT_OF_MEMORY));
    }
    match st.next_handle() {
        Some(h) => {
            st.modules.insert(h, (m as usize, charge));
            Ok(h.to_le_bytes().to_vec())
        }
        None => {
            quota.release(charge);
            unload(m);
            Err(host(cu::OUT_OF_MEMORY))
        }
    }
}

fn get_function(
    st: &mut ApiState,
    quota: &mut Quota,
    p: &[u8],
) -> Result<Result<Vec<u8>, Outcome>, Fail> {
    let (module, name) = api::parse_symbol(p)?;
    let Some(&(m, _)) = st.modules.get(module) else {
        return Ok(Err(host(cu::INVALID_HANDLE)));
    };
    if st.functions.is_full() {
        return Ok(Err(host(cu::OUT_OF_MEMORY)));
    }
    let mut f: sys::CUfunction = std::ptr::null_mut();
    // SAFETY: a module of this context and a NUL-terminated name.
    if let Err(e) =
        classify(unsafe { sys::cuModuleGetFunction(&mut f, m as sys::CUmodule, name.as_ptr()) })
    {
        return Ok(Err(e));
    }
    // Before the kernel can run: the stack it can make the driver reserve
    // (answered as an allocation past the quota is, nothing about memory).
    match super::meter::charge_stack(f, quota) {
        Ok(()) => {}
        Err(super::meter::StackRefused::OverQuota) => return Ok(Err(host(cu::OUT_OF_MEMORY))),
        Err(super::meter::StackRefused::Driver(e)) => {
            return Ok(Err(classify(e).err().unwrap_or(host(cu::INVALID_VALUE))))
        }
    }
    let mut params = Vec::new();
    for i in 0..=api::MAX_FUNCTION_PARAMS {
        let (mut off, mut size) = (0usize, 0usize);
        // SAFETY: a live function; an index past the last parameter is
        // CUDA_ERROR_INVALID_VALUE.
        match unsafe { sys::cuFuncGetParamInfo(f, i, &mut off, &mut size) } {
            CUresult::CUDA_SUCCESS => params.push((off as u32, size as u32)),
            CUresult::CUDA_ERROR_INVALID_VALUE => break,
            e => return Ok(Err(classify(e).err().unwrap_or(host(cu::INVALID_VALUE)))),
        }
    }
    let Ok(layout) = ParamLayout::new(params) else {
        return Ok(Err(host(cu::NOT_SUPPORTED)));
    };
    let Some(h) = st.next_handle() else {
        return Ok(Err(host(cu::OUT_OF_MEMORY)));
    };
    let bytes = layout.encode(h);
    st.functions.insert(
        h,
        api::Function {
            raw: f as usize,
            module,
            layout,
        },
    );
    Ok(Ok(bytes))
}

fn get_global(st: &mut ApiState, p: &[u8]) -> Result<Result<Vec<u8>, Outcome>, Fail> {
    let (module, name) = api::parse_symbol(p)?;
    let Some(&(m, _)) = st.modules.get(module) else {
        return Ok(Err(host(cu::INVALID_HANDLE)));
    };
    let (mut dptr, mut size) = (0u64, 0usize);
    // SAFETY: a module of this context and a NUL-terminated name.
    if let Err(e) = classify(unsafe {
        sys::cuModuleGetGlobal_v2(&mut dptr, &mut size, m as sys::CUmodule, name.as_ptr())
    }) {
        return Ok(Err(e));
    }
    // The module's variable becomes a range the guest may copy to and from.
    st.allocations.insert(dptr, size as u64, Some(module));
    let mut v = dptr.to_le_bytes().to_vec();
    v.extend((size as u64).to_le_bytes());
    Ok(Ok(v))
}

fn func_attribute(f: usize, attr: c_int) -> Result<Vec<u8>, Outcome> {
    // SAFETY: the documented signature, attribute as a C int.
    let Some(get) = (unsafe { raw_symbol::<RawFuncAttrFn>(b"cuFuncGetAttribute\0") }) else {
        return Err(host(cu::NOT_SUPPORTED));
    };
    let mut v: c_int = 0;
    // SAFETY: a live function; plain out-parameter.
    classify(unsafe { get(&mut v, attr, f as sys::CUfunction) })?;
    Ok(v.to_le_bytes().to_vec())
}

/// The raw stream of handle `h` (0: the context's NULL stream).
fn stream(st: &ApiState, h: u64) -> Option<sys::CUstream> {
    if h == 0 {
        Some(std::ptr::null_mut())
    } else {
        st.streams.get(h).map(|&s| s as sys::CUstream)
    }
}

/// Runs a command buffer: records in order, each checked as it comes; the
/// first failing one stops the buffer. Then waits for all the VM's streams,
/// so that the answer means "done" and the execution limit bounds it.
fn command_buffer(
    st: &mut ApiState,
    p: &[u8],
    out: &mut Writer,
    deadline: Instant,
) -> Result<u32, Fail> {
    let cb = api::parse_command_buffer(p)?;
    let out_len = api::REPLY_SIZE + cb.dtoh_bytes as usize;
    if out.capacity() < out_len {
        return Err(Status::TooLarge.into());
    }
    let mut dtoh_off = api::REPLY_SIZE;
    let mut failed = None;
    for (i, cmd) in cb.commands.iter().enumerate() {
        match run_record(st, cmd, out, &mut dtoh_off) {
            Ok(()) => {}
            Err(Outcome::Cuda(code)) => {
                failed = Some((i as u32, code));
                break;
            }
            Err(Outcome::Fatal(e)) => return Err(Fail::Driver(e)),
        }
        if Instant::now() >= deadline {
            return Err(Fail::Timeout);
        }
    }
    wait_all(st, deadline)?;
    let (done, result) = failed.unwrap_or((api::ALL_DONE, cu::SUCCESS));
    out.write_at(
        0,
        vm_memory::ByteValued::as_slice(&api::ReplyWire {
            result: result.into(),
            done: done.into(),
        }),
    )?;
    // Only the DtoH bytes of records that ran count.
    Ok(dtoh_off as u32)
}

fn run_record(
    st: &mut ApiState,
    cmd: &Command,
    out: &mut Writer,
    dtoh_off: &mut usize,
) -> Result<(), Outcome> {
    let s = stream(st, cmd.stream).ok_or(host(cu::INVALID_HANDLE))?;
    if let Record::Gemm(g) = &cmd.record {
        return gemm(st, s, g);
    }
    let st = &*st;
    let ranges_ok = |ptr: u64, len: u64| {
        if st.allocations.contains(ptr, len) {
            Ok(())
        } else {
            Err(host(cu::INVALID_VALUE))
        }
    };
    match &cmd.record {
        Record::Launch {
            function,
            grid,
            block,
            shared_mem,
            params,
        } => {
            let f = st
                .functions
                .get(*function)
                .ok_or(host(cu::INVALID_HANDLE))?;
            if params.len() != f.layout.bytes as usize {
                return Err(host(cu::INVALID_VALUE));
            }
            // 8-byte aligned copy of the packed parameters.
            let mut buf = vec![0u64; params.len().div_ceil(8)];
            // SAFETY: `buf` holds at least params.len() bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    params.as_ptr(),
                    buf.as_mut_ptr() as *mut u8,
                    params.len(),
                )
            };
            let mut size = params.len();
            let mut extra = [
                sys::CU_LAUNCH_PARAM_BUFFER_POINTER_AS_INT as usize as *mut c_void,
                buf.as_mut_ptr() as *mut c_void,
                sys::CU_LAUNCH_PARAM_BUFFER_SIZE_AS_INT as usize as *mut c_void,
                &mut size as *mut usize as *mut c_void,
                sys::CU_LAUNCH_PARAM_END_AS_INT as usize as *mut c_void,
            ];
            let extra_ptr = if params.is_empty() {
                std::ptr::null_mut()
            } else {
                extra.as_mut_ptr()
            };
            // SAFETY: the parameter buffer has exactly the size the kernel's
            // own layout asks for (cuFuncGetParamInfo), so the driver reads
            // no byte past it; the kernel runs in the VM's own context.
            classify(unsafe {
                sys::cuLaunchKernel(
                    f.raw as sys::CUfunction,
                    grid[0],
                    grid[1],
                    grid[2],
                    block[0],
                    block[1],
                    block[2],
                    *shared_mem,
                    s,
                    std::ptr::null_mut(),
                    extra_ptr,
                )
            })
        }
        Record::HtoD { dst, data } => {
            ranges_ok(*dst, data.len() as u64)?;
            // SAFETY: destination checked; the source is pageable payload
            // memory, which the driver has copied when the call returns.
            classify(unsafe {
                sys::cuMemcpyHtoDAsync_v2(*dst, data.as_ptr() as *const c_void, data.len(), s)
            })
        }
        Record::DtoH { src, len } => {
            ranges_ok(*src, *len)?;
            let ranges = out
                .host_ranges(*dtoh_off, *len as usize)
                .map_err(|_| host(cu::INVALID_VALUE))?;
            let mut done = 0u64;
            // Guest pages a worker registered may be the output: a piece
            // never spans two registrations.
            for (ptr, n) in ranges
                .iter()
                .flat_map(|(p, n)| super::memory::dma_pieces(p as usize, n))
            {
                // SAFETY: source checked; the destination is the output
                // buffer, kept by `ranges`; the buffer's end waits for the
                // stream (`wait_all`) before the reply is written.
                classify(unsafe {
                    sys::cuMemcpyDtoHAsync_v2(ptr as *mut c_void, *src + done, n, s)
                })?;
                done += n as u64;
            }
            drop(ranges);
            *dtoh_off += *len as usize;
            Ok(())
        }
        Record::DtoD { dst, src, len } => {
            ranges_ok(*dst, *len)?;
            ranges_ok(*src, *len)?;
            // SAFETY: both ranges lie in the VM's allocations.
            classify(unsafe { sys::cuMemcpyDtoDAsync_v2(*dst, *src, *len as usize, s) })
        }
        Record::Memset {
            dst,
            count,
            value,
            elem_size,
        } => {
            let bytes = count
                .checked_mul(u64::from(*elem_size))
                .ok_or(host(cu::INVALID_VALUE))?;
            ranges_ok(*dst, bytes)?;
            let n = *count as usize;
            // SAFETY: the range lies in one of the VM's allocations.
            classify(unsafe {
                match elem_size {
                    1 => sys::cuMemsetD8Async(*dst, *value as u8, n, s),
                    2 => sys::cuMemsetD16Async(*dst, *value as u16, n, s),
                    _ => sys::cuMemsetD32Async(*dst, *value, n, s),
                }
            })
        }
        Record::EventRecord { event } => {
            let e = st.events.get(*event).ok_or(host(cu::INVALID_HANDLE))?;
            // SAFETY: an event and a stream of this context.
            classify(unsafe { sys::cuEventRecord(*e as sys::CUevent, s) })
        }
        Record::StreamWaitEvent { event } => {
            let e = st.events.get(*event).ok_or(host(cu::INVALID_HANDLE))?;
            // SAFETY: an event and a stream of this context.
            classify(unsafe { sys::cuStreamWaitEvent(s, *e as sys::CUevent, 0) })
        }
        Record::Gemm(_) => Err(host(cu::NOT_SUPPORTED)),
    }
}

/// A GEMM record: cuBLAS's argument rules, then every matrix range inside
/// one of the VM's allocations (from its dimensions and leading dimension,
/// checked arithmetic), then the real cuBLAS on the record's stream.
fn gemm(st: &mut ApiState, s: sys::CUstream, g: &api::Gemm) -> Result<(), Outcome> {
    g.validate().map_err(host)?;
    for (ptr, len) in g.ranges().map_err(host)? {
        if len > 0 && !st.allocations.contains(ptr, len) {
            return Err(host(cu::INVALID_VALUE));
        }
    }
    st.blas()?.gemm(s, g).map_err(host)
}

/// Waits until the NULL stream and every stream of the VM are idle, or the
/// deadline.
fn wait_all(st: &ApiState, deadline: Instant) -> Result<(), Fail> {
    let mut streams: Vec<sys::CUstream> = vec![std::ptr::null_mut()];
    streams.extend(st.streams.values().map(|&s| s as sys::CUstream));
    let mut spins = 0u32;
    for s in streams {
        loop {
            // SAFETY: a stream of this context (or its NULL stream).
            match unsafe { sys::cuStreamQuery(s) } {
                CUresult::CUDA_SUCCESS => break,
                CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(Fail::Driver(DriverError(e))),
            }
            if Instant::now() >= deadline {
                return Err(Fail::Timeout);
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_errors_end_the_context() {
        for c in [700, 702, 715, 719, 999] {
            assert!(poisons_context(c), "{c}");
        }
        // The guest's own mistakes are answered, the context kept.
        for c in [1, 2, 200, 209, 218, 400, 500, 600, 701, 720, 801] {
            assert!(!poisons_context(c), "{c}");
        }
        assert!(matches!(
            classify(CUresult::CUDA_ERROR_INVALID_VALUE),
            Err(Outcome::Cuda(1))
        ));
        assert!(matches!(
            classify(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            Err(Outcome::Fatal(_))
        ));
        assert!(classify(CUresult::CUDA_SUCCESS).is_ok());
    }
}
