//! SGEMM through cuBLAS, loaded at run time like the driver: when libcublas
//! is absent (checked before any cuBLAS call) the hand-written kernel of
//! `kernels.rs` runs instead.
//!
//! Row-major C = A·B through column-major cuBLAS: row-major C (m×n) is
//! column-major Cᵀ (n×m), so the executor computes Cᵀ = Bᵀ·Aᵀ with B and A
//! as they lie in memory. FP32 math by default (`CUBLAS_COMPUTE_32F`), TF32
//! tensor-op math when the request sets `VGPU_SGEMM_TF32`.
//!
//! Copies overlap the multiplication: B goes in first, then A and C are cut
//! in row blocks that alternate between two streams, so the copy of block
//! i+1 in and of block i-1 out run while block i multiplies.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::result::{self as blas, CublasError};
use cudarc::cublas::sys as bsys;
use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{CudaContext, CudaStream};

use super::check;
use super::memory::dma_pieces;
use crate::bytes::{Reader, Writer};
use crate::executor::ops::GemmDims;
use crate::protocol::Status;

/// True when libcublas can be loaded (checked before any cuBLAS call).
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the library; no cuBLAS call is made.
    unsafe { bsys::is_culib_present() }
}

/// A cuBLAS handle and the second stream of the pipeline.
pub struct Blas {
    handle: bsys::cublasHandle_t,
    pub second: Arc<CudaStream>,
}

// SAFETY: the handle is used only by the thread that owns the executor at a
// time (the executor is moved to its worker thread, never shared); cuBLAS
// handles may move between threads as long as calls are not concurrent.
unsafe impl Send for Blas {}

/// Row blocks of the pipeline: about this many, each at least `MIN_ROWS`.
const BLOCKS: usize = 16;
const MIN_ROWS: usize = 128;

impl Blas {
    /// Creates the handle (the context must be current), or `None` when
    /// libcublas is absent or refuses.
    pub fn new(gpu: u32, ctx: &Arc<CudaContext>) -> Option<Blas> {
        if !cublas_present() {
            log::info!("gpu{gpu}: libcublas not found: SGEMM runs the built-in kernel (FP32)");
            return None;
        }
        let second = match ctx.new_stream() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("gpu{gpu}: no second stream for SGEMM: {e}");
                return None;
            }
        };
        match blas::create_handle() {
            Ok(handle) => {
                log::info!("gpu{gpu}: SGEMM through cuBLAS");
                Some(Blas { handle, second })
            }
            Err(e) => {
                log::warn!("gpu{gpu}: cublasCreate failed ({e}): SGEMM runs the built-in kernel");
                None
            }
        }
    }

    /// Queues C = A·B (row-major, `rows` rows of A and C from device
    /// pointers `a`, `c`; B whole) on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        stream: &CudaStream,
        rows: usize,
        d: GemmDims,
        a: CUdeviceptr,
        b: CUdeviceptr,
        c: CUdeviceptr,
        tf32: bool,
    ) -> Result<(), CublasError> {
        let (alpha, beta) = (1f32, 0f32);
        let compute = if tf32 {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // Dimensions are bounded by MAX_MATRIX_ELEMS (64 Mi): they fit c_int.
        let (n, rows, k) = (d.n as i32, rows as i32, d.k as i32);
        // SAFETY: the handle is alive; `stream` belongs to the same context;
        // a (rows×k), b (k×n) and c (rows×n) are device buffers of at least
        // those sizes (row-major, so column-major with leading dims k, n, n);
        // alpha and beta live through the call (cuBLAS reads them at once in
        // host pointer mode).
        unsafe {
            blas::set_stream(self.handle, stream.cu_stream() as bsys::cudaStream_t)?;
            blas::gemm_ex(
                self.handle,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                bsys::cublasOperation_t::CUBLAS_OP_N,
                n,
                rows,
                k,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                bsys::cudaDataType::CUDA_R_32F,
                n,
                a as *const c_void,
                bsys::cudaDataType::CUDA_R_32F,
                k,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                bsys::cudaDataType::CUDA_R_32F,
                n,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
    }

    /// The row blocks of the pipeline for `m` rows: (first row, rows).
    pub fn blocks(m: usize) -> Vec<(usize, usize)> {
        let rows = m.div_ceil(BLOCKS).max(MIN_ROWS);
        (0..m).step_by(rows).map(|r| (r, rows.min(m - r))).collect()
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle`, destroyed once; the executor
        // synchronized its streams before dropping.
        if let Err(e) = unsafe { blas::destroy_handle(self.handle) } {
            log::warn!("cublasDestroy: {e}");
        }
    }
}

/// Queues copies of payload bytes `off..off+len` (zero-copy: registered
/// guest memory) to `dst` on `stream`.
pub fn copy_in_async(
    src: Reader,
    off: usize,
    len: usize,
    dst: CUdeviceptr,
    stream: sys::CUstream,
) -> Result<(), Result<Status, cudarc::driver::result::DriverError>> {
    let mut done = 0u64;
    let ranges = src.host_ranges(off, len).map_err(Ok)?;
    for (ptr, n) in ranges
        .into_iter()
        .flat_map(|(p, n)| dma_pieces(p as usize, n))
    {
        // SAFETY: `ptr..ptr+n` is registered guest memory kept mapped by
        // `src`; the caller synchronizes the stream before returning.
        check(unsafe { sys::cuMemcpyHtoDAsync_v2(dst + done, ptr as *const c_void, n, stream) })
            .map_err(Err)?;
        done += n as u64;
    }
    Ok(())
}

/// Queues copies of `len` bytes from `src` to output bytes `off..off+len`
/// (zero-copy) on `stream`.
pub fn copy_out_async(
    src: CUdeviceptr,
    out: &mut Writer,
    off: usize,
    len: usize,
    stream: sys::CUstream,
) -> Result<(), Result<Status, cudarc::driver::result::DriverError>> {
    let mut done = 0u64;
    let ranges = out.host_ranges(off, len).map_err(Ok)?;
    for (ptr, n) in ranges
        .into_iter()
        .flat_map(|(p, n)| dma_pieces(p as usize, n))
    {
        // SAFETY: registered guest memory kept mapped by `out`; the caller
        // synchronizes the stream before returning.
        check(unsafe { sys::cuMemcpyDtoHAsync_v2(ptr as *mut c_void, src + done, n, stream) })
            .map_err(Err)?;
        done += n as u64;
    }
    Ok(())
}
