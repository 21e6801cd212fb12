//! `vgpu-admin`: the control panel. Parses the command line, runs one command
//! against the database, tells a running daemon to reload after a change.

use std::io::{self, BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{error::ErrorKind, Parser, Subcommand};
use serde::Serialize;

use super::qemu;
use super::scan;
use super::store::{self, Change, NewPool, NewVm, Store, VmChange, VmRecord, VmRef, VmUuid};
use crate::config::{Register, VmDefaults};
use crate::control::{self, VmStatus};
use crate::protocol::{PoolId, Priority};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Scan(#[from] scan::Error),
    #[error(transparent)]
    Qemu(#[from] qemu::Error),
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} needs a VM restart: confirm on a terminal or pass --yes")]
    NeedsConfirmation(String),
    #[error("cancelled, nothing changed")]
    Cancelled,
    #[error("cannot read the answer: {0}")]
    Stdin(io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Xapi(#[from] super::xapi::Error),
    #[error(transparent)]
    XapiRpc(#[from] super::xapi_rpc::Error),
    #[error("xapi's record {obj} does not read: {why}")]
    XapiRecord { obj: String, why: String },
    #[error("VM {0} ('{1}') is not registered with vgpu on this host (register-vm first)")]
    NotRegistered(VmUuid, String),
    #[error("vm_id {vm_id} of VM {uuid} is already used in the pool by VM {holder} (other-config:vgpu-vm-id): give one of them another vm_id (set-vm-id)")]
    PoolVmIdTaken {
        vm_id: u32,
        uuid: VmUuid,
        holder: VmUuid,
    },
}

#[derive(Debug, Parser)]
#[command(
    name = "vgpu-admin",
    version,
    about = "vgpu control panel: pools, VMs and their priorities in the vgpu database"
)]
pub struct Cli {
    /// The database (created on first use).
    #[arg(long, global = true, env = "VGPU_DB", default_value = store::DEFAULT_DB_PATH)]
    pub db: PathBuf,
    /// The daemon's socket directory (VM sockets and control.sock).
    #[arg(long, global = true, env = "VGPU_SOCKET_DIR", default_value = control::DEFAULT_SOCKET_DIR)]
    pub socket_dir: PathBuf,
    /// The daemon's control socket [default: <socket-dir>/control.sock].
    #[arg(long, global = true, env = "VGPU_CONTROL")]
    pub control: Option<PathBuf>,
    /// More messages on stderr (-v: notes, -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database (pools A and B) or upgrade its schema.
    Init,
    /// Register a VM by its hypervisor UUID.
    RegisterVm {
        uuid: VmUuid,
        #[arg(long)]
        pool: PoolId,
        /// 0/low, 1/medium, 2/high.
        #[arg(long)]
        priority: Priority,
        /// [default: the smallest free vm_id]
        #[arg(long, value_parser = store::parse_vm_id)]
        vm_id: Option<u32>,
        #[arg(long)]
        name: Option<String>,
        /// [default: max_queued of config/vgpu.toml]
        #[arg(long)]
        max_queued: Option<u32>,
        /// [default: gpu_mem_quota_mib of config/vgpu.toml]
        #[arg(long)]
        gpu_mem_quota_mib: Option<u64>,
        /// Largest guest memory (all regions) the VM's frontend may share,
        /// MiB: a larger memory table is refused. [default: the daemon's
        /// max_guest_memory_mib, followed when it changes]
        #[arg(long, value_parser = store::parse_memory_bound)]
        max_guest_memory_mib: Option<store::MemoryBound>,
    },
    /// List the hypervisor's VMs (xe or virsh) by pool, registered or not.
    ScanVms {
        #[arg(long)]
        json: bool,
    },
    /// List the registered VMs.
    ListVms {
        /// Only this pool.
        #[arg(long)]
        pool: Option<PoolId>,
        #[arg(long)]
        json: bool,
    },
    /// Show one VM (UUID, name or vm_id).
    ShowVm {
        vm: VmRef,
        #[arg(long)]
        json: bool,
    },
    /// Move a VM to another pool.
    SetPool { vm: VmRef, pool: PoolId },
    /// Change a VM's priority (0/low, 1/medium, 2/high).
    SetPriority { vm: VmRef, priority: Priority },
    /// Change a VM's vm_id (the VM must be restarted).
    SetVmId {
        vm: VmRef,
        #[arg(value_parser = store::parse_vm_id)]
        vm_id: u32,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
    },
    /// Change several fields of a VM at once.
    UpdateVm {
        vm: VmRef,
        #[arg(long)]
        name: Option<String>,
        /// Remove the VM's name.
        #[arg(long, conflicts_with = "name")]
        clear_name: bool,
        #[arg(long)]
        pool: Option<PoolId>,
        #[arg(long)]
        priority: Option<Priority>,
        #[arg(long)]
        max_queued: Option<u32>,
        #[arg(long)]
        gpu_mem_quota_mib: Option<u64>,
        /// Registration of the VM's guest memory with the CUDA driver: `all`
        /// pins the whole guest RAM for zero-copy DMA, `staging` pins
        /// nothing and stages every copy (docs/gpu.md). Applies at once.
        #[arg(long, value_enum)]
        register: Option<Register>,
        /// Largest guest memory the VM's frontend may share, MiB, or
        /// `default` (the daemon's max_guest_memory_mib). Applies at once:
        /// a connected frontend whose memory is now larger is disconnected.
        #[arg(long, value_parser = store::parse_memory_bound)]
        max_guest_memory_mib: Option<store::MemoryBound>,
    },
    /// Remove a VM from the database.
    RemoveVm { vm: VmRef },
    /// A live view of every VM and GPU from the daemon's control socket
    /// (q, Esc or Ctrl-C quit; s/S sort; r reverse).
    Top {
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
        interval_ms: u64,
        /// Column to sort the VMs by.
        #[arg(long, value_enum, default_value = "vm")]
        sort: super::top::SortKey,
        #[arg(long)]
        reverse: bool,
        /// Print one plain table and exit (also what happens when standard
        /// output is not a terminal).
        #[arg(long)]
        once: bool,
    },
    /// Pools, VMs and, when the daemon runs, live figures per VM.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List the pools.
    PoolList {
        #[arg(long)]
        json: bool,
    },
    /// Add a pool (one letter A-Z) on a GPU.
    PoolAdd {
        id: PoolId,
        #[arg(long)]
        name: String,
        /// GPU index.
        #[arg(long)]
        gpu: u32,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Move a pool, and its VMs, to another GPU.
    PoolSetGpu { id: PoolId, gpu: u32 },
    /// XCP-ng: write a registered VM's device-model-args and pool-wide
    /// assignment (other-config:vgpu-*) into XAPI with xe.
    Apply {
        /// The VM's XAPI name-label or UUID.
        #[arg(required_unless_present = "all")]
        vm: Option<String>,
        /// Every VM registered in this database.
        #[arg(long, conflicts_with = "vm")]
        all: bool,
        /// Show the xe commands, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// XCP-ng: remove vgpu's keys (device-model-args, other-config:vgpu-*)
    /// from a VM in XAPI; the local database is left as it is.
    Unapply {
        /// The VM's XAPI name-label or UUID.
        #[arg(required_unless_present = "all")]
        vm: Option<String>,
        /// Every VM that has vgpu keys in XAPI or is registered here.
        #[arg(long, conflicts_with = "vm")]
        all: bool,
        #[arg(long)]
        dry_run: bool,
    },
    /// XCP-ng: make this database's VMs equal to the other-config:vgpu-* of
    /// the VMs this host serves, those running here or nowhere (--from-xapi;
    /// what the vm-pre-start hook runs), or publish every local VM to XAPI
    /// (--to-xapi, as apply --all).
    Sync {
        #[arg(long, required_unless_present = "to_xapi", conflicts_with = "to_xapi")]
        from_xapi: bool,
        #[arg(long)]
        to_xapi: bool,
        /// Show what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// XCP-ng: keep this database's VMs equal to what XAPI says this host
    /// serves (its VMs running here or nowhere), following XAPI's events;
    /// run as a service (xen/systemd/vgpu-xapi-follow.service).
    FollowXapi {
        /// xapi's local socket.
        #[arg(long, default_value = super::xapi_rpc::DEFAULT_SOCKET)]
        xapi_socket: PathBuf,
        /// Seconds one wait for XAPI's events lasts.
        #[arg(long, default_value_t = super::xapi_follow::DEFAULT_EVENT_TIMEOUT_S,
              value_parser = super::xapi_follow::parse_event_timeout)]
        event_timeout_s: f64,
        /// Apply one full listing and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print the QEMU arguments that attach a VM to the daemon.
    QemuArgs {
        vm: VmRef,
        /// XCP-ng: print device-model-args and the xe command that sets it.
        #[arg(long)]
        xcp_ng: bool,
        /// Guest RAM size, as given to -m (e.g. 4G) [default: a <RAM> placeholder].
        #[arg(long)]
        memory: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the `vgpu-admin` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    init_logging(cli.verbose);
    match run(&cli, &mut io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vgpu-admin: error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// Help and version as clap prints them; every usage error as one line.
fn clap_exit(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("vgpu-admin: error: no command given (see vgpu-admin --help)");
            ExitCode::from(2)
        }
        _ => {
            let text = e.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let msg = lines.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("vgpu-admin: error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .format(|f, r| {
            let level = match r.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warning",
                _ => "note",
            };
            writeln!(f, "vgpu-admin: {level}: {}", r.args())
        })
        .try_init();
}

impl Cli {
    fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| control::socket_path(&self.socket_dir))
    }
}

/// Runs the command; output for people or JSON goes to `out`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<(), Error> {
    if let Command::Top {
        interval_ms,
        sort,
        reverse,
        once,
    } = &cli.command
    {
        // Needs the daemon only, not the database.
        let o = super::top::Options {
            control: cli.control_path(),
            interval: Duration::from_millis(*interval_ms),
            sort: *sort,
            reverse: *reverse,
            once: *once,
        };
        return super::top::run(o, out).map_err(Error::Output);
    }
    let mut store = Store::open(&cli.db)?;
    let changed = match &cli.command {
        Command::Init => {
            writeln!(
                out,
                "database {} ready (schema version {})",
                store.path().display(),
                store.schema_version()?
            )?;
            print_pools(out, &store.pools()?)?;
            false
        }
        Command::RegisterVm {
            uuid,
            pool,
            priority,
            vm_id,
            name,
            max_queued,
            gpu_mem_quota_mib,
            max_guest_memory_mib,
        } => {
            let mut new = NewVm::new(uuid.clone(), *pool, *priority, &VmDefaults::embedded()?);
            new.max_guest_memory_mib = max_guest_memory_mib.and_then(|b| b.0);
            new.vm_id = *vm_id;
            new.name = name.clone();
            if let Some(n) = max_queued {
                new.max_queued = *n;
            }
            if let Some(q) = gpu_mem_quota_mib {
                new.gpu_mem_quota_mib = *q;
            }
            let vm = store.register_vm(&new)?;
            writeln!(
                out,
                "registered {} as vm_id {} (pool {}, priority {})",
                vm.label(),
                vm.vm_id,
                vm.pool,
                vm.priority
            )?;
            true
        }
        Command::ScanVms { json } => {
            scan_vms(&store, out, *json)?;
            false
        }
        Command::ListVms { pool, json } => {
            let vms: Vec<VmRecord> = store
                .vms()?
                .into_iter()
                .filter(|v| pool.is_none_or(|p| v.pool == p))
                .collect();
            if *json {
                write_json(out, &vms)?;
            } else {
                print_vms(out, &vms, None)?;
            }
            false
        }
        Command::ShowVm { vm, json } => {
            let vm = store.find_vm(vm)?;
            if *json {
                write_json(out, &vm)?;
            } else {
                show_vm(out, &vm, &cli.socket_dir)?;
            }
            false
        }
        Command::SetPool { vm, pool } => {
            let c = store.set_pool(vm, *pool)?;
            print_change(out, &c)?;
            true
        }
        Command::SetPriority { vm, priority } => {
            let c = store.set_priority(vm, *priority)?;
            print_change(out, &c)?;
            true
        }
        Command::SetVmId { vm, vm_id, yes } => set_vm_id(&mut store, out, cli, vm, *vm_id, *yes)?,
        Command::UpdateVm {
            vm,
            name,
            clear_name,
            pool,
            priority,
            max_queued,
            gpu_mem_quota_mib,
            register,
            max_guest_memory_mib,
        } => {
            let change = VmChange {
                vm_id: None,
                name: if *clear_name {
                    Some(None)
                } else {
                    name.clone().map(Some)
                },
                pool: *pool,
                priority: *priority,
                max_queued: *max_queued,
                gpu_mem_quota_mib: *gpu_mem_quota_mib,
                register: *register,
                max_guest_memory_mib: max_guest_memory_mib.map(|b| b.0),
            };
            let c = store.update_vm(vm, &change)?;
            print_change(out, &c)?;
            true
        }
        Command::RemoveVm { vm } => {
            let vm = store.remove_vm(vm)?;
            writeln!(out, "removed {} (vm_id {})", vm.label(), vm.vm_id)?;
            true
        }
        Command::Top { .. } => false, // handled above
        Command::Status { json } => {
            status(&store, out, &cli.control_path(), *json)?;
            false
        }
        Command::PoolList { json } => {
            let pools = store.pools()?;
            if *json {
                write_json(out, &pools)?;
            } else {
                print_pools(out, &pools)?;
            }
            false
        }
        Command::PoolAdd {
            id,
            name,
            gpu,
            description,
        } => {
            let p = store.add_pool(&NewPool {
                id: *id,
                name: name.clone(),
                gpu_index: *gpu,
                description: description.clone(),
            })?;
            writeln!(
                out,
                "added pool {} ({}) on GPU {}",
                p.id, p.name, p.gpu_index
            )?;
            true
        }
        Command::PoolSetGpu { id, gpu } => {
            let Change { before, after } = store.set_pool_gpu(*id, *gpu)?;
            writeln!(
                out,
                "pool {}: GPU {} -> {} ({} VMs)",
                after.id, before.gpu_index, after.gpu_index, after.vm_count
            )?;
            true
        }
        Command::Apply {
            vm,
            all: _,
            dry_run,
        } => {
            super::pool_wide::apply(&store, out, &cli.socket_dir, vm.as_deref(), *dry_run)?;
            false
        }
        Command::Unapply {
            vm,
            all: _,
            dry_run,
        } => {
            super::pool_wide::unapply(&store, out, vm.as_deref(), *dry_run)?;
            false
        }
        Command::Sync {
            from_xapi: true,
            dry_run,
            ..
        } => super::pool_wide::sync_from_xapi(&mut store, out, *dry_run)?,
        Command::Sync { dry_run, .. } => {
            super::pool_wide::apply(&store, out, &cli.socket_dir, None, *dry_run)?;
            false
        }
        Command::FollowXapi {
            xapi_socket,
            event_timeout_s,
            once,
        } => {
            let o = super::xapi_follow::Options {
                socket: xapi_socket.clone(),
                event_timeout_s: *event_timeout_s,
                once: *once,
            };
            // It tells the daemon itself after each change.
            super::xapi_follow::follow(&mut store, &o, &cli.control_path(), out)?;
            false
        }
        Command::QemuArgs {
            vm,
            xcp_ng,
            memory,
            json,
        } => {
            let vm = store.find_vm(vm)?;
            print_qemu_args(out, &vm, cli, memory.as_deref(), *xcp_ng, *json)?;
            false
        }
    };
    if changed {
        notify_daemon(&cli.control_path());
    }
    Ok(())
}

/// Asks a running daemon to re-read the database; no daemon is not an error.
pub(super) fn notify_daemon(path: &Path) {
    match control::request(path, &control::Request::Reload) {
        Ok(_) => log::info!("daemon reloaded the database"),
        Err(e) if e.is_not_running() => log::info!("no daemon to reload ({e})"),
        Err(e) => log::warn!("the daemon did not reload: {e}"),
    }
}

fn write_json<T: Serialize + ?Sized>(out: &mut dyn Write, v: &T) -> Result<(), Error> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Aligned columns, two spaces apart, no trailing blanks.
fn table(out: &mut dyn Write, indent: &str, head: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&head).chain(rows) {
        let mut line = String::from(indent);
        for (i, (cell, w)) in row.iter().zip(&width).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(
                ' ',
                w.saturating_sub(cell.chars().count()),
            ));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn print_pools(out: &mut dyn Write, pools: &[store::PoolRecord]) -> io::Result<()> {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.id.to_string(),
                p.name.clone(),
                p.gpu_index.to_string(),
                p.vm_count.to_string(),
                p.description.clone(),
            ]
        })
        .collect();
    table(
        out,
        "",
        &["POOL", "NAME", "GPU", "VMS", "DESCRIPTION"],
        &rows,
    )
}

