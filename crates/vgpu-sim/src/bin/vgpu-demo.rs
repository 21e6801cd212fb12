//! vgpu-demo: what the legacy users ran, and what vgpu adds.
//!
//! The seeds' layout (VM1-VM3 in pool A, VM4-VM6 in pool B, VM7 for
//! verification, mixed priorities) is registered in a fresh vgpu-admin
//! database, and the daemon (in this process, on its embedded defaults)
//! serves it to simulated guests that send real requests over the
//! vhost-user sockets. For each mode of the legacy test client:
//!
//! * the GPU is held (a BUSY_WAIT from the last VM), then every VM submits
//!   num1 + num2: all at once (`simultaneous`) or one every `--delay`
//!   seconds (`sequential`); the dispatch order is printed as a table and
//!   checked: high before medium before low, FIFO within a priority;
//! * the same requests, without the hold, through vgpu and through the
//!   legacy file path reproduced on a local directory (`vgpu_sim::legacy`),
//!   timed side by side.
//!
//! `--vms "1:A:2:100:200,2:A:1:150:250,3:B:2:50:75"` (vm:pool:priority[:num1:num2])
//! and `simultaneous|sequential --delay S` are the legacy client's syntax.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use vgpu::admin::store::{NewVm, Store, VmUuid};
use vgpu::config::{DaemonConfig, FileConfig, VmDefaults};
use vgpu::daemon::{Daemon, VmSource};
use vgpu::protocol::{Opcode, PoolId, Priority, ReqHdr, RespHdr, Status};
use vgpu_sim::legacy;
use vgpu_sim::{SimGuest, SimOptions};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// All VMs submit at once.
    Simultaneous,
    /// VMs submit one after another, `--delay` seconds apart.
    Sequential,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Simultaneous => "simultaneous",
            Mode::Sequential => "sequential",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    about = "vgpu demo: the legacy 7-VM layout, priority dispatch behind a held GPU, and vgpu timed against the legacy file path",
    after_help = "Examples (the legacy test client's syntax):\n  vgpu-demo\n  vgpu-demo simultaneous --vms \"1:A:2:100:200,2:A:1:150:250,3:B:2:50:75\"\n  vgpu-demo sequential --vms \"1:A:2,2:A:2,3:A:2\" --delay 0.5"
)]
struct Cli {
    /// simultaneous or sequential; both, one after the other, when omitted.
    #[arg(value_enum)]
    mode: Option<Mode>,
    /// VMs as vm_id:pool:priority[:num1:num2], comma-separated (pool A or B,
    /// priority 0-2 or low/medium/high). Default: the seeds' 7-VM layout.
    #[arg(long)]
    vms: Option<String>,
    /// Seconds between two VMs' submissions in sequential mode.
    #[arg(long, default_value_t = 0.25)]
    delay: f64,
    /// How long the GPU is held after the last submission, in milliseconds.
    #[arg(long, default_value_t = 200)]
    hold_ms: u64,
    /// Skip the timed comparison with the legacy file path.
    #[arg(long)]
    no_legacy: bool,
    /// TOML file overriding the daemon's embedded defaults (config/vgpu.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct DemoVm {
    id: u32,
    pool: PoolId,
    priority: Priority,
    num1: i32,
    num2: i32,
    name: String,
}

impl DemoVm {
    fn expected(&self) -> i32 {
        self.num1.wrapping_add(self.num2)
    }

    fn legacy(&self) -> legacy::Request {
        legacy::Request {
            pool: self.pool.to_string().chars().next().unwrap_or('A'),
            priority: self.priority as u32,
            vm_id: self.id,
            num1: self.num1,
            num2: self.num2,
        }
    }
}

