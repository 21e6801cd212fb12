//! `vgpu-admin follow-xapi`: this host's database kept equal to what XAPI
//! says this host serves, as XAPI changes.
//!
//! It is a command of vgpu-admin, run as its own service
//! (xen/systemd/vgpu-xapi-follow.service), not a thread of the daemon: the
//! daemon serves guests and only reads the database, which it already
//! follows; what XAPI says reaches it the way an operator's `set-priority`
//! does. A hung or restarting xapi (a toolstack restart, a master failover)
//! then never touches a guest's request path, and the daemon stays one
//! program for hosts with and without XAPI.
//!
//! The loop: log in on xapi's local socket, ask which host this is
//! (`session.get_this_host`), then `event.from(["vm"], token, timeout)`: the
//! first call (token "") gives every VM, each later one what changed since.
//! After each batch the VMs this host serves ([`XapiVm::served_by`]: those
//! running here or nowhere) become the VM table in one transaction
//! ([`Store::replace_vms`], as `sync --from-xapi` does): a priority set on any
//! pool member reaches this host's daemon within one event, a VM that starts
//! on another host leaves this one, a VM unapplied anywhere leaves every host.
//! Keys that do not parse change nothing and are logged, once until they
//! change; a lost xapi (or session, or event token) is retried with back-off,
//! starting again from a full listing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::cli::Error;
use super::store::{Store, VmUuid};
use super::xapi::{XapiVm, KEYS};
use super::xapi_rpc::{self, Client};

/// How long one `event.from` waits for a change (xapi's own callers use 30).
pub const DEFAULT_EVENT_TIMEOUT_S: f64 = 30.0;
/// The longest `--event-timeout-s`.
const MAX_EVENT_TIMEOUT_S: f64 = 3600.0;
/// How much longer than that the socket read waits before giving up.
const READ_SLACK: Duration = Duration::from_secs(15);
/// Login and `get_this_host`.
const CALL_WAIT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// xapi's null reference.
const NULL_REF: &str = "OpaqueRef:NULL";

/// `--event-timeout-s`: seconds, more than 0 and at most an hour.
pub fn parse_event_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_EVENT_TIMEOUT_S => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds in (0, {MAX_EVENT_TIMEOUT_S}]"
        )),
    }
}

pub struct Options {
    pub socket: PathBuf,
    pub event_timeout_s: f64,
    /// One full listing applied, then return (its error is the result).
    pub once: bool,
}

#[derive(Debug, Deserialize)]
struct Batch {
    events: Vec<Event>,
    token: String,
}

#[derive(Debug, Deserialize)]
struct Event {
    class: String,
    operation: String,
    #[serde(rename = "ref")]
    obj: String,
    #[serde(default)]
    snapshot: Option<Value>,
}

/// The fields of a VM record that decide what this host serves.
#[derive(Debug, Deserialize)]
struct VmSnapshot {
    uuid: String,
    #[serde(default)]
    is_a_template: bool,
    #[serde(default)]
    is_a_snapshot: bool,
    #[serde(default)]
    resident_on: Option<String>,
    #[serde(default)]
    other_config: BTreeMap<String, String>,
}

/// The pool's VMs as the events told them, by ref; a record that did not
/// read is kept as its error (it fails every reconcile until it changes).
#[derive(Debug, Default)]
pub struct Vms {
    by_ref: BTreeMap<String, std::result::Result<XapiVm, String>>,
}

impl Vms {
    fn apply(&mut self, events: Vec<Event>) {
        for ev in events {
            if ev.class != "vm" {
                continue;
            }
            match (ev.operation.as_str(), ev.snapshot) {
                ("del", _) => {
                    self.by_ref.remove(&ev.obj);
                }
                (_, Some(snap)) => match vm_of(snap) {
                    Ok(Some(vm)) => {
                        self.by_ref.insert(ev.obj, Ok(vm));
                    }
                    Ok(None) => {
                        self.by_ref.remove(&ev.obj);
                    }
                    Err(why) => {
                        self.by_ref.insert(ev.obj, Err(why));
                    }
                },
                // add/mod without a snapshot: nothing to learn from it.
                (_, None) => {}
            }
        }
    }

