//! The vgpu device contract v1 (see `docs/protocol.md`): the one Rust
//! definition of the config space, the request and response headers, the
//! opcodes and the status codes. Nothing here knows about vhost or virtqueues.

use std::fmt;
use std::str::FromStr;

use vm_memory::endian::{Le16, Le32, Le64};
use vm_memory::ByteValued;

/// Private virtio device ID of vgpu (PCI device 0x1040 + 63 = 0x107F).
pub const VIRTIO_ID_VGPU: u32 = 63;
/// Size of the device config space and of the legacy stub's register file view.
pub const CONFIG_SIZE: usize = 64;
/// "VGPU" read as a little-endian u32.
pub const MAGIC: u32 = 0x5550_4756;
/// Contract version 1.0 (major in the high half).
pub const VERSION: u32 = 0x0001_0000;
/// Version field of a v1 request header.
pub const REQ_VERSION: u16 = 1;

pub const CFG_MAGIC: usize = 0x00;
pub const CFG_VERSION: usize = 0x04;
pub const CFG_POOL_ID: usize = 0x08;
pub const CFG_PRIORITY: usize = 0x0C;
pub const CFG_VM_ID: usize = 0x10;
/// Health of the GPU serving the VM ([`GpuState`]); host-changed, announced
/// by a config-change notification.
pub const CFG_GPU_STATE: usize = 0x14;
/// How many times that GPU's executor was rebuilt after a fault: when it
/// moves, device state the guest held there (remoting handles, device
/// memory) is gone.
pub const CFG_GPU_EPOCH: usize = 0x18;

pub const REQ_HDR_SIZE: usize = 24;
pub const RESP_HDR_SIZE: usize = 40;

/// Layout of the GET_INFO output (see docs/protocol.md).
pub const INFO_SIZE: usize = 96;
pub const INFO_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid priority '{0}' (expected 0/1/2 or low/medium/high)")]
    InvalidPriority(String),
    #[error("invalid pool '{0}' (expected one letter A-Z)")]
    InvalidPool(String),
    #[error("buffer of {got} bytes is shorter than the {need} bytes needed")]
    Short { got: usize, need: usize },
}

/// Scheduling priority of a VM. Ordered: `High > Medium > Low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Priority {
    Low = 0,
    Medium = 1,
    High = 2,
}

impl Priority {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Priority::Low),
            1 => Some(Priority::Medium),
            2 => Some(Priority::High),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "0" | "low" => Ok(Priority::Low),
            "1" | "medium" | "med" => Ok(Priority::Medium),
            "2" | "high" => Ok(Priority::High),
            _ => Err(Error::InvalidPriority(s.to_string())),
        }
    }
}

/// A pool is named by one ASCII capital letter ('A', 'B', ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolId(u8);

impl PoolId {
    /// Pool A: where a VM goes when nothing else is said.
    pub const DEFAULT: PoolId = PoolId(b'A');

    pub fn new(letter: u8) -> Result<Self, Error> {
        let up = letter.to_ascii_uppercase();
        if up.is_ascii_uppercase() {
            Ok(PoolId(up))
        } else {
            Err(Error::InvalidPool(
                String::from_utf8_lossy(&[letter]).into_owned(),
            ))
        }
    }
    pub fn letter(self) -> u8 {
        self.0
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0 as char)
    }
}

impl FromStr for PoolId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().as_bytes() {
            [c] => PoolId::new(*c),
            _ => Err(Error::InvalidPool(s.to_string())),
        }
    }
}

/// What the guest reads from config space (and from the vgpu-stub BAR0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    pub pool: PoolId,
    pub priority: Priority,
    pub vm_id: u32,
    /// The health of the GPU that serves the VM's pool.
    pub health: GpuHealth,
}

/// The GPU's side of config space: its state and recovery epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuHealth {
    pub state: GpuState,
    /// Rebuilds of the GPU's executor after faults (wraps at 2^32).
    pub epoch: u32,
}

