//! The CUDA API (opcodes 0x03xx, `docs/protocol.md`, "CUDA API"), the part
//! that needs no GPU: the wire layouts, payload and command-buffer parsing,
//! and the per-VM tables (allocations by device address, modules, functions,
//! streams, events). The worker's executor (`cuda/api.rs`) keeps one
//! [`ApiTables`] per VM; the guest CUDA library (`guest-driver/cuda`) encodes
//! with the same structs, so both sides share one definition.
//!
//! Why raw device pointers: real programs do pointer arithmetic and keep
//! device addresses in structs and kernel parameters. They are safe to hand
//! out because every VM's CUDA runs in a worker process of its own, so an
//! address names nothing of another VM; the host still checks every copy
//! and memset range against one allocation of the VM ([`Allocations`]), so a
//! guest cannot make the worker's driver touch memory it did not allocate.

use std::collections::{BTreeMap, HashMap};

use vm_memory::endian::{Le16, Le32, Le64};
use vm_memory::ByteValued;

use crate::protocol::{read_obj, Status};

/// Version of the CUDA API that CU_DEVICE_INFO reports (`api_version`):
/// 1 the driver and runtime calls, 2 added cuBLAS (CU_BLAS_INIT and GEMM
/// records). A later version only adds (docs/protocol.md, "Version rules").
pub const API_VERSION: u32 = 2;
/// The oldest host the guest library runs on (everything but cuBLAS).
pub const MIN_API_VERSION: u32 = 1;
/// The first version with cuBLAS.
pub const BLAS_API_VERSION: u32 = 2;
/// Device attributes CU_DEVICE_INFO returns: `attrs[i]` is
/// `cuDeviceGetAttribute(i)` for `0 <= i < ATTR_COUNT` (0 where the driver
/// knows no such attribute).
pub const ATTR_COUNT: usize = 192;
/// Largest module image (fatbin, cubin or PTX) of CU_MODULE_LOAD.
pub const MAX_IMAGE_LEN: usize = 64 << 20;
/// Largest synchronous copy (CU_MEMCPY_HTOD bytes, CU_MEMCPY_DTOH len).
pub const MAX_COPY_LEN: usize = 64 << 20;
/// Longest kernel or global name.
pub const MAX_SYMBOL_LEN: usize = 4096;
/// Most records of one command buffer.
pub const MAX_RECORDS: usize = 65536;
/// Largest command-buffer payload.
pub const MAX_COMMAND_BUFFER_LEN: usize = 64 << 20;
/// Largest sum of the DtoH lengths of one command buffer.
pub const MAX_COMMAND_BUFFER_OUTPUT: usize = 64 << 20;
/// Most parameter bytes of a kernel (CUDA 12.1's limit).
pub const MAX_PARAM_BYTES: usize = 32764;
/// Most parameters of a kernel GET_FUNCTION reports.
pub const MAX_FUNCTION_PARAMS: usize = 4096;
/// Most live objects of each kind (modules, functions, streams, events).
pub const MAX_MODULES: usize = 1024;
pub const MAX_FUNCTIONS: usize = 65536;
pub const MAX_STREAMS: usize = 1024;
pub const MAX_EVENTS: usize = 65536;
/// Most live allocations of one VM.
pub const MAX_ALLOCATIONS: usize = 1 << 20;
/// `done` of a reply when no record failed.
pub const ALL_DONE: u32 = u32::MAX;

/// cuBLAS values of a GEMM record: cuBLAS's and CUDA's own numbers
/// (cublasOperation_t, cudaDataType, cublasComputeType_t, cublasMath_t,
/// cublasGemmAlgo_t), so that the guest passes the program's values as they
/// are and the host hands checked ones to the real cuBLAS.
pub mod blas {
    /// `op` of a GEMM record: which cuBLAS call the program made.
    pub const SGEMM: u32 = 1;
    pub const GEMM_EX: u32 = 2;
    /// cublasOperation_t.
    pub const OP_N: u32 = 0;
    pub const OP_T: u32 = 1;
    pub const OP_C: u32 = 2;
    /// cudaDataType CUDA_R_32F: the one element type supported (4 bytes).
    pub const R_32F: u32 = 0;
    pub const R_32F_BYTES: u64 = 4;
    /// cublasComputeType_t with FP32 data: FP32, and the reduced-precision
    /// tensor-core variants (TF32, FP16, BF16 inputs, FP32 accumulation).
    pub const COMPUTE_32F: u32 = 68;
    pub const COMPUTE_32F_PEDANTIC: u32 = 69;
    pub const COMPUTE_32F_FAST_16F: u32 = 74;
    pub const COMPUTE_32F_FAST_16BF: u32 = 75;
    pub const COMPUTE_32F_FAST_TF32: u32 = 77;
    pub const FP32_COMPUTE: [u32; 5] = [
        COMPUTE_32F,
        COMPUTE_32F_PEDANTIC,
        COMPUTE_32F_FAST_16F,
        COMPUTE_32F_FAST_16BF,
        COMPUTE_32F_FAST_TF32,
    ];
    /// cublasMath_t: a mode, optionally with the
    /// DISALLOW_REDUCED_PRECISION_REDUCTION flag.
    pub const DEFAULT_MATH: u32 = 0;
    pub const TENSOR_OP_MATH: u32 = 1;
    pub const PEDANTIC_MATH: u32 = 2;
    pub const TF32_TENSOR_OP_MATH: u32 = 3;
    pub const FP32_EMULATED_BF16X9_MATH: u32 = 4;
    pub const FP64_EMULATED_FIXEDPOINT_MATH: u32 = 8;
    pub const DISALLOW_REDUCED_PRECISION_REDUCTION: u32 = 16;
    /// cublasGemmAlgo_t: CUBLAS_GEMM_DEFAULT (-1), ALGO0..23, and
    /// DEFAULT_TENSOR_OP (99) with ALGO0..15_TENSOR_OP (100..115).
    pub const GEMM_DEFAULT: i32 = -1;

    /// True for a math mode cuBLAS 13 knows.
    pub fn math_mode_ok(mode: u32) -> bool {
        matches!(
            mode & !DISALLOW_REDUCED_PRECISION_REDUCTION,
            DEFAULT_MATH
                | TENSOR_OP_MATH
                | PEDANTIC_MATH
                | TF32_TENSOR_OP_MATH
                | FP32_EMULATED_BF16X9_MATH
                | FP64_EMULATED_FIXEDPOINT_MATH
        )
    }

    /// True for an algorithm value cuBLAS 13 knows.
    pub fn algo_ok(algo: i32) -> bool {
        matches!(algo, -1..=23 | 99..=115)
    }
}

