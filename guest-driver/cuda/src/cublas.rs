//! The cuBLAS face (`libcublas.so.13`): handles, stream, math and pointer
//! modes, `cublasSgemm_v2` and `cublasGemmEx` (FP32 data, FP32 compute
//! types), versions and status texts. The host runs the GEMMs with the real
//! cuBLAS on the VM's device buffers (docs/protocol.md, "cuBLAS").
//!
//! * A handle lives in the guest only: it holds a stream and a math mode,
//!   which every GEMM record carries, so creating and destroying handles
//!   costs no request (after the first `cublasCreate`, which asks the host
//!   for its cuBLAS with CU_BLAS_INIT, synchronously, as cuBLAS itself
//!   initialises). Unknown handles answer CUBLAS_STATUS_NOT_INITIALIZED
//!   instead of being dereferenced.
//! * A GEMM is asynchronous, as in cuBLAS: its arguments are checked here
//!   by cuBLAS's own rules (the same [`Gemm::validate`] the host applies),
//!   then it is appended to the command buffer like a launch; the host
//!   checks every matrix range against the VM's allocations and reports a
//!   failure at the next synchronisation, as CUDA reports errors of
//!   asynchronous work.
//! * Host pointer mode only (alpha and beta read at the call); device
//!   pointer mode answers CUBLAS_STATUS_NOT_SUPPORTED. Every other exported
//!   cuBLAS call answers CUBLAS_STATUS_NOT_SUPPORTED (see the end of the
//!   file); calls not exported fail at load time.

// The exported functions are the cuBLAS API: their safety contract is
// NVIDIA's documentation of each call (valid out-pointers and buffers).
#![allow(clippy::missing_safety_doc)]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::Mutex;

use vgpu::executor::cuda_api::{blas, Gemm, Record};

use crate::client;
use crate::cu;
use crate::driver::{h, put, Handle};

/// cublasStatus_t.
pub type Status = c_uint;

/// cublasStatus_t values.
pub mod status {
    use super::Status;
    pub const SUCCESS: Status = 0;
    pub const NOT_INITIALIZED: Status = 1;
    pub const ALLOC_FAILED: Status = 3;
    pub const INVALID_VALUE: Status = 7;
    pub const ARCH_MISMATCH: Status = 8;
    pub const MAPPING_ERROR: Status = 11;
    pub const EXECUTION_FAILED: Status = 13;
    pub const INTERNAL_ERROR: Status = 14;
    pub const NOT_SUPPORTED: Status = 15;
    pub const LICENSE_ERROR: Status = 16;
}

/// cublasPointerMode_t.
const POINTER_MODE_HOST: c_int = 0;
const POINTER_MODE_DEVICE: c_int = 1;

/// What a guest handle holds.
#[derive(Debug, Clone, Copy)]
struct HandleState {
    stream: u64,
    math: u32,
}

#[derive(Default)]
struct Handles {
    next: usize,
    live: HashMap<usize, HandleState>,
}

static HANDLES: Mutex<Option<Handles>> = Mutex::new(None);

fn handles<T>(f: impl FnOnce(&mut Handles) -> T) -> T {
    let mut g = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Handles::default))
}

fn state(hd: Handle) -> Result<HandleState, Status> {
    handles(|t| t.live.get(&(hd as usize)).copied()).ok_or(status::NOT_INITIALIZED)
}

fn update(hd: Handle, f: impl FnOnce(&mut HandleState)) -> Result<(), Status> {
    handles(|t| t.live.get_mut(&(hd as usize)).map(f)).ok_or(status::NOT_INITIALIZED)
}

/// Runs a cuBLAS call, turning a panic into CUBLAS_STATUS_INTERNAL_ERROR.
fn call(f: impl FnOnce() -> Result<(), Status>) -> Status {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => status::SUCCESS,
        Ok(Err(e)) => e,
        Err(_) => status::INTERNAL_ERROR,
    }
}

/// A CUresult of [`Gemm::validate`] as cuBLAS reports it.
fn validation_status(e: u32) -> Status {
    match e {
        cu::NOT_SUPPORTED => status::NOT_SUPPORTED,
        _ => status::INVALID_VALUE,
    }
}

/// An error of earlier queued work surfacing while a GEMM is appended (a
/// full buffer was sent), as cuBLAS reports a failed launch.
fn queue_status(e: u32) -> Status {
    match e {
        cu::NOT_SUPPORTED => status::NOT_SUPPORTED,
        cu::OUT_OF_MEMORY => status::ALLOC_FAILED,
        _ => status::EXECUTION_FAILED,
    }
}

