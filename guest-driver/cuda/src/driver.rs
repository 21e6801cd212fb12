//! The driver API face (`libcuda.so.1`). One device (0) and one context
//! (its primary context; cuCtxCreate hands out the same one): the host runs
//! the VM's work in one context of its worker. Handles the program sees are
//! the host's handles as pointers (streams, events, modules, functions) and
//! the real device addresses (CUdeviceptr).

// The exported functions are the CUDA API: their safety contract is
// NVIDIA's documentation of each call (valid out-pointers and buffers).
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use vgpu::executor::cuda_api::{self as api, Record};
use vgpu::protocol::{read_obj, Opcode};
use vm_memory::endian::Le32;
use vm_memory::ByteValued;

use crate::client::{self, CuResult};
use crate::{cu, guard};

pub type CUresult = c_uint;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type Handle = *mut c_void;

/// The one context's handle: any stable non-null address.
static CONTEXT: u8 = 0;
pub fn context() -> Handle {
    &CONTEXT as *const u8 as Handle
}

pub(crate) fn h(p: Handle) -> u64 {
    p as usize as u64
}

/// Writes `v` through an out-pointer, refusing a null one.
///
/// # Safety
/// `p` is null or valid for a write of `T`.
pub(crate) unsafe fn put<T>(p: *mut T, v: T) -> CuResult<()> {
    if p.is_null() {
        return Err(cu::INVALID_VALUE);
    }
    // SAFETY: non-null, and valid per the caller.
    unsafe { p.write(v) };
    Ok(())
}

fn dev_ok(d: CUdevice) -> CuResult<()> {
    if d == 0 {
        Ok(())
    } else {
        Err(cu::INVALID_DEVICE)
    }
}

