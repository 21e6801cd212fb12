//! The runtime API face (`libcudart.so.13`) for programs built with
//! `nvcc -cudart shared`: memory, copies, streams, events, device queries,
//! and the registration hooks nvcc's generated code calls
//! (`__cudaRegisterFatBinary`, `__cudaRegisterFunction`, the call
//! configuration stack, `__cudaGetKernel`/`__cudaLaunchKernel`). A module is
//! loaded on the host the first time one of its kernels or variables is used,
//! so a program that only asks how many devices there are sends one request.

// The exported functions are the CUDA API: their safety contract is
// NVIDIA's documentation of each call (valid out-pointers and buffers).
#![allow(clippy::missing_safety_doc)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::Mutex;

use vgpu::protocol::Opcode;

use crate::client;
use crate::client::CuResult;
use crate::cu;
use crate::driver::{self, h, put, Handle};

pub type CudaError = c_uint;

thread_local! {
    static LAST_ERROR: Cell<u32> = const { Cell::new(0) };
    static CALL_CONFIG: RefCell<Vec<(Dim3, Dim3, usize, Handle)>> = const { RefCell::new(Vec::new()) };
}

/// Runs a runtime call: panics become cudaErrorUnknown, errors are kept for
/// cudaGetLastError.
fn rt(f: impl FnOnce() -> CuResult<()>) -> CudaError {
    let r = crate::guard(f);
    if r != 0 {
        LAST_ERROR.with(|e| e.set(r));
    }
    r
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Dim3 {
    pub x: c_uint,
    pub y: c_uint,
    pub z: c_uint,
}

/// A fat binary nvcc registered, and its host module once loaded.
struct Fatbin {
    image: &'static [u8],
    module: Option<u64>,
}

/// A registered kernel or variable: its fat binary and device name.
struct Symbol {
    fatbin: usize,
    name: CString,
    /// Function handle (kernels) or device address (variables), once known.
    resolved: Option<u64>,
}

#[derive(Default)]
struct Registry {
    fatbins: Vec<Fatbin>,
    kernels: HashMap<usize, Symbol>,
    vars: HashMap<usize, Symbol>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Registry::default))
}

/// The host module of fat binary `i`, loaded on first use.
fn module_of(reg: &mut Registry, i: usize) -> CuResult<u64> {
    let fb = reg.fatbins.get_mut(i).ok_or(cu::INVALID_HANDLE)?;
    if let Some(m) = fb.module {
        return Ok(m);
    }
    let image = fb.image;
    let m = client::with(|c| c.module_load(image))?;
    fb.module = Some(m);
    Ok(m)
}

/// The host function of the kernel whose host stub is `func`.
fn kernel(func: *const c_void) -> CuResult<u64> {
    registry(|reg| {
        let (fatbin, name, resolved) = match reg.kernels.get(&(func as usize)) {
            Some(s) => (s.fatbin, s.name.clone(), s.resolved),
            None => return Err(cu::INVALID_VALUE),
        };
        if let Some(f) = resolved {
            return Ok(f);
        }
        let m = module_of(reg, fatbin)?;
        let f = client::with(|c| c.get_function(m, name.as_bytes()))?;
        if let Some(s) = reg.kernels.get_mut(&(func as usize)) {
            s.resolved = Some(f);
        }
        Ok(f)
    })
}

/// The device address of the variable whose host shadow is `var`.
fn variable(var: *const c_void) -> CuResult<u64> {
    registry(|reg| {
        let (fatbin, name, resolved) = match reg.vars.get(&(var as usize)) {
            Some(s) => (s.fatbin, s.name.clone(), s.resolved),
            None => return Err(cu::INVALID_VALUE),
        };
        if let Some(d) = resolved {
            return Ok(d);
        }
        let m = module_of(reg, fatbin)?;
        let mut p = m.to_le_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        let out = client::with(|c| c.call(Opcode::CuGetGlobal, &p, 16))?;
        let d = vgpu::protocol::read_obj::<vm_memory::endian::Le64>(&out, 0)
            .map(u64::from)
            .ok_or(cu::UNKNOWN)?;
        if let Some(s) = reg.vars.get_mut(&(var as usize)) {
            s.resolved = Some(d);
        }
        Ok(d)
    })
}

