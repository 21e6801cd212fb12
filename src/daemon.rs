//! The daemon: configuration (embedded defaults, file, command line), one
//! scheduler per GPU, one vhost-user socket per VM, and an orderly stop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;

use crate::admin::store::{self, Store};
use crate::control::{self, VmStatus};
use crate::executor::{self, ExecutorChoice};
use crate::protocol::{self, PoolId, Priority};
use crate::scheduler::{self, ArrivalCounter, Control, Gpu, Policy};
use crate::vhu_vgpu;
use crate::vm::{Vm, VmSettings};

pub const DEFAULT_CONFIG: &str = include_str!("../config/vgpu.toml");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --vm '{spec}': {msg}")]
    VmSpec { spec: String, msg: String },
    #[error("invalid --pool-gpu '{0}' (expected A=0,B=1)")]
    PoolGpu(String),
    #[error("config file {path}: {msg}")]
    ConfigFile { path: PathBuf, msg: String },
    #[error("duplicate {what} {value}")]
    Duplicate { what: &'static str, value: String },
    #[error("no VM configured: give --vm, or --socket with --vm-id/--pool/--priority")]
    NoVms,
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
    #[error(transparent)]
    Scheduler(#[from] scheduler::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot prepare socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The keys of config/vgpu.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub executor: Option<ExecutorChoice>,
    pub exec_limit_ms: Option<u64>,
    pub max_queued: Option<usize>,
    pub policy: Option<String>,
    pub aging_step_ms: Option<u64>,
    pub socket_dir: Option<PathBuf>,
    pub pool_gpu: Option<BTreeMap<String, u32>>,
}

impl FileConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            msg: e.to_string().lines().next().unwrap_or_default().to_string(),
        })
    }

    /// The embedded defaults (config/vgpu.toml).
    pub fn embedded() -> Result<Self, Error> {
        FileConfig::parse(DEFAULT_CONFIG, Path::new("config/vgpu.toml"))
    }

    /// A configuration file given by the user.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        FileConfig::parse(&text, path)
    }

    /// `other`'s keys win.
    pub fn merge(self, other: FileConfig) -> FileConfig {
        FileConfig {
            executor: other.executor.or(self.executor),
            exec_limit_ms: other.exec_limit_ms.or(self.exec_limit_ms),
            max_queued: other.max_queued.or(self.max_queued),
            policy: other.policy.or(self.policy),
            aging_step_ms: other.aging_step_ms.or(self.aging_step_ms),
            socket_dir: other.socket_dir.or(self.socket_dir),
            pool_gpu: match (self.pool_gpu, other.pool_gpu) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                (a, b) => b.or(a),
            },
        }
    }
}

/// One VM to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub vm_id: u32,
    pub pool: PoolId,
    pub priority: Priority,
    pub socket: PathBuf,
    pub max_queued: Option<usize>,
}

impl FromStr for VmSpec {
    type Err = Error;
    /// `id=1,pool=A,priority=high,socket=/run/vgpu/vm1.sock[,max-queued=64]`
    fn from_str(spec: &str) -> Result<Self, Error> {
        let bad = |msg: String| Error::VmSpec {
            spec: spec.to_string(),
            msg,
        };
        let (mut id, mut pool, mut prio, mut socket, mut maxq) = (None, None, None, None, None);
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("'{part}' is not key=value")))?;
            match k.trim() {
                "id" | "vm-id" | "vm_id" => {
                    id = Some(parse_vm_id(v).map_err(bad)?);
                }
                "pool" => pool = Some(v.parse::<PoolId>().map_err(|e| bad(e.to_string()))?),
                "priority" => prio = Some(v.parse::<Priority>().map_err(|e| bad(e.to_string()))?),
                "socket" => socket = Some(PathBuf::from(v)),
                "max-queued" | "max_queued" => {
                    maxq = Some(parse_max_queued(v).map_err(bad)?);
                }
                other => return Err(bad(format!("unknown key '{other}'"))),
            }
        }
        Ok(VmSpec {
            vm_id: id.ok_or_else(|| bad("missing id=".into()))?,
            pool: pool.unwrap_or(PoolId::DEFAULT),
            priority: prio.unwrap_or(Priority::Medium),
            socket: socket.ok_or_else(|| bad("missing socket=".into()))?,
            max_queued: maxq,
        })
    }
}

fn parse_vm_id(v: &str) -> Result<u32, String> {
    match v.trim().parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("vm id '{v}' must be a positive integer")),
    }
}

