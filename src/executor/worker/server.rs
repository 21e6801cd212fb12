//! The worker process's main: enters its sandbox (`sandbox.rs`), opens the
//! GPU and creates its CUDA context (so that a spare is warm before a VM
//! needs it), closes the sandbox with the seccomp filter, says it is ready,
//! learns its VM, then answers that VM's remoting calls from stdin on stdout
//! (`wire.rs`), run by a [`RemotingExecutor`] on the call's own bytes or,
//! once the parent passed the VM's memory table (`table.rs`), on the guest's
//! pages themselves. The worker loads no built-in kernel and holds no other
//! VM's memory.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaContext;

use super::sandbox::{self, Probe, SandboxConfig};
use super::{table, wire, WORKER_BIN};
use crate::bytes::{Reader, Writer};
use crate::executor::cuda::{driver_present, Meter, RemotingExecutor};
use crate::executor::remoting as rwire;
use crate::executor::Tenant;
use crate::guest::{GuestBufs, GuestMem};
use crate::protocol::{Opcode, Status};

/// Largest output of a remoting call other than MEMCPY_DTOH (whose output
/// is allocated at the size it asks for, after validation) and the CUDA API
/// calls (see [`max_output`]).
pub const MAX_SMALL_OUTPUT: usize = 1 << 20;

/// Largest output `opcode` may produce besides MEMCPY_DTOH: the CUDA API's
/// synchronous copies and command buffers return up to 64 MiB of device
/// data (`cuda_api::MAX_COPY_LEN`, `MAX_COMMAND_BUFFER_OUTPUT`) behind a
/// short header; everything else at most [`MAX_SMALL_OUTPUT`].
pub fn max_output(opcode: Opcode) -> usize {
    if opcode.is_cuda_api() {
        wire::MAX_FRAME_BYTES as usize
    } else {
        MAX_SMALL_OUTPUT
    }
}

/// `vgpu-cuda-worker`: started by the daemon, not by hand.
#[derive(Debug, Parser)]
#[command(name = WORKER_BIN)]
struct Args {
    /// GPU index.
    #[arg(long)]
    gpu: u32,
    /// The sandbox settings, JSON ([`SandboxConfig`]).
    #[arg(long)]
    sandbox: String,
    /// Test only: run a probe inside the sandbox instead of serving.
    #[arg(long, hide = true)]
    probe: Option<Probe>,
}

/// Opens GPU `gpu` and creates the worker's context. UNSUPPORTED without a
/// driver or device, or where the device can read pageable host memory
/// (a raw pointer in a guest kernel would then reach this whole process)
/// and the operator did not allow it.
fn open_device(gpu: u32, cfg: &SandboxConfig) -> Result<(Arc<CudaContext>, Meter), Status> {
    if !driver_present() {
        log::info!("worker: no CUDA driver: remoting calls answer UNSUPPORTED");
        return Err(Status::Unsupported);
    }
    let ctx = CudaContext::new_non_primary(gpu as usize, 0).map_err(|e| {
        log::error!("worker: cannot open GPU {gpu}: {e}");
        Status::Unsupported
    })?;
    let pageable = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS)
        .unwrap_or(1);
    if pageable != 0 && !cfg.allow_pageable_memory_access {
        log::error!(
            "worker: GPU {gpu} reads pageable host memory (CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS \
             = {pageable}): a guest kernel could read this process; remoting refused \
             (allow_pageable_memory_access overrides)"
        );
        return Err(Status::Unsupported);
    }
    // The guest has no opcode that sets a limit: these hold for the
    // context's life (stack, device malloc heap, printf FIFO).
    if let Err(e) = crate::executor::cuda::bound_context_limits(&ctx) {
        log::error!("worker: cannot bound the context limits: {e:?}");
        return Err(Status::Unsupported);
    }
    // Before the seccomp filter: NVML opens its library and devices here.
    Ok((ctx, Meter::open(gpu)))
}