impl DeviceConfig {
    pub fn wire(&self) -> ConfigSpace {
        ConfigSpace {
            magic: MAGIC.into(),
            version: VERSION.into(),
            pool_id: u32::from(self.pool.letter()).into(),
            priority: (self.priority as u32).into(),
            vm_id: self.vm_id.into(),
            gpu_state: (self.health.state as u32).into(),
            gpu_epoch: self.health.epoch.into(),
            reserved: Default::default(),
        }
    }

    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        to_array(&self.wire())
    }
}

/// Defines a wire enum once: its Rust variants, its raw values and the
/// names the C header gives them (tests/uapi_header.rs checks every one).
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident: $repr:ty, $from:ident {
        $($(#[$vmeta:meta])* $variant:ident = $value:literal => $c:literal,)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Every value, in contract order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn $from(v: $repr) -> Option<Self> {
                match v {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// The name of the value in the C uapi header.
            pub fn c_name(self) -> &'static str {
                match self {
                    $($name::$variant => $c,)*
                }
            }
        }
    };
}

/// SGEMM_F32: bit 31 of the payload's `m` word asks for TF32 tensor-core
/// math (10-bit mantissa inputs, FP32 accumulation); without it the result
/// is full FP32. The other 31 bits are m.
pub const SGEMM_TF32: u32 = 1 << 31;

wire_enum! {
    /// Request opcodes (docs/protocol.md).
    Opcode: u16, from_u16 {
        Ping = 0x0001 => "VGPU_OP_PING",
        GetInfo = 0x0002 => "VGPU_OP_GET_INFO",
        BusyWait = 0x0003 => "VGPU_OP_BUSY_WAIT",
        ScalarAddI32 = 0x0100 => "VGPU_OP_SCALAR_ADD_I32",
        VectorAddF32 = 0x0101 => "VGPU_OP_VECTOR_ADD_F32",
        SaxpyF32 = 0x0102 => "VGPU_OP_SAXPY_F32",
        SgemmF32 = 0x0103 => "VGPU_OP_SGEMM_F32",
        // CUDA remoting (docs/protocol.md, "CUDA remoting").
        MemAlloc = 0x0201 => "VGPU_OP_MEM_ALLOC",
        MemFree = 0x0202 => "VGPU_OP_MEM_FREE",
        MemcpyHtoD = 0x0203 => "VGPU_OP_MEMCPY_HTOD",
        MemcpyDtoH = 0x0204 => "VGPU_OP_MEMCPY_DTOH",
        ModuleLoad = 0x0205 => "VGPU_OP_MODULE_LOAD",
        ModuleUnload = 0x0206 => "VGPU_OP_MODULE_UNLOAD",
        Launch = 0x0207 => "VGPU_OP_LAUNCH",
        Synchronize = 0x0208 => "VGPU_OP_SYNCHRONIZE",
        // CUDA API (docs/protocol.md, "CUDA API"): raw device pointers and
        // command buffers, for the guest CUDA library.
        CuDeviceInfo = 0x0300 => "VGPU_OP_CU_DEVICE_INFO",
        CuMemAlloc = 0x0301 => "VGPU_OP_CU_MEM_ALLOC",
        CuMemFree = 0x0302 => "VGPU_OP_CU_MEM_FREE",
        CuMemcpyHtoD = 0x0303 => "VGPU_OP_CU_MEMCPY_HTOD",
        CuMemcpyDtoH = 0x0304 => "VGPU_OP_CU_MEMCPY_DTOH",
        CuModuleLoad = 0x0305 => "VGPU_OP_CU_MODULE_LOAD",
        CuModuleUnload = 0x0306 => "VGPU_OP_CU_MODULE_UNLOAD",
        CuGetFunction = 0x0307 => "VGPU_OP_CU_GET_FUNCTION",
        CuGetGlobal = 0x0308 => "VGPU_OP_CU_GET_GLOBAL",
        CuFuncAttribute = 0x0309 => "VGPU_OP_CU_FUNC_ATTRIBUTE",
        CuOccupancy = 0x030A => "VGPU_OP_CU_OCCUPANCY",
        CuStreamCreate = 0x030B => "VGPU_OP_CU_STREAM_CREATE",
        CuStreamDestroy = 0x030C => "VGPU_OP_CU_STREAM_DESTROY",
        CuEventCreate = 0x030D => "VGPU_OP_CU_EVENT_CREATE",
        CuEventDestroy = 0x030E => "VGPU_OP_CU_EVENT_DESTROY",
        CuEventElapsed = 0x030F => "VGPU_OP_CU_EVENT_ELAPSED",
        CuMemInfo = 0x0310 => "VGPU_OP_CU_MEM_INFO",
        CuCommandBuffer = 0x0311 => "VGPU_OP_CU_COMMAND_BUFFER",
        // CUDA API version 2: cuBLAS (GEMM records in command buffers).
        CuBlasInit = 0x0312 => "VGPU_OP_CU_BLAS_INIT",
    }
}

