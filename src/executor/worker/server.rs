//! The worker process's main: one VM's remoting calls, read from stdin and
//! answered on stdout (`wire.rs`), run by a [`RemotingExecutor`] on the
//! call's own bytes. The worker loads no built-in kernel and holds no other
//! VM's memory.

use std::time::Duration;

use super::{wire, WORKER_BIN};
use crate::bytes::{Reader, Writer};
use crate::executor::cuda::RemotingExecutor;
use crate::executor::Tenant;
use crate::protocol::{Opcode, Status};

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
    let (Ok(gpu), Ok(vm)) = (u32::try_from(gpu), u32::try_from(vm)) else {
        eprintln!("{WORKER_BIN}: gpu_index and vm_id must fit 32 bits");
        return 2;
    };
    let mut ex = match RemotingExecutor::for_worker(gpu, vm, first) {
        Ok(e) => e,
        Err(e) => {
            log::error!("vm{vm}: worker cannot open GPU {gpu}: {e}");
            return 1;
        }
    };
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    loop {
        let call = match wire::read_call(&mut stdin) {
            Ok(Some(c)) => c,
            Ok(None) => return 0,
            Err(e) => {
                log::error!("vm{vm}: worker read: {e}");
                return 1;
            }
        };
        let (status, out) = serve(&mut ex, vm, call);
        if wire::write_reply(&mut stdout, status, &out).is_err() {
            return 1;
        }
        if matches!(status, Status::DeviceError | Status::Timeout) {
            // This process's CUDA state may be poisoned: let the parent
            // start a fresh worker.
            return 3;
        }
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
    let mut out = vec![0u8; call.output_cap];
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