fn parse_max_queued(v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("max-queued '{v}' must be a positive integer")),
    }
}

/// `A=0,B=1`
pub fn parse_pool_gpu(s: &str) -> Result<BTreeMap<PoolId, u32>, Error> {
    let mut map = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (p, g) = part
            .split_once('=')
            .ok_or_else(|| Error::PoolGpu(s.to_string()))?;
        let pool: PoolId = p.parse()?;
        let gpu: u32 = g
            .trim()
            .parse()
            .map_err(|_| Error::PoolGpu(s.to_string()))?;
        map.insert(pool, gpu);
    }
    Ok(map)
}

/// Everything the daemon needs to run.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub executor: ExecutorChoice,
    pub exec_limit: Duration,
    pub max_queued: usize,
    pub policy: Policy,
    pub pool_gpu: BTreeMap<PoolId, u32>,
    pub vms: Vec<VmSpec>,
}

impl DaemonConfig {
    /// Resolves a merged file configuration (defaults first) and the VMs.
    pub fn resolve(file: FileConfig, vms: Vec<VmSpec>) -> Result<Self, Error> {
        let cfg_err = |msg: String| Error::ConfigFile {
            path: PathBuf::from("<merged configuration>"),
            msg,
        };
        let mut pool_gpu = BTreeMap::new();
        for (p, g) in file.pool_gpu.unwrap_or_default() {
            pool_gpu.insert(p.parse::<PoolId>()?, g);
        }
        let policy = match file.policy.as_deref().unwrap_or("strict") {
            "strict" => Policy::Strict,
            "aging" => Policy::Aging {
                step: Duration::from_millis(file.aging_step_ms.unwrap_or(100).max(1)),
            },
            other => return Err(cfg_err(format!("policy '{other}' is not strict or aging"))),
        };
        let max_queued = file.max_queued.unwrap_or(64);
        if max_queued == 0 {
            return Err(cfg_err("max_queued must be at least 1".into()));
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut sockets = std::collections::BTreeSet::new();
        for v in &vms {
            if !ids.insert(v.vm_id) {
                return Err(Error::Duplicate {
                    what: "vm id",
                    value: v.vm_id.to_string(),
                });
            }
            if !sockets.insert(v.socket.clone()) {
                return Err(Error::Duplicate {
                    what: "socket",
                    value: v.socket.display().to_string(),
                });
            }
        }
        Ok(DaemonConfig {
            executor: file.executor.unwrap_or(ExecutorChoice::Auto),
            exec_limit: Duration::from_millis(file.exec_limit_ms.unwrap_or(10_000).max(1)),
            max_queued,
            policy,
            pool_gpu,
            vms,
        })
    }

    fn gpu_of(&self, pool: PoolId) -> u32 {
        self.pool_gpu.get(&pool).copied().unwrap_or(0)
    }
}

/// Where the VMs come from.
#[derive(Debug, Clone)]
pub enum VmSource {
    /// Fixed on the command line.
    Static(Vec<VmSpec>),
    /// The vgpu-admin database, followed live; sockets are `DIR/vm<ID>.sock`.
    Database { db: PathBuf, socket_dir: PathBuf },
}

/// A running daemon.
pub struct Daemon {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: DaemonConfig,
    arrivals: Arc<ArrivalCounter>,
    stopping: Arc<AtomicBool>,
    gpus: Mutex<BTreeMap<u32, Arc<Gpu>>>,
    vms: Mutex<BTreeMap<u32, ServedVm>>,
    store: Option<Mutex<Store>>,
    socket_dir: Option<PathBuf>,
}

struct ServedVm {
    vm: Arc<Vm>,
    socket: PathBuf,
}

/// What the configuration says about one VM.
struct Wanted {
    settings: VmSettings,
    gpu: u32,
    socket: PathBuf,
    /// Device memory for CUDA remoting; `None`: the executor's default.
    gpu_mem_quota: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Daemon {
    pub fn start(cfg: &DaemonConfig) -> Result<Daemon, Error> {
        if cfg.vms.is_empty() {
            return Err(Error::NoVms);
        }
        Daemon::start_with(cfg, VmSource::Static(cfg.vms.clone()))
    }

    /// Starts serving, from fixed VMs or from the database.
    pub fn start_with(cfg: &DaemonConfig, source: VmSource) -> Result<Daemon, Error> {
        let (store, socket_dir) = match &source {
            VmSource::Static(_) => (None, None),
            VmSource::Database { db, socket_dir } => {
                std::fs::create_dir_all(socket_dir).map_err(|source| Error::SocketDir {
                    path: socket_dir.clone(),
                    source,
                })?;
                (Some(Mutex::new(Store::open(db)?)), Some(socket_dir.clone()))
            }
        };
        let inner = Arc::new(Inner {
            cfg: cfg.clone(),
            arrivals: Arc::new(ArrivalCounter::default()),
            stopping: Arc::new(AtomicBool::new(false)),
            gpus: Mutex::new(BTreeMap::new()),
            vms: Mutex::new(BTreeMap::new()),
            store,
            socket_dir,
        });
        match source {
            VmSource::Static(specs) => {
                let wanted = specs.iter().map(|s| inner.wanted_static(s)).collect();
                inner.apply(wanted)?;
            }
            VmSource::Database { .. } => {
                inner.reload()?;
                inner.clone().serve_control()?;
                inner.clone().watch_database()?;
            }
        }
        Ok(Daemon { inner })
    }

    pub fn vms(&self) -> Vec<Arc<Vm>> {
        lock(&self.inner.vms)
            .values()
            .map(|s| s.vm.clone())
            .collect()
    }

    /// Re-reads the database and applies what changed.
    pub fn reload(&self) -> Result<(), Error> {
        self.inner.reload()
    }

    pub fn status(&self) -> Vec<VmStatus> {
        self.inner.status()
    }

    /// Stops taking chains, finishes the running requests, answers the queued
    /// ones CANCELLED, and removes the sockets.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        for gpu in lock(&self.inner.gpus).values() {
            gpu.shutdown();
        }
        for served in lock(&self.inner.vms).values() {
            let _ = std::fs::remove_file(&served.socket);
        }
        if let Some(dir) = &self.inner.socket_dir {
            let _ = std::fs::remove_file(control::socket_path(dir));
        }
    }
}

