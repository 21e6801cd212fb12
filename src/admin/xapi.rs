//! XCP-ng's pool database (XAPI), reached through `xe`.
//!
//! Two things of a vgpu VM live there: `platform:device-model-args` (what the
//! patched qemu-wrapper appends to QEMU's command line) and the VM's
//! pool-wide assignment, `other-config:vgpu-*` (see [`KEYS`]). XAPI is the
//! pool's distributed store: those keys follow the VM to whichever host
//! starts it, and each host's `vgpu-admin sync --from-xapi` (run by the
//! vm-pre-start hook) copies them into that host's SQLite database, which the
//! daemon follows. docs/xcp-ng.md says which side is the source of truth.
//!
//! `xe` runs with an argument vector, never through a shell. What it prints
//! is parsed defensively: values of other keys in a VM's maps can hold any
//! text (also "; vgpu-pool: Z" or a line that looks like a record), so what
//! a listing shows of the vgpu keys is only believed once a filtered
//! `xe vm-list` confirms it, and read key by key otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::store::VmUuid;
use crate::protocol::{PoolId, Priority};

/// The platform key that the qemu-wrapper reads.
pub const DM_ARGS_KEY: &str = "device-model-args";
/// other-config keys of a VM's pool-wide assignment.
pub const KEY_POOL: &str = "vgpu-pool";
pub const KEY_PRIORITY: &str = "vgpu-priority";
pub const KEY_VM_ID: &str = "vgpu-vm-id";
pub const KEY_MAX_QUEUED: &str = "vgpu-max-queued";
pub const KEY_QUOTA: &str = "vgpu-gpu-mem-quota-mib";
/// All of them; the first three are required once any is present.
pub const KEYS: [&str; 5] = [KEY_POOL, KEY_PRIORITY, KEY_VM_ID, KEY_MAX_QUEUED, KEY_QUOTA];

/// At most this much of xe's stderr goes into an error message.
const STDERR_MAX: usize = 400;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("xe not found on PATH (this command needs an XCP-ng host)")]
    NoXe,
    #[error("cannot run {tool}: {source}")]
    Run {
        tool: PathBuf,
        source: std::io::Error,
    },
    #[error("`xe {command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("no VM named '{0}' in XAPI (see xe vm-list)")]
    NoSuchName(String),
    #[error("VM {0} is not in XAPI")]
    NoSuchUuid(VmUuid),
    #[error("{count} VMs are named '{name}' in XAPI ({uuids}): name it by UUID")]
    AmbiguousName {
        name: String,
        count: usize,
        uuids: String,
    },
    #[error("invalid VM name-label '{0}' (control characters)")]
    BadName(String),
    #[error("unexpected output of `xe {command}`: {text:?}")]
    Output { command: String, text: String },
    #[error("VM {uuid}: other-config:{key} = '{value}' is not valid ({why})")]
    BadKey {
        uuid: VmUuid,
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("VM {uuid}: other-config has vgpu keys but not {key}")]
    Incomplete { uuid: VmUuid, key: &'static str },
    #[error("cannot pass {0:?} to xe (control characters)")]
    BadArg(String),
    #[error("cannot tell which host this is from {path}: {why}")]
    Inventory { path: PathBuf, why: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A VM's pool-wide assignment as other-config holds it; `None` where a key
/// is absent (the config defaults apply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub pool: PoolId,
    pub priority: Priority,
    pub vm_id: u32,
    pub max_queued: Option<u32>,
    pub gpu_mem_quota_mib: Option<u64>,
}

impl Assignment {
    /// The other-config values `apply` writes: every key, priority by name.
    pub fn to_keys(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (KEY_POOL, self.pool.to_string()),
            (KEY_PRIORITY, self.priority.as_str().to_string()),
            (KEY_VM_ID, self.vm_id.to_string()),
        ];
        if let Some(n) = self.max_queued {
            v.push((KEY_MAX_QUEUED, n.to_string()));
        }
        if let Some(q) = self.gpu_mem_quota_mib {
            v.push((KEY_QUOTA, q.to_string()));
        }
        v
    }

    /// Parses the vgpu keys of one VM (exact values, no trimming): `None`
    /// when it has none, an error when they are incomplete or malformed.
    pub fn from_keys(uuid: &VmUuid, keys: &BTreeMap<String, String>) -> Result<Option<Self>> {
        if keys.is_empty() {
            return Ok(None);
        }
        let get = |key: &'static str| -> Result<&str> {
            keys.get(key).map(String::as_str).ok_or(Error::Incomplete {
                uuid: uuid.clone(),
                key,
            })
        };
        let bad = |key: &'static str, value: &str, why: &'static str| Error::BadKey {
            uuid: uuid.clone(),
            key,
            value: value.to_string(),
            why,
        };
        let pool = get(KEY_POOL)?;
        let pool = match pool.as_bytes() {
            [c @ b'A'..=b'Z'] => PoolId::new(*c).map_err(|_| bad(KEY_POOL, pool, "A-Z"))?,
            _ => return Err(bad(KEY_POOL, pool, "one letter A-Z")),
        };
        let prio = get(KEY_PRIORITY)?;
        let priority = match prio {
            "0" | "low" => Priority::Low,
            "1" | "medium" => Priority::Medium,
            "2" | "high" => Priority::High,
            _ => return Err(bad(KEY_PRIORITY, prio, "low, medium, high or 0-2")),
        };
        let id = get(KEY_VM_ID)?;
        let vm_id = digits::<u32>(id)
            .filter(|&v| v > 0)
            .ok_or_else(|| bad(KEY_VM_ID, id, "1-4294967295"))?;
        let max_queued = match keys.get(KEY_MAX_QUEUED) {
            Some(s) => Some(
                digits::<u32>(s)
                    .filter(|&v| v > 0)
                    .ok_or_else(|| bad(KEY_MAX_QUEUED, s, "1-4294967295"))?,
            ),
            None => None,
        };
        let gpu_mem_quota_mib = match keys.get(KEY_QUOTA) {
            Some(s) => Some(
                digits::<u64>(s)
                    .filter(|&v| i64::try_from(v).is_ok())
                    .ok_or_else(|| bad(KEY_QUOTA, s, "a number of MiB"))?,
            ),
            None => None,
        };
        Ok(Some(Assignment {
            pool,
            priority,
            vm_id,
            max_queued,
            gpu_mem_quota_mib,
        }))
    }
}

