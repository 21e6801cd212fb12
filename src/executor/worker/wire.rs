//! The worker's pipe protocol, little-endian. A worker starts by writing a
//! ready frame (a [`ReplyHeader`] without output: OK once its GPU is open and
//! its sandbox closed, UNSUPPORTED without a usable device), then reads one
//! [`AssignHeader`] (the VM it serves: a warm spare learns it only when it is
//! handed over), then one frame per call each way. Request: [`CallHeader`],
//! then `payload_len` payload bytes. Reply: [`ReplyHeader`], then
//! `output_len` output bytes. Sizes are checked against the caller's bounds
//! before they cost memory.
//!
//! Guest memory (not under the `xen` feature): the parent's end of stdin is
//! a unix socket, so it can hand the worker its VM's memory table: a call
//! frame with [`FLAG_TABLE`] whose payload is one [`RegionWire`] per region,
//! then one byte sent with `SCM_RIGHTS` carrying the regions' memfds (in
//! that order). The worker maps them and answers with a ready-style reply.
//! A frame with [`FLAG_GUEST`] then carries no bytes of the request: its
//! payload is a [`GuestCallWire`] and the guest-physical ranges of the
//! request's payload and output; the worker reads and writes (and DMAs)
//! those bytes in its own mapping of guest memory, after checking every
//! range against its table, and its reply has `output_len` = bytes written
//! into the guest's output, with none following. The worker reads its
//! input unbuffered and exactly frame by frame, so a plain `read` never
//! consumes the byte that carries the fds.

use std::io::{self, Read, Write};

use vm_memory::endian::{Le16, Le32, Le64};
use vm_memory::ByteValued;

use crate::protocol::{Opcode, Status};

/// Largest payload or output one frame carries. Copies larger than the
/// configured chunk (at most [`MAX_CHUNK_BYTES`]) cross the pipe in chunks,
/// and every other remoting payload is bounded below this (PTX: 16 MiB; a
/// CUDA API command buffer or copy: 64 MiB, plus its few-byte answer header).
pub const MAX_FRAME_BYTES: u64 = (64 << 20) + 4096;
/// Largest copy chunk the settings may ask for.
pub const MAX_CHUNK_BYTES: u64 = 32 << 20;

/// Header of a call, parent to worker.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallHeader {
    pub opcode: Le16,
    /// 0, [`FLAG_TABLE`] or [`FLAG_GUEST`].
    pub flags: Le16,
    pub limit_ms: Le32,
    pub quota: Le64,
    pub payload_len: Le64,
    pub output_cap: Le64,
}

/// Header of a reply, worker to parent.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: Le32,
    pub reserved: Le32,
    pub output_len: Le64,
}

/// The VM a worker serves, parent to worker, once before any call.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssignHeader {
    pub vm_id: Le32,
    pub reserved: Le32,
    pub first_handle: Le64,
}

/// The frame is a memory table ([`RegionWire`]s, then the fds).
pub const FLAG_TABLE: u16 = 1;
/// The frame describes a call whose bytes are in guest memory.
pub const FLAG_GUEST: u16 = 2;
/// Most regions of a table: what one `SCM_RIGHTS` message may carry
/// (the kernel's `SCM_MAX_FD`). A larger table stays on the pipe path.
pub const MAX_REGIONS: usize = 253;
/// Most guest ranges of one guest call (payload and output together): two
/// of the largest queues' chains.
pub const MAX_GUEST_RANGES: usize = 2 * 32768;

/// One region of a memory table: `size` bytes at guest-physical `guest_addr`,
/// backed by its fd from `file_offset` on.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionWire {
    pub guest_addr: Le64,
    pub size: Le64,
    pub file_offset: Le64,
}

/// Head of a guest call's payload; `payload_ranges` then `output_ranges`
/// [`RangeWire`]s follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestCallWire {
    pub payload_ranges: Le32,
    pub output_ranges: Le32,
}

/// A guest-physical range.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeWire {
    pub addr: Le64,
    pub len: Le64,
}

