//! The vgpu device contract v1 (see `docs/protocol.md`): the one Rust
//! definition of the config space, the request and response headers, the
//! opcodes and the status codes. Nothing here knows about vhost or virtqueues.

use std::fmt;
use std::str::FromStr;

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
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Medium, Priority::High];

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
}

impl DeviceConfig {
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        put_u32(&mut b, CFG_MAGIC, MAGIC);
        put_u32(&mut b, CFG_VERSION, VERSION);
        put_u32(&mut b, CFG_POOL_ID, self.pool.letter() as u32);
        put_u32(&mut b, CFG_PRIORITY, self.priority as u32);
        put_u32(&mut b, CFG_VM_ID, self.vm_id);
        b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Opcode {
    Ping = 0x0001,
    GetInfo = 0x0002,
    BusyWait = 0x0003,
    ScalarAddI32 = 0x0100,
    VectorAddF32 = 0x0101,
    SaxpyF32 = 0x0102,
    SgemmF32 = 0x0103,
    // CUDA remoting (docs/protocol.md, "CUDA remoting").
    MemAlloc = 0x0201,
    MemFree = 0x0202,
    MemcpyHtoD = 0x0203,
    MemcpyDtoH = 0x0204,
    ModuleLoad = 0x0205,
    ModuleUnload = 0x0206,
    Launch = 0x0207,
    Synchronize = 0x0208,
}

impl Opcode {
    /// Every opcode, for tests and tables.
    pub const ALL: [Opcode; 15] = [
        Opcode::Ping,
        Opcode::GetInfo,
        Opcode::BusyWait,
        Opcode::ScalarAddI32,
        Opcode::VectorAddF32,
        Opcode::SaxpyF32,
        Opcode::SgemmF32,
        Opcode::MemAlloc,
        Opcode::MemFree,
        Opcode::MemcpyHtoD,
        Opcode::MemcpyDtoH,
        Opcode::ModuleLoad,
        Opcode::ModuleUnload,
        Opcode::Launch,
        Opcode::Synchronize,
    ];

