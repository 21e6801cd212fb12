//! The real `vgpu-admin` binary on temporary databases.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use rusqlite::types::Value;
use serde_json::Value as Json;

const BIN: &str = env!("CARGO_BIN_EXE_vgpu-admin");
const U1: &str = "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e";
const U2: &str = "0e8f4a2b-7c3d-4e5f-9a1b-2c3d4e5f6a7b";
const U3: &str = "c4d5e6f7-1a2b-4c3d-8e9f-0a1b2c3d4e5f";

struct Env {
    dir: tempfile::TempDir,
    path_var: Option<String>,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            path_var: None,
        }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("lib/vgpu.db")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("VGPU_DB", self.db())
            .env("VGPU_SOCKET_DIR", self.socket_dir())
            .env_remove("VGPU_CONTROL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        if let Some(p) = &self.path_var {
            c.env("PATH", p);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Json {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// Every row of both tables, as text.
    fn dump(&self) -> Vec<String> {
        let conn = rusqlite::Connection::open(self.db()).unwrap();
        let mut rows = Vec::new();
        for sql in [
            "SELECT * FROM pools ORDER BY id",
            "SELECT * FROM vms ORDER BY uuid",
        ] {
            let mut st = conn.prepare(sql).unwrap();
            let n = st.column_count();
            let mut q = st.query([]).unwrap();
            while let Some(r) = q.next().unwrap() {
                let cells: Vec<Value> = (0..n).map(|i| r.get(i).unwrap()).collect();
                rows.push(format!("{cells:?}"));
            }
        }
        rows
    }

    /// A directory of stand-in tools, used as the start of PATH.
    fn stand_in(&mut self, tool: &str, script: &str) {
        let bin = self.dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let path = bin.join(tool);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        self.path_var = Some(format!("{}:/usr/bin:/bin", bin.display()));
    }
}

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn full_session() {
    let env = Env::new();
    let out = env.ok(&["init"]);
    assert!(out.contains("ready (schema version 3)"), "{out}");
    assert!(env.db().is_file());
    env.ok(&[
        "register-vm",
        U1,
        "--pool",
        "A",
        "--priority",
        "high",
        "--name",
        "web-1",
    ]);
    let out = env.ok(&[
        "register-vm",
        U2,
        "--pool",
        "b",
        "--priority",
        "low",
        "--max-queued",
        "8",
    ]);
    assert_eq!(
        out,
        format!("registered {U2} as vm_id 2 (pool B, priority low)\n")
    );

    let list = env.ok(&["list-vms"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("VM_ID  NAME   UUID"), "{list}");
    assert!(
        lines[1].starts_with(&format!("1      web-1  {U1}  A     0    high")),
        "{list}"
    );
    assert!(
        lines[2].starts_with(&format!("2      -      {U2}  B     0    low")),
        "{list}"
    );

    let show = env.ok(&["show-vm", "web-1"]);
    assert!(show.contains("priority:          high (2)"), "{show}");

    assert_eq!(
        env.ok(&["set-pool", U1, "B"]),
        "web-1 (vm_id 1): pool A -> B\n"
    );
    assert_eq!(
        env.ok(&["set-priority", "2", "medium"]),
        format!("{U2} (vm_id 2): priority low -> medium\n")
    );
    let out = env.ok(&["set-vm-id", "web-1", "7", "--yes"]);
    assert!(out.starts_with("web-1 (vm_id 7): vm_id 1 -> 7\n"), "{out}");
    assert_eq!(
        env.ok(&[
            "update-vm",
            "2",
            "--name",
            "db-1",
            "--gpu-mem-quota-mib",
            "1024"
        ]),
        format!("db-1 (vm_id 2): name (none) -> db-1, gpu_mem_quota_mib 4096 -> 1024\n")
    );

    env.ok(&[
        "pool-add",
        "C",
        "--name",
        "Pool C",
        "--gpu",
        "1",
        "--description",
        "second H100",
    ]);
    assert_eq!(
        env.ok(&["pool-set-gpu", "B", "1"]),
        "pool B: GPU 0 -> 1 (2 VMs)\n"
    );
    let pools = env.ok(&["pool-list"]);
    assert!(
        pools.contains("C     Pool C  1    0    second H100"),
        "{pools}"
    );

    let args = env.ok(&["qemu-args", "7", "--memory", "4G"]);
    let sock = env.socket_dir().join("vm7.sock");
    assert_eq!(
        args,
        format!(
            "-object memory-backend-memfd,id=vgpu-mem,size=4G,share=on \\\n\
             -machine memory-backend=vgpu-mem \\\n\
             -chardev socket,id=vgpu7,path={} \\\n\
             -device vhost-user-vgpu-pci,id=vgpu7,chardev=vgpu7 \\\n\
             -device vgpu-stub,vgpu=vgpu7,pool_id=B,priority=2,vm_id=7\n",
            sock.display()
        )
    );
    let xen = env.ok(&["qemu-args", "db-1", "--xcp-ng"]);
    assert!(
        xen.contains(&format!(
            "xe vm-param-set uuid={U2} platform:device-model-args=\"-chardev socket,id=vgpu2,"
        )),
        "{xen}"
    );
    assert!(!xen.contains("memory-backend"), "{xen}");

    let status = env.ok(&["status"]);
    assert!(status.contains("daemon: not running ("), "{status}");
    assert!(status.contains("db-1"), "{status}");

    assert_eq!(env.ok(&["remove-vm", "db-1"]), "removed db-1 (vm_id 2)\n");
    let left = env.json(&["list-vms", "--json"]);
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert_eq!(left[0]["vm_id"], 7);
}

/// Each bad command: non-zero exit, one line on stderr, nothing changed.
#[test]
fn bad_input_changes_nothing() {
    let env = Env::new();
    env.ok(&["init"]);
    env.ok(&[
        "register-vm",
        U1,
        "--pool",
        "A",
        "--priority",
        "1",
        "--name",
        "web-1",
    ]);
    env.ok(&["register-vm", U2, "--pool", "B", "--priority", "2"]);
    let before = env.dump();
    let cases: &[(&[&str], &str)] = &[
        (
            &["register-vm", U3, "--pool", "Q", "--priority", "1"],
            "unknown pool 'Q'",
        ),
        (
            &["register-vm", U3, "--pool", "A", "--priority", "7"],
            "invalid priority '7'",
        ),
        (
            &[
                "register-vm",
                U3,
                "--pool",
                "A",
                "--priority",
                "1",
                "--vm-id",
                "2",
            ],
            "vm_id 2 is already used",
        ),
        (
            &["register-vm", U1, "--pool", "A", "--priority", "1"],
            "already registered",
        ),
        (
            &[
                "register-vm",
                "9b2c6f1e-4a7d-4c1b-8e3f",
                "--pool",
                "A",
                "--priority",
                "1",
            ],
            "malformed UUID",
        ),
        (
            &[
                "register-vm",
                U3,
                "--pool",
                "A",
                "--priority",
                "1",
                "--name",
                "web-1",
            ],
            "name 'web-1' is already used",
        ),
        (
            &["register-vm", U3, "--pool", "AB", "--priority", "1"],
            "invalid pool 'AB'",
        ),
        (&["register-vm", U3, "--pool", "A"], "--priority"),
        (&["show-vm", "nosuch"], "unknown VM 'nosuch'"),
        (&["set-pool", "nosuch", "B"], "unknown VM 'nosuch'"),
        (&["set-pool", "web-1", "Z"], "unknown pool 'Z'"),
        (&["set-priority", "1", "7"], "invalid priority '7'"),
        (&["set-priority", "99", "high"], "unknown VM '99'"),
        (
            &["set-vm-id", "web-1", "2", "--yes"],
            "vm_id 2 is already used",
        ),
        (&["set-vm-id", "web-1", "5"], "needs a VM restart"),
        (&["set-vm-id", "web-1", "0", "--yes"], "out of range"),
        (&["update-vm", "web-1"], "nothing to change"),
        (
            &["update-vm", "web-1", "--max-queued", "0"],
            "max_queued must be at least 1",
        ),
        (&["remove-vm", U3], "unknown VM"),
        (
            &["pool-add", "A", "--name", "again", "--gpu", "0"],
            "pool A already exists",
        ),
        (&["pool-set-gpu", "Q", "1"], "unknown pool 'Q'"),
        (
            &["qemu-args", "web-1", "--memory", "lots"],
            "invalid memory size",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, expect) in cases {
        let out = env.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("vgpu-admin: error: "),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty() || args[0] == "qemu-args", "{args:?}");
        assert_eq!(env.dump(), before, "{args:?} changed the database");
    }
}

/// 16 registers and 4 set-priority at once, on a database that does not
/// exist yet: every command succeeds and the result is consistent.
#[test]
fn parallel_commands_stay_consistent() {
    let env = Arc::new(Env::new());
    let uuid = |i: usize| format!("{i:08x}-0000-4000-8000-000000000000");
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let env = Arc::clone(&env);
            std::thread::spawn(move || {
                let u = uuid(i % 16);
                let out = if i < 16 {
                    env.run(&["register-vm", &u, "--pool", "A", "--priority", "low"])
                } else {
                    // Retry until the VM it targets has been registered.
                    loop {
                        let out = env.run(&["set-priority", &u, "high"]);
                        if out.status.success()
                            || !String::from_utf8_lossy(&out.stderr).contains("unknown VM")
                        {
                            break out;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                };
                (i, out)
            })
        })
        .collect();
    for t in threads {
        let (i, out) = t.join().unwrap();
        assert!(
            out.status.success(),
            "command {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let vms = env.json(&["list-vms", "--json"]);
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 16);
    let mut ids: Vec<u64> = vms.iter().map(|v| v["vm_id"].as_u64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (1..=16).collect::<Vec<u64>>());
    let high = vms.iter().filter(|v| v["priority"] == 2).count();
    assert_eq!(high, 4);
    let conn = rusqlite::Connection::open(env.db()).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let fk: i64 = conn
        .query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(fk, 0);
}

#[test]
fn json_outputs_parse() {
    let env = Env::new();
    env.ok(&[
        "register-vm",
        U1,
        "--pool",
        "B",
        "--priority",
        "high",
        "--vm-id",
        "42",
        "--name",
        "web-1",
    ]);
    let vm = env.json(&["show-vm", "42", "--json"]);
    assert_eq!(vm["uuid"], U1);
    assert_eq!(vm["name"], "web-1");
    assert_eq!(vm["pool"], "B");
    assert_eq!(vm["priority"], 2);
    assert_eq!(vm["max_queued"], 64);
    assert_eq!(vm["gpu_mem_quota_mib"], 4096);
    let pools = env.json(&["pool-list", "--json"]);
    assert_eq!(pools[1]["id"], "B");
    assert_eq!(pools[1]["vm_count"], 1);
    let list = env.json(&["list-vms", "--json", "--pool", "A"]);
    assert_eq!(list, Json::Array(vec![]));
    let status = env.json(&["status", "--json"]);
    assert_eq!(status["daemon"]["running"], false);
    assert_eq!(status["vms"][0]["vm_id"], 42);
    assert_eq!(status["vms"][0]["live"], Json::Null);
    let q = env.json(&["qemu-args", "web-1", "--json", "--xcp-ng"]);
    assert_eq!(
        q["args"][5],
        "vgpu-stub,vgpu=vgpu42,pool_id=B,priority=2,vm_id=42"
    );
    assert!(q["xe_command"]
        .as_str()
        .unwrap()
        .starts_with("xe vm-param-set"));
}

/// A stand-in daemon: answers `status` with fixed figures and `reload` with
/// ok, and records every request line.
fn fake_daemon(socket_dir: &Path) -> Arc<Mutex<Vec<String>>> {
    std::fs::create_dir_all(socket_dir).unwrap();
    let listener = UnixListener::bind(socket_dir.join("control.sock")).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let reply = if line.contains("status") {
                r#"{"ok":true,"vms":[{"vm_id":1,"connected":true,"queued":3,"in_flight":1,"done":123,"wait_p50_ns":1500,"wait_p99_ns":2500000},{"vm_id":9,"connected":true,"queued":0,"in_flight":0,"done":5,"wait_p50_ns":0,"wait_p99_ns":0}]}"#
            } else {
                r#"{"ok":true}"#
            };
            let _ = writeln!(&conn, "{reply}");
            log.lock().unwrap().push(line.trim().to_string());
        }
    });
    seen
}

