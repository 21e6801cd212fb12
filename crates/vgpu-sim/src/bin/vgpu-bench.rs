//! vgpu-bench: one command that runs the request-path scenarios against the
//! daemon (in this process, simulated guests on its sockets), each beside a
//! baseline measured in the same run, and writes a report directory: a
//! Markdown table (`report.md`) and PNG plots.
//!
//! Scenarios: PING against an eventfd ping-pong (the floor of a kick/call
//! round trip); SCALAR_ADD and VECTOR_ADD at several sizes against the same
//! arithmetic done directly; throughput against VM count (1, 4, 16, 64 VMs
//! of mixed priorities); latency per priority under contention; priority
//! isolation (a high VM's wait while seven low VMs flood, against the same VM
//! alone); the legacy file path (`vgpu_sim::legacy`) against vgpu. With a
//! GPU (and `--gpu auto|on`), the daemon section of `vgpu-gpu-bench` too.
//!
//! `--quick` runs everything briefly (CI's smoke test): the numbers are then
//! rough, the report is complete.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use vgpu::config::{DaemonConfig, FileConfig, VmSpec};
use vgpu::daemon::Daemon;
use vgpu::executor::ExecutorChoice;
use vgpu::protocol::{Opcode, PoolId, Priority, ReqHdr, Status};
use vgpu::stats::percentile;
use vgpu_sim::report::{self, Bar, Series};
use vgpu_sim::workload::{f32_bytes, scalar_payload, vector_add_payload};
use vgpu_sim::{legacy, SimGuest, SimOptions};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Gpu {
    /// The GPU scenarios when a GPU and libcuda are present.
    Auto,
    /// Never.
    Off,
    /// Required: fail without a GPU.
    On,
}

#[derive(Parser)]
#[command(
    about = "Benchmark the vgpu request path against baselines run in the same invocation; writes a report directory"
)]
struct Cli {
    /// Short runs (CI smoke test): a complete report, rough numbers.
    #[arg(long)]
    quick: bool,
    /// Report directory (created; report.md and the PNGs are replaced).
    #[arg(long, default_value = "bench-report")]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    executor: ExecutorChoice,
    /// GPU scenarios of vgpu-gpu-bench (run from the same directory as this binary).
    #[arg(long, value_enum, default_value = "auto")]
    gpu: Gpu,
}

/// How long each kind of measurement runs.
struct Params {
    iterations: usize,
    span: Duration,
    window: usize,
    vector_sizes: Vec<usize>,
    legacy_requests: usize,
}

impl Params {
    fn new(quick: bool) -> Params {
        if quick {
            Params {
                iterations: 1000,
                span: Duration::from_millis(300),
                window: 32,
                vector_sizes: vec![16, 1024, 16 * 1024],
                legacy_requests: 2,
            }
        } else {
            Params {
                iterations: 20_000,
                span: Duration::from_secs(2),
                window: 64,
                vector_sizes: vec![16, 1024, 16 * 1024, 256 * 1024],
                legacy_requests: 10,
            }
        }
    }
}

const VMS: u32 = 64;

/// vm1 high, vm2 medium, vm3 low, vm4 high, ...
fn priority_of(id: u32) -> Priority {
    match id % 3 {
        1 => Priority::High,
        2 => Priority::Medium,
        _ => Priority::Low,
    }
}

/// Latency samples in µs, with the usual summary.
#[derive(Clone, Default)]
struct Lat(Vec<f64>);

impl Lat {
    fn from_ns(v: &[u64]) -> Lat {
        Lat(v.iter().map(|&n| n as f64 / 1e3).collect())
    }
    fn p(&self, q: usize) -> f64 {
        let mut v: Vec<u64> = self.0.iter().map(|&x| (x * 1e3) as u64).collect();
        v.sort_unstable();
        percentile(&v, q) as f64 / 1e3
    }
    fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len().max(1) as f64
    }
}

/// One row of the report's table.
struct Row {
    scenario: String,
    measurement: String,
    vgpu: String,
    baseline: String,
    ratio: String,
}