/// Main of `vgpu-cuda-worker --gpu N --sandbox JSON`. Exits 0 when stdin
/// closes, 3 after a call that poisoned its CUDA state, 1 on a failure of
/// its own, [`sandbox::SECCOMP_EXIT`] when the filter stopped a syscall.
pub fn worker_main() -> i32 {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{WORKER_BIN}: {}", msg.lines().next().unwrap_or_default());
            return 2;
        }
    };
    crate::executor::cuda::memory::use_worker_pieces();
    let cfg: SandboxConfig = match serde_json::from_str(&args.sandbox) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{WORKER_BIN}: --sandbox: {e}");
            return 2;
        }
    };
    match sandbox::enter(&cfg) {
        Ok(done) => log::debug!("worker: sandbox entered: {done:?}"),
        Err(e) => {
            log::error!("worker: cannot enter its sandbox: {e}");
            return 1;
        }
    }
    let device = match args.probe {
        Some(_) => Err(Status::Unsupported),
        None => open_device(args.gpu, &cfg),
    };
    if cfg.enabled {
        if let Err(e) = sandbox::install_seccomp(cfg.seccomp) {
            log::error!("worker: {e}");
            return 1;
        }
    }
    if let Some(p) = args.probe {
        return sandbox::probe(p);
    }
    // Unbuffered, frame by frame: a read must never take the byte that
    // carries a table's fds (see `wire.rs`). Fd 0 is the parent's socket.
    // SAFETY: fd 0 is this process's stdin, used through nothing else.
    let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
    let mut stdout = std::io::stdout().lock();
    let ready = device.as_ref().err().copied().unwrap_or(Status::Ok);
    if wire::write_reply(&mut stdout, ready, &[]).is_err() {
        return 1;
    }
    let (vm, first) = match wire::read_assign(&mut *stdin) {
        Ok(Some(a)) => a,
        Ok(None) => return 0,
        Err(e) => {
            log::error!("worker: read: {e}");
            return 1;
        }
    };
    let ctx = device.as_ref().ok().map(|(c, _)| c.clone());
    let mut ex = device
        .ok()
        .map(|(ctx, meter)| RemotingExecutor::for_worker_in(args.gpu, vm, first, ctx, meter));
    let mut mem = Memory::new(&cfg);
    loop {
        let call = match wire::read_call(&mut *stdin) {
            Ok(Some(c)) => c,
            Ok(None) => return 0,
            Err(e) => {
                log::error!("vm{vm}: worker read: {e}");
                return 1;
            }
        };
        let (status, sent) = if call.flags == wire::FLAG_TABLE {
            let s = match mem.replace(&call, stdin.as_raw_fd(), ctx.as_ref(), args.gpu, vm) {
                Ok(()) => Status::Ok,
                Err(e) => {
                    log::warn!("vm{vm}: worker: guest memory table refused: {e}");
                    Status::BadRequest
                }
            };
            (s, wire::write_reply(&mut stdout, s, &[]))
        } else if call.flags == wire::FLAG_GUEST {
            mem.touch(&call);
            let (s, n) = serve_guest(ex.as_mut(), ready, vm, mem.mapped(), &call);
            (s, wire::write_guest_reply(&mut stdout, s, n))
        } else {
            let (s, out) = match ex.as_mut() {
                Some(ex) => serve(ex, vm, call),
                None => (ready, Vec::new()),
            };
            (s, wire::write_reply(&mut stdout, s, &out))
        };
        if sent.is_err() || stdout.flush().is_err() {
            return 1;
        }
        if matches!(status, Status::DeviceError | Status::Timeout) {
            // This process's CUDA state may be poisoned: let the parent
            // start a fresh worker.
            return 3;
        }
    }
}

/// The VM's guest memory as this worker holds it: the mapping of the last
/// table, and the thread that registers (pins) it and unregisters it when
/// the table is replaced.
struct Memory {
    mem: Option<Arc<GuestMem>>,
    /// Dropping it tells the registration thread to unregister and end.
    registered: Option<std::sync::mpsc::Sender<()>>,
    /// A table that may be registered, not yet started: registration waits
    /// for the first call that moves [`REGISTER_AFTER_BYTES`] (see there).
    pending: Option<PendingRegistration>,
    /// The address-space limit without guest memory (0: none set) and the
    /// hard limit it may grow to (see `sandbox.rs`).
    base_as: u64,
    max_as: u64,
}

impl Memory {
    fn new(cfg: &SandboxConfig) -> Self {
        let limits = cfg.enabled && cfg.rlimit_as > 0;
        Memory {
            mem: None,
            registered: None,
            pending: None,
            base_as: if limits { cfg.rlimit_as } else { 0 },
            max_as: if limits {
                cfg.rlimit_as.saturating_add(cfg.rlimit_as_guest)
            } else {
                0
            },
        }
    }

    fn mapped(&self) -> Option<&Arc<GuestMem>> {
        self.mem.as_ref()
    }

