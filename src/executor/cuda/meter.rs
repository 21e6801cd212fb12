//! What a module load costs in device memory, and the context limits of a
//! VM's context.
//!
//! A module's `.global` (`__device__`) arrays are allocated by the driver
//! inside `cuModuleLoadData`, outside any allocation call the quota sees:
//! one VM loaded a 64 GiB array on the H200. So a load is measured: the
//! device memory this process holds is read before and after it, and the
//! difference is charged to the VM's quota (refused and unloaded when it does
//! not fit).
//!
//! The reading is NVML's per-process count (`usedGpuMemory` of this pid on
//! this GPU), not `cuMemGetInfo`: free memory is device-wide, so another
//! process allocating or freeing during the load would move it (a VM could
//! have a second VM free 64 GiB while it loads 64 GiB, and be charged
//! nothing). NVML counts this process alone, and this process is a worker
//! that serves one VM on one thread, so nothing else of ours allocates
//! between the two readings. Where NVML is missing (no libnvidia-ml, or it
//! reports no per-process figure, as in some containers) the meter falls
//! back to `cuMemGetInfo`, logs that once, and documents the weakness
//! (docs/gpu.md).
//!
//! NVML is opened before the worker's seccomp filter is installed; a reading
//! is then one ioctl on descriptors it already holds.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use cudarc::driver::sys::{self, CUresult};

/// `CU_LIMIT_STACK_SIZE` of every VM context, bytes per thread (the
/// driver's default). The driver still grows it by itself at the launch of
/// a kernel that needs more local memory, which `cuCtxSetLimit` cannot
/// forbid: [`charge_stack`] charges that growth before such a kernel can run.
pub const CTX_STACK_BYTES: usize = 1024;

/// Why [`charge_stack`] refused a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackRefused {
    /// The reservation it would grow to does not fit the VM's quota.
    OverQuota,
    Driver(CUresult),
}

/// Charges the stack a kernel can make the driver reserve. A kernel with
/// `L` bytes of local memory per thread makes the driver grow the
/// context's stack reservation, at its launch, to `L` for every thread the
/// device can hold resident (SMs x threads per SM; 270,336 on the H200, so
/// 64 KiB a thread is 17.7 GB), and the reservation never shrinks. So the
/// first time the VM gets a kernel with more local memory than any before
/// (and more than the context's own [`CTX_STACK_BYTES`]), the difference
/// times the resident threads is charged to its quota until the context
/// goes; one that does not fit is refused before it can run. Call with the
/// VM's context current.
pub fn charge_stack(
    f: sys::CUfunction,
    quota: &mut crate::executor::remoting::Quota,
) -> Result<(), StackRefused> {
    let mut local: c_int = 0;
    // SAFETY: a live function of the current context; plain out-parameter.
    let r = unsafe {
        sys::cuFuncGetAttribute(
            &mut local,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
            f,
        )
    };
    if r != CUresult::CUDA_SUCCESS {
        return Err(StackRefused::Driver(r));
    }
    let local = u64::try_from(local).unwrap_or(0);
    let charged = quota.stack_per_thread.max(CTX_STACK_BYTES as u64);
    if local <= charged {
        return Ok(());
    }
    let threads = resident_threads().map_err(StackRefused::Driver)?;
    let want = (local - charged)
        .checked_mul(threads)
        .ok_or(StackRefused::OverQuota)?;
    quota.charge(want).map_err(|_| StackRefused::OverQuota)?;
    quota.stack_per_thread = local;
    Ok(())
}

