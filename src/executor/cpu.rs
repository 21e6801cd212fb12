//! The CPU executor: the contract's operations done on the host CPU. It is the
//! fallback when no GPU is present and the reference the GPU is checked against.

use std::time::{Duration, Instant};

use super::ops::{self, f32_bytes, f32s};
use super::{past_limit, Executor, Request, Tenant};
use crate::bytes::{Reader, Writer};
use crate::protocol::{DeviceInfo, ExecutorKind, Opcode, Status};

pub struct CpuExecutor {
    gpu_index: u32,
    exec_limit: Duration,
}

impl CpuExecutor {
    pub fn new(gpu_index: u32, exec_limit: Duration) -> Self {
        CpuExecutor {
            gpu_index,
            exec_limit,
        }
    }
}

/// Reference vector add, also used by the GPU tests.
pub fn vector_add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Reference SAXPY: a * x + y, with one rounding like the GPU's fmaf.
pub fn saxpy(a: f32, x: &[f32], y: &[f32]) -> Vec<f32> {
    x.iter().zip(y).map(|(x, y)| a.mul_add(*x, *y)).collect()
}

/// Most multiply-adds (m × n × k) of one SGEMM_F32 on the CPU executor:
/// 2³², about 8.6 GFLOP, a few seconds on a 2-core host at a few GFLOP/s.
/// Larger requests are answered TOO_LARGE at once (an SGEMM 8192³ is 2³⁹:
/// about an hour here). docs/protocol.md lists the limits.
pub const MAX_CPU_GEMM_MACS: u64 = 1 << 32;

/// Reference SGEMM: C (m x n) = A (m x k) * B (k x n), row-major. Blocked
/// i-k-j loops so that it stays usable (a few GFLOP/s) at test sizes.
pub fn sgemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    sgemm_until(m, n, k, a, b, None).unwrap_or_default()
}

/// [`sgemm`] that gives up once `deadline` has passed (checked after every
/// row of every block of k: at most 64 × n multiply-adds apart); `None`
/// then. The loops and so the results are those of `sgemm`.
pub fn sgemm_until(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    deadline: Option<Instant>,
) -> Option<Vec<f32>> {
    const BLK: usize = 64;
    let mut c = vec![0f32; m * n];
    if a.len() < m * k || b.len() < k * n {
        return Some(c);
    }
    for k0 in (0..k).step_by(BLK) {
        let k1 = (k0 + BLK).min(k);
        for i in 0..m {
            if deadline.is_some_and(|d| Instant::now() > d) {
                return None;
            }
            let crow = &mut c[i * n..(i + 1) * n];
            for p in k0..k1 {
                let av = a[i * k + p];
                let brow = &b[p * n..(p + 1) * n];
                for (cv, bv) in crow.iter_mut().zip(brow) {
                    *cv = av.mul_add(*bv, *cv);
                }
            }
        }
    }
    Some(c)
}