fn row(scenario: &str, measurement: &str, vgpu: String, baseline: String, ratio: String) -> Row {
    Row {
        scenario: scenario.into(),
        measurement: measurement.into(),
        vgpu,
        baseline,
        ratio,
    }
}

fn us(x: f64) -> String {
    if x >= 1e4 {
        format!("{:.1} ms", x / 1e3)
    } else {
        format!("{x:.2} µs")
    }
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-bench: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), BoxError> {
    let p = Params::new(cli.quick);
    report::setup_font()?;
    std::fs::create_dir_all(&cli.out)
        .map_err(|e| format!("cannot create {}: {e}", cli.out.display()))?;
    let gpu_runs = match cli.gpu {
        Gpu::Off => false,
        Gpu::Auto => vgpu::executor::cuda::driver_present(),
        Gpu::On if vgpu::executor::cuda::driver_present() => true,
        Gpu::On => return Err("--gpu on: no GPU driver (libcuda) found".into()),
    };
    let dir = std::env::temp_dir().join(format!("vgpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let vms: Vec<VmSpec> = (1..=VMS)
        .map(|id| VmSpec {
            vm_id: id,
            pool: PoolId::DEFAULT,
            priority: priority_of(id),
            socket: vgpu::config::vm_socket(&dir, id),
            max_queued: Some(p.window),
            register: None,
        })
        .collect();
    let mut cfg = DaemonConfig::resolve(FileConfig::embedded()?, vms.clone())?;
    cfg.executor = cli.executor;
    let daemon = Daemon::start(&cfg)?;
    let steps = 9 + u64::from(gpu_runs);
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let result = scenarios(cli, &p, &vms, &bar, gpu_runs);
    bar.finish_and_clear();
    daemon.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let (rows, plots, gpu_text) = result?;
    let md = markdown(cli, &rows, &plots, gpu_text.as_deref());
    std::fs::write(cli.out.join("report.md"), &md)?;
    println!("{}", table(&rows));
    println!("report: {}", cli.out.join("report.md").display());
    Ok(())
}

type Outcome = (Vec<Row>, Vec<(String, String)>, Option<String>);

fn scenarios(
    cli: &Cli,
    p: &Params,
    vms: &[VmSpec],
    bar: &ProgressBar,
    gpu_runs: bool,
) -> Result<Outcome, BoxError> {
    let sock = |id: u32| vms[id as usize - 1].socket.clone();
    let out = &cli.out;
    // The legacy mediator runs from the start, as a daemon does: the legacy
    // requests at the end meet its once-a-second scan at whatever phase it
    // is in by then (it only scans an empty directory meanwhile).
    let root = std::env::temp_dir().join(format!("vgpu-bench-legacy-{}", std::process::id()));
    legacy::setup_dirs(&root, [1])?;
    let mediator = legacy::Mediator::start(&root)?;
    let mut rows = Vec::new();
    let mut plots = Vec::new();

    // 1. PING against the eventfd floor.
    bar.set_message("eventfd floor and PING round trip");
    let floor = Lat::from_ns(
        &vgpu_sim::workload::eventfd_pingpong(p.iterations)?
            .iter()
            .map(|d| d.as_nanos() as u64)
            .collect::<Vec<_>>(),
    );
    let mut g = connect(&sock(1), SimOptions::default())?;
    let ping = closed_loop(&mut g, Opcode::Ping, &[], 0, p.iterations)?;
    for q in [50, 99] {
        rows.push(row(
            "PING vs eventfd floor",
            &format!("round trip p{q}"),
            us(ping.rtt.p(q)),
            us(floor.p(q)),
            format!("{:.2}x", ping.rtt.p(q) / floor.p(q)),
        ));
    }
    let f = "ping_vs_floor.png";
    report::lines(
        &out.join(f),
        "PING round trip vs eventfd ping-pong floor (CDF)",
        "round trip (µs, log)",
        "fraction of requests",
        &[
            Series {
                name: "PING through the daemon".into(),
                color: report::VGPU,
                points: report::cdf_points(&ping.rtt.0),
            },
            Series {
                name: "eventfd ping-pong (2 threads)".into(),
                color: report::BASELINE,
                points: report::cdf_points(&floor.0),
            },
        ],
        true,
        false,
    )?;
    plots.push((
        f.to_string(),
        "PING round trip against the eventfd floor".into(),
    ));
    bar.inc(1);

    // 2. SCALAR_ADD and VECTOR_ADD at several sizes, against the same
    // arithmetic done directly in this process.
    bar.set_message("SCALAR_ADD and VECTOR_ADD sizes");
    let scalar = closed_loop(
        &mut g,
        Opcode::ScalarAddI32,
        &scalar_payload(40, 2),
        4,
        p.iterations,
    )?;
    let direct_scalar = direct_ns(p.iterations, || {
        std::hint::black_box(std::hint::black_box(40i32).wrapping_add(2));
    });
    rows.push(row(
        "SCALAR_ADD",
        "round trip p50 / p99",
        format!("{} / {}", us(scalar.rtt.p(50)), us(scalar.rtt.p(99))),
        format!("{} direct add p50", us(direct_scalar.p(50))),
        format!("+{}", us(scalar.rtt.p(50) - direct_scalar.p(50))),
    ));
    drop(g);
    let biggest = *p.vector_sizes.iter().max().unwrap_or(&16);
    let slot_size = (16 + 12 * biggest + 4096 + 0xfff) & !0xfff;
    let vec_opts = SimOptions {
        mem_size: ((2 << 20) + 2 * slot_size + 0xf_ffff) & !0xf_ffff,
        slot_size,
        queue_size: 16,
        ..SimOptions::default()
    };
    let mut gv = connect(&sock(1), vec_opts)?;
    let mut vec_points = Vec::new();
    let mut direct_points = Vec::new();
    for &n in &p.vector_sizes {
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (2 * i) as f32).collect();
        let payload = vector_add_payload(&a, &b);
        let iters = (p.iterations / (1 + n / 1024)).max(20);
        let r = closed_loop(&mut gv, Opcode::VectorAddF32, &payload, 4 * n, iters)?;
        let mut c = vec![0f32; n];
        let d = direct_ns(iters, || {
            for i in 0..n {
                c[i] = a[i] + b[i];
            }
            std::hint::black_box(f32_bytes(&c[..1]));
        });
        let bytes = (12 * n) as f64;
        rows.push(row(
            "VECTOR_ADD",
            &format!("{n} floats: round trip p50"),
            format!(
                "{} ({:.2} GB/s)",
                us(r.rtt.p(50)),
                bytes / (r.rtt.p(50) * 1e3)
            ),
            format!("{} direct loop", us(d.p(50))),
            format!("{:.1}x", r.rtt.p(50) / d.p(50).max(1e-3)),
        ));
        vec_points.push(((8 + 8 * n) as f64, r.rtt.p(50)));
        direct_points.push(((8 + 8 * n) as f64, d.p(50).max(1e-3)));
    }
    drop(gv);
    let f = "ops_sizes.png";
    report::lines(
        &out.join(f),
        "SCALAR_ADD and VECTOR_ADD round trip (p50) against payload size",
        "payload bytes (log)",
        "round trip p50 (µs, log)",
        &[
            Series {
                name: "SCALAR_ADD through the daemon".into(),
                color: report::VGPU,
                points: vec![(8.0, scalar.rtt.p(50))],
            },
            Series {
                name: "VECTOR_ADD through the daemon".into(),
                color: report::VGPU2,
                points: vec_points,
            },
            Series {
                name: "VECTOR_ADD done directly (same process)".into(),
                color: report::BASELINE,
                points: direct_points,
            },
        ],
        true,
        true,
    )?;
    plots.push((
        f.to_string(),
        "SCALAR_ADD and VECTOR_ADD at several sizes".into(),
    ));
    bar.inc(1);

    // 3. Throughput against VM count, mixed priorities.
    let mut tput = Vec::new();
    for n in [1u32, 4, 16, 64] {
        bar.set_message(format!("PING throughput, {n} VMs"));
        let socks: Vec<PathBuf> = (1..=n).map(sock).collect();
        let (runs, took) = drive_for(&socks, Opcode::Ping, &[], 0, p.window, p.span)?;
        let total: u64 = runs.iter().map(|r| r.count).sum();
        tput.push((n, total as f64 / took.as_secs_f64()));
        bar.inc(1);
    }
    let one = tput[0].1;
    for &(n, rate) in &tput {
        rows.push(row(
            "throughput (PING, mixed priorities)",
            &format!("{n} VMs, {} in flight each", p.window),
            format!("{rate:.0} req/s"),
            format!("{one:.0} req/s with 1 VM"),
            format!("{:.2}x", rate / one),
        ));
    }
    let f = "throughput.png";
    report::lines(
        &out.join(f),
        "Aggregate PING throughput against VM count (mixed priorities)",
        "VMs (log)",
        "requests/s",
        &[Series {
            name: format!("vgpu, {} in flight per VM", p.window),
            color: report::VGPU,
            points: tput.iter().map(|&(n, r)| (n as f64, r)).collect(),
        }],
        true,
        false,
    )?;
    plots.push((f.to_string(), "Throughput against VM count".into()));

    // 4. Latency per priority under contention: 9 VMs, 3 of each.
    bar.set_message("latency per priority under contention");
    let socks: Vec<PathBuf> = (1..=9).map(sock).collect();
    let (runs, _) = drive_for(
        &socks,
        Opcode::ScalarAddI32,
        &scalar_payload(1, 2),
        4,
        8,
        p.span,
    )?;
    let mut by_prio: Vec<(Priority, Lat, Lat)> = Vec::new();
    for prio in [Priority::High, Priority::Medium, Priority::Low] {
        let (mut rtt, mut wait) = (Vec::new(), Vec::new());
        for (i, r) in runs.iter().enumerate() {
            if priority_of(i as u32 + 1) == prio {
                rtt.extend(&r.rtt);
                wait.extend(&r.wait);
            }
        }
        by_prio.push((prio, Lat::from_ns(&rtt), Lat::from_ns(&wait)));
    }
    let high_p50 = by_prio[0].1.p(50);
    for (prio, rtt, wait) in &by_prio {
        rows.push(row(
            "contention: 9 VMs (3 per priority), 8 SCALAR_ADD in flight each",
            &format!(
                "{prio}: round trip p50 / p99 (wait p99); {} done",
                rtt.0.len()
            ),
            format!("{} / {} ({})", us(rtt.p(50)), us(rtt.p(99)), us(wait.p(99))),
            format!("high p50 {}", us(high_p50)),
            format!("{:.2}x", rtt.p(50) / high_p50.max(1e-3)),
        ));
    }
    let f = "latency_cdf.png";
    report::lines(
        &out.join(f),
        "Round trip per priority under contention (CDF, 9 VMs, 8 in flight each)",
        "round trip (µs, log)",
        "fraction of requests",
        &by_prio
            .iter()
            .map(|(prio, rtt, _)| Series {
                name: format!("{prio} priority"),
                color: match prio {
                    Priority::High => report::HIGH,
                    Priority::Medium => report::MEDIUM,
                    Priority::Low => report::LOW,
                },
                points: report::cdf_points(&rtt.0),
            })
            .collect::<Vec<_>>(),
        true,
        false,
    )?;
    plots.push((
        f.to_string(),
        "Latency CDF per priority under contention".into(),
    ));
    bar.inc(1);

    // 5. Priority isolation: vm1 (high) alone, then while seven low VMs flood.
    bar.set_message("priority isolation");
    let mut g = connect(&sock(1), SimOptions::default())?;
    let n_iso = (p.iterations / 4).max(200);
    let alone = closed_loop(
        &mut g,
        Opcode::ScalarAddI32,
        &scalar_payload(1, 1),
        4,
        n_iso,
    )?;
    let lows: Vec<PathBuf> = (1..=VMS)
        .filter(|&id| priority_of(id) == Priority::Low)
        .take(7)
        .map(sock)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let window = p.window;
        std::thread::spawn(move || {
            drive(
                &lows,
                Opcode::ScalarAddI32,
                &scalar_payload(3, 4),
                4,
                window,
                &stop,
                None,
            )
        })
    };
    // Let the flood fill the queue first.
    std::thread::sleep(Duration::from_millis(100));
    let flooded = closed_loop(
        &mut g,
        Opcode::ScalarAddI32,
        &scalar_payload(1, 1),
        4,
        n_iso,
    );
    stop.store(true, Ordering::Relaxed);
    let (low_runs, _) = flood.join().map_err(|_| "flood thread panicked")??;
    let flooded = flooded?;
    let low_done: u64 = low_runs.iter().map(|r| r.count).sum();
    for (what, f, a) in [
        (
            "high VM's queue wait p50",
            flooded.wait.p(50),
            alone.wait.p(50),
        ),
        (
            "high VM's queue wait p99",
            flooded.wait.p(99),
            alone.wait.p(99),
        ),
        (
            "high VM's round trip p50",
            flooded.rtt.p(50),
            alone.rtt.p(50),
        ),
        (
            "high VM's round trip p99",
            flooded.rtt.p(99),
            alone.rtt.p(99),
        ),
    ] {
        rows.push(row(
            "isolation: 1 high VM while 7 low VMs flood",
            what,
            us(f),
            format!("{} alone", us(a)),
            format!("{:.2}x", f / a.max(1e-3)),
        ));
    }
    rows.push(row(
        "isolation: 1 high VM while 7 low VMs flood",
        "low VMs' requests done meanwhile",
        low_done.to_string(),
        "-".into(),
        "-".into(),
    ));
    let f = "isolation.png";
    report::bars(
        &out.join(f),
        "High-priority VM: queue wait alone and while 7 low VMs flood",
        "queue wait (µs, log)",
        &[
            Bar {
                label: "p50 alone".into(),
                color: report::BASELINE,
                value: alone.wait.p(50),
            },
            Bar {
                label: "p50 flooded".into(),
                color: report::HIGH,
                value: flooded.wait.p(50),
            },
            Bar {
                label: "p99 alone".into(),
                color: report::BASELINE,
                value: alone.wait.p(99),
            },
            Bar {
                label: "p99 flooded".into(),
                color: report::HIGH,
                value: flooded.wait.p(99),
            },
        ],
        true,
    )?;
    plots.push((f.to_string(), "Priority isolation".into()));
    bar.inc(1);

    // 6. The legacy file path against vgpu, same requests, one VM in a loop.
    bar.set_message(format!(
        "legacy file path ({} requests, about a second each)",
        p.legacy_requests
    ));
    let mut legacy_rtt = Vec::new();
    for i in 0..p.legacy_requests {
        let req = legacy::Request {
            pool: 'A',
            priority: 2,
            vm_id: 1,
            num1: 100 + i as i32,
            num2: 200,
        };
        let (v, rtt) = legacy::call(&root, &req)?;
        if v != 300 + i as i32 {
            return Err(format!("legacy path answered {v}, want {}", 300 + i).into());
        }
        legacy_rtt.push(rtt.as_nanos() as u64);
    }
    mediator.stop();
    let _ = std::fs::remove_dir_all(&root);
    let legacy_lat = Lat::from_ns(&legacy_rtt);
    let vgpu_add = closed_loop(
        &mut g,
        Opcode::ScalarAddI32,
        &scalar_payload(100, 200),
        4,
        p.legacy_requests.max(100),
    )?;
    drop(g);
    rows.push(row(
        "legacy baseline: num1+num2, one VM in a loop",
        "mean round trip",
        us(vgpu_add.rtt.mean()),
        format!("{} legacy file path", us(legacy_lat.mean())),
        format!(
            "legacy takes {:.0}x as long",
            legacy_lat.mean() / vgpu_add.rtt.mean()
        ),
    ));
    let f = "legacy.png";
    report::bars(
        &out.join(f),
        "num1+num2 round trip: vgpu against the legacy file path (mean)",
        "round trip (µs, log)",
        &[
            Bar {
                label: "vgpu SCALAR_ADD".into(),
                color: report::VGPU,
                value: vgpu_add.rtt.mean(),
            },
            Bar {
                label: "legacy request.txt / 1 s scan".into(),
                color: report::BASELINE,
                value: legacy_lat.mean(),
            },
        ],
        true,
    )?;
    plots.push((f.to_string(), "The legacy baseline".into()));
    bar.inc(1);

    // 7. The GPU scenarios.
    let gpu_text = if gpu_runs {
        bar.set_message("GPU scenarios (vgpu-gpu-bench --only daemon)");
        let text = gpu_bench(cli.quick)?;
        std::fs::write(out.join("gpu.txt"), &text)?;
        bar.inc(1);
        Some(text)
    } else {
        None
    };
    Ok((rows, plots, gpu_text))
}