// SAFETY: little-endian integers without padding (sizes checked below);
// every bit pattern is a valid value.
unsafe impl ByteValued for CallHeader {}
// SAFETY: as above.
unsafe impl ByteValued for RegionWire {}
// SAFETY: as above.
unsafe impl ByteValued for GuestCallWire {}
// SAFETY: as above.
unsafe impl ByteValued for RangeWire {}
// SAFETY: as above.
unsafe impl ByteValued for AssignHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ReplyHeader {}

const _: () = assert!(std::mem::size_of::<CallHeader>() == 32);
const _: () = assert!(std::mem::size_of::<ReplyHeader>() == 16);
const _: () = assert!(std::mem::size_of::<AssignHeader>() == 16);
const _: () = assert!(std::mem::size_of::<RegionWire>() == 24);
const _: () = assert!(std::mem::size_of::<GuestCallWire>() == 8);
const _: () = assert!(std::mem::size_of::<RangeWire>() == 16);

pub fn write_assign(w: &mut impl Write, vm_id: u32, first_handle: u64) -> io::Result<()> {
    let hdr = AssignHeader {
        vm_id: vm_id.into(),
        reserved: 0.into(),
        first_handle: first_handle.into(),
    };
    w.write_all(hdr.as_slice())?;
    w.flush()
}

/// Reads the assignment; `None` at a clean end of input (a spare that was
/// never handed over).
pub fn read_assign(r: &mut impl Read) -> io::Result<Option<(u32, u64)>> {
    let mut hdr = AssignHeader::default();
    match r.read_exact(hdr.as_mut_slice()) {
        Ok(()) => Ok(Some((hdr.vm_id.into(), hdr.first_handle.into()))),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// One call as the worker reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub opcode: u16,
    pub flags: u16,
    pub limit_ms: u32,
    pub quota: u64,
    pub payload: Vec<u8>,
    pub output_cap: usize,
}

fn too_big(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what} too large"))
}

pub fn write_call(
    w: &mut impl Write,
    opcode: Opcode,
    limit_ms: u32,
    quota: u64,
    payload: &[u8],
    output_cap: usize,
) -> io::Result<()> {
    write_frame(w, opcode as u16, 0, limit_ms, quota, payload, output_cap)
}

/// A call frame with `flags` ([`FLAG_TABLE`], [`FLAG_GUEST`]).
pub fn write_frame(
    w: &mut impl Write,
    opcode: u16,
    flags: u16,
    limit_ms: u32,
    quota: u64,
    payload: &[u8],
    output_cap: usize,
) -> io::Result<()> {
    let hdr = CallHeader {
        opcode: opcode.into(),
        flags: flags.into(),
        limit_ms: limit_ms.into(),
        quota: quota.into(),
        payload_len: (payload.len() as u64).into(),
        output_cap: (output_cap as u64).into(),
    };
    w.write_all(hdr.as_slice())?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one call; `None` at a clean end of input.
pub fn read_call(r: &mut impl Read) -> io::Result<Option<Call>> {
    let mut hdr = CallHeader::default();
    match r.read_exact(hdr.as_mut_slice()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let plen = u64::from(hdr.payload_len);
    let ocap = u64::from(hdr.output_cap);
    if plen > MAX_FRAME_BYTES {
        return Err(too_big("payload"));
    }
    if ocap > MAX_FRAME_BYTES {
        return Err(too_big("output capacity"));
    }
    let mut payload = vec![0u8; plen as usize];
    r.read_exact(&mut payload)?;
    Ok(Some(Call {
        opcode: hdr.opcode.into(),
        flags: hdr.flags.into(),
        limit_ms: hdr.limit_ms.into(),
        quota: hdr.quota.into(),
        payload,
        output_cap: ocap as usize,
    }))
}

pub fn write_reply(w: &mut impl Write, status: Status, output: &[u8]) -> io::Result<()> {
    let hdr = ReplyHeader {
        status: (status as u32).into(),
        reserved: 0.into(),
        output_len: (output.len() as u64).into(),
    };
    w.write_all(hdr.as_slice())?;
    w.write_all(output)?;
    w.flush()
}

/// Encodes a memory table's regions (the fds go separately).
pub fn encode_table(regions: &[RegionWire]) -> Vec<u8> {
    regions.iter().flat_map(|r| r.as_slice().to_vec()).collect()
}

/// Decodes a table frame's payload: whole [`RegionWire`]s, at most
/// [`MAX_REGIONS`], each non-empty.
pub fn decode_table(p: &[u8]) -> io::Result<Vec<RegionWire>> {
    let size = std::mem::size_of::<RegionWire>();
    if !p.len().is_multiple_of(size) || p.len() / size > MAX_REGIONS || p.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "memory table"));
    }
    p.chunks_exact(size)
        .map(|c| {
            let r: RegionWire = crate::protocol::read_obj(c, 0)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "region"))?;
            if u64::from(r.size) == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "empty region"));
            }
            Ok(r)
        })
        .collect()
}

