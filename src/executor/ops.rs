//! Payload decoding and output encoding of the built-in operations, shared by
//! every executor so that they accept and reject exactly the same requests.

use std::time::Duration;

use crate::guest::GuestBufs;
use crate::protocol::{DeviceInfo, Status};

/// Largest VECTOR_ADD_F32 element count (128 MiB of payload).
pub const MAX_VECTOR_LEN: u32 = 16 << 20;

fn read_exact<const N: usize>(payload: &GuestBufs) -> Result<[u8; N], Status> {
    if payload.len() != N {
        return Err(Status::BadRequest);
    }
    let mut b = [0u8; N];
    payload.read_at(0, &mut b).map_err(|_| Status::BadRequest)?;
    Ok(b)
}

/// BUSY_WAIT payload: le64 nanoseconds.
pub fn busy_wait_duration(payload: &GuestBufs) -> Result<Duration, Status> {
    Ok(Duration::from_nanos(u64::from_le_bytes(read_exact::<8>(
        payload,
    )?)))
}

/// SCALAR_ADD_I32 payload: le32 a, le32 b.
pub fn scalar_add_operands(payload: &GuestBufs) -> Result<(i32, i32), Status> {
    let b = read_exact::<8>(payload)?;
    Ok((
        i32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ))
}

/// Writes a little-endian result that must fit the output buffer.
pub fn write_output(output: &GuestBufs, bytes: &[u8]) -> Result<u32, Status> {
    if output.len() < bytes.len() {
        return Err(Status::TooLarge);
    }
    output.write_at(0, bytes).map_err(|_| Status::BadRequest)?;
    u32::try_from(bytes.len()).map_err(|_| Status::TooLarge)
}

/// VECTOR_ADD_F32 shape: payload le32 n, le32 0, f32 a[n], f32 b[n]; output
/// holds n f32. Returns n after checking lengths and the output size.
pub fn vector_add_len(payload: &GuestBufs, output: &GuestBufs) -> Result<usize, Status> {
    if payload.len() < 8 {
        return Err(Status::BadRequest);
    }
    let mut b = [0u8; 8];
    payload.read_at(0, &mut b).map_err(|_| Status::BadRequest)?;
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let pad = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    if pad != 0 {
        return Err(Status::BadRequest);
    }
    if n > MAX_VECTOR_LEN {
        return Err(Status::TooLarge);
    }
    let n = n as usize;
    if payload.len() != 8 + 8 * n {
        return Err(Status::BadRequest);
    }
    if output.len() < 4 * n {
        return Err(Status::TooLarge);
    }
    Ok(n)
}

/// GET_INFO output.
pub fn write_info(output: &GuestBufs, info: &DeviceInfo) -> Result<u32, Status> {
    write_output(output, &info.encode())
}
