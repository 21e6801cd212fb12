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
//! Usage: `vgpu-gpu-bench [--only executor|daemon] [--sgemm N] [--iters N]
//! [--seconds S] [--window W] [--vms N]` (see docs/gpu.md).

#[path = "../../../tests/gpu_common/mod.rs"]
mod common;
mod daemon;
mod direct;

use std::time::{Duration, Instant};

use common::{Guest, Rng};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use vgpu::executor::cuda::KERNELS_PTX;
use vgpu::executor::ops::GemmDims;
use vgpu::executor::{CudaConfig, CudaExecutor, Executor};
use vgpu::protocol::{Opcode, Status};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
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
            daemon::run(&o)
        }
        Some("executor") => executor_section(o.sgemm_n, o.iters),
        Some("daemon") => daemon::run(&o),
        Some(x) => Err(format!("--only {x}: expected executor or daemon").into()),
    }
}

fn executor_section(sgemm_n: usize, iters: usize) -> Res<()> {
    let limit = Duration::from_secs(60);
    let mut ex = CudaExecutor::new(0, limit, CudaConfig::default())?;
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

    // Direct cudarc on the executor's device (same context), own stream.
    let ctx = ex.context().clone();
    let stream = ctx.new_stream()?;
    let module = ctx.load_module(Ptx::from_src(KERNELS_PTX))?;
    let k_scalar = module.load_function("scalar_add_i32")?;
    let k_vadd = module.load_function("vector_add_f32")?;
    let k_sgemm = module.load_function("sgemm_f32")?;

    println!("\n== round trip, small requests ==");
    let ping = g.request(1, Opcode::Ping, &[], 0);
    let v = time_n(iters, || status(ex.execute(&ping, limit)).map(|_| ()))?;
    report_lat("PING, executor (no GPU work)", v);

    let req = g.request(1, Opcode::ScalarAddI32, &common::scalar_payload(40, 2), 4);
    for _ in 0..1000 {
        status(ex.execute(&req, limit))?;
    }
    let v = time_n(iters, || status(ex.execute(&req, limit)).map(|_| ()))?;
    let (exec_p50, _) = report_lat("SCALAR_ADD, executor (guest memory, registered)", v);

    // SAFETY: filled before use.
    let mut pin_in = unsafe { ctx.alloc_pinned_with_flags::<i32>(2, 0) }?;
    pin_in.as_mut_slice()?.copy_from_slice(&[40, 2]);
    let mut pin_out = unsafe { ctx.alloc_pinned_with_flags::<i32>(1, 0) }?;
    let mut d_in = stream.alloc_zeros::<i32>(2)?;
    let mut d_out = stream.alloc_zeros::<i32>(1)?;
    let (a, b) = (40i32, 2i32);
    let cfg1 = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut direct = |copy_in: bool| -> Res<()> {
        if copy_in {
            stream.memcpy_htod(&pin_in, &mut d_in)?;
        }
        let mut l = stream.launch_builder(&k_scalar);
        l.arg(&a).arg(&b).arg(&mut d_out);
        // SAFETY: scalar_add_i32(int, int, int*).
        unsafe { l.launch(cfg1) }?;
        stream.memcpy_dtoh(&d_out, &mut pin_out)?;
        stream.synchronize()?;
        Ok(())
    };
    for _ in 0..1000 {
        direct(true)?;
    }
    let v = time_n(iters, || direct(true))?;
    let (dir_p50, _) = report_lat("SCALAR_ADD, cudarc: 8 B in, kernel, 4 B out, sync", v);
    let v = time_n(iters, || direct(false))?;
    let (dir2_p50, _) = report_lat("SCALAR_ADD, cudarc: kernel, 4 B out, sync", v);
    if pin_out.as_slice()?[0] != 42 {
        return Err("direct SCALAR_ADD wrong".into());
    }
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
        status(ex.execute(&req, limit))?;
        let bytes = 12.0 * n as f64;
        let mut v = time_n(reps, || status(ex.execute(&req, limit)).map(|_| ()))?;
        let p50 = pct(&mut v, 0.5);
        println!(
            "{:<58} p50 {:8.1} us   {:6.1} GB/s moved",
            format!("{} Mi floats, executor (registered guest memory)", n >> 20),
            us(p50),
            bytes / p50.as_secs_f64() / 1e9
        );
        // SAFETY: filled before use.
        let mut ha = unsafe { ctx.alloc_pinned_with_flags::<f32>(n, 0) }?;
        let mut hb = unsafe { ctx.alloc_pinned_with_flags::<f32>(n, 0) }?;
        let mut ho = unsafe { ctx.alloc_pinned_with_flags::<f32>(n, 0) }?;
        ha.as_mut_slice()?.copy_from_slice(&va);
        hb.as_mut_slice()?.copy_from_slice(&vb);
        let mut da = stream.alloc_zeros::<f32>(n)?;
        let mut db = stream.alloc_zeros::<f32>(n)?;
        let mut dout = stream.alloc_zeros::<f32>(n)?;
        let n32 = n as u32;
        let cfg = LaunchConfig {
            grid_dim: (n32.div_ceil(256).min(65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut run = || -> Res<()> {
            stream.memcpy_htod(&ha, &mut da)?;
            stream.memcpy_htod(&hb, &mut db)?;
            let mut l = stream.launch_builder(&k_vadd);
            l.arg(&da).arg(&db).arg(&mut dout).arg(&n32);
            // SAFETY: vector_add_f32(const float*, const float*, float*, unsigned).
            unsafe { l.launch(cfg) }?;
            stream.memcpy_dtoh(&dout, &mut ho)?;
            stream.synchronize()?;
            Ok(())
        };
        run()?;
        let mut v = time_n(reps, &mut run)?;
        let p50 = pct(&mut v, 0.5);
        println!(
            "{:<58} p50 {:8.1} us   {:6.1} GB/s moved",
            format!("{} Mi floats, cudarc (pinned buffers)", n >> 20),
            us(p50),
            bytes / p50.as_secs_f64() / 1e9
        );
        let mut out = vec![0u8; 4 * n];
        req.output.read_at(0, &mut out)?;
        if common::f32s(&out) != ho.as_slice()? {
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
    status(ex.execute(&req, limit))?;
    let reps = 3;
    let mut v = time_n(reps, || status(ex.execute(&req, limit)).map(|_| ()))?;
    let best = pct(&mut v, 0.0);
    println!(
        "{:<58} best {:8.2} ms   {:8.0} GFLOP/s",
        "executor request (copies of A, B, C included)",
        best.as_secs_f64() * 1e3,
        d.flops() / best.as_secs_f64() / 1e9
    );
    // SAFETY: filled before use.
    let mut ha = unsafe { ctx.alloc_pinned_with_flags::<f32>(ma.len(), 0) }?;
    let mut hb = unsafe { ctx.alloc_pinned_with_flags::<f32>(mb.len(), 0) }?;
    let mut hc = unsafe { ctx.alloc_pinned_with_flags::<f32>(d.m * d.n, 0) }?;
    ha.as_mut_slice()?.copy_from_slice(&ma);
    hb.as_mut_slice()?.copy_from_slice(&mb);
    let mut da = stream.alloc_zeros::<f32>(ma.len())?;
    let mut db = stream.alloc_zeros::<f32>(mb.len())?;
    let mut dc = stream.alloc_zeros::<f32>(d.m * d.n)?;
    let (m32, n32, k32) = (d.m as u32, d.n as u32, d.k as u32);
    let cfg = LaunchConfig {
        grid_dim: (n32.div_ceil(128), m32.div_ceil(128), 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    stream.memcpy_htod(&ha, &mut da)?;
    stream.memcpy_htod(&hb, &mut db)?;
    let mut kernel = |copies: bool| -> Res<()> {
        if copies {
            stream.memcpy_htod(&ha, &mut da)?;
            stream.memcpy_htod(&hb, &mut db)?;
        }
        let mut l = stream.launch_builder(&k_sgemm);
        l.arg(&m32)
            .arg(&n32)
            .arg(&k32)
            .arg(&da)
            .arg(&db)
            .arg(&mut dc);
        // SAFETY: sgemm_f32(unsigned, unsigned, unsigned, const float*, const float*, float*).
        unsafe { l.launch(cfg) }?;
        if copies {
            stream.memcpy_dtoh(&dc, &mut hc)?;
        }
        stream.synchronize()?;
        Ok(())
    };
    kernel(false)?;
    let mut v = time_n(reps, || kernel(true))?;
    let best = pct(&mut v, 0.0);
    println!(
        "{:<58} best {:8.2} ms   {:8.0} GFLOP/s",
        "cudarc, same kernel, pinned copies of A, B, C included",
        best.as_secs_f64() * 1e3,
        d.flops() / best.as_secs_f64() / 1e9
    );
    let mut v = time_n(reps, || kernel(false))?;
    let best = pct(&mut v, 0.0);
    println!(
        "{:<58} best {:8.2} ms   {:8.0} GFLOP/s",
        "cudarc, same kernel only (device-resident A, B, C)",
        best.as_secs_f64() * 1e3,
        d.flops() / best.as_secs_f64() / 1e9
    );
    stream.memcpy_dtoh(&dc, &mut hc)?;
    stream.synchronize()?;
    let mut out = vec![0u8; d.c_bytes()];
    req.output.read_at(0, &mut out)?;
    let exec_c = common::f32s(&out);
    let direct_c = hc.as_slice()?;
    if exec_c != direct_c {
        return Err("SGEMM executor and cudarc disagree".into());
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