/// CUresult values the host itself answers with (the CUDA driver's numbers).
pub mod cu {
    pub const SUCCESS: u32 = 0;
    pub const INVALID_VALUE: u32 = 1;
    pub const OUT_OF_MEMORY: u32 = 2;
    pub const INVALID_HANDLE: u32 = 400;
    pub const NOT_FOUND: u32 = 500;
    pub const NOT_READY: u32 = 600;
    pub const LAUNCH_TIMEOUT: u32 = 702;
    pub const LAUNCH_FAILED: u32 = 719;
    pub const NOT_SUPPORTED: u32 = 801;
}

// ---- wire layouts --------------------------------------------------------

/// Start of every 0x03xx output (`struct vgpu_cu_reply`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyWire {
    /// CUresult of the call (of the failing record for a command buffer).
    pub result: Le32,
    /// Command buffer: records that completed before the failing one, or
    /// [`ALL_DONE`]; other calls: 0.
    pub done: Le32,
}

/// CU_DEVICE_INFO output, followed by `le32 attrs[attr_count]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfoWire {
    pub api_version: Le32,
    pub attr_count: Le32,
    pub total_mem: Le64,
    pub uuid: [u8; 16],
    pub name: [u8; 256],
}

impl Default for DeviceInfoWire {
    fn default() -> Self {
        DeviceInfoWire {
            api_version: Le32::default(),
            attr_count: Le32::default(),
            total_mem: Le64::default(),
            uuid: [0; 16],
            name: [0; 256],
        }
    }
}

/// A device range: CU_MEMCPY_DTOH payload, DTOH record body.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyWire {
    pub dptr: Le64,
    pub len: Le64,
}

/// CU_GET_FUNCTION output, followed by `param_count` [`ParamWire`]s.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionWire {
    pub function: Le64,
    pub param_count: Le32,
    /// Size of the packed parameter buffer a LAUNCH record carries.
    pub param_bytes: Le32,
}

/// One kernel parameter: where it goes in the packed parameter buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamWire {
    pub offset: Le32,
    pub size: Le32,
}

/// CU_GET_GLOBAL output.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GlobalWire {
    pub dptr: Le64,
    pub size: Le64,
}

/// CU_FUNC_ATTRIBUTE payload (output: le32 value).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuncAttrWire {
    pub function: Le64,
    pub attribute: Le32,
    pub reserved: Le32,
}

/// CU_OCCUPANCY payload (output: le32 blocks per multiprocessor).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OccupancyWire {
    pub function: Le64,
    pub block_size: Le32,
    pub dynamic_smem: Le32,
}

/// CU_STREAM_CREATE / CU_EVENT_CREATE payload (output: le64 handle).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateWire {
    pub flags: Le32,
    /// Stream priority; 0 for events.
    pub priority: Le32,
}

/// CU_EVENT_ELAPSED payload (output: f32 milliseconds).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventPairWire {
    pub start: Le64,
    pub end: Le64,
}

/// CU_MEM_INFO output.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfoWire {
    pub free: Le64,
    pub total: Le64,
}

/// CU_COMMAND_BUFFER payload header; `record_count` records follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandBufferWire {
    pub record_count: Le32,
    pub reserved: Le32,
}

/// Header of one record; `len` bytes of body follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordWire {
    pub kind: Le16,
    pub reserved: Le16,
    pub len: Le32,
    /// Stream handle; 0 is the context's default (NULL) stream.
    pub stream: Le64,
}

/// LAUNCH record body; `params_len` bytes of packed parameters follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchWire {
    pub function: Le64,
    pub grid: [Le32; 3],
    pub block: [Le32; 3],
    pub shared_mem: Le32,
    pub params_len: Le32,
}

/// DTOD record body.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DtodWire {
    pub dst: Le64,
    pub src: Le64,
    pub len: Le64,
}

/// MEMSET record body.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemsetWire {
    pub dst: Le64,
    /// Elements, not bytes.
    pub count: Le64,
    pub value: Le32,
    /// 1, 2 or 4.
    pub elem_size: Le32,
}

/// GEMM record body: C = alpha·op(A)·op(B) + beta·C, column-major, as
/// cublasSgemm_v2 / cublasGemmEx take it (values in [`blas`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GemmWire {
    pub a: Le64,
    pub b: Le64,
    pub c: Le64,
    /// [`blas::SGEMM`] or [`blas::GEMM_EX`].
    pub op: Le32,
    /// The handle's cublasMath_t when the program made the call.
    pub math_mode: Le32,
    pub transa: Le32,
    pub transb: Le32,
    /// Signed 32-bit, as cuBLAS takes them.
    pub m: Le32,
    pub n: Le32,
    pub k: Le32,
    pub lda: Le32,
    pub ldb: Le32,
    pub ldc: Le32,
    pub a_type: Le32,
    pub b_type: Le32,
    pub c_type: Le32,
    pub compute_type: Le32,
    /// cublasGemmAlgo_t (signed).
    pub algo: Le32,
    /// f32 bits (host pointer mode: the values at the time of the call).
    pub alpha: Le32,
    pub beta: Le32,
    pub reserved: Le32,
}

// SAFETY (all below): little-endian integers and byte arrays without
// padding (sizes checked below), so every bit pattern is a valid value.
unsafe impl ByteValued for ReplyWire {}
// SAFETY: as above.
unsafe impl ByteValued for DeviceInfoWire {}
// SAFETY: as above.
unsafe impl ByteValued for CopyWire {}
// SAFETY: as above.
unsafe impl ByteValued for FunctionWire {}
// SAFETY: as above.
unsafe impl ByteValued for ParamWire {}
// SAFETY: as above.
unsafe impl ByteValued for GlobalWire {}
// SAFETY: as above.
unsafe impl ByteValued for FuncAttrWire {}
// SAFETY: as above.
unsafe impl ByteValued for OccupancyWire {}
// SAFETY: as above.
unsafe impl ByteValued for CreateWire {}
// SAFETY: as above.
unsafe impl ByteValued for EventPairWire {}
// SAFETY: as above.
unsafe impl ByteValued for MemInfoWire {}
// SAFETY: as above.
unsafe impl ByteValued for CommandBufferWire {}
// SAFETY: as above.
unsafe impl ByteValued for RecordWire {}
// SAFETY: as above.
unsafe impl ByteValued for LaunchWire {}
// SAFETY: as above.
unsafe impl ByteValued for DtodWire {}
// SAFETY: as above.
unsafe impl ByteValued for MemsetWire {}
// SAFETY: as above.
unsafe impl ByteValued for GemmWire {}

