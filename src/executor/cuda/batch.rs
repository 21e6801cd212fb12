//! Batches of small requests: PINGs and SCALAR_ADDs whose cost is launch,
//! copy and synchronization share one copy in, one launch (the kernel of
//! `kernels/vgpu_batch.ptx`), one copy out and one synchronize. Results and
//! statuses are those of running the requests one by one.

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::result::DriverError;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::memory::{Device, Grow, Pinned};
use super::{bind, check, CudaExecutor};
use crate::bytes::{Reader, Writer};
use crate::executor::{ops, Executor, Request, Tenant};
use crate::protocol::{Opcode, Status};

/// PTX of the batched SCALAR_ADD kernel (see `kernels/vgpu_batch.cu`).
pub const BATCH_PTX: &str = include_str!("../../../kernels/vgpu_batch.ptx");

/// SCALAR_ADDs of one batch that share a launch, a copy out and a
/// synchronization (longer batches run in chunks of this many).
pub const BATCH_SLOTS: usize = 64;
/// Byte offset of the results in the batch buffers (operand pairs first).
const BATCH_OUT: usize = 8 * BATCH_SLOTS;
const BATCH_BYTES: usize = BATCH_OUT + 4 * BATCH_SLOTS;

/// The batch kernel (when its PTX loaded) and the batch's buffers.
pub struct Batch {
    kernel: Option<(CudaFunction, Arc<CudaModule>)>,
    /// Operand pairs then results (pinned host, and device).
    host: Grow<Pinned>,
    dev: Grow<Device>,
}

impl Batch {
    pub fn new(gpu: u32, ctx: &Arc<CudaContext>) -> Result<Batch, DriverError> {
        let kernel = ctx
            .load_module(Ptx::from_src(BATCH_PTX))
            .and_then(|m| Ok((m.load_function("scalar_add_i32_batch")?, m)));
        let kernel = match kernel {
            Ok(k) => Some(k),
            Err(e) => {
                log::warn!(
                    "gpu{gpu}: batched SCALAR_ADD kernel not loaded ({e}); batches launch per request"
                );
                None
            }
        };
        let mut b = Batch {
            kernel,
            host: Grow::default(),
            dev: Grow::default(),
        };
        b.host.ensure(BATCH_BYTES)?;
        b.dev.ensure(BATCH_BYTES)?;
        Ok(b)
    }

    pub fn release(&mut self) {
        self.host.release();
        self.dev.release();
    }
}

impl CudaExecutor {
    /// Whether batches use the batched SCALAR_ADD kernel (else one launch
    /// per request).
    pub fn batch_kernel_loaded(&self) -> bool {
        self.batch.kernel.is_some()
    }

    /// Makes batches launch per request (tests of that fallback).
    #[doc(hidden)]
    pub fn disable_batch_kernel(&mut self) {
        self.batch.kernel = None;
    }

