//! CUDA remoting (opcodes 0x02xx, `docs/protocol.md, "CUDA remoting"`), the part that
//! needs no GPU: payload parsing, the per-VM handle tables and the per-VM
//! device-memory quota. The CUDA executor keeps one [`VmTables`] per VM and
//! stores its raw CUDA objects in them; everything here is plain Rust and is
//! unit-tested without a GPU.

use std::collections::HashMap;
use std::ffi::CString;

use vm_memory::endian::{Le32, Le64};
use vm_memory::ByteValued;

use crate::protocol::{read_obj, Status};

/// Largest MODULE_LOAD payload (PTX text).
pub const MAX_PTX_LEN: usize = 16 << 20;
/// Longest kernel name in a LAUNCH.
pub const MAX_NAME_LEN: usize = 256;
/// Most parameters of one LAUNCH.
pub const MAX_PARAMS: usize = 64;
/// Most bytes of all parameter values of one LAUNCH (CUDA's classic 4 KiB).
pub const MAX_PARAM_BYTES: usize = 4096;
/// Most live device buffers of one VM.
pub const MAX_BUFFERS: usize = 65536;
/// Most loaded modules of one VM.
pub const MAX_MODULES: usize = 256;

/// Parameter kind: le64 buffer handle, passed as the buffer's device address.
pub const PARAM_BUFFER: u32 = 0;
/// Parameter kind: raw bytes passed as they are.
pub const PARAM_BYTES: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
    #[error("payload too large: {0}")]
    TooLarge(&'static str),
    #[error("no such handle {0:#x}")]
    NotFound(u64),
    #[error("quota exceeded: {used} + {want} > {limit} bytes")]
    Quota { used: u64, want: u64, limit: u64 },
    #[error("too many {0}")]
    TooMany(&'static str),
    #[error("range {offset}+{len} outside a {size}-byte buffer")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl Error {
    /// The status a guest sees for this error.
    pub fn status(&self) -> Status {
        match self {
            Error::Malformed(_) | Error::OutOfRange { .. } => Status::BadRequest,
            Error::TooLarge(_) => Status::TooLarge,
            Error::NotFound(_) => Status::NotFound,
            Error::Quota { .. } | Error::TooMany(_) => Status::NoResources,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        e.status()
    }
}

// ---- wire layouts (docs/protocol.md, the C header's structs) -------------

/// MEM_ALLOC payload.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AllocWire {
    pub size: Le64,
}

/// MEM_FREE and MODULE_UNLOAD payload.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct HandleWire {
    pub handle: Le64,
}

/// MEMCPY_HTOD header (the data follows).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct HtodWire {
    pub handle: Le64,
    pub offset: Le64,
}

/// MEMCPY_DTOH payload.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DtohWire {
    pub handle: Le64,
    pub offset: Le64,
    pub len: Le64,
}

/// `struct vgpu_launch`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchWire {
    pub module: Le64,
    pub grid: [Le32; 3],
    pub block: [Le32; 3],
    pub shared_mem_bytes: Le32,
    pub name_len: Le32,
    pub param_count: Le32,
    pub reserved: Le32,
}

/// `struct vgpu_launch_param`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchParamWire {
    pub kind: Le32,
    pub size: Le32,
}

// SAFETY: little-endian integers without padding (sizes checked below);
// every bit pattern is a valid value.
unsafe impl ByteValued for AllocWire {}
// SAFETY: as above.
unsafe impl ByteValued for HandleWire {}
// SAFETY: as above.
unsafe impl ByteValued for HtodWire {}
// SAFETY: as above.
unsafe impl ByteValued for DtohWire {}
// SAFETY: as above.
unsafe impl ByteValued for LaunchWire {}
// SAFETY: as above.
unsafe impl ByteValued for LaunchParamWire {}

/// Size of the fixed LAUNCH header (`struct vgpu_launch`).
pub const LAUNCH_HDR_SIZE: usize = std::mem::size_of::<LaunchWire>();
/// Size of a parameter header (`struct vgpu_launch_param`).
pub const PARAM_HDR_SIZE: usize = std::mem::size_of::<LaunchParamWire>();
/// Size of the MEMCPY_HTOD header before the data.
pub const HTOD_HDR_SIZE: usize = std::mem::size_of::<HtodWire>();
const _: () = assert!(LAUNCH_HDR_SIZE == 48 && PARAM_HDR_SIZE == 8 && HTOD_HDR_SIZE == 16);
const _: () = assert!(std::mem::size_of::<DtohWire>() == 24);