pub const REPLY_SIZE: usize = std::mem::size_of::<ReplyWire>();
pub const DEVICE_INFO_SIZE: usize = std::mem::size_of::<DeviceInfoWire>();
pub const RECORD_HDR_SIZE: usize = std::mem::size_of::<RecordWire>();
pub const LAUNCH_SIZE: usize = std::mem::size_of::<LaunchWire>();
pub const CMDBUF_HDR_SIZE: usize = std::mem::size_of::<CommandBufferWire>();
const _: () = assert!(REPLY_SIZE == 8 && DEVICE_INFO_SIZE == 288);
const _: () = assert!(RECORD_HDR_SIZE == 16 && LAUNCH_SIZE == 40 && CMDBUF_HDR_SIZE == 8);
const _: () = assert!(std::mem::size_of::<CopyWire>() == 16);
const _: () = assert!(std::mem::size_of::<FunctionWire>() == 16);
const _: () = assert!(std::mem::size_of::<ParamWire>() == 8);
const _: () = assert!(std::mem::size_of::<GlobalWire>() == 16);
const _: () = assert!(std::mem::size_of::<FuncAttrWire>() == 16);
const _: () = assert!(std::mem::size_of::<OccupancyWire>() == 16);
const _: () = assert!(std::mem::size_of::<CreateWire>() == 8);
const _: () = assert!(std::mem::size_of::<EventPairWire>() == 16);
const _: () = assert!(std::mem::size_of::<MemInfoWire>() == 16);
const _: () = assert!(std::mem::size_of::<DtodWire>() == 24);
const _: () = assert!(std::mem::size_of::<MemsetWire>() == 24);
pub const GEMM_SIZE: usize = std::mem::size_of::<GemmWire>();
const _: () = assert!(GEMM_SIZE == 96);

/// Record kinds of a command buffer.
pub mod record {
    pub const LAUNCH: u16 = 1;
    pub const MEMCPY_HTOD: u16 = 2;
    pub const MEMCPY_DTOH: u16 = 3;
    pub const MEMCPY_DTOD: u16 = 4;
    pub const MEMSET: u16 = 5;
    pub const EVENT_RECORD: u16 = 6;
    pub const STREAM_WAIT_EVENT: u16 = 7;
    /// API version 2.
    pub const GEMM: u16 = 8;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The encoding is wrong: a library bug, never an application's.
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
    #[error("too large: {0}")]
    TooLarge(&'static str),
}

impl Error {
    pub fn status(&self) -> Status {
        match self {
            Error::Malformed(_) => Status::BadRequest,
            Error::TooLarge(_) => Status::TooLarge,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        e.status()
    }
}

// ---- payload parsing -----------------------------------------------------

/// A whole payload as one wire struct: exactly its size.
pub fn exact<T: ByteValued + Default>(p: &[u8], what: &'static str) -> Result<T, Error> {
    if p.len() != std::mem::size_of::<T>() {
        return Err(Error::Malformed(what));
    }
    read_obj(p, 0).ok_or(Error::Malformed(what))
}

/// A payload that is exactly one le64.
pub fn parse_u64(p: &[u8], what: &'static str) -> Result<u64, Error> {
    Ok(exact::<Le64>(p, what)?.into())
}

/// CU_MEMCPY_HTOD: le64 dptr, then the bytes.
pub fn parse_htod(p: &[u8]) -> Result<(u64, &[u8]), Error> {
    let dptr: Le64 = read_obj(p, 0).ok_or(Error::Malformed("HTOD needs 8 header bytes"))?;
    let data = p.get(8..).unwrap_or_default();
    if data.len() > MAX_COPY_LEN {
        return Err(Error::TooLarge("copy"));
    }
    Ok((dptr.into(), data))
}

/// CU_GET_FUNCTION / CU_GET_GLOBAL: le64 module, then the name (no NUL).
pub fn parse_symbol(p: &[u8]) -> Result<(u64, std::ffi::CString), Error> {
    let module: Le64 = read_obj(p, 0).ok_or(Error::Malformed("symbol needs a module"))?;
    let name = p.get(8..).unwrap_or_default();
    if name.is_empty() || name.len() > MAX_SYMBOL_LEN {
        return Err(Error::Malformed("symbol name length"));
    }
    let name = std::ffi::CString::new(name).map_err(|_| Error::Malformed("NUL in a name"))?;
    Ok((module.into(), name))
}

/// CU_MODULE_LOAD: a fatbin, cubin or PTX image. The driver reads a PTX
/// image up to its NUL, so one must end it; binary images carry their size.
pub fn parse_image(p: &[u8]) -> Result<Vec<u8>, Error> {
    if p.len() > MAX_IMAGE_LEN {
        return Err(Error::TooLarge("module image"));
    }
    if p.len() < 16 {
        return Err(Error::Malformed("module image too short"));
    }
    let mut v = p.to_vec();
    // A NUL after the image: PTX text ends there; binary images ignore it.
    v.push(0);
    Ok(v)
}

/// One parsed record of a command buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Launch {
        function: u64,
        grid: [u32; 3],
        block: [u32; 3],
        shared_mem: u32,
        params: &'a [u8],
    },
    HtoD {
        dst: u64,
        data: &'a [u8],
    },
    DtoH {
        src: u64,
        len: u64,
    },
    DtoD {
        dst: u64,
        src: u64,
        len: u64,
    },
    Memset {
        dst: u64,
        count: u64,
        value: u32,
        elem_size: u32,
    },
    EventRecord {
        event: u64,
    },
    StreamWaitEvent {
        event: u64,
    },
    Gemm(Gemm),
}

/// A parsed GEMM record. Only its structure is checked at parse time;
/// [`Gemm::validate`] and [`Gemm::ranges`] check its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gemm {
    pub op: u32,
    pub math_mode: u32,
    pub transa: u32,
    pub transb: u32,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: u64,
    pub lda: i32,
    pub b: u64,
    pub ldb: i32,
    pub c: u64,
    pub ldc: i32,
    pub a_type: u32,
    pub b_type: u32,
    pub c_type: u32,
    pub compute_type: u32,
    pub algo: i32,
    /// f32 bits.
    pub alpha: u32,
    pub beta: u32,
}

/// Bytes a column-major matrix of `rows`×`cols` elements with leading
/// dimension `ld` spans: `((cols-1)·ld + rows)·elem`, 0 when it has no
/// element; `None` when that overflows.
pub fn matrix_bytes(rows: i32, cols: i32, ld: i32, elem: u64) -> Option<u64> {
    if rows <= 0 || cols <= 0 {
        return Some(0);
    }
    u64::try_from(cols - 1)
        .ok()?
        .checked_mul(u64::try_from(ld).ok()?)?
        .checked_add(rows as u64)?
        .checked_mul(elem)
}

impl Gemm {
    /// Rows and columns of A as stored (op(A) is m×k).
    pub fn a_dims(&self) -> (i32, i32) {
        if self.transa == blas::OP_N {
            (self.m, self.k)
        } else {
            (self.k, self.m)
        }
    }

    /// Rows and columns of B as stored (op(B) is k×n).
    pub fn b_dims(&self) -> (i32, i32) {
        if self.transb == blas::OP_N {
            (self.k, self.n)
        } else {
            (self.n, self.k)
        }
    }

