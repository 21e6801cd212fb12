//! The vgpu configuration database: pools and VMs in one SQLite file.
//!
//! `vgpu-admin` writes it, the daemon reads it. Every mutation runs in one
//! `BEGIN IMMEDIATE` transaction and is validated here before it reaches the
//! database; the schema's CHECK and FOREIGN KEY constraints are the last line
//! of defence. The schema is created and upgraded by the migrations in
//! `config/migrations/`, tracked with `PRAGMA user_version`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

use crate::config::{Register, VmDefaults};
use crate::protocol::{DeviceConfig, GpuHealth, PoolId, Priority};

/// Migrations in order; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../config/migrations/0001_init.sql"),
    include_str!("../../config/migrations/0002_register.sql"),
    include_str!("../../config/migrations/0003_max_guest_memory.sql"),
];

/// How long a connection waits for another writer before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default location of the database.
pub const DEFAULT_DB_PATH: &str = "/var/lib/vgpu/vgpu.db";
const NAME_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database schema version {found} is newer than this program knows ({known})")]
    SchemaTooNew { found: u32, known: u32 },
    #[error("malformed UUID '{0}' (expected 8-4-4-4-12 hex digits)")]
    MalformedUuid(String),
    #[error("invalid VM name '{0}' (1-64 characters of A-Z a-z 0-9 . _ -, not only digits)")]
    InvalidName(String),
    #[error("invalid pool name '{0}' (1-64 characters, no control characters)")]
    InvalidPoolName(String),
    #[error("vm_id '{0}' is out of range (1-4294967295)")]
    InvalidVmId(String),
    #[error("max_queued must be at least 1")]
    InvalidMaxQueued,
    #[error("gpu_mem_quota_mib {0} is too large")]
    InvalidQuota(u64),
    #[error("max_guest_memory_mib {0} is not 1 to {MAX_GUEST_MEMORY_MIB}")]
    InvalidMemoryBound(u64),
    #[error("unknown pool '{0}' (see pool-list)")]
    UnknownPool(PoolId),
    #[error("pool {0} already exists")]
    DuplicatePool(PoolId),
    #[error("pool name '{name}' is already used by pool {pool}")]
    DuplicatePoolName { name: String, pool: PoolId },
    #[error("unknown VM '{0}'")]
    UnknownVm(String),
    #[error("VM {uuid} is already registered as vm_id {vm_id}")]
    DuplicateUuid { uuid: VmUuid, vm_id: u32 },
    #[error("vm_id {vm_id} is already used by VM {uuid}")]
    DuplicateVmId { vm_id: u32, uuid: VmUuid },
    #[error("name '{name}' is already used by VM {uuid}")]
    DuplicateName { name: String, uuid: VmUuid },
    #[error("no free vm_id left")]
    NoFreeVmId,
    #[error("nothing to change")]
    NothingToChange,
    #[error("vm_id {vm_id} is given to two VMs in the source: {first} and {second}")]
    SourceDuplicateVmId {
        vm_id: u32,
        first: VmUuid,
        second: VmUuid,
    },
    #[error("VM {0} is twice in the source")]
    SourceDuplicateUuid(VmUuid),
    #[error("VM {uuid}: pool {pool} is not defined on this host (pool-add {pool} ...)")]
    SourceUnknownPool { uuid: VmUuid, pool: PoolId },
    #[error("the database refused the change: {0}")]
    Rejected(String),
    #[error("unexpected value in the database: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(f, msg) if f.code == ErrorCode::ConstraintViolation => {
                Error::Rejected(msg.clone().unwrap_or_else(|| f.to_string()))
            }
            _ => Error::Sqlite(e),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A VM's UUID in lowercase canonical form (8-4-4-4-12 hex digits).
/// Parsing accepts upper case and lowers it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct VmUuid(String);

impl VmUuid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for VmUuid {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let shape_ok = lower.len() == 36
            && lower.bytes().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => c.is_ascii_hexdigit(),
            });
        if shape_ok {
            Ok(VmUuid(lower))
        } else {
            Err(Error::MalformedUuid(s.to_string()))
        }
    }
}

/// How a command names a VM: its UUID, its vm_id (all digits) or its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmRef {
    Uuid(VmUuid),
    VmId(u32),
    Name(String),
}

impl FromStr for VmRef {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Ok(uuid) = s.parse::<VmUuid>() {
            Ok(VmRef::Uuid(uuid))
        } else if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
            parse_vm_id(s).map(VmRef::VmId)
        } else {
            validate_name(s)?;
            Ok(VmRef::Name(s.to_string()))
        }
    }
}

impl fmt::Display for VmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmRef::Uuid(u) => write!(f, "{u}"),
            VmRef::VmId(id) => write!(f, "{id}"),
            VmRef::Name(n) => f.write_str(n),
        }
    }
}

/// Parses a vm_id (1..=u32::MAX).
pub fn parse_vm_id(s: &str) -> Result<u32> {
    match s.trim().parse::<u32>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(Error::InvalidVmId(s.to_string())),
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && !name.bytes().all(|c| c.is_ascii_digit())
        && name.parse::<VmUuid>().is_err();
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName(name.to_string()))
    }
}

fn validate_pool_name(name: &str) -> Result<()> {
    if (1..=NAME_MAX).contains(&name.chars().count()) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(Error::InvalidPoolName(name.to_string()))
    }
}

fn quota_to_sql(q: u64) -> Result<i64> {
    i64::try_from(q).map_err(|_| Error::InvalidQuota(q))
}

/// Largest per-VM guest memory bound, MiB (just under 1 EiB: its bytes fit
/// in a u64). The schema checks the same range.
pub const MAX_GUEST_MEMORY_MIB: u64 = (1 << 40) - 1;

fn mem_bound_to_sql(m: Option<u64>) -> Result<Option<i64>> {
    match m {
        None => Ok(None),
        Some(v @ 1..=MAX_GUEST_MEMORY_MIB) => Ok(Some(v as i64)),
        Some(v) => Err(Error::InvalidMemoryBound(v)),
    }
}

