//! The daemon's configuration: the embedded defaults (`config/vgpu.toml`,
//! the one place where every default is written), a file that overrides
//! them, and the command line on top; the VMs given on the command line.
//! Resolving checks everything once, so the rest of the daemon takes the
//! values as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::executor::worker::{wire, SandboxConfig, SeccompMode, WorkerConfig};
use crate::executor::ExecutorChoice;
use crate::protocol::{self, PoolId, Priority};
use crate::scheduler::Policy;

/// The embedded defaults.
pub const DEFAULT_CONFIG: &str = include_str!("../config/vgpu.toml");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --vm '{spec}': {msg}")]
    VmSpec { spec: String, msg: String },
    #[error("invalid --pool-gpu '{0}' (expected A=0,B=1)")]
    PoolGpu(String),
    #[error("config file {path}: {msg}")]
    ConfigFile { path: PathBuf, msg: String },
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("duplicate {what} {value}")]
    Duplicate { what: &'static str, value: String },
    #[error(transparent)]
    Protocol(#[from] protocol::Error),
}

/// Whether a VM's guest memory is registered with the CUDA driver (all of
/// it pinned, copies DMA straight from guest pages) or left pageable (copies
/// staged through the executor's pinned buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    /// Register (pin) the whole guest RAM for zero-copy DMA.
    All,
    /// Register nothing: every copy is staged; nothing of the VM is pinned.
    Staging,
}

impl Register {
    pub fn as_str(self) -> &'static str {
        match self {
            Register::All => "all",
            Register::Staging => "staging",
        }
    }

    pub fn registers(self) -> bool {
        self == Register::All
    }
}

impl std::fmt::Display for Register {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Register {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "all" => Ok(Register::All),
            "staging" => Ok(Register::Staging),
            other => Err(format!("register '{other}' is not all or staging")),
        }
    }
}

/// The keys of config/vgpu.toml; in a file that overrides the defaults,
/// every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub executor: Option<ExecutorChoice>,
    pub exec_limit_ms: Option<u64>,
    pub max_queued: Option<usize>,
    pub gpu_mem_quota_mib: Option<u64>,
    pub register: Option<Register>,
    pub policy: Option<String>,
    pub aging_step_ms: Option<u64>,
    pub poll_us: Option<u64>,
    pub socket_dir: Option<PathBuf>,
    pub vm_socket_mode: Option<u32>,
    pub vm_socket_owner: Option<String>,
    pub vm_socket_peer_uid: Option<String>,
    pub require_sealed_memory: Option<bool>,
    pub max_guest_memory_mib: Option<u64>,
    pub pool_gpu: Option<BTreeMap<String, u32>>,
    pub worker: Option<WorkerFile>,
}

/// Most warm spare workers a GPU may keep (`[worker] spares`).
pub const MAX_SPARES: u64 = 8;

/// `[worker]` of config/vgpu.toml (documented there).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerFile {
    pub spares: Option<u64>,
    pub copy_chunk_mib: Option<u64>,
    pub sandbox: Option<bool>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub namespaces: Option<bool>,
    pub rlimit_as_mib: Option<u64>,
    pub rlimit_nofile: Option<u64>,
    pub seccomp: Option<SeccompMode>,
    pub cgroup: Option<PathBuf>,
    pub allow_pageable_memory_access: Option<bool>,
}

impl WorkerFile {
    fn merge(self, o: WorkerFile) -> WorkerFile {
        WorkerFile {
            spares: o.spares.or(self.spares),
            copy_chunk_mib: o.copy_chunk_mib.or(self.copy_chunk_mib),
            sandbox: o.sandbox.or(self.sandbox),
            uid: o.uid.or(self.uid),
            gid: o.gid.or(self.gid),
            namespaces: o.namespaces.or(self.namespaces),
            rlimit_as_mib: o.rlimit_as_mib.or(self.rlimit_as_mib),
            rlimit_nofile: o.rlimit_nofile.or(self.rlimit_nofile),
            seccomp: o.seccomp.or(self.seccomp),
            cgroup: o.cgroup.or(self.cgroup),
            allow_pageable_memory_access: o
                .allow_pageable_memory_access
                .or(self.allow_pageable_memory_access),
        }
    }

