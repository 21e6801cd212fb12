//! A time-boxed fuzzer for every parser a guest or a worker pipe reaches, on
//! stable Rust: the chain parser over descriptor tables in real guest memory
//! (through virtio-queue's own ring walk, indirect tables included), the
//! header and info decoders of `protocol.rs`, the built-in operations'
//! payload parsers (`executor/ops.rs`), the CUDA remoting parsers
//! (`executor/remoting.rs`), the worker's pipe framing
//! (`executor/worker/wire.rs`) and the CPU executor on whole requests.
//!
//! Why a seeded RNG with mutation rather than `proptest`/`arbitrary`: the
//! harness runs for a time budget (CI runs it for 60 s) rather than for a
//! number of cases, and every case must be reproducible from one printed
//! line. Each case is generated from `(seed, target, index)` as a byte string
//! (half random bytes, half mutations of a valid encoding made with the
//! crate's encoders), and the target interprets those bytes; the bytes are
//! the reproducer (`--target T --input HEX`). Shrinking, which is what the
//! libraries would add, matters little for inputs this small.
//!
//! Every case runs under `catch_unwind`; a panic prints the target, the seed,
//! the case and the input in hex, and the process exits 1. A broken
//! invariant (a parse that accepts what it should refuse, an executor that
//! runs far past its limit) is reported the same way.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use vgpu::bytes::Reader;
use vgpu::chain;
use vgpu::executor::remoting::{self, Launch, Param};
use vgpu::executor::worker::wire;
use vgpu::executor::{ops, CpuExecutor, Executor, Request, Tenant};
use vgpu::guest::{anonymous_memory, GuestBufs, GuestMem};
use vgpu::protocol::{
    DeviceInfo, ExecutorKind, Opcode, PoolId, Priority, ReqHdr, RespHdr, Status, INFO_SIZE,
    REQ_HDR_SIZE, RESP_HDR_SIZE,
};
use vgpu_sim::workload::{self, Rng};

#[derive(Parser, Debug)]
#[command(about = "Fuzz every guest- and pipe-facing parser for a time budget")]
struct Args {
    /// Total time budget, shared evenly by the selected targets.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seed of the run (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// One target, or `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// Run one input (hex, as a failure prints it) against `--target`.
    #[arg(long)]
    input: Option<String>,
    /// The CPU executor's execution limit for the `cpu` target, in ms.
    #[arg(long, default_value_t = 20)]
    cpu_limit_ms: u64,
}

/// What a target says about one input it ran without panicking.
type Verdict = Result<(), String>;

struct Target {
    name: &'static str,
    generate: fn(&mut Rng) -> Vec<u8>,
    run: fn(&[u8], &Ctx) -> Verdict,
}

/// State shared by the cases of a run.
struct Ctx {
    cpu_limit: Duration,
    /// Slowest CPU executor case: (time, opcode, status).
    slowest: std::cell::Cell<(Duration, u16, Option<Status>)>,
    /// The `cpu` target's guest memory, reused by every case (each writes
    /// its payload first and reads back only what the executor wrote).
    cpu_mem: Arc<GuestMem>,
    /// How cases ended, per target (to show what the inputs reach).
    outcomes: std::cell::RefCell<std::collections::BTreeMap<String, u64>>,
}

impl Ctx {
    fn count(&self, what: String) {
        *self.outcomes.borrow_mut().entry(what).or_default() += 1;
    }
}

const TARGETS: &[Target] = &[
    Target {
        name: "chain",
        generate: gen_chain,
        run: run_chain,
    },
    Target {
        name: "protocol",
        generate: gen_protocol,
        run: run_protocol,
    },
    Target {
        name: "ops",
        generate: gen_ops,
        run: run_ops,
    },
    Target {
        name: "remoting",
        generate: gen_remoting,
        run: run_remoting,
    },
    Target {
        name: "wire",
        generate: gen_wire,
        run: run_wire,
    },
    Target {
        name: "cpu",
        generate: gen_cpu,
        run: run_cpu,
    },
];

// ---- input helpers ---------------------------------------------------------

fn below(rng: &mut Rng, n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        rng.next_u64() % n
    }
}

fn chance(rng: &mut Rng, one_in: u64) -> bool {
    below(rng, one_in) == 0
}