impl Inner {
    fn gpu_of(&self, pool: PoolId) -> u32 {
        self.cfg.gpu_of(pool)
    }

    fn wanted_static(&self, spec: &VmSpec) -> Wanted {
        Wanted {
            settings: VmSettings {
                vm_id: spec.vm_id,
                pool: spec.pool,
                priority: spec.priority,
                max_queued: spec.max_queued.unwrap_or(self.cfg.max_queued),
            },
            gpu: self.gpu_of(spec.pool),
            socket: spec.socket.clone(),
            gpu_mem_quota: None,
        }
    }

    /// The GPU's scheduler, started on first use.
    fn gpu(&self, index: u32) -> Result<Arc<Gpu>, Error> {
        let mut gpus = lock(&self.gpus);
        if let Some(g) = gpus.get(&index) {
            return Ok(g.clone());
        }
        let (choice, limit) = (self.cfg.executor, self.cfg.exec_limit);
        let make = move || executor::create(choice, index, limit);
        let gpu = Gpu::start(index, make, self.cfg.policy, limit)?;
        gpus.insert(index, gpu.clone());
        Ok(gpu)
    }

    fn reload(&self) -> Result<(), Error> {
        let (Some(store), Some(dir)) = (&self.store, &self.socket_dir) else {
            return Ok(());
        };
        let records = lock(store).vms()?;
        let wanted = records
            .into_iter()
            .map(|r| Wanted {
                settings: VmSettings {
                    vm_id: r.vm_id,
                    pool: r.pool,
                    priority: r.priority,
                    max_queued: (r.max_queued as usize).max(1),
                },
                gpu: r.gpu_index,
                socket: dir.join(format!("vm{}.sock", r.vm_id)),
                gpu_mem_quota: Some(r.gpu_mem_quota_mib.saturating_mul(1 << 20)),
            })
            .collect();
        self.apply(wanted)
    }

    /// Makes the served VMs what `wanted` says: new ones get a socket,
    /// missing ones are retired, changed ones are updated in place.
    fn apply(&self, wanted: Vec<Wanted>) -> Result<(), Error> {
        let mut vms = lock(&self.vms);
        let keep: std::collections::BTreeSet<u32> =
            wanted.iter().map(|w| w.settings.vm_id).collect();
        let gone: Vec<u32> = vms
            .keys()
            .copied()
            .filter(|id| !keep.contains(id))
            .collect();
        for id in gone {
            if let Some(served) = vms.remove(&id) {
                log::info!("vm{id}: removed from the configuration");
                retire(served);
            }
        }
        for w in wanted {
            let gpu = self.gpu(w.gpu)?;
            let id = w.settings.vm_id;
            if let Some(bytes) = w.gpu_mem_quota {
                gpu.control(Control::SetQuota { vm_id: id, bytes });
            }
            match vms.get(&id) {
                Some(served) if served.socket == w.socket => {
                    if served.vm.settings() != w.settings || !Arc::ptr_eq(&served.vm.gpu(), &gpu) {
                        served.vm.update(w.settings, gpu);
                    }
                }
                _ => {
                    if let Some(old) = vms.remove(&id) {
                        retire(old);
                    }
                    let served = self.serve_vm(w, gpu)?;
                    vms.insert(id, served);
                }
            }
        }
        Ok(())
    }