#[test]
fn status_with_live_daemon_and_reload_after_changes() {
    let env = Env::new();
    env.ok(&[
        "register-vm",
        U1,
        "--pool",
        "A",
        "--priority",
        "high",
        "--name",
        "web-1",
    ]);
    env.ok(&["register-vm", U2, "--pool", "B", "--priority", "low"]);
    let seen = fake_daemon(&env.socket_dir());

    let status = env.ok(&["status"]);
    assert!(
        status.contains("daemon: running, 2 of 2 VMs connected"),
        "{status}"
    );
    let row = status.lines().find(|l| l.contains("web-1")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[8..],
        ["yes", "3", "1", "123", "1.5us", "2.5ms"],
        "{status}"
    );
    let row = status.lines().find(|l| l.starts_with("2 ")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[8..], ["no", "-", "-", "-", "-", "-"], "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("9 ") && l.contains("(not in database)")),
        "{status}"
    );

    let json = env.json(&["status", "--json"]);
    assert_eq!(json["daemon"]["running"], true);
    assert_eq!(json["vms"][0]["live"]["done"], 123);
    assert_eq!(json["unknown_live"][0]["vm_id"], 9);

    // Every change is followed by a reload; reads are not.
    env.ok(&["set-priority", "web-1", "low"]);
    env.ok(&["pool-set-gpu", "A", "1"]);
    env.ok(&["list-vms"]);
    // A --control path overrides the socket directory's.
    let other = env.dir.path().join("nowhere.sock");
    env.ok(&[
        "--control",
        other.to_str().unwrap(),
        "set-priority",
        "web-1",
        "high",
    ]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            r#"{"op":"status"}"#,
            r#"{"op":"status"}"#,
            r#"{"op":"reload"}"#,
            r#"{"op":"reload"}"#
        ]
    );
}