/// Decimal digits only (no sign, blanks or leading zeros), in range.
fn digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    let ok =
        !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.parse().ok()).flatten()
}

/// One VM of the pool, the vgpu keys it holds (read and confirmed) and
/// the host it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XapiVm {
    pub uuid: VmUuid,
    pub keys: BTreeMap<String, String>,
    /// `resident_on`: the host that runs it, `None` when it runs nowhere
    /// (halted, or starting: xapi sets it after the vm-pre-start hook). A
    /// host UUID from `xe`, a host ref from the JSON-RPC API; compared with
    /// this host's in the same form.
    pub resident_on: Option<String>,
}

impl XapiVm {
    /// Whether this host serves the VM: every VM that runs here or nowhere
    /// (so that its start on any host finds its socket), none that runs on
    /// another host. `xe` and the event stream decide alike, so
    /// `sync --from-xapi` and `follow-xapi` never undo each other.
    pub fn served_by(&self, this_host: &str) -> bool {
        self.resident_on.as_deref().is_none_or(|h| h == this_host)
    }
}

/// What `xe` prints for a null reference (xapi's `Record_util` "nid").
const XE_NULL: &str = "<not in database>";

/// Where XCP-ng says which host this is (`INSTALLATION_UUID`); the
/// environment variable overrides it (tests).
pub const INVENTORY: &str = "/etc/xensource-inventory";
pub const INVENTORY_ENV: &str = "VGPU_XENSOURCE_INVENTORY";

/// This host's UUID, from the inventory's `INSTALLATION_UUID='U'` line.
pub fn this_host_uuid() -> Result<String> {
    let path = std::env::var_os(INVENTORY_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(INVENTORY));
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Inventory {
        path: path.clone(),
        why: e.to_string(),
    })?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("INSTALLATION_UUID="))
        .find_map(|v| v.trim_matches(['\'', '"']).parse::<VmUuid>().ok())
        .map(|u| u.to_string())
        .ok_or(Error::Inventory {
            path,
            why: "no INSTALLATION_UUID line with a UUID".into(),
        })
}

/// The `xe` program.
pub struct Xe {
    program: PathBuf,
}

impl Xe {
    /// `xe` from PATH.
    pub fn from_path() -> Result<Xe> {
        let path_var = std::env::var_os("PATH");
        super::scan::find_on_path("xe", path_var.as_deref())
            .map(Xe::new)
            .ok_or(Error::NoXe)
    }

    pub fn new(program: impl AsRef<Path>) -> Xe {
        Xe {
            program: program.as_ref().to_path_buf(),
        }
    }

