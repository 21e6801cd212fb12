//! The daemon: one queue and worker per GPU, one vhost-user socket per VM,
//! and the reconciliation that makes the served VMs what the configuration
//! (the command line, or the vgpu-admin database followed live) says; an
//! orderly stop. Configuration is `config.rs`, the control socket
//! `control.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admin::store::{self, Store};
use crate::config::{self, DaemonConfig, VmSpec};
use crate::control::{self, GpuStatus, VmStatus};
use crate::executor;
use crate::metrics::{self, Metrics};
use crate::protocol::PoolId;
use crate::scheduler::{self, ArrivalCounter, GpuQueue};
use crate::sync::lock;
use crate::vhu_vgpu;
use crate::vm::{Vm, VmSettings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no VM configured: give --vm, or --socket with --vm-id/--pool/--priority")]
    NoVms,
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Scheduler(#[from] scheduler::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Control(#[from] control::Error),
    #[error(transparent)]
    Metrics(#[from] metrics::Error),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot prepare socket directory {path}: {source}")]
    SocketDir {
        path: PathBuf,
        source: std::io::Error,
    },
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
    gpus: Mutex<BTreeMap<u32, Arc<GpuQueue>>>,
    vms: Mutex<BTreeMap<u32, ServedVm>>,
    store: Option<Mutex<Store>>,
    socket_dir: Option<PathBuf>,
    metrics: Arc<Metrics>,
    /// Builds each GPU's executor (again after a fault).
    factory: executor::Factory,
    /// Where the GPUs announce health changes (see `watch_health`).
    health_tx: Mutex<std::sync::mpsc::Sender<u32>>,
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
        Daemon::start_with_executors(cfg, source, default_factory(cfg))
    }

    /// [`Daemon::start_with`], with each GPU's executor built by `factory`
    /// (instead of `--executor`): for executors of the caller's own, such
    /// as one that injects faults in a test.
    pub fn start_with_executors(
        cfg: &DaemonConfig,
        source: VmSource,
        factory: executor::Factory,
    ) -> Result<Daemon, Error> {
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
        let (health_tx, health_rx) = std::sync::mpsc::channel();
        let inner = Arc::new(Inner {
            factory,
            health_tx: Mutex::new(health_tx),
            cfg: cfg.clone(),
            arrivals: Arc::new(ArrivalCounter::default()),
            stopping: Arc::new(AtomicBool::new(false)),
            gpus: Mutex::new(BTreeMap::new()),
            vms: Mutex::new(BTreeMap::new()),
            store,
            socket_dir,
            metrics: Arc::new(Metrics::new()),
        });
        inner.clone().watch_health(health_rx)?;
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

    /// The socket paths of the VMs being served.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        lock(&self.inner.vms)
            .values()
            .map(|s| s.socket.clone())
            .collect()
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

    pub fn gpus(&self) -> Vec<GpuStatus> {
        self.inner.gpus()
    }

    /// Serves the metrics over HTTP on `addr` (see src/metrics.rs) and
    /// starts recording them; returns the address bound.
    pub fn serve_metrics(
        &self,
        addr: std::net::SocketAddr,
        allow_remote: bool,
    ) -> Result<std::net::SocketAddr, Error> {
        metrics::check_addr(addr, allow_remote)?;
        let handler: Arc<dyn control::Handler> = self.inner.clone();
        Ok(metrics::serve(addr, self.inner.metrics.clone(), handler)?)
    }

    /// Stops taking chains, finishes the running requests, answers the queued
    /// ones CANCELLED, and removes the sockets.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        for gpu in lock(&self.inner.gpus).values() {
            gpu.shutdown();
        }
        // Every request taken is answered: the ring threads return what the
        // GPUs finished or cancelled before the process goes.
        for served in lock(&self.inner.vms).values() {
            if !served.vm.drain_within(SHUTDOWN_DRAIN) {
                log::warn!("vm{}: requests still unanswered at exit", served.vm.id());
            }
        }
        for served in lock(&self.inner.vms).values() {
            // Its socket thread ends and removes the socket (if still its own).
            served.vm.wake_listener();
            let _ = std::fs::remove_file(&served.socket);
        }
        if let Some(dir) = &self.inner.socket_dir {
            let _ = std::fs::remove_file(control::socket_path(dir));
        }
    }
}