    /// Takes a table frame: reads the fds that follow it, maps the regions
    /// in place of the previous table and starts registering them (unless
    /// the frame says the VM is never to be pinned, `register=staging`).
    fn replace(
        &mut self,
        call: &wire::Call,
        sock: i32,
        ctx: Option<&Arc<cudarc::driver::CudaContext>>,
        gpu: u32,
        vm: u32,
    ) -> std::io::Result<()> {
        let regions = wire::decode_table(&call.payload);
        // The fd message follows every table frame: take it even when the
        // frame is refused, so that the stream stays in step.
        let want = regions.as_ref().map_or(wire::MAX_REGIONS, Vec::len);
        let fds = table::recv_fds(sock, want)?;
        let regions = regions?;
        let bytes = table::table_bytes(&regions)
            .ok_or_else(|| std::io::Error::other("table size overflows"))?;
        let old = self.mem.take();
        self.registered = None;
        self.pending = None;
        if self.base_as > 0 {
            // The old table may still be mapped while its registration ends.
            let old_bytes = old.as_ref().map_or(0, |m| {
                use vm_memory::GuestMemoryBackend;
                m.iter().map(vm_memory::GuestMemoryRegion::len).sum::<u64>()
            });
            let want = self
                .base_as
                .saturating_add(bytes)
                .saturating_add(old_bytes)
                .min(self.max_as);
            sandbox::set_soft_rlimit_as(want)?;
            if self.base_as.saturating_add(bytes) > self.max_as {
                return Err(std::io::Error::other(
                    "table larger than the worker's address-space allowance",
                ));
            }
        }
        drop(old);
        let mem = table::map_table(&regions, fds)?;
        log::info!(
            "vm{vm}: worker mapped {} guest memory regions ({} MiB)",
            regions.len(),
            bytes >> 20
        );
        if call.opcode == 1 {
            if let Some(ctx) = ctx {
                self.pending = Some(PendingRegistration {
                    ctx: ctx.clone(),
                    gpu,
                    vm,
                });
            }
        }
        self.mem = Some(mem);
        Ok(())
    }

    /// A call on guest ranges is about to run: the first that moves
    /// [`REGISTER_AFTER_BYTES`] or more starts the table's registration.
    fn touch(&mut self, call: &wire::Call) {
        if self.pending.is_none() {
            return;
        }
        if guest_call_bytes(&call.payload).is_none_or(|b| b < REGISTER_AFTER_BYTES) {
            return;
        }
        if let (Some(p), Some(mem)) = (self.pending.take(), self.mem.as_ref()) {
            self.registered = register_in_background(p.ctx, p.gpu, p.vm, mem.clone());
        }
    }
}

/// Registration pins the whole table, in 64 MiB pieces during each of
/// which this VM's calls wait (~25 ms a piece on the H200): a worth-while
/// price for copies, which then move by DMA, but pure loss for a program
/// that only launches kernels and moves small buffers, and a short one
/// (a process through the library's user-space transport is a new table)
/// pays it on every run. So a worker registers
/// its table at the first call that moves at least this much; until then,
/// and while it registers, copies are staged by the driver.
const REGISTER_AFTER_BYTES: u64 = 1 << 20;

/// The bytes a call on guest ranges moves, payload and output together.
fn guest_call_bytes(frame: &[u8]) -> Option<u64> {
    let (payload, output) = wire::decode_guest_call(frame).ok()?;
    Some(
        payload
            .iter()
            .chain(output.iter())
            .fold(0u64, |sum, &(_, len)| sum.saturating_add(len)),
    )
}

/// What a deferred registration needs.
struct PendingRegistration {
    ctx: Arc<cudarc::driver::CudaContext>,
    gpu: u32,
    vm: u32,
}

/// Registers `mem` on a thread of its own, which keeps the registration
/// until the returned sender is dropped and then unregisters it. Only this
/// VM's calls share the driver with it.
fn register_in_background(
    ctx: Arc<cudarc::driver::CudaContext>,
    gpu: u32,
    vm: u32,
    mem: Arc<GuestMem>,
) -> Option<std::sync::mpsc::Sender<()>> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("vgpu-worker-reg".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            use crate::executor::cuda::memory::{registration_piece, RegToken};
            let tok = RegToken::register_in(&ctx, gpu, vm, &mem, registration_piece());
            log::info!(
                "vm{vm}: worker registered {} MiB of guest memory in {:?}",
                tok.bytes() >> 20,
                started.elapsed()
            );
            drop(mem);
            // Until the table is replaced (or the process ends).
            let _ = rx.recv();
            drop(tok);
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            log::warn!("vm{vm}: worker: no registration thread ({e}); copies are staged");
            None
        }
    }
}