fn random_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let n = below(rng, max as u64 + 1) as usize;
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Values that catch off-by-ones and overflows.
fn edge_u32(rng: &mut Rng) -> u32 {
    const EDGES: [u32; 12] = [
        0,
        1,
        2,
        7,
        8,
        255,
        4096,
        65535,
        65536,
        0x7fff_ffff,
        0x8000_0000,
        u32::MAX,
    ];
    match below(rng, 3) {
        0 => EDGES[below(rng, EDGES.len() as u64) as usize],
        1 => below(rng, 64) as u32,
        _ => rng.next_u64() as u32,
    }
}

fn edge_u64(rng: &mut Rng) -> u64 {
    match below(rng, 4) {
        0 => u64::MAX - below(rng, 16),
        1 => 1u64 << below(rng, 64),
        2 => u64::from(edge_u32(rng)),
        _ => rng.next_u64(),
    }
}

/// A few random edits of a valid encoding: byte flips, edge values written
/// over fields, truncation, extension, duplication.
fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..=below(rng, 4) {
        match below(rng, 7) {
            0 if !v.is_empty() => {
                let i = below(rng, v.len() as u64) as usize;
                v[i] ^= 1 << below(rng, 8);
            }
            1 if !v.is_empty() => {
                let i = below(rng, v.len() as u64) as usize;
                v[i] = rng.next_u64() as u8;
            }
            2 if v.len() >= 4 => {
                let i = below(rng, v.len() as u64 - 3) as usize;
                v[i..i + 4].copy_from_slice(&edge_u32(rng).to_le_bytes());
            }
            3 if v.len() >= 8 => {
                let i = below(rng, v.len() as u64 - 7) as usize;
                v[i..i + 8].copy_from_slice(&edge_u64(rng).to_le_bytes());
            }
            4 => {
                let n = below(rng, v.len() as u64 + 1) as usize;
                v.truncate(n);
            }
            5 => {
                let extra = random_bytes(rng, 16);
                v.extend(extra);
            }
            _ if !v.is_empty() => {
                let i = below(rng, v.len() as u64) as usize;
                let piece = v[i..].to_vec();
                v.extend(piece.iter().take(64));
            }
            _ => {}
        }
    }
    v
}

/// Random bytes half the time, a mutation of `valid` otherwise.
fn bytes_or_mutation(rng: &mut Rng, valid: Vec<u8>, max_random: usize) -> Vec<u8> {
    match below(rng, 4) {
        0 => random_bytes(rng, max_random),
        1 => valid,
        _ => mutate(rng, valid),
    }
}

/// Reads the fields of an input blob in order; past the end everything is 0,
/// so every byte string is a valid input.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.take(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_le_bytes(b)
    }
    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.take(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_le_bytes(b)
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let s = self.take(8);
        b[..s.len()].copy_from_slice(s);
        u64::from_le_bytes(b)
    }
    /// A length-prefixed (u32) byte string.
    fn blob(&mut self) -> Vec<u8> {
        let n = self.u32() as usize;
        self.take(n).to_vec()
    }
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend((b.len() as u32).to_le_bytes());
    out.extend(b);
}

// ---- valid encodings -------------------------------------------------------

fn random_opcode(rng: &mut Rng) -> u16 {
    if chance(rng, 8) {
        edge_u32(rng) as u16
    } else {
        Opcode::ALL[below(rng, Opcode::ALL.len() as u64) as usize] as u16
    }
}