    /// One chunk (at most BATCH_SLOTS) of a batch: validates every request,
    /// queues the SCALAR_ADDs' operands, kernel(s) and result copy, waits
    /// once, then writes each result into its guest output.
    pub(super) fn batch_chunk(
        &mut self,
        reqs: &[(Tenant, &Request)],
        limit: Duration,
    ) -> Vec<Result<u32, Status>> {
        let mut res: Vec<Result<u32, Status>> = vec![Ok(0); reqs.len()];
        if let Err(e) = bind(&self.ctx) {
            let s = self.own_error(e);
            return vec![Err(s); reqs.len()];
        }
        // Request index of each slot.
        let mut slots: Vec<usize> = Vec::with_capacity(reqs.len());
        for (i, &(tenant, req)) in reqs.iter().enumerate() {
            res[i] = match req.opcode {
                Opcode::Ping => Ok(0),
                Opcode::ScalarAddI32 if slots.len() < BATCH_SLOTS => {
                    match ops::scalar_add_operands(Reader::Guest(&req.payload)) {
                        Ok(_) if req.output.len() < 4 => Err(Status::TooLarge),
                        Ok((a, b)) => {
                            let k = slots.len();
                            let host = self.batch.host.slice(BATCH_BYTES);
                            if let Some(pair) = host.get_mut(8 * k..8 * k + 8) {
                                pair[..4].copy_from_slice(&a.to_le_bytes());
                                pair[4..].copy_from_slice(&b.to_le_bytes());
                            }
                            slots.push(i);
                            Ok(4)
                        }
                        Err(s) => Err(s),
                    }
                }
                // Not batchable (the scheduler does not send these): alone.
                _ => self.execute(tenant, req, limit),
            };
        }
        if slots.is_empty() {
            return res;
        }
        match self.run_scalar_slots(slots.len()) {
            Ok(()) => {
                for (k, &i) in slots.iter().enumerate() {
                    let at = BATCH_OUT + 4 * k;
                    let mut v = [0u8; 4];
                    if let Some(r) = self.batch.host.slice(BATCH_BYTES).get(at..at + 4) {
                        v.copy_from_slice(r);
                    }
                    res[i] = Writer::Guest(&reqs[i].1.output).write_output(&v);
                }
            }
            Err(s) => {
                for &i in &slots {
                    res[i] = Err(s);
                }
            }
        }
        res
    }

    /// Runs the first `n` operand pairs of the batch buffer: copy in, one
    /// kernel (or one per pair), copy the results out, synchronize.
    fn run_scalar_slots(&mut self, n: usize) -> Result<(), Status> {
        let stream = self.stream.cu_stream();
        // Allocated at start-up: these only hand the addresses back.
        let hin = self
            .batch
            .host
            .ensure(BATCH_BYTES)
            .map_err(|e| self.own_error(e))?;
        let hout = hin + BATCH_OUT as u64;
        let din = self
            .batch
            .dev
            .ensure(BATCH_BYTES)
            .map_err(|e| self.own_error(e))?;
        let dout = din + BATCH_OUT as u64;
        let run = || -> Result<(), DriverError> {
            if let Some((f, _)) = &self.batch.kernel {
                // SAFETY: both buffers hold BATCH_BYTES >= 8 * n bytes; the
                // host one is not touched again before the synchronize below.
                check(unsafe {
                    sys::cuMemcpyHtoDAsync_v2(din, hin as *const c_void, 8 * n, stream)
                })?;
                let (mut pab, mut pout, mut n32) = (din, dout, n as u32);
                let mut params = [
                    &mut pab as *mut u64 as *mut c_void,
                    &mut pout as *mut u64 as *mut c_void,
                    &mut n32 as *mut u32 as *mut c_void,
                ];
                self.launch(f, (1, 1, 1), (BATCH_SLOTS as u32, 1, 1), &mut params)?;
            } else {
                for k in 0..n {
                    // SAFETY: slot k < n <= BATCH_SLOTS of the pinned buffer
                    // the executor owns; written by batch_chunk.
                    let pair =
                        unsafe { std::slice::from_raw_parts((hin + 8 * k as u64) as *const u8, 8) };
                    let mut a = i32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]);
                    let mut b = i32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]);
                    let mut out = dout + 4 * k as u64;
                    let mut params = [
                        &mut a as *mut i32 as *mut c_void,
                        &mut b as *mut i32 as *mut c_void,
                        &mut out as *mut u64 as *mut c_void,
                    ];
                    self.launch(&self.kernels.scalar_add, (1, 1, 1), (1, 1, 1), &mut params)?;
                }
            }
            // SAFETY: as above, 4 * n result bytes, synchronized right after.
            check(unsafe { sys::cuMemcpyDtoHAsync_v2(hout as *mut c_void, dout, 4 * n, stream) })?;
            self.sync()
        };
        run().map_err(|e| self.own_error(e))
    }
}