/// Threads the current context's device can hold resident at once.
fn resident_threads() -> Result<u64, CUresult> {
    use sys::CUdevice_attribute as A;
    let mut dev: sys::CUdevice = 0;
    // SAFETY: plain out-parameter; a context is current.
    let r = unsafe { sys::cuCtxGetDevice(&mut dev) };
    if r != CUresult::CUDA_SUCCESS {
        return Err(r);
    }
    let get = |a: A| -> Result<u64, CUresult> {
        let mut v: c_int = 0;
        // SAFETY: plain out-parameter of an existing device.
        match unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) } {
            CUresult::CUDA_SUCCESS => Ok(u64::try_from(v).unwrap_or(0)),
            e => Err(e),
        }
    };
    let sms = get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let per_sm = get(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR)?;
    Ok(sms.saturating_mul(per_sm))
}
/// `CU_LIMIT_MALLOC_HEAP_SIZE` of every VM context (the driver's default
/// 8 MiB): device-side `malloc` draws from it.
pub const CTX_MALLOC_HEAP_BYTES: usize = 8 << 20;
/// `CU_LIMIT_PRINTF_FIFO_SIZE` of every VM context (the driver's default
/// 1 MiB).
pub const CTX_PRINTF_FIFO_BYTES: usize = 1 << 20;

/// Sets the bounds above on the current context. The guest has no opcode
/// that sets a limit, so these hold for the context's life.
pub fn bound_context_limits() -> Result<(), CUresult> {
    use sys::CUlimit as L;
    for (limit, value) in [
        (L::CU_LIMIT_STACK_SIZE, CTX_STACK_BYTES),
        (L::CU_LIMIT_MALLOC_HEAP_SIZE, CTX_MALLOC_HEAP_BYTES),
        (L::CU_LIMIT_PRINTF_FIFO_SIZE, CTX_PRINTF_FIFO_BYTES),
    ] {
        // SAFETY: a plain setter on the current context.
        match unsafe { sys::cuCtxSetLimit(limit, value) } {
            CUresult::CUDA_SUCCESS => {}
            e => return Err(e),
        }
    }
    Ok(())
}

/// `nvmlProcessInfo_t` (v2/v3 layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

type InitFn = unsafe extern "C" fn() -> c_int;
type HandleByBusIdFn = unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> c_int;
type ProcessesFn = unsafe extern "C" fn(*mut c_void, *mut c_uint, *mut ProcessInfo) -> c_int;

/// `NVML_VALUE_NOT_AVAILABLE` in `usedGpuMemory`.
const NOT_AVAILABLE: u64 = u64::MAX;
/// Most processes one reading lists (NVML_ERROR_INSUFFICIENT_SIZE past it,
/// and the reading falls back for that load).
const MAX_PROCESSES: usize = 512;

struct Nvml {
    /// `nvmlDevice_t` of this GPU, kept as an address (`Send`).
    device: usize,
    processes: ProcessesFn,
}

/// Reads this process's device memory on one GPU.
pub struct Meter {
    nvml: Option<Nvml>,
    pid: u32,
}

impl Meter {
    /// NVML for CUDA device `ordinal`, or the fallback. Call before the
    /// seccomp filter is installed.
    pub fn open(ordinal: u32) -> Meter {
        let pid = std::process::id();
        let nvml = match open_nvml(ordinal) {
            Ok(n) => Some(n),
            Err(why) => {
                log::warn!(
                    "gpu{ordinal}: NVML unavailable ({why}): module loads are measured with \
                     cuMemGetInfo, which other processes' allocations can skew"
                );
                None
            }
        };
        let meter = Meter { nvml, pid };
        if meter.nvml.is_some() && meter.process_used().is_none() {
            log::warn!(
                "gpu{ordinal}: NVML reports no per-process memory here: module loads are \
                 measured with cuMemGetInfo"
            );
            return Meter { nvml: None, pid };
        }
        if meter.nvml.is_some() {
            log::info!("gpu{ordinal}: module loads are measured per process (NVML)");
        }
        meter
    }

    /// Whether readings come from NVML (per process) rather than the
    /// device-wide fallback.
    pub fn per_process(&self) -> bool {
        self.nvml.is_some()
    }