    /// cuBLAS's own argument rules, answered as cuBLAS answers them, as a
    /// CUresult: [`cu::INVALID_VALUE`] (CUBLAS_STATUS_INVALID_VALUE) for a
    /// bad operation, negative dimension, leading dimension below the rows
    /// or unknown mode; [`cu::NOT_SUPPORTED`] for types other than FP32
    /// data with an FP32 compute type.
    pub fn validate(&self) -> Result<(), u32> {
        if self.transa > blas::OP_C || self.transb > blas::OP_C {
            return Err(cu::INVALID_VALUE);
        }
        if self.m < 0 || self.n < 0 || self.k < 0 {
            return Err(cu::INVALID_VALUE);
        }
        let ((ra, _), (rb, _)) = (self.a_dims(), self.b_dims());
        if self.lda < ra.max(1) || self.ldb < rb.max(1) || self.ldc < self.m.max(1) {
            return Err(cu::INVALID_VALUE);
        }
        if !blas::math_mode_ok(self.math_mode) || !blas::algo_ok(self.algo) {
            return Err(cu::INVALID_VALUE);
        }
        let fp32 = [self.a_type, self.b_type, self.c_type] == [blas::R_32F; 3];
        match self.op {
            blas::SGEMM if fp32 && self.compute_type == blas::COMPUTE_32F => Ok(()),
            blas::SGEMM => Err(cu::INVALID_VALUE),
            blas::GEMM_EX if fp32 && blas::FP32_COMPUTE.contains(&self.compute_type) => Ok(()),
            blas::GEMM_EX => Err(cu::NOT_SUPPORTED),
            _ => Err(cu::INVALID_VALUE),
        }
    }

    /// The device ranges (address, bytes) the call reads or writes: A, B
    /// and C, each from its dimensions and leading dimension with checked
    /// arithmetic; an element-misaligned matrix or an extent that overflows
    /// is [`cu::INVALID_VALUE`]. Call after [`Self::validate`]. A range of
    /// 0 bytes (no element) is not read.
    pub fn ranges(&self) -> Result<[(u64, u64); 3], u32> {
        let e = blas::R_32F_BYTES;
        let ((ra, ca), (rb, cb)) = (self.a_dims(), self.b_dims());
        let span = |p: u64, rows, cols, ld| {
            let n = matrix_bytes(rows, cols, ld, e).ok_or(cu::INVALID_VALUE)?;
            if n > 0 && !p.is_multiple_of(e) {
                return Err(cu::INVALID_VALUE);
            }
            Ok((p, n))
        };
        Ok([
            span(self.a, ra, ca, self.lda)?,
            span(self.b, rb, cb, self.ldb)?,
            span(self.c, self.m, self.n, self.ldc)?,
        ])
    }

    fn from_wire(g: &GemmWire) -> Gemm {
        Gemm {
            op: g.op.into(),
            math_mode: g.math_mode.into(),
            transa: g.transa.into(),
            transb: g.transb.into(),
            m: u32::from(g.m) as i32,
            n: u32::from(g.n) as i32,
            k: u32::from(g.k) as i32,
            a: g.a.into(),
            lda: u32::from(g.lda) as i32,
            b: g.b.into(),
            ldb: u32::from(g.ldb) as i32,
            c: g.c.into(),
            ldc: u32::from(g.ldc) as i32,
            a_type: g.a_type.into(),
            b_type: g.b_type.into(),
            c_type: g.c_type.into(),
            compute_type: g.compute_type.into(),
            algo: u32::from(g.algo) as i32,
            alpha: g.alpha.into(),
            beta: g.beta.into(),
        }
    }

    fn to_wire(self) -> GemmWire {
        GemmWire {
            a: self.a.into(),
            b: self.b.into(),
            c: self.c.into(),
            op: self.op.into(),
            math_mode: self.math_mode.into(),
            transa: self.transa.into(),
            transb: self.transb.into(),
            m: (self.m as u32).into(),
            n: (self.n as u32).into(),
            k: (self.k as u32).into(),
            lda: (self.lda as u32).into(),
            ldb: (self.ldb as u32).into(),
            ldc: (self.ldc as u32).into(),
            a_type: self.a_type.into(),
            b_type: self.b_type.into(),
            c_type: self.c_type.into(),
            compute_type: self.compute_type.into(),
            algo: (self.algo as u32).into(),
            alpha: self.alpha.into(),
            beta: self.beta.into(),
            reserved: 0.into(),
        }
    }
}

/// A record and the stream it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a> {
    pub stream: u64,
    pub record: Record<'a>,
}

/// A parsed command buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandBuffer<'a> {
    pub commands: Vec<Command<'a>>,
    /// Sum of the DtoH lengths: the output the buffer needs after the reply.
    pub dtoh_bytes: u64,
}

/// Parses a whole command buffer (structure only: handles and ranges are
/// the executor's to check, record by record, as it runs them). Nothing of
/// a malformed buffer runs.
pub fn parse_command_buffer(p: &[u8]) -> Result<CommandBuffer<'_>, Error> {
    if p.len() > MAX_COMMAND_BUFFER_LEN {
        return Err(Error::TooLarge("command buffer"));
    }
    let h: CommandBufferWire =
        read_obj(p, 0).ok_or(Error::Malformed("command buffer header is 8 bytes"))?;
    if u32::from(h.reserved) != 0 {
        return Err(Error::Malformed("reserved field not zero"));
    }
    let count = u32::from(h.record_count) as usize;
    if count > MAX_RECORDS {
        return Err(Error::TooLarge("record count"));
    }
    // Every record takes at least its header: a count the bytes cannot hold
    // is refused before anything is reserved for it.
    if count > (p.len() - CMDBUF_HDR_SIZE) / RECORD_HDR_SIZE {
        return Err(Error::Malformed("more records than bytes"));
    }
    let mut commands = Vec::with_capacity(count);
    let mut off = CMDBUF_HDR_SIZE;
    let mut dtoh_bytes = 0u64;
    for _ in 0..count {
        let r: RecordWire = read_obj(p, off).ok_or(Error::Malformed("short record header"))?;
        if u16::from(r.reserved) != 0 {
            return Err(Error::Malformed("record reserved field not zero"));
        }
        off += RECORD_HDR_SIZE;
        let len = u32::from(r.len) as usize;
        let body = off
            .checked_add(len)
            .and_then(|end| p.get(off..end))
            .ok_or(Error::Malformed("short record body"))?;
        off += len;
        let record = parse_record(u16::from(r.kind), body)?;
        if let Record::DtoH { len, .. } = record {
            dtoh_bytes = dtoh_bytes.saturating_add(len);
            if dtoh_bytes > MAX_COMMAND_BUFFER_OUTPUT as u64 {
                return Err(Error::TooLarge("device-to-host bytes of one buffer"));
            }
        }
        commands.push(Command {
            stream: r.stream.into(),
            record,
        });
    }
    if off != p.len() {
        return Err(Error::Malformed("trailing bytes after the records"));
    }
    Ok(CommandBuffer {
        commands,
        dtoh_bytes,
    })
}

