//! Daemon section: the daemon runs in this process with the CUDA executor,
//! simulated guests (vhost-user frontend, memfd guest RAM, split ring,
//! kick/call eventfds) talk to it over its sockets, and every number is
//! printed beside direct cudarc doing the same work in the same run
//! (`direct.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vgpu::config::{DaemonConfig, FileConfig, Register, VmSpec};
use vgpu::daemon::Daemon;
use vgpu::executor::cpu::vector_add;
use vgpu::executor::ExecutorChoice;
use vgpu::protocol::{
    DeviceInfo, ExecutorKind, Opcode, PoolId, Priority, ReqHdr, RespHdr, Status, INFO_SIZE,
    REQ_HDR_SIZE, RESP_HDR_SIZE,
};
use vgpu_sim::{Desc, SimGuest, SimOptions, DATA_BASE};

use crate::direct::Direct;
use crate::{pct, report_lat, us, Res};
use vgpu_sim::workload::{self as common, Rng};

pub struct Opts {
    pub iters: usize,
    pub sgemm_n: usize,
    /// Seconds per throughput measurement.
    pub seconds: f64,
    /// Requests each VM keeps in flight in the throughput runs.
    pub window: usize,
    /// VMs submitting concurrently in the throughput run.
    pub vms: usize,
}

const T: Duration = Duration::from_secs(120);