/// `__fatBinC_Wrapper_t`: what nvcc passes to __cudaRegisterFatBinary.
#[repr(C)]
struct FatbinWrapper {
    magic: c_int,
    version: c_int,
    data: *const c_void,
    filename_or_fatbins: *const c_void,
}

const FATBIN_WRAPPER_MAGIC: c_int = 0x466243b1;

#[no_mangle]
pub unsafe extern "C" fn __cudaRegisterFatBinary(fat: *const c_void) -> *mut *mut c_void {
    let idx = std::panic::catch_unwind(|| {
        if fat.is_null() {
            return None;
        }
        // SAFETY: nvcc passes a __fatBinC_Wrapper_t.
        let w = unsafe { &*(fat as *const FatbinWrapper) };
        if w.magic != FATBIN_WRAPPER_MAGIC {
            return None;
        }
        // SAFETY: the wrapper's data is the program's embedded fat binary,
        // which lives as long as the program.
        let image = unsafe { driver::image_bytes(w.data) }.ok()?;
        Some(registry(|reg| {
            reg.fatbins.push(Fatbin {
                image,
                module: None,
            });
            reg.fatbins.len() - 1
        }))
    })
    .ok()
    .flatten()
    .unwrap_or(usize::MAX);
    // The handle nvcc keeps: a pointer to the index (never freed: programs
    // unregister at exit).
    Box::into_raw(Box::new(idx as *mut c_void))
}

#[no_mangle]
pub extern "C" fn __cudaRegisterFatBinaryEnd(_h: *mut *mut c_void) {}

#[no_mangle]
pub extern "C" fn __cudaUnregisterFatBinary(_h: *mut *mut c_void) {
    // At exit: queued work still goes, so that its errors are not lost
    // silently (they are logged).
    if let Err(e) = crate::guard(|| client::with(|c| c.flush())).into_result() {
        log::debug!("vgpu cuda: flush at exit: {e}");
    }
}

trait IntoResult {
    fn into_result(self) -> Result<(), u32>;
}
impl IntoResult for u32 {
    fn into_result(self) -> Result<(), u32> {
        if self == 0 {
            Ok(())
        } else {
            Err(self)
        }
    }
}

/// The fat binary index behind a registration handle.
///
/// # Safety
/// `h` is null or a handle from __cudaRegisterFatBinary.
unsafe fn fatbin_index(h: *mut *mut c_void) -> Option<usize> {
    if h.is_null() {
        return None;
    }
    // SAFETY: per the caller, a Box we made.
    let i = unsafe { *h } as usize;
    (i != usize::MAX).then_some(i)
}

#[no_mangle]
pub unsafe extern "C" fn __cudaRegisterFunction(
    handle: *mut *mut c_void,
    host_fun: *const c_char,
    device_fun: *mut c_char,
    _device_name: *const c_char,
    _thread_limit: c_int,
    _tid: *mut c_void,
    _bid: *mut c_void,
    _bdim: *mut c_void,
    _gdim: *mut c_void,
    _wsize: *mut c_int,
) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: nvcc's handle and NUL-terminated mangled name.
        let (Some(i), false) = (unsafe { fatbin_index(handle) }, device_fun.is_null()) else {
            return;
        };
        // SAFETY: as above.
        let name = unsafe { CStr::from_ptr(device_fun) }.to_owned();
        registry(|reg| {
            reg.kernels.insert(
                host_fun as usize,
                Symbol {
                    fatbin: i,
                    name,
                    resolved: None,
                },
            )
        });
    });
}

#[no_mangle]
pub unsafe extern "C" fn __cudaRegisterVar(
    handle: *mut *mut c_void,
    host_var: *mut c_char,
    _device_address: *mut c_char,
    device_name: *const c_char,
    _ext: c_int,
    _size: usize,
    _constant: c_int,
    _global: c_int,
) {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: nvcc's handle and NUL-terminated name.
        let (Some(i), false) = (unsafe { fatbin_index(handle) }, device_name.is_null()) else {
            return;
        };
        // SAFETY: as above.
        let name = unsafe { CStr::from_ptr(device_name) }.to_owned();
        registry(|reg| {
            reg.vars.insert(
                host_var as usize,
                Symbol {
                    fatbin: i,
                    name,
                    resolved: None,
                },
            )
        });
    });
}