fn parse_record(kind: u16, body: &[u8]) -> Result<Record<'_>, Error> {
    Ok(match kind {
        record::LAUNCH => {
            let l: LaunchWire = read_obj(body, 0).ok_or(Error::Malformed("short launch"))?;
            let params = body.get(LAUNCH_SIZE..).unwrap_or_default();
            if params.len() != u32::from(l.params_len) as usize {
                return Err(Error::Malformed("launch parameter length"));
            }
            if params.len() > MAX_PARAM_BYTES {
                return Err(Error::TooLarge("kernel parameters"));
            }
            Record::Launch {
                function: l.function.into(),
                grid: l.grid.map(u32::from),
                block: l.block.map(u32::from),
                shared_mem: l.shared_mem.into(),
                params,
            }
        }
        record::MEMCPY_HTOD => {
            let (dst, data) = parse_htod(body)?;
            Record::HtoD { dst, data }
        }
        record::MEMCPY_DTOH => {
            let c = exact::<CopyWire>(body, "DTOH record is 16 bytes")?;
            Record::DtoH {
                src: c.dptr.into(),
                len: c.len.into(),
            }
        }
        record::MEMCPY_DTOD => {
            let c = exact::<DtodWire>(body, "DTOD record is 24 bytes")?;
            Record::DtoD {
                dst: c.dst.into(),
                src: c.src.into(),
                len: c.len.into(),
            }
        }
        record::MEMSET => {
            let m = exact::<MemsetWire>(body, "MEMSET record is 24 bytes")?;
            let elem_size = u32::from(m.elem_size);
            if !matches!(elem_size, 1 | 2 | 4) {
                return Err(Error::Malformed("memset element size"));
            }
            Record::Memset {
                dst: m.dst.into(),
                count: m.count.into(),
                value: m.value.into(),
                elem_size,
            }
        }
        record::EVENT_RECORD => Record::EventRecord {
            event: parse_u64(body, "EVENT_RECORD record is 8 bytes")?,
        },
        record::STREAM_WAIT_EVENT => Record::StreamWaitEvent {
            event: parse_u64(body, "STREAM_WAIT_EVENT record is 8 bytes")?,
        },
        record::GEMM => {
            let g = exact::<GemmWire>(body, "GEMM record is 96 bytes")?;
            if u32::from(g.reserved) != 0 {
                return Err(Error::Malformed("GEMM reserved field not zero"));
            }
            if !matches!(u32::from(g.op), blas::SGEMM | blas::GEMM_EX) {
                return Err(Error::Malformed("unknown GEMM op"));
            }
            Record::Gemm(Gemm::from_wire(&g))
        }
        _ => return Err(Error::Malformed("unknown record kind")),
    })
}

/// Appends one record to a command buffer under construction (the guest
/// library's encoder; the tests use it against [`parse_command_buffer`]).
pub fn encode_record(buf: &mut Vec<u8>, stream: u64, rec: &Record<'_>) {
    let (kind, body): (u16, Vec<u8>) = match rec {
        Record::Launch {
            function,
            grid,
            block,
            shared_mem,
            params,
        } => {
            let mut b = LaunchWire {
                function: (*function).into(),
                grid: grid.map(Le32::from),
                block: block.map(Le32::from),
                shared_mem: (*shared_mem).into(),
                params_len: (params.len() as u32).into(),
            }
            .as_slice()
            .to_vec();
            b.extend_from_slice(params);
            (record::LAUNCH, b)
        }
        Record::HtoD { dst, data } => {
            let mut b = dst.to_le_bytes().to_vec();
            b.extend_from_slice(data);
            (record::MEMCPY_HTOD, b)
        }
        Record::DtoH { src, len } => (
            record::MEMCPY_DTOH,
            CopyWire {
                dptr: (*src).into(),
                len: (*len).into(),
            }
            .as_slice()
            .to_vec(),
        ),
        Record::DtoD { dst, src, len } => (
            record::MEMCPY_DTOD,
            DtodWire {
                dst: (*dst).into(),
                src: (*src).into(),
                len: (*len).into(),
            }
            .as_slice()
            .to_vec(),
        ),
        Record::Memset {
            dst,
            count,
            value,
            elem_size,
        } => (
            record::MEMSET,
            MemsetWire {
                dst: (*dst).into(),
                count: (*count).into(),
                value: (*value).into(),
                elem_size: (*elem_size).into(),
            }
            .as_slice()
            .to_vec(),
        ),
        Record::EventRecord { event } => (record::EVENT_RECORD, event.to_le_bytes().to_vec()),
        Record::StreamWaitEvent { event } => {
            (record::STREAM_WAIT_EVENT, event.to_le_bytes().to_vec())
        }
        Record::Gemm(g) => (record::GEMM, g.to_wire().as_slice().to_vec()),
    };
    let hdr = RecordWire {
        kind: kind.into(),
        reserved: 0.into(),
        len: (body.len() as u32).into(),
        stream: stream.into(),
    };
    buf.extend_from_slice(hdr.as_slice());
    buf.extend_from_slice(&body);
}

/// Bytes [`encode_record`] appends for `rec`.
pub fn record_size(rec: &Record<'_>) -> usize {
    RECORD_HDR_SIZE
        + match rec {
            Record::Launch { params, .. } => LAUNCH_SIZE + params.len(),
            Record::HtoD { data, .. } => 8 + data.len(),
            Record::DtoH { .. } => 16,
            Record::DtoD { .. } | Record::Memset { .. } => 24,
            Record::EventRecord { .. } | Record::StreamWaitEvent { .. } => 8,
            Record::Gemm(_) => GEMM_SIZE,
        }
}

/// A command buffer's payload: the header for `count` records, then the
/// records as [`encode_record`] wrote them.
pub fn command_buffer_payload(count: u32, records: &[u8]) -> Vec<u8> {
    let mut p = CommandBufferWire {
        record_count: count.into(),
        reserved: 0.into(),
    }
    .as_slice()
    .to_vec();
    p.extend_from_slice(records);
    p
}

/// Reply header followed by `data`.
pub fn reply(result: u32, done: u32, data: &[u8]) -> Vec<u8> {
    let mut v = ReplyWire {
        result: result.into(),
        done: done.into(),
    }
    .as_slice()
    .to_vec();
    v.extend_from_slice(data);
    v
}

/// The parameter layout of a kernel (from `cuFuncGetParamInfo`) and the size
/// of its packed parameter buffer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParamLayout {
    pub params: Vec<(u32, u32)>,
    pub bytes: u32,
}