/// A call whose bytes are in guest memory: every range is checked against
/// the worker's own table before use.
fn serve_guest(
    ex: Option<&mut RemotingExecutor>,
    ready: Status,
    vm: u32,
    mem: Option<&Arc<GuestMem>>,
    call: &wire::Call,
) -> (Status, u32) {
    let Some(mem) = mem else {
        return (Status::BadRequest, 0);
    };
    let Ok((pr, or)) = wire::decode_guest_call(&call.payload) else {
        return (Status::BadRequest, 0);
    };
    let view = |ranges: &[(u64, u64)]| -> Option<GuestBufs> {
        let mut b = GuestBufs::new(mem.clone());
        for &(addr, len) in ranges {
            b.push(vm_memory::GuestAddress(addr), usize::try_from(len).ok()?)
                .ok()?;
        }
        Some(b)
    };
    let (Some(p), Some(o)) = (view(&pr), view(&or)) else {
        log::warn!("vm{vm}: worker: a guest range outside its memory table");
        return (Status::BadRequest, 0);
    };
    let Some(opcode) = Opcode::from_u16(call.opcode).filter(|o| o.is_remoting()) else {
        return (Status::Unsupported, 0);
    };
    let Some(ex) = ex else {
        return (ready, 0);
    };
    let tenant = Tenant {
        vm_id: vm,
        gpu_mem_quota: call.quota,
    };
    let limit = Duration::from_millis(u64::from(call.limit_ms));
    match ex.call(
        tenant,
        opcode,
        Reader::Guest(&p),
        &mut Writer::Guest(&o),
        limit,
    ) {
        Ok(n) => (Status::Ok, n),
        Err(s) => (s, 0),
    }
}

/// Output bytes a call may need: a MEMCPY_DTOH's own length (validated by
/// the executor; a larger one than the capacity is TOO_LARGE there), at most
/// [`MAX_SMALL_OUTPUT`] for the rest.
fn output_size(opcode: Opcode, payload: &[u8], cap: usize) -> usize {
    match opcode {
        Opcode::MemcpyDtoH => rwire::parse_dtoh(payload)
            .ok()
            .and_then(|(_, _, len)| usize::try_from(len).ok())
            .map_or(0, |len| len.min(cap)),
        _ => cap.min(max_output(opcode)),
    }
}

fn serve(ex: &mut RemotingExecutor, vm: u32, call: wire::Call) -> (Status, Vec<u8>) {
    let Some(opcode) = Opcode::from_u16(call.opcode).filter(|o| o.is_remoting()) else {
        return (Status::Unsupported, Vec::new());
    };
    let tenant = Tenant {
        vm_id: vm,
        gpu_mem_quota: call.quota,
    };
    let mut out = vec![0u8; output_size(opcode, &call.payload, call.output_cap)];
    let limit = Duration::from_millis(u64::from(call.limit_ms));
    let res = ex.call(
        tenant,
        opcode,
        Reader::Bytes(&call.payload),
        &mut Writer::Bytes(&mut out),
        limit,
    );
    match res {
        Ok(n) => {
            out.truncate(n as usize);
            (Status::Ok, out)
        }
        Err(s) => (s, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_waits_for_a_call_that_moves_a_mebibyte() {
        let small = wire::encode_guest_call(&[(0x1000, 600)], &[(0x2000, 4096)]);
        let big = wire::encode_guest_call(&[(0x1000, 24), (0x10_0000, 1 << 19)], &[(0, 1 << 19)]);
        assert!(guest_call_bytes(&small).unwrap() < REGISTER_AFTER_BYTES);
        assert!(guest_call_bytes(&big).unwrap() >= REGISTER_AFTER_BYTES);
        let huge = wire::encode_guest_call(&[(0, u64::MAX), (0, u64::MAX)], &[]);
        assert_eq!(guest_call_bytes(&huge), Some(u64::MAX));
        assert_eq!(guest_call_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn outputs_are_sized_by_what_the_call_needs() {
        let mut dtoh = Vec::new();
        for v in [1u64 << 32, 0, 4096] {
            dtoh.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(output_size(Opcode::MemcpyDtoH, &dtoh, 1 << 30), 4096);
        assert_eq!(output_size(Opcode::MemcpyDtoH, &dtoh, 100), 100);
        assert_eq!(output_size(Opcode::MemcpyDtoH, &dtoh[..8], 1 << 30), 0);
        assert_eq!(
            output_size(Opcode::MemAlloc, &[], 1 << 30),
            MAX_SMALL_OUTPUT
        );
        assert_eq!(output_size(Opcode::MemAlloc, &[], 8), 8);
    }
}