/// A per-VM guest-memory bound as given on the command line: MiB, or
/// `None` for the daemon's `max_guest_memory_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBound(pub Option<u64>);

/// `--max-guest-memory-mib`: MiB (1 to [`MAX_GUEST_MEMORY_MIB`]), or
/// `default` for the daemon's `max_guest_memory_mib`.
pub fn parse_memory_bound(s: &str) -> std::result::Result<MemoryBound, String> {
    if s.trim() == "default" {
        return Ok(MemoryBound(None));
    }
    match s.trim().parse::<u64>() {
        Ok(v @ 1..=MAX_GUEST_MEMORY_MIB) => Ok(MemoryBound(Some(v))),
        _ => Err(format!(
            "'{s}' is not a size in MiB (1 to {MAX_GUEST_MEMORY_MIB}) or 'default'"
        )),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolRecord {
    #[serde(serialize_with = "ser_display")]
    pub id: PoolId,
    pub name: String,
    pub gpu_index: u32,
    pub description: String,
    /// Number of VMs registered in the pool.
    pub vm_count: u32,
}

/// A registered VM, with the GPU of its pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmRecord {
    pub uuid: VmUuid,
    pub vm_id: u32,
    pub name: Option<String>,
    #[serde(serialize_with = "ser_display")]
    pub pool: PoolId,
    /// 0 low, 1 medium, 2 high.
    #[serde(serialize_with = "ser_priority")]
    pub priority: Priority,
    pub max_queued: u32,
    pub gpu_mem_quota_mib: u64,
    /// Registration of its guest memory: all (pinned, DMA) or staging.
    #[serde(serialize_with = "ser_display")]
    pub register: Register,
    /// Largest guest memory its frontend may share, MiB; `None`: the
    /// daemon's `max_guest_memory_mib`.
    pub max_guest_memory_mib: Option<u64>,
    /// GPU of the VM's pool.
    pub gpu_index: u32,
    pub created_at: String,
    pub updated_at: String,
}

impl VmRecord {
    /// What the guest sees in config space and in the vgpu-stub registers.
    pub fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            pool: self.pool,
            priority: self.priority,
            vm_id: self.vm_id,
            // The database knows assignments, not the GPU's live health.
            health: GpuHealth::default(),
        }
    }

    /// The name if it has one, else the UUID.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(self.uuid.as_str())
    }
}

fn ser_display<T: fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn ser_priority<S: serde::Serializer>(p: &Priority, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u32(*p as u32)
}

/// A VM to register. `vm_id: None` takes the smallest free vm_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVm {
    pub uuid: VmUuid,
    pub vm_id: Option<u32>,
    pub name: Option<String>,
    pub pool: PoolId,
    pub priority: Priority,
    pub max_queued: u32,
    pub gpu_mem_quota_mib: u64,
    pub register: Register,
    /// `None`: the daemon's `max_guest_memory_mib`.
    pub max_guest_memory_mib: Option<u64>,
}

impl NewVm {
    /// A VM with the default per-VM settings `defaults`.
    pub fn new(uuid: VmUuid, pool: PoolId, priority: Priority, defaults: &VmDefaults) -> Self {
        NewVm {
            uuid,
            vm_id: None,
            name: None,
            pool,
            priority,
            max_queued: u32::try_from(defaults.max_queued).unwrap_or(u32::MAX),
            gpu_mem_quota_mib: defaults.gpu_mem_quota_mib,
            register: defaults.register,
            max_guest_memory_mib: None,
        }
    }
}

/// Fields to change on a VM; `None` leaves a field as it is.
/// `name: Some(None)` removes the name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmChange {
    pub vm_id: Option<u32>,
    pub name: Option<Option<String>>,
    pub pool: Option<PoolId>,
    pub priority: Option<Priority>,
    pub max_queued: Option<u32>,
    pub gpu_mem_quota_mib: Option<u64>,
    pub register: Option<Register>,
    /// `Some(None)`: back to the daemon's `max_guest_memory_mib`.
    pub max_guest_memory_mib: Option<Option<u64>>,
}

impl VmChange {
    pub fn is_empty(&self) -> bool {
        *self == VmChange::default()
    }

    fn validate(&self) -> Result<()> {
        if self.is_empty() {
            return Err(Error::NothingToChange);
        }
        if self.vm_id == Some(0) {
            return Err(Error::InvalidVmId("0".into()));
        }
        if let Some(Some(name)) = &self.name {
            validate_name(name)?;
        }
        if self.max_queued == Some(0) {
            return Err(Error::InvalidMaxQueued);
        }
        if let Some(q) = self.gpu_mem_quota_mib {
            quota_to_sql(q)?;
        }
        Ok(())
    }
}

/// A pool to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPool {
    pub id: PoolId,
    pub name: String,
    pub gpu_index: u32,
    pub description: String,
}

/// A record before and after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<T> {
    pub before: T,
    pub after: T,
}

/// A VM's assignment as another store (XCP-ng's XAPI) holds it, every field
/// resolved; what [`Store::replace_vms`] makes the VM table equal to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub uuid: VmUuid,
    pub vm_id: u32,
    pub pool: PoolId,
    pub priority: Priority,
    pub max_queued: u32,
    pub gpu_mem_quota_mib: u64,
}

/// What [`Store::replace_vms`] did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replaced {
    pub added: Vec<VmRecord>,
    pub updated: Vec<Change<VmRecord>>,
    pub removed: Vec<VmRecord>,
    pub unchanged: usize,
}

