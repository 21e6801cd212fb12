//! CUDA remoting in a worker process per VM. Measured on the H200: a guest
//! kernel that faults (CUDA_ERROR_ILLEGAL_ADDRESS) in its own CUDA context
//! poisons every context of the *process*. So each VM's remoting calls run
//! in a process of its own (`vgpu-cuda-worker`), sandboxed (`sandbox.rs`),
//! handed to the VM on its first remoting call: a warm spare whose context
//! already exists where there is one (`spare.rs`). A fault or a timeout ends
//! that process (the driver frees its GPU memory); the next call takes a new
//! one, with a new handle range so that old handles stay NOT_FOUND.
//!
//! This module is the parent's side (finding, starting and calling a
//! worker); `server.rs` is the worker's main; `wire.rs` the pipe protocol;
//! `table.rs` the VM's guest memory in its worker. Where the VM's RAM is
//! memfds, the parent passes them to the worker (once per memory table,
//! again when the frontend sends a new one) and a call then crosses the
//! pipe as its guest-physical ranges only: the worker reads, writes and
//! DMAs the guest's pages itself. Otherwise (anonymous memory in tests, the
//! `xen` feature, more regions than one message carries) payloads and
//! outputs cross the pipe, large copies in bounded chunks.

pub mod sandbox;
mod server;
pub mod spare;
pub mod table;
pub mod wire;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use vm_memory::ByteValued;

use crate::bytes::Writer;
use crate::executor::remoting::{self as rwire, HtodWire, HTOD_HDR_SIZE};
use crate::executor::{Request, Tenant};
use crate::guest::GuestMem;
use crate::protocol::{Opcode, Status};

pub use sandbox::{Probe, SandboxConfig, SeccompMode};
pub use server::{max_output, worker_main, MAX_SMALL_OUTPUT};
pub use spare::Launcher;

/// Name of the worker binary, looked up next to the running executable.
pub const WORKER_BIN: &str = "vgpu-cuda-worker";
/// Environment variable naming the worker binary explicitly.
pub const WORKER_ENV: &str = "VGPU_CUDA_WORKER";
/// The only variables of the daemon's environment a worker sees.
const PASSED_ENV: &[&str] = &[
    "RUST_LOG",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
];
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

/// The worker settings (`[worker]` of config/vgpu.toml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Warm spare workers kept per GPU (0: none).
    pub spares: usize,
    /// Largest piece of a MEMCPY_HTOD/DTOH that crosses the pipe at once.
    pub copy_chunk: usize,
    pub sandbox: SandboxConfig,
}

