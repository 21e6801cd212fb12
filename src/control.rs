//! The daemon's control socket: wire types, the server and the client.
//!
//! The daemon listens on a unix socket (mode 0600), by default
//! `/run/vgpu/control.sock` (`control.sock` in its `--socket-dir`). The
//! protocol is one JSON object per line in each direction:
//!
//! ```text
//! {"op":"reload"}  -> {"ok":true}
//! {"op":"status"}  -> {"ok":true,"vms":[{"vm_id":1,"connected":true,"queued":0,
//!                      "in_flight":0,"done":123,"wait_p50_ns":0,"wait_p99_ns":0,
//!                      "pool":"A","priority":"high","gpu":0,"errors":0,...}],
//!                      "gpus":[{"gpu":0,"executor":"cpu","queued":0,"busy_ns":0,...}]}
//! any failure      -> {"ok":false,"error":"..."}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default directory of the daemon's sockets (VM sockets and control socket).
pub const DEFAULT_SOCKET_DIR: &str = "/run/vgpu";
/// File name of the control socket inside the socket directory.
pub const SOCKET_NAME: &str = "control.sock";
/// How long the client waits for the daemon to read or answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest reply line the client accepts.
pub const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: bad reply: {detail}")]
    BadReply { path: PathBuf, detail: String },
    #[error("daemon refused: {0}")]
    Refused(String),
}

impl Error {
    /// True when nothing listens on the socket (no file, or connection refused).
    pub fn is_not_running(&self) -> bool {
        matches!(self, Error::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// A request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Re-read the database.
    Reload,
    /// Live figures per VM.
    Status,
}

/// Live figures of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub vm_id: u32,
    /// A frontend (QEMU) is connected to the VM's socket.
    pub connected: bool,
    /// Requests taken off the ring and waiting for the GPU.
    pub queued: u64,
    /// Requests dispatched and not yet completed.
    pub in_flight: u64,
    /// Requests completed since the daemon started.
    pub done: u64,
    /// Queue wait (ring to dispatch), median and 99th percentile.
    pub wait_p50_ns: u64,
    pub wait_p99_ns: u64,
    // Added for `vgpu-admin top` and the metrics; absent in older daemons'
    // replies, hence the defaults.
    /// Pool letter and priority name (`low`/`medium`/`high`).
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub priority: String,
    /// The GPU the VM's pool maps to.
    #[serde(default)]
    pub gpu: u32,
    /// Requests answered with a status other than OK (refused chains included).
    #[serde(default)]
    pub errors: u64,
    /// Times the VM reached its cap and its chains waited in the ring.
    #[serde(default)]
    pub backpressure: u64,
    #[serde(default)]
    pub max_queued: u64,
    /// Guest RAM of the current memory table (0 when not connected).
    #[serde(default)]
    pub guest_mem_bytes: u64,
    #[serde(default)]
    pub gpu_mem_quota_bytes: u64,
}

/// Live figures of one GPU (its queue and worker).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    pub gpu: u32,
    /// What the executor runs on (GET_INFO's name).
    #[serde(default)]
    pub executor: String,
    /// Requests waiting in the queue.
    #[serde(default)]
    pub queued: u64,
    /// Requests dispatched since the worker started.
    #[serde(default)]
    pub dispatched: u64,
    /// Time spent executing, since the worker started.
    #[serde(default)]
    pub busy_ns: u64,
    /// CUDA worker starts and faults, registered guest memory.
    #[serde(default, flatten)]
    pub counters: crate::executor::ExecutorCounters,
    /// Health (docs/gpu.md): ok, degraded, failed, recovering.
    #[serde(default)]
    pub state: String,
    /// Executors rebuilt after faults (config space `gpu_epoch`).
    #[serde(default)]
    pub epoch: u32,
    /// Executors ended by a fault or a panic.
    #[serde(default)]
    pub faults: u64,
    /// Attempts to build an executor after a fault (successful or not).
    #[serde(default)]
    pub recovery_attempts: u64,
    /// The last fault, empty if none.
    #[serde(default)]
    pub last_fault: String,
}

/// A reply line. `vms` is present in answers to `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<VmStatus>>,
    /// Present in answers to `status` from daemons that know it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<GpuStatus>>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    pub fn status(vms: Vec<VmStatus>, gpus: Vec<GpuStatus>) -> Self {
        Response {
            ok: true,
            vms: Some(vms),
            gpus: Some(gpus),
            ..Response::default()
        }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            vms: None,
            gpus: None,
        }
    }

    /// The line to send, with its `\n`.
    pub fn to_line(&self) -> String {
        // A struct of strings, numbers and bools always serialises.
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| r#"{"ok":false}"#.into());
        s.push('\n');
        s
    }
}

/// The control socket in a socket directory.
pub fn socket_path(socket_dir: &Path) -> PathBuf {
    socket_dir.join(SOCKET_NAME)
}

/// Sends one request and reads its reply, with [`DEFAULT_TIMEOUT`].
/// A reply with `"ok":false` is returned as [`Error::Refused`].
pub fn request(path: &Path, req: &Request) -> Result<Response, Error> {
    request_with_timeout(path, req, DEFAULT_TIMEOUT)
}

