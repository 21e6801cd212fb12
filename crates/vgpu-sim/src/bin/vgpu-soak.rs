//! A soak of the real daemon: `vgpu-vhost-user --executor cpu --db` on a
//! SQLite file made with `vgpu-admin`, with `--vms` simulated guests over its
//! vhost-user sockets for `--minutes`. Each guest mixes valid requests (PING,
//! SCALAR_ADD, VECTOR_ADD, SAXPY, small SGEMM; every answer checked against
//! the CPU reference) with garbage chains (each must get its documented
//! status, or come back with used length 0 when it has no room for a
//! response), disconnects and reconnects (sometimes with requests in flight),
//! while another thread changes priorities and pools in the database.
//!
//! The daemon runs as its own process (the binaries next to this one) so that
//! its memory and descriptors are measured alone: VmRSS and the entries of
//! /proc/PID/fd are sampled every 2 s and the first window of the run is
//! compared with the last. At the end: sent = answered + refused (+ abandoned
//! by a disconnect), nothing lost, every valid answer correct, the daemon
//! still up and clean on SIGTERM. Exit status 1 when any of it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use vgpu::executor::cpu;
use vgpu::protocol::{Opcode, ReqHdr, Status, REQ_HDR_SIZE, RESP_HDR_SIZE};
use vgpu_sim::workload::{self, Rng};
use vgpu_sim::{Desc, SimGuest, SimOptions, Used};

#[derive(Parser, Debug)]
#[command(
    about = "Soak the daemon: many VMs, valid and garbage traffic, reconnects, live DB changes"
)]
struct Args {
    /// Length of the run, in minutes (fractions allowed: 0.33 is 20 s).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Simulated VMs.
    #[arg(long, default_value_t = 16)]
    vms: u32,
    #[arg(long)]
    seed: Option<u64>,
    /// Directory holding vgpu-vhost-user and vgpu-admin (default: this
    /// binary's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// How long a guest waits for an answer before calling the request lost.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const SLOTS: usize = 16;
const SLOT_SIZE: usize = 8192;

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    valid_ok: AtomicU64,
    garbage_status: AtomicU64,
    garbage_len0: AtomicU64,
    abandoned: AtomicU64,
    lost: AtomicU64,
    wrong: AtomicU64,
    reconnects: AtomicU64,
    db_changes: AtomicU64,
    db_failures: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// What a request put on the ring must come back as.
enum Expect {
    /// A valid request: status OK and exactly this output.
    Answer(Vec<u8>),
    /// Garbage: this status in a response header (used length 40 + 0).
    Status(Status),
    /// Garbage without room for a response: used length 0.
    Len0,
}

struct Pending {
    head: u16,
    slot: usize,
    payload_len: usize,
    out_cap: usize,
    expect: Expect,
    what: &'static str,
}

fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.next_u64() % n.max(1)
}

/// A valid request: (opcode, payload, output capacity, expected output).
fn valid(rng: &mut Rng) -> (&'static str, Opcode, Vec<u8>, Vec<u8>) {
    match below(rng, 5) {
        0 => ("PING", Opcode::Ping, vec![], vec![]),
        1 => {
            let (a, b) = (rng.next_u64() as i32, rng.next_u64() as i32);
            (
                "SCALAR_ADD",
                Opcode::ScalarAddI32,
                workload::scalar_payload(a, b),
                a.wrapping_add(b).to_le_bytes().to_vec(),
            )
        }
        2 => {
            let n = 1 + below(rng, 256) as usize;
            let (a, b) = (rng.f32s(n), rng.f32s(n));
            (
                "VECTOR_ADD",
                Opcode::VectorAddF32,
                workload::vector_add_payload(&a, &b),
                workload::f32_bytes(&cpu::vector_add(&a, &b)),
            )
        }
        3 => {
            let n = 1 + below(rng, 256) as usize;
            let (x, y, a) = (rng.f32s(n), rng.f32s(n), rng.f32());
            (
                "SAXPY",
                Opcode::SaxpyF32,
                workload::saxpy_payload(a, &x, &y),
                workload::f32_bytes(&cpu::saxpy(a, &x, &y)),
            )
        }
        _ => {
            let (m, n, k) = (
                1 + below(rng, 16) as usize,
                1 + below(rng, 16) as usize,
                1 + below(rng, 16) as usize,
            );
            let (a, b) = (rng.f32s(m * k), rng.f32s(k * n));
            (
                "SGEMM",
                Opcode::SgemmF32,
                workload::sgemm_payload(m, n, k, &a, &b),
                workload::f32_bytes(&cpu::sgemm(m, n, k, &a, &b)),
            )
        }
    }
}