/// A valid payload of `op` with small shapes.
fn valid_payload(rng: &mut Rng, op: u16) -> Vec<u8> {
    let small = |rng: &mut Rng| 1 + below(rng, 12) as usize;
    match Opcode::from_u16(op) {
        Some(Opcode::BusyWait) => below(rng, 5_000_000).to_le_bytes().to_vec(),
        Some(Opcode::ScalarAddI32) => {
            workload::scalar_payload(rng.next_u64() as i32, rng.next_u64() as i32)
        }
        Some(Opcode::VectorAddF32) => {
            let n = below(rng, 40) as usize;
            workload::vector_add_payload(&rng.f32s(n), &rng.f32s(n))
        }
        Some(Opcode::SaxpyF32) => {
            let n = below(rng, 40) as usize;
            workload::saxpy_payload(rng.f32(), &rng.f32s(n), &rng.f32s(n))
        }
        Some(Opcode::SgemmF32) => {
            let (m, n, k) = (small(rng), small(rng), small(rng));
            let mut p = workload::sgemm_payload(m, n, k, &rng.f32s(m * k), &rng.f32s(k * n));
            if chance(rng, 4) {
                p[3] |= 0x80; // TF32
            }
            p
        }
        Some(Opcode::MemAlloc) => edge_u64(rng).to_le_bytes().to_vec(),
        Some(Opcode::MemFree) | Some(Opcode::ModuleUnload) => edge_u64(rng).to_le_bytes().to_vec(),
        Some(Opcode::MemcpyHtoD) => {
            let mut p = edge_u64(rng).to_le_bytes().to_vec();
            p.extend(edge_u64(rng).to_le_bytes());
            p.extend(random_bytes(rng, 32));
            p
        }
        Some(Opcode::MemcpyDtoH) => [edge_u64(rng), edge_u64(rng), edge_u64(rng)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        Some(Opcode::ModuleLoad) => {
            let mut p = b".version 8.0\n.target sm_90\n.address_size 64\n".to_vec();
            let nuls = below(rng, 3) as usize;
            p.extend(std::iter::repeat_n(0, nuls));
            p
        }
        Some(Opcode::Launch) => remoting::encode_launch(&valid_launch(rng)),
        _ => random_bytes(rng, 32),
    }
}

fn valid_launch(rng: &mut Rng) -> Launch {
    let dim = |rng: &mut Rng| 1 + below(rng, 1024) as u32;
    let name_len = 1 + below(rng, 20) as usize;
    let name: Vec<u8> = (0..name_len).map(|_| b'a' + below(rng, 26) as u8).collect();
    let params = (0..below(rng, 8))
        .map(|_| {
            if chance(rng, 2) {
                Param::Buffer(edge_u64(rng))
            } else {
                let n = 1 + below(rng, 16) as usize;
                Param::Bytes((0..n).map(|_| rng.next_u64() as u8).collect())
            }
        })
        .collect();
    Launch {
        module: edge_u64(rng),
        grid: [dim(rng), dim(rng), dim(rng)],
        block: [dim(rng), dim(rng), dim(rng)],
        shared_mem_bytes: edge_u32(rng),
        name: std::ffi::CString::new(name).unwrap_or_default(),
        params,
    }
}

// ---- chain -----------------------------------------------------------------
//
// Input: u8 log2 queue size, u16 head, u16 count of raw descriptors (16 bytes
// each, written to the descriptor table from index 0), then u16 count of
// writes (u64 guest address, blob) that place headers, payloads and indirect
// tables in guest memory. Guest memory has two regions with a hole between
// them; the rings live at 0.

const REGION_A: (u64, usize) = (0, 0x10_0000);
const REGION_B: (u64, usize) = (0x20_0000, 0x10_0000);
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn random_addr(rng: &mut Rng, len: u32) -> u64 {
    match below(rng, 8) {
        0 => REGION_B.0 + below(rng, REGION_B.1 as u64),
        // Straddling the end of region A, or of region B.
        1 => REGION_A.1 as u64 - below(rng, 64),
        2 => (REGION_B.0 + REGION_B.1 as u64).wrapping_sub(u64::from(len.min(64))),
        // In the hole, or far away.
        3 => REGION_A.1 as u64 + below(rng, 0x1000),
        4 => edge_u64(rng),
        _ => 0x1_0000 + below(rng, 0xe_0000),
    }
}

fn random_len(rng: &mut Rng) -> u32 {
    match below(rng, 6) {
        0 => edge_u32(rng),
        1 => RESP_HDR_SIZE as u32 + below(rng, 64) as u32,
        2 => REQ_HDR_SIZE as u32,
        _ => below(rng, 256) as u32,
    }
}

fn random_flags(rng: &mut Rng) -> u16 {
    match below(rng, 8) {
        0 => rng.next_u64() as u16,
        1 => F_INDIRECT,
        2 => F_INDIRECT | F_NEXT,
        3 | 4 => F_NEXT | F_WRITE,
        5 => F_WRITE,
        _ => F_NEXT,
    }
}

fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    d
}