pub fn request_with_timeout(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, Error> {
    let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(|e| Error::BadReply {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io_err)?;

    let mut reply = String::new();
    BufReader::new((&stream).take(MAX_LINE))
        .read_line(&mut reply)
        .map_err(io_err)?;
    let bad = |detail: String| Error::BadReply {
        path: path.to_path_buf(),
        detail,
    };
    if !reply.ends_with('\n') {
        return Err(bad(if reply.is_empty() {
            "connection closed without an answer".into()
        } else {
            "reply line unterminated or too long".into()
        }));
    }
    let resp: Response = serde_json::from_str(&reply).map_err(|e| bad(e.to_string()))?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(Error::Refused(
            resp.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

/// Most control connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 16;

/// What the server asks of the daemon.
pub trait Handler: Send + Sync + 'static {
    /// Re-reads the configuration; the error is the one line the client shows.
    fn reload(&self) -> Result<(), String>;
    fn status(&self) -> Vec<VmStatus>;
    fn gpus(&self) -> Vec<GpuStatus> {
        Vec::new()
    }
}

/// Listens on `path` (created with mode 0600: the socket file never exists
/// with wider rights) and serves each client on a short-lived thread of its
/// own, so that a stuck client blocks nobody.
pub fn serve(path: &Path, handler: Arc<dyn Handler>) -> Result<(), Error> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    // SAFETY: umask only changes this process's file-creation mask; it is
    // restored right after the bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io_err)?;
    let live = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("vgpu-control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    live.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (handler, live) = (handler.clone(), live.clone());
                let spawned = std::thread::Builder::new()
                    .name("vgpu-control-conn".into())
                    .spawn(move || {
                        serve_conn(conn, handler.as_ref());
                        live.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    log::warn!("control socket: cannot start a connection thread");
                }
            }
        })
        .map_err(io_err)?;
    Ok(())
}

fn serve_conn(conn: UnixStream, handler: &dyn Handler) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let reader = BufReader::new(conn.take(MAX_LINE));
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Reload) => match handler.reload() {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(e),
            },
            Ok(Request::Status) => Response::status(handler.status(), handler.gpus()),
            Err(e) => Response::error(format!("bad request: {e}")),
        };
        if writer.write_all(resp.to_line().as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Fixed;
    impl Handler for Fixed {
        fn reload(&self) -> Result<(), String> {
            Err("database locked".into())
        }
        fn status(&self) -> Vec<VmStatus> {
            vec![VmStatus {
                vm_id: 4,
                done: 9,
                ..VmStatus::default()
            }]
        }
    }

    #[test]
    fn server_answers_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        super::serve(&path, Arc::new(Fixed)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let r = request(&path, &Request::Status).unwrap();
        assert_eq!(r.vms.unwrap()[0].done, 9);
        let e = request(&path, &Request::Reload).unwrap_err();
        assert_eq!(e.to_string(), "daemon refused: database locked");
        // A line that is no request gets an error line, not a hang-up.
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(b"{\"op\":\"reboot\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("bad request"), "{line}");
    }

    #[test]
    fn wire_format() {
        assert_eq!(
            serde_json::to_string(&Request::Reload).unwrap(),
            r#"{"op":"reload"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert_eq!(Response::ok().to_line(), "{\"ok\":true}\n");
        let r: Response = serde_json::from_str(
            r#"{"ok":true,"vms":[{"vm_id":1,"connected":true,"queued":0,"in_flight":0,"done":123,"wait_p50_ns":0,"wait_p99_ns":0}]}"#,
        )
        .unwrap();
        assert_eq!(r.vms.unwrap()[0].done, 123);
    }

    /// Serves `replies` (one per connection) and returns the request lines.
    fn serve(path: &Path, replies: Vec<String>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for reply in replies {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                got.push(line);
                (&s).write_all(reply.as_bytes()).unwrap();
            }
            got
        })
    }

    #[test]
    fn client_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let server = serve(
            &path,
            vec![
                Response::ok().to_line(),
                Response::error("busy").to_line(),
                "not json\n".into(),
                String::new(),
            ],
        );
        assert_eq!(request(&path, &Request::Reload).unwrap(), Response::ok());
        let e = request(&path, &Request::Status).unwrap_err();
        assert_eq!(e.to_string(), "daemon refused: busy");
        assert!(matches!(
            request(&path, &Request::Status),
            Err(Error::BadReply { .. })
        ));
        assert!(matches!(
            request(&path, &Request::Status),
            Err(Error::BadReply { .. })
        ));
        let lines = server.join().unwrap();
        assert_eq!(lines[0], "{\"op\":\"reload\"}\n");
        assert_eq!(lines[1], "{\"op\":\"status\"}\n");
    }

    #[test]
    fn no_daemon_and_silent_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let e = request(&path, &Request::Reload).unwrap_err();
        assert!(e.is_not_running(), "{e}");

        // Listening but never answering: the timeout ends the wait.
        let _listener = UnixListener::bind(&path).unwrap();
        let t = std::time::Instant::now();
        let e =
            request_with_timeout(&path, &Request::Status, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(!e.is_not_running());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
