//! Guest CUDA library: the CUDA driver API (`libcuda.so.1`), the runtime
//! API (`libcudart.so.13`) and cuBLAS (`libcublas.so.13`, `cublas.rs`) for
//! unmodified programs, over the vgpu device's CUDA API (docs/protocol.md,
//! opcodes 0x03xx).
//!
//! * One library file, installed under the three names as symlinks
//!   (`install.sh`): the dynamic loader maps a file once however many names
//!   reach it (it compares device and inode), so the runtime and the driver
//!   face share one state — one connection, one command buffer.
//! * Replacing the runtime as well as the driver sidesteps
//!   `cuGetExportTable`, cudart's private interface to the driver: programs
//!   built with `nvcc -cudart shared` call our runtime, which registers
//!   their fat binaries itself. (`-cudart static` programs embed NVIDIA's
//!   runtime, which needs that table; `cuGetExportTable` answers
//!   CUDA_ERROR_NOT_SUPPORTED and they fail cleanly.)
//! * The contract is shared, not copied: the crate depends on the `vgpu`
//!   crate for `protocol.rs` and `executor/cuda_api.rs` (the same encoders
//!   the host's parser is tested against) and on `vgpu-sim` for the
//!   user-space vhost-user frontend. A separate small contract crate would
//!   build faster, but would mean moving the contract out of `src/`, which
//!   other work is changing now; the linker keeps only what is used.
//! * Runtime error numbers equal the driver's CUresult numbers for every
//!   error this library produces (cudaErrorInvalidValue = 1,
//!   cudaErrorMemoryAllocation = 2, cudaErrorNoDevice = 100,
//!   cudaErrorNotSupported = 801, ...), so one code travels through both.
//! * Every entry point catches panics (none is expected) and answers
//!   CUDA_ERROR_UNKNOWN instead of unwinding into C.

pub mod client;
pub mod cublas;
pub mod driver;
pub mod runtime;
pub mod transport;

/// CUresult / cudaError_t values used here.
pub mod cu {
    pub use vgpu::executor::cuda_api::cu::*;
    pub const NOT_INITIALIZED: u32 = 3;
    pub const NO_DEVICE: u32 = 100;
    pub const INVALID_DEVICE: u32 = 101;
    pub const INVALID_IMAGE: u32 = 200;
    pub const INVALID_CONTEXT: u32 = 201;
    pub const UNKNOWN: u32 = 999;
}

/// Runs `f`, turning a panic into CUDA_ERROR_UNKNOWN.
pub(crate) fn guard(f: impl FnOnce() -> Result<(), u32>) -> u32 {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => e,
        Err(_) => cu::UNKNOWN,
    }
}

/// The runtime's names of the errors (cudaGetErrorName: `cudaErrorNoDevice`,
/// not the driver's `CUDA_ERROR_NO_DEVICE`), NUL-terminated, static. The
/// numbers are those of `error_text`.
pub(crate) fn runtime_error_name(e: u32) -> &'static [u8] {
    match e {
        0 => b"cudaSuccess\0",
        1 => b"cudaErrorInvalidValue\0",
        2 => b"cudaErrorMemoryAllocation\0",
        3 => b"cudaErrorInitializationError\0",
        100 => b"cudaErrorNoDevice\0",
        101 => b"cudaErrorInvalidDevice\0",
        200 => b"cudaErrorInvalidKernelImage\0",
        201 => b"cudaErrorDeviceUninitialized\0",
        209 => b"cudaErrorNoKernelImageForDevice\0",
        218 => b"cudaErrorInvalidPtx\0",
        400 => b"cudaErrorInvalidResourceHandle\0",
        500 => b"cudaErrorSymbolNotFound\0",
        600 => b"cudaErrorNotReady\0",
        700 => b"cudaErrorIllegalAddress\0",
        701 => b"cudaErrorLaunchOutOfResources\0",
        702 => b"cudaErrorLaunchTimeout\0",
        719 => b"cudaErrorLaunchFailure\0",
        801 => b"cudaErrorNotSupported\0",
        _ => b"cudaErrorUnknown\0",
    }
}

/// Names and descriptions of the errors, for cuGetErrorString and
/// cudaGetErrorString (NUL-terminated, static).
pub(crate) fn error_text(e: u32) -> (&'static [u8], &'static [u8]) {
    match e {
        0 => (b"CUDA_SUCCESS\0", b"no error\0"),
        1 => (b"CUDA_ERROR_INVALID_VALUE\0", b"invalid argument\0"),
        2 => (b"CUDA_ERROR_OUT_OF_MEMORY\0", b"out of memory\0"),
        3 => (b"CUDA_ERROR_NOT_INITIALIZED\0", b"initialization error\0"),
        100 => (
            b"CUDA_ERROR_NO_DEVICE\0",
            b"no CUDA-capable device is detected\0",
        ),
        101 => (b"CUDA_ERROR_INVALID_DEVICE\0", b"invalid device ordinal\0"),
        200 => (
            b"CUDA_ERROR_INVALID_IMAGE\0",
            b"device kernel image is invalid\0",
        ),
        201 => (b"CUDA_ERROR_INVALID_CONTEXT\0", b"invalid device context\0"),
        209 => (
            b"CUDA_ERROR_NO_BINARY_FOR_GPU\0",
            b"no kernel image is available for execution on the device\0",
        ),
        218 => (
            b"CUDA_ERROR_INVALID_PTX\0",
            b"a PTX JIT compilation failed\0",
        ),
        400 => (b"CUDA_ERROR_INVALID_HANDLE\0", b"invalid resource handle\0"),
        500 => (b"CUDA_ERROR_NOT_FOUND\0", b"named symbol not found\0"),
        600 => (b"CUDA_ERROR_NOT_READY\0", b"device not ready\0"),
        700 => (
            b"CUDA_ERROR_ILLEGAL_ADDRESS\0",
            b"an illegal memory access was encountered\0",
        ),
        701 => (
            b"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES\0",
            b"too many resources requested for launch\0",
        ),
        702 => (
            b"CUDA_ERROR_LAUNCH_TIMEOUT\0",
            b"the launch timed out and was terminated\0",
        ),
        719 => (
            b"CUDA_ERROR_LAUNCH_FAILED\0",
            b"unspecified launch failure\0",
        ),
        801 => (b"CUDA_ERROR_NOT_SUPPORTED\0", b"operation not supported\0"),
        _ => (b"CUDA_ERROR_UNKNOWN\0", b"unknown error\0"),
    }
}