impl Opcode {
    /// True for the calls that run guest code in the VM's CUDA worker: the
    /// CUDA remoting (0x02xx) and the CUDA API (0x03xx).
    pub fn is_remoting(self) -> bool {
        matches!((self as u16) & 0xff00, 0x0200 | 0x0300)
    }

    /// True for the CUDA API calls (0x03xx).
    pub fn is_cuda_api(self) -> bool {
        (self as u16) & 0xff00 == 0x0300
    }
}

wire_enum! {
    /// Response status codes.
    Status: u32, from_u32 {
        Ok = 0 => "VGPU_S_OK",
        BadRequest = 1 => "VGPU_S_BAD_REQUEST",
        Unsupported = 2 => "VGPU_S_UNSUPPORTED",
        TooLarge = 3 => "VGPU_S_TOO_LARGE",
        NoResources = 4 => "VGPU_S_NO_RESOURCES",
        DeviceError = 5 => "VGPU_S_DEVICE_ERROR",
        Timeout = 6 => "VGPU_S_TIMEOUT",
        Cancelled = 7 => "VGPU_S_CANCELLED",
        NotFound = 8 => "VGPU_S_NOT_FOUND",
        /// Reserved for policy refusals (a request the host forbids this VM);
        /// v1 defines it so that guests handle it, and nothing sends it yet.
        Denied = 9 => "VGPU_S_DENIED",
    }
}

wire_enum! {
    /// Health of the GPU serving a VM: config space `gpu_state`
    /// (docs/protocol.md, docs/gpu.md).
    GpuState: u32, from_u32 {
        /// Serving requests.
        Ok = 0 => "VGPU_GPU_OK",
        /// Reserved for a GPU that serves with reduced function; v1 defines
        /// it so that guests handle it, and nothing sends it yet.
        Degraded = 1 => "VGPU_GPU_DEGRADED",
        /// Lost (fell off the bus, reset, uncorrectable ECC, or its executor
        /// cannot be rebuilt): every request answers DEVICE_ERROR while the
        /// daemon retries bringing it back.
        Failed = 2 => "VGPU_GPU_FAILED",
        /// A fault ended its executor (a sticky error in the daemon's own
        /// context, a panic) and a new one is being built; requests answer
        /// DEVICE_ERROR meanwhile.
        Recovering = 3 => "VGPU_GPU_RECOVERING",
    }
}

// `wire_enum!` owns the derives of the enums it defines.
#[allow(clippy::derivable_impls)]
impl Default for GpuState {
    fn default() -> Self {
        GpuState::Ok
    }
}

impl GpuState {
    /// True when requests run (OK, DEGRADED); otherwise they answer
    /// DEVICE_ERROR at once.
    pub fn serves(self) -> bool {
        matches!(self, GpuState::Ok | GpuState::Degraded)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GpuState::Ok => "ok",
            GpuState::Degraded => "degraded",
            GpuState::Failed => "failed",
            GpuState::Recovering => "recovering",
        }
    }
}