/// A mostly sensible chain: header, payload, response, output; some of it
/// through an indirect table; then random edits.
fn gen_chain(rng: &mut Rng) -> Vec<u8> {
    let log2 = below(rng, 9) as u8;
    let size = 1u16 << log2;
    let mut descs: Vec<[u8; 16]> = Vec::new();
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    let op = random_opcode(rng);
    let payload = valid_payload(rng, op);
    let mut req = ReqHdr::new(op, rng.next_u64(), payload.len() as u32)
        .encode()
        .to_vec();
    req.extend(&payload);
    let req = if chance(rng, 3) {
        mutate(rng, req)
    } else {
        req
    };
    let data = (0x1_0000 + below(rng, 0x8_0000)) & !7;
    writes.push((data, req.clone()));
    let out_len = RESP_HDR_SIZE as u32 + below(rng, 256) as u32;
    let resp_at = data + 0x4_0000;
    let n = 1 + below(rng, u64::from(size).min(8)) as usize;
    // Split the readable bytes into up to n-1 pieces, the writable into the rest.
    let cut = (req.len() / 2).max(1);
    let pieces = [
        (data, cut as u32, 0u16),
        (data + cut as u64, (req.len() - cut) as u32, 0),
        (resp_at, out_len, F_WRITE),
    ];
    let as_indirect = chance(rng, 3);
    let mut table = Vec::new();
    for (i, &(addr, len, flags)) in pieces.iter().enumerate() {
        let (addr, len, flags) = if chance(rng, 6) {
            let l = random_len(rng);
            (random_addr(rng, l), l, random_flags(rng))
        } else {
            (addr, len, flags)
        };
        let last = i + 1 == pieces.len();
        let next = if chance(rng, 10) {
            rng.next_u64() as u16
        } else {
            (i + 1) as u16
        };
        let f = if last { flags } else { flags | F_NEXT };
        table.push(raw_desc(addr, len, f, next));
    }
    for _ in 0..below(rng, n as u64) {
        let l = random_len(rng);
        let d = raw_desc(
            random_addr(rng, l),
            l,
            random_flags(rng),
            below(rng, u64::from(size) + 2) as u16,
        );
        let at = below(rng, table.len() as u64 + 1) as usize;
        table.insert(at, d);
    }
    if as_indirect {
        let at = 0x9_0000 + (below(rng, 0x1000) & !15);
        let mut bytes: Vec<u8> = table.iter().flatten().copied().collect();
        let mut len = bytes.len() as u32;
        if chance(rng, 4) {
            len = random_len(rng);
        }
        if chance(rng, 6) {
            // A table that claims many entries: each a one-byte read.
            let entries = 1 + below(rng, 65535) as u32;
            bytes = (0..entries.min(4096))
                .flat_map(|i| raw_desc(data, 1, F_NEXT, (i + 1) as u16))
                .collect();
            len = entries * 16;
        }
        writes.push((at, bytes));
        descs.push(raw_desc(at, len, random_flags(rng) | F_INDIRECT, 0));
        if chance(rng, 3) {
            descs[0][12..14].copy_from_slice(&F_INDIRECT.to_le_bytes());
        }
    } else {
        descs = table;
    }
    descs.truncate(usize::from(size));
    let mut out = vec![log2];
    out.extend(0u16.to_le_bytes());
    if chance(rng, 10) {
        let h = rng.next_u64() as u16;
        out[1..3].copy_from_slice(&h.to_le_bytes());
    }
    out.extend((descs.len() as u16).to_le_bytes());
    for d in &descs {
        out.extend(d);
    }
    out.extend((writes.len() as u16).to_le_bytes());
    for (addr, b) in &writes {
        out.extend(addr.to_le_bytes());
        put_blob(&mut out, b);
    }
    if chance(rng, 4) {
        mutate(rng, out)
    } else {
        out
    }
}

fn chain_memory() -> Result<Arc<GuestMem>, String> {
    anonymous_memory(&[REGION_A, REGION_B]).map_err(|e| format!("guest memory: {e}"))
}

fn run_chain(input: &[u8], ctx: &Ctx) -> Verdict {
    let mut c = Cursor(input);
    let size = 1u16 << (c.u8() % 9);
    let head = c.u16();
    let mem = chain_memory()?;
    let q = MockSplitQueue::create(mem.as_ref(), GuestAddress(0), size);
    let table = q.desc_table_addr();
    for i in 0..c.u16().min(size) {
        let mut d = [0u8; 16];
        let s = c.take(16);
        d[..s.len()].copy_from_slice(s);
        let _ = mem.write_slice(&d, GuestAddress(table.0 + 16 * u64::from(i)));
    }
    for _ in 0..c.u16() {
        let addr = c.u64();
        let b = c.blob();
        let _ = mem.write_slice(&b, GuestAddress(addr));
    }
    let _ = q.avail().ring().ref_at(0).map(|r| r.store(head));
    q.avail().idx().store(1u16);
    let mut queue: Queue = q.create_queue().map_err(|e| format!("mock queue: {e:?}"))?;
    // virtio-queue refuses some heads itself (out of range): nothing to parse.
    let Some(descs) = queue.pop_descriptor_chain(mem.clone()) else {
        return Ok(());
    };
    let parsed = chain::parse_bounded(descs, &mem, usize::from(size));
    ctx.count(match &parsed.outcome {
        Ok(r) => format!("chain accepted {:?}", r.opcode),
        Err((e, _)) => format!(
            "chain refused {}",
            format!("{e:?}").split(['(', ' ']).next().unwrap_or("")
        ),
    });
    check_parsed(&parsed)
}