impl Replaced {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

const VM_SELECT: &str = "SELECT v.uuid, v.vm_id, v.name, v.pool_id, v.priority, v.max_queued, \
     v.gpu_mem_quota_mib, p.gpu_index, v.created_at, v.updated_at, v.register, \
     v.max_guest_memory_mib \
     FROM vms v JOIN pools p ON p.id = v.pool_id";

const POOL_SELECT: &str = "SELECT p.id, p.name, p.gpu_index, p.description, \
     (SELECT count(*) FROM vms v WHERE v.pool_id = p.id) FROM pools p";

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')";

fn corrupt(what: &str, v: impl fmt::Display) -> Error {
    Error::Corrupt(format!("{what} = {v}"))
}

fn get_u32(row: &Row, i: usize, what: &str) -> Result<u32> {
    let v: i64 = row.get(i)?;
    u32::try_from(v).map_err(|_| corrupt(what, v))
}

fn get_pool_id(row: &Row, i: usize) -> Result<PoolId> {
    let s: String = row.get(i)?;
    s.parse().map_err(|_| corrupt("pool id", &s))
}

fn vm_from_row(row: &Row) -> Result<VmRecord> {
    let uuid: String = row.get(0)?;
    let prio = get_u32(row, 4, "priority")?;
    let quota: i64 = row.get(6)?;
    Ok(VmRecord {
        uuid: uuid.parse().map_err(|_| corrupt("uuid", &uuid))?,
        vm_id: get_u32(row, 1, "vm_id")?,
        name: row.get(2)?,
        pool: get_pool_id(row, 3)?,
        priority: Priority::from_u32(prio).ok_or_else(|| corrupt("priority", prio))?,
        max_queued: get_u32(row, 5, "max_queued")?,
        gpu_mem_quota_mib: u64::try_from(quota).map_err(|_| corrupt("gpu_mem_quota_mib", quota))?,
        gpu_index: get_u32(row, 7, "gpu_index")?,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
        register: {
            let r: String = row.get(10)?;
            r.parse().map_err(|_| corrupt("register", &r))?
        },
        max_guest_memory_mib: {
            let m: Option<i64> = row.get(11)?;
            match m {
                None => None,
                Some(m) => Some(u64::try_from(m).map_err(|_| corrupt("max_guest_memory_mib", m))?),
            }
        },
    })
}

fn pool_from_row(row: &Row) -> Result<PoolRecord> {
    Ok(PoolRecord {
        id: get_pool_id(row, 0)?,
        name: row.get(1)?,
        gpu_index: get_u32(row, 2, "gpu_index")?,
        description: row.get(3)?,
        vm_count: get_u32(row, 4, "vm count")?,
    })
}

/// Runs `sql` and converts every row; conversion errors are ours, not rusqlite's.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: fn(&Row) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(f(row)?);
    }
    Ok(out)
}

fn find_vm_in(conn: &Connection, vm: &VmRef) -> Result<VmRecord> {
    let by = |column: &str, value: &dyn rusqlite::ToSql| {
        query_all(
            conn,
            &format!("{VM_SELECT} WHERE v.{column} = ?1"),
            [value],
            vm_from_row,
        )
    };
    let found = match vm {
        VmRef::Uuid(u) => by("uuid", &u.as_str()),
        VmRef::VmId(id) => by("vm_id", id),
        VmRef::Name(n) => by("name", n),
    }?;
    found
        .into_iter()
        .next()
        .ok_or_else(|| Error::UnknownVm(vm.to_string()))
}

fn pool_in(conn: &Connection, id: PoolId) -> Result<PoolRecord> {
    query_all(
        conn,
        &format!("{POOL_SELECT} WHERE p.id = ?1"),
        [id.to_string()],
        pool_from_row,
    )?
    .into_iter()
    .next()
    .ok_or(Error::UnknownPool(id))
}