impl WorkerConfig {
    /// The embedded defaults (config/vgpu.toml).
    pub fn embedded() -> Self {
        // The embedded file is part of the binary and checked by the
        // config tests: it cannot fail at run time.
        crate::config::FileConfig::embedded()
            .and_then(|f| f.worker_config())
            .expect("config/vgpu.toml sets valid [worker] defaults")
    }
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

/// The parent's handle on one worker process.
pub struct Worker {
    child: Child,
    /// The worker's stdin: a unix socket, so that fds can follow a frame.
    stdin: UnixStream,
    stdout: ChildStdout,
    /// The worker's ready frame, once read.
    ready: Option<Status>,
    /// The memory table last sent, and whether the worker took it.
    table: Option<SentTable>,
    /// Payload and output bytes that crossed the pipe.
    pipe_bytes: u64,
}

/// A memory table as a worker got it.
struct SentTable {
    /// Which table (the pointer only: a `Weak` keeps it from being reused).
    mem: Weak<GuestMem>,
    register: bool,
    /// The worker mapped it: calls on it go as guest ranges.
    mapped: bool,
}

impl Worker {
    /// Starts a worker for GPU `gpu_index`: a cleared environment, no fd of
    /// the daemon's but the pipes and stderr, the sandbox settings on its
    /// command line. `probe` is for tests only (see [`sandbox::probe`]).
    pub fn spawn(
        path: &Path,
        gpu_index: u32,
        sandbox: &SandboxConfig,
        probe: Option<Probe>,
    ) -> Result<Worker, Error> {
        let settings = serde_json::to_string(sandbox)
            .map_err(|_| Error::Protocol("sandbox settings do not serialize"))?;
        // Close-on-exec here; the child's copy becomes its fd 0.
        let (stdin, theirs) = UnixStream::pair()?;
        let mut cmd = Command::new(path);
        cmd.arg("--gpu")
            .arg(gpu_index.to_string())
            .arg("--sandbox")
            .arg(settings)
            .env_clear()
            .envs(
                PASSED_ENV
                    .iter()
                    .filter_map(|k| Some((k, std::env::var_os(k)?))),
            )
            // A guest's PTX must not land in a cache that other VMs read.
            .env("CUDA_CACHE_DISABLE", "1")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(p) = probe {
            use clap::ValueEnum;
            if let Some(v) = p.to_possible_value() {
                cmd.arg("--probe").arg(v.get_name());
            }
        }
        // SAFETY: the closure makes one async-signal-safe syscall.
        unsafe { cmd.pre_exec(sandbox::mark_inherited_cloexec) };
        let mut child = cmd.spawn()?;
        drop(cmd);
        let stdout = child.stdout.take().ok_or(Error::Protocol("no stdout"))?;
        Ok(Worker {
            child,
            stdin,
            stdout,
            ready: None,
            table: None,
            pipe_bytes: 0,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The worker's stdout, for tests that read a probe's report.
    #[doc(hidden)]
    pub fn stdout_mut(&mut self) -> &mut ChildStdout {
        &mut self.stdout
    }

    /// The exit status, when the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Gives the worker to VM `vm_id`; its handles start at `first_handle`.
    pub fn assign(&mut self, vm_id: u32, first_handle: u64) -> Result<(), Error> {
        Ok(wire::write_assign(&mut self.stdin, vm_id, first_handle)?)
    }

    /// The worker's ready status, waiting for it until `deadline`.
    pub fn ready(&mut self, deadline: Instant) -> Result<Status, Error> {
        if let Some(s) = self.ready {
            return Ok(s);
        }
        wait_readable(&self.stdout, deadline)?;
        let (s, _) = wire::read_reply(&mut self.stdout, 0)?;
        self.ready = Some(s);
        Ok(s)
    }

    /// Sends one call and waits for the answer until `deadline`.
    pub fn call(
        &mut self,
        opcode: Opcode,
        tenant: Tenant,
        payload: &[u8],
        output_cap: usize,
        deadline: Instant,
    ) -> Result<(Status, Vec<u8>), Error> {
        // A worker without a usable device still answers every call (with
        // its ready status), so that a dead one is noticed here too.
        self.ready(deadline)?;
        let left = deadline.saturating_duration_since(Instant::now() + GRACE);
        let limit_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1);
        wire::write_call(
            &mut self.stdin,
            opcode,
            limit_ms,
            tenant.gpu_mem_quota,
            payload,
            output_cap,
        )?;
        wait_readable(&self.stdout, deadline)?;
        let (s, out) = wire::read_reply(&mut self.stdout, output_cap)?;
        self.pipe_bytes += (payload.len() + out.len()) as u64;
        Ok((s, out))
    }

    /// Payload and output bytes that crossed this worker's pipe so far.
    pub fn pipe_bytes(&self) -> u64 {
        self.pipe_bytes
    }

    /// Hands the worker `mem`'s regions (their fds over the socket; see
    /// `wire.rs`) and waits for it to map them. `register`: the worker may
    /// pin them (`register=all`). Returns the worker's answer, or
    /// UNSUPPORTED when `mem` has regions that cannot be passed.
    pub fn send_table(
        &mut self,
        mem: &Arc<GuestMem>,
        register: bool,
        deadline: Instant,
    ) -> Result<Status, Error> {
        self.ready(deadline)?;
        let Some((regions, fds)) = table::table_of(mem) else {
            return Ok(Status::Unsupported);
        };
        let payload = wire::encode_table(&regions);
        wire::write_frame(
            &mut self.stdin,
            u16::from(register),
            wire::FLAG_TABLE,
            0,
            0,
            &payload,
            0,
        )?;
        table::send_fds(self.stdin.as_raw_fd(), &[0], &fds)?;
        wait_readable(&self.stdout, deadline)?;
        let (s, _) = wire::read_reply(&mut self.stdout, 0)?;
        Ok(s)
    }

    /// Sends a call whose payload and output are the guest ranges of `req`
    /// (the worker maps the table they lie in) and waits for its answer:
    /// the status and the output bytes the worker wrote.
    pub fn call_guest(
        &mut self,
        tenant: Tenant,
        req: &Request,
        deadline: Instant,
    ) -> Result<(Status, usize), Error> {
        self.ready(deadline)?;
        let seg = |b: &crate::guest::GuestBufs| -> Vec<(u64, u64)> {
            b.segments().map(|(a, n)| (a, n as u64)).collect()
        };
        let payload = wire::encode_guest_call(&seg(&req.payload), &seg(&req.output));
        let left = deadline.saturating_duration_since(Instant::now() + GRACE);
        let limit_ms = u32::try_from(left.as_millis()).unwrap_or(u32::MAX).max(1);
        wire::write_frame(
            &mut self.stdin,
            req.opcode as u16,
            wire::FLAG_GUEST,
            limit_ms,
            tenant.gpu_mem_quota,
            &payload,
            req.output.len(),
        )?;
        wait_readable(&self.stdout, deadline)?;
        let r = wire::read_guest_reply(&mut self.stdout, req.output.len())?;
        self.pipe_bytes += payload.len() as u64;
        Ok(r)
    }

    /// True when calls of `req` may go as guest ranges: the worker maps the
    /// table `req` lies in, sending it first when it is new to the worker
    /// (or the registration choice changed).
    fn guest_path(
        &mut self,
        req: &Request,
        register: bool,
        deadline: Instant,
    ) -> Result<bool, Error> {
        let mem = req.payload.memory();
        let ranges = req.payload.segments().len() + req.output.segments().len();
        if !Arc::ptr_eq(mem, req.output.memory()) || ranges > wire::MAX_GUEST_RANGES {
            return Ok(false);
        }
        if let Some(t) = &self.table {
            if std::ptr::eq(t.mem.as_ptr(), Arc::as_ptr(mem)) && t.register == register {
                return Ok(t.mapped);
            }
        }
        let status = self.send_table(mem, register, deadline)?;
        let mapped = status == Status::Ok;
        if !mapped && status != Status::Unsupported {
            log::warn!(
                "CUDA worker {} refused a memory table ({status:?}): its copies cross the pipe",
                self.pid()
            );
        }
        self.table = Some(SentTable {
            mem: Arc::downgrade(mem),
            register,
            mapped,
        });
        Ok(mapped)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The driver releases the process's GPU memory and kernels.
        let _ = self.child.kill();
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // reaped already (here or by `exited`)
        }
        // The exit takes as long as the driver's teardown of the process's
        // context (tens of ms after a fault): a thread of its own waits for
        // it, not the GPU's thread that other VMs wait for. `Child` itself
        // never reaps on drop, so the pid is this thread's alone to wait on.
        let pid = self.pid();
        if std::thread::Builder::new()
            .name("vgpu-worker-reap".into())
            .spawn(move || reap(pid))
            .is_err()
        {
            reap(pid);
        }
    }
}

/// Waits for worker `pid` to exit and says so when its seccomp filter
/// stopped it.
fn reap(pid: u32) {
    let mut status = 0;
    // SAFETY: `pid` is a child of this process that nothing else waits for
    // (see `Drop for Worker`); `status` is a plain out-parameter.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
    if r == pid as libc::pid_t {
        let st = ExitStatus::from_raw(status);
        if st.code() == Some(sandbox::SECCOMP_EXIT) || st.signal() == Some(libc::SIGSYS) {
            log::error!("CUDA worker {pid} was stopped by its seccomp filter");
        }
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

/// What one call through the pipe came to.
type CallResult = Result<(Status, Vec<u8>), Error>;

/// Per-VM bookkeeping of the parent.
#[derive(Default)]
pub struct VmWorker {
    worker: Option<Worker>,
    generation: u32,
    /// The worker may pin the VM's memory (`register=all`).
    register: bool,
    /// Payload and output bytes that crossed the pipes of the VM's workers.
    pipe_bytes: u64,
}

impl VmWorker {
    /// Whether the VM's worker may register (pin) its guest memory; a
    /// change reaches the worker with the next call.
    pub fn set_register(&mut self, register: bool) {
        self.register = register;
    }

    /// Payload and output bytes that crossed the pipes of this VM's
    /// workers: with its memory table passed, only guest ranges do.
    pub fn pipe_bytes(&self) -> u64 {
        self.pipe_bytes + self.worker.as_ref().map_or(0, Worker::pipe_bytes)
    }

    /// The pid of the VM's worker, when it has one.
    pub fn pid(&self) -> Option<u32> {
        self.worker.as_ref().map(Worker::pid)
    }

    /// Runs `req` in the VM's worker, taking one from `launcher` if needed.
    /// A DEVICE_ERROR or TIMEOUT answer, or a worker that dies or hangs,
    /// ends the worker. Returns the status and whether a worker was taken.
    pub fn execute(
        &mut self,
        launcher: &mut Launcher,
        tenant: Tenant,
        req: &Request,
        limit: Duration,
    ) -> (Result<u32, Status>, bool) {
        let vm = tenant.vm_id;
        let mut taken = false;
        if self.worker.is_none() {
            if self.generation >= 1 << (32 - GENERATION_SHIFT) {
                return (Err(Status::NoResources), false);
            }
            let first = (u64::from(self.generation) << GENERATION_SHIFT) | 1;
            match launcher.take(vm, first) {
                Ok(w) => {
                    self.worker = Some(w);
                    self.generation += 1;
                    taken = true;
                }
                Err(e) => {
                    log::error!("vm{vm}: cannot start CUDA worker: {e}");
                    return (Err(Status::NoResources), false);
                }
            }
        }
        let Some(w) = self.worker.as_mut() else {
            return (Err(Status::DeviceError), taken);
        };
        let deadline = Instant::now() + limit + GRACE;
        let chunk = launcher.copy_chunk();
        let res = match w.guest_path(req, self.register, deadline) {
            Err(e) => Err(Failure::Worker(e)),
            Ok(true) => guest(w, tenant, req, deadline),
            Ok(false) => match req.opcode {
                Opcode::MemcpyHtoD => htod(w, tenant, req, chunk, deadline),
                Opcode::MemcpyDtoH => dtoh(w, tenant, req, chunk, deadline),
                op => whole(w, tenant, req, max_output(op), deadline),
            },
        };
        let res = match res {
            Ok(n) => Ok(n),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Worker(Error::Timeout)) => {
                log::warn!("vm{vm}: CUDA worker did not answer in time; killed");
                Err(Status::Timeout)
            }
            Err(Failure::Worker(e)) => {
                log::warn!("vm{vm}: CUDA worker failed: {e}");
                Err(Status::DeviceError)
            }
        };
        if matches!(res, Err(Status::DeviceError) | Err(Status::Timeout)) {
            log::warn!("vm{vm}: ending its CUDA worker; its handles are gone");
            if let Some(w) = self.worker.take() {
                self.pipe_bytes += w.pipe_bytes();
            }
        }
        if taken {
            launcher.refill();
        }
        (res, taken)
    }
}

/// Why a call did not succeed: the worker's answer, or the worker itself.
enum Failure {
    Status(Status),
    Worker(Error),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Status(s)
    }
}

fn answered(r: CallResult) -> Result<Vec<u8>, Failure> {
    match r {
        Ok((Status::Ok, out)) => Ok(out),
        Ok((s, _)) => Err(Failure::Status(s)),
        Err(e) => Err(Failure::Worker(e)),
    }
}

/// A call as guest ranges: the worker reads the payload from, and writes
/// the output to, its own mapping of the guest's pages.
fn guest(w: &mut Worker, t: Tenant, req: &Request, deadline: Instant) -> Result<u32, Failure> {
    match w.call_guest(t, req, deadline) {
        Ok((Status::Ok, n)) => {
            u32::try_from(n).map_err(|_| Failure::Worker(Error::Protocol("output length")))
        }
        Ok((s, _)) => Err(Failure::Status(s)),
        Err(e) => Err(Failure::Worker(e)),
    }
}

/// A call that crosses the pipe in one frame: its payload is bounded by
/// [`wire::MAX_FRAME_BYTES`] before it is copied out of guest memory.
/// Its output is bounded by `max_output`.
fn whole(
    w: &mut Worker,
    t: Tenant,
    req: &Request,
    max_output: usize,
    deadline: Instant,
) -> Result<u32, Failure> {
    if req.payload.len() as u64 > wire::MAX_FRAME_BYTES {
        return Err(Status::TooLarge.into());
    }
    let payload = req.payload.to_vec().map_err(|_| Status::BadRequest)?;
    let cap = req.output.len().min(max_output);
    let out = answered(w.call(req.opcode, t, &payload, cap, deadline))?;
    Ok(Writer::Guest(&req.output).write_output(&out)?)
}

/// The chunks of a `len`-byte copy, last first: a range past the end of the
/// device buffer fails on the first chunk, before any byte moved.
fn chunks(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..len.div_ceil(chunk))
        .rev()
        .map(move |i| (i * chunk, chunk.min(len - i * chunk)))
}

/// MEMCPY_HTOD in chunks of at most `chunk` bytes, each read from guest
/// memory only when it is sent.
fn htod(
    w: &mut Worker,
    t: Tenant,
    req: &Request,
    chunk: usize,
    deadline: Instant,
) -> Result<u32, Failure> {
    let len = req.payload.len();
    if len <= HTOD_HDR_SIZE + chunk {
        return whole(w, t, req, 0, deadline);
    }
    let mut hdr = [0u8; HTOD_HDR_SIZE];
    req.payload
        .read_at(0, &mut hdr)
        .map_err(|_| Status::BadRequest)?;
    let (handle, offset) = rwire::parse_htod_header(&hdr).map_err(Status::from)?;
    let mut frame = vec![0u8; HTOD_HDR_SIZE + chunk];
    for (start, n) in chunks(len - HTOD_HDR_SIZE, chunk) {
        let at = offset.checked_add(start as u64).ok_or(Status::BadRequest)?;
        let h = HtodWire {
            handle: handle.into(),
            offset: at.into(),
        };
        frame[..HTOD_HDR_SIZE].copy_from_slice(h.as_slice());
        let part = &mut frame[..HTOD_HDR_SIZE + n];
        req.payload
            .read_at(HTOD_HDR_SIZE + start, &mut part[HTOD_HDR_SIZE..])
            .map_err(|_| Status::BadRequest)?;
        answered(w.call(Opcode::MemcpyHtoD, t, part, 0, deadline))?;
    }
    Ok(0)
}

/// MEMCPY_DTOH in chunks of at most `chunk` bytes, each written to guest
/// memory as it arrives.
fn dtoh(
    w: &mut Worker,
    t: Tenant,
    req: &Request,
    chunk: usize,
    deadline: Instant,
) -> Result<u32, Failure> {
    let mut p = [0u8; 24];
    if req.payload.len() != p.len() || req.payload.read_at(0, &mut p).is_err() {
        return whole(w, t, req, 0, deadline);
    }
    let (handle, offset, len) = rwire::parse_dtoh(&p).map_err(Status::from)?;
    if len <= chunk as u64 {
        return whole(w, t, req, chunk, deadline);
    }
    let total = u32::try_from(len).map_err(|_| Status::TooLarge)?;
    if len > req.output.len() as u64 {
        return Err(Status::TooLarge.into());
    }
    for (start, n) in chunks(total as usize, chunk) {
        let at = offset.checked_add(start as u64).ok_or(Status::BadRequest)?;
        let mut part = Vec::with_capacity(24);
        for v in [handle, at, n as u64] {
            part.extend_from_slice(&v.to_le_bytes());
        }
        let out = answered(w.call(Opcode::MemcpyDtoH, t, &part, n, deadline))?;
        if out.len() != n {
            return Err(Failure::Worker(Error::Protocol("short MEMCPY_DTOH chunk")));
        }
        Writer::Guest(&req.output).write_at(start, &out)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_cut_last_chunk_first() {
        assert_eq!(
            chunks(10, 4).collect::<Vec<_>>(),
            vec![(8, 2), (4, 4), (0, 4)]
        );
        assert_eq!(chunks(8, 4).collect::<Vec<_>>(), vec![(4, 4), (0, 4)]);
        assert_eq!(chunks(0, 4).count(), 0);
        let total: usize = chunks(1 << 20, 3000).map(|(_, n)| n).sum();
        assert_eq!(total, 1 << 20);
    }
}
