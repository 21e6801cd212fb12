//! `apply`, `unapply` and `sync`: a VM's vgpu assignment in XCP-ng's pool
//! database (XAPI) and this host's SQLite database.
//!
//! XAPI is the source of truth on an XCP-ng pool: `apply` publishes this
//! host's record of a VM there (`other-config:vgpu-*` and the
//! `platform:device-model-args` the qemu-wrapper reads), `unapply` takes it
//! off, and `sync --from-xapi` (run by the vm-pre-start hook on whichever
//! host starts the VM) makes the local VM table equal to what XAPI holds;
//! the daemon follows the local database. Every command checks everything
//! (reads only) before it writes anything.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::cli::Error;
use super::qemu;
use super::store::{Assigned, Replaced, Store, VmRecord, VmRef, VmUuid};
use super::xapi::{Assignment, XapiVm, Xe, DM_ARGS_KEY, KEYS, KEY_VM_ID};
use crate::config::VmDefaults;

/// What a VM's XAPI record should hold for this host's record of it.
fn wanted(vm: &VmRecord, socket_dir: &Path) -> Result<Vec<(String, String)>, Error> {
    let args = qemu::qemu_args(vm, socket_dir, None, true)?;
    let mut pairs = vec![(format!("platform:{DM_ARGS_KEY}"), args.one_line())];
    let a = Assignment {
        pool: vm.pool,
        priority: vm.priority,
        vm_id: vm.vm_id,
        max_queued: Some(vm.max_queued),
        gpu_mem_quota_mib: Some(vm.gpu_mem_quota_mib),
    };
    pairs.extend(
        a.to_keys()
            .into_iter()
            .map(|(k, v)| (format!("other-config:{k}"), v)),
    );
    Ok(pairs)
}

/// An argument vector as a person would type it (for --dry-run).
fn shown(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty()
                || a.chars()
                    .any(|c| c.is_whitespace() || "'\"\\$`;&|<>()*?".contains(c))
            {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn xapi_entry<'a>(all: &'a [XapiVm], uuid: &VmUuid) -> Option<&'a XapiVm> {
    all.iter().find(|x| &x.uuid == uuid)
}

/// `apply VM` / `apply --all`: writes what each VM needs into XAPI.
pub fn apply(
    store: &Store,
    out: &mut dyn Write,
    socket_dir: &Path,
    vm: Option<&str>,
    dry_run: bool,
) -> Result<(), Error> {
    let xe = Xe::from_path()?;
    let records: Vec<VmRecord> = match vm {
        Some(spec) => {
            let uuid = xe.find_vm(spec)?;
            match store.find_vm(&VmRef::Uuid(uuid.clone())) {
                Ok(r) => vec![r],
                Err(super::store::Error::UnknownVm(_)) => {
                    return Err(Error::NotRegistered(uuid, spec.to_string()))
                }
                Err(e) => return Err(e.into()),
            }
        }
        None => {
            let all = store.vms()?;
            for r in &all {
                xe.find_vm(r.uuid.as_str())?;
            }
            all
        }
    };
    let pool = xe.vgpu_vms()?;
    // Plan everything before writing anything.
    let mut plans: Vec<(&VmRecord, Vec<(String, String)>)> = Vec::new();
    for rec in &records {
        // A holder that this run rewrites too is no conflict (vm_ids swapped).
        if let Some(other) = pool.iter().find(|x| {
            x.uuid != rec.uuid
                && x.keys.get(KEY_VM_ID) == Some(&rec.vm_id.to_string())
                && !records.iter().any(|r| r.uuid == x.uuid)
        }) {
            return Err(Error::PoolVmIdTaken {
                vm_id: rec.vm_id,
                uuid: rec.uuid.clone(),
                holder: other.uuid.clone(),
            });
        }
        let current_keys = xapi_entry(&pool, &rec.uuid)
            .map(|x| x.keys.clone())
            .unwrap_or_default();
        let current_dm = xe.dm_args(&rec.uuid)?;
        let changes: Vec<(String, String)> = wanted(rec, socket_dir)?
            .into_iter()
            .filter(|(k, v)| {
                let now = match k.split_once(':') {
                    Some(("platform", _)) => current_dm.as_ref(),
                    Some((_, key)) => current_keys.get(key),
                    None => None,
                };
                now != Some(v)
            })
            .collect();
        plans.push((rec, changes));
    }
    if dry_run {
        writeln!(out, "dry run: nothing is written")?;
    }
    for (rec, changes) in &plans {
        let who = format!("{} ({}, vm_id {})", rec.uuid, rec.label(), rec.vm_id);
        if changes.is_empty() {
            writeln!(out, "{who}: XAPI already up to date")?;
            continue;
        }
        let names: Vec<&str> = changes.iter().map(|(k, _)| k.as_str()).collect();
        if dry_run {
            let mut argv = vec![
                "xe".to_string(),
                "vm-param-set".into(),
                format!("uuid={}", rec.uuid),
            ];
            argv.extend(changes.iter().map(|(k, v)| format!("{k}={v}")));
            writeln!(out, "{who}: would run {}", shown(&argv))?;
        } else {
            xe.set(&rec.uuid, changes)?;
            writeln!(out, "{who}: set {}", names.join(", "))?;
        }
    }
    if !dry_run
        && plans
            .iter()
            .any(|(_, c)| c.iter().any(|(k, _)| k.starts_with("platform:")))
    {
        writeln!(out, "device-model-args take effect when the VM next starts")?;
    }
    Ok(())
}