    fn resolve(self) -> Result<WorkerConfig, Error> {
        let k = |key: &str| format!("worker.{key}");
        let spares = required(self.spares, &k("spares"))?;
        if spares > MAX_SPARES {
            return Err(Error::Invalid(format!(
                "worker.spares must be 0..={MAX_SPARES} (each holds a CUDA context)"
            )));
        }
        let chunk_mib = required(self.copy_chunk_mib, &k("copy_chunk_mib"))?;
        if chunk_mib == 0 || chunk_mib > wire::MAX_CHUNK_BYTES >> 20 {
            return Err(Error::Invalid(format!(
                "worker.copy_chunk_mib must be 1..={}",
                wire::MAX_CHUNK_BYTES >> 20
            )));
        }
        let nofile = required(self.rlimit_nofile, &k("rlimit_nofile"))?;
        if nofile < 64 {
            return Err(Error::Invalid(
                "worker.rlimit_nofile must be at least 64 (the CUDA driver opens dozens)".into(),
            ));
        }
        let cgroup = required(self.cgroup, &k("cgroup"))?;
        Ok(WorkerConfig {
            spares: spares as usize,
            copy_chunk: (chunk_mib << 20) as usize,
            sandbox: SandboxConfig {
                enabled: required(self.sandbox, &k("sandbox"))?,
                uid: required(self.uid, &k("uid"))?,
                gid: required(self.gid, &k("gid"))?,
                namespaces: required(self.namespaces, &k("namespaces"))?,
                rlimit_as: required(self.rlimit_as_mib, &k("rlimit_as_mib"))?
                    .saturating_mul(1 << 20),
                rlimit_as_guest: 0,
                rlimit_nofile: nofile,
                seccomp: required(self.seccomp, &k("seccomp"))?,
                cgroup: (!cgroup.as_os_str().is_empty()).then_some(cgroup),
                allow_pageable_memory_access: required(
                    self.allow_pageable_memory_access,
                    &k("allow_pageable_memory_access"),
                )?,
            },
        })
    }
}

impl FileConfig {
    /// The `[worker]` settings, checked (every key must be set: merge over
    /// the embedded defaults first).
    pub fn worker_config(&self) -> Result<WorkerConfig, Error> {
        let mut w = self.worker.clone().unwrap_or_default().resolve()?;
        // A worker maps its VM's guest RAM (the whole table, at most this
        // much): its address-space limit may grow by that.
        w.sandbox.rlimit_as_guest = self
            .max_guest_memory_mib
            .unwrap_or_default()
            .saturating_mul(1 << 20);
        Ok(w)
    }

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
            gpu_mem_quota_mib: other.gpu_mem_quota_mib.or(self.gpu_mem_quota_mib),
            register: other.register.or(self.register),
            policy: other.policy.or(self.policy),
            aging_step_ms: other.aging_step_ms.or(self.aging_step_ms),
            poll_us: other.poll_us.or(self.poll_us),
            socket_dir: other.socket_dir.or(self.socket_dir),
            vm_socket_mode: other.vm_socket_mode.or(self.vm_socket_mode),
            vm_socket_owner: other.vm_socket_owner.or(self.vm_socket_owner),
            vm_socket_peer_uid: other.vm_socket_peer_uid.or(self.vm_socket_peer_uid),
            require_sealed_memory: other.require_sealed_memory.or(self.require_sealed_memory),
            max_guest_memory_mib: other.max_guest_memory_mib.or(self.max_guest_memory_mib),
            pool_gpu: match (self.pool_gpu, other.pool_gpu) {
                (Some(mut a), Some(b)) => {
                    a.extend(b);
                    Some(a)
                }
                (a, b) => b.or(a),
            },
            worker: match (self.worker, other.worker) {
                (Some(a), Some(b)) => Some(a.merge(b)),
                (a, b) => b.or(a),
            },
        }
    }
}

/// Defaults of the per-VM settings, for the places that create VMs without
/// a daemon configuration at hand (`vgpu-admin register-vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmDefaults {
    pub max_queued: usize,
    pub gpu_mem_quota_mib: u64,
    pub register: Register,
}

impl VmDefaults {
    /// The embedded defaults' values.
    pub fn embedded() -> Result<Self, Error> {
        let f = FileConfig::embedded()?;
        Ok(VmDefaults {
            max_queued: required(f.max_queued, "max_queued")?,
            gpu_mem_quota_mib: required(f.gpu_mem_quota_mib, "gpu_mem_quota_mib")?,
            register: required(f.register, "register")?,
        })
    }
}

fn required<T>(v: Option<T>, key: &str) -> Result<T, Error> {
    v.ok_or_else(|| Error::Invalid(format!("{key} is not set (config/vgpu.toml sets it)")))
}