#[no_mangle]
pub extern "C" fn __cudaRegisterManagedVar(
    _h: *mut *mut c_void,
    _hv: *mut *mut c_void,
    _da: *mut c_char,
    _dn: *const c_char,
    _ext: c_int,
    _size: usize,
    _c: c_int,
    _g: c_int,
) {
}

#[no_mangle]
pub extern "C" fn __cudaInitModule(_h: *mut *mut c_void) -> c_char {
    1
}

#[no_mangle]
pub extern "C" fn __cudaPushCallConfiguration(
    grid: Dim3,
    block: Dim3,
    smem: usize,
    stream: Handle,
) -> c_uint {
    CALL_CONFIG.with(|c| c.borrow_mut().push((grid, block, smem, stream)));
    0
}

#[no_mangle]
pub unsafe extern "C" fn __cudaPopCallConfiguration(
    grid: *mut Dim3,
    block: *mut Dim3,
    smem: *mut usize,
    stream: *mut Handle,
) -> CudaError {
    rt(|| {
        let (g, b, s, st) = CALL_CONFIG
            .with(|c| c.borrow_mut().pop())
            .ok_or(cu::INVALID_VALUE)?;
        // SAFETY: out-pointers from nvcc's launch stub.
        unsafe {
            put(grid, g)?;
            put(block, b)?;
            put(smem, s)?;
            put(stream, st)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudaLaunchKernel(
    func: *const c_void,
    grid: Dim3,
    block: Dim3,
    args: *mut *mut c_void,
    smem: usize,
    stream: Handle,
) -> CudaError {
    rt(|| {
        let f = kernel(func)?;
        let smem = u32::try_from(smem).map_err(|_| cu::INVALID_VALUE)?;
        client::with(|c| {
            // SAFETY: `args` holds one pointer per kernel parameter (the
            // runtime's contract).
            unsafe {
                c.launch(
                    f,
                    [grid.x, grid.y, grid.z],
                    [block.x, block.y, block.z],
                    smem,
                    h(stream),
                    args as *const *const u8,
                )
            }
        })
    })
}

/// nvcc's CUDA 13 launch path: the kernel "handle" is the host stub itself.
#[no_mangle]
pub unsafe extern "C" fn __cudaGetKernel(k: *mut *const c_void, func: *const c_void) -> CudaError {
    // SAFETY: out-pointer from nvcc's stub.
    rt(|| unsafe { put(k, func) })
}

#[no_mangle]
pub unsafe extern "C" fn __cudaLaunchKernel(
    k: *const c_void,
    grid: Dim3,
    block: Dim3,
    args: *mut *mut c_void,
    smem: usize,
    stream: Handle,
) -> CudaError {
    // SAFETY: same contract as cudaLaunchKernel.
    unsafe { cudaLaunchKernel(k, grid, block, args, smem, stream) }
}

#[no_mangle]
pub unsafe extern "C" fn __cudaLaunchKernel_ptsz(
    k: *const c_void,
    grid: Dim3,
    block: Dim3,
    args: *mut *mut c_void,
    smem: usize,
    stream: Handle,
) -> CudaError {
    // SAFETY: same contract as cudaLaunchKernel.
    unsafe { cudaLaunchKernel(k, grid, block, args, smem, stream) }
}

#[no_mangle]
pub unsafe extern "C" fn cudaGetDeviceCount(n: *mut c_int) -> CudaError {
    rt(|| {
        let r = driver::ensure_init();
        // SAFETY: out-pointer from the caller.
        unsafe { put(n, if r.is_ok() { 1 } else { 0 }) }?;
        r
    })
}

#[no_mangle]
pub extern "C" fn cudaSetDevice(d: c_int) -> CudaError {
    rt(|| {
        driver::ensure_init()?;
        if d == 0 {
            Ok(())
        } else {
            Err(cu::INVALID_DEVICE)
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudaGetDevice(d: *mut c_int) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(d, 0) })
}

#[no_mangle]
pub extern "C" fn cudaDeviceSynchronize() -> CudaError {
    rt(driver::sync)
}

#[no_mangle]
pub extern "C" fn cudaDeviceReset() -> CudaError {
    rt(driver::sync)
}

#[no_mangle]
pub extern "C" fn cudaGetLastError() -> CudaError {
    LAST_ERROR.with(|e| e.replace(0))
}

#[no_mangle]
pub extern "C" fn cudaPeekAtLastError() -> CudaError {
    LAST_ERROR.with(|e| e.get())
}

#[no_mangle]
pub extern "C" fn cudaGetErrorString(e: CudaError) -> *const c_char {
    crate::error_text(e).1.as_ptr() as *const c_char
}

#[no_mangle]
pub extern "C" fn cudaGetErrorName(e: CudaError) -> *const c_char {
    crate::runtime_error_name(e).as_ptr() as *const c_char
}

#[no_mangle]
pub unsafe extern "C" fn cudaDriverGetVersion(v: *mut c_int) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(v, 13000) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaRuntimeGetVersion(v: *mut c_int) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(v, 13000) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaMalloc(p: *mut *mut c_void, size: usize) -> CudaError {
    rt(|| {
        if size == 0 {
            // CUDA gives a null pointer for 0 bytes.
            // SAFETY: out-pointer from the caller.
            return unsafe { put(p, std::ptr::null_mut()) };
        }
        let d = client::with(|c| c.mem_alloc(size as u64))?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(p, d as usize as *mut c_void) }
    })
}

#[no_mangle]
pub extern "C" fn cudaFree(p: *mut c_void) -> CudaError {
    rt(|| {
        if p.is_null() {
            return Ok(());
        }
        client::with(|c| c.mem_free(h(p)))
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudaMallocHost(p: *mut *mut c_void, size: usize) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(p, driver::host_alloc(size)?) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaHostAlloc(p: *mut *mut c_void, size: usize, _f: c_uint) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(p, driver::host_alloc(size)?) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaFreeHost(p: *mut c_void) -> CudaError {
    // SAFETY: memory from host_alloc, or null.
    unsafe { libc::free(p) };
    0
}

#[no_mangle]
pub unsafe extern "C" fn cudaMemGetInfo(free: *mut usize, total: *mut usize) -> CudaError {
    // SAFETY: same out-pointer contract.
    let r = unsafe { driver::cuMemGetInfo_v2(free, total) };
    rt(|| if r == 0 { Ok(()) } else { Err(r) })
}

const HOST_TO_HOST: c_int = 0;
const HOST_TO_DEVICE: c_int = 1;
const DEVICE_TO_HOST: c_int = 2;
const DEVICE_TO_DEVICE: c_int = 3;
const DEFAULT: c_int = 4;

/// # Safety
/// Host pointers valid for `n` bytes (until the next sync when async).
unsafe fn memcpy(
    dst: *mut c_void,
    src: *const c_void,
    n: usize,
    kind: c_int,
    stream: u64,
    sync: bool,
) -> CuResult<()> {
    let kind = if kind == DEFAULT {
        // Unified addressing: the program's own allocations are the device
        // side; anything else is host memory.
        let (d, s) = client::with(|c| Ok((c.is_device(h(dst)), c.is_device(h(src as Handle)))))?;
        match (s, d) {
            (false, false) => HOST_TO_HOST,
            (false, true) => HOST_TO_DEVICE,
            (true, false) => DEVICE_TO_HOST,
            (true, true) => DEVICE_TO_DEVICE,
        }
    } else {
        kind
    };
    match kind {
        HOST_TO_HOST => {
            driver::sync()?;
            // SAFETY: both host buffers hold n bytes (caller).
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, n) };
            Ok(())
        }
        HOST_TO_DEVICE => {
            // SAFETY: per the caller.
            unsafe { driver::htod(h(dst), src, n, stream) }?;
            if sync {
                driver::sync()?;
            }
            Ok(())
        }
        // SAFETY: per the caller.
        DEVICE_TO_HOST => unsafe { driver::dtoh(dst, h(src as Handle), n, stream, sync) },
        DEVICE_TO_DEVICE => driver::dtod(h(dst), h(src as Handle), n, stream, sync),
        _ => Err(cu::INVALID_VALUE),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cudaMemcpy(
    dst: *mut c_void,
    src: *const c_void,
    n: usize,
    kind: c_int,
) -> CudaError {
    // SAFETY: the caller's buffers.
    rt(|| unsafe { memcpy(dst, src, n, kind, 0, true) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaMemcpyAsync(
    dst: *mut c_void,
    src: *const c_void,
    n: usize,
    kind: c_int,
    stream: Handle,
) -> CudaError {
    // SAFETY: the caller's buffers, valid until the stream is synchronised.
    rt(|| unsafe { memcpy(dst, src, n, kind, h(stream), false) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaMemcpyToSymbol(
    symbol: *const c_void,
    src: *const c_void,
    n: usize,
    offset: usize,
    kind: c_int,
) -> CudaError {
    rt(|| {
        let d = variable(symbol)? + offset as u64;
        match kind {
            // SAFETY: the caller's buffer.
            HOST_TO_DEVICE | 4 => {
                unsafe { driver::htod(d, src, n, 0) }.and_then(|_| driver::sync())
            }
            DEVICE_TO_DEVICE => driver::dtod(d, h(src as Handle), n, 0, true),
            _ => Err(cu::INVALID_VALUE),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudaMemcpyFromSymbol(
    dst: *mut c_void,
    symbol: *const c_void,
    n: usize,
    offset: usize,
    kind: c_int,
) -> CudaError {
    rt(|| {
        let s = variable(symbol)? + offset as u64;
        match kind {
            // SAFETY: the caller's buffer.
            DEVICE_TO_HOST | 4 => unsafe { driver::dtoh(dst, s, n, 0, true) },
            DEVICE_TO_DEVICE => driver::dtod(h(dst), s, n, 0, true),
            _ => Err(cu::INVALID_VALUE),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudaGetSymbolAddress(
    p: *mut *mut c_void,
    symbol: *const c_void,
) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(p, variable(symbol)? as usize as *mut c_void) })
}

#[no_mangle]
pub extern "C" fn cudaMemset(p: *mut c_void, v: c_int, n: usize) -> CudaError {
    rt(|| driver::memset(h(p), v as u8 as u32, n, 1, 0, true))
}

#[no_mangle]
pub extern "C" fn cudaMemsetAsync(p: *mut c_void, v: c_int, n: usize, s: Handle) -> CudaError {
    rt(|| driver::memset(h(p), v as u8 as u32, n, 1, h(s), false))
}

#[no_mangle]
pub unsafe extern "C" fn cudaStreamCreate(s: *mut Handle) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(s, driver::stream_create(0, 0)? as usize as Handle) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaStreamCreateWithFlags(s: *mut Handle, flags: c_uint) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(s, driver::stream_create(flags, 0)? as usize as Handle) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaStreamCreateWithPriority(
    s: *mut Handle,
    flags: c_uint,
    prio: c_int,
) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(s, driver::stream_create(flags, prio)? as usize as Handle) })
}

#[no_mangle]
pub extern "C" fn cudaStreamDestroy(s: Handle) -> CudaError {
    rt(|| driver::destroy(Opcode::CuStreamDestroy, h(s)))
}

#[no_mangle]
pub extern "C" fn cudaStreamSynchronize(_s: Handle) -> CudaError {
    rt(driver::sync)
}

#[no_mangle]
pub extern "C" fn cudaStreamQuery(_s: Handle) -> CudaError {
    rt(driver::sync)
}

#[no_mangle]
pub extern "C" fn cudaStreamWaitEvent(s: Handle, e: Handle, _f: c_uint) -> CudaError {
    rt(|| {
        client::with(|c| {
            c.enqueue(
                h(s),
                vgpu::executor::cuda_api::Record::StreamWaitEvent { event: h(e) },
                0,
            )
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudaEventCreate(e: *mut Handle) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(e, driver::event_create(0)? as usize as Handle) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaEventCreateWithFlags(e: *mut Handle, flags: c_uint) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(e, driver::event_create(flags)? as usize as Handle) })
}

#[no_mangle]
pub extern "C" fn cudaEventDestroy(e: Handle) -> CudaError {
    rt(|| driver::destroy(Opcode::CuEventDestroy, h(e)))
}

#[no_mangle]
pub extern "C" fn cudaEventRecord(e: Handle, s: Handle) -> CudaError {
    rt(|| {
        client::with(|c| {
            c.enqueue(
                h(s),
                vgpu::executor::cuda_api::Record::EventRecord { event: h(e) },
                0,
            )
        })
    })
}

#[no_mangle]
pub extern "C" fn cudaEventSynchronize(_e: Handle) -> CudaError {
    rt(driver::sync)
}

#[no_mangle]
pub extern "C" fn cudaEventQuery(_e: Handle) -> CudaError {
    rt(driver::sync)
}

#[no_mangle]
pub unsafe extern "C" fn cudaEventElapsedTime(ms: *mut f32, a: Handle, b: Handle) -> CudaError {
    // SAFETY: out-pointer from the caller.
    rt(|| unsafe { put(ms, driver::elapsed(h(a), h(b))?) })
}

#[no_mangle]
pub unsafe extern "C" fn cudaDeviceGetAttribute(v: *mut c_int, attr: c_int, d: c_int) -> CudaError {
    // SAFETY: same contract (cudaDeviceAttr numbers equal CUdevice_attribute's).
    let r = unsafe { driver::cuDeviceGetAttribute(v, attr, d) };
    rt(|| if r == 0 { Ok(()) } else { Err(r) })
}

/// `struct cudaDeviceProp` of CUDA 13 (1008 bytes), filled field by field
/// from the device attributes: (offset, size, CUdevice_attribute), offsets
/// from the CUDA 13 header (`tests/cuda-apps/devprops.cu` prints the values
/// natively and through this library).
pub const DEVICE_PROP_SIZE: usize = 1008;
const PROP_FIELDS: &[(usize, usize, i32)] = &[
    (296, 8, 8),   // sharedMemPerBlock
    (304, 4, 12),  // regsPerBlock
    (308, 4, 10),  // warpSize
    (312, 8, 11),  // memPitch
    (320, 4, 1),   // maxThreadsPerBlock
    (324, 4, 2),   // maxThreadsDim[0]
    (328, 4, 3),   // maxThreadsDim[1]
    (332, 4, 4),   // maxThreadsDim[2]
    (336, 4, 5),   // maxGridSize[0]
    (340, 4, 6),   // maxGridSize[1]
    (344, 4, 7),   // maxGridSize[2]
    (352, 8, 9),   // totalConstMem
    (360, 4, 75),  // major
    (364, 4, 76),  // minor
    (368, 8, 14),  // textureAlignment
    (376, 8, 51),  // texturePitchAlignment
    (384, 4, 16),  // multiProcessorCount
    (388, 4, 18),  // integrated
    (392, 4, 19),  // canMapHostMemory
    (560, 4, 31),  // concurrentKernels
    (564, 4, 32),  // ECCEnabled
    (568, 4, 33),  // pciBusID
    (572, 4, 34),  // pciDeviceID
    (576, 4, 50),  // pciDomainID
    (584, 4, 40),  // asyncEngineCount
    (588, 4, 41),  // unifiedAddressing
    (592, 4, 37),  // memoryBusWidth
    (596, 4, 38),  // l2CacheSize
    (600, 4, 108), // persistingL2CacheMaxSize
    (604, 4, 39),  // maxThreadsPerMultiProcessor
    (608, 4, 78),  // streamPrioritiesSupported
    (612, 4, 79),  // globalL1CacheSupported
    (616, 4, 80),  // localL1CacheSupported
    (624, 8, 81),  // sharedMemPerMultiprocessor
    (632, 4, 82),  // regsPerMultiprocessor
    (636, 4, 83),  // managedMemory
    (640, 4, 84),  // isMultiGpuBoard
    (644, 4, 85),  // multiGpuBoardGroupID
    (656, 4, 89),  // concurrentManagedAccess
    (660, 4, 90),  // computePreemptionSupported
    (668, 4, 95),  // cooperativeLaunch
    (672, 8, 97),  // sharedMemPerBlockOptin
    (688, 4, 106), // maxBlocksPerMultiProcessor
    (692, 4, 109), // accessPolicyMaxWindowSize
    (696, 8, 111), // reservedSharedMemPerBlock
    (720, 4, 115), // memoryPoolsSupported
    (748, 4, 120), // clusterLaunch
];

#[no_mangle]
pub unsafe extern "C" fn cudaGetDeviceProperties(prop: *mut u8, d: c_int) -> CudaError {
    rt(|| {
        if d != 0 {
            return Err(cu::INVALID_DEVICE);
        }
        if prop.is_null() {
            return Err(cu::INVALID_VALUE);
        }
        let dev = client::with(|c| Ok(c.device.clone()))?;
        let mut b = vec![0u8; DEVICE_PROP_SIZE];
        b[..256].copy_from_slice(&dev.name);
        b[256..272].copy_from_slice(&dev.uuid);
        b[288..296].copy_from_slice(&dev.total_mem.to_le_bytes());
        for &(off, size, attr) in PROP_FIELDS {
            let v = dev.attr(attr);
            if size == 8 {
                b[off..off + 8].copy_from_slice(&(v as u32 as u64).to_le_bytes());
            } else {
                b[off..off + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        // SAFETY: the caller's struct cudaDeviceProp is DEVICE_PROP_SIZE bytes.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), prop, DEVICE_PROP_SIZE) };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cudaGetDeviceProperties_v2(prop: *mut u8, d: c_int) -> CudaError {
    // SAFETY: same contract.
    unsafe { cudaGetDeviceProperties(prop, d) }
}

#[no_mangle]
pub unsafe extern "C" fn cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    n: *mut c_int,
    func: *const c_void,
    block: c_int,
    smem: usize,
) -> CudaError {
    rt(|| {
        let f = kernel(func)?;
        // SAFETY: same out-pointer contract.
        let r = unsafe {
            driver::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                n,
                f as usize as Handle,
                block,
                smem,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(r)
        }
    })
}

#[no_mangle]
pub extern "C" fn cudaFuncSetAttribute(_f: *const c_void, _a: c_int, _v: c_int) -> CudaError {
    rt(|| Err(cu::NOT_SUPPORTED))
}

#[no_mangle]
pub extern "C" fn cudaFuncSetCacheConfig(_f: *const c_void, _c: c_int) -> CudaError {
    0
}

#[no_mangle]
pub extern "C" fn cudaDeviceSetCacheConfig(_c: c_int) -> CudaError {
    0
}

#[no_mangle]
pub unsafe extern "C" fn cudaGetDriverEntryPoint(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    _flags: u64,
    status: *mut c_int,
) -> CudaError {
    // SAFETY: same contract as cuGetProcAddress.
    let r = unsafe { driver::cuGetProcAddress_v2(symbol, pfn, 13000, 0, status) };
    rt(|| if r == 0 { Ok(()) } else { Err(r) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_prop_fields_fit() {
        for &(off, size, attr) in PROP_FIELDS {
            assert!(off >= 296 && off + size <= 784, "{off}");
            assert!((1..200).contains(&attr));
        }
    }

    #[test]
    fn call_configuration_stack() {
        let g = Dim3 { x: 4, y: 2, z: 1 };
        let b = Dim3 { x: 32, y: 1, z: 1 };
        assert_eq!(
            __cudaPushCallConfiguration(g, b, 64, std::ptr::null_mut()),
            0
        );
        let (mut g2, mut b2, mut s, mut st) =
            (Dim3::default(), Dim3::default(), 0usize, 1 as Handle);
        // SAFETY: valid out-pointers.
        assert_eq!(
            unsafe { __cudaPopCallConfiguration(&mut g2, &mut b2, &mut s, &mut st) },
            0
        );
        assert_eq!((g2.x, g2.y, b2.x, s), (4, 2, 32, 64));
        assert!(st.is_null());
        // SAFETY: as above; the stack is empty now.
        assert_ne!(
            unsafe { __cudaPopCallConfiguration(&mut g2, &mut b2, &mut s, &mut st) },
            0
        );
        assert_ne!(cudaGetLastError(), 0);
        assert_eq!(cudaGetLastError(), 0, "read and reset");
    }

    #[test]
    fn unregistered_kernel_is_an_error_not_a_crash() {
        let mut x = 0u8;
        // SAFETY: a pointer that was never registered; no args are read.
        let r = unsafe {
            cudaLaunchKernel(
                &mut x as *mut u8 as *const c_void,
                Dim3 { x: 1, y: 1, z: 1 },
                Dim3 { x: 1, y: 1, z: 1 },
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(r, cu::INVALID_VALUE);
        assert_eq!(
            cudaFuncSetAttribute(std::ptr::null(), 0, 0),
            cu::NOT_SUPPORTED
        );
    }
}
