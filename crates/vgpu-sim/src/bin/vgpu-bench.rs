//! vgpu-bench: request-path benchmark of the daemon (CPU executor), printed
//! beside a baseline measured in the same run: a plain eventfd ping-pong
//! between two threads, the floor of any kick/call round trip.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use vmm_sys_util::eventfd::EventFd;

use vgpu::config::{DaemonConfig, FileConfig, VmSpec};
use vgpu::daemon::Daemon;
use vgpu::executor::ExecutorChoice;
use vgpu::protocol::{Opcode, PoolId, Priority, ReqHdr, Status};
use vgpu_sim::{SimGuest, SimOptions};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Parser)]
#[command(about = "Benchmark the vgpu request path against an eventfd ping-pong")]
struct Cli {
    /// Round trips for the latency measurements.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Requests each VM keeps in flight in the throughput runs.
    #[arg(long, default_value_t = 64)]
    window: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    executor: ExecutorChoice,
}

fn main() -> Result<(), BoxError> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let dir = tempfile_dir()?;
    let vms: Vec<VmSpec> = (1..=16)
        .map(|id| VmSpec {
            vm_id: id,
            pool: PoolId::DEFAULT,
            priority: Priority::Medium,
            socket: vgpu::config::vm_socket(&dir, id),
            max_queued: Some(cli.window.max(1)),
        })
        .collect();
    let file = FileConfig::embedded()?;
    let mut cfg = DaemonConfig::resolve(file, vms.clone())?;
    cfg.executor = cli.executor;
    let daemon = Daemon::start(&cfg)?;

    println!(
        "vgpu-bench: {} CPUs, executor {:?}",
        num_cpus(),
        cli.executor
    );
    let floor = eventfd_pingpong(cli.iterations)?;
    let ping = ping_latency(&vms[0].socket, cli.iterations)?;
    println!("\nround-trip latency ({} iterations)", cli.iterations);
    println!(
        "  {:<34} p50 {:>7.2} µs   p99 {:>7.2} µs",
        "eventfd ping-pong (2 threads)", floor.0, floor.1
    );
    println!(
        "  {:<34} p50 {:>7.2} µs   p99 {:>7.2} µs",
        "PING through the daemon", ping.0, ping.1
    );
    println!(
        "  ratio PING / eventfd floor:       p50 {:>7.2}x   p99 {:>7.2}x",
        ping.0 / floor.0,
        ping.1 / floor.1
    );

    println!(
        "\naggregate PING throughput ({} in flight per VM, {:.1} s each)",
        cli.window, cli.seconds
    );
    for n in [1usize, 4, 16] {
        let rate = throughput(&vms[..n], cli.window, Duration::from_secs_f64(cli.seconds))?;
        println!("  {n:>2} VM(s): {:>10.0} requests/s", rate);
    }
    daemon.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf, BoxError> {
    let dir = std::env::temp_dir().join(format!("vgpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn percentiles(mut v: Vec<u64>) -> (f64, f64) {
    v.sort_unstable();
    let at = |p: usize| {
        v.get((v.len().saturating_sub(1)) * p / 100)
            .copied()
            .unwrap_or(0) as f64
            / 1e3
    };
    (at(50), at(99))
}

fn wait_readable(fd: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, -1) };
    let _ = fd.read();
}

/// Two threads bouncing a token through two eventfds, blocking in poll as a
/// guest waiting for its interrupt and a backend waiting for its kick do.
fn eventfd_pingpong(iterations: usize) -> Result<(f64, f64), BoxError> {
    let ping = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let pong = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let (p2, q2) = (ping.clone(), pong.clone());
    let echo = std::thread::spawn(move || {
        for _ in 0..iterations {
            wait_readable(&p2);
            let _ = q2.write(1);
        }
    });
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        ping.write(1)?;
        wait_readable(&pong);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    echo.join().map_err(|_| "echo thread panicked")?;
    Ok(percentiles(samples))
}

fn connect(socket: &Path) -> Result<SimGuest, BoxError> {
    Ok(SimGuest::connect_retry(
        socket,
        SimOptions::default(),
        Duration::from_secs(10),
    )?)
}

fn ping_latency(socket: &Path, iterations: usize) -> Result<(f64, f64), BoxError> {
    let mut g = connect(socket)?;
    for _ in 0..1000 {
        g.call(Opcode::Ping as u16, 0, &[], 0)?;
    }
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let t = Instant::now();
        let (h, _) = g.call(Opcode::Ping as u16, i as u64, &[], 0)?;
        samples.push(t.elapsed().as_nanos() as u64);
        if h.status != Status::Ok as u32 {
            return Err(format!("PING failed with status {}", h.status).into());
        }
    }
    Ok(percentiles(samples))
}

fn throughput(vms: &[VmSpec], window: usize, span: Duration) -> Result<f64, BoxError> {
    let start = Arc::new(Barrier::new(vms.len() + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = vms
        .iter()
        .map(|vm| {
            let (socket, start, stop, done) =
                (vm.socket.clone(), start.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut g = connect(&socket).map_err(|e| e.to_string())?;
                let hdr = ReqHdr::new(Opcode::Ping as u16, 0, 0);
                let mut free: Vec<usize> = (0..window).collect();
                let mut slot_of = std::collections::HashMap::new();
                start.wait();
                let mut counting = true;
                loop {
                    if counting && stop.load(Ordering::Relaxed) {
                        counting = false;
                    }
                    if counting {
                        while let Some(slot) = free.pop() {
                            let head = g.submit(slot, &hdr, &[], 0).map_err(|e| e.to_string())?;
                            slot_of.insert(head, slot);
                        }
                        g.kick().map_err(|e| e.to_string())?;
                    }
                    if slot_of.is_empty() {
                        return Ok(());
                    }
                    let used = g
                        .wait_used(Duration::from_secs(10))
                        .map_err(|e| e.to_string())?;
                    for u in used {
                        if let Some(slot) = slot_of.remove(&u.head) {
                            free.push(slot);
                            if counting {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    std::thread::sleep(span);
    let count = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().map_err(|_| "guest thread panicked")??;
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}