fn check_parsed(parsed: &chain::Parsed) -> Verdict {
    if let Some(resp) = &parsed.resp {
        if resp.len() != RESP_HDR_SIZE {
            return Err(format!("response view of {} bytes", resp.len()));
        }
        let hdr = match &parsed.outcome {
            Ok(r) => RespHdr {
                tag: r.tag,
                output_len: r.output.len().min(64) as u32,
                ..Default::default()
            },
            Err((e, tag)) => chain::Parsed::refusal(*e, *tag),
        };
        let used = chain::write_response(resp, &hdr);
        if used < RESP_HDR_SIZE as u32 {
            return Err(format!("used length {used}"));
        }
    }
    if let Ok(r) = &parsed.outcome {
        // What the header promised: every payload byte readable.
        r.payload
            .to_vec()
            .map_err(|e| format!("accepted payload unreadable: {e}"))?;
    }
    Ok(())
}

// ---- protocol --------------------------------------------------------------

fn gen_protocol(rng: &mut Rng) -> Vec<u8> {
    let valid = match below(rng, 3) {
        0 => ReqHdr::new(random_opcode(rng), rng.next_u64(), edge_u32(rng))
            .encode()
            .to_vec(),
        1 => RespHdr {
            status: edge_u32(rng),
            output_len: edge_u32(rng),
            tag: rng.next_u64(),
            ..Default::default()
        }
        .encode()
        .to_vec(),
        _ => DeviceInfo {
            executor: ExecutorKind::Cpu,
            gpu_index: edge_u32(rng),
            memory_total: edge_u64(rng),
            compute_capability: edge_u32(rng),
            exec_limit_ms: edge_u32(rng),
            name: "x".repeat(below(rng, 80) as usize),
        }
        .encode()
        .to_vec(),
    };
    bytes_or_mutation(rng, valid, 2 * INFO_SIZE)
}

fn run_protocol(input: &[u8], _ctx: &Ctx) -> Verdict {
    if let Ok(h) = ReqHdr::decode(input) {
        if ReqHdr::decode(&h.encode()) != Ok(h) {
            return Err("request header does not round-trip".into());
        }
    } else if input.len() >= REQ_HDR_SIZE {
        return Err("a request header of enough bytes refused".into());
    }
    if let Ok(h) = RespHdr::decode(input) {
        if RespHdr::decode(&h.encode()) != Ok(h) {
            return Err("response header does not round-trip".into());
        }
    }
    let _ = DeviceInfo::decode(input);
    let mut c = Cursor(input);
    let (a, b, d) = (c.u16(), c.u32(), c.u8());
    let _ = Opcode::from_u16(a).map(|o| (o.c_name(), o.is_remoting()));
    let _ = Status::from_u32(b).map(|s| s.to_string());
    let _ = Priority::from_u32(b).map(|p| p.as_str());
    if let Ok(p) = PoolId::new(d) {
        // Lower case names the same pool.
        if p.letter() != d.to_ascii_uppercase() || !p.letter().is_ascii_uppercase() {
            return Err(format!("pool {d:#x} became {:#x}", p.letter()));
        }
    }
    Ok(())
}

// ---- ops -------------------------------------------------------------------
//
// Input: u16 opcode, u32 output capacity, payload.

fn gen_ops(rng: &mut Rng) -> Vec<u8> {
    let op = random_opcode(rng);
    let mut out = op.to_le_bytes().to_vec();
    out.extend(edge_u32(rng).to_le_bytes());
    let p = valid_payload(rng, op);
    out.extend(bytes_or_mutation(rng, p, 64));
    out
}