/// `Ok(None)` for "no such VM or pool", other errors as they are.
fn found<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::UnknownVm(_) | Error::UnknownPool(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The VM that holds `vm_id` or `name`, if any.
fn holder_of(
    conn: &Connection,
    column: &str,
    value: &dyn rusqlite::ToSql,
) -> Result<Option<VmUuid>> {
    let uuid: Option<String> = conn
        .query_row(
            &format!("SELECT uuid FROM vms WHERE {column} = ?1"),
            [value],
            |r| r.get(0),
        )
        .optional()?;
    uuid.map(|u| u.parse().map_err(|_| corrupt("uuid", &u)))
        .transpose()
}

/// The smallest vm_id not in use.
fn next_free_vm_id(conn: &Connection) -> Result<u32> {
    let next: Option<i64> = conn.query_row(
        "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM vms WHERE vm_id = 1) THEN 1 ELSE \
           (SELECT min(v.vm_id + 1) FROM vms v WHERE v.vm_id < 4294967295 \
              AND NOT EXISTS (SELECT 1 FROM vms w WHERE w.vm_id = v.vm_id + 1)) END",
        [],
        |r| r.get(0),
    )?;
    next.and_then(|v| u32::try_from(v).ok())
        .ok_or(Error::NoFreeVmId)
}

/// Runs `f` again while SQLite answers BUSY, for up to [`BUSY_TIMEOUT`].
fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// An open vgpu database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens the database at `path`, creating the file and its directory if
    /// needed and applying any migrations not yet applied.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let open_err = |source| Error::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        // Switching a new database to WAL while other processes open it too
        // can answer SQLITE_BUSY without waiting on the busy handler: retry.
        let mode: String =
            retry_busy(|| conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)))
                .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!("{}: journal mode is {mode}, not WAL", path.display());
        }
        let mut store = Store { conn, path };
        retry_busy(|| match store.migrate() {
            Err(Error::Sqlite(e)) => Err(e),
            other => Ok(other),
        })??;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let known = MIGRATIONS.len() as u32;
        if self.schema_version()? == known {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > known {
            return Err(Error::SchemaTooNew { found, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            log::info!("{}: applying migration {}", self.path.display(), i + 1);
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", known)?;
        tx.commit()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// `PRAGMA data_version`: changes whenever another connection commits,
    /// so a long-lived reader can poll it to notice changes cheaply.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// All pools, by id.
    pub fn pools(&self) -> Result<Vec<PoolRecord>> {
        query_all(
            &self.conn,
            &format!("{POOL_SELECT} ORDER BY p.id"),
            [],
            pool_from_row,
        )
    }

    pub fn pool(&self, id: PoolId) -> Result<PoolRecord> {
        pool_in(&self.conn, id)
    }

    /// All VMs, by vm_id.
    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        query_all(
            &self.conn,
            &format!("{VM_SELECT} ORDER BY v.vm_id"),
            [],
            vm_from_row,
        )
    }

    /// The VM named by UUID, vm_id or name; `Error::UnknownVm` if none.
    pub fn find_vm(&self, vm: &VmRef) -> Result<VmRecord> {
        find_vm_in(&self.conn, vm)
    }

    /// The VM with this vm_id, if registered.
    pub fn vm_by_id(&self, vm_id: u32) -> Result<Option<VmRecord>> {
        found(self.find_vm(&VmRef::VmId(vm_id)))
    }

    /// Registers a VM; without `vm_id` it gets the smallest free one.
    pub fn register_vm(&mut self, new: &NewVm) -> Result<VmRecord> {
        if let Some(name) = &new.name {
            validate_name(name)?;
        }
        if new.vm_id == Some(0) {
            return Err(Error::InvalidVmId("0".into()));
        }
        if new.max_queued == 0 {
            return Err(Error::InvalidMaxQueued);
        }
        let quota = quota_to_sql(new.gpu_mem_quota_mib)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        pool_in(&tx, new.pool)?;
        if let Some(old) = found(find_vm_in(&tx, &VmRef::Uuid(new.uuid.clone())))? {
            return Err(Error::DuplicateUuid {
                uuid: old.uuid,
                vm_id: old.vm_id,
            });
        }
        if let Some(name) = &new.name {
            if let Some(uuid) = holder_of(&tx, "name", name)? {
                return Err(Error::DuplicateName {
                    name: name.clone(),
                    uuid,
                });
            }
        }
        let vm_id = match new.vm_id {
            Some(id) => {
                if let Some(uuid) = holder_of(&tx, "vm_id", &id)? {
                    return Err(Error::DuplicateVmId { vm_id: id, uuid });
                }
                id
            }
            None => next_free_vm_id(&tx)?,
        };
        tx.execute(
            "INSERT INTO vms (uuid, vm_id, name, pool_id, priority, max_queued, gpu_mem_quota_mib, \
             register, max_guest_memory_mib) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                new.uuid.as_str(),
                vm_id,
                new.name,
                new.pool.to_string(),
                new.priority as u32,
                new.max_queued,
                quota,
                new.register.as_str(),
                mem_bound_to_sql(new.max_guest_memory_mib)?
            ],
        )?;
        let rec = find_vm_in(&tx, &VmRef::Uuid(new.uuid.clone()))?;
        tx.commit()?;
        Ok(rec)
    }

    /// Changes some fields of a VM.
    pub fn update_vm(&mut self, vm: &VmRef, change: &VmChange) -> Result<Change<VmRecord>> {
        change.validate()?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before = find_vm_in(&tx, vm)?;
        if let Some(pool) = change.pool {
            pool_in(&tx, pool)?;
        }
        if let Some(id) = change.vm_id {
            match holder_of(&tx, "vm_id", &id)? {
                Some(uuid) if uuid != before.uuid => {
                    return Err(Error::DuplicateVmId { vm_id: id, uuid })
                }
                _ => {}
            }
        }
        if let Some(Some(name)) = &change.name {
            match holder_of(&tx, "name", name)? {
                Some(uuid) if uuid != before.uuid => {
                    return Err(Error::DuplicateName {
                        name: name.clone(),
                        uuid,
                    })
                }
                _ => {}
            }
        }
        let name = match &change.name {
            Some(n) => n.clone(),
            None => before.name.clone(),
        };
        let quota = quota_to_sql(change.gpu_mem_quota_mib.unwrap_or(before.gpu_mem_quota_mib))?;
        tx.execute(
            &format!(
                "UPDATE vms SET vm_id = ?1, name = ?2, pool_id = ?3, priority = ?4, \
                 max_queued = ?5, gpu_mem_quota_mib = ?6, register = ?8, \
                 max_guest_memory_mib = ?9, updated_at = {NOW} \
                 WHERE uuid = ?7"
            ),
            params![
                change.vm_id.unwrap_or(before.vm_id),
                name,
                change.pool.unwrap_or(before.pool).to_string(),
                change.priority.unwrap_or(before.priority) as u32,
                change.max_queued.unwrap_or(before.max_queued),
                quota,
                before.uuid.as_str(),
                change.register.unwrap_or(before.register).as_str(),
                mem_bound_to_sql(
                    change
                        .max_guest_memory_mib
                        .unwrap_or(before.max_guest_memory_mib)
                )?
            ],
        )?;
        let after = find_vm_in(&tx, &VmRef::Uuid(before.uuid.clone()))?;
        tx.commit()?;
        Ok(Change { before, after })
    }

    pub fn set_pool(&mut self, vm: &VmRef, pool: PoolId) -> Result<Change<VmRecord>> {
        let change = VmChange {
            pool: Some(pool),
            ..VmChange::default()
        };
        self.update_vm(vm, &change)
    }

    pub fn set_priority(&mut self, vm: &VmRef, priority: Priority) -> Result<Change<VmRecord>> {
        let change = VmChange {
            priority: Some(priority),
            ..VmChange::default()
        };
        self.update_vm(vm, &change)
    }

    pub fn set_vm_id(&mut self, vm: &VmRef, vm_id: u32) -> Result<Change<VmRecord>> {
        let change = VmChange {
            vm_id: Some(vm_id),
            ..VmChange::default()
        };
        self.update_vm(vm, &change)
    }

    /// Removes a VM and returns what it was.
    pub fn remove_vm(&mut self, vm: &VmRef) -> Result<VmRecord> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rec = find_vm_in(&tx, vm)?;
        tx.execute("DELETE FROM vms WHERE uuid = ?1", [rec.uuid.as_str()])?;
        tx.commit()?;
        Ok(rec)
    }

    /// Makes the VM table hold exactly `target` (an assignment per VM from
    /// the pool-wide store): VMs not in it are removed, the others added or
    /// updated; a VM keeps its local name. One transaction, validated as a
    /// whole first: on any error nothing changes. `dry_run` rolls back.
    pub fn replace_vms(&mut self, target: &[Assigned], dry_run: bool) -> Result<Replaced> {
        let mut seen_uuid = std::collections::HashSet::new();
        let mut seen_id: std::collections::HashMap<u32, &VmUuid> = Default::default();
        for t in target {
            if !seen_uuid.insert(&t.uuid) {
                return Err(Error::SourceDuplicateUuid(t.uuid.clone()));
            }
            if let Some(first) = seen_id.insert(t.vm_id, &t.uuid) {
                let (a, b) = (first.clone(), t.uuid.clone());
                let (first, second) = if a <= b { (a, b) } else { (b, a) };
                return Err(Error::SourceDuplicateVmId {
                    vm_id: t.vm_id,
                    first,
                    second,
                });
            }
            if t.vm_id == 0 {
                return Err(Error::InvalidVmId("0".into()));
            }
            if t.max_queued == 0 {
                return Err(Error::InvalidMaxQueued);
            }
            quota_to_sql(t.gpu_mem_quota_mib)?;
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for t in target {
            if found(pool_in(&tx, t.pool))?.is_none() {
                return Err(Error::SourceUnknownPool {
                    uuid: t.uuid.clone(),
                    pool: t.pool,
                });
            }
        }
        let local = query_all(
            &tx,
            &format!("{VM_SELECT} ORDER BY v.vm_id"),
            [],
            vm_from_row,
        )?;
        let mut done = Replaced::default();
        // Rows that go, and rows whose vm_id changes: deleted first (the
        // latter inserted again below), so vm_ids can move between VMs
        // without a UNIQUE clash.
        for old in &local {
            if !target.iter().any(|t| t.uuid == old.uuid) {
                done.removed.push(old.clone());
            }
            if !target
                .iter()
                .any(|t| t.uuid == old.uuid && t.vm_id == old.vm_id)
            {
                tx.execute("DELETE FROM vms WHERE uuid = ?1", [old.uuid.as_str()])?;
            }
        }
        for t in target {
            let old = local.iter().find(|o| o.uuid == t.uuid);
            let same = old.is_some_and(|o| {
                (
                    o.vm_id,
                    o.pool,
                    o.priority,
                    o.max_queued,
                    o.gpu_mem_quota_mib,
                ) == (
                    t.vm_id,
                    t.pool,
                    t.priority,
                    t.max_queued,
                    t.gpu_mem_quota_mib,
                )
            });
            if same {
                done.unchanged += 1;
                continue;
            }
            let quota = quota_to_sql(t.gpu_mem_quota_mib)?;
            match old {
                Some(o) if o.vm_id == t.vm_id => {
                    tx.execute(
                        &format!(
                            "UPDATE vms SET pool_id = ?1, priority = ?2, max_queued = ?3, \
                             gpu_mem_quota_mib = ?4, updated_at = {NOW} WHERE uuid = ?5"
                        ),
                        params![
                            t.pool.to_string(),
                            t.priority as u32,
                            t.max_queued,
                            quota,
                            t.uuid.as_str()
                        ],
                    )?;
                }
                _ => {
                    let (name, created) = match old {
                        Some(o) => (o.name.clone(), Some(o.created_at.clone())),
                        None => (None, None),
                    };
                    tx.execute(
                        &format!(
                            "INSERT INTO vms (uuid, vm_id, name, pool_id, priority, max_queued, \
                             gpu_mem_quota_mib, created_at, updated_at) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, coalesce(?8, {NOW}), {NOW})"
                        ),
                        params![
                            t.uuid.as_str(),
                            t.vm_id,
                            name,
                            t.pool.to_string(),
                            t.priority as u32,
                            t.max_queued,
                            quota,
                            created
                        ],
                    )?;
                }
            }
            let after = find_vm_in(&tx, &VmRef::Uuid(t.uuid.clone()))?;
            match old {
                Some(before) => done.updated.push(Change {
                    before: before.clone(),
                    after,
                }),
                None => done.added.push(after),
            }
        }
        if dry_run {
            tx.rollback()?;
        } else {
            tx.commit()?;
        }
        Ok(done)
    }

    pub fn add_pool(&mut self, new: &NewPool) -> Result<PoolRecord> {
        validate_pool_name(&new.name)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if found(pool_in(&tx, new.id))?.is_some() {
            return Err(Error::DuplicatePool(new.id));
        }
        let holder: Option<String> = tx
            .query_row("SELECT id FROM pools WHERE name = ?1", [&new.name], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(id) = holder {
            return Err(Error::DuplicatePoolName {
                name: new.name.clone(),
                pool: id.parse().map_err(|_| corrupt("pool id", &id))?,
            });
        }
        tx.execute(
            "INSERT INTO pools (id, name, gpu_index, description) VALUES (?1, ?2, ?3, ?4)",
            params![new.id.to_string(), new.name, new.gpu_index, new.description],
        )?;
        let rec = pool_in(&tx, new.id)?;
        tx.commit()?;
        Ok(rec)
    }

    /// Moves a pool (and so all its VMs) to another GPU.
    pub fn set_pool_gpu(&mut self, id: PoolId, gpu_index: u32) -> Result<Change<PoolRecord>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let before = pool_in(&tx, id)?;
        tx.execute(
            "UPDATE pools SET gpu_index = ?1 WHERE id = ?2",
            params![gpu_index, id.to_string()],
        )?;
        let after = pool_in(&tx, id)?;
        tx.commit()?;
        Ok(Change { before, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e";
    const U2: &str = "0e8f4a2b-7c3d-4e5f-9a1b-2c3d4e5f6a7b";
    const U3: &str = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f";

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("sub/dir/vgpu.db")).unwrap();
        (dir, store)
    }

    /// A database of schema 1 with a VM in it migrates to the current
    /// schema, and the VM keeps registering its memory (register = all).
    #[test]
    fn migration_2_adds_register() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                &format!("INSERT INTO vms (uuid, vm_id) VALUES ('{U1}', 5)"),
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        let v = store.find_vm(&vm_ref("5")).unwrap();
        assert_eq!(v.register, Register::All);
        // The schema refuses anything but all and staging.
        assert!(store
            .conn
            .execute("UPDATE vms SET register = 'some' WHERE vm_id = 5", [])
            .is_err());
    }

    /// A version-2 database gains the per-VM guest-memory bound, unset (the
    /// daemon's max_guest_memory_mib) for the VMs it has; the schema keeps
    /// it in range.
    #[test]
    fn migration_3_adds_max_guest_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                &format!("INSERT INTO vms (uuid, vm_id) VALUES ('{U1}', 5)"),
                [],
            )
            .unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), 3);
        assert_eq!(
            store.find_vm(&vm_ref("5")).unwrap().max_guest_memory_mib,
            None
        );
        let change = VmChange {
            max_guest_memory_mib: Some(Some(2048)),
            ..VmChange::default()
        };
        let c = store.update_vm(&vm_ref("5"), &change).unwrap();
        assert_eq!(c.after.max_guest_memory_mib, Some(2048));
        let bad = VmChange {
            max_guest_memory_mib: Some(Some(0)),
            ..VmChange::default()
        };
        assert!(matches!(
            store.update_vm(&vm_ref("5"), &bad),
            Err(Error::InvalidMemoryBound(0))
        ));
        for bad in ["0", "-3", "1099511627776"] {
            assert!(store
                .conn
                .execute(
                    &format!("UPDATE vms SET max_guest_memory_mib = {bad} WHERE vm_id = 5"),
                    []
                )
                .is_err());
        }
        assert_eq!(parse_memory_bound("default"), Ok(MemoryBound(None)));
        assert_eq!(parse_memory_bound("64"), Ok(MemoryBound(Some(64))));
        assert!(parse_memory_bound("0").is_err());
    }

    fn new_vm(uuid: &str) -> NewVm {
        NewVm::new(
            uuid.parse().unwrap(),
            pool('A'),
            Priority::Medium,
            &VmDefaults::embedded().unwrap(),
        )
    }

    fn pool(c: char) -> PoolId {
        PoolId::new(c as u8).unwrap()
    }

    fn vm_ref(s: &str) -> VmRef {
        s.parse().unwrap()
    }

    #[test]
    fn init_creates_file_pools_and_pragmas() {
        let (dir, store) = open();
        assert!(dir.path().join("sub/dir/vgpu.db").is_file());
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        let pools = store.pools().unwrap();
        assert_eq!(
            pools.iter().map(|p| p.id.to_string()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        let fk: i64 = store
            .conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!((fk, mode.as_str()), (1, "wal"));
        // Reopening applies nothing twice.
        drop(store);
        let store = Store::open(dir.path().join("sub/dir/vgpu.db")).unwrap();
        assert_eq!(store.pools().unwrap().len(), 2);
    }

    #[test]
    fn refuses_newer_schema() {
        let (dir, store) = open();
        store.conn.pragma_update(None, "user_version", 99).unwrap();
        drop(store);
        let err = Store::open(dir.path().join("sub/dir/vgpu.db"))
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn register_assigns_smallest_free_vm_id() {
        let (_dir, mut s) = open();
        let a = s.register_vm(&new_vm(U1)).unwrap();
        let b = s
            .register_vm(&NewVm {
                vm_id: Some(3),
                ..new_vm(U2)
            })
            .unwrap();
        let c = s.register_vm(&new_vm(U3)).unwrap();
        assert_eq!((a.vm_id, b.vm_id, c.vm_id), (1, 3, 2));
        s.remove_vm(&vm_ref("1")).unwrap();
        let d = s
            .register_vm(&new_vm("11111111-2222-4333-8444-555555555555"))
            .unwrap();
        assert_eq!(d.vm_id, 1);
        assert_eq!(
            s.vms().unwrap().iter().map(|v| v.vm_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn record_fields_and_lookup() {
        let (_dir, mut s) = open();
        s.set_pool_gpu(pool('B'), 2).unwrap();
        let vm = s
            .register_vm(&NewVm {
                name: Some("web-1".into()),
                pool: pool('B'),
                priority: Priority::High,
                max_queued: 8,
                gpu_mem_quota_mib: 0,
                ..new_vm(&U1.to_uppercase())
            })
            .unwrap();
        assert_eq!(vm.uuid.as_str(), U1);
        assert_eq!(vm.gpu_index, 2);
        assert_eq!((vm.max_queued, vm.gpu_mem_quota_mib), (8, 0));
        assert_eq!(
            vm.device_config(),
            DeviceConfig {
                pool: pool('B'),
                priority: Priority::High,
                vm_id: 1,
                health: GpuHealth::default(),
            }
        );
        for key in [U1, "1", "web-1"] {
            assert_eq!(s.find_vm(&vm_ref(key)).unwrap(), vm);
        }
        assert!(matches!(
            s.find_vm(&vm_ref("web-2")),
            Err(Error::UnknownVm(_))
        ));
        assert_eq!(s.vm_by_id(9).unwrap(), None);
        assert_eq!(s.pool(pool('B')).unwrap().vm_count, 1);
    }

    #[test]
    fn rejects_bad_input_and_leaves_db_unchanged() {
        let (_dir, mut s) = open();
        s.register_vm(&NewVm {
            name: Some("web-1".into()),
            ..new_vm(U1)
        })
        .unwrap();
        let before = s.vms().unwrap();
        type Check = fn(&Error) -> bool;
        let cases: Vec<(NewVm, Check)> = vec![
            (new_vm(U1), |e| matches!(e, Error::DuplicateUuid { .. })),
            (
                NewVm {
                    vm_id: Some(1),
                    ..new_vm(U2)
                },
                |e| matches!(e, Error::DuplicateVmId { vm_id: 1, .. }),
            ),
            (
                NewVm {
                    name: Some("web-1".into()),
                    ..new_vm(U2)
                },
                |e| matches!(e, Error::DuplicateName { .. }),
            ),
            (
                NewVm {
                    pool: pool('Q'),
                    ..new_vm(U2)
                },
                |e| matches!(e, Error::UnknownPool(_)),
            ),
            (
                NewVm {
                    vm_id: Some(0),
                    ..new_vm(U2)
                },
                |e| matches!(e, Error::InvalidVmId(_)),
            ),
            (
                NewVm {
                    max_queued: 0,
                    ..new_vm(U2)
                },
                |e| matches!(e, Error::InvalidMaxQueued),
            ),
            (
                NewVm {
                    gpu_mem_quota_mib: u64::MAX,
                    ..new_vm(U2)
                },
                |e| matches!(e, Error::InvalidQuota(_)),
            ),
        ];
        for (new, ok) in cases {
            let e = s.register_vm(&new).unwrap_err();
            assert!(ok(&e), "{e}");
            assert!(!e.to_string().contains('\n'));
        }
        for bad in ["", "12", "a b", "x/y", &"n".repeat(65), U2] {
            let e = s
                .register_vm(&NewVm {
                    name: Some(bad.to_string()),
                    ..new_vm(U2)
                })
                .unwrap_err();
            assert!(matches!(e, Error::InvalidName(_)), "{bad}: {e}");
        }
        for bad in [
            "",
            "9b2c6f1e4a7d4c1b8e3f1d2a3b4c5d6e",
            "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6",
            "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6g",
        ] {
            assert!(matches!(
                bad.parse::<VmUuid>(),
                Err(Error::MalformedUuid(_))
            ));
        }
        assert!(matches!(
            "4294967296".parse::<VmRef>(),
            Err(Error::InvalidVmId(_))
        ));
        assert!(matches!("0".parse::<VmRef>(), Err(Error::InvalidVmId(_))));
        assert_eq!(s.vms().unwrap(), before);
    }

    #[test]
    fn updates() {
        let (_dir, mut s) = open();
        s.register_vm(&new_vm(U1)).unwrap();
        s.register_vm(&NewVm {
            name: Some("db".into()),
            ..new_vm(U2)
        })
        .unwrap();
        let c = s.set_pool(&vm_ref("1"), pool('B')).unwrap();
        assert_eq!((c.before.pool, c.after.pool), (pool('A'), pool('B')));
        let c = s.set_priority(&vm_ref("1"), Priority::Low).unwrap();
        assert_eq!(c.after.priority, Priority::Low);
        let c = s.set_vm_id(&vm_ref(U1), 7).unwrap();
        assert_eq!((c.before.vm_id, c.after.vm_id), (1, 7));
        let c = s
            .update_vm(
                &vm_ref("7"),
                &VmChange {
                    name: Some(Some("web".into())),
                    max_queued: Some(2),
                    gpu_mem_quota_mib: Some(1),
                    ..VmChange::default()
                },
            )
            .unwrap();
        assert_eq!(c.after.name.as_deref(), Some("web"));
        assert_eq!((c.after.max_queued, c.after.gpu_mem_quota_mib), (2, 1));
        assert_eq!(c.after.register, Register::All);
        let c = s
            .update_vm(
                &vm_ref("7"),
                &VmChange {
                    register: Some(Register::Staging),
                    ..VmChange::default()
                },
            )
            .unwrap();
        assert_eq!(c.after.register, Register::Staging);
        assert_eq!(s.find_vm(&vm_ref("7")).unwrap().register, Register::Staging);
        // Keeping its own vm_id or name is not a conflict; taking another's is.
        s.set_vm_id(&vm_ref("web"), 7).unwrap();
        assert!(matches!(
            s.set_vm_id(&vm_ref("web"), 2),
            Err(Error::DuplicateVmId { vm_id: 2, .. })
        ));
        let named_db = VmChange {
            name: Some(Some("db".into())),
            ..VmChange::default()
        };
        assert!(matches!(
            s.update_vm(&vm_ref("web"), &named_db),
            Err(Error::DuplicateName { .. })
        ));
        assert!(matches!(
            s.set_pool(&vm_ref("web"), pool('Z')),
            Err(Error::UnknownPool(_))
        ));
        assert!(matches!(
            s.update_vm(&vm_ref("web"), &VmChange::default()),
            Err(Error::NothingToChange)
        ));
        let cleared = VmChange {
            name: Some(None),
            ..VmChange::default()
        };
        assert_eq!(
            s.update_vm(&vm_ref("web"), &cleared).unwrap().after.name,
            None
        );
        assert!(matches!(
            s.remove_vm(&vm_ref("web")),
            Err(Error::UnknownVm(_))
        ));
        assert_eq!(s.remove_vm(&vm_ref("7")).unwrap().uuid.as_str(), U1);
        assert_eq!(s.vms().unwrap().len(), 1);
    }

    #[test]
    fn pools() {
        let (_dir, mut s) = open();
        let new = NewPool {
            id: pool('C'),
            name: "Pool C".into(),
            gpu_index: 1,
            description: "second GPU".into(),
        };
        let c = s.add_pool(&new).unwrap();
        assert_eq!((c.gpu_index, c.vm_count), (1, 0));
        assert!(matches!(s.add_pool(&new), Err(Error::DuplicatePool(_))));
        let same_name = NewPool {
            id: pool('D'),
            ..new.clone()
        };
        assert!(matches!(
            s.add_pool(&same_name),
            Err(Error::DuplicatePoolName { .. })
        ));
        let c = s.set_pool_gpu(pool('C'), 3).unwrap();
        assert_eq!((c.before.gpu_index, c.after.gpu_index), (1, 3));
        assert!(matches!(
            s.set_pool_gpu(pool('X'), 0),
            Err(Error::UnknownPool(_))
        ));
        assert_eq!(s.pools().unwrap().len(), 3);
    }

    #[test]
    fn constraints_are_the_last_line_of_defence() {
        let (_dir, s) = open();
        let bad = [
            format!(
                "INSERT INTO vms (uuid, vm_id) VALUES ('{}', 1)",
                U1.to_uppercase()
            ),
            format!("INSERT INTO vms (uuid, vm_id) VALUES ('{U1}', 0)"),
            format!("INSERT INTO vms (uuid, vm_id, priority) VALUES ('{U1}', 1, 7)"),
            format!("INSERT INTO vms (uuid, vm_id, pool_id) VALUES ('{U1}', 1, 'Q')"),
            format!("INSERT INTO vms (uuid, vm_id, max_queued) VALUES ('{U1}', 1, 0)"),
            format!("INSERT INTO vms (uuid, vm_id, name) VALUES ('{U1}', 1, '123')"),
            "INSERT INTO pools (id, name) VALUES ('a', 'x')".to_string(),
            "INSERT INTO pools (id, name, gpu_index) VALUES ('C', 'x', -1)".to_string(),
        ];
        for sql in bad {
            let e = Error::from(s.conn.execute(&sql, []).unwrap_err());
            assert!(matches!(e, Error::Rejected(_)), "{sql}: {e}");
        }
        s.conn
            .execute(
                &format!("INSERT INTO vms (uuid, vm_id) VALUES ('{U1}', 1)"),
                [],
            )
            .unwrap();
        // A row written by another tool gets the schema's defaults, which
        // must agree with the one source of defaults (config/vgpu.toml).
        let v = s.find_vm(&vm_ref("1")).unwrap();
        let d = VmDefaults::embedded().unwrap();
        assert_eq!(
            (
                v.pool,
                v.priority,
                v.max_queued as usize,
                v.gpu_mem_quota_mib
            ),
            (
                pool('A'),
                Priority::Medium,
                d.max_queued,
                d.gpu_mem_quota_mib
            )
        );
        assert_eq!(v.register, d.register);
    }

    #[test]
    fn replace_vms_makes_the_table_equal_the_source() {
        let (_dir, mut s) = open();
        let a = s
            .register_vm(&NewVm {
                vm_id: Some(1),
                name: Some("one".into()),
                ..new_vm(U1)
            })
            .unwrap();
        s.register_vm(&NewVm {
            vm_id: Some(2),
            ..new_vm(U2)
        })
        .unwrap();
        let assigned = |uuid: &str, vm_id, p: char, priority| Assigned {
            uuid: uuid.parse().unwrap(),
            vm_id,
            pool: pool(p),
            priority,
            max_queued: 64,
            gpu_mem_quota_mib: 4096,
        };
        // U1 and U2 swap vm_ids, U2 changes pool, U3 is new.
        let target = vec![
            assigned(U1, 2, 'A', Priority::Medium),
            assigned(U2, 1, 'B', Priority::Medium),
            assigned(U3, 3, 'A', Priority::High),
        ];
        let dry = s.replace_vms(&target, true).unwrap();
        assert_eq!((dry.added.len(), dry.updated.len()), (1, 2));
        assert_eq!(s.vms().unwrap().len(), 2, "a dry run writes nothing");
        let r = s.replace_vms(&target, false).unwrap();
        // The same plan (timestamps aside).
        let plan = |r: &Replaced| {
            let ids = |v: &[VmRecord]| {
                v.iter()
                    .map(|v| (v.uuid.clone(), v.vm_id))
                    .collect::<Vec<_>>()
            };
            let upd: Vec<_> = r.updated.iter().map(|c| c.after.clone()).collect();
            (ids(&r.added), ids(&upd), ids(&r.removed), r.unchanged)
        };
        assert_eq!(plan(&r), plan(&dry));
        let got: Vec<_> = s
            .vms()
            .unwrap()
            .into_iter()
            .map(|v| (v.uuid.to_string(), v.vm_id, v.pool, v.name))
            .collect();
        assert_eq!(
            got,
            [
                (U2.to_string(), 1, pool('B'), None),
                (U1.to_string(), 2, pool('A'), Some("one".into())),
                (U3.to_string(), 3, pool('A'), None),
            ]
        );
        let one = s.find_vm(&vm_ref(U1)).unwrap();
        assert_eq!(one.created_at, a.created_at, "a moved VM keeps its history");
        // The same again changes nothing; a VM left out is removed.
        let again = s.replace_vms(&target, false).unwrap();
        assert!(again.is_empty() && again.unchanged == 3);
        let r = s.replace_vms(&target[..1], false).unwrap();
        assert_eq!(r.removed.len(), 2);
        assert_eq!(s.vms().unwrap().len(), 1);
        // Errors leave the table as it was.
        let before = s.vms().unwrap();
        type Check = fn(&Error) -> bool;
        let bad: Vec<(Vec<Assigned>, Check)> = vec![
            (
                vec![
                    assigned(U1, 5, 'A', Priority::Low),
                    assigned(U2, 5, 'A', Priority::Low),
                ],
                |e| matches!(e, Error::SourceDuplicateVmId { vm_id: 5, .. }),
            ),
            (
                vec![
                    assigned(U1, 5, 'A', Priority::Low),
                    assigned(U1, 6, 'A', Priority::Low),
                ],
                |e| matches!(e, Error::SourceDuplicateUuid(_)),
            ),
            (vec![assigned(U2, 7, 'Q', Priority::Low)], |e| {
                matches!(e, Error::SourceUnknownPool { .. })
            }),
            (
                vec![Assigned {
                    max_queued: 0,
                    ..assigned(U2, 7, 'A', Priority::Low)
                }],
                |e| matches!(e, Error::InvalidMaxQueued),
            ),
        ];
        for (t, ok) in bad {
            let e = s.replace_vms(&t, false).unwrap_err();
            assert!(ok(&e), "{e}");
            assert!(!e.to_string().contains('\n'));
            assert_eq!(s.vms().unwrap(), before);
        }
    }

    #[test]
    fn data_version_moves_on_foreign_commit() {
        let (dir, reader) = open();
        let v0 = reader.data_version().unwrap();
        let mut writer = Store::open(dir.path().join("sub/dir/vgpu.db")).unwrap();
        writer.register_vm(&new_vm(U1)).unwrap();
        assert_ne!(reader.data_version().unwrap(), v0);
        assert_eq!(reader.vms().unwrap().len(), 1);
    }
}
