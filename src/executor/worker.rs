//! Process isolation of CUDA remoting. Measured on the H200: a guest kernel
//! that faults (CUDA_ERROR_ILLEGAL_ADDRESS) in its own CUDA context poisons
//! every context of the *process* — the other VMs' contexts, the executor's
//! own, and contexts created afterwards all report the error. So each VM's
//! remoting calls run in a worker process of its own (`vgpu-cuda-worker`),
//! started on the VM's first remoting call. A fault or a timeout ends that
//! process (the driver frees its GPU memory); the next call starts a new one,
//! with a new handle range so that old handles stay NOT_FOUND.
//!
//! Pipe protocol, little-endian. Request: le16 opcode, le16 0, le32 limit_ms,
//! le64 quota, le64 payload_len, le64 output_capacity, payload. Reply: le32
//! status, le32 0, le64 output_len, output.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{anonymous_memory, GuestBufs};
use crate::protocol::{Opcode, Status};

use super::{CudaConfig, CudaExecutor, Executor, Request, Tenant};

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
    #[error("worker binary {WORKER_BIN} not found (set {WORKER_ENV})")]
    NotFound,
    #[error("worker I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker did not answer in time")]
    Timeout,
    #[error("worker protocol: {0}")]
    Protocol(&'static str),
}