impl ParamLayout {
    /// Builds a layout, refusing one whose parameters do not fit the limit.
    pub fn new(params: Vec<(u32, u32)>) -> Result<Self, Error> {
        let mut bytes = 0u32;
        for &(off, size) in &params {
            let end = off
                .checked_add(size)
                .ok_or(Error::TooLarge("kernel parameters"))?;
            bytes = bytes.max(end);
        }
        if bytes as usize > MAX_PARAM_BYTES || params.len() > MAX_FUNCTION_PARAMS {
            return Err(Error::TooLarge("kernel parameters"));
        }
        Ok(ParamLayout { params, bytes })
    }

    /// The GET_FUNCTION output after the reply header.
    pub fn encode(&self, function: u64) -> Vec<u8> {
        let mut v = FunctionWire {
            function: function.into(),
            param_count: (self.params.len() as u32).into(),
            param_bytes: self.bytes.into(),
        }
        .as_slice()
        .to_vec();
        for &(off, size) in &self.params {
            v.extend_from_slice(
                ParamWire {
                    offset: off.into(),
                    size: size.into(),
                }
                .as_slice(),
            );
        }
        v
    }

    /// Decodes a GET_FUNCTION output (after the reply header).
    pub fn decode(b: &[u8]) -> Result<(u64, Self), Error> {
        let f: FunctionWire = read_obj(b, 0).ok_or(Error::Malformed("short function"))?;
        let n = u32::from(f.param_count) as usize;
        if n > MAX_FUNCTION_PARAMS {
            return Err(Error::TooLarge("kernel parameters"));
        }
        let mut params = Vec::with_capacity(n);
        for i in 0..n {
            let p: ParamWire =
                read_obj(b, 16 + 8 * i).ok_or(Error::Malformed("short parameter list"))?;
            params.push((p.offset.into(), p.size.into()));
        }
        let layout = ParamLayout::new(params)?;
        if layout.bytes != u32::from(f.param_bytes) {
            return Err(Error::Malformed("parameter bytes disagree with the list"));
        }
        Ok((f.function.into(), layout))
    }
}

// ---- per-VM tables ---------------------------------------------------------

/// The device allocations of one VM, ordered by address, so that a range is
/// checked against the one allocation that contains its start.
#[derive(Debug, Default)]
pub struct Allocations {
    /// base -> (size, owning module for a module global, None for MEM_ALLOC).
    map: BTreeMap<u64, (u64, Option<u64>)>,
}