fn fmt_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

/// VMs as a table; with `live`, the daemon's figures per VM as extra columns.
fn print_vms(out: &mut dyn Write, vms: &[VmRecord], live: Option<&[VmStatus]>) -> io::Result<()> {
    let mut head = vec![
        "VM_ID",
        "NAME",
        "UUID",
        "POOL",
        "GPU",
        "PRIORITY",
        "MAX_QUEUED",
        "MEM_QUOTA_MIB",
    ];
    if live.is_some() {
        head.extend([
            "CONNECTED",
            "QUEUED",
            "IN_FLIGHT",
            "DONE",
            "WAIT_P50",
            "WAIT_P99",
        ]);
    }
    let live_cells = |s: Option<&VmStatus>| match s {
        Some(s) => vec![
            if s.connected { "yes" } else { "no" }.to_string(),
            s.queued.to_string(),
            s.in_flight.to_string(),
            s.done.to_string(),
            fmt_ns(s.wait_p50_ns),
            fmt_ns(s.wait_p99_ns),
        ],
        None => vec![
            "no".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ],
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    for v in vms {
        let mut row = vec![
            v.vm_id.to_string(),
            v.name.clone().unwrap_or_else(|| "-".into()),
            v.uuid.to_string(),
            v.pool.to_string(),
            v.gpu_index.to_string(),
            v.priority.to_string(),
            v.max_queued.to_string(),
            v.gpu_mem_quota_mib.to_string(),
        ];
        if let Some(live) = live {
            row.extend(live_cells(live.iter().find(|s| s.vm_id == v.vm_id)));
        }
        rows.push(row);
    }
    // Live VMs the database does not know (removed since the daemon loaded it).
    for s in live.unwrap_or_default() {
        if !vms.iter().any(|v| v.vm_id == s.vm_id) {
            let mut row = vec![s.vm_id.to_string(), "(not in database)".into()];
            row.extend(std::iter::repeat_n("-".to_string(), 6));
            row.extend(live_cells(Some(s)));
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return writeln!(out, "no VMs registered");
    }
    table(out, "", &head, &rows)
}

fn show_vm(out: &mut dyn Write, vm: &VmRecord, socket_dir: &Path) -> io::Result<()> {
    let fields = [
        ("uuid", vm.uuid.to_string()),
        ("vm_id", vm.vm_id.to_string()),
        ("name", vm.name.clone().unwrap_or_else(|| "-".into())),
        ("pool", format!("{} (GPU {})", vm.pool, vm.gpu_index)),
        (
            "priority",
            format!("{} ({})", vm.priority, vm.priority as u32),
        ),
        ("max_queued", vm.max_queued.to_string()),
        ("gpu_mem_quota_mib", vm.gpu_mem_quota_mib.to_string()),
        ("register", vm.register.to_string()),
        ("max_guest_memory", mem_bound(vm.max_guest_memory_mib)),
        (
            "socket",
            crate::config::vm_socket(socket_dir, vm.vm_id)
                .display()
                .to_string(),
        ),
        ("created_at", vm.created_at.clone()),
        ("updated_at", vm.updated_at.clone()),
    ];
    for (k, v) in fields {
        writeln!(out, "{:<18} {v}", format!("{k}:"))?;
    }
    Ok(())
}

/// A VM's guest-memory bound as shown: "4096 MiB" or "default".
fn mem_bound(m: Option<u64>) -> String {
    m.map_or_else(|| "default".into(), |v| format!("{v} MiB"))
}

/// "web-1 (vm_id 3): pool A -> B, priority low -> high".
fn print_change(out: &mut dyn Write, c: &Change<VmRecord>) -> io::Result<()> {
    let (b, a) = (&c.before, &c.after);
    let mut parts = Vec::new();
    let mut diff = |what: &str, old: String, new: String| {
        if old != new {
            parts.push(format!("{what} {old} -> {new}"));
        }
    };
    diff("vm_id", b.vm_id.to_string(), a.vm_id.to_string());
    let name = |v: &VmRecord| v.name.clone().unwrap_or_else(|| "(none)".into());
    diff("name", name(b), name(a));
    diff("pool", b.pool.to_string(), a.pool.to_string());
    diff("priority", b.priority.to_string(), a.priority.to_string());
    diff(
        "max_queued",
        b.max_queued.to_string(),
        a.max_queued.to_string(),
    );
    diff(
        "gpu_mem_quota_mib",
        b.gpu_mem_quota_mib.to_string(),
        a.gpu_mem_quota_mib.to_string(),
    );
    diff("register", b.register.to_string(), a.register.to_string());
    diff(
        "max_guest_memory",
        mem_bound(b.max_guest_memory_mib),
        mem_bound(a.max_guest_memory_mib),
    );
    if parts.is_empty() {
        parts.push("unchanged".into());
    }
    writeln!(
        out,
        "{} (vm_id {}): {}",
        a.label(),
        a.vm_id,
        parts.join(", ")
    )
}

/// set-vm-id: shows current vs new and asks before changing (the vm_id is in
/// the VM's QEMU arguments, so the VM must be restarted).
fn set_vm_id(
    store: &mut Store,
    out: &mut dyn Write,
    cli: &Cli,
    vm: &VmRef,
    vm_id: u32,
    yes: bool,
) -> Result<bool, Error> {
    let current = store.find_vm(vm)?;
    if current.vm_id == vm_id {
        writeln!(out, "{} already has vm_id {vm_id}", current.uuid)?;
        return Ok(false);
    }
    if let Some(holder) = store.vm_by_id(vm_id)? {
        return Err(store::Error::DuplicateVmId {
            vm_id,
            uuid: holder.uuid,
        }
        .into());
    }
    if !yes {
        let what = format!("changing vm_id {} -> {vm_id}", current.vm_id);
        if !io::stdin().is_terminal() {
            return Err(Error::NeedsConfirmation(what));
        }
        let sock = |id: u32| crate::config::vm_socket(&cli.socket_dir, id);
        eprintln!("VM {} ({})", current.uuid, current.label());
        eprintln!(
            "  current: vm_id {}  socket {}",
            current.vm_id,
            sock(current.vm_id).display()
        );
        eprintln!("  new:     vm_id {vm_id}  socket {}", sock(vm_id).display());
        eprintln!("The VM must be restarted with its new QEMU arguments (see qemu-args).");
        eprint!("Proceed? [y/N] ");
        let mut answer = String::new();
        io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(Error::Stdin)?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            return Err(Error::Cancelled);
        }
    }
    let c = store.set_vm_id(vm, vm_id)?;
    print_change(out, &c)?;
    writeln!(
        out,
        "restart the VM with its new QEMU arguments (see qemu-args)"
    )?;
    Ok(true)
}

#[derive(Serialize)]
struct VmLive<'a> {
    #[serde(flatten)]
    vm: &'a VmRecord,
    live: Option<&'a VmStatus>,
}