/// Encodes a guest call's ranges.
pub fn encode_guest_call(payload: &[(u64, u64)], output: &[(u64, u64)]) -> Vec<u8> {
    let head = GuestCallWire {
        payload_ranges: (payload.len() as u32).into(),
        output_ranges: (output.len() as u32).into(),
    };
    let mut v = head.as_slice().to_vec();
    for &(addr, len) in payload.iter().chain(output) {
        let r = RangeWire {
            addr: addr.into(),
            len: len.into(),
        };
        v.extend_from_slice(r.as_slice());
    }
    v
}

/// Guest-physical (address, length) ranges of a payload and an output.
pub type GuestRanges = (Vec<(u64, u64)>, Vec<(u64, u64)>);

/// The payload and output ranges of a guest call; malformed or more than
/// [`MAX_GUEST_RANGES`] ranges is an error.
pub fn decode_guest_call(p: &[u8]) -> io::Result<GuestRanges> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "guest call");
    let head: GuestCallWire = crate::protocol::read_obj(p, 0).ok_or_else(bad)?;
    let (np, no) = (
        u32::from(head.payload_ranges) as usize,
        u32::from(head.output_ranges) as usize,
    );
    let size = std::mem::size_of::<RangeWire>();
    let body = p
        .get(std::mem::size_of::<GuestCallWire>()..)
        .ok_or_else(bad)?;
    if np + no > MAX_GUEST_RANGES || body.len() != (np + no) * size {
        return Err(bad());
    }
    let mut all = body.chunks_exact(size).map(|c| {
        let r: RangeWire = crate::protocol::read_obj(c, 0).unwrap_or_default();
        (u64::from(r.addr), u64::from(r.len))
    });
    let payload = all.by_ref().take(np).collect();
    Ok((payload, all.collect()))
}

/// Reads a reply whose output must fit `output_cap`.
pub fn read_reply(r: &mut impl Read, output_cap: usize) -> io::Result<(Status, Vec<u8>)> {
    let mut hdr = ReplyHeader::default();
    r.read_exact(hdr.as_mut_slice())?;
    let status = Status::from_u32(hdr.status.into())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown status"))?;
    let len = u64::from(hdr.output_len);
    if len > output_cap as u64 {
        return Err(too_big("output"));
    }
    let mut out = vec![0u8; len as usize];
    r.read_exact(&mut out)?;
    Ok((status, out))
}

/// Reads a guest call's reply: the status and the output bytes the worker
/// wrote into guest memory (at most `output_cap`); nothing follows it.
pub fn read_guest_reply(r: &mut impl Read, output_cap: usize) -> io::Result<(Status, usize)> {
    let mut hdr = ReplyHeader::default();
    r.read_exact(hdr.as_mut_slice())?;
    let status = Status::from_u32(hdr.status.into())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown status"))?;
    let len = u64::from(hdr.output_len);
    if len > output_cap as u64 {
        return Err(too_big("output"));
    }
    Ok((status, len as usize))
}

