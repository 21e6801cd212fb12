//! cuBLAS for the CUDA API (CU_BLAS_INIT, GEMM records): one real cuBLAS
//! handle per VM, created in the VM's context in its worker, used on the
//! VM's streams.
//!
//! Why one host handle per VM and not one per guest handle: a guest handle
//! holds only a stream and a math mode, and a GEMM record carries both, so
//! the guest's `cublasCreate`/`cublasDestroy` cost no request and a
//! program's many handles cost no host memory. The host sets the record's
//! stream and math mode on its handle when they change, then makes the
//! call the program made (`cublasSgemm_v2` or `cublasGemmEx`) with values
//! checked by [`Gemm::validate`] and ranges checked against the VM's
//! allocations by the caller.
//!
//! Why raw entry points instead of cudarc's typed ones: cudarc types math
//! modes, operations and statuses as Rust enums, which cannot hold a value
//! such as `CUBLAS_TF32_TENSOR_OP_MATH | CUBLAS_MATH_DISALLOW_...` (19) or a
//! status newer than cudarc; C integers can. The library is cudarc's
//! (`cudarc::cublas::sys::culib`), loaded once per process.
//!
//! cuBLAS's workspace (allocated by cuBLAS per handle and stream) is not
//! charged to the VM's device-memory quota; it is bounded by cuBLAS (a few
//! tens of MiB per stream on this hardware) and by the VM's 1024 streams.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

use cudarc::driver::sys::CUstream;

use crate::executor::cuda_api::{blas, cu, Gemm};

type Handle = *mut c_void;
type CreateFn = unsafe extern "C" fn(*mut Handle) -> c_uint;
type DestroyFn = unsafe extern "C" fn(Handle) -> c_uint;
type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> c_uint;
type SetMathFn = unsafe extern "C" fn(Handle, c_uint) -> c_uint;
type VersionFn = unsafe extern "C" fn(Handle, *mut c_int) -> c_uint;
type SgemmFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    *const f32,
    *mut f32,
    c_int,
) -> c_uint;
type GemmExFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    c_int,
    c_int,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    c_int,
    c_int,
) -> c_uint;

/// The cuBLAS entry points this file calls.
#[derive(Clone, Copy)]
struct Fns {
    create: CreateFn,
    destroy: DestroyFn,
    set_stream: SetStreamFn,
    set_math: SetMathFn,
    version: VersionFn,
    sgemm: SgemmFn,
    gemm_ex: GemmExFn,
}

/// cublasStatus_t values this file tells apart.
const STATUS_SUCCESS: c_uint = 0;
const STATUS_ALLOC_FAILED: c_uint = 3;
const STATUS_INVALID_VALUE: c_uint = 7;
const STATUS_ARCH_MISMATCH: c_uint = 8;
const STATUS_NOT_SUPPORTED: c_uint = 15;

/// The CUresult a guest sees for a failed cuBLAS call of its record.
fn status_result(s: c_uint) -> u32 {
    match s {
        STATUS_INVALID_VALUE => cu::INVALID_VALUE,
        STATUS_ALLOC_FAILED => cu::OUT_OF_MEMORY,
        STATUS_NOT_SUPPORTED | STATUS_ARCH_MISMATCH => cu::NOT_SUPPORTED,
        _ => UNKNOWN,
    }
}

/// CUDA_ERROR_UNKNOWN: cuBLAS failed for a reason of its own (internal
/// error, execution failed). A fault it caused shows at the stream wait.
const UNKNOWN: u32 = 999;

/// An entry point of `lib`, read as the type of the field it goes into
/// (a macro: cudarc's library type is not named here). Use inside
/// `unsafe`, with that type the C signature of the name.
macro_rules! sym {
    ($lib:expr, $name:expr) => {
        $lib.get($name).ok().map(|s| *s)
    };
}

fn fns() -> Option<Fns> {
    static FNS: OnceLock<Option<Fns>> = OnceLock::new();
    *FNS.get_or_init(|| {
        if !super::cublas_present() {
            log::info!("libcublas not found: CUDA API cuBLAS calls answer NOT_SUPPORTED");
            return None;
        }
        // SAFETY: each name is the cuBLAS entry point with the C signature
        // of the type it is read as (cublas_api.h, enums as C ints); the
        // library stays loaded for the life of the process (cudarc keeps it
        // in a static). culib() cannot panic: the library was found above.
        unsafe {
            let lib = cudarc::cublas::sys::culib();
            let f = Fns {
                create: sym!(lib, b"cublasCreate_v2\0")?,
                destroy: sym!(lib, b"cublasDestroy_v2\0")?,
                set_stream: sym!(lib, b"cublasSetStream_v2\0")?,
                set_math: sym!(lib, b"cublasSetMathMode\0")?,
                version: sym!(lib, b"cublasGetVersion_v2\0")?,
                sgemm: sym!(lib, b"cublasSgemm_v2\0")?,
                gemm_ex: sym!(lib, b"cublasGemmEx\0")?,
            };
            Some(f)
        }
    })
}