/// `unapply VM` / `unapply --all`: removes vgpu's keys from XAPI (the local
/// database is left alone; `sync --from-xapi` or `remove-vm` drops it here).
pub fn unapply(
    store: &Store,
    out: &mut dyn Write,
    vm: Option<&str>,
    dry_run: bool,
) -> Result<(), Error> {
    let xe = Xe::from_path()?;
    let pool = xe.vgpu_vms()?;
    let uuids: Vec<VmUuid> = match vm {
        Some(spec) => vec![xe.find_vm(spec)?],
        None => {
            let mut u: Vec<VmUuid> = pool
                .iter()
                .filter(|x| !x.keys.is_empty())
                .map(|x| x.uuid.clone())
                .collect();
            for r in store.vms()? {
                if xapi_entry(&pool, &r.uuid).is_some() && !u.contains(&r.uuid) {
                    u.push(r.uuid);
                }
            }
            u
        }
    };
    let mut plans: Vec<(VmUuid, Vec<(&str, &str)>)> = Vec::new();
    for uuid in uuids {
        let mut remove: Vec<(&str, &str)> = Vec::new();
        if xe.dm_args(&uuid)?.is_some() {
            remove.push(("platform", DM_ARGS_KEY));
        }
        if let Some(x) = xapi_entry(&pool, &uuid) {
            for key in KEYS {
                if x.keys.contains_key(key) {
                    remove.push(("other-config", key));
                }
            }
        }
        plans.push((uuid, remove));
    }
    if dry_run {
        writeln!(out, "dry run: nothing is written")?;
    }
    for (uuid, remove) in &plans {
        if remove.is_empty() {
            writeln!(out, "{uuid}: no vgpu keys in XAPI")?;
            continue;
        }
        let names: Vec<String> = remove.iter().map(|(m, k)| format!("{m}:{k}")).collect();
        if dry_run {
            writeln!(out, "{uuid}: would remove {}", names.join(", "))?;
            continue;
        }
        for (map, key) in remove {
            xe.remove(uuid, map, key)?;
        }
        writeln!(out, "{uuid}: removed {}", names.join(", "))?;
    }
    Ok(())
}

/// The assignments XAPI holds, every field resolved (absent optional keys
/// take the defaults of config/vgpu.toml).
pub fn assignments(pool: &[XapiVm]) -> Result<Vec<Assigned>, Error> {
    let d = VmDefaults::embedded()?;
    let mut out = Vec::new();
    for x in pool {
        let keys: BTreeMap<String, String> = x.keys.clone();
        if let Some(a) = Assignment::from_keys(&x.uuid, &keys)? {
            out.push(Assigned {
                uuid: x.uuid.clone(),
                vm_id: a.vm_id,
                pool: a.pool,
                priority: a.priority,
                max_queued: a
                    .max_queued
                    .unwrap_or(u32::try_from(d.max_queued).unwrap_or(u32::MAX)),
                gpu_mem_quota_mib: a.gpu_mem_quota_mib.unwrap_or(d.gpu_mem_quota_mib),
            });
        }
    }
    Ok(out)
}

/// `sync --from-xapi`: the local VM table becomes what XAPI holds.
/// Returns whether the database changed.
pub fn sync_from_xapi(
    store: &mut Store,
    out: &mut dyn Write,
    dry_run: bool,
) -> Result<bool, Error> {
    let xe = Xe::from_path()?;
    let here = super::xapi::this_host_uuid()?;
    let served: Vec<XapiVm> = xe
        .vgpu_vms()?
        .into_iter()
        .filter(|v| v.served_by(&here))
        .collect();
    let target = assignments(&served)?;
    let r = store.replace_vms(&target, dry_run)?;
    if dry_run {
        writeln!(out, "dry run: nothing is written")?;
    }
    print_replaced(out, &r, dry_run)?;
    Ok(!dry_run && !r.is_empty())
}

pub(super) fn print_replaced(
    out: &mut dyn Write,
    r: &Replaced,
    dry_run: bool,
) -> Result<(), Error> {
    let (add, upd, rem) = if dry_run {
        ("would add", "would update", "would remove")
    } else {
        ("added", "updated", "removed")
    };
    for v in &r.added {
        writeln!(
            out,
            "{add} {} as vm_id {} (pool {}, priority {})",
            v.uuid, v.vm_id, v.pool, v.priority
        )?;
    }
    for c in &r.updated {
        let (b, a) = (&c.before, &c.after);
        let mut parts = Vec::new();
        let mut diff = |what: &str, old: String, new: String| {
            if old != new {
                parts.push(format!("{what} {old} -> {new}"));
            }
        };
        diff("vm_id", b.vm_id.to_string(), a.vm_id.to_string());
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
        let name = a
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        writeln!(out, "{upd} {}{name}: {}", a.uuid, parts.join(", "))?;
    }
    for v in &r.removed {
        let name = v
            .name
            .as_deref()
            .map(|n| format!("{n}, "))
            .unwrap_or_default();
        writeln!(
            out,
            "{rem} {} ({name}vm_id {}): no vgpu keys in XAPI",
            v.uuid, v.vm_id
        )?;
    }
    writeln!(out, "{} VMs unchanged", r.unchanged)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_shows_a_typable_command() {
        let argv: Vec<String> = [
            "xe",
            "vm-param-set",
            "platform:device-model-args=-chardev socket,id=vgpu3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            shown(&argv),
            "xe vm-param-set 'platform:device-model-args=-chardev socket,id=vgpu3'"
        );
        assert_eq!(shown(&["it's".to_string()]), "'it'\\''s'");
    }
}