/// Writes a guest call's reply (see [`read_guest_reply`]).
pub fn write_guest_reply(w: &mut impl Write, status: Status, written: u32) -> io::Result<()> {
    let hdr = ReplyHeader {
        status: (status as u32).into(),
        reserved: 0.into(),
        output_len: u64::from(written).into(),
    };
    w.write_all(hdr.as_slice())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut pipe = Vec::new();
        write_call(&mut pipe, Opcode::MemAlloc, 250, 1 << 20, &[1, 2, 3], 8).unwrap();
        assert_eq!(pipe.len(), 32 + 3);
        let call = read_call(&mut pipe.as_slice()).unwrap().unwrap();
        assert_eq!(
            call,
            Call {
                opcode: Opcode::MemAlloc as u16,
                flags: 0,
                limit_ms: 250,
                quota: 1 << 20,
                payload: vec![1, 2, 3],
                output_cap: 8,
            }
        );
        assert_eq!(read_call(&mut [].as_slice()).unwrap(), None);

        let mut pipe = Vec::new();
        write_assign(&mut pipe, 7, 5 << 24).unwrap();
        assert_eq!(
            read_assign(&mut pipe.as_slice()).unwrap(),
            Some((7, 5 << 24))
        );
        assert_eq!(read_assign(&mut [].as_slice()).unwrap(), None);
        // A parent that died mid-frame: the end of input, as for calls.
        assert_eq!(read_assign(&mut [1u8, 2].as_slice()).unwrap(), None);

        let mut pipe = Vec::new();
        write_reply(&mut pipe, Status::NotFound, &[7; 5]).unwrap();
        let (s, out) = read_reply(&mut pipe.as_slice(), 5).unwrap();
        assert_eq!((s, out), (Status::NotFound, vec![7; 5]));
        // More output than asked for is a protocol error.
        assert!(read_reply(&mut pipe.as_slice(), 4).is_err());
    }

    #[test]
    fn tables_and_guest_calls_round_trip_and_refuse_garbage() {
        let regions = [
            RegionWire {
                guest_addr: 0.into(),
                size: 4096.into(),
                file_offset: 0.into(),
            },
            RegionWire {
                guest_addr: (1u64 << 32).into(),
                size: (1u64 << 30).into(),
                file_offset: 8192.into(),
            },
        ];
        let p = encode_table(&regions);
        assert_eq!(decode_table(&p).unwrap(), regions);
        assert!(decode_table(&p[..47]).is_err());
        assert!(decode_table(&[]).is_err());
        assert!(decode_table(&vec![1u8; 24 * (MAX_REGIONS + 1)]).is_err());
        assert!(decode_table(&[0u8; 24]).is_err(), "empty region");

        let (pr, or) = (vec![(0x1000, 16), (0x3000, 1 << 20)], vec![(0x9000, 8)]);
        let g = encode_guest_call(&pr, &or);
        assert_eq!(decode_guest_call(&g).unwrap(), (pr, or));
        for n in 0..g.len() {
            assert!(decode_guest_call(&g[..n]).is_err(), "prefix {n}");
        }
        let mut huge = GuestCallWire {
            payload_ranges: u32::MAX.into(),
            output_ranges: u32::MAX.into(),
        }
        .as_slice()
        .to_vec();
        huge.extend([0u8; 32]);
        assert!(decode_guest_call(&huge).is_err());

        let mut pipe = Vec::new();
        write_guest_reply(&mut pipe, Status::Ok, 100).unwrap();
        assert_eq!(pipe.len(), 16, "no output follows a guest reply");
        assert_eq!(
            read_guest_reply(&mut pipe.as_slice(), 100).unwrap(),
            (Status::Ok, 100)
        );
        assert!(read_guest_reply(&mut pipe.as_slice(), 99).is_err());
    }

    #[test]
    fn hostile_frames_are_refused_before_they_cost_memory() {
        let hdr = CallHeader {
            payload_len: u64::MAX.into(),
            ..CallHeader::default()
        };
        assert!(read_call(&mut hdr.as_slice()).is_err());
        let hdr = CallHeader {
            output_cap: (MAX_FRAME_BYTES + 1).into(),
            ..CallHeader::default()
        };
        assert!(read_call(&mut hdr.as_slice()).is_err());
        // A truncated payload.
        let mut pipe = Vec::new();
        write_call(&mut pipe, Opcode::MemFree, 1, 0, &[0; 8], 0).unwrap();
        pipe.truncate(36);
        assert!(read_call(&mut pipe.as_slice()).is_err());
        // An unknown status.
        let bad = ReplyHeader {
            status: 99.into(),
            ..ReplyHeader::default()
        };
        assert!(read_reply(&mut bad.as_slice(), 0).is_err());
    }
}
