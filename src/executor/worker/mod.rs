//! CUDA remoting in a worker process per VM. Measured on the H200: a guest
//! kernel that faults (CUDA_ERROR_ILLEGAL_ADDRESS) in its own CUDA context
//! poisons every context of the *process*. So each VM's remoting calls run
//! in a process of its own (`vgpu-cuda-worker`), started on the VM's first
//! remoting call. A fault or a timeout ends that process (the driver frees
//! its GPU memory); the next call starts a new one, with a new handle range
//! so that old handles stay NOT_FOUND.
//!
//! This module is the parent's side (finding, starting and calling a
//! worker); `server.rs` is the worker's main; `wire.rs` the pipe protocol.

mod server;
pub mod wire;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bytes::Writer;
use crate::executor::{Request, Tenant};
use crate::protocol::Status;

pub use server::worker_main;

/// Name of the worker binary, looked up next to the running executable.
pub const WORKER_BIN: &str = "vgpu-cuda-worker";
/// Environment variable naming the worker binary explicitly.
pub const WORKER_ENV: &str = "VGPU_CUDA_WORKER";
/// Handles of one worker generation: 2^24 per worker life.
const GENERATION_SHIFT: u32 = 24;
/// Extra time the parent waits beyond the execution limit before it kills a
/// worker that did not answer (the worker enforces the limit itself).
const GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("worker I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker did not answer in time")]
    Timeout,
    #[error("worker protocol: {0}")]
    Protocol(&'static str),
}

/// Finds the worker binary: `configured`, `$VGPU_CUDA_WORKER`, or next to
/// the running executable, or one directory up (cargo puts test binaries in
/// `deps/`).
pub fn worker_path(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(WORKER_ENV) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(WORKER_BIN), dir.parent()?.join(WORKER_BIN)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The parent's handle on one VM's worker process.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl Worker {
    pub fn spawn(
        path: &Path,
        gpu_index: u32,
        vm_id: u32,
        generation: u32,
    ) -> Result<Worker, Error> {
        let start = (u64::from(generation) << GENERATION_SHIFT) | 1;
        let mut child = Command::new(path)
            .arg(gpu_index.to_string())
            .arg(vm_id.to_string())
            .arg(start.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or(Error::Protocol("no stdin"))?;
        let stdout = child.stdout.take().ok_or(Error::Protocol("no stdout"))?;
        Ok(Worker {
            child,
            stdin,
            stdout,
        })
    }

    /// Sends one remoting call and waits for the answer until `deadline`.
    pub fn call(
        &mut self,
        req: &Request,
        tenant: Tenant,
        limit: Duration,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(Status, Vec<u8>), Error> {
        let limit_ms = u32::try_from(limit.as_millis()).unwrap_or(u32::MAX);
        wire::write_call(
            &mut self.stdin,
            req.opcode,
            limit_ms,
            tenant.gpu_mem_quota,
            payload,
            req.output.len(),
        )?;
        wait_readable(&self.stdout, deadline)?;
        Ok(wire::read_reply(&mut self.stdout, req.output.len())?)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The driver releases the process's GPU memory and kernels.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_readable(r: &ChildStdout, deadline: Instant) -> Result<(), Error> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout);
        }
        let mut pfd = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}

/// Per-VM bookkeeping of the parent.
#[derive(Default)]
pub struct VmWorker {
    worker: Option<Worker>,
    generation: u32,
}

impl VmWorker {
    /// Runs `req` in the VM's worker, starting one if needed. A DEVICE_ERROR
    /// or TIMEOUT answer, or a worker that dies or hangs, ends the worker.
    /// Returns the status and whether a worker was started.
    pub fn execute(
        &mut self,
        path: &Path,
        gpu_index: u32,
        tenant: Tenant,
        req: &Request,
        limit: Duration,
    ) -> (Result<u32, Status>, bool) {
        let vm = tenant.vm_id;
        let mut spawned = false;
        if self.worker.is_none() {
            if self.generation >= 1 << (32 - GENERATION_SHIFT) {
                return (Err(Status::NoResources), false);
            }
            match Worker::spawn(path, gpu_index, vm, self.generation) {
                Ok(w) => {
                    self.worker = Some(w);
                    self.generation += 1;
                    spawned = true;
                }
                Err(e) => {
                    log::error!("vm{vm}: cannot start CUDA worker: {e}");
                    return (Err(Status::NoResources), false);
                }
            }
        }
        let payload = match req.payload.to_vec() {
            Ok(p) => p,
            Err(_) => return (Err(Status::BadRequest), spawned),
        };
        let Some(w) = self.worker.as_mut() else {
            return (Err(Status::DeviceError), spawned);
        };
        let deadline = Instant::now() + limit + GRACE;
        let res = match w.call(req, tenant, limit, &payload, deadline) {
            Ok((Status::Ok, out)) => Writer::Guest(&req.output).write_output(&out),
            Ok((s, _)) => Err(s),
            Err(Error::Timeout) => {
                log::warn!("vm{vm}: CUDA worker did not answer in time; killed");
                Err(Status::Timeout)
            }
            Err(e) => {
                log::warn!("vm{vm}: CUDA worker failed: {e}");
                Err(Status::DeviceError)
            }
        };
        if matches!(res, Err(Status::DeviceError) | Err(Status::Timeout)) {
            log::warn!("vm{vm}: ending its CUDA worker; its handles are gone");
            self.worker = None;
        }
        (res, spawned)
    }
}
