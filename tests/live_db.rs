//! The daemon serving from a vgpu-admin database and following it live:
//! `vgpu-admin` changes reach the scheduler and the guest's config space
//! (with a config-change notification) without a restart.

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vgpu::protocol::*;
use vgpu_sim::{SimGuest, SimOptions};

const UUID1: &str = "11111111-1111-4111-8111-111111111111";
const UUID2: &str = "22222222-2222-4222-8222-222222222222";
const UUID3: &str = "33333333-3333-4333-8333-333333333333";

struct Db {
    child: Child,
    dir: tempfile::TempDir,
}

impl Db {
    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("vgpu.db")
    }
    fn admin(&self, args: &[&str]) -> Output {
        admin(&self.db(), self.dir.path(), args)
    }
    fn guest(&self, id: u32) -> SimGuest {
        let opts = SimOptions {
            backend_channel: true,
            ..Default::default()
        };
        SimGuest::connect_retry(&vgpu::config::vm_socket(self.dir.path(), id), opts, T)
            .expect("connect")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("vgpu.db");
    admin(&db, dir.path(), &["init"]);
    admin(
        &db,
        dir.path(),
        &[
            "register-vm",
            UUID1,
            "--pool",
            "A",
            "--priority",
            "high",
            "--name",
            "one",
        ],
    );
    admin(
        &db,
        dir.path(),
        &[
            "register-vm",
            UUID2,
            "--pool",
            "B",
            "--priority",
            "medium",
            "--name",
            "two",
        ],
    );
    let child = Command::new(env!("CARGO_BIN_EXE_vgpu-vhost-user"))
        .args(["--executor", "cpu", "--db"])
        .arg(&db)
        .arg("--socket-dir")
        .arg(dir.path())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&dir.path().join("control.sock"));
    Db { child, dir }
}

fn word(cfg: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(cfg[off..off + 4].try_into().unwrap())
}

#[test]
fn set_priority_changes_scheduling_and_config_space_live() {
    let d = start();
    let mut one = d.guest(1);
    let mut two = d.guest(2);
    let cfg = one.config_space().unwrap();
    assert_eq!(
        (
            word(&cfg, CFG_POOL_ID),
            word(&cfg, CFG_PRIORITY),
            word(&cfg, CFG_VM_ID)
        ),
        (b'A' as u32, 2, 1)
    );

    d.admin(&["set-priority", "one", "low"]);
    one.wait_config_change(T)
        .expect("config-change notification");
    let cfg = one.config_space().unwrap();
    assert_eq!(word(&cfg, CFG_PRIORITY), 0, "guest sees the new priority");
    d.admin(&["set-pool", UUID1, "B"]);
    one.wait_config_change(T).unwrap();
    assert_eq!(word(&one.config_space().unwrap(), CFG_POOL_ID), b'B' as u32);

    // Scheduling follows at once: vm1 (now low) queues first, vm2 (medium)
    // second, both behind a busy wait; vm2 is dispatched first.
    let busy = ReqHdr::new(Opcode::BusyWait as u16, 0, 8);
    let b = two
        .submit(5, &busy, &busy_payload(Duration::from_millis(800)), 0)
        .unwrap();
    two.kick().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let h1 = one
        .submit(0, &ReqHdr::new(Opcode::Ping as u16, 1, 0), &[], 0)
        .unwrap();
    one.kick().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let h2 = two
        .submit(0, &ReqHdr::new(Opcode::Ping as u16, 2, 0), &[], 0)
        .unwrap();
    two.kick().unwrap();
    one.wait_all(&[h1], T).unwrap();
    two.wait_all(&[h2, b], T).unwrap();
    let s1 = one.response(0, 0, 0).unwrap().0.dispatch_seq;
    let s2 = two.response(0, 0, 0).unwrap().0.dispatch_seq;
    assert!(s2 < s1, "medium vm2 ({s2}) before now-low vm1 ({s1})");

    // A request already queued moves with its VM: raise vm1 while it waits.
    let b = two
        .submit(5, &busy, &busy_payload(Duration::from_millis(800)), 0)
        .unwrap();
    two.kick().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let h2 = two
        .submit(0, &ReqHdr::new(Opcode::Ping as u16, 3, 0), &[], 0)
        .unwrap();
    two.kick().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let h1 = one
        .submit(0, &ReqHdr::new(Opcode::Ping as u16, 4, 0), &[], 0)
        .unwrap();
    one.kick().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    d.admin(&["set-priority", "1", "high"]);
    one.wait_all(&[h1], T).unwrap();
    two.wait_all(&[h2, b], T).unwrap();
    let s1 = one.response(0, 0, 0).unwrap().0.dispatch_seq;
    let s2 = two.response(0, 0, 0).unwrap().0.dispatch_seq;
    assert!(s1 < s2, "re-prioritised vm1 ({s1}) before vm2 ({s2})");
}

