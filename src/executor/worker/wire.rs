//! The worker's pipe protocol, little-endian. A worker starts by writing a
//! ready frame (a [`ReplyHeader`] without output: OK once its GPU is open and
//! its sandbox closed, UNSUPPORTED without a usable device), then reads one
//! [`AssignHeader`] (the VM it serves: a warm spare learns it only when it is
//! handed over), then one frame per call each way. Request: [`CallHeader`],
//! then `payload_len` payload bytes. Reply: [`ReplyHeader`], then
//! `output_len` output bytes. Sizes are checked against the caller's bounds
//! before they cost memory.

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
    pub reserved: Le16,
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

// SAFETY: little-endian integers without padding (sizes checked below);
// every bit pattern is a valid value.
unsafe impl ByteValued for CallHeader {}
// SAFETY: as above.
unsafe impl ByteValued for AssignHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ReplyHeader {}

const _: () = assert!(std::mem::size_of::<CallHeader>() == 32);
const _: () = assert!(std::mem::size_of::<ReplyHeader>() == 16);
const _: () = assert!(std::mem::size_of::<AssignHeader>() == 16);

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
    let hdr = CallHeader {
        opcode: (opcode as u16).into(),
        reserved: 0.into(),
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