/// One VM to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub vm_id: u32,
    pub pool: PoolId,
    pub priority: Priority,
    pub socket: PathBuf,
    pub max_queued: Option<usize>,
    pub register: Option<Register>,
}

impl FromStr for VmSpec {
    type Err = Error;
    /// `id=1,pool=A,priority=high,socket=/run/vgpu/vm1.sock[,max-queued=64][,register=all|staging]`
    fn from_str(spec: &str) -> Result<Self, Error> {
        let bad = |msg: String| Error::VmSpec {
            spec: spec.to_string(),
            msg,
        };
        let (mut id, mut pool, mut prio, mut socket, mut maxq) = (None, None, None, None, None);
        let mut register = None;
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
                "register" => register = Some(v.parse::<Register>().map_err(bad)?),
                other => return Err(bad(format!("unknown key '{other}'"))),
            }
        }
        Ok(VmSpec {
            vm_id: id.ok_or_else(|| bad("missing id=".into()))?,
            pool: pool.unwrap_or(PoolId::DEFAULT),
            priority: prio.unwrap_or(Priority::Medium),
            socket: socket.ok_or_else(|| bad("missing socket=".into()))?,
            max_queued: maxq,
            register,
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
    /// Device memory a VM's CUDA remoting may hold, in bytes.
    pub gpu_mem_quota: u64,
    /// Registration of a VM's guest memory, for VMs that do not set it.
    pub register: Register,
    pub policy: Policy,
    /// How long a VM's ring thread keeps polling after its last progress.
    pub poll: Duration,
    pub pool_gpu: BTreeMap<PoolId, u32>,
    pub socket_dir: PathBuf,
    /// Who may connect to the VMs' sockets, and what memory they may share.
    pub sockets: SocketPolicy,
    /// The CUDA remoting workers: spares, copy chunks, sandbox.
    pub worker: WorkerConfig,
    pub vms: Vec<VmSpec>,
}

/// What a VM's socket and its frontend must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPolicy {
    /// Permission bits of each VM socket (connecting needs write).
    pub mode: u32,
    /// Owner (uid, gid) given to each VM socket; `None`: the daemon's.
    pub owner: Option<(u32, u32)>,
    /// The only uid whose processes may connect (`SO_PEERCRED`); `None`:
    /// whoever the socket's mode lets in.
    pub peer_uid: Option<u32>,
    /// Refuse guest memory a frontend could shrink under the daemon (a
    /// memfd without `F_SEAL_SHRINK`, or a file that cannot be sealed).
    pub require_sealed_memory: bool,
    /// Largest memory table a frontend may share, bytes (registration pins
    /// all of it): the bound of VMs that have none of their own in the
    /// database (`vgpu-admin ... --max-guest-memory-mib`).
    pub max_guest_memory: u64,
}

impl SocketPolicy {
    fn parse_owner(text: &str) -> Result<Option<(u32, u32)>, Error> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let bad = || Error::Invalid(format!("vm_socket_owner '{text}' is not UID:GID"));
        let (u, g) = text.split_once(':').ok_or_else(bad)?;
        Ok(Some((
            u.trim().parse().map_err(|_| bad())?,
            g.trim().parse().map_err(|_| bad())?,
        )))
    }

    /// `vm_socket_peer_uid`: "" follows the owner's uid (no check without
    /// an owner), "any" checks nothing, a number is that uid.
    fn parse_peer_uid(text: &str, owner: Option<(u32, u32)>) -> Result<Option<u32>, Error> {
        match text.trim() {
            "" => Ok(owner.map(|(uid, _)| uid)),
            "any" => Ok(None),
            n => n.parse().map(Some).map_err(|_| {
                Error::Invalid(format!(
                    "vm_socket_peer_uid '{n}' is not a uid, \"any\" or empty"
                ))
            }),
        }
    }
}