impl control::Handler for Inner {
    fn reload(&self) -> Result<(), String> {
        Inner::reload(self).map_err(|e| e.to_string())
    }

    fn status(&self) -> Vec<VmStatus> {
        Inner::status(self)
    }

    fn gpus(&self) -> Vec<GpuStatus> {
        Inner::gpus(self)
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
                gpu_mem_quota: self.cfg.gpu_mem_quota,
                register: spec.register.unwrap_or(self.cfg.register),
                max_guest_memory: self.cfg.sockets.max_guest_memory,
            },
            gpu: self.gpu_of(spec.pool),
            socket: spec.socket.clone(),
        }
    }

    /// The GPU's scheduler, started on first use.
    fn gpu(&self, index: u32) -> Result<Arc<GpuQueue>, Error> {
        let mut gpus = lock(&self.gpus);
        if let Some(g) = gpus.get(&index) {
            return Ok(g.clone());
        }
        // Supervised: after a panic or a fault the worker builds a new
        // executor (docs/gpu.md).
        let factory = self.factory.clone();
        let make = move || Some(factory(index).map_err(crate::scheduler::Error::Executor));
        let gpu = GpuQueue::start_restartable(index, make, self.cfg.policy, self.cfg.exec_limit)?;
        gpu.watch_health(lock(&self.health_tx).clone());
        gpu.set_poll(self.cfg.poll);
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
                    gpu_mem_quota: r.gpu_mem_quota_mib.saturating_mul(1 << 20),
                    register: r.register,
                    // Unset: the daemon's max_guest_memory_mib.
                    max_guest_memory: r
                        .max_guest_memory_mib
                        .map_or(self.cfg.sockets.max_guest_memory, |m| {
                            m.saturating_mul(1 << 20)
                        }),
                },
                gpu: r.gpu_index,
                socket: config::vm_socket(dir, r.vm_id),
            })
            .collect();
        self.apply(wanted)
    }

    /// Makes the served VMs what `wanted` says: new ones get a socket,
    /// missing ones are retired, changed ones are updated in place.
    fn apply(&self, wanted: Vec<Wanted>) -> Result<(), Error> {
        let mut vms = lock(&self.vms);
        let keep: BTreeSet<u32> = wanted.iter().map(|w| w.settings.vm_id).collect();
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

    fn serve_vm(&self, w: Wanted, gpu: Arc<GpuQueue>) -> Result<ServedVm, Error> {
        let vm = Vm::new(
            w.settings.clone(),
            gpu,
            self.arrivals.clone(),
            self.stopping.clone(),
            self.cfg.poll,
            self.metrics.clone(),
        );
        if let Some(dir) = w.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::SocketDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let (thread_vm, socket, policy) = (vm.clone(), w.socket.clone(), self.cfg.sockets);
        std::thread::Builder::new()
            .name(format!("vgpu-vm{}", w.settings.vm_id))
            .spawn(move || {
                if let Err(e) = vhu_vgpu::serve_forever(thread_vm, socket, policy) {
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

    fn gpus(&self) -> Vec<GpuStatus> {
        lock(&self.gpus).values().map(|g| g.status()).collect()
    }

    /// Tells the guests of a GPU when its health changes, on a thread of its
    /// own (never the GPU's worker, which announces the change).
    fn watch_health(self: Arc<Self>, rx: std::sync::mpsc::Receiver<u32>) -> Result<(), Error> {
        let inner = Arc::downgrade(&self);
        std::thread::Builder::new()
            .name("vgpu-health".into())
            .spawn(move || {
                for gpu in rx {
                    let Some(inner) = inner.upgrade() else { return };
                    let vms: Vec<Arc<Vm>> = lock(&inner.vms)
                        .values()
                        .filter(|s| s.vm.gpu().index() == gpu)
                        .map(|s| s.vm.clone())
                        .collect();
                    for vm in vms {
                        vm.gpu_health_changed();
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(())
    }

    /// The control socket (see src/control.rs).
    fn serve_control(self: Arc<Self>) -> Result<(), Error> {
        let Some(dir) = self.socket_dir.clone() else {
            return Ok(());
        };
        let path = control::socket_path(&dir);
        control::serve(&path, self)?;
        log::info!("control socket {}", path.display());
        Ok(())
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

/// The executors `--executor` asks for. With `auto`, the kind the first
/// build of a GPU gets is kept for its rebuilds: a CUDA GPU that is lost
/// stays FAILED (and retried) instead of coming back as the CPU executor.
fn default_factory(cfg: &DaemonConfig) -> executor::Factory {
    let (choice, limit) = (cfg.executor, cfg.exec_limit);
    let cuda = executor::CudaConfig {
        worker: cfg.worker.clone(),
        ..executor::CudaConfig::default()
    };
    let kinds: Mutex<BTreeMap<u32, executor::ExecutorChoice>> = Mutex::default();
    Arc::new(move |index| {
        let choice = lock(&kinds).get(&index).copied().unwrap_or(choice);
        let ex = executor::create_with(choice, index, limit, &cuda)?;
        let kind = match ex.info().executor {
            crate::protocol::ExecutorKind::Cuda => executor::ExecutorChoice::Cuda,
            crate::protocol::ExecutorKind::Cpu => executor::ExecutorChoice::Cpu,
        };
        lock(&kinds).insert(index, kind);
        Ok(ex)
    })
}

/// How long a stopping daemon waits for the ring threads to return what the
/// GPUs finished (they take microseconds; a frontend that stopped reading
/// its ring does not hold the exit up for longer).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

/// How often the database is checked for changes nobody announced.
const DB_POLL: Duration = Duration::from_millis(500);

/// Takes a VM out of service in the background: its queued work is answered,
/// then its connection and socket close.
fn retire(served: ServedVm) {
    let _ = std::thread::Builder::new()
        .name(format!("vgpu-retire{}", served.vm.id()))
        .spawn(move || {
            // Answers what it has queued, hangs up, and wakes its socket
            // thread, which ends (no connection to the path: that may be a
            // newer VM's socket by now).
            served.vm.retire();
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::store::{NewVm, VmRef};
    use crate::config::{FileConfig, VmDefaults};
    use crate::protocol::Priority;

    fn config() -> DaemonConfig {
        let cpu = FileConfig::parse("executor = \"cpu\"", std::path::Path::new("t.toml")).unwrap();
        DaemonConfig::resolve(FileConfig::embedded().unwrap().merge(cpu), Vec::new()).unwrap()
    }

    fn settings_of(d: &Daemon, id: u32) -> Option<VmSettings> {
        d.vms()
            .into_iter()
            .find(|v| v.id() == id)
            .map(|v| v.settings())
    }

    /// The served VMs follow the database: a new VM gets its socket, a
    /// changed one is updated in place, a removed one is retired.
    #[test]
    fn reload_reconciles_with_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("vgpu.db");
        let mut store = Store::open(&db).unwrap();
        let defaults = VmDefaults::embedded().unwrap();
        let uuid = |n: u32| format!("00000000-0000-4000-8000-{n:012}").parse().unwrap();
        for (n, prio) in [(1, Priority::High), (2, Priority::Low)] {
            let mut v = NewVm::new(uuid(n), PoolId::DEFAULT, prio, &defaults);
            v.vm_id = Some(n);
            store.register_vm(&v).unwrap();
        }
        let source = VmSource::Database {
            db: db.clone(),
            socket_dir: dir.path().to_path_buf(),
        };
        let d = Daemon::start_with(&config(), source).unwrap();
        assert_eq!(settings_of(&d, 1).unwrap().priority, Priority::High);
        let sock2 = config::vm_socket(dir.path(), 2);
        let t = std::time::Instant::now();
        while !sock2.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(sock2.exists(), "vm2's socket");
        let vm1 = d.vms().into_iter().find(|v| v.id() == 1).unwrap();

        store.set_priority(&VmRef::VmId(1), Priority::Low).unwrap();
        store.remove_vm(&VmRef::VmId(2)).unwrap();
        d.reload().unwrap();
        let now = settings_of(&d, 1).unwrap();
        assert_eq!(now.priority, Priority::Low);
        // Updated in place, not replaced.
        assert!(d.vms().iter().any(|v| Arc::ptr_eq(v, &vm1)));
        assert!(settings_of(&d, 2).is_none());
        let t = std::time::Instant::now();
        while sock2.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!sock2.exists(), "a removed VM's socket goes");
        d.shutdown();
    }

    #[test]
    fn fixed_vms_need_at_least_one() {
        assert!(matches!(Daemon::start(&config()), Err(Error::NoVms)));
    }
}