    /// The VMs `this_host` serves; an unreadable record is an error.
    fn served(&self, this_host: &str) -> Result<Vec<XapiVm>, Error> {
        let mut out = Vec::new();
        for (obj, vm) in &self.by_ref {
            match vm {
                Ok(vm) if vm.served_by(this_host) => out.push(vm.clone()),
                Ok(_) => {}
                Err(why) => {
                    return Err(Error::XapiRecord {
                        obj: obj.clone(),
                        why: why.clone(),
                    })
                }
            }
        }
        Ok(out)
    }
}

/// A VM of the pool from its record; `None` for templates and snapshots.
fn vm_of(snap: Value) -> std::result::Result<Option<XapiVm>, String> {
    let s: VmSnapshot = serde_json::from_value(snap).map_err(|e| e.to_string())?;
    let uuid: VmUuid = s.uuid.parse().map_err(|_| format!("uuid {:?}", s.uuid))?;
    if s.is_a_template || s.is_a_snapshot {
        return Ok(None);
    }
    let keys = s
        .other_config
        .into_iter()
        .filter(|(k, _)| KEYS.contains(&k.as_str()))
        .collect();
    let resident_on = s.resident_on.filter(|r| r != NULL_REF && !r.is_empty());
    Ok(Some(XapiVm {
        uuid,
        keys,
        resident_on,
    }))
}