#[derive(Serialize)]
struct DaemonState {
    running: bool,
    detail: String,
}

#[derive(Serialize)]
struct StatusReport<'a> {
    database: &'a Path,
    schema_version: u32,
    daemon: DaemonState,
    pools: Vec<store::PoolRecord>,
    vms: Vec<VmLive<'a>>,
    /// VMs the daemon reports that the database does not have.
    unknown_live: Vec<&'a VmStatus>,
}

fn status(
    store: &Store,
    out: &mut dyn Write,
    control_path: &Path,
    json: bool,
) -> Result<(), Error> {
    let vms = store.vms()?;
    let pools = store.pools()?;
    let (live, detail) = match control::request(control_path, &control::Request::Status) {
        Ok(r) => {
            let live = r.vms.unwrap_or_default();
            let connected = live.iter().filter(|s| s.connected).count();
            let detail = format!("running, {connected} of {} VMs connected", live.len());
            (Some(live), detail)
        }
        Err(e) if e.is_not_running() => {
            let where_ = control_path.display();
            (None, format!("not running (nothing listens on {where_})"))
        }
        Err(e) => (None, format!("not answering ({e})")),
    };
    let daemon = DaemonState {
        running: live.is_some(),
        detail,
    };
    if json {
        let live_ref = live.as_deref().unwrap_or_default();
        let report = StatusReport {
            database: store.path(),
            schema_version: store.schema_version()?,
            daemon,
            pools,
            vms: vms
                .iter()
                .map(|vm| VmLive {
                    vm,
                    live: live_ref.iter().find(|s| s.vm_id == vm.vm_id),
                })
                .collect(),
            unknown_live: live_ref
                .iter()
                .filter(|s| !vms.iter().any(|v| v.vm_id == s.vm_id))
                .collect(),
        };
        return write_json(out, &report);
    }
    writeln!(
        out,
        "database: {} (schema version {})",
        store.path().display(),
        store.schema_version()?
    )?;
    writeln!(out, "daemon: {}", daemon.detail)?;
    writeln!(out)?;
    print_pools(out, &pools)?;
    writeln!(out)?;
    print_vms(out, &vms, live.as_deref())?;
    Ok(())
}