impl fmt::Display for GpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `struct vgpu_req_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReqHdr {
    pub version: u16,
    pub opcode: u16,
    pub flags: u32,
    pub tag: u64,
    pub payload_len: u32,
    pub reserved: u32,
}

impl ReqHdr {
    pub fn new(opcode: u16, tag: u64, payload_len: u32) -> Self {
        ReqHdr {
            version: REQ_VERSION,
            opcode,
            flags: 0,
            tag,
            payload_len,
            reserved: 0,
        }
    }

    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let w: ReqHdrWire = read_obj(b, 0).ok_or(Error::Short {
            got: b.len(),
            need: REQ_HDR_SIZE,
        })?;
        Ok(ReqHdr {
            version: w.version.into(),
            opcode: w.opcode.into(),
            flags: w.flags.into(),
            tag: w.tag.into(),
            payload_len: w.payload_len.into(),
            reserved: w.reserved.into(),
        })
    }

    pub fn encode(&self) -> [u8; REQ_HDR_SIZE] {
        to_array(&ReqHdrWire {
            version: self.version.into(),
            opcode: self.opcode.into(),
            flags: self.flags.into(),
            tag: self.tag.into(),
            payload_len: self.payload_len.into(),
            reserved: self.reserved.into(),
        })
    }
}

/// `struct vgpu_resp_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RespHdr {
    pub status: u32,
    pub output_len: u32,
    pub tag: u64,
    pub dispatch_seq: u64,
    pub queue_ns: u64,
    pub exec_ns: u64,
}

impl RespHdr {
    pub fn encode(&self) -> [u8; RESP_HDR_SIZE] {
        to_array(&RespHdrWire {
            status: self.status.into(),
            output_len: self.output_len.into(),
            tag: self.tag.into(),
            dispatch_seq: self.dispatch_seq.into(),
            queue_ns: self.queue_ns.into(),
            exec_ns: self.exec_ns.into(),
        })
    }

    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let w: RespHdrWire = read_obj(b, 0).ok_or(Error::Short {
            got: b.len(),
            need: RESP_HDR_SIZE,
        })?;
        Ok(RespHdr {
            status: w.status.into(),
            output_len: w.output_len.into(),
            tag: w.tag.into(),
            dispatch_seq: w.dispatch_seq.into(),
            queue_ns: w.queue_ns.into(),
            exec_ns: w.exec_ns.into(),
        })
    }
}

/// Executor kind reported by GET_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ExecutorKind {
    Cpu = 0,
    Cuda = 1,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Cpu => "cpu",
            ExecutorKind::Cuda => "cuda",
        }
    }
}

/// GET_INFO output: `struct vgpu_info` (96 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub executor: ExecutorKind,
    pub gpu_index: u32,
    pub memory_total: u64,
    /// Compute capability as major << 16 | minor; 0 on the CPU executor.
    pub compute_capability: u32,
    /// Execution limit of one request, in milliseconds.
    pub exec_limit_ms: u32,
    pub name: String,
}

impl DeviceInfo {
    pub fn encode(&self) -> [u8; INFO_SIZE] {
        // The name is NUL-padded and always NUL-terminated.
        let mut name = [0u8; INFO_NAME_LEN];
        let src = self.name.as_bytes();
        let n = src.len().min(INFO_NAME_LEN - 1);
        name[..n].copy_from_slice(&src[..n]);
        to_array(&InfoWire {
            executor: (self.executor as u32).into(),
            gpu_index: self.gpu_index.into(),
            memory_total: self.memory_total.into(),
            compute_capability: self.compute_capability.into(),
            exec_limit_ms: self.exec_limit_ms.into(),
            reserved: [0; 8],
            name,
        })
    }

    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let w: InfoWire = read_obj(b, 0).ok_or(Error::Short {
            got: b.len(),
            need: INFO_SIZE,
        })?;
        let end = w.name.iter().position(|&c| c == 0).unwrap_or(INFO_NAME_LEN);
        Ok(DeviceInfo {
            executor: if u32::from(w.executor) == ExecutorKind::Cuda as u32 {
                ExecutorKind::Cuda
            } else {
                ExecutorKind::Cpu
            },
            gpu_index: w.gpu_index.into(),
            memory_total: w.memory_total.into(),
            compute_capability: w.compute_capability.into(),
            exec_limit_ms: w.exec_limit_ms.into(),
            name: String::from_utf8_lossy(w.name.get(..end).unwrap_or_default()).into_owned(),
        })
    }
}

// ---- wire layouts ----------------------------------------------------------
//
// The structs of the C header, field for field, in little-endian types: the
// encoders above fill them and the bytes go out as they are. Each has no
// padding (checked below), which is what makes it `ByteValued`.

