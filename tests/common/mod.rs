//! Shared test plumbing: the real `vgpu-vhost-user` binary on temporary
//! sockets, and simulated guests (memfd RAM, split ring, eventfds) on them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vgpu::protocol::{Opcode, RespHdr};
use vgpu_sim::{SimGuest, SimOptions};

pub struct DaemonProc {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

/// The daemon binary: `$VGPU_DAEMON` (for test binaries run where cargo's
/// build directory does not exist, e.g. on a GPU machine), else cargo's.
pub fn daemon_binary() -> PathBuf {
    std::env::var_os("VGPU_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vgpu-vhost-user")))
}

impl DaemonProc {
    /// Starts the daemon with `vms` as (id, pool, priority) and extra args.
    pub fn start(vms: &[(u32, &str, &str)], extra: &[&str]) -> DaemonProc {
        DaemonProc::start_executor("cpu", vms, extra)
    }

    /// Same, with `--executor executor`.
    pub fn start_executor(executor: &str, vms: &[(u32, &str, &str)], extra: &[&str]) -> DaemonProc {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(daemon_binary());
        cmd.arg("--executor").arg(executor);
        for (id, pool, prio) in vms {
            let sock = vgpu::config::vm_socket(dir.path(), *id);
            cmd.arg("--vm").arg(format!(
                "id={id},pool={pool},priority={prio},socket={}",
                sock.display()
            ));
        }
        cmd.args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn vgpu-vhost-user");
        DaemonProc { child, dir }
    }

    pub fn socket(&self, id: u32) -> PathBuf {
        vgpu::config::vm_socket(self.dir.path(), id)
    }

    pub fn guest(&self, id: u32) -> SimGuest {
        self.guest_with(id, SimOptions::default())
    }

    pub fn guest_with(&self, id: u32, opts: SimOptions) -> SimGuest {
        SimGuest::connect_retry(&self.socket(id), opts, Duration::from_secs(20))
            .expect("connect to the daemon")
    }

    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn add_payload(a: i32, b: i32) -> Vec<u8> {
    let mut p = a.to_le_bytes().to_vec();
    p.extend_from_slice(&b.to_le_bytes());
    p
}

pub fn busy_payload(d: Duration) -> Vec<u8> {
    (d.as_nanos() as u64).to_le_bytes().to_vec()
}

pub fn ping(g: &mut SimGuest) -> RespHdr {
    g.call(Opcode::Ping as u16, 77, &[], 0).expect("ping").0
}

pub const T: Duration = Duration::from_secs(30);

/// Runs `vgpu-admin` on database `db` and socket directory `dir`; it must
/// succeed.
pub fn admin(db: &Path, dir: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_vgpu-admin"))
        .arg("--db")
        .arg(db)
        .arg("--socket-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vgpu-admin");
    assert!(
        out.status.success(),
        "vgpu-admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts the daemon with `--metrics-addr 127.0.0.1:0`; returns it with the
/// address it printed on its first line.
pub fn start_with_metrics(
    executor: &str,
    vms: &[(u32, &str, &str)],
    extra: &[&str],
) -> (DaemonProc, String) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(daemon_binary());
    cmd.args(["--executor", executor, "--metrics-addr", "127.0.0.1:0"]);
    for (id, pool, prio) in vms {
        let sock = vgpu::config::vm_socket(dir.path(), *id);
        cmd.arg("--vm").arg(format!(
            "id={id},pool={pool},priority={prio},socket={}",
            sock.display()
        ));
    }
    cmd.args(extra)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn vgpu-vhost-user");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the metrics line");
    let addr = line
        .trim()
        .strip_prefix("metrics: http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (DaemonProc { child, dir }, addr)
}

/// The value of the metric sample that starts with `prefix` (name and
/// labels, e.g. `vgpu_gpu_worker_pipe_bytes_total{gpu="0"}`).
pub fn scrape(addr: &str, prefix: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
}