    /// Runs `xe ARGS...` (no shell) and returns its stdout.
    fn run(&self, args: &[String]) -> Result<String> {
        // xe sends its arguments to xapi one per line: a newline would split one.
        if let Some(a) = args.iter().find(|a| a.chars().any(char::is_control)) {
            return Err(Error::BadArg(a.clone()));
        }
        let out = Command::new(&self.program)
            .args(args)
            .output()
            .map_err(|source| Error::Run {
                tool: self.program.clone(),
                source,
            })?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            let mut stderr = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            if stderr.len() > STDERR_MAX {
                let mut end = STDERR_MAX;
                while !stderr.is_char_boundary(end) {
                    end -= 1;
                }
                stderr.truncate(end);
                stderr.push_str("...");
            }
            return Err(Error::Failed {
                command: args.join(" "),
                status: out.status,
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run_strs(&self, args: &[&str]) -> Result<String> {
        self.run(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// UUIDs of `vm-list` with these filters, from its `--minimal` output.
    fn list_uuids(&self, filters: &[String]) -> Result<Vec<VmUuid>> {
        let mut args = vec!["vm-list".to_string()];
        args.extend(filters.iter().cloned());
        args.push("params=uuid".into());
        args.push("--minimal".into());
        let text = self.run(&args)?;
        let line = text.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            return Ok(Vec::new());
        }
        line.split(',')
            .map(|u| {
                u.parse().map_err(|_| Error::Output {
                    command: args.join(" "),
                    text: text.clone(),
                })
            })
            .collect()
    }

    /// The VM that `spec` names: a UUID, else a name-label (exactly one VM,
    /// not the control domain, not a template).
    pub fn find_vm(&self, spec: &str) -> Result<VmUuid> {
        if let Ok(uuid) = spec.parse::<VmUuid>() {
            let found = self.list_uuids(&[format!("uuid={uuid}")])?;
            return match found.as_slice() {
                [u] if *u == uuid => Ok(uuid),
                _ => Err(Error::NoSuchUuid(uuid)),
            };
        }
        if spec.is_empty() || spec.chars().any(char::is_control) {
            return Err(Error::BadName(spec.to_string()));
        }
        let found = self.list_uuids(&[
            format!("name-label={spec}"),
            "is-control-domain=false".into(),
        ])?;
        match found.as_slice() {
            [] => Err(Error::NoSuchName(spec.to_string())),
            [u] => Ok(u.clone()),
            many => Err(Error::AmbiguousName {
                name: spec.to_string(),
                count: many.len(),
                uuids: many
                    .iter()
                    .map(VmUuid::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// `platform:device-model-args` of a VM, `None` if it has none.
    pub fn dm_args(&self, uuid: &VmUuid) -> Result<Option<String>> {
        self.map_key(uuid, "platform", DM_ARGS_KEY)
    }

    /// One key of one of a VM's maps; `None` if absent.
    fn map_key(&self, uuid: &VmUuid, map: &str, key: &str) -> Result<Option<String>> {
        match self.run(&[
            "vm-param-get".into(),
            format!("uuid={uuid}"),
            format!("param-name={map}"),
            format!("param-key={key}"),
        ]) {
            Ok(v) => Ok(Some(v.strip_suffix('\n').unwrap_or(&v).to_string())),
            // xapi: Failure "Key K not found in map" (cli_operations.ml p_get)
            Err(Error::Failed { stderr, .. })
                if stderr.contains(&format!("Key {key} not found in map")) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Every VM of the pool (not templates) with its vgpu keys and host.
    pub fn vgpu_vms(&self) -> Result<Vec<XapiVm>> {
        const FIELDS: [&str; 2] = ["resident-on", "other-config"];
        let uuids = self.list_uuids(&[])?;
        let args = ["vm-list", "params=uuid,resident-on,other-config"];
        let text = self.run_strs(&args)?;
        let records = parse_records(&text);
        // A record is attributed to its VM only when the listing's records
        // are exactly the VMs, in order, each with one of each field: a
        // value with a newline could otherwise fake a record or a field.
        let attributed = records.len() == uuids.len()
            && records.iter().zip(&uuids).all(|(r, u)| {
                r.first().map(|(k, v)| (k.as_str(), v.as_str())) == Some(("uuid", u.as_str()))
                    && FIELDS
                        .iter()
                        .all(|f| r.iter().filter(|(k, _)| k == f).count() == 1)
            });
        if !attributed {
            log::warn!("xe vm-list output is ambiguous; reading each VM's fields on their own");
        }
        let mut out = Vec::new();
        for (i, uuid) in uuids.iter().enumerate() {
            let field = |name: &str| -> Result<String> {
                match (attributed, records.get(i)) {
                    (true, Some(r)) => Ok(r
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()),
                    _ => self
                        .run(&[
                            "vm-param-get".into(),
                            format!("uuid={uuid}"),
                            format!("param-name={name}"),
                        ])
                        .map(|v| v.trim_end_matches('\n').to_string()),
                }
            };
            let keys = self.confirmed_keys(uuid, &field("other-config")?)?;
            let host = field("resident-on")?;
            let resident_on = match host.as_str() {
                XE_NULL | "" => None,
                h => match h.parse::<VmUuid>() {
                    Ok(host) => Some(host.to_string()),
                    Err(_) => {
                        return Err(Error::Output {
                            command: format!("vm-param-get uuid={uuid} param-name=resident-on"),
                            text: host,
                        })
                    }
                },
            };
            out.push(XapiVm {
                uuid: uuid.clone(),
                keys,
                resident_on,
            });
        }
        Ok(out)
    }

    /// The vgpu keys of one VM whose other-config printed as `map_text`:
    /// confirmed with one filtered vm-list, else read key by key.
    fn confirmed_keys(&self, uuid: &VmUuid, map_text: &str) -> Result<BTreeMap<String, String>> {
        let seen = vgpu_candidates(map_text);
        if seen.is_empty() {
            // Every real key is printed as "KEY: VALUE"; none there, none set.
            return Ok(BTreeMap::new());
        }
        if seen.values().all(|v| v.len() == 1) {
            let mut filters = vec![format!("uuid={uuid}")];
            filters.extend(
                seen.iter()
                    .map(|(k, v)| format!("other-config:{k}={}", v[0])),
            );
            if self.list_uuids(&filters)? == [uuid.clone()] {
                return Ok(seen
                    .into_iter()
                    .map(|(k, mut v)| (k, v.remove(0)))
                    .collect());
            }
        }
        log::warn!("VM {uuid}: other-config text is ambiguous; reading the vgpu keys one by one");
        let mut keys = BTreeMap::new();
        for key in KEYS {
            if let Some(v) = self.map_key(uuid, "other-config", key)? {
                keys.insert(key.to_string(), v);
            }
        }
        Ok(keys)
    }

    /// `xe vm-param-set uuid=U K=V...` in one call.
    pub fn set(&self, uuid: &VmUuid, pairs: &[(String, String)]) -> Result<()> {
        let mut args = vec!["vm-param-set".to_string(), format!("uuid={uuid}")];
        args.extend(pairs.iter().map(|(k, v)| format!("{k}={v}")));
        self.run(&args).map(drop)
    }

    /// `xe vm-param-remove uuid=U param-name=MAP param-key=KEY`.
    pub fn remove(&self, uuid: &VmUuid, map: &str, key: &str) -> Result<()> {
        self.run(&[
            "vm-param-remove".into(),
            format!("uuid={uuid}"),
            format!("param-name={map}"),
            format!("param-key={key}"),
        ])
        .map(drop)
    }
}

/// The records of a non-minimal `xe ...-list`: blocks of `NAME (TAG): VALUE`
/// lines (the first padded on the right, the others on the left). A line
/// that is no field header continues the value before it (a value with a
/// newline).
pub fn parse_records(text: &str) -> Vec<Vec<(String, String)>> {
    let mut records: Vec<Vec<(String, String)>> = Vec::new();
    let mut blank_run = 0usize;
    for line in text.lines() {
        if let Some((name, value)) = field_header(line) {
            if name == "uuid" || records.is_empty() {
                records.push(Vec::new());
            }
            if let Some(r) = records.last_mut() {
                r.push((name.to_string(), value.to_string()));
            }
            blank_run = 0;
            continue;
        }
        // xe ends every record with two empty lines; inside a value they
        // are part of it (kept once the next text line shows they were).
        if line.is_empty() {
            blank_run += 1;
            continue;
        }
        if let Some((_, v)) = records.last_mut().and_then(|r| r.last_mut()) {
            for _ in 0..blank_run {
                v.push('\n');
            }
            v.push('\n');
            v.push_str(line);
        }
        blank_run = 0;
    }
    records
}

/// `("other-config", "a: b")` from `"   other-config (MRW): a: b"`.
fn field_header(line: &str) -> Option<(&str, &str)> {
    let (head, value) = match line.split_once(": ") {
        Some(hv) => hv,
        None => (line.strip_suffix(':')?, ""),
    };
    let head = head.trim();
    let (name, tag) = head.split_once(' ')?;
    let tag_ok = matches!(
        tag,
        "( RO)" | "( RW)" | "(MRO)" | "(MRW)" | "(SRO)" | "(SRW)"
    );
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    (tag_ok && name_ok).then_some((name, value))
}

/// Candidate values of each vgpu key in a map as xe prints it
/// (`k1: v1; k2: v2`, nothing escaped): every `KEY: VALUE` segment whose
/// key is one of [`KEYS`], up to the next "; ".
fn vgpu_candidates(map_text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for seg in map_text.split("; ") {
        // A segment may start after a newline inside another key's value.
        for piece in seg.split('\n') {
            if let Some((k, v)) = piece.split_once(": ") {
                if KEYS.contains(&k) {
                    out.entry(k.to_string()).or_default().push(v.to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e";

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn records_of_a_listing() {
        let text = "uuid ( RO)            : 9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e\n\
                    \x20   other-config (MRW): vgpu-pool: A; note: two\n\nlines\n\n\n\
                    uuid ( RO)            : 0e8f4a2b-7c3d-4e5f-9a1b-2c3d4e5f6a7b\n\
                    \x20   other-config (MRW): \n\n\n";
        let r = parse_records(text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0][0], ("uuid".to_string(), U1.to_string()));
        assert_eq!(r[0][1].1, "vgpu-pool: A; note: two\n\nlines");
        assert_eq!(r[1][1], ("other-config".to_string(), String::new()));
        assert_eq!(
            field_header("name-label ( RW): a: b"),
            Some(("name-label", "a: b"))
        );
        assert_eq!(field_header("note: two"), None);
        assert_eq!(field_header("Uuid ( RO): x"), None);
    }

    #[test]
    fn candidates_see_every_segment() {
        let c = vgpu_candidates("vgpu-pool: A; x: 1; vgpu-vm-id: 3");
        assert_eq!(c["vgpu-pool"], ["A"]);
        assert_eq!(c["vgpu-vm-id"], ["3"]);
        // A value that imitates a key gives a second candidate (then the
        // keys are read one by one).
        let c = vgpu_candidates("note: a; vgpu-pool: Z; vgpu-pool: A");
        assert_eq!(c["vgpu-pool"], ["Z", "A"]);
        let c = vgpu_candidates("note: a\nvgpu-priority: high");
        assert_eq!(c["vgpu-priority"], ["high"]);
        assert!(vgpu_candidates("").is_empty());
        assert!(vgpu_candidates("xvgpu-pool: A; vgpu-poolx: B").is_empty());
    }

    #[test]
    fn assignment_keys_round_trip_and_checks() {
        let u: VmUuid = U1.parse().unwrap();
        assert_eq!(Assignment::from_keys(&u, &BTreeMap::new()).unwrap(), None);
        let a = Assignment::from_keys(
            &u,
            &keys(&[
                ("vgpu-pool", "B"),
                ("vgpu-priority", "high"),
                ("vgpu-vm-id", "3"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (a.pool.to_string(), a.priority, a.vm_id),
            ("B".to_string(), Priority::High, 3)
        );
        assert_eq!((a.max_queued, a.gpu_mem_quota_mib), (None, None));
        let full = Assignment {
            max_queued: Some(8),
            gpu_mem_quota_mib: Some(0),
            ..a
        };
        let written: BTreeMap<String, String> = full
            .to_keys()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(Assignment::from_keys(&u, &written).unwrap(), Some(full));
        let good = [
            ("vgpu-pool", "B"),
            ("vgpu-priority", "2"),
            ("vgpu-vm-id", "3"),
        ];
        for (key, value) in [
            ("vgpu-pool", "b"),
            ("vgpu-pool", "AB"),
            ("vgpu-pool", " A"),
            ("vgpu-priority", "urgent"),
            ("vgpu-priority", "High"),
            ("vgpu-vm-id", "0"),
            ("vgpu-vm-id", "03"),
            ("vgpu-vm-id", "+3"),
            ("vgpu-vm-id", "4294967296"),
            ("vgpu-max-queued", "0"),
            ("vgpu-gpu-mem-quota-mib", "-1"),
            ("vgpu-gpu-mem-quota-mib", "18446744073709551615"),
        ] {
            let mut k = keys(&good);
            k.insert(key.to_string(), value.to_string());
            let e = Assignment::from_keys(&u, &k).unwrap_err();
            assert!(matches!(e, Error::BadKey { .. }), "{key}={value}: {e}");
        }
        let e = Assignment::from_keys(&u, &keys(&[("vgpu-vm-id", "3")])).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Incomplete {
                    key: "vgpu-pool",
                    ..
                }
            ),
            "{e}"
        );
    }
}
