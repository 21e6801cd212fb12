//! GPU benchmark of the CUDA executor against plain cudarc doing the same work
//! in the same process, in two sections.
//!
//! Executor section: the executor driven directly (no daemon).
//!
//! * SCALAR_ADD_I32 round trip, p50/p99: executor vs cudarc (copy in, kernel,
//!   copy out, sync) and cudarc without the copy in (operands as kernel
//!   parameters, as the executor does).
//! * VECTOR_ADD_F32 of 1 Mi and 16 Mi floats, copies included: executor from
//!   registered guest memory vs cudarc from pinned buffers.
//! * SGEMM_F32 (default 8192^3): executor request (copies included) vs the same
//!   kernel launched directly through cudarc, with and without copies.
//!
//! Daemon section (`daemon.rs`): the daemon in this process with the CUDA
//! executor, simulated guests on its sockets, beside direct cudarc baselines
//! (`direct.rs`): SCALAR_ADD round trip, VECTOR_ADD 1 Mi / 16 Mi floats from
//! guest memfd RAM, SGEMM, and SCALAR_ADD throughput from several VMs.
//!
//! Usage: `vgpu-gpu-bench [--only executor|daemon|remoting] [--sgemm N] [--iters N]
//! [--seconds S] [--window W] [--vms N]` (see docs/gpu.md).

mod daemon;
mod direct;
mod startup;

use std::time::{Duration, Instant};

use direct::Direct;
use vgpu::executor::ops::GemmDims;
use vgpu::executor::{CudaConfig, CudaExecutor, Executor, IsolatedCuda};
use vgpu::protocol::{Opcode, Status};
use vgpu_sim::workload::{self as common, Guest, Rng};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The `p`-th percentile (0.0..=1.0) of durations, through the project's
/// one percentile definition (`vgpu::stats::percentile`).
fn pct(v: &mut [Duration], p: f64) -> Duration {
    let mut ns: Vec<u64> = v
        .iter()
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .collect();
    ns.sort_unstable();
    Duration::from_nanos(vgpu::stats::percentile(&ns, (p * 100.0).round() as usize))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn time_n(n: usize, mut f: impl FnMut() -> Res<()>) -> Res<Vec<Duration>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed());
    }
    Ok(v)
}

fn report_lat(name: &str, mut v: Vec<Duration>) -> (f64, f64) {
    let (p50, p99) = (us(pct(&mut v, 0.5)), us(pct(&mut v, 0.99)));
    println!(
        "{name:<58} p50 {p50:8.2} us   p99 {p99:8.2} us   (n={})",
        v.len()
    );
    (p50, p99)
}

fn status(s: Result<u32, Status>) -> Res<u32> {
    s.map_err(|s| format!("executor returned {s}").into())
}

fn main() -> Res<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut o = daemon::Opts {
        iters: 20000,
        sgemm_n: 8192,
        seconds: 2.0,
        window: 32,
        vms: 8,
    };
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--sgemm" => o.sgemm_n = val()?.parse()?,
            "--iters" => o.iters = val()?.parse()?,
            "--seconds" => o.seconds = val()?.parse()?,
            "--window" => o.window = val()?.parse()?,
            "--vms" => o.vms = val()?.parse()?,
            "--only" => only = Some(val()?),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    if o.sgemm_n == 0 || o.iters == 0 || o.window == 0 || o.vms == 0 {
        return Err("--sgemm, --iters, --window and --vms must be positive".into());
    }
    match only.as_deref() {
        None => {
            println!("######## executor section (executor driven directly) ########");
            executor_section(o.sgemm_n, o.iters)?;
            println!("\n######## daemon section (in-process daemon, simulated guests) ########");
            daemon::run(&o, false)
        }
        Some("executor") => executor_section(o.sgemm_n, o.iters),
        Some("daemon") => daemon::run(&o, false),
        Some("remoting") => daemon::run(&o, true),
        Some(x) => Err(format!("--only {x}: expected executor, daemon or remoting").into()),
    }
}