/// Longest LAUNCH payload the limits allow.
pub const MAX_LAUNCH_LEN: usize =
    LAUNCH_HDR_SIZE + MAX_NAME_LEN + MAX_PARAMS * PARAM_HDR_SIZE + MAX_PARAM_BYTES;

/// A whole payload as one wire struct: exactly its size.
fn exact<T: ByteValued + Default>(p: &[u8], what: &'static str) -> Result<T, Error> {
    if p.len() != std::mem::size_of::<T>() {
        return Err(Error::Malformed(what));
    }
    read_obj(p, 0).ok_or(Error::Malformed(what))
}

/// MEM_ALLOC payload: le64 size (at least 1).
pub fn parse_alloc(p: &[u8]) -> Result<u64, Error> {
    match exact::<AllocWire>(p, "MEM_ALLOC takes 8 bytes")?
        .size
        .into()
    {
        0 => Err(Error::Malformed("zero-size allocation")),
        n => Ok(n),
    }
}

/// MEM_FREE / MODULE_UNLOAD payload: le64 handle.
pub fn parse_handle(p: &[u8]) -> Result<u64, Error> {
    Ok(exact::<HandleWire>(p, "handle payload takes 8 bytes")?
        .handle
        .into())
}

/// MEMCPY_HTOD header: le64 handle, le64 offset (the data follows).
pub fn parse_htod_header(p: &[u8]) -> Result<(u64, u64), Error> {
    let h: HtodWire =
        read_obj(p, 0).ok_or(Error::Malformed("MEMCPY_HTOD needs 16 header bytes"))?;
    Ok((h.handle.into(), h.offset.into()))
}

/// MEMCPY_DTOH payload: le64 handle, le64 offset, le64 len.
pub fn parse_dtoh(p: &[u8]) -> Result<(u64, u64, u64), Error> {
    let d = exact::<DtohWire>(p, "MEMCPY_DTOH takes 24 bytes")?;
    Ok((d.handle.into(), d.offset.into(), d.len.into()))
}

/// MODULE_LOAD payload: PTX text, optionally NUL-terminated (trailing NULs
/// are dropped), no NUL inside.
pub fn parse_ptx(p: &[u8]) -> Result<CString, Error> {
    if p.len() > MAX_PTX_LEN {
        return Err(Error::TooLarge("PTX"));
    }
    let end = p.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    if end == 0 {
        return Err(Error::Malformed("empty PTX"));
    }
    CString::new(&p[..end]).map_err(|_| Error::Malformed("NUL inside PTX"))
}

/// Checks that `len` bytes at `offset` lie inside a `size`-byte buffer.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), Error> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// One kernel parameter of a LAUNCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    /// A buffer handle of the calling VM; the kernel gets its device address.
    Buffer(u64),
    /// Bytes passed as they are (scalars, structs).
    Bytes(Vec<u8>),
}

impl Param {
    /// Size of the value the kernel receives.
    pub fn size(&self) -> usize {
        match self {
            Param::Buffer(_) => 8,
            Param::Bytes(b) => b.len(),
        }
    }
}

/// A parsed LAUNCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub module: u64,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
    pub name: CString,
    pub params: Vec<Param>,
}