impl Executor for CpuExecutor {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            executor: ExecutorKind::Cpu,
            gpu_index: self.gpu_index,
            memory_total: 0,
            compute_capability: 0,
            exec_limit_ms: u32::try_from(self.exec_limit.as_millis()).unwrap_or(u32::MAX),
            name: format!("CPU executor (slot {})", self.gpu_index),
        }
    }

    fn execute(&mut self, _tenant: Tenant, req: &Request, limit: Duration) -> Result<u32, Status> {
        let start = Instant::now();
        let payload = Reader::Guest(&req.payload);
        let mut output = Writer::Guest(&req.output);
        // The result of the heavier operations is written only if it is in time.
        let mut in_time = |out: Vec<u8>| {
            if past_limit(start, limit) {
                Err(Status::Timeout)
            } else {
                output.write_output(&out)
            }
        };
        match req.opcode {
            Opcode::Ping => Ok(0),
            Opcode::GetInfo => ops::write_info(&mut Writer::Guest(&req.output), &self.info()),
            Opcode::BusyWait => {
                let want = ops::busy_wait_duration(payload)?;
                // Sleeping keeps the slot held without burning a host core.
                let deadline = Instant::now() + want.min(limit);
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    std::thread::sleep(left);
                }
                if want > limit {
                    Err(Status::Timeout)
                } else {
                    Ok(0)
                }
            }
            Opcode::ScalarAddI32 => {
                let (a, b) = ops::scalar_add_operands(payload)?;
                in_time(a.wrapping_add(b).to_le_bytes().to_vec())
            }
            Opcode::VectorAddF32 => {
                let n = ops::vector_add_len(payload, req.output.len())?;
                let bytes = payload.to_vec_max(usize::MAX)?;
                let a = f32s(&bytes[8..8 + 4 * n]);
                let b = f32s(&bytes[8 + 4 * n..]);
                in_time(f32_bytes(&vector_add(&a, &b)))
            }
            Opcode::SaxpyF32 => {
                let (n, a) = ops::saxpy_shape(payload, req.output.len())?;
                let bytes = payload.to_vec_max(usize::MAX)?;
                let x = f32s(&bytes[8..8 + 4 * n]);
                let y = f32s(&bytes[8 + 4 * n..]);
                in_time(f32_bytes(&saxpy(a, &x, &y)))
            }
            Opcode::SgemmF32 => {
                let d = ops::sgemm_shape(payload, req.output.len())?;
                let macs = (d.m as u64)
                    .checked_mul(d.n as u64)
                    .and_then(|mn| mn.checked_mul(d.k as u64));
                if macs.is_none_or(|w| w > MAX_CPU_GEMM_MACS) {
                    return Err(Status::TooLarge);
                }
                let bytes = payload.to_vec_max(usize::MAX)?;
                let a = f32s(&bytes[ops::GemmDims::A_OFFSET..d.b_offset()]);
                let b = f32s(&bytes[d.b_offset()..]);
                let c = sgemm_until(d.m, d.n, d.k, &a, &b, Some(start + limit))
                    .ok_or(Status::Timeout)?;
                in_time(f32_bytes(&c))
            }
            // CUDA remoting needs a GPU.
            _ => Err(Status::Unsupported),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_naive() {
        let (m, n, k) = (13, 70, 129);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 3) % 13) as f32 - 6.0).collect();
        let c = sgemm(m, n, k, &a, &b);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
                // Small integers: exact in f32 whatever the order.
                assert_eq!(c[i * n + j], want, "C[{i}][{j}]");
            }
        }
        assert_eq!(sgemm(2, 2, 2, &[1.0], &[1.0]), vec![0.0; 4]);
    }

    /// An SGEMM request of `m, n, k` whose payload and output are made of
    /// overlapping descriptors: a few MiB of guest memory stand for GiBs.
    fn overlapping_sgemm(m: u32, n: u32, k: u32) -> Request {
        use crate::guest::{test_memory, GuestBufs};
        use vm_memory::{Bytes, GuestAddress};
        let mem = test_memory(4 << 20);
        let hdr: Vec<u8> = [m, n, k].iter().flat_map(|v| v.to_le_bytes()).collect();
        mem.write_slice(&hdr, GuestAddress(0)).unwrap();
        let mut payload = GuestBufs::new(mem.clone());
        payload.push(GuestAddress(0), hdr.len()).unwrap();
        let mut left = 4 * (u64::from(m) * u64::from(k) + u64::from(k) * u64::from(n)) as usize;
        while left > 0 {
            let piece = left.min(1 << 20);
            payload.push(GuestAddress(1 << 20), piece).unwrap();
            left -= piece;
        }
        let mut output = GuestBufs::new(mem.clone());
        let mut left = 4 * (u64::from(m) * u64::from(n)) as usize;
        while left > 0 {
            let piece = left.min(1 << 20);
            output.push(GuestAddress(2 << 20), piece).unwrap();
            left -= piece;
        }
        Request {
            opcode: Opcode::SgemmF32,
            tag: 1,
            payload,
            output,
        }
    }

    #[test]
    fn an_sgemm_too_large_for_the_cpu_is_refused_at_once() {
        let tenant = Tenant {
            vm_id: 1,
            gpu_mem_quota: 0,
        };
        let limit = Duration::from_secs(3600);
        let mut cpu = CpuExecutor::new(0, limit);
        // 8192³: accepted by the shape rules (each matrix 64 Mi elements),
        // 2³⁹ multiply-adds: about an hour on this machine.
        let req = overlapping_sgemm(8192, 8192, 8192);
        assert_eq!(cpu.execute(tenant, &req, limit), Err(Status::TooLarge));
        // At the bound it is accepted (shape only checked here).
        let macs = 1024u64 * 2048 * 2048;
        assert!(macs <= MAX_CPU_GEMM_MACS);
    }

    #[test]
    fn a_long_sgemm_checks_its_deadline_inside_the_loops() {
        let (m, n, k) = (64, 64, 256);
        let a = vec![1.0f32; m * k];
        let b = vec![2.0f32; k * n];
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(sgemm_until(m, n, k, &a, &b, Some(past)), None);
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            sgemm_until(m, n, k, &a, &b, Some(far)),
            Some(sgemm(m, n, k, &a, &b))
        );
        // Through the executor: TIMEOUT, the output untouched.
        let tenant = Tenant {
            vm_id: 1,
            gpu_mem_quota: 0,
        };
        let mut cpu = CpuExecutor::new(0, Duration::ZERO);
        let req = overlapping_sgemm(1024, 1024, 1024);
        assert_eq!(
            cpu.execute(tenant, &req, Duration::ZERO),
            Err(Status::Timeout)
        );
    }

    #[test]
    fn saxpy_reference() {
        assert_eq!(saxpy(2.0, &[1.0, -1.0], &[0.5, 4.0]), vec![2.5, 2.0]);
    }
}