/// Puts one request (valid or garbage) on the ring in `slot`.
fn submit_one(g: &mut SimGuest, rng: &mut Rng, slot: usize, tag: u64) -> vgpu_sim::Result<Pending> {
    let base = g.slot(slot);
    let mem_end = g.options().mem_size as u64;
    let kind = below(rng, 10);
    if kind < 6 {
        let (what, op, payload, want) = valid(rng);
        let hdr = ReqHdr::new(op as u16, tag, payload.len() as u32);
        let head = g.submit(slot, &hdr, &payload, want.len())?;
        return Ok(Pending {
            head,
            slot,
            payload_len: payload.len(),
            out_cap: want.len(),
            expect: Expect::Answer(want),
            what,
        });
    }
    let pending = |head, what, expect, payload_len| Pending {
        head,
        slot,
        payload_len,
        out_cap: 0,
        expect,
        what,
    };
    let ping = ReqHdr::new(Opcode::Ping as u16, tag, 0);
    Ok(match below(rng, 10) {
        0 => {
            let h = ReqHdr { version: 2, ..ping };
            let head = g.submit(slot, &h, &[], 0)?;
            pending(head, "bad version", Expect::Status(Status::BadRequest), 0)
        }
        1 => {
            let h = ReqHdr::new(0x7777, tag, 0);
            let head = g.submit(slot, &h, &[], 0)?;
            pending(
                head,
                "unknown opcode",
                Expect::Status(Status::Unsupported),
                0,
            )
        }
        2 => {
            let h = ReqHdr { flags: 1, ..ping };
            let head = g.submit(slot, &h, &[], 0)?;
            pending(head, "nonzero flags", Expect::Status(Status::BadRequest), 0)
        }
        3 => {
            // payload_len past the readable bytes: the response goes right
            // after the 8 bytes that are there.
            let h = ReqHdr::new(Opcode::ScalarAddI32 as u16, tag, 4096);
            let head = g.submit(slot, &h, &[0; 8], 0)?;
            pending(
                head,
                "payload past end",
                Expect::Status(Status::BadRequest),
                8,
            )
        }
        4 => {
            // A payload of the wrong size for its opcode: the executor refuses it.
            let h = ReqHdr::new(Opcode::ScalarAddI32 as u16, tag, 5);
            let head = g.submit(slot, &h, &[1; 5], 4)?;
            Pending {
                out_cap: 4,
                ..pending(head, "bad payload", Expect::Status(Status::BadRequest), 5)
            }
        }
        5 => {
            // A readable descriptor outside guest memory.
            g.write(base, &ping.encode())?;
            let head = g.add_chain(&[
                Desc::r(base, REQ_HDR_SIZE as u32),
                Desc::r(mem_end + 0x1000, 64),
                Desc::w(base + REQ_HDR_SIZE as u64, RESP_HDR_SIZE as u32),
            ])?;
            pending(
                head,
                "descriptor outside memory",
                Expect::Status(Status::BadRequest),
                0,
            )
        }
        6 => {
            // Readable after writable.
            g.write(base, &ping.encode())?;
            let head = g.add_chain(&[
                Desc::w(base + REQ_HDR_SIZE as u64, RESP_HDR_SIZE as u32),
                Desc::r(base, REQ_HDR_SIZE as u32),
            ])?;
            // The response header is written to the writable part anyway.
            Pending {
                payload_len: usize::MAX, // response at base + 24, see below
                ..pending(
                    head,
                    "readable after writable",
                    Expect::Status(Status::BadRequest),
                    0,
                )
            }
        }
        7 => {
            // No writable part at all.
            g.write(base, &ping.encode())?;
            let head = g.add_chain(&[Desc::r(base, REQ_HDR_SIZE as u32)])?;
            pending(head, "no writable part", Expect::Len0, 0)
        }
        8 => {
            // A short header, then a response buffer.
            g.write(base, &ping.encode())?;
            let head = g.add_chain(&[
                Desc::r(base, 10),
                Desc::w(base + REQ_HDR_SIZE as u64, RESP_HDR_SIZE as u32),
            ])?;
            Pending {
                payload_len: usize::MAX,
                ..pending(head, "short header", Expect::Status(Status::BadRequest), 0)
            }
        }
        _ => {
            // An indirect table claiming more entries than the queue holds
            // (one-byte reads of the header): refused without a response.
            let table = base + 256;
            let entries = 1024u32;
            for i in 0..entries.min(((SLOT_SIZE - 256) / 16) as u32) {
                let d = virtio_queue::desc::split::Descriptor::new(base, 1, 1, (i + 1) as u16);
                g.write(
                    table + 16 * u64::from(i),
                    vm_memory::ByteValued::as_slice(&d),
                )?;
            }
            g.write(base, &ping.encode())?;
            let head = g.add_indirect_table(table, entries)?;
            pending(head, "oversized indirect table", Expect::Len0, 0)
        }
    })
}