/// The daemon section; `remoting_only`: only the remoting copy rows.
pub fn run(o: &Opts, remoting_only: bool) -> Res<()> {
    let dir = std::env::temp_dir().join(format!("vgpu-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let big_id = o.vms as u32 + 1;
    // After the big one: the victim, the newcomer and the remoting VM of
    // `startup.rs`, then a VM whose memory is never registered (staging).
    let staging_id = big_id + 4;
    let vms: Vec<VmSpec> = (1..=staging_id)
        .map(|id| VmSpec {
            vm_id: id,
            pool: PoolId::DEFAULT,
            priority: Priority::Medium,
            socket: vgpu::config::vm_socket(&dir, id),
            max_queued: Some(o.window.max(1)),
            register: (id == staging_id).then_some(Register::Staging),
        })
        .collect();
    let file = FileConfig::embedded()?;
    let mut cfg = DaemonConfig::resolve(file, vms.clone())?;
    cfg.executor = ExecutorChoice::Cuda;
    cfg.exec_limit = Duration::from_secs(60);
    let daemon = Daemon::start(&cfg)?;
    let sockets: Vec<PathBuf> = vms.iter().map(|v| v.socket.clone()).collect();
    let result = if remoting_only {
        remoting_rows(&daemon, &sockets)
    } else {
        sections(o, &daemon, &sockets)
    };
    daemon.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `poll_us` of the embedded defaults (the daemon here runs with them).
fn cfg_poll_us() -> String {
    FileConfig::embedded()
        .ok()
        .and_then(|f| f.poll_us)
        .map_or("?".into(), |p| p.to_string())
}

fn check(h: &RespHdr, what: &str) -> Res<()> {
    if h.status != Status::Ok as u32 {
        let s = Status::from_u32(h.status).map_or(h.status.to_string(), |s| s.to_string());
        return Err(format!("{what}: status {s}").into());
    }
    Ok(())
}

/// A request laid out once in guest memory at `base` (header and payload,
/// then response header and output), re-submitted as the same two
/// descriptors, as a guest that reuses its buffers does.
struct Laid {
    base: u64,
    rlen: usize,
    wlen: usize,
}

impl Laid {
    fn new(g: &SimGuest, base: u64, op: Opcode, payload: &[u8], out: usize) -> Res<Laid> {
        let hdr = ReqHdr::new(op as u16, 1, u32::try_from(payload.len())?);
        g.write(base, &hdr.encode())?;
        g.write(base + REQ_HDR_SIZE as u64, payload)?;
        Ok(Laid {
            base,
            rlen: REQ_HDR_SIZE + payload.len(),
            wlen: RESP_HDR_SIZE + out,
        })
    }

    fn wbase(&self) -> u64 {
        self.base + self.rlen as u64
    }

    /// One round trip: add the chain, kick, wait for it, read the header.
    fn call(&self, g: &mut SimGuest) -> Res<RespHdr> {
        let head = g.add_chain(&[
            Desc::r(self.base, u32::try_from(self.rlen)?),
            Desc::w(self.wbase(), u32::try_from(self.wlen)?),
        ])?;
        g.kick()?;
        g.wait_all(&[head], T)?;
        Ok(RespHdr::decode(&g.read(self.wbase(), RESP_HDR_SIZE)?)?)
    }

    fn output(&self, g: &SimGuest) -> Res<Vec<f32>> {
        let out = g.read(
            self.wbase() + RESP_HDR_SIZE as u64,
            self.wlen - RESP_HDR_SIZE,
        )?;
        Ok(common::f32s(&out))
    }
}

fn ratio_line(what: &str, ratio: f64, target: f64) {
    println!(
        "  -> {what}: {:.1} % (target >= {:.0} %: {})",
        ratio * 100.0,
        target * 100.0,
        if ratio >= target { "met" } else { "NOT met" }
    );
}

/// `--only remoting`: the 64 MiB remoting copies beside pinned copies.
fn remoting_rows(daemon: &Daemon, sockets: &[PathBuf]) -> Res<()> {
    let sock = sockets.last().ok_or("no VMs")?;
    let direct = Direct::new(0)?;
    crate::startup::remoting_copies(daemon, sock, &direct)
}

fn sections(o: &Opts, daemon: &Daemon, sockets: &[PathBuf]) -> Res<()> {
    let n = o.sgemm_n;
    let [victim, newcomer, remoting, staging] = sockets.get(o.vms + 1..).unwrap_or_default() else {
        return Err("no VMs for the startup rows".into());
    };
    let sockets = &sockets[..=o.vms];
    let (big_sock, small_socks) = sockets.split_last().ok_or("no VMs")?;
    // One guest big enough for SGEMM n^3 (A, B in; C out) and VECTOR_ADD of
    // 16 Mi floats; requests start 1 MiB into the data area, slot 0 stays
    // free for the small ones.
    let sgemm_bytes = REQ_HDR_SIZE + 12 + 12 * n * n + RESP_HDR_SIZE;
    let vadd_bytes = REQ_HDR_SIZE + 8 + 12 * (16 << 20) + RESP_HDR_SIZE;
    let big_base = DATA_BASE + (1 << 20);
    let mem_size = (big_base as usize + sgemm_bytes.max(vadd_bytes) + (2 << 20)) & !0xfffff;
    let t = Instant::now();
    let mut g = SimGuest::connect_retry(
        big_sock,
        SimOptions {
            mem_size,
            ..Default::default()
        },
        Duration::from_secs(20),
    )?;
    let (h, out) = g.call(Opcode::GetInfo as u16, 1, &[], INFO_SIZE)?;
    check(&h, "GET_INFO")?;
    let info = DeviceInfo::decode(&out)?;
    if info.executor != ExecutorKind::Cuda {
        return Err(format!("the daemon runs the {:?} executor", info.executor).into());
    }
    let answered = t.elapsed();
    // Registration runs off the GPU thread: wait for it, so that the rows
    // below measure zero-copy DMA (PINGs publish the counters).
    let want = (mem_size as u64) & !0xfff;
    while crate::startup::registered(daemon) < want && t.elapsed() < Duration::from_secs(60) {
        g.call(Opcode::Ping as u16, 0, &[], 0)?;
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "daemon: CUDA executor on {}; guest of {} MiB connected and answered in {:.1} ms, registered after {:.1} ms",
        info.name,
        mem_size >> 20,
        answered.as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e3
    );
    let direct = Direct::new(info.gpu_index as usize)?;
    crate::startup::rows(
        daemon,
        &crate::startup::Vms {
            victim,
            newcomer,
            remoting,
        },
        &direct,
        1024,
    )?;

    println!("\n== daemon: SCALAR_ADD round trip (one request at a time) ==");
    for _ in 0..1000 {
        g.call(Opcode::Ping as u16, 0, &[], 0)?;
    }
    let mut v = Vec::with_capacity(o.iters);
    let (cpu0, wall0) = (common::process_cpu_time(), Instant::now());
    for i in 0..o.iters {
        let t = Instant::now();
        let (h, _) = g.call(Opcode::Ping as u16, i as u64, &[], 0)?;
        v.push(t.elapsed());
        check(&h, "PING")?;
    }
    let cores = (common::process_cpu_time() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();
    let (idle0, idle_wall) = (common::process_cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let idle =
        (common::process_cpu_time() - idle0).as_secs_f64() / idle_wall.elapsed().as_secs_f64();
    let (p50, _) = report_lat("PING through the daemon (no GPU work)", v);
    let (f50, _) = report_lat(
        "eventfd ping-pong between two threads (the floor)",
        common::eventfd_pingpong(o.iters)?,
    );
    println!(
        "  -> PING / eventfd floor: {:.2}x p50 (target <= 1.0x on the GPU host: {}); CPU while pinging: {:.2} cores (guest, ring thread and GPU worker polling, poll_us {}), idle afterwards: {:.3} cores",
        p50 / f50,
        if p50 <= f50 { "met" } else { "NOT met" },
        cores,
        cfg_poll_us(),
        idle
    );
    let payload = common::scalar_payload(40, 2);
    for _ in 0..1000 {
        g.call(Opcode::ScalarAddI32 as u16, 0, &payload, 4)?;
    }
    let (mut v, mut exec) = (Vec::with_capacity(o.iters), Vec::with_capacity(o.iters));
    for i in 0..o.iters {
        let t = Instant::now();
        let (h, out) = g.call(Opcode::ScalarAddI32 as u16, i as u64, &payload, 4)?;
        v.push(t.elapsed());
        check(&h, "SCALAR_ADD")?;
        if out != 42i32.to_le_bytes() {
            return Err("SCALAR_ADD through the daemon wrong".into());
        }
        exec.push(Duration::from_nanos(h.exec_ns));
    }
    let (d50, d99) = report_lat("SCALAR_ADD through the daemon (guest memfd RAM)", v);
    let (e50, _) = report_lat("  of which exec_ns (executor: kernel, 4 B out, sync)", exec);
    let (c50, c99) = report_lat(
        "SCALAR_ADD, cudarc: 8 B in, kernel, 4 B out, sync",
        direct.scalar_latency(o.iters, true)?,
    );
    let (k50, _) = report_lat(
        "SCALAR_ADD, cudarc: kernel, 4 B out, sync",
        direct.scalar_latency(o.iters, false)?,
    );
    println!(
        "  -> daemon - cudarc (copy in): {:+.2} us p50, {:+.2} us p99 (target <= +3 us: {})",
        d50 - c50,
        d99 - c99,
        if d50 - c50 <= 3.0 { "met" } else { "NOT met" }
    );
    println!(
        "  -> daemon - cudarc (no copy in): {:+.2} us p50; request path outside the executor: {:.2} us p50; executor - cudarc (no copy in): {:+.2} us",
        d50 - k50,
        d50 - e50,
        e50 - k50
    );

    println!("\n== daemon: VECTOR_ADD_F32, copies included (payload in guest memfd RAM) ==");
    let mut rng = Rng::new(4242);
    for (len, reps) in [(1usize << 20, 200usize), (16 << 20, 20)] {
        let (a, b) = (rng.f32s(len), rng.f32s(len));
        let req = Laid::new(
            &g,
            big_base,
            Opcode::VectorAddF32,
            &common::vector_add_payload(&a, &b),
            4 * len,
        )?;
        check(&req.call(&mut g)?, "VECTOR_ADD")?;
        if req.output(&g)? != vector_add(&a, &b) {
            return Err("VECTOR_ADD through the daemon differs from the CPU".into());
        }
        let mut v = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            let h = req.call(&mut g)?;
            v.push(t.elapsed());
            check(&h, "VECTOR_ADD")?;
        }
        let bytes = 12.0 * len as f64;
        let p50 = pct(&mut v, 0.5);
        println!(
            "{:<58} p50 {:8.1} us   {:6.1} GB/s moved",
            format!("{} Mi floats through the daemon", len >> 20),
            us(p50),
            bytes / p50.as_secs_f64() / 1e9
        );
        let (dp50, dout) = direct.vector_add(&a, &b, reps)?;
        println!(
            "{:<58} p50 {:8.1} us   {:6.1} GB/s moved",
            format!("{} Mi floats, cudarc (pinned buffers)", len >> 20),
            us(dp50),
            bytes / dp50.as_secs_f64() / 1e9
        );
        if dout != req.output(&g)? {
            return Err("VECTOR_ADD daemon and cudarc disagree".into());
        }
        ratio_line(
            "daemon throughput / cudarc pinned",
            dp50.as_secs_f64() / p50.as_secs_f64(),
            if len == 1 << 20 { 0.95 } else { 0.97 },
        );
    }
    staging_rows(staging, mem_size, &mut rng)?;

    println!("\n== daemon: SGEMM_F32 {n}x{n}x{n} ==");
    let (ma, mb) = (rng.f32s(n * n), rng.f32s(n * n));
    let req = Laid::new(
        &g,
        big_base,
        Opcode::SgemmF32,
        &common::sgemm_payload(n, n, n, &ma, &mb),
        4 * n * n,
    )?;
    check(&req.call(&mut g)?, "SGEMM")?;
    let reps = 3;
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let h = req.call(&mut g)?;
        best = best.min(t.elapsed());
        check(&h, "SGEMM")?;
    }
    let flops = 2.0 * (n as f64).powi(3);
    let line = |what: &str, d: Duration| {
        println!(
            "{:<58} best {:8.2} ms   {:8.0} GFLOP/s",
            what,
            d.as_secs_f64() * 1e3,
            flops / d.as_secs_f64() / 1e9
        )
    };
    line("through the daemon (copies of A, B, C included)", best);
    let (ds, what) = match direct.cublas_sgemm(n, &ma, &mb, reps, false)? {
        Some(c) => (c, "cuBLAS FP32"),
        None => (direct.sgemm(n, &ma, &mb, reps)?, "cudarc, built-in kernel"),
    };
    line(
        &format!("{what}, serial pinned copies included"),
        ds.with_copies,
    );
    line(
        &format!("{what}, kernel only (device-resident)"),
        ds.kernel_only,
    );
    let c = req.output(&g)?;
    let diff = c
        .iter()
        .zip(&ds.c)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    if diff > 1e-5 * n as f32 + 1e-6 {
        return Err(
            format!("SGEMM daemon and {what} disagree (max abs difference {diff:.2e})").into(),
        );
    }
    let mut worst = 0f64;
    for _ in 0..64 {
        let (i, j) = ((rng.next_u64() as usize) % n, (rng.next_u64() as usize) % n);
        let want: f64 = (0..n)
            .map(|p| ma[i * n + p] as f64 * mb[p * n + j] as f64)
            .sum();
        worst = worst.max((c[i * n + j] as f64 - want).abs());
    }
    println!("SGEMM spot check vs f64 CPU dot products: max abs error {worst:.2e}");
    ratio_line(
        "daemon / direct with serial copies",
        ds.with_copies.as_secs_f64() / best.as_secs_f64(),
        1.1,
    );
    println!(
        "  -> daemon / direct kernel only: {:.1} %",
        ds.kernel_only.as_secs_f64() / best.as_secs_f64() * 100.0
    );
    drop(g);

    let span = Duration::from_secs_f64(o.seconds);
    println!(
        "\n== daemon: SCALAR_ADD aggregate throughput, pipelined ({} in flight per VM, {:.1} s each) ==",
        o.window, o.seconds
    );
    // A batched request's exec_ns is its whole batch's time, so the mean
    // exec_ns is about the mean batch time.
    let (one_vm, exec1) = throughput(&small_socks[..1], o.window, span)?;
    println!(
        "{:<58} {:10.0} requests/s   mean exec_ns {:7.2} us",
        "1 VM through the daemon", one_vm, exec1
    );
    let (all, exec) = throughput(small_socks, o.window, span)?;
    println!(
        "{:<58} {:10.0} requests/s   mean exec_ns {:7.2} us",
        format!("{} VMs through the daemon", small_socks.len()),
        all,
        exec
    );
    let d1 = direct.scalar_throughput(1, span)?;
    println!(
        "{:<58} {:10.0} ops/s",
        "cudarc, 1 thread (kernel, 4 B out, sync)", d1
    );
    let dn = direct.scalar_throughput(small_socks.len(), span)?;
    println!(
        "{:<58} {:10.0} ops/s",
        format!(
            "cudarc, {} threads, a stream each (kernel, 4 B out, sync)",
            small_socks.len()
        ),
        dn
    );
    ratio_line(
        &format!(
            "{} VMs through the daemon / cudarc {} threads",
            small_socks.len(),
            small_socks.len()
        ),
        all / dn,
        0.8,
    );
    println!(
        "  -> {} VMs through the daemon / cudarc 1 thread: {:.1} %",
        small_socks.len(),
        all / d1 * 100.0
    );
    Ok(())
}

/// Every VM keeps `window` SCALAR_ADDs in flight for `span`; returns
/// completed requests per second, all VMs together, and their mean exec_ns
/// in µs (for batched requests, the time of the batch). Every answer is
/// checked.
fn throughput(sockets: &[PathBuf], window: usize, span: Duration) -> Res<(f64, f64)> {
    let start = Arc::new(Barrier::new(sockets.len() + 1));
    let stop = Arc::new(AtomicBool::new(false));
    // Requests done, and the sum of their exec_ns.
    let done = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let threads: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(vm, socket)| {
            let (socket, start, stop, done) =
                (socket.clone(), start.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let r = pipeline(&socket, vm as i32, window, &start, &stop, &done);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                r.map_err(|e| e.to_string())
            })
        })
        .collect();
    start.wait();
    let before = [0, 1].map(|i| done[i].load(Ordering::Relaxed));
    let t = Instant::now();
    std::thread::sleep(span);
    let after = [0, 1].map(|i| done[i].load(Ordering::Relaxed));
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().map_err(|_| "guest thread panicked")??;
    }
    Ok((
        (after[0] - before[0]) as f64 / elapsed.as_secs_f64(),
        (after[1] - before[1]) as f64 / (after[0] - before[0]).max(1) as f64 / 1e3,
    ))
}

