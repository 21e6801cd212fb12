//! The daemon: configuration (embedded defaults, file, command line), one
//! scheduler per GPU, one vhost-user socket per VM, and an orderly stop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::executor::{self, ExecutorChoice};
use crate::protocol::{self, PoolId, Priority};
use crate::scheduler::{self, ArrivalCounter, Gpu, Policy};
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
    Executor(#[from] executor::Error),
    #[error(transparent)]
    Scheduler(#[from] scheduler::Error),
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

/// A running daemon.
pub struct Daemon {
    gpus: BTreeMap<u32, Arc<Gpu>>,
    vms: Vec<Arc<Vm>>,
    sockets: Vec<PathBuf>,
    stopping: Arc<AtomicBool>,
}

impl Daemon {
    pub fn start(cfg: &DaemonConfig) -> Result<Daemon, Error> {
        if cfg.vms.is_empty() {
            return Err(Error::NoVms);
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(ArrivalCounter::default());
        let mut gpus = BTreeMap::new();
        for index in cfg.vms.iter().map(|v| cfg.gpu_of(v.pool)) {
            if gpus.contains_key(&index) {
                continue;
            }
            let exec = executor::create(cfg.executor, index, cfg.exec_limit)?;
            log::info!("gpu{index}: {}", exec.info().name);
            gpus.insert(index, Gpu::start(index, exec, cfg.policy, cfg.exec_limit)?);
        }
        let mut daemon = Daemon {
            gpus,
            vms: Vec::new(),
            sockets: Vec::new(),
            stopping: stopping.clone(),
        };
        for spec in &cfg.vms {
            let gpu = daemon.gpus[&cfg.gpu_of(spec.pool)].clone();
            let vm = Vm::new(
                VmSettings {
                    vm_id: spec.vm_id,
                    pool: spec.pool,
                    priority: spec.priority,
                    max_queued: spec.max_queued.unwrap_or(cfg.max_queued),
                },
                gpu,
                arrivals.clone(),
                stopping.clone(),
            );
            if let Some(dir) = spec.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| Error::SocketDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            let (thread_vm, socket) = (vm.clone(), spec.socket.clone());
            std::thread::Builder::new()
                .name(format!("vgpu-vm{}", spec.vm_id))
                .spawn(move || {
                    if let Err(e) = vhu_vgpu::serve_forever(thread_vm, socket) {
                        log::error!("{e}");
                    }
                })
                .map_err(Error::Thread)?;
            log::info!(
                "vm{}: pool {} priority {} on gpu{} at {}",
                spec.vm_id,
                spec.pool,
                spec.priority,
                cfg.gpu_of(spec.pool),
                spec.socket.display()
            );
            daemon.vms.push(vm);
            daemon.sockets.push(spec.socket.clone());
        }
        Ok(daemon)
    }

    pub fn vms(&self) -> &[Arc<Vm>] {
        &self.vms
    }

    /// Stops taking chains, finishes the running requests, answers the queued
    /// ones CANCELLED, and removes the sockets.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        for gpu in self.gpus.values() {
            gpu.shutdown();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}