impl DaemonConfig {
    /// Resolves a merged configuration (the embedded defaults first, so
    /// that every key is set) and the VMs.
    pub fn resolve(file: FileConfig, vms: Vec<VmSpec>) -> Result<Self, Error> {
        let worker = file.worker_config()?;
        let mut pool_gpu = BTreeMap::new();
        for (p, g) in file.pool_gpu.unwrap_or_default() {
            pool_gpu.insert(p.parse::<PoolId>()?, g);
        }
        let policy = match required(file.policy, "policy")?.as_str() {
            "strict" => Policy::Strict,
            "aging" => Policy::Aging {
                step: Duration::from_millis(required(file.aging_step_ms, "aging_step_ms")?.max(1)),
            },
            other => {
                return Err(Error::Invalid(format!(
                    "policy '{other}' is not strict or aging"
                )))
            }
        };
        let max_queued = required(file.max_queued, "max_queued")?;
        if max_queued == 0 {
            return Err(Error::Invalid("max_queued must be at least 1".into()));
        }
        let quota_mib = required(file.gpu_mem_quota_mib, "gpu_mem_quota_mib")?;
        let owner = SocketPolicy::parse_owner(&required(file.vm_socket_owner, "vm_socket_owner")?)?;
        let peer_uid = SocketPolicy::parse_peer_uid(
            &required(file.vm_socket_peer_uid, "vm_socket_peer_uid")?,
            owner,
        )?;
        let mut ids = BTreeSet::new();
        let mut sockets = BTreeSet::new();
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
            worker,
            executor: required(file.executor, "executor")?,
            exec_limit: Duration::from_millis(
                required(file.exec_limit_ms, "exec_limit_ms")?.max(1),
            ),
            max_queued,
            gpu_mem_quota: quota_mib.saturating_mul(1 << 20),
            register: required(file.register, "register")?,
            policy,
            poll: Duration::from_micros(required(file.poll_us, "poll_us")?),
            pool_gpu,
            socket_dir: required(file.socket_dir, "socket_dir")?,
            sockets: SocketPolicy {
                mode: match required(file.vm_socket_mode, "vm_socket_mode")? {
                    m if m <= 0o777 => m,
                    m => {
                        return Err(Error::Invalid(format!(
                            "vm_socket_mode {m:#o} is not 0..=0o777"
                        )))
                    }
                },
                owner,
                peer_uid,
                require_sealed_memory: required(
                    file.require_sealed_memory,
                    "require_sealed_memory",
                )?,
                max_guest_memory: required(file.max_guest_memory_mib, "max_guest_memory_mib")?
                    .saturating_mul(1 << 20),
            },
            vms,
        })
    }

    /// The GPU of a pool given on the command line or in the file (VMs of
    /// the database carry their pool's GPU with them).
    pub fn gpu_of(&self, pool: PoolId) -> u32 {
        self.pool_gpu.get(&pool).copied().unwrap_or(0)
    }

    /// The per-VM socket of a VM in database mode.
    pub fn vm_socket(&self, vm_id: u32) -> PathBuf {
        vm_socket(&self.socket_dir, vm_id)
    }
}