/// LAUNCH payload: `struct vgpu_launch` (48 bytes), `name_len` bytes of kernel
/// name, then `param_count` times (`struct vgpu_launch_param`, `size` bytes),
/// packed.
pub fn parse_launch(p: &[u8]) -> Result<Launch, Error> {
    if p.len() > MAX_LAUNCH_LEN {
        return Err(Error::TooLarge("LAUNCH payload"));
    }
    let h: LaunchWire = read_obj(p, 0).ok_or(Error::Malformed("LAUNCH header is 48 bytes"))?;
    let grid = h.grid.map(u32::from);
    let block = h.block.map(u32::from);
    let name_len = u32::from(h.name_len) as usize;
    let param_count = u32::from(h.param_count) as usize;
    if u32::from(h.reserved) != 0 {
        return Err(Error::Malformed("reserved field not zero"));
    }
    if grid.contains(&0) || block.contains(&0) {
        return Err(Error::Malformed("zero grid or block dimension"));
    }
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(Error::Malformed("kernel name length"));
    }
    if param_count > MAX_PARAMS {
        return Err(Error::TooLarge("parameter count"));
    }
    let name = p
        .get(LAUNCH_HDR_SIZE..LAUNCH_HDR_SIZE + name_len)
        .ok_or(Error::Malformed("short kernel name"))?;
    let name = CString::new(name).map_err(|_| Error::Malformed("NUL in kernel name"))?;
    let mut off = LAUNCH_HDR_SIZE + name_len;
    let mut params = Vec::with_capacity(param_count);
    let mut total = 0usize;
    for _ in 0..param_count {
        let ph: LaunchParamWire = read_obj(p, off).ok_or(Error::Malformed("short payload"))?;
        let size = u32::from(ph.size) as usize;
        off += PARAM_HDR_SIZE;
        total = total.saturating_add(size);
        if size > MAX_PARAM_BYTES || total > MAX_PARAM_BYTES {
            return Err(Error::TooLarge("parameter bytes"));
        }
        let val = p
            .get(off..off + size)
            .ok_or(Error::Malformed("short parameter"))?;
        off += size;
        params.push(match u32::from(ph.kind) {
            PARAM_BUFFER if size == 8 => Param::Buffer(parse_handle(val)?),
            PARAM_BUFFER => return Err(Error::Malformed("buffer parameter size is not 8")),
            PARAM_BYTES if size > 0 => Param::Bytes(val.to_vec()),
            PARAM_BYTES => return Err(Error::Malformed("empty parameter")),
            _ => return Err(Error::Malformed("unknown parameter kind")),
        });
    }
    if off != p.len() {
        return Err(Error::Malformed("trailing bytes after the parameters"));
    }
    Ok(Launch {
        module: h.module.into(),
        grid,
        block,
        shared_mem_bytes: h.shared_mem_bytes.into(),
        name,
        params,
    })
}

/// Encodes a LAUNCH payload (the guest side of [`parse_launch`]; used by tests
/// and benchmarks).
pub fn encode_launch(l: &Launch) -> Vec<u8> {
    let name = l.name.as_bytes();
    let hdr = LaunchWire {
        module: l.module.into(),
        grid: l.grid.map(Le32::from),
        block: l.block.map(Le32::from),
        shared_mem_bytes: l.shared_mem_bytes.into(),
        name_len: (name.len() as u32).into(),
        param_count: (l.params.len() as u32).into(),
        reserved: 0.into(),
    };
    let mut p = hdr.as_slice().to_vec();
    p.extend(name);
    for prm in &l.params {
        let (kind, bytes) = match prm {
            Param::Buffer(h) => (PARAM_BUFFER, h.to_le_bytes().to_vec()),
            Param::Bytes(b) => (PARAM_BYTES, b.clone()),
        };
        let ph = LaunchParamWire {
            kind: kind.into(),
            size: (bytes.len() as u32).into(),
        };
        p.extend(ph.as_slice());
        p.extend(bytes);
    }
    p
}

/// Device-memory accounting of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub used: u64,
    /// Local memory per thread whose stack reservation is charged already
    /// (beyond the context's own, which every context has): the driver grows
    /// the reservation by itself for a kernel that needs more, and never
    /// shrinks it (`cuda/meter.rs`, `charge_stack`).
    pub stack_per_thread: u64,
}

impl Quota {
    pub fn new(limit: u64) -> Self {
        Quota {
            limit,
            used: 0,
            stack_per_thread: 0,
        }
    }

    /// Takes `want` bytes, or fails without changing anything.
    pub fn charge(&mut self, want: u64) -> Result<(), Error> {
        match self.used.checked_add(want) {
            Some(total) if total <= self.limit => {
                self.used = total;
                Ok(())
            }
            _ => Err(Error::Quota {
                used: self.used,
                want,
                limit: self.limit,
            }),
        }
    }

    pub fn release(&mut self, n: u64) {
        self.used = self.used.saturating_sub(n);
    }
}