pub(crate) fn ensure_init() -> CuResult<()> {
    client::with(|_| Ok(()))
}

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    guard(ensure_init)
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(v, 13000) })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    guard(|| {
        let r = ensure_init();
        // SAFETY: out-pointer from the caller.
        unsafe { put(n, if r.is_ok() { 1 } else { 0 }) }?;
        r
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(d: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard(|| {
        ensure_init()?;
        dev_ok(ordinal)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(d, 0) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, d: CUdevice) -> CUresult {
    guard(|| {
        dev_ok(d)?;
        let n = client::with(|c| Ok(c.device.name))?;
        if name.is_null() || len <= 0 {
            return Err(cu::INVALID_VALUE);
        }
        let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
        let k = end.min(len as usize - 1);
        // SAFETY: the caller's buffer holds `len` bytes; k + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(n.as_ptr(), name as *mut u8, k);
            *name.add(k) = 0;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(v: *mut c_int, attr: c_int, d: CUdevice) -> CUresult {
    guard(|| {
        dev_ok(d)?;
        let a = client::with(|c| Ok(c.device.attr(attr)))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(v, a) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, d: CUdevice) -> CUresult {
    guard(|| {
        dev_ok(d)?;
        let t = client::with(|c| Ok(c.device.total_mem))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(bytes, t as usize) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], d: CUdevice) -> CUresult {
    guard(|| {
        dev_ok(d)?;
        let u = client::with(|c| Ok(c.device.uuid))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(uuid, u) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], d: CUdevice) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuDeviceGetUuid_v2(uuid, d) }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    d: CUdevice,
) -> CUresult {
    guard(|| {
        dev_ok(d)?;
        // 75, 76: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR.
        let (a, b) = client::with(|c| Ok((c.device.attr(75), c.device.attr(76))))?;
        // SAFETY: out-pointers from the caller.
        unsafe {
            put(major, a)?;
            put(minor, b)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Handle, d: CUdevice) -> CUresult {
    guard(|| {
        ensure_init()?;
        dev_ok(d)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(ctx, context()) }
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(d: CUdevice) -> CUresult {
    guard(|| dev_ok(d))
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    d: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    guard(|| {
        dev_ok(d)?;
        // SAFETY: out-pointers from the caller.
        unsafe {
            put(flags, 0)?;
            put(active, 1)
        }
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxSetFlags_v2(d: CUdevice, _flags: c_uint) -> CUresult {
    guard(|| dev_ok(d))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(
    ctx: *mut Handle,
    _p: *mut c_void,
    _f: c_uint,
    d: CUdevice,
) -> CUresult {
    // SAFETY: same out-pointer contract.
    unsafe { cuDevicePrimaryCtxRetain(ctx, d) }
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v2(ctx: *mut Handle, _f: c_uint, d: CUdevice) -> CUresult {
    // SAFETY: same out-pointer contract.
    unsafe { cuDevicePrimaryCtxRetain(ctx, d) }
}

#[no_mangle]
pub extern "C" fn cuCtxDestroy_v2(_ctx: Handle) -> CUresult {
    guard(|| client::with(|c| c.flush()))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut Handle) -> CUresult {
    guard(|| {
        let cur = if ensure_init().is_ok() {
            context()
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: out-pointer from the caller.
        unsafe { put(ctx, cur) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(_ctx: Handle) -> CUresult {
    guard(ensure_init)
}

#[no_mangle]
pub extern "C" fn cuCtxPushCurrent_v2(_ctx: Handle) -> CUresult {
    guard(ensure_init)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(ctx: *mut Handle) -> CUresult {
    guard(|| {
        if !ctx.is_null() {
            // SAFETY: non-null out-pointer from the caller.
            unsafe { ctx.write(context()) };
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(d: *mut CUdevice) -> CUresult {
    guard(|| {
        ensure_init()?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(d, 0) }
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    guard(|| client::with(|c| c.flush()))
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetApiVersion(_ctx: Handle, v: *mut c_uint) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(v, 13000) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, size: usize) -> CUresult {
    guard(|| {
        let p = client::with(|c| c.mem_alloc(size as u64))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(dptr, p) }
    })
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard(|| client::with(|c| c.mem_free(dptr)))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard(|| {
        let out = client::with(|c| c.call(Opcode::CuMemInfo, &[], 16))?;
        let m: api::MemInfoWire = read_obj(&out, 0).ok_or(cu::UNKNOWN)?;
        // SAFETY: out-pointers from the caller.
        unsafe {
            put(free, u64::from(m.free) as usize)?;
            put(total, u64::from(m.total) as usize)
        }
    })
}

/// Host to device on `stream`.
///
/// # Safety
/// `src` valid for `n` bytes of reads.
pub(crate) unsafe fn htod(dst: u64, src: *const c_void, n: usize, stream: u64) -> CuResult<()> {
    if n == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(cu::INVALID_VALUE);
    }
    // SAFETY: the caller's buffer holds n bytes.
    let data = unsafe { std::slice::from_raw_parts(src as *const u8, n) };
    client::with(|c| c.htod(stream, dst, data))
}

/// Device to host on `stream`; `sync` flushes before returning.
///
/// # Safety
/// `dst` valid for `n` bytes of writes until the next synchronisation.
pub(crate) unsafe fn dtoh(
    dst: *mut c_void,
    src: u64,
    n: usize,
    stream: u64,
    sync: bool,
) -> CuResult<()> {
    if n == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(cu::INVALID_VALUE);
    }
    client::with(|c| {
        // SAFETY: per the caller.
        unsafe { c.dtoh(stream, dst as *mut u8, src, n) }?;
        if sync {
            c.flush()?;
        }
        Ok(())
    })
}

pub(crate) fn dtod(dst: u64, src: u64, n: usize, stream: u64, sync: bool) -> CuResult<()> {
    client::with(|c| {
        c.enqueue(
            stream,
            Record::DtoD {
                dst,
                src,
                len: n as u64,
            },
            0,
        )?;
        if sync {
            c.flush()?;
        }
        Ok(())
    })
}

pub(crate) fn memset(
    dst: u64,
    value: u32,
    count: usize,
    elem: u32,
    stream: u64,
    sync: bool,
) -> CuResult<()> {
    client::with(|c| {
        c.enqueue(
            stream,
            Record::Memset {
                dst,
                count: count as u64,
                value,
                elem_size: elem,
            },
            0,
        )?;
        if sync {
            c.flush()?;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
) -> CUresult {
    // SAFETY: the caller's buffer; a synchronous copy is done at the flush.
    guard(|| unsafe { htod(dst, src, n, 0) }.and_then(|_| client::with(|c| c.flush())))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    // SAFETY: the caller's buffer.
    guard(|| unsafe { dtoh(dst, src, n, 0, true) })
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    guard(|| dtod(dst, src, n, 0, true))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    s: Handle,
) -> CUresult {
    // SAFETY: the caller's buffer.
    guard(|| unsafe { htod(dst, src, n, h(s)) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    s: Handle,
) -> CUresult {
    // SAFETY: the caller's buffer, valid until the stream is synchronised.
    guard(|| unsafe { dtoh(dst, src, n, h(s), false) })
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    s: Handle,
) -> CUresult {
    guard(|| dtod(dst, src, n, h(s), false))
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, v: u8, n: usize) -> CUresult {
    guard(|| memset(dst, u32::from(v), n, 1, 0, true))
}

#[no_mangle]
pub extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, v: u16, n: usize) -> CUresult {
    guard(|| memset(dst, u32::from(v), n, 2, 0, true))
}

#[no_mangle]
pub extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, v: u32, n: usize) -> CUresult {
    guard(|| memset(dst, v, n, 4, 0, true))
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, v: u8, n: usize, s: Handle) -> CUresult {
    guard(|| memset(dst, u32::from(v), n, 1, h(s), false))
}

#[no_mangle]
pub extern "C" fn cuMemsetD32Async(dst: CUdeviceptr, v: u32, n: usize, s: Handle) -> CUresult {
    guard(|| memset(dst, v, n, 4, h(s), false))
}

/// Host memory for the program ("pinned": here plain page-aligned memory;
/// copies go through the transport either way).
pub(crate) fn host_alloc(size: usize) -> CuResult<*mut c_void> {
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: plain out-parameter; alignment is a power of two.
    if unsafe { libc::posix_memalign(&mut p, 4096, size.max(1)) } != 0 {
        return Err(cu::OUT_OF_MEMORY);
    }
    Ok(p)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, size: usize) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(pp, host_alloc(size)?) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(pp: *mut *mut c_void, size: usize, _f: c_uint) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(pp, host_alloc(size)?) })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    // SAFETY: memory from host_alloc (posix_memalign), or null.
    unsafe { libc::free(p) };
    0
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut Handle, image: *const c_void) -> CUresult {
    guard(|| {
        // SAFETY: the caller's image, whose size the image itself says.
        let img = unsafe { image_bytes(image) }?;
        let hm = client::with(|c| c.module_load(img))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(m, hm as usize as Handle) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    m: *mut Handle,
    image: *const c_void,
    _n: c_uint,
    _opts: *mut c_void,
    _vals: *mut *mut c_void,
) -> CUresult {
    // SAFETY: same contract; JIT options are left to the host's defaults.
    unsafe { cuModuleLoadData(m, image) }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(m: *mut Handle, path: *const c_char) -> CUresult {
    guard(|| {
        if path.is_null() {
            return Err(cu::INVALID_VALUE);
        }
        // SAFETY: a NUL-terminated path from the caller.
        let p = unsafe { CStr::from_ptr(path) };
        let bytes = std::fs::read(std::ffi::OsStr::from_encoded_bytes_unchecked_safe(p))
            .map_err(|_| cu::NOT_FOUND)?;
        let hm = client::with(|c| c.module_load(&bytes))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(m, hm as usize as Handle) }
    })
}

/// `OsStr` from C string bytes (Unix paths are bytes).
trait FromCStr {
    fn from_encoded_bytes_unchecked_safe(c: &CStr) -> &std::ffi::OsStr;
}
impl FromCStr for std::ffi::OsStr {
    fn from_encoded_bytes_unchecked_safe(c: &CStr) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(c.to_bytes())
    }
}

#[no_mangle]
pub extern "C" fn cuModuleUnload(m: Handle) -> CUresult {
    guard(|| {
        client::with(|c| c.call(Opcode::CuModuleUnload, &h(m).to_le_bytes(), 0))?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut Handle,
    m: Handle,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        if name.is_null() {
            return Err(cu::INVALID_VALUE);
        }
        // SAFETY: a NUL-terminated name from the caller.
        let n = unsafe { CStr::from_ptr(name) }.to_bytes();
        let hf = client::with(|c| c.get_function(h(m), n))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(f, hf as usize as Handle) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    m: Handle,
    name: *const c_char,
) -> CUresult {
    guard(|| {
        if name.is_null() {
            return Err(cu::INVALID_VALUE);
        }
        // SAFETY: a NUL-terminated name from the caller.
        let n = unsafe { CStr::from_ptr(name) }.to_bytes();
        let mut p = h(m).to_le_bytes().to_vec();
        p.extend_from_slice(n);
        let out = client::with(|c| c.call(Opcode::CuGetGlobal, &p, 16))?;
        let g: api::GlobalWire = read_obj(&out, 0).ok_or(cu::UNKNOWN)?;
        // SAFETY: optional out-pointers from the caller.
        unsafe {
            if !dptr.is_null() {
                dptr.write(g.dptr.into());
            }
            if !bytes.is_null() {
                bytes.write(u64::from(g.size) as usize);
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(v: *mut c_int, attr: c_int, f: Handle) -> CUresult {
    guard(|| {
        let p = api::FuncAttrWire {
            function: h(f).into(),
            attribute: (attr as u32).into(),
            reserved: 0.into(),
        };
        let out = client::with(|c| c.call(Opcode::CuFuncAttribute, p.as_slice(), 4))?;
        let x: Le32 = read_obj(&out, 0).ok_or(cu::UNKNOWN)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(v, u32::from(x) as c_int) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetParamInfo(
    f: Handle,
    i: usize,
    off: *mut usize,
    size: *mut usize,
) -> CUresult {
    guard(|| {
        let (o, s) = client::with(|c| {
            let l = c.layout(h(f)).ok_or(cu::INVALID_HANDLE)?;
            l.params.get(i).copied().ok_or(cu::INVALID_VALUE)
        })?;
        // SAFETY: out-pointers from the caller.
        unsafe {
            put(off, o as usize)?;
            put(size, s as usize)
        }
    })
}

#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(_f: Handle, _attr: c_int, _v: c_int) -> CUresult {
    cu::NOT_SUPPORTED
}

#[no_mangle]
pub extern "C" fn cuFuncSetCacheConfig(_f: Handle, _c: c_int) -> CUresult {
    0
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    n: *mut c_int,
    f: Handle,
    block: c_int,
    smem: usize,
) -> CUresult {
    guard(|| {
        let p = api::OccupancyWire {
            function: h(f).into(),
            block_size: (block as u32).into(),
            dynamic_smem: (smem as u32).into(),
        };
        let out = client::with(|c| c.call(Opcode::CuOccupancy, p.as_slice(), 4))?;
        let x: Le32 = read_obj(&out, 0).ok_or(cu::UNKNOWN)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(n, u32::from(x) as c_int) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    s: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    guard(|| {
        if !extra.is_null() {
            // CU_LAUNCH_PARAM_BUFFER_POINTER launches are not carried yet.
            return Err(cu::NOT_SUPPORTED);
        }
        client::with(|c| {
            // SAFETY: kernelParams per the CUDA contract: one pointer per
            // parameter of the kernel.
            unsafe {
                c.launch(
                    h(f),
                    [gx, gy, gz],
                    [bx, by, bz],
                    smem,
                    h(s),
                    params as *const *const u8,
                )
            }
        })
    })
}

pub(crate) fn stream_create(flags: u32, priority: i32) -> CuResult<u64> {
    let p = api::CreateWire {
        flags: flags.into(),
        priority: (priority as u32).into(),
    };
    client::with(|c| c.call_u64(Opcode::CuStreamCreate, p.as_slice()))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut Handle, flags: c_uint) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(s, stream_create(flags, 0)? as usize as Handle) })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut Handle,
    flags: c_uint,
    prio: c_int,
) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(s, stream_create(flags, prio)? as usize as Handle) })
}

pub(crate) fn destroy(op: Opcode, handle: u64) -> CuResult<()> {
    client::with(|c| c.call(op, &handle.to_le_bytes(), 0)).map(|_| ())
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(s: Handle) -> CUresult {
    guard(|| destroy(Opcode::CuStreamDestroy, h(s)))
}

/// Every synchronisation point sends the queued work and waits for it (the
/// host answers a command buffer when its work is done).
pub(crate) fn sync() -> CuResult<()> {
    client::with(|c| c.flush())
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(_s: Handle) -> CUresult {
    guard(sync)
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(_s: Handle) -> CUresult {
    guard(sync)
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(s: Handle, e: Handle, _flags: c_uint) -> CUresult {
    guard(|| client::with(|c| c.enqueue(h(s), Record::StreamWaitEvent { event: h(e) }, 0)))
}

pub(crate) fn event_create(flags: u32) -> CuResult<u64> {
    let p = api::CreateWire {
        flags: flags.into(),
        priority: 0.into(),
    };
    client::with(|c| c.call_u64(Opcode::CuEventCreate, p.as_slice()))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut Handle, flags: c_uint) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(e, event_create(flags)? as usize as Handle) })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(e: Handle) -> CUresult {
    guard(|| destroy(Opcode::CuEventDestroy, h(e)))
}

#[no_mangle]
pub extern "C" fn cuEventRecord(e: Handle, s: Handle) -> CUresult {
    guard(|| client::with(|c| c.enqueue(h(s), Record::EventRecord { event: h(e) }, 0)))
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(_e: Handle) -> CUresult {
    guard(sync)
}

#[no_mangle]
pub extern "C" fn cuEventQuery(_e: Handle) -> CUresult {
    guard(sync)
}

pub(crate) fn elapsed(a: u64, b: u64) -> CuResult<f32> {
    let p = api::EventPairWire {
        start: a.into(),
        end: b.into(),
    };
    let out = client::with(|c| c.call(Opcode::CuEventElapsed, p.as_slice(), 4))?;
    let x: Le32 = read_obj(&out, 0).ok_or(cu::UNKNOWN)?;
    Ok(f32::from_bits(x.into()))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, a: Handle, b: Handle) -> CUresult {
    // SAFETY: out-pointer from the caller.
    guard(|| unsafe { put(ms, elapsed(h(a), h(b))?) })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, a: Handle, b: Handle) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuEventElapsedTime_v2(ms, a, b) }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(e: CUresult, s: *mut *const c_char) -> CUresult {
    // SAFETY: out-pointer from the caller; the text is static.
    guard(|| unsafe { put(s, crate::error_text(e).1.as_ptr() as *const c_char) })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(e: CUresult, s: *mut *const c_char) -> CUresult {
    // SAFETY: out-pointer from the caller; the text is static.
    guard(|| unsafe { put(s, crate::error_text(e).0.as_ptr() as *const c_char) })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetExportTable(_t: *mut *const c_void, _id: *const c_void) -> CUresult {
    cu::NOT_SUPPORTED
}

/// Entry points by name (cuGetProcAddress); names without their `_vN`
/// suffix resolve to the newest version this library has.
fn proc_table() -> &'static [(&'static str, usize)] {
    static TABLE: std::sync::OnceLock<Vec<(&'static str, usize)>> = std::sync::OnceLock::new();
    macro_rules! t {
        ($($name:literal => $f:expr,)*) => { vec![$(($name, $f as usize),)*] };
    }
    TABLE.get_or_init(|| t! {
        "cuInit" => cuInit as extern "C" fn(c_uint) -> CUresult,
        "cuDriverGetVersion" => cuDriverGetVersion as unsafe extern "C" fn(*mut c_int) -> CUresult,
        "cuDeviceGetCount" => cuDeviceGetCount as unsafe extern "C" fn(*mut c_int) -> CUresult,
        "cuDeviceGet" => cuDeviceGet as unsafe extern "C" fn(*mut CUdevice, c_int) -> CUresult,
        "cuDeviceGetName" => cuDeviceGetName as unsafe extern "C" fn(*mut c_char, c_int, CUdevice) -> CUresult,
        "cuDeviceGetAttribute" => cuDeviceGetAttribute as unsafe extern "C" fn(*mut c_int, c_int, CUdevice) -> CUresult,
        "cuDeviceTotalMem" => cuDeviceTotalMem_v2 as unsafe extern "C" fn(*mut usize, CUdevice) -> CUresult,
        "cuDeviceGetUuid" => cuDeviceGetUuid_v2 as unsafe extern "C" fn(*mut [u8; 16], CUdevice) -> CUresult,
        "cuDevicePrimaryCtxRetain" => cuDevicePrimaryCtxRetain as unsafe extern "C" fn(*mut Handle, CUdevice) -> CUresult,
        "cuDevicePrimaryCtxRelease" => cuDevicePrimaryCtxRelease_v2 as extern "C" fn(CUdevice) -> CUresult,
        "cuCtxGetCurrent" => cuCtxGetCurrent as unsafe extern "C" fn(*mut Handle) -> CUresult,
        "cuCtxSetCurrent" => cuCtxSetCurrent as extern "C" fn(Handle) -> CUresult,
        "cuCtxGetDevice" => cuCtxGetDevice as unsafe extern "C" fn(*mut CUdevice) -> CUresult,
        "cuCtxSynchronize" => cuCtxSynchronize as extern "C" fn() -> CUresult,
        "cuMemAlloc" => cuMemAlloc_v2 as unsafe extern "C" fn(*mut CUdeviceptr, usize) -> CUresult,
        "cuMemFree" => cuMemFree_v2 as extern "C" fn(CUdeviceptr) -> CUresult,
        "cuMemGetInfo" => cuMemGetInfo_v2 as unsafe extern "C" fn(*mut usize, *mut usize) -> CUresult,
        "cuMemcpyHtoD" => cuMemcpyHtoD_v2 as unsafe extern "C" fn(CUdeviceptr, *const c_void, usize) -> CUresult,
        "cuMemcpyDtoH" => cuMemcpyDtoH_v2 as unsafe extern "C" fn(*mut c_void, CUdeviceptr, usize) -> CUresult,
        "cuMemcpyDtoD" => cuMemcpyDtoD_v2 as extern "C" fn(CUdeviceptr, CUdeviceptr, usize) -> CUresult,
        "cuModuleLoadData" => cuModuleLoadData as unsafe extern "C" fn(*mut Handle, *const c_void) -> CUresult,
        "cuModuleUnload" => cuModuleUnload as extern "C" fn(Handle) -> CUresult,
        "cuModuleGetFunction" => cuModuleGetFunction as unsafe extern "C" fn(*mut Handle, Handle, *const c_char) -> CUresult,
        "cuLaunchKernel" => cuLaunchKernel as unsafe extern "C" fn(Handle, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, Handle, *mut *mut c_void, *mut *mut c_void) -> CUresult,
        "cuStreamCreate" => cuStreamCreate as unsafe extern "C" fn(*mut Handle, c_uint) -> CUresult,
        "cuStreamDestroy" => cuStreamDestroy_v2 as extern "C" fn(Handle) -> CUresult,
        "cuStreamSynchronize" => cuStreamSynchronize as extern "C" fn(Handle) -> CUresult,
        "cuEventCreate" => cuEventCreate as unsafe extern "C" fn(*mut Handle, c_uint) -> CUresult,
        "cuEventDestroy" => cuEventDestroy_v2 as extern "C" fn(Handle) -> CUresult,
        "cuEventRecord" => cuEventRecord as extern "C" fn(Handle, Handle) -> CUresult,
        "cuEventSynchronize" => cuEventSynchronize as extern "C" fn(Handle) -> CUresult,
        "cuEventElapsedTime" => cuEventElapsedTime_v2 as unsafe extern "C" fn(*mut f32, Handle, Handle) -> CUresult,
        "cuGetErrorString" => cuGetErrorString as unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult,
        "cuGetErrorName" => cuGetErrorName as unsafe extern "C" fn(CUresult, *mut *const c_char) -> CUresult,
        "cuGetExportTable" => cuGetExportTable as unsafe extern "C" fn(*mut *const c_void, *const c_void) -> CUresult,
        "cuGetProcAddress" => cuGetProcAddress_v2 as unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult,
    })
}

/// Looks `name` up in the table (with or without a `_vN` suffix).
pub fn resolve(name: &str) -> Option<usize> {
    let base = match name.rfind("_v") {
        Some(i) if name[i + 2..].chars().all(|c| c.is_ascii_digit()) && i + 2 < name.len() => {
            &name[..i]
        }
        _ => name,
    };
    proc_table()
        .iter()
        .find(|(n, _)| *n == name || *n == base)
        .map(|&(_, f)| f)
}

#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    _version: c_int,
    _flags: u64,
    status: *mut c_int,
) -> CUresult {
    guard(|| {
        if symbol.is_null() || pfn.is_null() {
            return Err(cu::INVALID_VALUE);
        }
        // SAFETY: a NUL-terminated name from the caller.
        let name = unsafe { CStr::from_ptr(symbol) }.to_string_lossy();
        let f = resolve(&name);
        // SAFETY: out-pointers from the caller (status is optional).
        unsafe {
            pfn.write(f.unwrap_or(0) as *mut c_void);
            if !status.is_null() {
                // CU_GET_PROC_ADDRESS_SUCCESS 0, _SYMBOL_NOT_FOUND 1.
                status.write(if f.is_some() { 0 } else { 1 });
            }
        }
        f.map(|_| ()).ok_or(cu::NOT_FOUND)
    })
}

/// The size of a module image: fatbin (header says), ELF cubin (section
/// table end), else NUL-terminated PTX text.
///
/// # Safety
/// `image` points at a whole image of one of these kinds.
pub(crate) unsafe fn image_bytes<'a>(image: *const c_void) -> CuResult<&'a [u8]> {
    if image.is_null() {
        return Err(cu::INVALID_VALUE);
    }
    let p = image as *const u8;
    // SAFETY: every image kind starts with at least 16 readable bytes
    // except a very short PTX text, which ends at its NUL within them.
    let head = unsafe { std::slice::from_raw_parts(p, 4) };
    let len = if head == [0x50, 0xed, 0x55, 0xba] {
        // Fatbin: u32 magic, u16 version, u16 header_size, u64 fat_size.
        // SAFETY: a fatbin header is 16 bytes.
        let h = unsafe { std::slice::from_raw_parts(p, 16) };
        let hs = u16::from_le_bytes([h[6], h[7]]) as usize;
        let fs = u64::from_le_bytes(h[8..16].try_into().map_err(|_| cu::INVALID_IMAGE)?) as usize;
        hs.checked_add(fs).ok_or(cu::INVALID_IMAGE)?
    } else if head == [0x7f, b'E', b'L', b'F'] {
        // SAFETY: an ELF image, whose own headers say where its parts are.
        unsafe { elf_size(p) }?
    } else {
        // SAFETY: PTX text is NUL-terminated.
        unsafe { CStr::from_ptr(p as *const c_char) }
            .to_bytes()
            .len()
    };
    if len > api::MAX_IMAGE_LEN {
        return Err(cu::INVALID_IMAGE);
    }
    // SAFETY: the image is `len` bytes long, as its own header says.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// The file size of an ELF64 image in memory: the end of its last header
/// table, section or segment.
///
/// # Safety
/// `p` points at a whole ELF64 image.
unsafe fn elf_size(p: *const u8) -> CuResult<usize> {
    let rd = |off: usize, n: usize| -> u64 {
        let mut v = [0u8; 8];
        // SAFETY: offsets inside the image's headers (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(p.add(off), v.as_mut_ptr(), n) };
        u64::from_le_bytes(v)
    };
    let max = api::MAX_IMAGE_LEN as u64;
    let (phoff, shoff) = (rd(0x20, 8), rd(0x28, 8));
    let (phentsize, phnum) = (rd(0x36, 2), rd(0x38, 2));
    let (shentsize, shnum) = (rd(0x3a, 2), rd(0x3c, 2));
    if phoff > max || shoff > max {
        return Err(cu::INVALID_IMAGE);
    }
    let mut end = 64u64
        .max(phoff + phnum * phentsize)
        .max(shoff + shnum * shentsize);
    for i in 0..shnum {
        let sh = (shoff + i * shentsize) as usize;
        // SHT_NOBITS (8) takes no room in the file.
        if rd(sh + 4, 4) != 8 {
            end = end.max(rd(sh + 0x18, 8).saturating_add(rd(sh + 0x20, 8)));
        }
    }
    for i in 0..phnum {
        let ph = (phoff + i * phentsize) as usize;
        end = end.max(rd(ph + 0x8, 8).saturating_add(rd(ph + 0x20, 8)));
    }
    if end > max {
        return Err(cu::INVALID_IMAGE);
    }
    Ok(end as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_address_resolves_versions() {
        assert_eq!(resolve("cuMemAlloc"), resolve("cuMemAlloc_v2"));
        assert!(resolve("cuMemAlloc").is_some());
        assert!(resolve("cuLaunchKernel").is_some());
        assert!(resolve("cuGraphCreate").is_none());
        assert!(resolve("cuMemAlloc_vX").is_none());
    }

    #[test]
    fn image_sizes() {
        let ptx = b".version 8.0\n.target sm_90\0";
        // SAFETY: a NUL-terminated text.
        assert_eq!(
            unsafe { image_bytes(ptx.as_ptr() as *const c_void) }
                .unwrap()
                .len(),
            ptx.len() - 1
        );
        let mut fat = vec![0x50, 0xed, 0x55, 0xba, 1, 0, 16, 0];
        fat.extend(24u64.to_le_bytes());
        fat.resize(40, 7);
        // SAFETY: a fatbin of 16 + 24 bytes.
        assert_eq!(
            unsafe { image_bytes(fat.as_ptr() as *const c_void) }
                .unwrap()
                .len(),
            40
        );
    }
}