/// Runs until killed (or, with `once`, for one listing).
pub fn follow(
    store: &mut Store,
    o: &Options,
    control: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let mut backoff = BACKOFF_MIN;
    let mut reported = None;
    loop {
        match session(store, o, control, out, &mut backoff, &mut reported) {
            Ok(()) => return Ok(()),
            Err(e) if o.once => return Err(e),
            Err(e) => {
                log::warn!("follow-xapi: {e}; again in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One xapi session: a full listing, then changes, until an error.
fn session(
    store: &mut Store,
    o: &Options,
    control: &Path,
    out: &mut dyn Write,
    backoff: &mut Duration,
    reported: &mut Option<String>,
) -> Result<(), Error> {
    let mut c = Client::new(&o.socket);
    let login = json!(["root", "", "1.0", "vgpu-admin follow-xapi"]);
    let session = text(c.call("session.login_with_password", login, CALL_WAIT)?)?;
    let host = text(c.call(
        "session.get_this_host",
        json!([session, session]),
        CALL_WAIT,
    )?)?;
    log::info!(
        "follow-xapi: following xapi at {} as host {host}",
        c.path().display()
    );
    let wait =
        Duration::try_from_secs_f64(o.event_timeout_s).unwrap_or(Duration::ZERO) + READ_SLACK;
    let mut vms = Vms::default();
    let mut token = String::new();
    loop {
        let params = json!([session, ["vm"], token, o.event_timeout_s]);
        let batch: Batch = serde_json::from_value(c.call("event.from", params, wait)?)
            .map_err(|e| xapi_rpc::Error::Malformed(format!("event.from: {e}")))?;
        token = batch.token;
        vms.apply(batch.events);
        *backoff = BACKOFF_MIN;
        let done = reconcile(store, &vms, &host, control, out);
        if o.once {
            // Best effort: the session would time out anyway.
            let _ = c.call("session.logout", json!([session]), CALL_WAIT);
            return done;
        }
        match done {
            Ok(()) => *reported = None,
            Err(e) => {
                let msg = e.to_string();
                if reported.as_deref() != Some(msg.as_str()) {
                    log::error!("follow-xapi: nothing changed: {msg}");
                    *reported = Some(msg);
                }
            }
        }
    }
}

fn text(v: Value) -> Result<String, Error> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(xapi_rpc::Error::Malformed(format!("expected a ref, got {other}")).into()),
    }
}

/// The VM table becomes what this host serves; changes are printed and
/// the daemon is told.
fn reconcile(
    store: &mut Store,
    vms: &Vms,
    host: &str,
    control: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let target = super::pool_wide::assignments(&vms.served(host)?)?;
    let r = store.replace_vms(&target, false)?;
    if !r.is_empty() {
        super::pool_wide::print_replaced(out, &r, false)?;
        out.flush()?;
        super::cli::notify_daemon(control);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e";
    const B: &str = "1f0e9d8c-7b6a-4a5b-9c8d-7e6f5a4b3c2d";

    fn ev(op: &str, obj: &str, snap: Option<Value>) -> Event {
        Event {
            class: "vm".into(),
            operation: op.into(),
            obj: obj.into(),
            snapshot: snap,
        }
    }

    fn snap(uuid: &str, resident: &str, prio: &str) -> Value {
        json!({"uuid": uuid, "is_a_template": false, "resident_on": resident,
               "power_state": "Running", "other_config": {
                   "vgpu-pool": "A", "vgpu-priority": prio, "vgpu-vm-id": "3",
                   "XenCenter.CustomFields.x": "y; vgpu-priority: high"}})
    }

    fn uuids(v: &[XapiVm]) -> Vec<&str> {
        v.iter().map(|x| x.uuid.as_str()).collect()
    }

    #[test]
    fn a_host_serves_vms_running_on_it_or_nowhere() {
        let mut vms = Vms::default();
        vms.apply(vec![
            ev("add", "OpaqueRef:a", Some(snap(A, "OpaqueRef:here", "low"))),
            ev(
                "add",
                "OpaqueRef:b",
                Some(snap(B, "OpaqueRef:there", "low")),
            ),
            ev(
                "add",
                "OpaqueRef:t",
                Some(json!({"uuid": A, "is_a_template": true})),
            ),
        ]);
        assert_eq!(uuids(&vms.served("OpaqueRef:here").unwrap()), [A]);
        assert_eq!(uuids(&vms.served("OpaqueRef:there").unwrap()), [B]);
        // B halts: every host serves it, ready for a start anywhere.
        vms.apply(vec![ev(
            "mod",
            "OpaqueRef:b",
            Some(snap(B, NULL_REF, "low")),
        )]);
        assert_eq!(uuids(&vms.served("OpaqueRef:here").unwrap()), [A, B]);
        vms.apply(vec![ev("del", "OpaqueRef:a", None)]);
        assert_eq!(uuids(&vms.served("OpaqueRef:here").unwrap()), [B]);
    }

    #[test]
    fn only_vgpu_keys_are_taken_and_typed_maps_cannot_be_forged() {
        let mut vms = Vms::default();
        vms.apply(vec![ev(
            "add",
            "OpaqueRef:a",
            Some(snap(A, NULL_REF, "low")),
        )]);
        let served = vms.served("OpaqueRef:h").unwrap();
        let keys: Vec<_> = served[0]
            .keys
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("vgpu-pool", "A"),
                ("vgpu-priority", "low"),
                ("vgpu-vm-id", "3")
            ]
        );
    }

    #[test]
    fn an_unreadable_record_fails_the_reconcile_until_it_changes() {
        let mut vms = Vms::default();
        let bad = json!({"uuid": A, "other_config": {"vgpu-pool": 7}});
        vms.apply(vec![ev("add", "OpaqueRef:a", Some(bad))]);
        let e = vms.served("OpaqueRef:h").unwrap_err().to_string();
        assert!(e.contains("OpaqueRef:a"), "{e}");
        vms.apply(vec![ev(
            "add",
            "OpaqueRef:x",
            Some(json!({"uuid": "not-a-uuid"})),
        )]);
        vms.apply(vec![ev(
            "mod",
            "OpaqueRef:a",
            Some(snap(A, NULL_REF, "high")),
        )]);
        assert!(
            vms.served("OpaqueRef:h").is_err(),
            "the bad uuid still fails"
        );
        vms.apply(vec![ev("del", "OpaqueRef:x", None)]);
        assert_eq!(uuids(&vms.served("OpaqueRef:h").unwrap()), [A]);
    }

    #[test]
    fn event_timeouts_are_bounded_numbers() {
        assert_eq!(parse_event_timeout("2"), Ok(2.0));
        for bad in ["0", "-1", "nan", "inf", "3601", "x", ""] {
            assert!(parse_event_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_batch_parses_from_xapis_shape() {
        let v = json!({"events": [{"id": "12", "timestamp": "20261203T00:00:00Z",
                       "class": "vm", "operation": "del", "ref": "OpaqueRef:a"}],
                       "valid_ref_counts": {"vm": 1}, "token": "12,0"});
        let b: Batch = serde_json::from_value(v).unwrap();
        assert_eq!((b.token.as_str(), b.events.len()), ("12,0", 1));
    }
}