#[derive(Serialize)]
struct ScanEntry<'a> {
    #[serde(flatten)]
    host: &'a scan::HostVm,
    registered: Option<&'a VmRecord>,
}

#[derive(Serialize)]
struct ScanReport<'a> {
    hypervisor: scan::Hypervisor,
    vms: Vec<ScanEntry<'a>>,
    /// Registered VMs the hypervisor does not list.
    missing: Vec<&'a VmRecord>,
}

fn scan_vms(store: &Store, out: &mut dyn Write, json: bool) -> Result<(), Error> {
    let (hypervisor, host_vms) = scan::scan()?;
    let registered = store.vms()?;
    let entries: Vec<ScanEntry> = host_vms
        .iter()
        .map(|host| ScanEntry {
            host,
            registered: registered.iter().find(|r| r.uuid == host.uuid),
        })
        .collect();
    let missing: Vec<&VmRecord> = registered
        .iter()
        .filter(|r| !host_vms.iter().any(|h| h.uuid == r.uuid))
        .collect();
    if json {
        return write_json(
            out,
            &ScanReport {
                hypervisor,
                vms: entries,
                missing,
            },
        );
    }
    writeln!(out, "hypervisor: {hypervisor}, {} VMs", host_vms.len())?;
    for pool in store.pools()? {
        writeln!(
            out,
            "\npool {} ({}, GPU {})",
            pool.id, pool.name, pool.gpu_index
        )?;
        let rows: Vec<Vec<String>> = entries
            .iter()
            .filter_map(|e| e.registered.filter(|r| r.pool == pool.id).map(|r| (e, r)))
            .map(|(e, r)| {
                vec![
                    "registered".into(),
                    r.vm_id.to_string(),
                    r.priority.to_string(),
                    e.host.uuid.to_string(),
                    e.host.name.clone(),
                    e.host.power_state.clone(),
                ]
            })
            .collect();
        if rows.is_empty() {
            writeln!(out, "  (no VMs on this host)")?;
        } else {
            let head = ["", "VM_ID", "PRIORITY", "UUID", "HOST NAME", "POWER"];
            table(out, "  ", &head, &rows)?;
        }
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .filter(|e| e.registered.is_none())
        .map(|e| {
            vec![
                "not registered".into(),
                e.host.uuid.to_string(),
                e.host.name.clone(),
                e.host.power_state.clone(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        writeln!(
            out,
            "\nnot in any pool (vgpu-admin register-vm UUID --pool P --priority P)"
        )?;
        table(out, "  ", &["", "UUID", "HOST NAME", "POWER"], &rows)?;
    }
    if !missing.is_empty() {
        writeln!(out, "\nregistered but not on this host")?;
        for r in &missing {
            writeln!(
                out,
                "  vm_id {} {} ({}, pool {})",
                r.vm_id,
                r.uuid,
                r.label(),
                r.pool
            )?;
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct QemuReport<'a> {
    uuid: &'a VmUuid,
    vm_id: u32,
    args: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_model_args: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    xe_command: Option<String>,
}

fn print_qemu_args(
    out: &mut dyn Write,
    vm: &VmRecord,
    cli: &Cli,
    memory: Option<&str>,
    xen: bool,
    json: bool,
) -> Result<(), Error> {
    let args = qemu::qemu_args(vm, &cli.socket_dir, memory, xen)?;
    if json {
        let flat = args
            .args
            .iter()
            .flat_map(|[o, v]| [o.clone(), v.clone()])
            .collect();
        return write_json(
            out,
            &QemuReport {
                uuid: &vm.uuid,
                vm_id: vm.vm_id,
                args: flat,
                device_model_args: xen.then(|| args.one_line()),
                xe_command: xen.then(|| qemu::xe_command(vm, &args)),
            },
        );
    }
    if xen {
        writeln!(
            out,
            "# device-model-args of {} (vm_id {})",
            vm.uuid, vm.vm_id
        )?;
        writeln!(out, "{}", args.one_line())?;
        writeln!(out, "# set them with")?;
        writeln!(out, "{}", qemu::xe_command(vm, &args))?;
    } else {
        if memory.is_none() {
            eprintln!(
                "vgpu-admin: note: replace {} with the VM's memory size as given to -m (or pass --memory 4G)",
                qemu::RAM_PLACEHOLDER
            );
        }
        writeln!(out, "{}", args.shell_lines())?;
    }
    Ok(())
}