fn pipeline(
    socket: &Path,
    vm: i32,
    window: usize,
    start: &Barrier,
    stop: &AtomicBool,
    done: &[AtomicU64; 2],
) -> Res<()> {
    let mut started = false;
    let r = pipeline_run(socket, vm, window, start, stop, done, &mut started);
    if !started {
        // Do not leave the others waiting at the barrier.
        start.wait();
    }
    r
}

fn pipeline_run(
    socket: &Path,
    vm: i32,
    window: usize,
    start: &Barrier,
    stop: &AtomicBool,
    done: &[AtomicU64; 2],
    started: &mut bool,
) -> Res<()> {
    let mut g = SimGuest::connect_retry(socket, SimOptions::default(), Duration::from_secs(20))?;
    let payload = common::scalar_payload(vm, 0);
    let mut slot_of = std::collections::HashMap::new();
    let mut free: Vec<usize> = (0..window).collect();
    let mut next = 0i32;
    // The operand b of the request in each slot.
    let mut b_of = vec![0i32; window];
    let mut counting = false;
    loop {
        if *started && counting && stop.load(Ordering::Relaxed) {
            counting = false;
        }
        if !*started || counting {
            while let Some(slot) = free.pop() {
                next = next.wrapping_add(1);
                b_of[slot] = next;
                let mut p = payload.clone();
                p[4..8].copy_from_slice(&next.to_le_bytes());
                let hdr = ReqHdr::new(Opcode::ScalarAddI32 as u16, slot as u64, 8);
                let head = g.submit(slot, &hdr, &p, 4)?;
                slot_of.insert(head, slot);
            }
            g.kick()?;
        }
        if slot_of.is_empty() {
            return Ok(());
        }
        for u in g.wait_used(T)? {
            let Some(slot) = slot_of.remove(&u.head) else {
                continue;
            };
            let (h, out) = g.response(slot, 8, 4)?;
            check(&h, "SCALAR_ADD")?;
            if out != vm.wrapping_add(b_of[slot]).to_le_bytes() {
                return Err(format!("vm {vm}: wrong SCALAR_ADD result").into());
            }
            free.push(slot);
            if counting {
                done[0].fetch_add(1, Ordering::Relaxed);
                done[1].fetch_add(h.exec_ns, Ordering::Relaxed);
            }
        }
        if !*started {
            // First answers back: the pipeline is warm.
            *started = true;
            start.wait();
            counting = true;
        }
    }
}