#[test]
fn no_daemon_is_quiet_unless_verbose() {
    let env = Env::new();
    let out = env.run(&["register-vm", U1, "--pool", "A", "--priority", "0"]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty());
    let out = env.run(&["-v", "set-priority", U1, "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("vgpu-admin: note: no daemon to reload"),
        "{stderr}"
    );
}

const XE_SCRIPT: &str = r#"#!/bin/sh
case "$*" in
  "vm-list is-control-domain=false is-a-snapshot=false params=uuid,name-label,power-state") cat "SAMPLE" ;;
  *) echo "xe: unexpected arguments: $*" >&2; exit 1 ;;
esac
"#;

#[test]
fn scan_vms_with_xe() {
    let mut env = Env::new();
    env.stand_in("xe", &XE_SCRIPT.replace("SAMPLE", &data("xe-vm-list.txt")));
    // Test-1 in pool A, Test-2 in pool B; one registered VM is not on the host.
    env.ok(&[
        "register-vm",
        "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e",
        "--pool",
        "A",
        "--priority",
        "high",
    ]);
    env.ok(&[
        "register-vm",
        "0e8f4a2b-7c3d-4e5f-9a1b-2c3d4e5f6a7b",
        "--pool",
        "B",
        "--priority",
        "low",
    ]);
    env.ok(&[
        "register-vm",
        "11111111-2222-4333-8444-555555555555",
        "--pool",
        "B",
        "--priority",
        "low",
        "--name",
        "gone",
    ]);

    let out = env.ok(&["scan-vms"]);
    assert!(out.starts_with("hypervisor: XCP-ng (xe), 4 VMs\n"), "{out}");
    let section = |title: &str| -> String {
        let start = out
            .find(title)
            .unwrap_or_else(|| panic!("no {title} in {out}"));
        let rest = &out[start..];
        rest[..rest.find("\n\n").unwrap_or(rest.len())].to_string()
    };
    let a = section("pool A (Pool A, GPU 0)");
    assert!(
        a.contains("registered  1      high      9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e  Test-1"),
        "{out}"
    );
    let b = section("pool B (Pool B, GPU 0)");
    assert!(b.contains("Test-2") && b.contains("halted"), "{out}");
    let free = section("not in any pool");
    assert!(
        free.contains("ubuntu 22.04: build box") && free.contains("win10-gpu"),
        "{out}"
    );
    assert!(!free.contains("Test-"), "{out}");
    let missing = section("registered but not on this host");
    assert!(
        missing.contains("11111111-2222-4333-8444-555555555555 (gone, pool B)"),
        "{out}"
    );

    let json = env.json(&["scan-vms", "--json"]);
    assert_eq!(json["hypervisor"], "xcpng");
    assert_eq!(json["vms"].as_array().unwrap().len(), 4);
    assert_eq!(json["vms"][0]["registered"]["vm_id"], 1);
    assert_eq!(json["vms"][2]["registered"], Json::Null);
    assert_eq!(json["missing"][0]["name"], "gone");
}

