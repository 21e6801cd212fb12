//! The worker process's main: enters its sandbox (`sandbox.rs`), opens the
//! GPU and creates its CUDA context (so that a spare is warm before a VM
//! needs it), closes the sandbox with the seccomp filter, says it is ready,
//! learns its VM, then answers that VM's remoting calls from stdin on stdout
//! (`wire.rs`), run by a [`RemotingExecutor`] on the call's own bytes. The
//! worker loads no built-in kernel and holds no other VM's memory.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::CudaContext;

use super::sandbox::{self, Probe, SandboxConfig};
use super::{wire, WORKER_BIN};
use crate::bytes::{Reader, Writer};
use crate::executor::cuda::{driver_present, Meter, RemotingExecutor};
use crate::executor::remoting as rwire;
use crate::executor::Tenant;
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
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let ready = device.as_ref().err().copied().unwrap_or(Status::Ok);
    if wire::write_reply(&mut stdout, ready, &[]).is_err() {
        return 1;
    }
    let (vm, first) = match wire::read_assign(&mut stdin) {
        Ok(Some(a)) => a,
        Ok(None) => return 0,
        Err(e) => {
            log::error!("worker: read: {e}");
            return 1;
        }
    };
    let mut ex = device
        .ok()
        .map(|(ctx, meter)| RemotingExecutor::for_worker_in(args.gpu, vm, first, ctx, meter));
    loop {
        let call = match wire::read_call(&mut stdin) {
            Ok(Some(c)) => c,
            Ok(None) => return 0,
            Err(e) => {
                log::error!("vm{vm}: worker read: {e}");
                return 1;
            }
        };
        let (status, out) = match ex.as_mut() {
            Some(ex) => serve(ex, vm, call),
            None => (ready, Vec::new()),
        };
        if wire::write_reply(&mut stdout, status, &out).is_err() || stdout.flush().is_err() {
            return 1;
        }
        if matches!(status, Status::DeviceError | Status::Timeout) {
            // This process's CUDA state may be poisoned: let the parent
            // start a fresh worker.
            return 3;
        }
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