/// `struct virtio_vgpu_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    pub magic: Le32,
    pub version: Le32,
    pub pool_id: Le32,
    pub priority: Le32,
    pub vm_id: Le32,
    pub gpu_state: Le32,
    pub gpu_epoch: Le32,
    /// `__u8 reserved[36]` in the header: the same bytes.
    pub reserved: [Le32; 9],
}

/// `struct vgpu_req_hdr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ReqHdrWire {
    pub version: Le16,
    pub opcode: Le16,
    pub flags: Le32,
    pub tag: Le64,
    pub payload_len: Le32,
    pub reserved: Le32,
}

/// `struct vgpu_resp_hdr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RespHdrWire {
    pub status: Le32,
    pub output_len: Le32,
    pub tag: Le64,
    pub dispatch_seq: Le64,
    pub queue_ns: Le64,
    pub exec_ns: Le64,
}

/// `struct vgpu_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct InfoWire {
    pub executor: Le32,
    pub gpu_index: Le32,
    pub memory_total: Le64,
    pub compute_capability: Le32,
    pub exec_limit_ms: Le32,
    pub reserved: [u8; 8],
    pub name: [u8; INFO_NAME_LEN],
}

impl Default for InfoWire {
    fn default() -> Self {
        InfoWire {
            executor: Le32::default(),
            gpu_index: Le32::default(),
            memory_total: Le64::default(),
            compute_capability: Le32::default(),
            exec_limit_ms: Le32::default(),
            reserved: [0; 8],
            name: [0; INFO_NAME_LEN],
        }
    }
}

/// `struct vgpu_submit`: the guest character device's ioctl argument
/// (`VGPU_IOC_SUBMIT`), for guest programs written in Rust. Native-endian,
/// as every ioctl structure; `resp` is the response header as the device
/// wrote it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitIoctl {
    pub opcode: u16,
    pub reserved0: u16,
    pub flags: u32,
    pub tag: u64,
    pub payload: u64,
    pub payload_len: u32,
    pub output_cap: u32,
    pub output: u64,
    pub timeout_ms: u32,
    pub output_len: u32,
    pub resp: RespHdrWire,
    pub reserved: [u64; 4],
}

/// `VGPU_IOC_SUBMIT`: `_IOWR(0xF7, 0x01, struct vgpu_submit)`.
pub const VGPU_IOC_SUBMIT: u32 =
    (3 << 30) | ((std::mem::size_of::<SubmitIoctl>() as u32) << 16) | (0xF7 << 8) | 0x01;

// SAFETY: plain old data of little-endian integers and byte arrays, with no
// padding (the sizes below equal the sums of the fields), so every bit
// pattern is a valid value.
unsafe impl ByteValued for ConfigSpace {}
// SAFETY: as above.
unsafe impl ByteValued for ReqHdrWire {}
// SAFETY: as above.
unsafe impl ByteValued for RespHdrWire {}
// SAFETY: as above.
unsafe impl ByteValued for InfoWire {}
// SAFETY: integers and a wire struct, no padding (size checked below).
unsafe impl ByteValued for SubmitIoctl {}

const _: () = assert!(std::mem::size_of::<ConfigSpace>() == CONFIG_SIZE);
const _: () = assert!(std::mem::size_of::<ReqHdrWire>() == REQ_HDR_SIZE);
const _: () = assert!(std::mem::size_of::<RespHdrWire>() == RESP_HDR_SIZE);
const _: () = assert!(std::mem::size_of::<InfoWire>() == INFO_SIZE);
const _: () = assert!(std::mem::size_of::<SubmitIoctl>() == 120);

/// Reads a wire struct at `off` of `b`; `None` when `b` is too short.
/// (Unlike `ByteValued::from_slice` it needs no alignment.)
pub fn read_obj<T: ByteValued + Default>(b: &[u8], off: usize) -> Option<T> {
    let src = b.get(off..off.checked_add(std::mem::size_of::<T>())?)?;
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(src);
    Some(v)
}