/// The seeds' layout: VM1-VM3 pool A, VM4-VM6 pool B, VM7 verification.
fn seed_layout() -> Vec<DemoVm> {
    use Priority::{High, Low, Medium};
    [
        (1, b'A', High, 100, 200, "pool-a-1"),
        (2, b'A', Medium, 150, 250, "pool-a-2"),
        (3, b'A', Low, 50, 75, "pool-a-3"),
        (4, b'B', High, 300, 400, "pool-b-4"),
        (5, b'B', Low, 10, 20, "pool-b-5"),
        (6, b'B', Medium, 7, 8, "pool-b-6"),
        (7, b'B', Low, 1, 1, "verify-7"),
    ]
    .into_iter()
    .map(|(id, pool, priority, num1, num2, name)| DemoVm {
        id,
        pool: PoolId::new(pool).unwrap_or(PoolId::DEFAULT),
        priority,
        num1,
        num2,
        name: name.into(),
    })
    .collect()
}

/// The legacy client's `--vms` list.
fn parse_vms(spec: &str) -> Result<Vec<DemoVm>, String> {
    let mut vms: Vec<DemoVm> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let f: Vec<&str> = item.split(':').collect();
        if f.len() != 3 && f.len() != 5 {
            return Err(format!(
                "{item:?}: want vm_id:pool:priority or vm_id:pool:priority:num1:num2"
            ));
        }
        let id: u32 = f[0]
            .parse()
            .ok()
            .filter(|&id| id > 0)
            .ok_or_else(|| format!("{item:?}: vm_id must be a positive number"))?;
        let pool = match f[1] {
            "A" | "a" => PoolId::new(b'A'),
            "B" | "b" => PoolId::new(b'B'),
            other => return Err(format!("{item:?}: pool {other:?} is not A or B")),
        }
        .map_err(|e| e.to_string())?;
        let priority: Priority = f[2].parse().map_err(|e| format!("{item:?}: {e}"))?;
        let (num1, num2) = if f.len() == 5 {
            let n = |s: &str| {
                s.parse::<i32>()
                    .map_err(|_| format!("{item:?}: {s:?} is not a 32-bit integer"))
            };
            (n(f[3])?, n(f[4])?)
        } else {
            (100 * id as i32, id as i32)
        };
        if vms.iter().any(|v| v.id == id) {
            return Err(format!("vm_id {id} given twice"));
        }
        vms.push(DemoVm {
            id,
            pool,
            priority,
            num1,
            num2,
            name: format!("vm-{id}"),
        });
    }
    if vms.is_empty() {
        return Err("--vms lists no VM".into());
    }
    Ok(vms)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vgpu-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<bool, BoxError> {
    if !(cli.delay.is_finite() && cli.delay >= 0.0 && cli.delay <= 60.0) {
        return Err("--delay must be between 0 and 60 seconds".into());
    }
    let vms = match &cli.vms {
        Some(s) => parse_vms(s)?,
        None => seed_layout(),
    };
    let mut file = FileConfig::embedded()?;
    if let Some(path) = &cli.config {
        file = file.merge(FileConfig::read(path)?);
    }
    let cfg = DaemonConfig::resolve(file, Vec::new())?;
    let dir = std::env::temp_dir().join(format!("vgpu-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let db = dir.join("vgpu.db");
        register(&db, &vms)?;
        let daemon = Daemon::start_with(
            &cfg,
            VmSource::Database {
                db: db.clone(),
                socket_dir: dir.clone(),
            },
        )?;
        let r = demo(cli, &cfg, &daemon, &dir, &vms);
        daemon.shutdown();
        r
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn register(db: &Path, vms: &[DemoVm]) -> Result<(), BoxError> {
    let mut store = Store::open(db)?;
    let defaults = VmDefaults::embedded()?;
    for vm in vms {
        let uuid: VmUuid = format!("00000000-0000-4000-8000-{:012}", vm.id).parse()?;
        let mut new = NewVm::new(uuid, vm.pool, vm.priority, &defaults);
        new.vm_id = Some(vm.id);
        new.name = Some(vm.name.clone());
        store.register_vm(&new)?;
    }
    Ok(())
}

fn demo(
    cli: &Cli,
    cfg: &DaemonConfig,
    daemon: &Daemon,
    dir: &Path,
    vms: &[DemoVm],
) -> Result<bool, BoxError> {
    let mut guests = Vec::new();
    for vm in vms {
        let sock = vgpu::config::vm_socket(dir, vm.id);
        guests.push(SimGuest::connect_retry(
            &sock,
            SimOptions::default(),
            Duration::from_secs(10),
        )?);
    }
    let (info, out) = guests[0].call(Opcode::GetInfo as u16, 0, &[], 96)?;
    let device = vgpu::protocol::DeviceInfo::decode(&out)
        .map(|i| i.name)
        .unwrap_or_else(|_| format!("status {}", info.status));
    let status = daemon.status();
    let gpu_of: BTreeMap<u32, u32> = status.iter().map(|s| (s.vm_id, s.gpu)).collect();
    println!(
        "vgpu demo: {} VMs registered in a fresh database, served by the daemon",
        vms.len()
    );
    println!("device: {device}");
    println!("\n  vm  name       pool  priority  gpu  config space (what the guest reads)");
    for (vm, g) in vms.iter().zip(guests.iter_mut()) {
        let c = g.config_space()?;
        let word = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
        println!(
            "  {:>2}  {:<9}  {:<4}  {:<8}  {:>3}  pool_id '{}' priority {} vm_id {}",
            vm.id,
            vm.name,
            vm.pool.to_string(),
            vm.priority.as_str(),
            gpu_of.get(&vm.id).copied().unwrap_or(0),
            char::from_u32(word(8)).unwrap_or('?'),
            word(12),
            word(16)
        );
    }
    let gpus: std::collections::BTreeSet<u32> = gpu_of.values().copied().collect();
    if gpus.len() == 1 {
        println!(
            "  pools A and B share gpu{}: one queue, as in the legacy mediator",
            gpus.iter().next().copied().unwrap_or(0)
        );
    }
    let modes = match cli.mode {
        Some(m) => vec![m],
        None => vec![Mode::Simultaneous, Mode::Sequential],
    };
    // The legacy mediator runs from here on, as a daemon does, so that the
    // requests meet its once-a-second scan at whatever phase it is in.
    let legacy_root = dir.join("legacy");
    let mediator = if cli.no_legacy {
        None
    } else {
        legacy::setup_dirs(&legacy_root, vms.iter().map(|v| v.id))?;
        Some(legacy::Mediator::start(&legacy_root)?)
    };
    let mut all_ok = true;
    for mode in modes {
        all_ok &= held_run(cli, cfg, daemon, vms, &mut guests, &gpu_of, mode)?;
        if let Some(m) = &mediator {
            all_ok &= compare(cli, m, &legacy_root, vms, &mut guests, mode)?;
        }
    }
    if let Some(m) = mediator {
        m.stop();
    }
    Ok(all_ok)
}

/// One VM's SCALAR_ADD in the held run.
struct Row {
    vm: usize,
    arrival: Duration,
    hdr: RespHdr,
    result: Option<i32>,
}

fn add_payload(vm: &DemoVm) -> Vec<u8> {
    let mut p = vm.num1.to_le_bytes().to_vec();
    p.extend_from_slice(&vm.num2.to_le_bytes());
    p
}

fn held_run(
    cli: &Cli,
    cfg: &DaemonConfig,
    daemon: &Daemon,
    vms: &[DemoVm],
    guests: &mut [SimGuest],
    gpu_of: &BTreeMap<u32, u32>,
    mode: Mode,
) -> Result<bool, BoxError> {
    let n = vms.len();
    let spread = match mode {
        Mode::Simultaneous => Duration::ZERO,
        Mode::Sequential => Duration::from_secs_f64(cli.delay * n.saturating_sub(1) as f64),
    };
    let hold = spread + Duration::from_millis(cli.hold_ms);
    if hold >= cfg.exec_limit {
        return Err(format!(
            "the hold ({hold:?}) would pass the execution limit ({:?}): shorten --delay or --hold-ms",
            cfg.exec_limit
        )
        .into());
    }
    // The last VM of each GPU holds it.
    let mut holders: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, vm) in vms.iter().enumerate() {
        holders.insert(gpu_of.get(&vm.id).copied().unwrap_or(0), i);
    }
    println!("\n== {} ==", mode.name());
    match mode {
        Mode::Simultaneous => println!(
            "vm{} holds the GPU with a BUSY_WAIT of {} ms; meanwhile all {n} VMs submit num1+num2 at once",
            holder_names(vms, &holders),
            hold.as_millis()
        ),
        Mode::Sequential => println!(
            "vm{} holds the GPU with a BUSY_WAIT of {} ms; meanwhile the {n} VMs submit num1+num2 one every {} s",
            holder_names(vms, &holders),
            hold.as_millis(),
            cli.delay
        ),
    }
    let busy_hdr = ReqHdr::new(Opcode::BusyWait as u16, 1_000, 8);
    let mut busy_heads = BTreeMap::new();
    for &i in holders.values() {
        let ns = u64::try_from(hold.as_nanos()).unwrap_or(u64::MAX);
        let h = guests[i].submit(1, &busy_hdr, &ns.to_le_bytes(), 0)?;
        guests[i].kick()?;
        busy_heads.insert(i, h);
    }
    // Wait until every hold is running (dispatched, nothing queued).
    wait_until(daemon, |st| {
        holders.values().all(|&i| {
            st.iter()
                .any(|s| s.vm_id == vms[i].id && s.in_flight == 1 && s.queued == 0)
        })
    })?;
    let t0 = Instant::now();
    let mut heads = Vec::with_capacity(n);
    let mut arrivals = Vec::with_capacity(n);
    for (i, vm) in vms.iter().enumerate() {
        if mode == Mode::Sequential {
            let at = t0 + Duration::from_secs_f64(cli.delay * i as f64);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
        }
        let hdr = ReqHdr::new(Opcode::ScalarAddI32 as u16, vm.id as u64, 8);
        let arrival = t0.elapsed();
        heads.push(guests[i].submit(0, &hdr, &add_payload(vm), 4)?);
        guests[i].kick()?;
        arrivals.push(arrival);
        // The daemon has taken it off the ring before the next VM submits,
        // so that arrival order is the order of this table.
        wait_until(daemon, |st| {
            st.iter().any(|s| s.vm_id == vm.id && s.queued == 1)
        })?;
    }
    let still_held = daemon
        .status()
        .iter()
        .filter(|s| holders.values().any(|&i| vms[i].id == s.vm_id))
        .all(|s| s.in_flight >= 1);
    let mut rows = Vec::with_capacity(n);
    for (i, g) in guests.iter_mut().enumerate().take(n) {
        // A holder's BUSY_WAIT comes back in the same wait.
        let mut want = vec![heads[i]];
        want.extend(busy_heads.get(&i));
        g.wait_all(&want, Duration::from_secs(30))?;
        let (hdr, out) = g.response(0, 8, 4)?;
        let result = out
            .get(..4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        rows.push(Row {
            vm: i,
            arrival: arrivals[i],
            hdr,
            result,
        });
    }
    let mut holds = Vec::new();
    for &i in busy_heads.keys() {
        let (h, _) = guests[i].response(1, 8, 0)?;
        holds.push(format!("{} is vm{}'s BUSY_WAIT", h.dispatch_seq, vms[i].id));
    }
    print_rows(vms, &rows, gpu_of);
    println!(
        "  (dispatch_seq {} that holds the GPU; wait is the time in the daemon's queue)",
        holds.join(", ")
    );
    let mut ok = true;
    if !still_held {
        println!("note: the hold ended before every VM had submitted; raise --hold-ms");
        ok = false;
    }
    for r in &rows {
        let vm = &vms[r.vm];
        if r.hdr.status != Status::Ok as u32 || r.result != Some(vm.expected()) {
            println!(
                "vm{}: wrong answer: status {} result {:?}, want {}",
                vm.id,
                r.hdr.status,
                r.result,
                vm.expected()
            );
            ok = false;
        }
    }
    ok &= verdict(vms, &rows, gpu_of);
    Ok(ok)
}

fn holder_names(vms: &[DemoVm], holders: &BTreeMap<u32, usize>) -> String {
    holders
        .values()
        .map(|&i| vms[i].id.to_string())
        .collect::<Vec<_>>()
        .join(", vm")
}

fn wait_until(
    daemon: &Daemon,
    cond: impl Fn(&[vgpu::control::VmStatus]) -> bool,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond(&daemon.status()) {
        if Instant::now() > deadline {
            return Err("the daemon did not take the request off the ring within 10 s".into());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

fn print_rows(vms: &[DemoVm], rows: &[Row], gpu_of: &BTreeMap<u32, u32>) {
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by_key(|r| (gpu_of.get(&vms[r.vm].id).copied(), r.hdr.dispatch_seq));
    println!(
        "\n  {:>2}  {:<4}  {:<8}  {:>10}  {:>12}  {:>10}  result",
        "vm", "pool", "priority", "arrival", "dispatch_seq", "wait"
    );
    for r in sorted {
        let vm = &vms[r.vm];
        println!(
            "  {:>2}  {:<4}  {:<8}  {:>7.2} ms  {:>12}  {:>7.1} ms  {}+{} = {}",
            vm.id,
            vm.pool.to_string(),
            vm.priority.as_str(),
            r.arrival.as_secs_f64() * 1e3,
            r.hdr.dispatch_seq,
            r.hdr.queue_ns as f64 / 1e6,
            vm.num1,
            vm.num2,
            r.result.map_or("?".into(), |v| v.to_string())
        );
    }
}

/// Checks from the numbers: on each GPU, by dispatch_seq, priorities never
/// rise, and within a priority arrivals never go back.
fn verdict(vms: &[DemoVm], rows: &[Row], gpu_of: &BTreeMap<u32, u32>) -> bool {
    let mut by_gpu: BTreeMap<u32, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        by_gpu
            .entry(gpu_of.get(&vms[r.vm].id).copied().unwrap_or(0))
            .or_default()
            .push(r);
    }
    let mut problems = Vec::new();
    for list in by_gpu.values_mut() {
        list.sort_by_key(|r| r.hdr.dispatch_seq);
        for w in list.windows(2) {
            let (a, b) = (&vms[w[0].vm], &vms[w[1].vm]);
            if a.priority < b.priority {
                problems.push(format!(
                    "vm{} ({}) dispatched before vm{} ({})",
                    a.id, a.priority, b.id, b.priority
                ));
            } else if a.priority == b.priority && w[0].arrival > w[1].arrival {
                problems.push(format!(
                    "vm{} dispatched before vm{} of the same priority that arrived earlier",
                    a.id, b.id
                ));
            }
        }
    }
    let levels: std::collections::BTreeSet<Priority> = vms.iter().map(|v| v.priority).collect();
    if problems.is_empty() {
        println!(
            "verdict: OK: {} requests dispatched {}, FIFO within each priority (checked from dispatch_seq and arrival)",
            rows.len(),
            levels
                .iter()
                .rev()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(" before ")
        );
        true
    } else {
        println!("verdict: ORDER VIOLATED: {}", problems.join("; "));
        false
    }
}

/// The same requests without a hold: vgpu and the legacy path, timed.
fn compare(
    cli: &Cli,
    mediator: &legacy::Mediator,
    root: &Path,
    vms: &[DemoVm],
    guests: &mut Vec<SimGuest>,
    mode: Mode,
) -> Result<bool, BoxError> {
    let delay = Duration::from_secs_f64(cli.delay);
    // vgpu: one thread per VM, as the legacy client's VMs.
    let barrier = Arc::new(Barrier::new(vms.len()));
    let threads: Vec<_> = std::mem::take(guests)
        .into_iter()
        .zip(vms.iter().cloned())
        .enumerate()
        .map(|(i, (mut g, vm))| {
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<(SimGuest, i32, Duration), String> {
                barrier.wait();
                if mode == Mode::Sequential {
                    std::thread::sleep(delay * i as u32);
                }
                let t = Instant::now();
                let (h, out) = g
                    .call(
                        Opcode::ScalarAddI32 as u16,
                        vm.id as u64,
                        &add_payload(&vm),
                        4,
                    )
                    .map_err(|e| e.to_string())?;
                let rtt = t.elapsed();
                if h.status != Status::Ok as u32 || out.len() < 4 {
                    return Err(format!("vm{}: status {}", vm.id, h.status));
                }
                Ok((g, i32::from_le_bytes([out[0], out[1], out[2], out[3]]), rtt))
            })
        })
        .collect();
    let mut ours = Vec::new();
    for t in threads {
        let (g, v, rtt) = t.join().map_err(|_| "guest thread panicked")??;
        guests.push(g);
        ours.push((v, rtt));
    }
    // The legacy path on a local directory.
    let answered_before = mediator.processed().len();
    let barrier = Arc::new(Barrier::new(vms.len()));
    let threads: Vec<_> = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| {
            let (root, req, barrier) = (root.to_path_buf(), vm.legacy(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                if mode == Mode::Sequential {
                    std::thread::sleep(delay * i as u32);
                }
                legacy::call(&root, &req).map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut theirs = Vec::new();
    for t in threads {
        theirs.push(t.join().map_err(|_| "legacy client thread panicked")??);
    }
    let order: Vec<String> = mediator
        .processed()
        .iter()
        .skip(answered_before)
        .map(|p| format!("vm{}", p.req.vm_id))
        .collect();

    println!(
        "\nthe same requests without a hold, {}: vgpu vs the legacy file path\n(legacy reproduced on a local directory: request.txt with fsync, mediator scans every {} s, client polls every {} ms)",
        mode.name(),
        legacy::MEDIATOR_POLL.as_secs(),
        legacy::CLIENT_POLL.as_millis()
    );
    println!(
        "\n  {:>2}  {:<16}  {:>11}  {:>12}  {:>13}  {:>12}",
        "vm", "request", "vgpu result", "vgpu rtt", "legacy result", "legacy rtt"
    );
    let mut ok = true;
    for ((vm, (v, rtt)), (lv, lrtt)) in vms.iter().zip(&ours).zip(&theirs) {
        println!(
            "  {:>2}  {:<16}  {:>11}  {:>9.1} µs  {:>13}  {:>9.1} ms",
            vm.id,
            vm.legacy().line(),
            v,
            rtt.as_secs_f64() * 1e6,
            lv,
            lrtt.as_secs_f64() * 1e3
        );
        ok &= *v == vm.expected() && *lv == vm.expected();
    }
    let mean = |d: &mut dyn Iterator<Item = Duration>| {
        let v: Vec<Duration> = d.collect();
        v.iter().sum::<Duration>().as_secs_f64() / v.len().max(1) as f64
    };
    let m_ours = mean(&mut ours.iter().map(|x| x.1));
    let m_theirs = mean(&mut theirs.iter().map(|x| x.1));
    println!(
        "  mean round trip: vgpu {:.1} µs, legacy {:.1} ms: the legacy path takes {:.0}x as long",
        m_ours * 1e6,
        m_theirs * 1e3,
        m_theirs / m_ours.max(1e-9)
    );
    println!(
        "  legacy mediator answered in the order {}",
        order.join(" ")
    );
    if !ok {
        println!("  RESULTS DIFFER from num1+num2");
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_vms_syntax() {
        let v = parse_vms("1:A:2:100:200,2:A:1:150:250,3:B:2:50:75").unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(
            (v[1].id, v[1].priority, v[1].num1, v[1].num2),
            (2, Priority::Medium, 150, 250)
        );
        assert_eq!(v[2].pool.to_string(), "B");
        let v = parse_vms("1:A:2,2:A:2,3:A:high").unwrap();
        assert_eq!(v[2].priority, Priority::High);
        for bad in [
            "",
            "1:C:2",
            "1:A:5",
            "0:A:1",
            "1:A:1,1:B:1",
            "1:A",
            "1:A:1:2",
        ] {
            assert!(parse_vms(bad).is_err(), "{bad}");
        }
        assert_eq!(seed_layout().len(), 7);
    }
}