/// Checks one completed request; returns a description of what is wrong.
fn check(g: &SimGuest, p: &Pending, used: &Used, tag: u64) -> Result<bool, String> {
    match &p.expect {
        Expect::Len0 => {
            if used.len == 0 {
                Ok(false)
            } else {
                Err(format!("{}: used length {}, want 0", p.what, used.len))
            }
        }
        Expect::Status(st) => {
            let hdr = if p.payload_len == usize::MAX {
                let raw = g
                    .read(g.slot(p.slot) + REQ_HDR_SIZE as u64, RESP_HDR_SIZE)
                    .map_err(|e| e.to_string())?;
                vgpu::protocol::RespHdr::decode(&raw).map_err(|e| e.to_string())?
            } else {
                g.response(p.slot, p.payload_len, p.out_cap)
                    .map_err(|e| e.to_string())?
                    .0
            };
            // Without a readable header there is no tag to echo.
            let headerless = matches!(p.what, "short header" | "readable after writable");
            let want_tag = if headerless { 0 } else { tag };
            if hdr.status != *st as u32 || used.len != RESP_HDR_SIZE as u32 || hdr.tag != want_tag {
                return Err(format!(
                    "{}: status {} used {} tag {:#x}, want {st} used 40 tag {want_tag:#x}",
                    p.what, hdr.status, used.len, hdr.tag
                ));
            }
            Ok(false)
        }
        Expect::Answer(want) => {
            let (hdr, out) = g
                .response(p.slot, p.payload_len, p.out_cap)
                .map_err(|e| e.to_string())?;
            if hdr.status != 0
                || hdr.tag != tag
                || hdr.output_len as usize != want.len()
                || used.len as usize != RESP_HDR_SIZE + want.len()
                || &out != want
            {
                return Err(format!(
                    "{}: status {} tag {:#x} (want {tag:#x}) output {} bytes (want {}), used {}{}",
                    p.what,
                    hdr.status,
                    hdr.tag,
                    hdr.output_len,
                    want.len(),
                    used.len,
                    if &out != want { ", output differs" } else { "" }
                ));
            }
            Ok(true)
        }
    }
}

fn connect(socket: &Path) -> vgpu_sim::Result<SimGuest> {
    let opts = SimOptions {
        slot_size: SLOT_SIZE,
        mem_size: 4 << 20,
        ..Default::default()
    };
    SimGuest::connect_retry(socket, opts, Duration::from_secs(30))
}

