//! vgpu-demo: the daemon (in this process, on its embedded defaults) serving
//! three VMs of three priorities on sockets in a temporary directory, driven
//! by simulated guests that send real requests over those sockets, so that a
//! newcomer sees requests flow, their dispatch order and their latencies.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vgpu::admin::store::{NewVm, Store, VmUuid};
use vgpu::config::VmDefaults;
use vgpu::config::{DaemonConfig, FileConfig, VmSpec};
use vgpu::daemon::{Daemon, VmSource};
use vgpu::protocol::{DeviceInfo, Opcode, PoolId, Priority, Status};
use vgpu_sim::{SimGuest, SimOptions};

type BoxError = Box<dyn std::error::Error>;

#[derive(Parser, Debug)]
#[command(about = "vgpu demo: the daemon and three simulated guests of three priorities")]
struct Cli {
    /// Requests each simulated guest sends.
    #[arg(long, default_value_t = 8)]
    requests: u32,
    /// TOML file overriding the daemon's embedded defaults (config/vgpu.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match file_config(&cli).and_then(|file| run(file, cli.requests)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn file_config(cli: &Cli) -> Result<FileConfig, BoxError> {
    let cfg = FileConfig::embedded()?;
    Ok(match &cli.config {
        Some(path) => cfg.merge(FileConfig::read(path)?),
        None => cfg,
    })
}

fn run(file: FileConfig, rounds: u32) -> Result<(), BoxError> {
    let dir = std::env::temp_dir().join(format!("vgpu-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let vms: Vec<VmSpec> = [
        (1, b'A', Priority::High),
        (2, b'A', Priority::Medium),
        (3, b'B', Priority::Low),
    ]
    .into_iter()
    .map(|(id, pool, priority)| {
        Ok(VmSpec {
            vm_id: id,
            pool: PoolId::new(pool)?,
            priority,
            socket: vgpu::config::vm_socket(&dir, id),
            max_queued: None,
        })
    })
    .collect::<Result<_, vgpu::protocol::Error>>()?;
    // The VMs come from a vgpu-admin database, created here on first use.
    let db = dir.join("vgpu.db");
    let mut store = Store::open(&db)?;
    for (i, vm) in vms.iter().enumerate() {
        let uuid: VmUuid = format!("00000000-0000-4000-8000-00000000000{}", i + 1).parse()?;
        let mut new = NewVm::new(uuid, vm.pool, vm.priority, &VmDefaults::embedded()?);
        new.vm_id = Some(vm.vm_id);
        new.name = Some(format!("demo-{}", vm.priority));
        store.register_vm(&new)?;
    }
    let cfg = DaemonConfig::resolve(file, Vec::new())?;
    let source = VmSource::Database {
        db: db.clone(),
        socket_dir: dir.clone(),
    };
    let daemon = Daemon::start_with(&cfg, source)?;
    println!(
        "vgpu demo: daemon serving the 3 VMs of {} (pools A,A,B share GPU 0)",
        db.display()
    );
    let result = drive(&vms, rounds);
    daemon.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn drive(vms: &[VmSpec], rounds: u32) -> Result<(), BoxError> {
    let barrier = Arc::new(Barrier::new(vms.len()));
    let out = Arc::new(Mutex::new(()));
    let handles: Vec<_> = vms
        .iter()
        .cloned()
        .map(|vm| {
            let (barrier, out) = (barrier.clone(), out.clone());
            std::thread::spawn(move || guest(vm, rounds, &barrier, &out).map_err(|e| e.to_string()))
        })
        .collect();
    let mut rtts = Vec::new();
    for h in handles {
        rtts.push(h.join().map_err(|_| "guest thread panicked")??);
    }
    println!("\nsummary (round trip of SCALAR_ADD, µs):");
    for (vm, mut r) in vms.iter().zip(rtts) {
        r.sort_unstable();
        let p = |q: usize| {
            r.get((r.len().saturating_sub(1)) * q / 100)
                .copied()
                .unwrap_or(0) as f64
                / 1e3
        };
        println!(
            "  vm{} {:6}  p50 {:8.1}  max {:8.1}",
            vm.vm_id,
            vm.priority,
            p(50),
            p(100)
        );
    }
    Ok(())
}

fn guest(
    vm: VmSpec,
    rounds: u32,
    barrier: &Barrier,
    out: &Mutex<()>,
) -> Result<Vec<u64>, BoxError> {
    let mut g = SimGuest::connect_retry(&vm.socket, SimOptions::default(), Duration::from_secs(5))?;
    let cfg = g.config_space()?;
    let (info_hdr, info) = g.call(Opcode::GetInfo as u16, 0, &[], 96)?;
    if vm.vm_id == 1 && info_hdr.status == Status::Ok as u32 {
        let i = DeviceInfo::decode(&info)?;
        println!("device: {} ({} executor)\n", i.name, i.executor.as_str());
    }
    {
        let _l = out.lock();
        println!(
            "vm{} config space: magic {:?} pool {} priority {} vm_id {}",
            vm.vm_id,
            String::from_utf8_lossy(&cfg[0..4]),
            cfg[8] as char,
            cfg[12],
            cfg[16]
        );
    }
    let mut rtts = Vec::new();
    for round in 0..rounds {
        barrier.wait();
        if vm.priority == Priority::Low {
            // Hold the GPU so that the next requests queue up behind it.
            let ns: u64 = 30_000_000;
            g.call(Opcode::BusyWait as u16, 0, &ns.to_le_bytes(), 0)?;
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Low submits first, high last: dispatch order still follows priority.
        std::thread::sleep(Duration::from_millis(u64::from(vm.priority as u32) * 2));
        let (a, b) = (round as i32 * 100, vm.vm_id as i32);
        let mut payload = a.to_le_bytes().to_vec();
        payload.extend_from_slice(&b.to_le_bytes());
        let t = Instant::now();
        let (hdr, res) = g.call(Opcode::ScalarAddI32 as u16, u64::from(round), &payload, 4)?;
        let rtt = t.elapsed();
        rtts.push(rtt.as_nanos() as u64);
        let sum = res
            .get(..4)
            .map(|s| i32::from_le_bytes([s[0], s[1], s[2], s[3]]));
        let _l = out.lock();
        println!(
            "round {round:2}  vm{} {:6}  add {a}+{b} = {}  status {}  dispatch_seq {:3}  queue {:7.1} µs  exec {:5.1} µs  rtt {:7.1} µs",
            vm.vm_id,
            vm.priority,
            sum.map_or("?".into(), |s| s.to_string()),
            Status::from_u32(hdr.status).map_or("?".into(), |s| s.to_string()),
            hdr.dispatch_seq,
            hdr.queue_ns as f64 / 1e3,
            hdr.exec_ns as f64 / 1e3,
            rtt.as_nanos() as f64 / 1e3
        );
    }
    Ok(rtts)
}