/// Finds the worker binary: `$VGPU_CUDA_WORKER`, or next to the running
/// executable, or one directory up (cargo puts test binaries in `deps/`).
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
        op: Opcode,
        limit: Duration,
        quota: u64,
        payload: &[u8],
        out_cap: usize,
        deadline: Instant,
    ) -> Result<(Status, Vec<u8>), Error> {
        let mut hdr = Vec::with_capacity(32);
        hdr.extend((op as u16).to_le_bytes());
        hdr.extend(0u16.to_le_bytes());
        hdr.extend(
            u32::try_from(limit.as_millis())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        hdr.extend(quota.to_le_bytes());
        hdr.extend((payload.len() as u64).to_le_bytes());
        hdr.extend((out_cap as u64).to_le_bytes());
        self.stdin.write_all(&hdr)?;
        self.stdin.write_all(payload)?;
        self.stdin.flush()?;
        wait_readable(&self.stdout, deadline)?;
        let mut rh = [0u8; 16];
        self.stdout.read_exact(&mut rh)?;
        let status = u32::from_le_bytes([rh[0], rh[1], rh[2], rh[3]]);
        let len =
            u64::from_le_bytes([rh[8], rh[9], rh[10], rh[11], rh[12], rh[13], rh[14], rh[15]]);
        let status = Status::from_u32(status).ok_or(Error::Protocol("bad status"))?;
        if len > out_cap as u64 {
            return Err(Error::Protocol("output larger than asked"));
        }
        let mut out = vec![0u8; len as usize];
        self.stdout.read_exact(&mut out)?;
        Ok((status, out))
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
    pub worker: Option<Worker>,
    pub generation: u32,
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
        let quota = tenant.gpu_mem_quota;
        let mut spawned = false;
        if self.worker.is_none() {
            if self.generation >= 1 << (32 - GENERATION_SHIFT) {
                return (Err(Status::NoResources), false);
            }
            match Worker::spawn(path, gpu_index, tenant.vm_id, self.generation) {
                Ok(w) => {
                    self.worker = Some(w);
                    self.generation += 1;
                    spawned = true;
                }
                Err(e) => {
                    log::error!("vm {}: cannot start CUDA worker: {e}", tenant.vm_id);
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
        let res = match w.call(
            req.opcode,
            limit,
            quota,
            &payload,
            req.output.len(),
            deadline,
        ) {
            Ok((Status::Ok, out)) => match req.output.write_at(0, &out) {
                Ok(()) => Ok(out.len() as u32),
                Err(_) => Err(Status::BadRequest),
            },
            Ok((s, _)) => Err(s),
            Err(Error::Timeout) => {
                log::warn!(
                    "vm {}: CUDA worker did not answer in time; killed",
                    tenant.vm_id
                );
                Err(Status::Timeout)
            }
            Err(e) => {
                log::warn!("vm {}: CUDA worker failed: {e}", tenant.vm_id);
                Err(Status::DeviceError)
            }
        };
        if matches!(res, Err(Status::DeviceError) | Err(Status::Timeout)) {
            log::warn!(
                "vm {}: ending its CUDA worker; its handles are gone",
                tenant.vm_id
            );
            self.worker = None;
        }
        (res, spawned)
    }
}

/// One request frame: opcode, limit_ms, quota, payload, output capacity.
type Frame = (u16, u32, u64, Vec<u8>, usize);

fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Frame>> {
    let mut h = [0u8; 32];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let op = u16::from_le_bytes([h[0], h[1]]);
    let limit_ms = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let g = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let (quota, plen, ocap) = (g(8), g(16), g(24));
    let mut payload = vec![0u8; plen as usize];
    r.read_exact(&mut payload)?;
    Ok(Some((op, limit_ms, quota, payload, ocap as usize)))
}

/// Main of `vgpu-cuda-worker <gpu_index> <vm_id> <first_handle>`: serves one
/// VM's remoting calls on stdin/stdout until stdin closes. Exits after a call
/// that poisoned its CUDA state.
pub fn worker_main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    let parse = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let (Some(gpu), Some(vm), Some(first)) = (parse(1), parse(2), parse(3)) else {
        eprintln!("usage: {WORKER_BIN} <gpu_index> <vm_id> <first_handle>");
        return 2;
    };
    let (gpu, vm) = (gpu as u32, vm as u32);
    let config = CudaConfig {
        isolation: super::cuda::Isolation::InProcess,
        ..CudaConfig::default()
    };
    let mut ex = match CudaExecutor::new_remoting_only(gpu, config) {
        Ok(e) => e,
        Err(e) => {
            log::error!("vm {vm}: worker cannot open GPU {gpu}: {e}");
            return 1;
        }
    };
    ex.set_handle_start(vm, first);
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut scratch = (0usize, None);
    loop {
        let (op, limit_ms, quota, payload, ocap) = match read_frame(&mut stdin) {
            Ok(Some(f)) => f,
            Ok(None) => return 0,
            Err(e) => {
                log::error!("vm {vm}: worker read: {e}");
                return 1;
            }
        };
        let tenant = Tenant {
            vm_id: vm,
            gpu_mem_quota: quota,
        };
        let (status, out) = serve(&mut ex, tenant, op, limit_ms, &payload, ocap, &mut scratch);
        let mut reply = Vec::with_capacity(16 + out.len());
        reply.extend((status as u32).to_le_bytes());
        reply.extend(0u32.to_le_bytes());
        reply.extend((out.len() as u64).to_le_bytes());
        reply.extend(&out);
        if stdout
            .write_all(&reply)
            .and_then(|_| stdout.flush())
            .is_err()
        {
            return 1;
        }
        if matches!(status, Status::DeviceError | Status::Timeout) {
            // This process's CUDA state may be poisoned: let the parent
            // start a fresh worker.
            return 3;
        }
    }
}

type Scratch = (usize, Option<std::sync::Arc<crate::guest::GuestMem>>);

fn serve(
    ex: &mut CudaExecutor,
    tenant: Tenant,
    op: u16,
    limit_ms: u32,
    payload: &[u8],
    ocap: usize,
    scratch: &mut Scratch,
) -> (Status, Vec<u8>) {
    let Some(opcode) = Opcode::from_u16(op).filter(|o| o.is_remoting()) else {
        return (Status::Unsupported, Vec::new());
    };
    let page = 4096usize;
    let out_off = payload.len().div_ceil(page) * page;
    let need = (out_off + ocap.max(1)).div_ceil(page) * page;
    if scratch.0 < need || scratch.1.is_none() {
        match anonymous_memory(&[(0, need)]) {
            Ok(m) => *scratch = (need, Some(m)),
            Err(_) => return (Status::NoResources, Vec::new()),
        }
    }
    let Some(mem) = scratch.1.clone() else {
        return (Status::NoResources, Vec::new());
    };
    let mut p = GuestBufs::new(mem.clone());
    let mut o = GuestBufs::new(mem);
    if p.push(vm_memory::GuestAddress(0), payload.len()).is_err()
        || p.write_at(0, payload).is_err()
        || o.push(vm_memory::GuestAddress(out_off as u64), ocap)
            .is_err()
    {
        return (Status::NoResources, Vec::new());
    }
    let req = Request {
        opcode,
        tag: 0,
        payload: p,
        output: o,
    };
    match ex.execute(tenant, &req, Duration::from_millis(u64::from(limit_ms))) {
        Ok(n) => {
            let mut out = vec![0u8; n as usize];
            match req.output.read_at(0, &mut out) {
                Ok(()) => (Status::Ok, out),
                Err(_) => (Status::BadRequest, Vec::new()),
            }
        }
        Err(s) => (s, Vec::new()),
    }
}