/// The number cuBLAS reports for the first illegal argument of a GEMM
/// (`cublasXerbla`): parameters counted from the handle (0), so for
/// cublasSgemm_v2 m is 3 and lda 8, for cublasGemmEx lda 9 (after Atype).
fn bad_parameter(g: &Gemm) -> Option<c_int> {
    let (lda, ldb, ldc) = if g.op == blas::SGEMM {
        (8, 10, 13)
    } else {
        (9, 12, 16)
    };
    if g.transa > blas::OP_C {
        return Some(1);
    }
    if g.transb > blas::OP_C {
        return Some(2);
    }
    let ((ra, _), (rb, _)) = (g.a_dims(), g.b_dims());
    [
        (g.m < 0, 3),
        (g.n < 0, 4),
        (g.k < 0, 5),
        (g.lda < ra.max(1), lda),
        (g.ldb < rb.max(1), ldb),
        (g.ldc < g.m.max(1), ldc),
    ]
    .into_iter()
    .find(|&(bad, _)| bad)
    .map(|(_, n)| n)
}

/// cuBLAS's report of an illegal argument, on the program's C `stdout`
/// (so that it lands in order with the program's own output), as cuBLAS
/// prints it.
#[no_mangle]
pub unsafe extern "C" fn cublasXerbla(name: *const c_char, info: c_int) {
    if name.is_null() {
        return;
    }
    // SAFETY: a NUL-terminated routine name from the caller; the format
    // takes one string and one int.
    unsafe {
        libc::printf(
            c" ** On entry to %s  parameter number %d had an illegal value\n".as_ptr(),
            name,
            info,
        );
    }
}

/// cuBLAS's argument rules: an illegal argument reported as cuBLAS
/// reports it, then the rest of [`Gemm::validate`] (types, modes).
fn check(g: &Gemm) -> Result<(), Status> {
    if let Some(p) = bad_parameter(g) {
        let name = if g.op == blas::SGEMM {
            c"SGEMM"
        } else {
            c"GEMM_EX"
        };
        // SAFETY: a static NUL-terminated name.
        unsafe { cublasXerbla(name.as_ptr(), p) };
        return Err(status::INVALID_VALUE);
    }
    g.validate().map_err(validation_status)
}

/// Appends a checked GEMM on the handle's stream.
fn enqueue(stream: u64, g: Gemm) -> Result<(), Status> {
    client::with(|c| {
        if !c.has_blas() {
            return Err(cu::NOT_SUPPORTED);
        }
        c.enqueue(stream, Record::Gemm(g), 0)
    })
    .map_err(queue_status)
}

/// Reads an FP32 scalar of host pointer mode.
///
/// # Safety
/// `p` is null or points at an f32.
unsafe fn scalar(p: *const f32) -> Result<u32, Status> {
    if p.is_null() {
        return Err(status::INVALID_VALUE);
    }
    // SAFETY: non-null, an f32 per the caller.
    Ok(unsafe { p.read_unaligned() }.to_bits())
}

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(out: *mut Handle) -> Status {
    call(|| {
        if out.is_null() {
            return Err(status::INVALID_VALUE);
        }
        // No device, or a host without cuBLAS: what cuBLAS answers when it
        // cannot initialise.
        client::with(|c| c.blas_init()).map_err(|_| status::NOT_INITIALIZED)?;
        let id = handles(|t| {
            t.next += 1;
            // Non-null, never reused.
            let id = t.next;
            t.live.insert(
                id,
                HandleState {
                    stream: 0,
                    math: blas::DEFAULT_MATH,
                },
            );
            id
        });
        // SAFETY: non-null out-pointer from the caller.
        unsafe { put(out, id as Handle) }.map_err(|_| status::INVALID_VALUE)
    })
}

#[no_mangle]
pub extern "C" fn cublasDestroy_v2(hd: Handle) -> Status {
    // Queued GEMMs carry their stream and mode: nothing waits on the handle.
    call(|| {
        handles(|t| t.live.remove(&(hd as usize)))
            .map(|_| ())
            .ok_or(status::NOT_INITIALIZED)
    })
}

#[no_mangle]
pub extern "C" fn cublasSetStream_v2(hd: Handle, stream: Handle) -> Status {
    call(|| update(hd, |s| s.stream = h(stream)))
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetStream_v2(hd: Handle, stream: *mut Handle) -> Status {
    call(|| {
        let s = state(hd)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(stream, s.stream as usize as Handle) }.map_err(|_| status::INVALID_VALUE)
    })
}