#[test]
fn registered_vms_get_sockets_and_removed_ones_lose_them() {
    let d = start();
    let sock3 = d.dir.path().join("vm3.sock");
    assert!(!sock3.exists());
    d.admin(&[
        "register-vm",
        UUID3,
        "--pool",
        "A",
        "--priority",
        "low",
        "--vm-id",
        "3",
    ]);
    let mut three = SimGuest::connect_retry(&sock3, SimOptions::default(), T).unwrap();
    assert_eq!(word(&three.config_space().unwrap(), CFG_VM_ID), 3);
    let (h, out) = three
        .call(Opcode::ScalarAddI32 as u16, 1, &add_payload(100, 200), 4)
        .unwrap();
    assert_eq!((h.status, out), (0, 300i32.to_le_bytes().to_vec()));

    // Live figures through the control socket.
    let out = d.admin(&["status", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"done\""), "status has live figures: {text}");

    d.admin(&["remove-vm", UUID3]);
    let deadline = Instant::now() + T;
    while sock3.exists() {
        assert!(Instant::now() < deadline, "removed VM's socket stays");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(three);
    // The other VMs are untouched.
    let mut one = d.guest(1);
    assert_eq!(ping(&mut one).status, 0);
}

/// Names of the daemon's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if let Ok(n) = std::fs::read_to_string(e.path().join("comm")) {
            names.push(n.trim().to_string());
        }
    }
    names
}