/// Runs the daemon section of vgpu-gpu-bench, from this binary's directory.
fn gpu_bench(quick: bool) -> Result<String, BoxError> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("vgpu-gpu-bench"))
        .ok_or("no directory for vgpu-gpu-bench")?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["--only", "daemon"]);
    if quick {
        cmd.args(["--iters", "2000", "--seconds", "0.5", "--sgemm", "1024"]);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "vgpu-gpu-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scenario | measurement | vgpu | baseline (same run) | ratio |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.scenario, r.measurement, r.vgpu, r.baseline, r.ratio
        );
    }
    s
}

fn utc_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: gmtime_r writes only into the tm we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::gmtime_r(&t, &mut tm) }.is_null() {
        return "unknown date".into();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn markdown(cli: &Cli, rows: &[Row], plots: &[(String, String)], gpu: Option<&str>) -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut s = String::new();
    let _ = writeln!(s, "# vgpu benchmark report\n");
    let _ = writeln!(
        s,
        "Generated {} by `vgpu-bench{}{}` on {} CPUs (kernel {}), executor `{:?}`{}.\n",
        utc_now(),
        if args.is_empty() { "" } else { " " },
        args.join(" "),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel(),
        cli.executor,
        if cli.quick {
            "; **quick mode: short runs, rough numbers**"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "Every vgpu figure stands beside a baseline measured in the same run. The daemon runs in the \
bench process with {VMS} VMs (vm1 high, vm2 medium, vm3 low, ...; one GPU queue), driven by \
simulated guests over its vhost-user sockets.\n"
    );
    s.push_str(&table(rows));
    let _ = writeln!(s, "\n## Plots\n");
    for (file, title) in plots {
        let _ = writeln!(s, "### {title}\n\n![{title}]({file})\n");
    }
    if let Some(text) = gpu {
        let _ = writeln!(
            s,
            "## GPU (vgpu-gpu-bench --only daemon)\n\n```\n{}\n```\n",
            text.trim_end()
        );
    }
    s
}

fn connect(socket: &Path, opts: SimOptions) -> Result<SimGuest, BoxError> {
    Ok(SimGuest::connect_retry(
        socket,
        opts,
        Duration::from_secs(10),
    )?)
}

/// Round trips and queue waits of one-at-a-time requests.
struct Closed {
    rtt: Lat,
    wait: Lat,
}

fn closed_loop(
    g: &mut SimGuest,
    op: Opcode,
    payload: &[u8],
    out: usize,
    n: usize,
) -> Result<Closed, BoxError> {
    for _ in 0..(n / 10).min(500) {
        g.call(op as u16, 0, payload, out)?;
    }
    let (mut rtt, mut wait) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let t = Instant::now();
        let (h, _) = g.call(op as u16, i as u64, payload, out)?;
        rtt.push(t.elapsed().as_nanos() as u64);
        if h.status != Status::Ok as u32 {
            return Err(format!("{op:?} failed with status {}", h.status).into());
        }
        wait.push(h.queue_ns);
    }
    Ok(Closed {
        rtt: Lat::from_ns(&rtt),
        wait: Lat::from_ns(&wait),
    })
}