/// One VM: rounds of up to SLOTS requests, answered and checked, with a
/// reconnect now and then.
fn guest_loop(
    vm: u32,
    socket: PathBuf,
    seed: u64,
    until: Instant,
    counts: &Counts,
    errors: &Mutex<Vec<String>>,
) {
    let mut rng = Rng::new(seed ^ u64::from(vm).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let fail = |msg: String| {
        let mut e = errors.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() < 50 {
            e.push(format!("vm{vm}: {msg}"));
        }
    };
    let mut tag_base = u64::from(vm) << 48;
    while Instant::now() < until {
        let mut g = match connect(&socket) {
            Ok(g) => g,
            Err(e) => {
                fail(format!("connect: {e}"));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let rounds = 1 + below(&mut rng, 200);
        for _ in 0..rounds {
            if Instant::now() >= until {
                break;
            }
            let n = 1 + below(&mut rng, SLOTS as u64) as usize;
            let mut pending = Vec::new();
            for slot in 0..n {
                tag_base += 1;
                match submit_one(&mut g, &mut rng, slot, tag_base) {
                    Ok(p) => pending.push((tag_base, p)),
                    Err(e) => fail(format!("submit: {e}")),
                }
            }
            add(&counts.sent, pending.len() as u64);
            if let Err(e) = g.kick() {
                fail(format!("kick: {e}"));
            }
            // Now and then the VM goes away with requests in flight.
            if below(&mut rng, 400) == 0 {
                add(&counts.abandoned, pending.len() as u64);
                pending.clear();
                break;
            }
            let heads: Vec<u16> = pending.iter().map(|(_, p)| p.head).collect();
            let used = match g.wait_all(&heads, ANSWER_TIMEOUT) {
                Ok(u) => u,
                Err(e) => {
                    add(&counts.lost, pending.len() as u64);
                    fail(format!("{} requests unanswered: {e}", pending.len()));
                    break;
                }
            };
            for (tag, p) in &pending {
                let Some(u) = used.iter().find(|u| u.head == p.head) else {
                    add(&counts.lost, 1);
                    continue;
                };
                match check(&g, p, u, *tag) {
                    Ok(true) => add(&counts.valid_ok, 1),
                    Ok(false) if matches!(p.expect, Expect::Len0) => add(&counts.garbage_len0, 1),
                    Ok(false) => add(&counts.garbage_status, 1),
                    Err(e) => {
                        add(&counts.wrong, 1);
                        fail(e);
                    }
                }
            }
        }
        drop(g);
        add(&counts.reconnects, 1);
    }
}

fn uuid(vm: u32) -> String {
    format!("{vm:08x}-0000-4000-8000-{vm:012x}")
}

fn admin(bin: &Path, db: &Path, dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new(bin.join("vgpu-admin"))
        .arg("--db")
        .arg(db)
        .arg("--socket-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("vgpu-admin: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "vgpu-admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// (VmRSS in KiB, open descriptors) of a process.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// What a process's descriptors point at, counted by kind.
fn fd_kinds(pid: u32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, u32>::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            // "socket:[123]" without the inode; "anon_inode:[eventfd]" as it is.
            let kind = match target.split_once(":[") {
                Some((k, rest)) if rest.starts_with(|c: char| c.is_ascii_digit()) => k.to_string(),
                _ => target,
            };
            let kind = if kind.starts_with('/') {
                "file".into()
            } else {
                kind
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

struct DaemonGuard(Child);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vgpu-soak: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<bool, String> {
    let bin = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .ok_or("cannot find this binary's directory")?,
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let run_for = Duration::from_secs_f64((args.minutes * 60.0).max(1.0));
    let tmp = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let dir = tmp.path();
    let db = dir.join("vgpu.db");
    admin(&bin, &db, dir, &["init"])?;
    let prios = ["low", "medium", "high"];
    for vm in 1..=args.vms {
        let pool = if vm % 2 == 0 { "B" } else { "A" };
        let id = vm.to_string();
        admin(
            &bin,
            &db,
            dir,
            &[
                "register-vm",
                &uuid(vm),
                "--pool",
                pool,
                "--priority",
                prios[vm as usize % 3],
                "--vm-id",
                &id,
                "--name",
                &format!("soak{vm}"),
            ],
        )?;
    }
    let child = Command::new(bin.join("vgpu-vhost-user"))
        .args(["--executor", "cpu", "--db"])
        .arg(&db)
        .arg("--socket-dir")
        .arg(dir)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start vgpu-vhost-user: {e}"))?;
    let mut daemon = DaemonGuard(child);
    let pid = daemon.0.id();
    println!(
        "vgpu-soak: seed {seed}, {} VMs, {:.0} s, daemon pid {pid}, db {}",
        args.vms,
        run_for.as_secs_f64(),
        db.display()
    );

    // Before any VM connects (once every socket is there).
    let sockets_up = Instant::now() + Duration::from_secs(30);
    while (1..=args.vms).any(|vm| !vgpu::config::vm_socket(dir, vm).exists())
        && Instant::now() < sockets_up
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let idle_before = sample(pid);
    let counts = Arc::new(Counts::default());
    let errors = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let until = start + run_for;
    let mut threads = Vec::new();
    for vm in 1..=args.vms {
        let (counts, errors) = (counts.clone(), errors.clone());
        let socket = vgpu::config::vm_socket(dir, vm);
        threads.push(std::thread::spawn(move || {
            guest_loop(vm, socket, seed, until, &counts, &errors)
        }));
    }
    // Live changes to the database: priorities and pools.
    let changer = {
        let (counts, errors, stop) = (counts.clone(), errors.clone(), stop.clone());
        let (bin, db, dir) = (bin.clone(), db.clone(), dir.to_path_buf());
        let vms = args.vms;
        std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0xdb);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500 + below(&mut rng, 1500)));
                let vm = 1 + below(&mut rng, u64::from(vms)) as u32;
                let r = if below(&mut rng, 3) == 0 {
                    let pool = if below(&mut rng, 2) == 0 { "A" } else { "B" };
                    admin(&bin, &db, &dir, &["set-pool", &uuid(vm), pool])
                } else {
                    let p = prios[below(&mut rng, 3) as usize];
                    admin(&bin, &db, &dir, &["set-priority", &uuid(vm), p])
                };
                match r {
                    Ok(()) => add(&counts.db_changes, 1),
                    Err(e) => {
                        add(&counts.db_failures, 1);
                        let mut e2 = errors.lock().unwrap_or_else(|p| p.into_inner());
                        e2.push(e);
                    }
                }
            }
        })
    };
    // Samples of the daemon's RSS and descriptors.
    let mut samples: Vec<(Duration, u64, u64)> = Vec::new();
    let mut next_report = start + Duration::from_secs(60);
    while Instant::now() < until {
        std::thread::sleep(
            Duration::from_secs(2).min(until.saturating_duration_since(Instant::now())),
        );
        match sample(pid) {
            Some((rss, fds)) => samples.push((start.elapsed(), rss, fds)),
            None => {
                errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push("daemon process gone".into());
                break;
            }
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            println!(
                "  {:>4.0} s: sent {} valid ok {} garbage {}+{} rss {} KiB fds {}",
                start.elapsed().as_secs_f64(),
                get(&counts.sent),
                get(&counts.valid_ok),
                get(&counts.garbage_status),
                get(&counts.garbage_len0),
                samples.last().map_or(0, |s| s.1),
                samples.last().map_or(0, |s| s.2),
            );
        }
    }
    for t in threads {
        let _ = t.join();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = changer.join();
    // Every VM is gone again: what the daemon holds now should be what it
    // held before the first connected (after it has noticed the hang-ups).
    // Polled (up to 30 s) rather than slept: a loaded machine may take a
    // while to reap the last connections.
    let settle = Instant::now() + Duration::from_secs(30);
    let idle_after = loop {
        let now = sample(pid);
        let settled = matches!((now, idle_before), (Some(a), Some(b)) if a.1 <= b.1 + 2);
        if settled || now.is_none() || Instant::now() > settle {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let fd_kinds = fd_kinds(pid);
    let alive = matches!(daemon.0.try_wait(), Ok(None));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        match daemon.0.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => break None,
        }
    };

    // The report.
    let c = &counts;
    let (sent, ok, gs, g0, ab, lost, wrong) = (
        get(&c.sent),
        get(&c.valid_ok),
        get(&c.garbage_status),
        get(&c.garbage_len0),
        get(&c.abandoned),
        get(&c.lost),
        get(&c.wrong),
    );
    println!(
        "vgpu-soak: {:.0} s, {} VMs",
        start.elapsed().as_secs_f64(),
        args.vms
    );
    println!("  sent                          {sent}");
    println!("  valid, answered correctly     {ok}");
    println!("  garbage, documented status    {gs}");
    println!("  garbage, returned (used 0)    {g0}");
    println!("  abandoned by a disconnect     {ab}");
    println!("  wrong answers                 {wrong}");
    println!("  lost (never returned)         {lost}");
    println!(
        "  reconnects {}  db changes {} (failed {})",
        get(&c.reconnects),
        get(&c.db_changes),
        get(&c.db_failures)
    );
    let balanced = sent == ok + gs + g0 + ab + lost + wrong;
    println!(
        "  sent = answered + refused + abandoned: {}",
        if balanced { "yes" } else { "NO" }
    );
    let window = (run_for / 3).min(Duration::from_secs(60));
    let stats = |from: Duration, to: Duration| {
        let w: Vec<_> = samples
            .iter()
            .filter(|s| s.0 >= from && s.0 <= to)
            .collect();
        let max_rss = w.iter().map(|s| s.1).max().unwrap_or(0);
        let max_fds = w.iter().map(|s| s.2).max().unwrap_or(0);
        let avg_rss = w.iter().map(|s| s.1).sum::<u64>() / (w.len() as u64).max(1);
        (avg_rss, max_rss, max_fds)
    };
    let end = samples.last().map_or(Duration::ZERO, |s| s.0);
    let first = stats(Duration::ZERO, window);
    let last = stats(end.saturating_sub(window), end);
    println!(
        "  daemon RSS first {:.0} s: avg {} KiB max {} KiB; last {:.0} s: avg {} KiB max {} KiB",
        window.as_secs_f64(),
        first.0,
        first.1,
        window.as_secs_f64(),
        last.0,
        last.1
    );
    println!(
        "  daemon fds first window max {}; last window max {}",
        first.2, last.2
    );
    // Flat: the last window's peak within a quarter (plus 16 MiB of allocator
    // slack) of the first's. While running, a VM holds 0 to ~8 descriptors
    // depending on where in a reconnect it is, so the windows may differ by
    // that much per VM; the strict check is the idle count below.
    let rss_flat = last.1 <= first.1 + first.1 / 4 + 16 * 1024;
    let fds_flat = last.2 <= first.2 + 8 * u64::from(args.vms);
    println!(
        "  memory flat: {}  fds flat: {}  daemon alive at the end: {}  exit on SIGTERM: {}",
        rss_flat,
        fds_flat,
        alive,
        exit.map_or("none (killed)".to_string(), |s| s.to_string())
    );
    println!(
        "  idle (no VM connected) before: {} ; after: {}",
        idle_before.map_or("-".into(), |(r, f)| format!("rss {r} KiB, {f} fds")),
        idle_after.map_or("-".into(), |(r, f)| format!("rss {r} KiB, {f} fds")),
    );
    println!("  daemon fds after, by kind: {fd_kinds}");
    let idle_fds_flat = match (idle_before, idle_after) {
        (Some(b), Some(a)) => a.1 <= b.1 + 2,
        _ => false,
    };
    println!("  idle fds flat: {idle_fds_flat}");
    let errors = errors.lock().unwrap_or_else(|p| p.into_inner());
    for e in errors.iter().take(20) {
        println!("  error: {e}");
    }
    let exit_ok = exit.is_some_and(|s| s.success());
    Ok(balanced
        && lost == 0
        && wrong == 0
        && errors.is_empty()
        && alive
        && exit_ok
        && rss_flat
        && fds_flat
        && idle_fds_flat)
}