    /// True for the CUDA remoting calls (0x02xx).
    pub fn is_remoting(self) -> bool {
        (self as u16) & 0xff00 == 0x0200
    }

    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0x0001 => Opcode::Ping,
            0x0002 => Opcode::GetInfo,
            0x0003 => Opcode::BusyWait,
            0x0100 => Opcode::ScalarAddI32,
            0x0101 => Opcode::VectorAddF32,
            0x0102 => Opcode::SaxpyF32,
            0x0103 => Opcode::SgemmF32,
            0x0201 => Opcode::MemAlloc,
            0x0202 => Opcode::MemFree,
            0x0203 => Opcode::MemcpyHtoD,
            0x0204 => Opcode::MemcpyDtoH,
            0x0205 => Opcode::ModuleLoad,
            0x0206 => Opcode::ModuleUnload,
            0x0207 => Opcode::Launch,
            0x0208 => Opcode::Synchronize,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    BadRequest = 1,
    Unsupported = 2,
    TooLarge = 3,
    NoResources = 4,
    DeviceError = 5,
    Timeout = 6,
    Cancelled = 7,
    NotFound = 8,
    Denied = 9,
}

impl Status {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::BadRequest,
            2 => Status::Unsupported,
            3 => Status::TooLarge,
            4 => Status::NoResources,
            5 => Status::DeviceError,
            6 => Status::Timeout,
            7 => Status::Cancelled,
            8 => Status::NotFound,
            9 => Status::Denied,
            _ => return None,
        })
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
        let b: &[u8; REQ_HDR_SIZE] = b
            .get(..REQ_HDR_SIZE)
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::Short {
                got: b.len(),
                need: REQ_HDR_SIZE,
            })?;
        Ok(ReqHdr {
            version: u16::from_le_bytes([b[0], b[1]]),
            opcode: u16::from_le_bytes([b[2], b[3]]),
            flags: get_u32(b, 4),
            tag: get_u64(b, 8),
            payload_len: get_u32(b, 16),
            reserved: get_u32(b, 20),
        })
    }

    pub fn encode(&self) -> [u8; REQ_HDR_SIZE] {
        let mut b = [0u8; REQ_HDR_SIZE];
        b[0..2].copy_from_slice(&self.version.to_le_bytes());
        b[2..4].copy_from_slice(&self.opcode.to_le_bytes());
        put_u32(&mut b, 4, self.flags);
        put_u64(&mut b, 8, self.tag);
        put_u32(&mut b, 16, self.payload_len);
        put_u32(&mut b, 20, self.reserved);
        b
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
        let mut b = [0u8; RESP_HDR_SIZE];
        put_u32(&mut b, 0, self.status);
        put_u32(&mut b, 4, self.output_len);
        put_u64(&mut b, 8, self.tag);
        put_u64(&mut b, 16, self.dispatch_seq);
        put_u64(&mut b, 24, self.queue_ns);
        put_u64(&mut b, 32, self.exec_ns);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let b: &[u8; RESP_HDR_SIZE] = b
            .get(..RESP_HDR_SIZE)
            .and_then(|s| s.try_into().ok())
            .ok_or(Error::Short {
                got: b.len(),
                need: RESP_HDR_SIZE,
            })?;
        Ok(RespHdr {
            status: get_u32(b, 0),
            output_len: get_u32(b, 4),
            tag: get_u64(b, 8),
            dispatch_seq: get_u64(b, 16),
            queue_ns: get_u64(b, 24),
            exec_ns: get_u64(b, 32),
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
        let mut b = [0u8; INFO_SIZE];
        put_u32(&mut b, 0x00, self.executor as u32);
        put_u32(&mut b, 0x04, self.gpu_index);
        put_u64(&mut b, 0x08, self.memory_total);
        put_u32(&mut b, 0x10, self.compute_capability);
        put_u32(&mut b, 0x14, self.exec_limit_ms);
        // Name is NUL-padded and always NUL-terminated.
        let name = self.name.as_bytes();
        let n = name.len().min(INFO_NAME_LEN - 1);
        b[0x20..0x20 + n].copy_from_slice(&name[..n]);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let b: &[u8; INFO_SIZE] =
            b.get(..INFO_SIZE)
                .and_then(|s| s.try_into().ok())
                .ok_or(Error::Short {
                    got: b.len(),
                    need: INFO_SIZE,
                })?;
        let name_bytes = &b[0x20..0x20 + INFO_NAME_LEN];
        let end = name_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(INFO_NAME_LEN);
        Ok(DeviceInfo {
            executor: if get_u32(b, 0) == 1 {
                ExecutorKind::Cuda
            } else {
                ExecutorKind::Cpu
            },
            gpu_index: get_u32(b, 0x04),
            memory_total: get_u64(b, 0x08),
            compute_capability: get_u32(b, 0x10),
            exec_limit_ms: get_u32(b, 0x14),
            name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
        })
    }
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

// Callers pass fixed-size arrays with constant offsets inside them.
fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
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
        };
        let b = cfg.to_bytes();
        assert_eq!(&b[0..4], b"VGPU");
        assert_eq!(&b[4..8], &[0, 0, 1, 0]);
        assert_eq!(b[8], b'B');
        assert_eq!(b[12], 2);
        assert_eq!(b[16], 7);
        assert!(b[0x14..].iter().all(|&x| x == 0));
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
        for op in Opcode::ALL {
            assert_eq!(Opcode::from_u16(op as u16), Some(op));
        }
        assert!(Opcode::Launch.is_remoting());
        assert!(!Opcode::SgemmF32.is_remoting());
        for v in 0..10 {
            assert_eq!(Status::from_u32(v).unwrap() as u32, v);
        }
        assert_eq!(Status::from_u32(10), None);
    }
}