/// Waits until the daemon has exactly `n` threads called `name`.
fn wait_threads(pid: u32, name: &str, n: usize) {
    let deadline = Instant::now() + T;
    loop {
        let have = thread_names(pid).iter().filter(|t| *t == name).count();
        if have == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{have} threads {name}, not {n}: {:?}",
            thread_names(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A VM removed while a request runs and registered again under the same
/// vm_id (so the same socket path) before it drained: the request is
/// answered, the new socket stays and serves, and the old VM's socket
/// thread ends. Also for a VM nobody was connected to.
#[test]
fn a_vm_registered_again_while_it_drains_keeps_its_new_socket() {
    let d = start();
    let pid = d.child.id();
    let register = || {
        d.admin(&[
            "register-vm",
            UUID3,
            "--pool",
            "A",
            "--priority",
            "low",
            "--vm-id",
            "3",
        ])
    };
    register();
    let sock3 = d.dir.path().join("vm3.sock");
    let mut three = SimGuest::connect_retry(&sock3, SimOptions::default(), T).unwrap();
    let busy = ReqHdr::new(Opcode::BusyWait as u16, 9, 8);
    let b = three
        .submit(0, &busy, &busy_payload(Duration::from_millis(1500)), 0)
        .unwrap();
    three.kick().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Both changes reach the daemon before the busy wait ends (vgpu-admin
    // asks it to reload after each).
    d.admin(&["remove-vm", UUID3]);
    register();
    let used = three.wait_all(&[b], T).expect("the in-flight request");
    assert_eq!(used.len(), 1);
    assert_eq!(three.response(0, 8, 0).unwrap().0.status, Status::Ok as u32);
    // The old VM hangs up once drained and its socket thread ends; the
    // new VM's thread and socket stay.
    drop(three);
    wait_threads(pid, "vgpu-vm3", 1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(sock3.exists(), "the new VM's socket was removed");
    let mut again = SimGuest::connect_retry(&sock3, SimOptions::default(), T).unwrap();
    assert_eq!(ping(&mut again).status, 0);
    assert_eq!(word(&again.config_space().unwrap(), CFG_VM_ID), 3);
    drop(again);

    // The frontend went away with a request running: the old VM drains
    // with nobody connected while its thread waits for a frontend, and is
    // woken (it used to wait forever: the wake-up connected to the path,
    // which by then was the new VM's socket).
    let mut four = SimGuest::connect_retry(&sock3, SimOptions::default(), T).unwrap();
    four.submit(0, &busy, &busy_payload(Duration::from_millis(1500)), 0)
        .unwrap();
    four.kick().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(four);
    d.admin(&["remove-vm", UUID3]);
    register();
    wait_threads(pid, "vgpu-vm3", 1);
    wait_threads(pid, "vgpu-relay3", 0);
    let mut last = SimGuest::connect_retry(&sock3, SimOptions::default(), T).unwrap();
    assert_eq!(ping(&mut last).status, 0);
}

fn guest_of(sock: &std::path::Path, mib: usize) -> vgpu_sim::Result<SimGuest> {
    SimGuest::connect(
        sock,
        SimOptions {
            mem_size: mib << 20,
            ..Default::default()
        },
    )
}

/// `--max-guest-memory-mib` of vgpu-admin: a VM's own bound on the guest
/// memory its frontend may share, followed live (a connected frontend now
/// past it is disconnected); `default` goes back to the daemon's
/// max_guest_memory_mib. Mistakes change nothing.
#[test]
fn a_per_vm_guest_memory_bound_is_followed_live() {
    let d = start();
    d.admin(&[
        "register-vm",
        UUID3,
        "--pool",
        "A",
        "--priority",
        "low",
        "--vm-id",
        "3",
        "--max-guest-memory-mib",
        "8",
    ]);
    let sock3 = vgpu::config::vm_socket(d.dir.path(), 3);
    wait_for(&sock3);
    assert!(guest_of(&sock3, 16).is_err(), "16 MiB under an 8 MiB bound");
    let mut three = guest_of(&sock3, 8).expect("8 MiB fits");
    assert_eq!(ping(&mut three).status, 0);

    // vm1 has the daemon's bound (1 TiB): 16 MiB is fine, until its own
    // bound drops to 8 MiB.
    let sock1 = vgpu::config::vm_socket(d.dir.path(), 1);
    let mut one = SimGuest::connect_retry(
        &sock1,
        SimOptions {
            mem_size: 16 << 20,
            ..Default::default()
        },
        T,
    )
    .unwrap();
    assert_eq!(ping(&mut one).status, 0);
    let out = d.admin(&["update-vm", "one", "--max-guest-memory-mib", "8"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("max_guest_memory default -> 8 MiB"), "{said}");
    let deadline = Instant::now() + T;
    while one.config_space().is_ok() {
        assert!(
            Instant::now() < deadline,
            "vm1 still connected past its bound"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(guest_of(&sock1, 16).is_err(), "16 MiB past vm1's new bound");
    let mut small = guest_of(&sock1, 8).expect("8 MiB fits");
    assert_eq!(ping(&mut small).status, 0);
    drop(small);
    d.admin(&["update-vm", "1", "--max-guest-memory-mib", "default"]);
    let mut big = guest_of(&sock1, 16).expect("the daemon's bound again");
    assert_eq!(ping(&mut big).status, 0);

    // Mistakes: one line, a failure status, the database unchanged.
    let show = |id: &str| d.admin(&["show-vm", id, "--json"]).stdout;
    let before = show("3");
    for bad in [
        vec!["update-vm", "3", "--max-guest-memory-mib", "0"],
        vec!["update-vm", "3", "--max-guest-memory-mib", "lots"],
        vec!["update-vm", "3", "--max-guest-memory-mib", "1099511627776"],
        vec!["update-vm", "3", "--max-guest-memory-mib"],
        vec![
            "register-vm",
            UUID3,
            "--pool",
            "A",
            "--priority",
            "low",
            "--max-guest-memory-mib",
            "-1",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vgpu-admin"))
            .arg("--db")
            .arg(d.db())
            .arg("--socket-dir")
            .arg(d.dir.path())
            .args(&bad)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{bad:?}: {err}");
    }
    assert_eq!(show("3"), before);
    let v: serde_json::Value = serde_json::from_slice(&before).unwrap();
    assert_eq!(v["max_guest_memory_mib"], 8);
}