fn run_ops(input: &[u8], _ctx: &Ctx) -> Verdict {
    let mut c = Cursor(input);
    let _op = c.u16();
    let out_cap = c.u32() as usize;
    let payload = c.0;
    let r = Reader::Bytes(payload);
    let _ = ops::busy_wait_duration(r);
    let _ = ops::scalar_add_operands(r);
    let _ = ops::sgemm_tf32(r);
    if let Ok(n) = ops::vector_add_len(r, out_cap) {
        if payload.len() != 8 + 8 * n || out_cap < 4 * n {
            return Err(format!("VECTOR_ADD n={n} accepted"));
        }
    }
    if let Ok((n, _)) = ops::saxpy_shape(r, out_cap) {
        if payload.len() != 8 + 8 * n || out_cap < 4 * n {
            return Err(format!("SAXPY n={n} accepted"));
        }
    }
    if let Ok(d) = ops::sgemm_shape(r, out_cap) {
        if payload.len() != d.b_offset() + d.b_bytes() || out_cap < d.c_bytes() {
            return Err(format!("SGEMM {d:?} accepted"));
        }
    }
    Ok(())
}

// ---- remoting --------------------------------------------------------------
//
// Input: u8 which parser, then its payload.

fn gen_remoting(rng: &mut Rng) -> Vec<u8> {
    let which = below(rng, 7) as u8;
    let op = match which {
        0 => Opcode::MemAlloc,
        1 => Opcode::MemFree,
        2 => Opcode::MemcpyHtoD,
        3 => Opcode::MemcpyDtoH,
        4 => Opcode::ModuleLoad,
        5 => Opcode::Launch,
        _ => Opcode::Ping, // check_range on three u64s
    };
    let valid = if which == 6 {
        [edge_u64(rng), edge_u64(rng), edge_u64(rng)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    } else {
        valid_payload(rng, op as u16)
    };
    let mut out = vec![which];
    out.extend(bytes_or_mutation(rng, valid, 128));
    out
}

fn run_remoting(input: &[u8], _ctx: &Ctx) -> Verdict {
    let mut c = Cursor(input);
    let which = c.u8() % 7;
    let p = c.0;
    match which {
        0 => {
            let _ = remoting::parse_alloc(p).map_err(|e| e.status());
        }
        1 => {
            let _ = remoting::parse_handle(p).map_err(|e| e.status());
        }
        2 => {
            let _ = remoting::parse_htod_header(p).map_err(|e| e.status());
        }
        3 => {
            let _ = remoting::parse_dtoh(p).map_err(|e| e.status());
        }
        4 => {
            if let Ok(s) = remoting::parse_ptx(p) {
                if s.as_bytes().len() > remoting::MAX_PTX_LEN || s.as_bytes().is_empty() {
                    return Err("PTX accepted out of bounds".into());
                }
            }
        }
        5 => match remoting::parse_launch(p) {
            Ok(l) => {
                if remoting::encode_launch(&l) != p {
                    return Err("accepted LAUNCH does not re-encode to its input".into());
                }
                let total: usize = l.params.iter().map(Param::size).sum();
                if l.params.len() > remoting::MAX_PARAMS || total > remoting::MAX_PARAM_BYTES {
                    return Err("LAUNCH parameters past the bounds accepted".into());
                }
            }
            Err(e) => {
                let _ = Status::from(e);
            }
        },
        _ => {
            let mut c = Cursor(p);
            let (size, off, len) = (c.u64(), c.u64(), c.u64());
            let ok = remoting::check_range(size, off, len).is_ok();
            let want = off.checked_add(len).is_some_and(|end| end <= size);
            if ok != want {
                return Err(format!("check_range({size}, {off}, {len}) = {ok}"));
            }
        }
    }
    Ok(())
}

// ---- wire ------------------------------------------------------------------
//
// Input: u8 call or reply, u32 output cap (for replies), the stream.

fn gen_wire(rng: &mut Rng) -> Vec<u8> {
    let call = chance(rng, 2);
    let mut out = vec![u8::from(call)];
    let cap = below(rng, 256) as u32;
    out.extend(cap.to_le_bytes());
    let mut stream = Vec::new();
    for _ in 0..=below(rng, 3) {
        let payload = random_bytes(rng, 64);
        let _ = if call {
            let op = Opcode::ALL[below(rng, Opcode::ALL.len() as u64) as usize];
            wire::write_call(
                &mut stream,
                op,
                edge_u32(rng),
                edge_u64(rng),
                &payload,
                below(rng, 1 << 20) as usize,
            )
        } else {
            let st = Status::from_u32(below(rng, 12) as u32).unwrap_or(Status::Ok);
            wire::write_reply(&mut stream, st, &payload)
        };
    }
    out.extend(bytes_or_mutation(rng, stream, 128));
    out
}

fn run_wire(input: &[u8], _ctx: &Ctx) -> Verdict {
    let mut c = Cursor(input);
    let call = c.u8() & 1 == 1;
    let cap = c.u32() as usize;
    let mut stream = c.0;
    // Read frames until the stream ends or one is refused.
    for _ in 0..16 {
        if call {
            match wire::read_call(&mut stream) {
                Ok(Some(call)) => {
                    if call.payload.len() as u64 > wire::MAX_FRAME_BYTES {
                        return Err("call past the frame bound".into());
                    }
                }
                Ok(None) | Err(_) => break,
            }
        } else {
            match wire::read_reply(&mut stream, cap) {
                Ok((_, out)) if out.len() > cap => {
                    return Err(format!("reply of {} bytes past cap {cap}", out.len()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    Ok(())
}

// ---- cpu -------------------------------------------------------------------
//
// Input: u16 opcode, u32 output length, u8 layout (bit 0: split payload and
// output into several descriptors; bit 1: the payload's data repeats one
// guest range, so a large claimed shape costs little guest RAM), u32 repeat
// count, payload.

fn gen_cpu(rng: &mut Rng) -> Vec<u8> {
    let op = random_opcode(rng);
    let payload = valid_payload(rng, op);
    let payload = if chance(rng, 2) {
        payload
    } else {
        mutate(rng, payload)
    };
    let out_len: u32 = match below(rng, 4) {
        0 => below(rng, 64) as u32,
        1 => edge_u32(rng).min(1 << 22),
        _ => 4096,
    };
    let mut out = op.to_le_bytes().to_vec();
    out.extend(out_len.to_le_bytes());
    out.push(below(rng, 4) as u8);
    // Large shapes through repetition: up to 64 MiB of payload.
    out.extend((below(rng, 64) as u32).to_le_bytes());
    out.extend(payload);
    out
}

fn run_cpu(input: &[u8], ctx: &Ctx) -> Verdict {
    let mut c = Cursor(input);
    let op = c.u16();
    let out_len = (c.u32() as usize).min(4 << 20);
    let layout = c.u8();
    let repeat = (c.u32() % 64) as usize;
    let payload_bytes = c.0;
    let Some(opcode) = Opcode::from_u16(op) else {
        return Ok(()); // the chain parser refuses it first (`chain` target)
    };
    let mem = ctx.cpu_mem.clone();
    let plen = payload_bytes.len().min(4 << 20);
    mem.write_slice(&payload_bytes[..plen], GuestAddress(0x1000))
        .map_err(|e| format!("{e}"))?;
    let mut payload = GuestBufs::new(mem.clone());
    let split = layout & 1 == 1;
    let push = |b: &mut GuestBufs, at: u64, len: usize| {
        b.push(GuestAddress(at), len).map_err(|e| format!("{e}"))
    };
    if split && plen > 2 {
        push(&mut payload, 0x1000, plen / 2)?;
        push(&mut payload, 0x1000 + (plen / 2) as u64, plen - plen / 2)?;
    } else {
        push(&mut payload, 0x1000, plen)?;
    }
    if layout & 2 == 2 {
        for _ in 0..repeat {
            push(&mut payload, 0x1000, 1 << 20)?;
        }
    }
    let mut output = GuestBufs::new(mem.clone());
    if split && out_len > 2 {
        push(&mut output, 6 << 20, out_len / 2)?;
        push(
            &mut output,
            (6 << 20) + 64 + (out_len / 2) as u64,
            out_len - out_len / 2,
        )?;
    } else {
        push(&mut output, 6 << 20, out_len)?;
    }
    let req = Request {
        opcode,
        tag: 7,
        payload,
        output,
    };
    let tenant = Tenant {
        vm_id: 1,
        gpu_mem_quota: 1 << 20,
    };
    let mut cpu = CpuExecutor::new(0, ctx.cpu_limit);
    let start = Instant::now();
    let result = cpu.execute(tenant, &req, ctx.cpu_limit);
    let took = start.elapsed();
    ctx.count(format!(
        "cpu {opcode:?} {}",
        result.map_or_else(|s| s.to_string(), |_| "OK".into())
    ));
    if took > ctx.slowest.get().0 {
        ctx.slowest.set((took, op, result.err()));
    }
    // "By much": the deadline is checked between rows and before writing.
    if took > ctx.cpu_limit * 10 + Duration::from_millis(200) {
        return Err(format!(
            "{opcode:?} took {took:?} with a limit of {:?}",
            ctx.cpu_limit
        ));
    }
    match result {
        Ok(n) if n as usize > req.output.len() => Err(format!(
            "{opcode:?} claims {n} output bytes of {}",
            req.output.len()
        )),
        Ok(n) => check_cpu_answer(opcode, &req, n),
        Err(Status::Ok) => Err("error status OK".into()),
        Err(_) => Ok(()),
    }
}

/// The answer of an accepted built-in op against the reference.
fn check_cpu_answer(opcode: Opcode, req: &Request, n: u32) -> Verdict {
    let p = req.payload.to_vec().map_err(|e| format!("{e}"))?;
    let out = req.output.to_vec().map_err(|e| format!("{e}"))?;
    let got = out.get(..n as usize).unwrap_or_default();
    let want: Option<Vec<u8>> = match opcode {
        Opcode::ScalarAddI32 => {
            let mut c = Cursor(&p);
            let (a, b) = (c.u32() as i32, c.u32() as i32);
            Some(a.wrapping_add(b).to_le_bytes().to_vec())
        }
        Opcode::VectorAddF32 => {
            let n = (p.len() - 8) / 8;
            let v = workload::f32s(&p[8..]);
            let r: Vec<f32> = (0..n).map(|i| v[i] + v[n + i]).collect();
            Some(workload::f32_bytes(&r))
        }
        _ => None,
    };
    match want {
        Some(w) if w != got => Err(format!("{opcode:?} answered {got:02x?}, want {w:02x?}")),
        _ => Ok(()),
    }
}

// ---- driver ----------------------------------------------------------------

fn case_seed(seed: u64, target: usize, case: u64) -> u64 {
    // splitmix64 of the three: independent streams per target and case.
    let mut z = seed ^ (target as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ case.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn run_one(t: &Target, input: &[u8], ctx: &Ctx) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| (t.run)(input, ctx))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(why)) => Err(format!("invariant broken: {why}")),
        Err(p) => Err(format!(
            "panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cpu_mem = match anonymous_memory(&[(0, 12 << 20)]) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vgpu-fuzz: guest memory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = Ctx {
        cpu_limit: Duration::from_millis(args.cpu_limit_ms),
        slowest: std::cell::Cell::new((Duration::ZERO, 0, None)),
        cpu_mem,
        outcomes: Default::default(),
    };
    let selected: Vec<(usize, &Target)> = TARGETS
        .iter()
        .enumerate()
        .filter(|(_, t)| args.target == "all" || args.target == t.name)
        .collect();
    if selected.is_empty() {
        let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
        eprintln!(
            "vgpu-fuzz: unknown target {:?} (one of {}, or all)",
            args.target,
            names.join(", ")
        );
        return ExitCode::from(2);
    }
    if let Some(h) = &args.input {
        let Some(input) = unhex(h) else {
            eprintln!("vgpu-fuzz: --input is not hex");
            return ExitCode::from(2);
        };
        let mut failed = false;
        for (_, t) in &selected {
            match run_one(t, &input, &ctx) {
                Ok(()) => println!("{}: ok", t.name),
                Err(why) => {
                    println!("{}: {why}", t.name);
                    failed = true;
                }
            }
        }
        return if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    // Panics are reported by us, once, with the input.
    std::panic::set_hook(Box::new(|_| {}));
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!(
        "vgpu-fuzz: seed {seed}, {} s over {} target(s)",
        args.seconds,
        selected.len()
    );
    let per_target = Duration::from_secs(args.seconds) / selected.len() as u32;
    let mut counts = Vec::new();
    for &(ti, t) in &selected {
        let start = Instant::now();
        let mut cases = 0u64;
        while start.elapsed() < per_target {
            let cs = case_seed(seed, ti, cases);
            let input = (t.generate)(&mut Rng::new(cs));
            if let Err(why) = run_one(t, &input, &ctx) {
                println!(
                    "vgpu-fuzz: FAILED target {} seed {seed} case {cases}: {why}\n  input {}\n  \
                     reproduce: vgpu-fuzz --target {} --input {}",
                    t.name,
                    hex(&input),
                    t.name,
                    hex(&input)
                );
                return ExitCode::FAILURE;
            }
            cases += 1;
        }
        counts.push((t.name, cases));
    }
    for (name, cases) in &counts {
        println!("{name:>10}: {cases} cases");
    }
    for (what, n) in ctx.outcomes.borrow().iter() {
        println!("  {what}: {n}");
    }
    let (took, op, status) = ctx.slowest.get();
    if took > Duration::ZERO {
        println!(
            "slowest cpu case: {took:?} (opcode {op:#06x}, {}; limit {:?})",
            status.map_or("OK".to_string(), |s| s.to_string()),
            ctx.cpu_limit
        );
    }
    ExitCode::SUCCESS
}
