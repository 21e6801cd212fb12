//! Turning one descriptor chain into a request: the device-readable part
//! (request header, then payload) and the device-writable part (response
//! header, then output), split across descriptors in any way. Everything here
//! comes from the guest and is checked; a malformed chain becomes a status.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;

use crate::executor::Request;
use crate::guest::{GuestBufs, GuestMem};
use crate::protocol::{Opcode, ReqHdr, RespHdr, Status, REQ_HDR_SIZE, REQ_VERSION, RESP_HDR_SIZE};

/// Why a chain was refused before it reached the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("readable part of {0} bytes is shorter than the request header")]
    ShortHeader(usize),
    #[error("request header version {0} is not 1")]
    BadVersion(u16),
    #[error("request header flags {0:#x} / reserved {1:#x} must be 0")]
    NonZeroReserved(u32, u32),
    #[error("unknown opcode {0:#06x}")]
    UnknownOpcode(u16),
    #[error("payload_len {claimed} exceeds the {available} readable bytes after the header")]
    PayloadPastEnd { claimed: u32, available: usize },
    #[error("chain has more than {0} descriptors (the queue size)")]
    TooManyDescriptors(usize),
}

impl Error {
    pub fn status(self) -> Status {
        match self {
            Error::UnknownOpcode(_) => Status::Unsupported,
            _ => Status::BadRequest,
        }
    }
}

/// A chain after validation.
#[derive(Debug)]
pub struct Parsed {
    /// Where the response header goes; `None` when the writable part cannot
    /// hold one (the chain is then returned with used length 0).
    pub resp: Option<GuestBufs>,
    /// The request, or why it is refused (with the tag when it was readable).
    pub outcome: Result<Request, (Error, u64)>,
}

impl Parsed {
    /// The response to a refused chain (never dispatched: dispatch_seq 0).
    pub fn refusal(err: Error, tag: u64) -> RespHdr {
        RespHdr {
            status: err.status() as u32,
            tag,
            ..Default::default()
        }
    }
}

/// Most descriptors a chain may have when the ring does not say: the
/// largest queue the device accepts.
pub const MAX_CHAIN_DESCS: usize = crate::vhu_vgpu::MAX_QUEUE_SIZE;

/// Validates a chain's descriptors and splits them into header, payload,
/// response header and output; at most [`MAX_CHAIN_DESCS`] descriptors.
pub fn parse(descs: impl Iterator<Item = Descriptor>, mem: &Arc<GuestMem>) -> Parsed {
    parse_bounded(descs, mem, MAX_CHAIN_DESCS)
}

/// Same as [`parse`], refusing a chain of more than `max_descs` descriptors
/// (the queue size: a driver must not build a longer chain, virtio 1.2
/// 2.7.5.3.1). The walk stops at the first descriptor past the bound, so an
/// indirect table of 65,535 entries costs no more than a queue's worth.
pub fn parse_bounded(
    descs: impl Iterator<Item = Descriptor>,
    mem: &Arc<GuestMem>,
    max_descs: usize,
) -> Parsed {
    let mut readable = GuestBufs::new(mem.clone());
    let mut writable = GuestBufs::new(mem.clone());
    let mut layout_error = None;
    for (i, d) in descs.enumerate() {
        if i >= max_descs {
            layout_error = Some(Error::TooManyDescriptors(max_descs));
            break;
        }
        let target = if d.is_write_only() {
            &mut writable
        } else if writable.is_empty() {
            &mut readable
        } else {
            layout_error.get_or_insert(Error::ReadableAfterWritable);
            continue;
        };
        if target.push(d.addr(), d.len() as usize).is_err() {
            layout_error.get_or_insert(Error::OutOfMemory {
                addr: d.addr().0,
                len: d.len(),
            });
            // Keep the writable prefix that is valid: the response can still go there.
            if d.is_write_only() {
                break;
            }
        }
    }

    let resp = writable.sub(0, RESP_HDR_SIZE).ok();
    let hdr = ReqHdr::decode(&read_header(&readable)).ok();
    let tag = hdr.map_or(0, |h| h.tag);
    let outcome = match (layout_error, hdr) {
        (Some(e), _) => Err(e),
        (None, None) => Err(Error::ShortHeader(readable.len())),
        (None, Some(h)) => validate(&h, &readable, &writable),
    };
    Parsed {
        resp,
        outcome: outcome.map_err(|e| (e, tag)),
    }
}

