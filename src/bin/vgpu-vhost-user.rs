//! vgpu-vhost-user: the host daemon. One process serves every VM, one
//! vhost-user socket each, and schedules their requests on the GPUs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vgpu::config;
use vgpu::config::{DaemonConfig, FileConfig, VmSpec};
use vgpu::daemon::{Daemon, VmSource};
use vgpu::executor::ExecutorChoice;
use vgpu::protocol::{PoolId, Priority};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "vgpu vhost-user backend: many VMs share GPUs through virtio"
)]
struct Cli {
    /// A VM to serve: id=N,pool=P,priority=P,socket=PATH[,max-queued=N] (repeatable).
    #[arg(long = "vm", value_name = "SPEC")]
    vms: Vec<VmSpec>,
    /// Short form for one VM: its socket path (with --vm-id, --pool, --priority).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long, requires = "socket", default_value_t = 1)]
    vm_id: u32,
    #[arg(long, requires = "socket", default_value = "A")]
    pool: PoolId,
    /// 0/1/2 or low/medium/high.
    #[arg(long, requires = "socket", default_value = "medium")]
    priority: Priority,
    /// Pool to GPU map, e.g. A=0,B=1 (default: every pool on GPU 0).
    #[arg(long, value_name = "MAP")]
    pool_gpu: Option<String>,
    #[arg(long, value_enum)]
    executor: Option<ExecutorChoice>,
    /// Execution limit of one request in milliseconds (then TIMEOUT).
    #[arg(long)]
    exec_limit_ms: Option<u64>,
    /// Requests a VM may have outstanding before its chains wait in the ring.
    #[arg(long)]
    max_queued: Option<usize>,
    /// Microseconds a VM's ring thread polls after its last progress (0: off).
    #[arg(long, value_name = "US")]
    poll_us: Option<u64>,
    /// Anti-starvation: a waiting request gains a priority level every MS.
    #[arg(long, value_name = "MS")]
    aging_ms: Option<u64>,
    /// vgpu-admin database to serve VMs from (when no --vm/--socket is given);
    /// created on first use.
    #[arg(long, env = "VGPU_DB", default_value = vgpu::admin::store::DEFAULT_DB_PATH)]
    db: PathBuf,
    /// Directory of the per-VM sockets (vm<ID>.sock) and control.sock in
    /// database mode (default: socket_dir of the configuration, /run/vgpu).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// TOML file overriding the embedded defaults (config/vgpu.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus/OpenMetrics at http://ADDR/metrics (off unless
    /// given; port 0 picks one, logged). Loopback only, unless
    /// --metrics-allow-remote.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Allow --metrics-addr on an address other machines can reach.
    #[arg(long, requires = "metrics_addr")]
    metrics_allow_remote: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-vhost-user: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn file_config(cli: &Cli) -> Result<FileConfig, Box<dyn std::error::Error>> {
    let mut cfg = FileConfig::embedded()?;
    if let Some(path) = &cli.config {
        cfg = cfg.merge(FileConfig::read(path)?);
    }
    let pool_gpu = match &cli.pool_gpu {
        Some(s) => Some(
            config::parse_pool_gpu(s)?
                .into_iter()
                .map(|(p, g)| (p.to_string(), g))
                .collect(),
        ),
        None => None,
    };
    Ok(cfg.merge(FileConfig {
        executor: cli.executor,
        exec_limit_ms: cli.exec_limit_ms,
        max_queued: cli.max_queued,
        gpu_mem_quota_mib: None,
        policy: cli.aging_ms.map(|_| "aging".to_string()),
        aging_step_ms: cli.aging_ms,
        poll_us: cli.poll_us,
        socket_dir: cli.socket_dir.clone(),
        pool_gpu,
        worker: None,
    }))
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let file = file_config(&cli)?;
    let mut vms = cli.vms.clone();
    if let Some(socket) = &cli.socket {
        vms.push(VmSpec {
            vm_id: cli.vm_id,
            pool: cli.pool,
            priority: cli.priority,
            socket: socket.clone(),
            max_queued: None,
        });
    }
    if vms.is_empty() {
        // The database holds each VM's GPU (its pool's) and max_queued.
        for (given, what) in [
            (
                cli.pool_gpu.is_some(),
                "--pool-gpu (use vgpu-admin pool-set-gpu)",
            ),
            (
                cli.max_queued.is_some(),
                "--max-queued (use vgpu-admin update-vm --max-queued)",
            ),
        ] {
            if given {
                return Err(format!(
                    "{what} does not apply in database mode, only to --vm/--socket VMs"
                )
                .into());
            }
        }
    }
    let cfg = DaemonConfig::resolve(file, vms.clone())?;
    let socket_dir = cfg.socket_dir.clone();
    let source = if vms.is_empty() {
        log::info!(
            "serving the VMs of {} (sockets in {})",
            cli.db.display(),
            socket_dir.display()
        );
        VmSource::Database {
            db: cli.db.clone(),
            socket_dir,
        }
    } else {
        VmSource::Static(vms)
    };
    if let Some(addr) = cli.metrics_addr {
        // Refuse before anything listens.
        vgpu::metrics::check_addr(addr, cli.metrics_allow_remote)?;
    }
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let daemon = Daemon::start_with(&cfg, source)?;
    // Type=notify units: ready once every VM socket listens.
    match vgpu::sd_notify::ready_when_listening(&daemon.socket_paths(), Duration::from_secs(30)) {
        Ok(true) => log::info!("told systemd: READY=1"),
        Ok(false) => {}
        Err(e) => log::warn!("READY=1 not sent: {e}"),
    }
    if let Some(addr) = cli.metrics_addr {
        match daemon.serve_metrics(addr, cli.metrics_allow_remote) {
            // The test harness and scripts read the bound port from here.
            Ok(bound) => println!("metrics: http://{bound}/metrics"),
            Err(e) => {
                daemon.shutdown();
                return Err(e.into());
            }
        }
    }
    if let Some(sig) = signals.forever().next() {
        log::info!("signal {sig}: stopping");
    }
    daemon.shutdown();
    log::info!("stopped");
    Ok(())
}