    fn serve_vm(&self, w: Wanted, gpu: Arc<Gpu>) -> Result<ServedVm, Error> {
        let vm = Vm::new(
            w.settings.clone(),
            gpu,
            self.arrivals.clone(),
            self.stopping.clone(),
        );
        if let Some(dir) = w.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::SocketDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let (thread_vm, socket) = (vm.clone(), w.socket.clone());
        std::thread::Builder::new()
            .name(format!("vgpu-vm{}", w.settings.vm_id))
            .spawn(move || {
                if let Err(e) = vhu_vgpu::serve_forever(thread_vm, socket) {
                    log::error!("{e}");
                }
            })
            .map_err(Error::Thread)?;
        log::info!(
            "vm{}: pool {} priority {} on gpu{} at {}",
            w.settings.vm_id,
            w.settings.pool,
            w.settings.priority,
            w.gpu,
            w.socket.display()
        );
        Ok(ServedVm {
            vm,
            socket: w.socket,
        })
    }

    fn status(&self) -> Vec<VmStatus> {
        lock(&self.vms).values().map(|s| s.vm.stats()).collect()
    }

    /// The control socket: one JSON request per line (see src/control.rs).
    fn serve_control(self: Arc<Self>) -> Result<(), Error> {
        let Some(dir) = &self.socket_dir else {
            return Ok(());
        };
        let path = control::socket_path(dir);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| Error::SocketDir {
            path: path.clone(),
            source,
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::SocketDir {
                path: path.clone(),
                source,
            },
        )?;
        log::info!("control socket {}", path.display());
        std::thread::Builder::new()
            .name("vgpu-control".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let inner = self.clone();
                    // One short-lived thread per client: a stuck client blocks nobody.
                    let _ = std::thread::Builder::new()
                        .name("vgpu-control-conn".into())
                        .spawn(move || inner.control_conn(conn));
                }
            })
            .map_err(Error::Thread)?;
        Ok(())
    }

    fn control_conn(&self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(mut writer) = conn.try_clone() else {
            return;
        };
        let reader = BufReader::new(conn.take(control::MAX_LINE));
        for line in reader.lines() {
            let Ok(line) = line else { return };
            let resp = match serde_json::from_str::<control::Request>(&line) {
                Ok(control::Request::Reload) => match self.reload() {
                    Ok(()) => control::Response::ok(),
                    Err(e) => control::Response::error(e.to_string()),
                },
                Ok(control::Request::Status) => control::Response::status(self.status()),
                Err(e) => control::Response::error(format!("bad request: {e}")),
            };
            if writer.write_all(resp.to_line().as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Follows changes that reach the database without a reload request.
    fn watch_database(self: Arc<Self>) -> Result<(), Error> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut seen = lock(store).data_version()?;
        std::thread::Builder::new()
            .name("vgpu-db-watch".into())
            .spawn(move || loop {
                std::thread::sleep(DB_POLL);
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                let Some(store) = &self.store else { return };
                let now = match lock(store).data_version() {
                    Ok(v) => v,
                    Err(e) => {
                        log::warn!("database: {e}");
                        continue;
                    }
                };
                if now != seen {
                    seen = now;
                    if let Err(e) = self.reload() {
                        log::warn!("reload: {e}");
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(())
    }
}

/// How often the database is checked for changes nobody announced.
const DB_POLL: Duration = Duration::from_millis(500);

/// Takes a VM out of service in the background: its queued work is answered,
/// then its connection and socket close.
fn retire(served: ServedVm) {
    let _ = std::thread::Builder::new()
        .name(format!("vgpu-retire{}", served.vm.id()))
        .spawn(move || {
            served.vm.retire();
            // Wake the accept() of a VM nobody is connected to.
            let _ = UnixStream::connect(&served.socket);
        });
}