#[test]
fn scan_vms_with_virsh() {
    let mut env = Env::new();
    let script = format!(
        r#"#!/bin/sh
case "$1" in
  list) [ "$2" = "--all" ] || exit 1; cat "{}" ;;
  domuuid)
    case "$3" in
      debian12) echo 8c3b1f0e-2d4a-4b6c-9e8f-7a6b5c4d3e2f ;;
      win-11) echo 5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d ;;
      "test vm 3") echo 2b3c4d5e-6f70-4182-93a4-b5c6d7e8f901 ;;
      ubuntu22.04) echo 7d6c5b4a-3928-4716-a5b4-c3d2e1f0a9b8 ;;
      *) echo "error: failed to get domain '$3'" >&2; exit 1 ;;
    esac
    echo ;;
  *) exit 1 ;;
esac
"#,
        data("virsh-list-all.txt")
    );
    env.stand_in("virsh", &script);
    env.ok(&[
        "register-vm",
        "8c3b1f0e-2d4a-4b6c-9e8f-7a6b5c4d3e2f",
        "--pool",
        "B",
        "--priority",
        "medium",
    ]);
    let out = env.ok(&["scan-vms"]);
    assert!(
        out.starts_with("hypervisor: libvirt (virsh), 4 VMs\n"),
        "{out}"
    );
    assert!(
        out.contains("pool A (Pool A, GPU 0)\n  (no VMs on this host)"),
        "{out}"
    );
    assert!(
        out.contains(
            "registered  1      medium    8c3b1f0e-2d4a-4b6c-9e8f-7a6b5c4d3e2f  debian12   running"
        ),
        "{out}"
    );
    assert!(
        out.contains("2b3c4d5e-6f70-4182-93a4-b5c6d7e8f901  test vm 3"),
        "{out}"
    );
    let json = env.json(&["scan-vms", "--json"]);
    assert_eq!(json["vms"][2]["power_state"], "shut off");
}

#[test]
fn scan_vms_errors_are_one_line() {
    let mut env = Env::new();
    env.stand_in(
        "xe",
        "#!/bin/sh\necho 'The server could not be contacted.' >&2\necho more >&2\nexit 1\n",
    );
    let out = env.run(&["scan-vms"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("The server could not be contacted."),
        "{stderr}"
    );

    // Neither tool: PATH holds only an empty directory.
    let empty = env.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    env.path_var = Some(empty.display().to_string());
    let out = env.run(&["scan-vms"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "vgpu-admin: error: neither xe (XCP-ng) nor virsh (libvirt) found on PATH\n"
    );
}