/// A wire struct as the fixed-size array of its bytes.
fn to_array<T: ByteValued, const N: usize>(v: &T) -> [u8; N] {
    let mut b = [0u8; N];
    let src = v.as_slice();
    let n = src.len().min(N);
    b[..n].copy_from_slice(&src[..n]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let cfg = DeviceConfig {
            pool: "b".parse().unwrap(),
            priority: Priority::High,
            vm_id: 7,
            health: GpuHealth::default(),
        };
        let b = cfg.to_bytes();
        assert_eq!(&b[0..4], b"VGPU");
        assert_eq!(&b[4..8], &[0, 0, 1, 0]);
        assert_eq!(b[8], b'B');
        assert_eq!(b[12], 2);
        assert_eq!(b[16], 7);
        assert!(b[0x14..].iter().all(|&x| x == 0));
        let failed = DeviceConfig {
            health: GpuHealth {
                state: GpuState::Failed,
                epoch: 0x0102_0304,
            },
            ..cfg
        }
        .to_bytes();
        assert_eq!(&failed[CFG_GPU_STATE..CFG_GPU_STATE + 4], &[2, 0, 0, 0]);
        assert_eq!(&failed[CFG_GPU_EPOCH..CFG_GPU_EPOCH + 4], &[4, 3, 2, 1]);
        assert!(failed[0x1C..].iter().all(|&x| x == 0));
        for &s in GpuState::ALL {
            assert_eq!(GpuState::from_u32(s as u32), Some(s));
        }
    }

    #[test]
    fn req_roundtrip_and_short() {
        let h = ReqHdr {
            version: 1,
            opcode: 0x0101,
            flags: 3,
            tag: 0x1122_3344_5566_7788,
            payload_len: 99,
            reserved: 5,
        };
        assert_eq!(ReqHdr::decode(&h.encode()).unwrap(), h);
        assert_eq!(
            ReqHdr::decode(&[0u8; 23]),
            Err(Error::Short { got: 23, need: 24 })
        );
    }

    #[test]
    fn resp_roundtrip() {
        let r = RespHdr {
            status: 6,
            output_len: 4,
            tag: 9,
            dispatch_seq: 10,
            queue_ns: 11,
            exec_ns: 12,
        };
        let b = r.encode();
        assert_eq!(&b[8..16], &9u64.to_le_bytes());
        assert_eq!(RespHdr::decode(&b).unwrap(), r);
    }

    #[test]
    fn priority_and_pool_parse() {
        assert_eq!("HIGH".parse::<Priority>().unwrap(), Priority::High);
        assert_eq!("0".parse::<Priority>().unwrap(), Priority::Low);
        assert!("7".parse::<Priority>().is_err());
        assert_eq!("a".parse::<PoolId>().unwrap().letter(), b'A');
        assert!("AB".parse::<PoolId>().is_err());
        assert!("1".parse::<PoolId>().is_err());
        assert!(Priority::High > Priority::Low);
    }

    #[test]
    fn info_roundtrip_truncates_name() {
        let i = DeviceInfo {
            executor: ExecutorKind::Cuda,
            gpu_index: 1,
            memory_total: 80 << 30,
            compute_capability: 9 << 16,
            exec_limit_ms: 10_000,
            name: "x".repeat(100),
        };
        let d = DeviceInfo::decode(&i.encode()).unwrap();
        assert_eq!(d.name.len(), INFO_NAME_LEN - 1);
        assert_eq!(d.memory_total, 80 << 30);
    }

    #[test]
    fn opcode_status_values() {
        assert_eq!(Opcode::from_u16(0x0100), Some(Opcode::ScalarAddI32));
        assert_eq!(Opcode::from_u16(0x0200), None);
        assert_eq!(Opcode::from_u16(0x0103), Some(Opcode::SgemmF32));
        for &op in Opcode::ALL {
            assert_eq!(Opcode::from_u16(op as u16), Some(op));
        }
        assert!(Opcode::Launch.is_remoting());
        assert!(!Opcode::SgemmF32.is_remoting());
        assert!(Opcode::CuCommandBuffer.is_remoting() && Opcode::CuCommandBuffer.is_cuda_api());
        assert!(!Opcode::Launch.is_cuda_api());
        for v in 0..10 {
            assert_eq!(Status::from_u32(v).unwrap() as u32, v);
        }
        assert_eq!(Status::from_u32(10), None);
    }
}
