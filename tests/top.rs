//! `vgpu-admin top` used as a person would: in a terminal (tmux), against a
//! running daemon that simulated guests have sent requests to; the screen is
//! read back, keys are typed, and `q` and Ctrl-C must end it with status 0.
//! Needs tmux (Debian package `tmux`; .ci/run installs it).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{add_payload, daemon_binary, wait_for, T};
use vgpu::protocol::Opcode;
use vgpu_sim::{SimGuest, SimOptions};

fn admin_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vgpu-admin")
}

fn admin(dir: &Path, args: &[&str]) -> Output {
    common::admin(&dir.join("vgpu.db"), dir, args)
}

/// A tmux server of our own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        let found = Command::new("tmux").arg("-V").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "tmux is needed for this test (apt-get install tmux)"
        );
        Tmux {
            socket: format!("vgpu-top-test-{}", std::process::id()),
        }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    fn start(&self, session: &str, command: &str) {
        let out = self.cmd(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "110",
            "-y",
            "30",
            command,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn screen(&self, session: &str) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", session]).stdout).into()
    }

    fn keys(&self, session: &str, keys: &str) {
        assert!(self
            .cmd(&["send-keys", "-t", session, keys])
            .status
            .success());
    }

    /// Waits until `pred` holds for the screen; returns it.
    fn wait_screen(&self, session: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + T;
        loop {
            let s = self.screen(session);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "screen never showed {what}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// The words of the table row whose first cell is `first`, in the table
/// whose title is `title`.
fn row(screen: &str, title: &str, first: &str) -> Option<Vec<String>> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with(&format!("+{title}")))
        .skip(1)
        .take_while(|l| !l.starts_with('+'))
        .map(|l| {
            l.trim_matches(|c| c == '|' || c == ' ')
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .find(|w| w.first().map(String::as_str) == Some(first))
}

fn wait_exit_file(path: &Path) -> String {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.contains('\n') {
                return s.trim().to_string();
            }
        }
        assert!(Instant::now() < deadline, "top did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn top_command(dir: &Path, exit_file: &Path) -> String {
    format!(
        "{} --socket-dir {} top --interval-ms 200; echo TOP-EXIT=$? > {}; sleep 60",
        admin_bin(),
        dir.display(),
        exit_file.display()
    )
}

#[test]
fn top_shows_every_vm_and_gpu_and_quits_cleanly() {
    let tmux = Tmux::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    admin(d, &["init"]);
    admin(
        d,
        &[
            "register-vm",
            "11111111-1111-4111-8111-111111111111",
            "--pool",
            "A",
            "--priority",
            "high",
            "--name",
            "web",
        ],
    );
    admin(
        d,
        &[
            "register-vm",
            "22222222-2222-4222-8222-222222222222",
            "--pool",
            "B",
            "--priority",
            "low",
            "--name",
            "batch",
        ],
    );
    let _daemon = Daemon(
        Command::new(daemon_binary())
            .args(["--executor", "cpu", "--db"])
            .arg(d.join("vgpu.db"))
            .arg("--socket-dir")
            .arg(d)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the daemon"),
    );
    wait_for(&d.join("control.sock"));
    let connect = |id: u32| {
        SimGuest::connect_retry(&d.join(format!("vm{id}.sock")), SimOptions::default(), T)
            .expect("connect")
    };
    let mut g1 = connect(1);
    let mut g2 = connect(2);
    for i in 0..20 {
        g1.call(Opcode::Ping as u16, i, &[], 0).unwrap();
    }
    for i in 0..3 {
        g2.call(Opcode::ScalarAddI32 as u16, i, &add_payload(1, 2), 4)
            .unwrap();
    }
    // An undefined opcode: one error for vm2.
    assert_eq!(g2.call(0x7777, 9, &[], 0).unwrap().0.status, 2);

    let exit_file = d.join("top-exit");
    tmux.start("top", &top_command(d, &exit_file));
    let screen = tmux.wait_screen("top", "both VM rows", |s| {
        row(s, "VMs", "1").is_some() && row(s, "VMs", "2").is_some()
    });
    let vm1 = row(&screen, "VMs", "1").unwrap();
    let vm2 = row(&screen, "VMs", "2").unwrap();
    assert_eq!(vm1[..6], ["1", "A", "high", "yes", "0", "0"], "{screen}");
    assert_eq!(vm2[..6], ["2", "B", "low", "yes", "0", "0"], "{screen}");
    assert_eq!(
        vm1.last().map(String::as_str),
        Some("0"),
        "errors of vm1: {screen}"
    );
    assert_eq!(
        vm2.last().map(String::as_str),
        Some("1"),
        "errors of vm2: {screen}"
    );
    let gpu = row(&screen, "GPUs", "0").unwrap_or_else(|| panic!("no GPU row:\n{screen}"));
    assert!(gpu.join(" ").contains("CPU executor"), "{screen}");
    assert!(screen.contains("2 VMs, 1 GPUs"), "{screen}");
    assert!(screen.contains("sort: vm"), "{screen}");

    // Sorting by priority, then reversed: vm2 (low) comes first.
    tmux.keys("top", "s");
    tmux.keys("top", "s");
    tmux.wait_screen("top", "sort: priority", |s| s.contains("sort: priority"));
    tmux.keys("top", "r");
    let s = tmux.wait_screen("top", "reversed", |s| s.contains("(reversed)"));
    let order: Vec<usize> = ["1", "2"]
        .iter()
        .map(|id| {
            s.lines()
                .position(|l| {
                    l.trim_matches(|c| c == '|' || c == ' ')
                        .split_whitespace()
                        .next()
                        == Some(id)
                        && l.contains(if *id == "1" { "high" } else { "low" })
                })
                .unwrap_or(usize::MAX)
        })
        .collect();
    assert!(order[1] < order[0], "vm2 should be listed first:\n{s}");

    tmux.keys("top", "q");
    assert_eq!(wait_exit_file(&exit_file), "TOP-EXIT=0");
    // The terminal is back: the shell's next output is on the main screen.
    tmux.wait_screen("top", "the main screen", |s| !s.contains("vgpu top"));

    // Ctrl-C ends it cleanly too.
    let exit2 = d.join("top-exit2");
    tmux.start("top2", &top_command(d, &exit2));
    tmux.wait_screen("top2", "the VM table", |s| row(s, "VMs", "1").is_some());
    tmux.keys("top2", "C-c");
    assert_eq!(wait_exit_file(&exit2), "TOP-EXIT=0");
}

#[test]
fn top_once_prints_a_plain_table() {
    // No daemon: one line saying so, and still exit 0 with the headers.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(admin_bin())
        .arg("--socket-dir")
        .arg(dir.path())
        .args(["top", "--once", "--interval-ms", "50"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("daemon not reachable"), "{text}");
    assert!(text.contains("P99WAIT"), "{text}");
}