fn executor_section(sgemm_n: usize, iters: usize) -> Res<()> {
    let limit = Duration::from_secs(60);
    let mut ex = IsolatedCuda::new(CudaExecutor::new(0, limit)?, &CudaConfig::default());
    let info = ex.info();
    println!(
        "device: {} (cc {}.{}, {} MiB)",
        info.name,
        info.compute_capability >> 16,
        info.compute_capability & 0xffff,
        info.memory_total >> 20
    );
    let d = GemmDims {
        m: sgemm_n,
        n: sgemm_n,
        k: sgemm_n,
    };
    let guest_size = (d.a_bytes() + d.b_bytes() + d.c_bytes() + (64 << 20)).max(256 << 20) * 5 / 4;
    let mut g = Guest::new(guest_size);
    let t = Instant::now();
    ex.map_guest_memory(1, &g.mem);
    println!(
        "registered {} MiB of guest memory in {:.1} ms",
        ex.stats().registered_bytes >> 20,
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut rng = Rng::new(12345);

    // Direct cudarc: the same kernels, pinned buffers (shared with the daemon section).
    let direct = Direct::new(info.gpu_index as usize)?;

    println!("\n== round trip, small requests ==");
    let ping = g.request(1, Opcode::Ping, &[], 0);
    let v = time_n(iters, || {
        status(ex.execute(ping.tenant, &ping, limit)).map(|_| ())
    })?;
    report_lat("PING, executor (no GPU work)", v);

    let req = g.request(1, Opcode::ScalarAddI32, &common::scalar_payload(40, 2), 4);
    for _ in 0..1000 {
        status(ex.execute(req.tenant, &req, limit))?;
    }
    let v = time_n(iters, || {
        status(ex.execute(req.tenant, &req, limit)).map(|_| ())
    })?;
    let (exec_p50, _) = report_lat("SCALAR_ADD, executor (guest memory, registered)", v);
    let (dir_p50, _) = report_lat(
        "SCALAR_ADD, cudarc: 8 B in, kernel, 4 B out, sync",
        direct.scalar_latency(iters, true)?,
    );
    let (dir2_p50, _) = report_lat(
        "SCALAR_ADD, cudarc: kernel, 4 B out, sync",
        direct.scalar_latency(iters, false)?,
    );
    println!(
        "executor - cudarc (copy in): {:+.2} us p50; executor - cudarc (no copy in): {:+.2} us p50",
        exec_p50 - dir_p50,
        exec_p50 - dir2_p50
    );

    println!("\n== VECTOR_ADD_F32, copies included ==");
    for (n, reps) in [(1usize << 20, 200usize), (16 << 20, 20)] {
        g.reset();
        let (va, vb) = (rng.f32s(n), rng.f32s(n));
        let req = g.request(
            1,
            Opcode::VectorAddF32,
            &common::vector_add_payload(&va, &vb),
            4 * n,
        );
        status(ex.execute(req.tenant, &req, limit))?;
        let bytes = 12.0 * n as f64;
        let mut v = time_n(reps, || {
            status(ex.execute(req.tenant, &req, limit)).map(|_| ())
        })?;
        let p50 = pct(&mut v, 0.5);
        println!(
            "{:<58} p50 {:8.1} us   {:6.1} GB/s moved",
            format!("{} Mi floats, executor (registered guest memory)", n >> 20),
            us(p50),
            bytes / p50.as_secs_f64() / 1e9
        );
        let (p50, direct_out) = direct.vector_add(&va, &vb, reps)?;
        println!(
            "{:<58} p50 {:8.1} us   {:6.1} GB/s moved",
            format!("{} Mi floats, cudarc (pinned buffers)", n >> 20),
            us(p50),
            bytes / p50.as_secs_f64() / 1e9
        );
        let mut out = vec![0u8; 4 * n];
        req.output.read_at(0, &mut out)?;
        if common::f32s(&out) != direct_out {
            return Err("VECTOR_ADD executor and cudarc disagree".into());
        }
    }

    println!("\n== SGEMM_F32 {0}x{0}x{0} ==", sgemm_n);
    g.reset();
    let (ma, mb) = (rng.f32s(d.m * d.k), rng.f32s(d.k * d.n));
    let req = g.request(
        1,
        Opcode::SgemmF32,
        &common::sgemm_payload(d.m, d.n, d.k, &ma, &mb),
        d.c_bytes(),
    );
    status(ex.execute(req.tenant, &req, limit))?;
    let reps = 3;
    let mut v = time_n(reps, || {
        status(ex.execute(req.tenant, &req, limit)).map(|_| ())
    })?;
    let best = pct(&mut v, 0.0);
    let gflops = |t: Duration| d.flops() / t.as_secs_f64() / 1e9;
    println!(
        "{:<58} best {:8.2} ms   {:8.0} GFLOP/s",
        "executor request (copies of A, B, C included)",
        best.as_secs_f64() * 1e3,
        gflops(best)
    );
    let mut out = vec![0u8; d.c_bytes()];
    req.output.read_at(0, &mut out)?;
    let exec_c = common::f32s(&out);
    // The same request with the TF32 flag (bit 31 of m).
    let mut tf32_payload = common::sgemm_payload(d.m, d.n, d.k, &ma, &mb);
    tf32_payload[..4].copy_from_slice(&(d.m as u32 | vgpu::protocol::SGEMM_TF32).to_le_bytes());
    g.reset();
    let req = g.request(1, Opcode::SgemmF32, &tf32_payload, d.c_bytes());
    status(ex.execute(req.tenant, &req, limit))?;
    let mut v = time_n(reps, || {
        status(ex.execute(req.tenant, &req, limit)).map(|_| ())
    })?;
    let best_tf32 = pct(&mut v, 0.0);
    println!(
        "{:<58} best {:8.2} ms   {:8.0} GFLOP/s",
        "executor request, TF32 flag (copies included)",
        best_tf32.as_secs_f64() * 1e3,
        gflops(best_tf32)
    );
    let row = |what: &str, t: Duration| {
        println!(
            "{what:<58} best {:8.2} ms   {:8.0} GFLOP/s",
            t.as_secs_f64() * 1e3,
            gflops(t)
        )
    };
    let cublas = direct.cublas_sgemm(sgemm_n, &ma, &mb, reps, false)?;
    let cublas_tf32 = direct.cublas_sgemm(sgemm_n, &ma, &mb, reps, true)?;
    match (&cublas, &cublas_tf32) {
        (Some(f), Some(t)) => {
            row(
                "cuBLAS FP32, serial pinned copies of A, B, C",
                f.with_copies,
            );
            row("cuBLAS FP32, kernel only (device-resident)", f.kernel_only);
            row(
                "cuBLAS TF32, serial pinned copies of A, B, C",
                t.with_copies,
            );
            row("cuBLAS TF32, kernel only (device-resident)", t.kernel_only);
            let r = f.with_copies.as_secs_f64() / best.as_secs_f64();
            println!(
                "  -> request FP32 / cuBLAS FP32 with serial copies: {:.1} % (target >= 110 %: {})",
                r * 100.0,
                if r >= 1.10 { "met" } else { "NOT met" }
            );
            println!(
                "  -> request FP32 / cuBLAS FP32 kernel only: {:.1} %",
                f.kernel_only.as_secs_f64() / best.as_secs_f64() * 100.0
            );
            println!(
                "  -> request TF32 / cuBLAS TF32 with serial copies: {:.1} %, / kernel only: {:.1} %",
                t.with_copies.as_secs_f64() / best_tf32.as_secs_f64() * 100.0,
                t.kernel_only.as_secs_f64() / best_tf32.as_secs_f64() * 100.0
            );
        }
        _ => println!("cuBLAS: libcublas not present, no baseline"),
    }
    let direct_run = direct.sgemm(sgemm_n, &ma, &mb, reps)?;
    row(
        "cudarc, built-in kernel, pinned copies of A, B, C included",
        direct_run.with_copies,
    );
    row(
        "cudarc, built-in kernel only (device-resident A, B, C)",
        direct_run.kernel_only,
    );
    let reference = cublas.as_ref().map_or(&direct_run.c, |c| &c.c);
    let diff = exec_c
        .iter()
        .zip(reference)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    println!("SGEMM request vs the direct baseline: max abs difference {diff:.2e}");
    if diff > 1e-5 * d.k as f32 + 1e-6 {
        return Err("SGEMM executor and the direct baseline disagree".into());
    }
    // Spot-check a few elements against a CPU dot product.
    let mut worst = 0f32;
    for _ in 0..64 {
        let (i, j) = (
            (rng.next_u64() as usize) % d.m,
            (rng.next_u64() as usize) % d.n,
        );
        let want: f64 = (0..d.k)
            .map(|p| ma[i * d.k + p] as f64 * mb[p * d.n + j] as f64)
            .sum();
        worst = worst.max((exec_c[i * d.n + j] as f64 - want).abs() as f32);
    }
    println!("SGEMM spot check vs f64 CPU dot products: max abs error {worst:.2e}");
    let st = ex.stats();
    println!("\nexecutor stats: {st:?}");
    if st.staged != 0 {
        return Err("staging path used although guest memory was registered".into());
    }
    Ok(())
}