/// A device buffer of a VM: whatever the executor stores plus its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffer<B> {
    pub dev: B,
    pub size: u64,
}

/// The handle tables and quota of one VM. `B` is the executor's device buffer
/// (a device pointer), `M` its module. Buffer and module handles share one
/// counter that never goes back, so a handle is never reused in the VM's life:
/// after a context rebuild (see [`VmTables::reset`]) every old handle stays
/// NOT_FOUND instead of naming something new. A handle carries the VM id in
/// its high 32 bits, so one VM's handles never name anything in another VM's
/// table (NOT_FOUND there) and a mix-up is visible in logs.
#[derive(Debug)]
pub struct VmTables<B, M> {
    next: u64,
    buffers: HashMap<u64, Buffer<B>>,
    modules: HashMap<u64, M>,
    pub quota: Quota,
}

impl<B, M> VmTables<B, M> {
    pub fn new(vm_id: u32, quota: u64) -> Self {
        VmTables {
            next: (u64::from(vm_id) << 32) | 1,
            buffers: HashMap::new(),
            modules: HashMap::new(),
            quota: Quota::new(quota),
        }
    }

    /// Continues the handle counter at `counter` (low 32 bits), e.g. for a
    /// new worker generation.
    pub fn start_at(&mut self, counter: u64) {
        self.next = (self.next & !0xffff_ffff) | (counter & 0xffff_ffff).max(1);
    }

    fn next_handle(&mut self) -> Result<u64, Error> {
        let h = self.next;
        if h & 0xffff_ffff == 0xffff_ffff {
            return Err(Error::TooMany("handles in this VM's life"));
        }
        self.next += 1;
        Ok(h)
    }

    /// Checks the quota and the buffer count, and charges `size` bytes. The
    /// caller then allocates and calls [`VmTables::add_buffer`], or
    /// [`Quota::release`] if the allocation failed.
    pub fn reserve(&mut self, size: u64) -> Result<(), Error> {
        if self.buffers.len() >= MAX_BUFFERS {
            return Err(Error::TooMany("buffers"));
        }
        if self.next & 0xffff_ffff == 0xffff_ffff {
            return Err(Error::TooMany("handles in this VM's life"));
        }
        self.quota.charge(size)
    }

    /// Records a buffer already charged with [`VmTables::reserve`].
    pub fn add_buffer(&mut self, size: u64, dev: B) -> Result<u64, Error> {
        let h = self.next_handle()?;
        self.buffers.insert(h, Buffer { dev, size });
        Ok(h)
    }

    pub fn buffer(&self, h: u64) -> Result<&Buffer<B>, Error> {
        self.buffers.get(&h).ok_or(Error::NotFound(h))
    }

    /// Removes a buffer and gives its bytes back to the quota.
    pub fn free_buffer(&mut self, h: u64) -> Result<Buffer<B>, Error> {
        let b = self.buffers.remove(&h).ok_or(Error::NotFound(h))?;
        self.quota.release(b.size);
        Ok(b)
    }

    pub fn can_add_module(&self) -> Result<(), Error> {
        if self.modules.len() >= MAX_MODULES || self.next & 0xffff_ffff == 0xffff_ffff {
            Err(Error::TooMany("modules"))
        } else {
            Ok(())
        }
    }

    pub fn add_module(&mut self, m: M) -> Result<u64, Error> {
        let h = self.next_handle()?;
        self.modules.insert(h, m);
        Ok(h)
    }

    pub fn module(&self, h: u64) -> Result<&M, Error> {
        self.modules.get(&h).ok_or(Error::NotFound(h))
    }

    pub fn remove_module(&mut self, h: u64) -> Result<M, Error> {
        self.modules.remove(&h).ok_or(Error::NotFound(h))
    }