    /// Device memory this process holds on the GPU (NVML), bytes.
    fn process_used(&self) -> Option<u64> {
        let n = self.nvml.as_ref()?;
        let mut infos = vec![ProcessInfo::default(); MAX_PROCESSES];
        let mut count = MAX_PROCESSES as c_uint;
        // SAFETY: `infos` has room for `count` entries; the device handle
        // came from NVML and stays valid while NVML is initialised (never
        // shut down in this process).
        let r = unsafe { (n.processes)(n.device as *mut c_void, &mut count, infos.as_mut_ptr()) };
        if r != 0 {
            return None;
        }
        let mut sum = 0u64;
        let mut found = false;
        for i in infos.iter().take((count as usize).min(MAX_PROCESSES)) {
            if i.pid == self.pid {
                if i.used_gpu_memory == NOT_AVAILABLE {
                    return None;
                }
                found = true;
                sum = sum.saturating_add(i.used_gpu_memory);
            }
        }
        // A process with a context is listed; not listed means no context
        // yet, so nothing held.
        Some(if found { sum } else { 0 })
    }

    /// A reading to compare with later: this process's use (NVML), or the
    /// device's free memory (fallback). Needs a current context.
    pub fn reading(&self) -> Reading {
        if let Some(used) = self.process_used() {
            return Reading::Used(used);
        }
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: plain out-parameters; a context is current.
        match unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) } {
            CUresult::CUDA_SUCCESS => Reading::Free(free as u64),
            _ => Reading::Unknown,
        }
    }

    /// Device memory taken since `before`, bytes.
    pub fn since(&self, before: Reading) -> u64 {
        match (before, self.reading()) {
            (Reading::Used(a), Reading::Used(b)) => b.saturating_sub(a),
            (Reading::Free(a), Reading::Free(b)) => a.saturating_sub(b),
            _ => 0,
        }
    }
}

/// One reading of a [`Meter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// This process's device memory (NVML).
    Used(u64),
    /// The device's free memory (fallback).
    Free(u64),
    Unknown,
}

fn open_nvml(ordinal: u32) -> Result<Nvml, String> {
    // SAFETY: dlopen of the NVIDIA management library; the handle is never
    // closed, so the symbols below stay valid for the process's life.
    let lib = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW) };
    if lib.is_null() {
        return Err("cannot load libnvidia-ml.so.1".into());
    }
    let sym = |name: &CStr| {
        // SAFETY: a symbol lookup in the library opened above.
        let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
        if p.is_null() {
            Err(format!("no {}", name.to_string_lossy()))
        } else {
            Ok(p)
        }
    };
    // SAFETY: these symbols have these C signatures (nvml.h).
    let (init, by_bus, processes) = unsafe {
        (
            std::mem::transmute::<*mut c_void, InitFn>(sym(c"nvmlInit_v2")?),
            std::mem::transmute::<*mut c_void, HandleByBusIdFn>(sym(
                c"nvmlDeviceGetHandleByPciBusId_v2",
            )?),
            std::mem::transmute::<*mut c_void, ProcessesFn>(sym(
                c"nvmlDeviceGetComputeRunningProcesses_v3",
            )?),
        )
    };
    // SAFETY: no arguments; may be called more than once.
    let r = unsafe { init() };
    if r != 0 {
        return Err(format!("nvmlInit_v2: error {r}"));
    }
    // NVML numbers devices its own way: find ours by PCI bus id.
    let mut dev: sys::CUdevice = 0;
    // SAFETY: plain out-parameter.
    if unsafe { sys::cuDeviceGet(&mut dev, ordinal as c_int) } != CUresult::CUDA_SUCCESS {
        return Err(format!("no CUDA device {ordinal}"));
    }
    let mut bus = [0 as c_char; 32];
    // SAFETY: the buffer holds `len` bytes; the driver NUL-terminates.
    if unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, dev) }
        != CUresult::CUDA_SUCCESS
    {
        return Err("cuDeviceGetPCIBusId failed".into());
    }
    let mut handle: *mut c_void = std::ptr::null_mut();
    // SAFETY: a NUL-terminated bus id and an out-parameter.
    let r = unsafe { by_bus(bus.as_ptr(), &mut handle) };
    if r != 0 || handle.is_null() {
        return Err(format!("nvmlDeviceGetHandleByPciBusId_v2: error {r}"));
    }
    Ok(Nvml {
        device: handle as usize,
        processes,
    })
}