/// VECTOR_ADD of 16 Mi floats from a VM whose guest memory is never
/// registered (`register=staging`): every copy goes through the executor's
/// pinned staging buffers. That is the path of guest memory the driver will
/// not register — the `xen` build's foreign mappings of a domain's RAM, and
/// hosts that overcommit memory — so this row is its throughput.
fn staging_rows(sock: &Path, mem_size: usize, rng: &mut Rng) -> Res<()> {
    const LEN: usize = 16 << 20;
    println!("\n== daemon: VECTOR_ADD_F32 16 Mi from unregistered guest memory (staging) ==");
    let mut g = SimGuest::connect_retry(
        sock,
        SimOptions {
            mem_size,
            ..Default::default()
        },
        T,
    )?;
    let (a, b) = (rng.f32s(LEN), rng.f32s(LEN));
    let req = Laid::new(
        &g,
        DATA_BASE + (1 << 20),
        Opcode::VectorAddF32,
        &common::vector_add_payload(&a, &b),
        4 * LEN,
    )?;
    check(&req.call(&mut g)?, "VECTOR_ADD (staging)")?;
    if req.output(&g)? != vector_add(&a, &b) {
        return Err("VECTOR_ADD through staging differs from the CPU".into());
    }
    let mut v = Vec::with_capacity(20);
    for _ in 0..20 {
        let t = Instant::now();
        let h = req.call(&mut g)?;
        v.push(t.elapsed());
        check(&h, "VECTOR_ADD (staging)")?;
    }
    let p50 = pct(&mut v, 0.5);
    println!(
        "{:<58} p50 {:8.1} us   {:6.1} GB/s moved",
        "16 Mi floats through the daemon, register=staging",
        us(p50),
        12.0 * LEN as f64 / p50.as_secs_f64() / 1e9
    );
    Ok(())
}