    /// Forgets every buffer and module (their context is gone or going) and
    /// returns them; the quota is fully released, the handle counter kept.
    pub fn reset(&mut self) -> (Vec<Buffer<B>>, Vec<M>) {
        self.quota.used = 0;
        self.quota.stack_per_thread = 0;
        (
            self.buffers.drain().map(|(_, b)| b).collect(),
            self.modules.drain().map(|(_, m)| m).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_payloads() {
        assert_eq!(parse_alloc(&4096u64.to_le_bytes()), Ok(4096));
        assert!(parse_alloc(&0u64.to_le_bytes()).is_err());
        assert!(parse_alloc(&[1, 2, 3]).is_err());
        assert_eq!(parse_handle(&7u64.to_le_bytes()), Ok(7));
        assert!(parse_handle(&[0; 9]).is_err());
        let mut h = 3u64.to_le_bytes().to_vec();
        h.extend(16u64.to_le_bytes());
        assert_eq!(parse_htod_header(&h), Ok((3, 16)));
        h.extend([1, 2, 3]);
        assert_eq!(parse_htod_header(&h), Ok((3, 16)));
        assert!(parse_htod_header(&h[..15]).is_err());
        let mut d = h[..16].to_vec();
        d.extend(100u64.to_le_bytes());
        assert_eq!(parse_dtoh(&d), Ok((3, 16, 100)));
        assert!(parse_dtoh(&d[..23]).is_err());
    }

    #[test]
    fn ptx_text() {
        assert_eq!(
            parse_ptx(b".version 8.0\0\0").unwrap().as_bytes(),
            b".version 8.0"
        );
        assert_eq!(parse_ptx(b"abc").unwrap().as_bytes(), b"abc");
        assert_eq!(parse_ptx(b"a\0b"), Err(Error::Malformed("NUL inside PTX")));
        assert!(parse_ptx(b"\0\0").is_err());
        assert!(parse_ptx(b"").is_err());
        assert_eq!(
            parse_ptx(&vec![b'x'; MAX_PTX_LEN + 1])
                .unwrap_err()
                .status(),
            Status::TooLarge
        );
    }

    #[test]
    fn ranges() {
        assert!(check_range(100, 0, 100).is_ok());
        assert!(check_range(100, 100, 0).is_ok());
        assert!(check_range(100, 1, 100).is_err());
        assert!(check_range(100, u64::MAX, 2).is_err());
    }

    fn sample_launch() -> Launch {
        Launch {
            module: 5,
            grid: [4, 1, 1],
            block: [128, 1, 1],
            shared_mem_bytes: 0,
            name: CString::new("scale_add_f32").unwrap(),
            params: vec![
                Param::Buffer(9),
                Param::Bytes(2.0f32.to_le_bytes().to_vec()),
                Param::Bytes(vec![1, 2, 3]),
            ],
        }
    }

    #[test]
    fn launch_roundtrip() {
        let l = sample_launch();
        let p = encode_launch(&l);
        assert_eq!(p.len(), 48 + 13 + (8 + 8) + (8 + 4) + (8 + 3));
        assert_eq!(parse_launch(&p), Ok(l));
    }

    #[test]
    fn launch_rejects() {
        let good = encode_launch(&sample_launch());
        // Every truncation is malformed, never a panic.
        for n in 0..good.len() {
            assert!(parse_launch(&good[..n]).is_err(), "prefix {n}");
        }
        let mut p = good.clone();
        p.push(0);
        assert!(parse_launch(&p).is_err());
        let mut p = good.clone();
        p[44] = 1; // reserved
        assert!(parse_launch(&p).is_err());
        let mut p = good.clone();
        p[8..12].copy_from_slice(&0u32.to_le_bytes()); // grid.x = 0
        assert!(parse_launch(&p).is_err());
        let mut p = good.clone();
        p[48] = 0; // NUL in the name
        assert!(parse_launch(&p).is_err());
        let mut p = good.clone();
        p[40..44].copy_from_slice(&65u32.to_le_bytes());
        assert_eq!(parse_launch(&p).unwrap_err().status(), Status::TooLarge);
        let mut p = good.clone();
        p[36..40].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_launch(&p).is_err());
        // A buffer parameter that is not 8 bytes.
        let mut l = sample_launch();
        l.params = vec![Param::Bytes(vec![0; 8])];
        let mut p = encode_launch(&l);
        p[48 + 13..48 + 13 + 4].copy_from_slice(&PARAM_BUFFER.to_le_bytes());
        p[48 + 13 + 4..48 + 13 + 8].copy_from_slice(&4u32.to_le_bytes());
        p.truncate(p.len() - 4);
        assert!(parse_launch(&p).is_err());
        // Unknown kind.
        let mut p = encode_launch(&l);
        p[48 + 13..48 + 13 + 4].copy_from_slice(&7u32.to_le_bytes());
        assert!(parse_launch(&p).is_err());
        // Too many parameter bytes.
        l.params = vec![Param::Bytes(vec![0; 3000]), Param::Bytes(vec![0; 3000])];
        assert_eq!(
            parse_launch(&encode_launch(&l)).unwrap_err().status(),
            Status::TooLarge
        );
        // Huge declared size does not overflow.
        let mut p = encode_launch(&sample_launch());
        p[48 + 13 + 4..48 + 13 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_launch(&p).is_err());
    }

    #[test]
    fn handle_space_exhaustion() {
        let mut t: VmTables<u64, ()> = VmTables::new(0, 10);
        t.next = 0xffff_fffe;
        t.reserve(1).unwrap();
        assert!(t.add_buffer(1, 0).is_ok());
        assert_eq!(t.reserve(1).unwrap_err().status(), Status::NoResources);
        assert!(t.add_module(()).is_err());
        assert!(t.can_add_module().is_err());
    }

    #[test]
    fn quota_accounting() {
        let mut q = Quota::new(100);
        assert!(q.charge(60).is_ok());
        assert_eq!(q.charge(41).unwrap_err().status(), Status::NoResources);
        assert_eq!(q.used, 60);
        assert!(q.charge(40).is_ok());
        q.release(100);
        assert_eq!(q.used, 0);
        q.release(5);
        assert_eq!(q.used, 0);
        assert!(q.charge(u64::MAX).is_err());
    }

    #[test]
    fn tables_handles_and_quota() {
        let mut t: VmTables<u64, &'static str> = VmTables::new(3, 1000);
        t.reserve(600).unwrap();
        let a = t.add_buffer(600, 0xdead).unwrap();
        assert_eq!(a >> 32, 3);
        assert_eq!(
            t.reserve(500),
            Err(Error::Quota {
                used: 600,
                want: 500,
                limit: 1000
            })
        );
        t.reserve(400).unwrap();
        let b = t.add_buffer(400, 0xbeef).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.buffer(a).unwrap().dev, 0xdead);
        assert_eq!(t.free_buffer(a).unwrap().size, 600);
        assert_eq!(t.free_buffer(a), Err(Error::NotFound(a)));
        assert_eq!(t.buffer(a).unwrap_err().status(), Status::NotFound);
        assert_eq!(t.quota.used, 400);
        let m = t.add_module("mod").unwrap();
        assert!(
            t.buffer(m).is_err(),
            "module handles are not buffer handles"
        );
        assert!(t.module(b).is_err());
        assert_eq!(*t.module(m).unwrap(), "mod");
        let (bufs, mods) = t.reset();
        assert_eq!((bufs.len(), mods.len()), (1, 1));
        assert_eq!(t.quota.used, 0);
        assert!(t.buffer(b).is_err() && t.module(m).is_err());
        t.reserve(1).unwrap();
        let c = t.add_buffer(1, 1).unwrap();
        assert!(c > m, "handles are never reused");
        t.start_at(1 << 24);
        let d = t.add_module("m2").unwrap();
        assert_eq!(d, (3 << 32) | (1 << 24));
        assert_eq!(t.remove_module(m), Err(Error::NotFound(m)));
    }

    #[test]
    fn separate_vms_have_separate_tables() {
        let mut vm1: VmTables<u64, ()> = VmTables::new(1, 10);
        let mut vm2: VmTables<u64, ()> = VmTables::new(2, 10);
        vm1.reserve(1).unwrap();
        let h = vm1.add_buffer(1, 42).unwrap();
        vm2.reserve(1).unwrap();
        let h2 = vm2.add_buffer(1, 43).unwrap();
        // VM 1's handle names nothing in VM 2, and the other way round.
        assert_ne!(h, h2);
        assert_eq!(vm2.buffer(h), Err(Error::NotFound(h)));
        assert_eq!(vm1.buffer(h2), Err(Error::NotFound(h2)));
        assert_eq!(vm1.buffer(h).unwrap().dev, 42);
        assert_eq!(vm2.buffer(h2).unwrap().dev, 43);
    }
}