/// The same work done directly, timed the same way, in µs.
fn direct_ns(n: usize, mut f: impl FnMut()) -> Lat {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_nanos() as u64);
    }
    Lat::from_ns(&v)
}

/// What one VM's pipelined guest did.
struct Run {
    count: u64,
    rtt: Vec<u64>,
    wait: Vec<u64>,
}

fn drive_for(
    socks: &[PathBuf],
    op: Opcode,
    payload: &[u8],
    out: usize,
    window: usize,
    span: Duration,
) -> Result<(Vec<Run>, Duration), BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    drive(socks, op, payload, out, window, &stop, Some(span))
}

/// Each VM keeps `window` requests in flight until `stop`; the counts are
/// of requests completed before `stop`, every one is awaited.
fn drive(
    socks: &[PathBuf],
    op: Opcode,
    payload: &[u8],
    out: usize,
    window: usize,
    stop: &Arc<AtomicBool>,
    span: Option<Duration>,
) -> Result<(Vec<Run>, Duration), BoxError> {
    let ready = Arc::new(Barrier::new(socks.len() + 1));
    let threads: Vec<_> = socks
        .iter()
        .map(|socket| {
            let (socket, ready, stop) = (socket.clone(), ready.clone(), stop.clone());
            let payload = payload.to_vec();
            std::thread::spawn(move || -> Result<Run, String> {
                let opts = SimOptions {
                    mem_size: 4 << 20,
                    ..SimOptions::default()
                };
                let g = connect(&socket, opts);
                ready.wait();
                let mut g = g.map_err(|e| e.to_string())?;
                let hdr = ReqHdr::new(op as u16, 0, payload.len() as u32);
                let mut free: Vec<usize> = (0..window).collect();
                let mut slot_of: HashMap<u16, (usize, Instant)> = HashMap::new();
                let mut run = Run {
                    count: 0,
                    rtt: Vec::new(),
                    wait: Vec::new(),
                };
                loop {
                    let counting = !stop.load(Ordering::Relaxed);
                    if counting && !free.is_empty() {
                        while let Some(slot) = free.pop() {
                            let head = g
                                .submit(slot, &hdr, &payload, out)
                                .map_err(|e| e.to_string())?;
                            slot_of.insert(head, (slot, Instant::now()));
                        }
                        g.kick().map_err(|e| e.to_string())?;
                    }
                    if slot_of.is_empty() {
                        return Ok(run);
                    }
                    let used = g
                        .wait_used(Duration::from_secs(30))
                        .map_err(|e| e.to_string())?;
                    let now = Instant::now();
                    for u in used {
                        if let Some((slot, at)) = slot_of.remove(&u.head) {
                            let (h, _) = g
                                .response(slot, payload.len(), 0)
                                .map_err(|e| e.to_string())?;
                            if h.status != Status::Ok as u32 {
                                return Err(format!("{op:?}: status {}", h.status));
                            }
                            free.push(slot);
                            if counting {
                                run.count += 1;
                                run.rtt.push(now.duration_since(at).as_nanos() as u64);
                                run.wait.push(h.queue_ns);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    // Every guest is connected: the measurement starts now.
    ready.wait();
    let t0 = Instant::now();
    if let Some(span) = span {
        std::thread::sleep(span);
        stop.store(true, Ordering::Relaxed);
    }
    let mut took = t0.elapsed();
    let mut runs = Vec::new();
    for t in threads {
        runs.push(t.join().map_err(|_| "guest thread panicked")??);
    }
    if span.is_none() {
        took = t0.elapsed();
    }
    Ok((runs, took))
}
