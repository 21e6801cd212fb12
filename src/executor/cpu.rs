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

/// Reference SGEMM: C (m x n) = A (m x k) * B (k x n), row-major. Blocked
/// i-k-j loops so that it stays usable (a few GFLOP/s) at test sizes.
pub fn sgemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    const BLK: usize = 64;
    let mut c = vec![0f32; m * n];
    if a.len() < m * k || b.len() < k * n {
        return c;
    }
    for k0 in (0..k).step_by(BLK) {
        let k1 = (k0 + BLK).min(k);
        for i in 0..m {
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
    c
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
                let bytes = payload.to_vec_max(usize::MAX)?;
                let a = f32s(&bytes[ops::GemmDims::A_OFFSET..d.b_offset()]);
                let b = f32s(&bytes[d.b_offset()..]);
                in_time(f32_bytes(&sgemm(d.m, d.n, d.k, &a, &b)))
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

    #[test]
    fn saxpy_reference() {
        assert_eq!(saxpy(2.0, &[1.0, -1.0], &[0.5, 4.0]), vec![2.5, 2.0]);
    }
}
