//! The CPU executor: the contract's operations done on the host CPU. It is the
//! fallback when no GPU is present and the reference the GPU is checked against.

use std::time::{Duration, Instant};

use super::{ops, Executor, Request};
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

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
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

    fn execute(&mut self, req: &Request, limit: Duration) -> Result<u32, Status> {
        match req.opcode {
            Opcode::Ping => Ok(0),
            Opcode::GetInfo => ops::write_info(&req.output, &self.info()),
            Opcode::BusyWait => {
                let want = ops::busy_wait_duration(&req.payload)?;
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
                let (a, b) = ops::scalar_add_operands(&req.payload)?;
                ops::write_output(&req.output, &a.wrapping_add(b).to_le_bytes())
            }
            Opcode::VectorAddF32 => {
                let n = ops::vector_add_len(&req.payload, &req.output)?;
                let bytes = req.payload.to_vec().map_err(|_| Status::BadRequest)?;
                let a = f32s(&bytes[8..8 + 4 * n]);
                let b = f32s(&bytes[8 + 4 * n..]);
                let out: Vec<u8> = vector_add(&a, &b)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                ops::write_output(&req.output, &out)
            }
        }
    }
}