impl Allocations {
    pub fn insert(&mut self, base: u64, size: u64, module: Option<u64>) {
        self.map.insert(base, (size, module));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// True when `[ptr, ptr + len)` lies inside one allocation (a zero-length
    /// range must still start inside one or at its end).
    pub fn contains(&self, ptr: u64, len: u64) -> bool {
        let Some((&base, &(size, _))) = self.map.range(..=ptr).next_back() else {
            return false;
        };
        let (Some(end), Some(want)) = (base.checked_add(size), ptr.checked_add(len)) else {
            return false;
        };
        want <= end && (len > 0 || ptr <= end) && (len == 0 || ptr < end)
    }

    /// Removes the MEM_ALLOC allocation at exactly `base` and returns its size.
    pub fn remove(&mut self, base: u64) -> Option<u64> {
        match self.map.get(&base) {
            Some(&(size, None)) => {
                self.map.remove(&base);
                Some(size)
            }
            _ => None,
        }
    }

    /// Forgets the globals of `module` (it is being unloaded).
    pub fn remove_module(&mut self, module: u64) {
        self.map.retain(|_, (_, m)| *m != Some(module));
    }

    /// Every MEM_ALLOC base (for teardown).
    pub fn drain_allocated(&mut self) -> Vec<u64> {
        let v = self
            .map
            .iter()
            .filter(|(_, (_, m))| m.is_none())
            .map(|(&b, _)| b)
            .collect();
        self.map.clear();
        v
    }
}

/// A table of one kind of object, by handle.
#[derive(Debug)]
pub struct Table<T> {
    items: HashMap<u64, T>,
    max: usize,
}

impl<T> Table<T> {
    pub fn new(max: usize) -> Self {
        Table {
            items: HashMap::new(),
            max,
        }
    }
    pub fn is_full(&self) -> bool {
        self.items.len() >= self.max
    }
    pub fn insert(&mut self, h: u64, v: T) {
        self.items.insert(h, v);
    }
    pub fn get(&self, h: u64) -> Option<&T> {
        self.items.get(&h)
    }
    pub fn remove(&mut self, h: u64) -> Option<T> {
        self.items.remove(&h)
    }
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.items.values()
    }
    pub fn retain(&mut self, f: impl FnMut(&u64, &mut T) -> bool) {
        self.items.retain(f)
    }
    pub fn drain(&mut self) -> Vec<T> {
        self.items.drain().map(|(_, v)| v).collect()
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// A kernel of a loaded module: the raw function `F`, its module handle and
/// its parameter layout.
#[derive(Debug, Clone)]
pub struct Function<F> {
    pub raw: F,
    pub module: u64,
    pub layout: ParamLayout,
}

/// The CUDA API objects of one VM. `M`, `F`, `S`, `E` are the executor's raw
/// module, function, stream and event. Handles come from one counter that
/// never goes back within a worker (bit 23 set, so that they never equal a
/// 0x02xx remoting handle of the same generation).
#[derive(Debug)]
pub struct ApiTables<M, F, S, E> {
    next: u64,
    pub allocations: Allocations,
    pub modules: Table<M>,
    pub functions: Table<Function<F>>,
    pub streams: Table<S>,
    pub events: Table<E>,
}

/// The bit that separates CUDA API handles from remoting handles.
pub const API_HANDLE_BIT: u64 = 1 << 23;

impl<M, F, S, E> ApiTables<M, F, S, E> {
    /// `base` carries the VM id and worker generation in its high bits (the
    /// remoting handle base of `worker/`); the low 23 bits count.
    pub fn new(base: u64) -> Self {
        ApiTables {
            next: (base & !0x7f_ffff) | API_HANDLE_BIT | 1,
            allocations: Allocations::default(),
            modules: Table::new(MAX_MODULES),
            functions: Table::new(MAX_FUNCTIONS),
            streams: Table::new(MAX_STREAMS),
            events: Table::new(MAX_EVENTS),
        }
    }

    /// Forgets every object (their context is gone); the handle counter is
    /// kept, so no old handle names a new object.
    pub fn clear(&mut self) {
        self.allocations = Allocations::default();
        self.modules.drain();
        self.functions.drain();
        self.streams.drain();
        self.events.drain();
    }

    /// A fresh handle, or `None` when this worker's handle space is used up.
    pub fn next_handle(&mut self) -> Option<u64> {
        if self.next & 0x7f_ffff == 0x7f_ffff {
            return None;
        }
        let h = self.next;
        self.next += 1;
        Some(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, u32) {
        let mut b = Vec::new();
        let params = [7u8; 12];
        let recs = [
            Record::Launch {
                function: 9,
                grid: [2, 1, 1],
                block: [64, 1, 1],
                shared_mem: 16,
                params: &params,
            },
            Record::HtoD {
                dst: 0x1000,
                data: &[1, 2, 3],
            },
            Record::DtoH {
                src: 0x1000,
                len: 3,
            },
            Record::DtoD {
                dst: 0x2000,
                src: 0x1000,
                len: 3,
            },
            Record::Memset {
                dst: 0x2000,
                count: 4,
                value: 0xab,
                elem_size: 1,
            },
            Record::EventRecord { event: 5 },
            Record::StreamWaitEvent { event: 5 },
            Record::Gemm(sgemm()),
        ];
        let mut size = CMDBUF_HDR_SIZE;
        for (i, r) in recs.iter().enumerate() {
            encode_record(&mut b, i as u64, r);
            size += record_size(r);
        }
        let p = command_buffer_payload(recs.len() as u32, &b);
        assert_eq!(p.len(), size);
        (p, recs.len() as u32)
    }

    /// C (3×2) = A (3×4) · B (4×2), column-major, tight leading dimensions.
    fn sgemm() -> Gemm {
        Gemm {
            op: blas::SGEMM,
            m: 3,
            n: 2,
            k: 4,
            a: 0x1000,
            lda: 3,
            b: 0x2000,
            ldb: 4,
            c: 0x3000,
            ldc: 3,
            compute_type: blas::COMPUTE_32F,
            algo: blas::GEMM_DEFAULT,
            alpha: 1.5f32.to_bits(),
            beta: 0.5f32.to_bits(),
            ..Default::default()
        }
    }

    #[test]
    fn gemm_record_roundtrip_and_structure() {
        let (p, n) = sample();
        let cb = parse_command_buffer(&p).unwrap();
        assert_eq!(cb.commands[n as usize - 1].record, Record::Gemm(sgemm()));
        // Negative dimensions travel as they are (the host answers them).
        let mut g = sgemm();
        g.m = -5;
        let mut b = Vec::new();
        encode_record(&mut b, 3, &Record::Gemm(g));
        assert_eq!(b.len(), record_size(&Record::Gemm(g)));
        let cb = command_buffer_payload(1, &b);
        assert_eq!(
            parse_command_buffer(&cb).unwrap().commands[0].record,
            Record::Gemm(g)
        );
        // Reserved field, unknown op, wrong length: malformed.
        let body = RECORD_HDR_SIZE + CMDBUF_HDR_SIZE;
        let mut q = cb.clone();
        q[body + GEMM_SIZE - 4] = 1;
        assert!(parse_command_buffer(&q).is_err(), "reserved");
        let mut q = cb.clone();
        q[body + 24..body + 28].copy_from_slice(&3u32.to_le_bytes());
        assert!(parse_command_buffer(&q).is_err(), "op 3");
        let mut q = cb.clone();
        q.push(0);
        q[CMDBUF_HDR_SIZE + 4..CMDBUF_HDR_SIZE + 8]
            .copy_from_slice(&(GEMM_SIZE as u32 + 1).to_le_bytes());
        assert!(parse_command_buffer(&q).is_err(), "97-byte body");
    }

    #[test]
    fn gemm_arguments_as_cublas_checks_them() {
        assert_eq!(sgemm().validate(), Ok(()));
        let bad = |f: &dyn Fn(&mut Gemm)| {
            let mut g = sgemm();
            f(&mut g);
            g.validate()
        };
        let inval = Err(cu::INVALID_VALUE);
        assert_eq!(bad(&|g| g.m = -1), inval);
        assert_eq!(bad(&|g| g.k = -1), inval);
        assert_eq!(bad(&|g| g.lda = 2), inval, "lda < m");
        assert_eq!(bad(&|g| g.ldc = 0), inval);
        assert_eq!(bad(&|g| g.transa = 3), inval);
        // Transposed A is stored k×m: lda must be at least k.
        assert_eq!(bad(&|g| g.transa = blas::OP_T), inval);
        assert_eq!(
            bad(&|g| {
                g.transa = blas::OP_T;
                g.lda = 4
            }),
            Ok(())
        );
        // m = 0: leading dimensions are still at least 1.
        assert_eq!(
            bad(&|g| {
                g.m = 0;
                g.ldc = 1
            }),
            Ok(())
        );
        assert_eq!(bad(&|g| g.math_mode = 5), inval);
        assert_eq!(
            bad(&|g| g.math_mode =
                blas::TF32_TENSOR_OP_MATH | blas::DISALLOW_REDUCED_PRECISION_REDUCTION),
            Ok(())
        );
        assert_eq!(bad(&|g| g.algo = 50), inval);
        assert_eq!(
            bad(&|g| g.compute_type = blas::COMPUTE_32F_FAST_TF32),
            inval
        );
        let ex = |compute, ty| {
            let mut g = sgemm();
            g.op = blas::GEMM_EX;
            g.compute_type = compute;
            g.b_type = ty;
            g.validate()
        };
        assert_eq!(ex(blas::COMPUTE_32F_FAST_TF32, blas::R_32F), Ok(()));
        assert_eq!(ex(blas::COMPUTE_32F, blas::R_32F), Ok(()));
        assert_eq!(
            ex(64 /* COMPUTE_16F */, blas::R_32F),
            Err(cu::NOT_SUPPORTED)
        );
        assert_eq!(
            ex(70 /* COMPUTE_64F */, blas::R_32F),
            Err(cu::NOT_SUPPORTED)
        );
        assert_eq!(
            ex(blas::COMPUTE_32F, 2 /* CUDA_R_16F */),
            Err(cu::NOT_SUPPORTED)
        );
    }

    #[test]
    fn gemm_ranges_from_leading_dimensions() {
        let g = Gemm { lda: 5, ..sgemm() };
        // A: 4 columns of ld 5, the last with 3 rows: (3·5 + 3)·4 bytes.
        assert_eq!(g.ranges(), Ok([(0x1000, 72), (0x2000, 32), (0x3000, 24)]));
        // Transposed B (n×k = 2×4), ldb 2.
        let g = Gemm {
            transb: blas::OP_T,
            ldb: 2,
            ..sgemm()
        };
        assert_eq!(g.ranges().unwrap()[1], (0x2000, 32));
        // k = 0 reads neither A nor B.
        let g = Gemm { k: 0, ..sgemm() };
        assert_eq!(g.ranges().unwrap()[0].1, 0);
        assert_eq!(g.ranges().unwrap()[1].1, 0);
        // Misaligned float pointer.
        assert_eq!(
            Gemm {
                c: 0x3002,
                ..sgemm()
            }
            .ranges(),
            Err(cu::INVALID_VALUE)
        );
        // The largest i32 values still give an exact u64 extent, which the
        // allocation check then refuses.
        let big = matrix_bytes(i32::MAX, i32::MAX, i32::MAX, 4).unwrap();
        assert_eq!(
            big,
            ((i32::MAX as u64 - 1) * i32::MAX as u64 + i32::MAX as u64) * 4
        );
        assert_eq!(matrix_bytes(0, 7, 1, 4), Some(0));
        assert_eq!(matrix_bytes(2, 3, -1, 4), None);
        let mut a = Allocations::default();
        a.insert(0x1000, 72, None);
        assert!(a.contains(0x1000, 72));
        assert!(!a.contains(0x1000, big));
    }

    #[test]
    fn command_buffer_roundtrip() {
        let (p, n) = sample();
        let cb = parse_command_buffer(&p).unwrap();
        assert_eq!(cb.commands.len(), n as usize);
        assert_eq!(cb.dtoh_bytes, 3);
        assert_eq!(cb.commands[1].stream, 1);
        assert_eq!(
            cb.commands[1].record,
            Record::HtoD {
                dst: 0x1000,
                data: &[1, 2, 3]
            }
        );
        assert!(matches!(
            cb.commands[0].record,
            Record::Launch {
                function: 9,
                shared_mem: 16,
                ..
            }
        ));
    }

    #[test]
    fn command_buffer_rejects() {
        let (p, _) = sample();
        // Every truncation fails, never a panic.
        for n in 0..p.len() {
            assert!(parse_command_buffer(&p[..n]).is_err(), "prefix {n}");
        }
        let mut q = p.clone();
        q.push(0);
        assert!(parse_command_buffer(&q).is_err(), "trailing byte");
        let mut q = p.clone();
        q[4] = 1;
        assert!(parse_command_buffer(&q).is_err(), "reserved");
        let mut q = p.clone();
        q[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_command_buffer(&q).unwrap_err().status(),
            Status::TooLarge
        );
        let mut q = p.clone();
        q[0..4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(parse_command_buffer(&q).is_err(), "count beyond bytes");
        let mut q = p.clone();
        q[8..10].copy_from_slice(&99u16.to_le_bytes());
        assert!(parse_command_buffer(&q).is_err(), "unknown kind");
        let mut q = p.clone();
        q[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_command_buffer(&q).is_err(), "huge record length");
        // Launch whose params_len disagrees with its body.
        let mut q = p.clone();
        q[8 + 16 + 36..8 + 16 + 40].copy_from_slice(&11u32.to_le_bytes());
        assert!(parse_command_buffer(&q).is_err());
        // Memset with an element size of 3.
        let mut b = Vec::new();
        encode_record(
            &mut b,
            0,
            &Record::Memset {
                dst: 0,
                count: 1,
                value: 0,
                elem_size: 3,
            },
        );
        assert!(parse_command_buffer(&command_buffer_payload(1, &b)).is_err());
        // Too many DtoH bytes.
        let mut b = Vec::new();
        encode_record(
            &mut b,
            0,
            &Record::DtoH {
                src: 0,
                len: MAX_COMMAND_BUFFER_OUTPUT as u64 + 1,
            },
        );
        assert_eq!(
            parse_command_buffer(&command_buffer_payload(1, &b))
                .unwrap_err()
                .status(),
            Status::TooLarge
        );
        // Too many parameter bytes.
        let big = vec![0u8; MAX_PARAM_BYTES + 1];
        let mut b = Vec::new();
        encode_record(
            &mut b,
            0,
            &Record::Launch {
                function: 1,
                grid: [1; 3],
                block: [1; 3],
                shared_mem: 0,
                params: &big,
            },
        );
        assert_eq!(
            parse_command_buffer(&command_buffer_payload(1, &b))
                .unwrap_err()
                .status(),
            Status::TooLarge
        );
        // Empty buffer is fine.
        assert_eq!(
            parse_command_buffer(&command_buffer_payload(0, &[]))
                .unwrap()
                .commands
                .len(),
            0
        );
    }

    #[test]
    fn allocation_ranges() {
        let mut a = Allocations::default();
        a.insert(0x1000, 0x100, None);
        a.insert(0x2000, 0x10, Some(7));
        assert!(a.contains(0x1000, 0x100));
        assert!(a.contains(0x10ff, 1));
        assert!(a.contains(0x1100, 0), "zero bytes at the end");
        assert!(!a.contains(0x10ff, 2), "crosses the end");
        assert!(!a.contains(0x0fff, 1), "before the first");
        assert!(!a.contains(0x1100, 1), "between allocations");
        assert!(!a.contains(0x1000, u64::MAX), "overflow");
        assert!(!a.contains(u64::MAX, 2));
        assert!(a.contains(0x2000, 0x10));
        assert_eq!(a.remove(0x2000), None, "a module global is not freed");
        assert_eq!(a.remove(0x1001), None, "only by base");
        assert_eq!(a.remove(0x1000), Some(0x100));
        assert!(!a.contains(0x1000, 1));
        a.remove_module(7);
        assert!(a.is_empty());
    }

    #[test]
    fn payloads() {
        assert_eq!(parse_u64(&5u64.to_le_bytes(), "x"), Ok(5));
        assert!(parse_u64(&[0; 7], "x").is_err());
        let mut p = 0x10u64.to_le_bytes().to_vec();
        p.extend(b"vadd");
        let (m, n) = parse_symbol(&p).unwrap();
        assert_eq!((m, n.as_bytes()), (0x10, &b"vadd"[..]));
        assert!(parse_symbol(&p[..8]).is_err());
        p.push(0);
        assert!(parse_symbol(&p).is_err());
        assert!(parse_image(&[1; 8]).is_err());
        assert_eq!(parse_image(&[1; 16]).unwrap().len(), 17);
        assert_eq!(
            parse_image(&vec![1; MAX_IMAGE_LEN + 1])
                .unwrap_err()
                .status(),
            Status::TooLarge
        );
        let (d, data) = parse_htod(&p).unwrap();
        assert_eq!((d, data.len()), (0x10, 5));
    }

    #[test]
    fn param_layout_roundtrip() {
        let l = ParamLayout::new(vec![(0, 8), (8, 4), (16, 8)]).unwrap();
        assert_eq!(l.bytes, 24);
        let enc = l.encode(42);
        assert_eq!(ParamLayout::decode(&enc), Ok((42, l)));
        assert!(ParamLayout::decode(&enc[..enc.len() - 1]).is_err());
        assert!(ParamLayout::new(vec![(u32::MAX, 2)]).is_err());
        assert!(ParamLayout::new(vec![(32760, 8)]).is_err());
    }

    #[test]
    fn handles_never_repeat_and_run_out() {
        let mut t: ApiTables<(), (), (), ()> = ApiTables::new((3 << 32) | (2 << 24) | 5);
        let a = t.next_handle().unwrap();
        assert_eq!(a, (3 << 32) | (2 << 24) | API_HANDLE_BIT | 1);
        assert!(t.next_handle().unwrap() > a);
        t.next = (t.next & !0x7f_ffff) | 0x7f_fffe;
        assert!(t.next_handle().is_some());
        assert!(t.next_handle().is_none());
    }
}