fn read_header(readable: &GuestBufs) -> Vec<u8> {
    let mut b = vec![0u8; REQ_HDR_SIZE.min(readable.len())];
    match readable.read_at(0, &mut b) {
        Ok(()) => b,
        Err(_) => Vec::new(),
    }
}

fn validate(h: &ReqHdr, readable: &GuestBufs, writable: &GuestBufs) -> Result<Request, Error> {
    if h.version != REQ_VERSION {
        return Err(Error::BadVersion(h.version));
    }
    if h.flags != 0 || h.reserved != 0 {
        return Err(Error::NonZeroReserved(h.flags, h.reserved));
    }
    let opcode = Opcode::from_u16(h.opcode).ok_or(Error::UnknownOpcode(h.opcode))?;
    let available = readable.len() - REQ_HDR_SIZE;
    let payload = readable
        .sub(REQ_HDR_SIZE, h.payload_len as usize)
        .map_err(|_| Error::PayloadPastEnd {
            claimed: h.payload_len,
            available,
        })?;
    // The response header fits (checked by the caller through `resp`), so the
    // output is whatever follows it; an empty view when nothing does.
    let output = writable
        .tail(RESP_HDR_SIZE)
        .unwrap_or_else(|_| GuestBufs::new(writable.memory().clone()));
    Ok(Request {
        opcode,
        tag: h.tag,
        payload,
        output,
    })
}

/// Largest output a response may announce: the used length of a chain
/// (`40 + output_len`) is a u32.
pub const MAX_OUTPUT: u32 = u32::MAX - RESP_HDR_SIZE as u32;