#[no_mangle]
pub extern "C" fn cublasSetMathMode(hd: Handle, mode: c_uint) -> Status {
    call(|| {
        state(hd)?;
        if !blas::math_mode_ok(mode) {
            return Err(status::INVALID_VALUE);
        }
        update(hd, |s| s.math = mode)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetMathMode(hd: Handle, mode: *mut c_uint) -> Status {
    call(|| {
        let s = state(hd)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(mode, s.math) }.map_err(|_| status::INVALID_VALUE)
    })
}

#[no_mangle]
pub extern "C" fn cublasSetPointerMode_v2(hd: Handle, mode: c_int) -> Status {
    call(|| {
        state(hd)?;
        match mode {
            POINTER_MODE_HOST => Ok(()),
            POINTER_MODE_DEVICE => Err(status::NOT_SUPPORTED),
            _ => Err(status::INVALID_VALUE),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetPointerMode_v2(hd: Handle, mode: *mut c_int) -> Status {
    call(|| {
        state(hd)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(mode, POINTER_MODE_HOST) }.map_err(|_| status::INVALID_VALUE)
    })
}

/// The host's cuBLAS uses a workspace of its own: a program's workspace is
/// accepted and not used (results do not depend on it).
#[no_mangle]
pub extern "C" fn cublasSetWorkspace_v2(hd: Handle, _ws: *mut c_void, _size: usize) -> Status {
    call(|| state(hd).map(|_| ()))
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetVersion_v2(hd: Handle, v: *mut c_int) -> Status {
    call(|| {
        state(hd)?;
        let ver = client::with(|c| c.blas_init()).map_err(|_| status::NOT_INITIALIZED)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(v, ver as c_int) }.map_err(|_| status::INVALID_VALUE)
    })
}

/// libraryPropertyType: MAJOR_VERSION 0, MINOR_VERSION 1, PATCH_LEVEL 2,
/// of the host's cuBLAS.
#[no_mangle]
pub unsafe extern "C" fn cublasGetProperty(kind: c_int, v: *mut c_int) -> Status {
    call(|| {
        let ver = client::with(|c| c.blas_init()).map_err(|_| status::NOT_INITIALIZED)? as c_int;
        let x = match kind {
            0 => ver / 10000,
            1 => ver / 100 % 100,
            2 => ver % 100,
            _ => return Err(status::INVALID_VALUE),
        };
        // SAFETY: out-pointer from the caller.
        unsafe { put(v, x) }.map_err(|_| status::INVALID_VALUE)
    })
}

/// The runtime this library is (CUDA 13.0).
#[no_mangle]
pub extern "C" fn cublasGetCudartVersion() -> usize {
    13000
}

#[no_mangle]
pub extern "C" fn cublasGetStatusName(s: Status) -> *const c_char {
    status_text(s).0.as_ptr() as *const c_char
}

#[no_mangle]
pub extern "C" fn cublasGetStatusString(s: Status) -> *const c_char {
    status_text(s).1.as_ptr() as *const c_char
}

/// Name and description of a status (NUL-terminated, static).
pub fn status_text(s: Status) -> (&'static [u8], &'static [u8]) {
    match s {
        status::SUCCESS => (b"CUBLAS_STATUS_SUCCESS\0", b"success\0"),
        status::NOT_INITIALIZED => (
            b"CUBLAS_STATUS_NOT_INITIALIZED\0",
            b"the library was not initialized\0",
        ),
        status::ALLOC_FAILED => (
            b"CUBLAS_STATUS_ALLOC_FAILED\0",
            b"the resource allocation failed\0",
        ),
        status::INVALID_VALUE => (
            b"CUBLAS_STATUS_INVALID_VALUE\0",
            b"an invalid numeric value was used as an argument\0",
        ),
        status::ARCH_MISMATCH => (
            b"CUBLAS_STATUS_ARCH_MISMATCH\0",
            b"an absent device architectural feature is required\0",
        ),
        status::MAPPING_ERROR => (
            b"CUBLAS_STATUS_MAPPING_ERROR\0",
            b"an access to GPU memory space failed\0",
        ),
        status::EXECUTION_FAILED => (
            b"CUBLAS_STATUS_EXECUTION_FAILED\0",
            b"the GPU program failed to execute\0",
        ),
        status::INTERNAL_ERROR => (
            b"CUBLAS_STATUS_INTERNAL_ERROR\0",
            b"an internal operation failed\0",
        ),
        status::NOT_SUPPORTED => (
            b"CUBLAS_STATUS_NOT_SUPPORTED\0",
            b"the functionality requested is not supported\0",
        ),
        status::LICENSE_ERROR => (
            b"CUBLAS_STATUS_LICENSE_ERROR\0",
            b"the functionality requested requires some license\0",
        ),
        _ => (b"CUBLAS_STATUS_UNKNOWN\0", b"unknown status\0"),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasSgemm_v2(
    hd: Handle,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
) -> Status {
    call(|| {
        let s = state(hd)?;
        // SAFETY: host pointer mode: alpha and beta point at floats.
        let (alpha, beta) = unsafe { (scalar(alpha)?, scalar(beta)?) };
        let g = Gemm {
            op: blas::SGEMM,
            math_mode: s.math,
            transa: transa as u32,
            transb: transb as u32,
            m,
            n,
            k,
            a: a as usize as u64,
            lda,
            b: b as usize as u64,
            ldb,
            c: c as usize as u64,
            ldc,
            a_type: blas::R_32F,
            b_type: blas::R_32F,
            c_type: blas::R_32F,
            compute_type: blas::COMPUTE_32F,
            algo: blas::GEMM_DEFAULT,
            alpha,
            beta,
        };
        check(&g)?;
        enqueue(s.stream, g)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGemmEx(
    hd: Handle,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: c_int,
    lda: c_int,
    b: *const c_void,
    b_type: c_int,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: c_int,
    ldc: c_int,
    compute_type: c_int,
    algo: c_int,
) -> Status {
    call(|| {
        let s = state(hd)?;
        let g = Gemm {
            op: blas::GEMM_EX,
            math_mode: s.math,
            transa: transa as u32,
            transb: transb as u32,
            m,
            n,
            k,
            a: a as usize as u64,
            lda,
            b: b as usize as u64,
            ldb,
            c: c as usize as u64,
            ldc,
            a_type: a_type as u32,
            b_type: b_type as u32,
            c_type: c_type as u32,
            compute_type: compute_type as u32,
            algo,
            alpha: 0,
            beta: 0,
        };
        // Types first: the scalars are floats only for FP32 compute types.
        check(&g)?;
        // SAFETY: host pointer mode with an FP32 compute type: alpha and
        // beta point at floats.
        let (alpha, beta) = unsafe { (scalar(alpha as *const f32)?, scalar(beta as *const f32)?) };
        enqueue(s.stream, Gemm { alpha, beta, ..g })
    })
}

/// cuBLAS calls a program may link against that this library does not
/// carry out: each answers CUBLAS_STATUS_NOT_SUPPORTED (its arguments are
/// not read; the C calling convention lets the caller pass any).
macro_rules! not_supported {
    ($($name:ident),* $(,)?) => {
        $(
            #[no_mangle]
            pub extern "C" fn $name() -> Status {
                log::warn!(concat!("vgpu cublas: ", stringify!($name), " is not supported"));
                status::NOT_SUPPORTED
            }
        )*
    };
}

not_supported!(
    cublasDgemm_v2,
    cublasCgemm_v2,
    cublasZgemm_v2,
    cublasHgemm,
    cublasSgemmBatched,
    cublasDgemmBatched,
    cublasSgemmStridedBatched,
    cublasDgemmStridedBatched,
    cublasHgemmStridedBatched,
    cublasGemmBatchedEx,
    cublasGemmStridedBatchedEx,
    cublasSgemv_v2,
    cublasDgemv_v2,
    cublasSgeam,
    cublasDgeam,
    cublasSaxpy_v2,
    cublasDaxpy_v2,
    cublasSscal_v2,
    cublasDscal_v2,
    cublasSdot_v2,
    cublasDdot_v2,
    cublasSnrm2_v2,
    cublasDnrm2_v2,
    cublasSasum_v2,
    cublasIsamax_v2,
    cublasScopy_v2,
    cublasStrsm_v2,
    cublasSsyrk_v2,
    cublasSetVector,
    cublasGetVector,
    cublasSetMatrix,
    cublasGetMatrix,
    cublasSetAtomicsMode,
    cublasGetAtomicsMode,
    cublasLoggerConfigure,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_handles_and_bad_arguments_are_statuses() {
        let bogus = 0x5151 as Handle;
        assert_eq!(
            cublasSetStream_v2(bogus, std::ptr::null_mut()),
            status::NOT_INITIALIZED
        );
        assert_eq!(cublasDestroy_v2(bogus), status::NOT_INITIALIZED);
        let (one, zero) = (1f32, 0f32);
        let p = 0x1000 as *mut f32;
        // SAFETY: the handle is unknown: nothing is read.
        let s = unsafe { cublasSgemm_v2(bogus, 0, 0, 1, 1, 1, &one, p, 1, p, 1, &zero, p, 1) };
        assert_eq!(s, status::NOT_INITIALIZED);
        // A handle made without the host (the table directly).
        let hd = handles(|t| {
            t.next += 1;
            t.live.insert(t.next, HandleState { stream: 0, math: 0 });
            t.next
        }) as Handle;
        assert_eq!(cublasSetMathMode(hd, 99), status::INVALID_VALUE);
        assert_eq!(
            cublasSetMathMode(hd, blas::TF32_TENSOR_OP_MATH),
            status::SUCCESS
        );
        let mut m = 0;
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { cublasGetMathMode(hd, &mut m) }, status::SUCCESS);
        assert_eq!(m, blas::TF32_TENSOR_OP_MATH);
        assert_eq!(
            cublasSetPointerMode_v2(hd, POINTER_MODE_DEVICE),
            status::NOT_SUPPORTED
        );
        // Validation comes before any request: m < 0, lda < m, FP16 data.
        // SAFETY: scalars are valid; nothing else is read.
        unsafe {
            assert_eq!(
                cublasSgemm_v2(hd, 0, 0, -1, 1, 1, &one, p, 1, p, 1, &zero, p, 1),
                status::INVALID_VALUE
            );
            assert_eq!(
                cublasSgemm_v2(hd, 0, 0, 4, 1, 1, &one, p, 2, p, 1, &zero, p, 4),
                status::INVALID_VALUE
            );
            assert_eq!(
                cublasSgemm_v2(hd, 0, 0, 1, 1, 1, std::ptr::null(), p, 1, p, 1, &zero, p, 1),
                status::INVALID_VALUE
            );
            let v = p as *mut c_void;
            let a = &one as *const f32 as *const c_void;
            assert_eq!(
                cublasGemmEx(hd, 0, 0, 1, 1, 1, a, v, 2, 1, v, 2, 1, a, v, 2, 1, 64, -1),
                status::NOT_SUPPORTED
            );
        }
        assert_eq!(cublasDestroy_v2(hd), status::SUCCESS);
        assert_eq!(
            cublasDestroy_v2(hd),
            status::NOT_INITIALIZED,
            "destroyed once"
        );
        assert_eq!(cublasDgemm_v2(), status::NOT_SUPPORTED);
    }

    #[test]
    fn illegal_arguments_are_numbered_as_cublas_numbers_them() {
        let g = Gemm {
            op: blas::SGEMM,
            m: 4,
            n: 3,
            k: 2,
            lda: 4,
            ldb: 2,
            ldc: 4,
            ..Default::default()
        };
        assert_eq!(bad_parameter(&g), None);
        assert_eq!(bad_parameter(&Gemm { m: -1, ..g }), Some(3));
        assert_eq!(bad_parameter(&Gemm { lda: 3, ..g }), Some(8));
        assert_eq!(
            bad_parameter(&Gemm {
                ldc: 3,
                ldb: 1,
                ..g
            }),
            Some(10),
            "first one"
        );
        assert_eq!(
            bad_parameter(&Gemm {
                transb: 7,
                m: -1,
                ..g
            }),
            Some(2)
        );
        let ex = Gemm {
            op: blas::GEMM_EX,
            ..g
        };
        assert_eq!(bad_parameter(&Gemm { lda: 3, ..ex }), Some(9));
        assert_eq!(bad_parameter(&Gemm { ldb: 1, ..ex }), Some(12));
        assert_eq!(bad_parameter(&Gemm { ldc: 1, ..ex }), Some(16));
    }

    #[test]
    fn status_names() {
        for s in [0, 1, 3, 7, 8, 11, 13, 14, 15, 16, 12345] {
            let (n, d) = status_text(s);
            assert!(n.starts_with(b"CUBLAS_STATUS_") && n.ends_with(b"\0"));
            assert!(d.ends_with(b"\0") && d.len() > 1);
        }
        // SAFETY: the returned pointer is a static NUL-terminated string.
        let n = unsafe { std::ffi::CStr::from_ptr(cublasGetStatusName(15)) };
        assert_eq!(n.to_str(), Ok("CUBLAS_STATUS_NOT_SUPPORTED"));
    }
}