/// The VM's cuBLAS handle and what is set on it.
#[derive(Debug)]
pub struct VmBlas {
    handle: usize,
    stream: Option<usize>,
    math: Option<u32>,
    /// cublasGetVersion_v2 (major·10000 + minor·100 + patch).
    pub version: u32,
}

impl VmBlas {
    /// Creates the handle in the current (the VM's) context; the CUresult
    /// for the guest when cuBLAS is absent or refuses.
    pub fn create() -> Result<VmBlas, u32> {
        let f = fns().ok_or(cu::NOT_SUPPORTED)?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: plain out-parameter; the VM's context is current.
        let s = unsafe { (f.create)(&mut h) };
        if s != STATUS_SUCCESS || h.is_null() {
            log::warn!("cublasCreate failed: status {s}");
            return Err(match s {
                STATUS_ALLOC_FAILED => cu::OUT_OF_MEMORY,
                _ => cu::NOT_SUPPORTED,
            });
        }
        let mut v: c_int = 0;
        // SAFETY: a live handle; plain out-parameter.
        if unsafe { (f.version)(h, &mut v) } != STATUS_SUCCESS {
            v = 0;
        }
        Ok(VmBlas {
            handle: h as usize,
            stream: None,
            math: None,
            version: v.max(0) as u32,
        })
    }

    /// Queues the GEMM on `stream`. The caller has validated `g`
    /// ([`Gemm::validate`]) and checked its three ranges against the VM's
    /// allocations; the error is the CUresult for the guest.
    pub fn gemm(&mut self, stream: CUstream, g: &Gemm) -> Result<(), u32> {
        let f = fns().ok_or(cu::NOT_SUPPORTED)?;
        let h = self.handle as Handle;
        if self.stream != Some(stream as usize) {
            // SAFETY: a live handle and a stream of its context.
            let s = unsafe { (f.set_stream)(h, stream as *mut c_void) };
            if s != STATUS_SUCCESS {
                return Err(status_result(s));
            }
            self.stream = Some(stream as usize);
        }
        if self.math != Some(g.math_mode) {
            // SAFETY: a live handle; the mode is one cuBLAS knows
            // (validated).
            let s = unsafe { (f.set_math)(h, g.math_mode) };
            if s != STATUS_SUCCESS {
                self.math = None;
                return Err(status_result(s));
            }
            self.math = Some(g.math_mode);
        }
        let (alpha, beta) = (f32::from_bits(g.alpha), f32::from_bits(g.beta));
        let (ta, tb) = (g.transa as c_int, g.transb as c_int);
        // SAFETY: a live handle with the VM's stream set; A, B and C are
        // device ranges of the sizes their dimensions and leading
        // dimensions span, each inside one of the VM's allocations (checked
        // by the caller), so cuBLAS reads and writes nothing else; alpha and
        // beta live through the call (host pointer mode: read at once).
        let s = unsafe {
            if g.op == blas::SGEMM {
                (f.sgemm)(
                    h,
                    ta,
                    tb,
                    g.m,
                    g.n,
                    g.k,
                    &alpha,
                    g.a as *const f32,
                    g.lda,
                    g.b as *const f32,
                    g.ldb,
                    &beta,
                    g.c as *mut f32,
                    g.ldc,
                )
            } else {
                (f.gemm_ex)(
                    h,
                    ta,
                    tb,
                    g.m,
                    g.n,
                    g.k,
                    &alpha as *const f32 as *const c_void,
                    g.a as *const c_void,
                    g.a_type as c_int,
                    g.lda,
                    g.b as *const c_void,
                    g.b_type as c_int,
                    g.ldb,
                    &beta as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    g.c_type as c_int,
                    g.ldc,
                    g.compute_type as c_int,
                    g.algo,
                )
            }
        };
        if s != STATUS_SUCCESS {
            return Err(status_result(s));
        }
        Ok(())
    }

    /// Destroys the handle; the VM's context must still be current.
    pub fn destroy(self) {
        if let Some(f) = fns() {
            // SAFETY: created by cublasCreate_v2, destroyed once, in its
            // context.
            let s = unsafe { (f.destroy)(self.handle as Handle) };
            if s != STATUS_SUCCESS {
                log::warn!("cublasDestroy: status {s}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cublas_failures_become_cuda_results() {
        assert_eq!(status_result(STATUS_INVALID_VALUE), cu::INVALID_VALUE);
        assert_eq!(status_result(STATUS_NOT_SUPPORTED), cu::NOT_SUPPORTED);
        assert_eq!(status_result(STATUS_ALLOC_FAILED), cu::OUT_OF_MEMORY);
        assert_eq!(status_result(14 /* INTERNAL_ERROR */), UNKNOWN);
    }
}