/// Writes the response header and returns the used length of the chain. An
/// `output_len` past [`MAX_OUTPUT`] (which no executor should claim) turns
/// into TOO_LARGE with no output rather than a used length that wraps.
pub fn write_response(resp: &GuestBufs, hdr: &RespHdr) -> u32 {
    let (hdr, used) = match (RESP_HDR_SIZE as u32).checked_add(hdr.output_len) {
        Some(used) => (*hdr, used),
        None => {
            let refused = RespHdr {
                status: Status::TooLarge as u32,
                output_len: 0,
                ..*hdr
            };
            (refused, RESP_HDR_SIZE as u32)
        }
    };
    match resp.write_at(0, &hdr.encode()) {
        Ok(()) => used,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::test_memory;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const DATA: u64 = 0x10_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Places `bytes` cut at `cuts`, piece i at `base + 2 * start_i` so that
    /// pieces are not contiguous, and returns one descriptor per piece.
    fn split(
        mem: &GuestMem,
        base: u64,
        bytes: &[u8],
        cuts: &[usize],
        flags: u16,
    ) -> Vec<RawDescriptor> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let at = base + 2 * start as u64;
            mem.write_slice(&bytes[start..end], GuestAddress(at))
                .unwrap();
            out.push(desc(at, (end - start) as u32, flags));
            start = end;
        }
        out
    }

    fn run(mem: &Arc<GuestMem>, descs: &[RawDescriptor]) -> Parsed {
        let q = MockSplitQueue::new(mem.as_ref(), 256);
        let chain = q.build_desc_chain(descs).unwrap();
        parse(chain, mem)
    }

    fn request(opcode: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ReqHdr::new(opcode, 0xabc, payload.len() as u32)
            .encode()
            .to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn every_split_of_a_scalar_add_parses() {
        let mut payload = 100i32.to_le_bytes().to_vec();
        payload.extend_from_slice(&200i32.to_le_bytes());
        let req = request(0x0100, &payload);
        let mem = test_memory(0x40_0000);
        // Every single cut point of the readable bytes, and three-way cuts.
        let mut layouts: Vec<Vec<usize>> = vec![vec![]];
        layouts.extend((1..req.len()).map(|c| vec![c]));
        layouts.extend((1..req.len() - 1).step_by(5).map(|c| vec![c, c + 1]));
        for cuts in layouts {
            for wcut in [0usize, 1, 20, 39, 40, 41] {
                let mut descs = split(&mem, DATA, &req, &cuts, 0);
                let wcuts: Vec<usize> = if wcut == 0 { vec![] } else { vec![wcut] };
                descs.extend(split(&mem, DATA + 0x1000, &[0u8; 44], &wcuts, W));
                let p = run(&mem, &descs);
                let r = p.outcome.expect("valid request");
                assert_eq!(r.opcode, Opcode::ScalarAddI32);
                assert_eq!(r.tag, 0xabc);
                assert_eq!(r.payload.to_vec().unwrap(), payload, "cuts {cuts:?}");
                assert_eq!(r.output.len(), 4);
                assert!(p.resp.is_some());
            }
        }
    }

    fn refused(descs: &[RawDescriptor], mem: &Arc<GuestMem>) -> (Error, u64, bool) {
        let p = run(mem, descs);
        let (e, tag) = p.outcome.expect_err("must be refused");
        (e, tag, p.resp.is_some())
    }

    #[test]
    fn malformed_chains_get_a_status() {
        let mem = test_memory(0x40_0000);
        let ping = request(0x0001, &[]);
        let resp = desc(DATA + 0x1000, 40, W);
        mem.write_slice(&ping, GuestAddress(DATA)).unwrap();

        // Short header.
        let (e, _, has_resp) = refused(&[desc(DATA, 23, 0), resp], &mem);
        assert_eq!(e, Error::ShortHeader(23));
        assert!(has_resp);
        // No readable part at all.
        assert_eq!(refused(&[resp], &mem).0, Error::ShortHeader(0));

        // Bad version, flags, reserved.
        for (off, val) in [(0usize, 2u8), (4, 1), (20, 1)] {
            let mut bad = ping.clone();
            bad[off] = val;
            mem.write_slice(&bad, GuestAddress(DATA + 0x100)).unwrap();
            let (e, tag, _) = refused(&[desc(DATA + 0x100, 24, 0), resp], &mem);
            assert_eq!(e.status(), Status::BadRequest);
            assert_eq!(tag, 0xabc, "tag echoed when readable");
        }

        // Unknown opcode.
        mem.write_slice(&request(0x7777, &[]), GuestAddress(DATA + 0x200))
            .unwrap();
        let (e, _, _) = refused(&[desc(DATA + 0x200, 24, 0), resp], &mem);
        assert_eq!(e.status(), Status::Unsupported);

        // payload_len past the readable bytes.
        let mut long = request(0x0100, &[0; 8]);
        long[16] = 9;
        mem.write_slice(&long, GuestAddress(DATA + 0x300)).unwrap();
        let (e, _, _) = refused(&[desc(DATA + 0x300, 32, 0), resp], &mem);
        assert_eq!(
            e,
            Error::PayloadPastEnd {
                claimed: 9,
                available: 8
            }
        );

        // Readable after writable.
        let (e, _, has_resp) = refused(&[desc(DATA, 24, 0), resp, desc(DATA, 8, 0)], &mem);
        assert_eq!(e, Error::ReadableAfterWritable);
        assert!(has_resp);

        // Readable descriptor outside guest memory.
        let (e, tag, has_resp) = refused(&[desc(DATA, 24, 0), desc(0x1000_0000, 8, 0), resp], &mem);
        assert!(matches!(e, Error::OutOfMemory { .. }));
        assert_eq!(tag, 0xabc);
        assert!(has_resp);

        // Descriptor wrapping the address space.
        let (e, _, _) = refused(&[desc(u64::MAX - 4, 24, 0), resp], &mem);
        assert!(matches!(e, Error::OutOfMemory { .. }));

        // Response header outside memory: nothing can be written.
        let p = run(&mem, &[desc(DATA, 24, 0), desc(0x1000_0000, 40, W)]);
        assert!(p.resp.is_none());

        // No writable part, or too small for a response header.
        assert!(run(&mem, &[desc(DATA, 24, 0)]).resp.is_none());
        assert!(run(&mem, &[desc(DATA, 24, 0), desc(DATA + 0x1000, 39, W)])
            .resp
            .is_none());
    }

    #[test]
    fn a_chain_longer_than_the_bound_is_refused_without_walking_it() {
        let mem = test_memory(0x40_0000);
        mem.write_slice(&request(0x0001, &[]), GuestAddress(DATA))
            .unwrap();
        let mut descs = vec![desc(DATA, 24, 0)];
        descs.extend((0..9).map(|i| desc(DATA + 0x100 + i, 1, 0)));
        descs.push(desc(DATA + 0x1000, 40, W));
        let q = MockSplitQueue::new(mem.as_ref(), 256);
        let chain = q.build_desc_chain(&descs).unwrap();
        let p = parse_bounded(chain, &mem, 8);
        assert_eq!(p.outcome.unwrap_err().0, Error::TooManyDescriptors(8));
        // Within the bound it parses.
        let chain = q.build_desc_chain(&descs).unwrap();
        assert!(parse_bounded(chain, &mem, 11).outcome.is_ok());
        // An endless iterator stops at the bound.
        let endless = std::iter::repeat(Descriptor::new(DATA, 1, 0, 0));
        let p = parse_bounded(endless, &mem, 1024);
        assert_eq!(p.outcome.unwrap_err().0, Error::TooManyDescriptors(1024));
    }

    #[test]
    fn indirect_and_zero_length_descriptors() {
        let mem = test_memory(0x40_0000);
        let ping = request(0x0001, &[]);
        mem.write_slice(&ping, GuestAddress(DATA)).unwrap();
        // Zero-length descriptors are legal and carry nothing.
        let p = run(
            &mem,
            &[
                desc(DATA, 0, 0),
                desc(DATA, 24, 0),
                desc(DATA + 0x1000, 0, W),
                desc(DATA + 0x1000, 40, W),
            ],
        );
        assert!(p.outcome.is_ok());
        assert_eq!(p.resp.unwrap().len(), 40);
    }

    #[test]
    fn an_output_len_near_4_gib_does_not_overflow_the_used_length() {
        let mem = test_memory(0x40_0000);
        let mut b = GuestBufs::new(mem.clone());
        b.push(GuestAddress(DATA), 40).unwrap();
        let hdr = RespHdr {
            status: 0,
            output_len: u32::MAX - 8,
            tag: 5,
            ..Default::default()
        };
        assert_eq!(write_response(&b, &hdr), RESP_HDR_SIZE as u32);
        let mut raw = [0u8; 40];
        b.read_at(0, &mut raw).unwrap();
        let got = RespHdr::decode(&raw).unwrap();
        assert_eq!(
            (got.status, got.output_len, got.tag),
            (Status::TooLarge as u32, 0, 5)
        );
        let max = RespHdr {
            output_len: MAX_OUTPUT,
            ..hdr
        };
        assert_eq!(write_response(&b, &max), u32::MAX);
    }

    #[test]
    fn response_is_written_with_used_length() {
        let mem = test_memory(0x40_0000);
        let mut b = GuestBufs::new(mem.clone());
        b.push(GuestAddress(DATA), 20).unwrap();
        b.push(GuestAddress(DATA + 100), 20).unwrap();
        let hdr = RespHdr {
            status: 0,
            output_len: 4,
            tag: 5,
            ..Default::default()
        };
        assert_eq!(write_response(&b, &hdr), 44);
        let mut raw = [0u8; 40];
        b.read_at(0, &mut raw).unwrap();
        assert_eq!(RespHdr::decode(&raw).unwrap(), hdr);
    }
}