/// `DIR/vm<ID>.sock`: where the socket of VM `vm_id` lives in a socket directory.
pub fn vm_socket(dir: &Path, vm_id: u32) -> PathBuf {
    dir.join(format!("vm{vm_id}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_owner_is_uid_colon_gid_or_empty() {
        assert_eq!(SocketPolicy::parse_owner("").ok(), Some(None));
        assert_eq!(
            SocketPolicy::parse_owner(" 107:108 ").ok(),
            Some(Some((107, 108)))
        );
        for bad in ["qemu", "1:", ":2", "1:2:3", "-1:0"] {
            assert!(SocketPolicy::parse_owner(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn peer_uid_follows_the_owner_unless_set() {
        let own = Some((107, 108));
        assert_eq!(SocketPolicy::parse_peer_uid("", own).ok(), Some(Some(107)));
        assert_eq!(SocketPolicy::parse_peer_uid("", None).ok(), Some(None));
        assert_eq!(SocketPolicy::parse_peer_uid("any", own).ok(), Some(None));
        assert_eq!(SocketPolicy::parse_peer_uid(" 0 ", own).ok(), Some(Some(0)));
        for bad in ["qemu", "-1", "1:2"] {
            assert!(SocketPolicy::parse_peer_uid(bad, own).is_err(), "{bad}");
        }
        let c = resolved("vm_socket_owner = \"107:108\"").unwrap();
        assert_eq!(c.sockets.peer_uid, Some(107));
        assert_eq!(resolved("").unwrap().sockets.peer_uid, None);
    }

    fn resolved(over: &str) -> Result<DaemonConfig, Error> {
        let file = FileConfig::embedded()?.merge(FileConfig::parse(over, Path::new("t.toml"))?);
        DaemonConfig::resolve(file, Vec::new())
    }

    #[test]
    fn embedded_defaults_set_every_key() {
        let c = resolved("").unwrap();
        assert_eq!(c.executor, ExecutorChoice::Auto);
        assert_eq!(c.policy, Policy::Strict);
        assert!(c.max_queued >= 1);
        assert_eq!(c.socket_dir, PathBuf::from("/run/vgpu"));
        let d = VmDefaults::embedded().unwrap();
        assert_eq!(d.max_queued, c.max_queued);
        assert_eq!(d.gpu_mem_quota_mib << 20, c.gpu_mem_quota);
        // Without the embedded defaults underneath, a key is missing.
        let bare = DaemonConfig::resolve(FileConfig::default(), Vec::new()).unwrap_err();
        assert!(bare.to_string().contains("not set"), "{bare}");
    }

    #[test]
    fn a_file_overrides_and_is_checked() {
        let c =
            resolved("max_queued = 3\npolicy = \"aging\"\naging_step_ms = 50\n[pool_gpu]\nC = 2\n")
                .unwrap();
        assert_eq!(c.max_queued, 3);
        assert_eq!(
            c.policy,
            Policy::Aging {
                step: Duration::from_millis(50)
            }
        );
        assert_eq!(c.gpu_of("C".parse().unwrap()), 2);
        assert_eq!(c.gpu_of("A".parse().unwrap()), 0);
        assert!(resolved("max_queued = 0").is_err());
        assert!(resolved("policy = \"fifo\"").is_err());
        assert!(resolved("nonsense = 1").is_err());
        assert!(resolved("[pool_gpu]\nAB = 1").is_err());
    }

    #[test]
    fn worker_settings_default_merge_and_are_checked() {
        let c = resolved("").unwrap();
        assert_eq!(c.worker, WorkerConfig::embedded());
        let s = &c.worker.sandbox;
        assert!(s.enabled && s.namespaces && c.worker.spares >= 1);
        assert_eq!(s.seccomp, SeccompMode::Enforce);
        assert_eq!(s.cgroup, None);
        assert!(!s.allow_pageable_memory_access);
        let c =
            resolved("[worker]\nseccomp = \"log\"\ncgroup = \"/sys/fs/cgroup/vgpu\"\nuid = 7\n")
                .unwrap();
        assert_eq!(c.worker.sandbox.seccomp, SeccompMode::Log);
        assert_eq!(c.worker.sandbox.uid, 7);
        assert_eq!(c.worker.sandbox.gid, 65534);
        assert_eq!(
            c.worker.sandbox.cgroup,
            Some(PathBuf::from("/sys/fs/cgroup/vgpu"))
        );
        for bad in [
            "[worker]\ncopy_chunk_mib = 0",
            "[worker]\ncopy_chunk_mib = 33",
            "[worker]\ncopy_chunk_mib = 17592186044417",
            "[worker]\nrlimit_nofile = 3",
            "[worker]\nseccomp = \"maybe\"",
            "[worker]\ncolour = 1",
        ] {
            assert!(resolved(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vm_specs() {
        let v: VmSpec = "id=3,pool=b,priority=high,socket=/tmp/x.sock,max-queued=5"
            .parse()
            .unwrap();
        assert_eq!(
            (v.vm_id, v.pool.to_string(), v.priority, v.max_queued),
            (3, "B".to_string(), Priority::High, Some(5))
        );
        let d: VmSpec = "id=1,socket=/s".parse().unwrap();
        assert_eq!((d.pool, d.priority), (PoolId::DEFAULT, Priority::Medium));
        for bad in [
            "pool=A,socket=/s",
            "id=0,socket=/s",
            "id=1",
            "id=1,socket=/s,colour=red",
            "id=1,socket=/s,max-queued=0",
            "id=1,socket=/s,priority=9",
            "id",
        ] {
            assert!(bad.parse::<VmSpec>().is_err(), "{bad}");
        }
        let two = vec![d.clone(), d];
        let e = DaemonConfig::resolve(FileConfig::embedded().unwrap(), two).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn pool_gpu_maps() {
        let m = parse_pool_gpu("A=0,B=1").unwrap();
        assert_eq!(m.get(&"B".parse().unwrap()), Some(&1));
        assert!(parse_pool_gpu("A").is_err());
        assert!(parse_pool_gpu("A=x").is_err());
        assert!(parse_pool_gpu("1=0").is_err());
    }

    #[test]
    fn vm_socket_path() {
        assert_eq!(
            vm_socket(Path::new("/run/vgpu"), 7),
            PathBuf::from("/run/vgpu/vm7.sock")
        );
    }
}
