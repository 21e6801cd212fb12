//! Payload decoding and output encoding of the built-in operations, shared by
//! every executor so that they accept and reject exactly the same requests.
//! Payload headers are the contract's wire structs; payloads are read
//! through a [`Reader`], so guest memory and plain bytes parse alike.

use std::time::Duration;

use vm_memory::endian::{Le32, Le64};
use vm_memory::ByteValued;

use crate::bytes::{Reader, Writer};
use crate::protocol::{DeviceInfo, Status};

/// Largest VECTOR_ADD_F32 / SAXPY_F32 element count (128 MiB of payload).
pub const MAX_VECTOR_LEN: u32 = 16 << 20;
/// Largest element count of one SGEMM_F32 matrix (A, B or C): 8192 x 8192
/// floats, 256 MiB.
pub const MAX_MATRIX_ELEMS: u64 = 64 << 20;

/// BUSY_WAIT payload.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BusyWaitWire {
    pub ns: Le64,
}

/// SCALAR_ADD_I32 payload.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ScalarAddWire {
    pub a: Le32,
    pub b: Le32,
}

/// Header of VECTOR_ADD_F32 and SAXPY_F32: the element count and a word
/// (0 for VECTOR_ADD, the f32 `a` of SAXPY); two arrays of n f32 follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VectorsWire {
    pub n: Le32,
    pub word: Le32,
}

/// Header of SGEMM_F32; A and B follow.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SgemmWire {
    pub m: Le32,
    pub n: Le32,
    pub k: Le32,
}

// SAFETY: little-endian integers without padding; any bit pattern is valid.
unsafe impl ByteValued for BusyWaitWire {}
// SAFETY: as above.
unsafe impl ByteValued for ScalarAddWire {}
// SAFETY: as above.
unsafe impl ByteValued for VectorsWire {}
// SAFETY: as above.
unsafe impl ByteValued for SgemmWire {}

/// A payload that is exactly one wire struct.
fn exact<T: ByteValued + Default>(payload: Reader) -> Result<T, Status> {
    if payload.len() != std::mem::size_of::<T>() {
        return Err(Status::BadRequest);
    }
    payload.read_obj(0)
}

/// BUSY_WAIT payload: le64 nanoseconds.
pub fn busy_wait_duration(payload: Reader) -> Result<Duration, Status> {
    Ok(Duration::from_nanos(
        exact::<BusyWaitWire>(payload)?.ns.into(),
    ))
}

/// SCALAR_ADD_I32 payload: le32 a, le32 b.
pub fn scalar_add_operands(payload: Reader) -> Result<(i32, i32), Status> {
    let w = exact::<ScalarAddWire>(payload)?;
    Ok((u32::from(w.a) as i32, u32::from(w.b) as i32))
}

/// Shape shared by VECTOR_ADD_F32 and SAXPY_F32: returns n and the word
/// after checking lengths and the output size.
fn two_vectors(payload: Reader, out_cap: usize) -> Result<(usize, u32), Status> {
    let h: VectorsWire = payload.read_obj(0)?;
    let n = u32::from(h.n);
    if n > MAX_VECTOR_LEN {
        return Err(Status::TooLarge);
    }
    let n = n as usize;
    if payload.len() != std::mem::size_of::<VectorsWire>() + 8 * n {
        return Err(Status::BadRequest);
    }
    if out_cap < 4 * n {
        return Err(Status::TooLarge);
    }
    Ok((n, h.word.into()))
}

/// VECTOR_ADD_F32: payload le32 n, le32 0, f32 a[n], f32 b[n]. Returns n.
pub fn vector_add_len(payload: Reader, out_cap: usize) -> Result<usize, Status> {
    match two_vectors(payload, out_cap)? {
        (n, 0) => Ok(n),
        _ => Err(Status::BadRequest),
    }
}

/// SAXPY_F32: payload le32 n, f32 a, f32 x[n], f32 y[n]. Returns n and a.
pub fn saxpy_shape(payload: Reader, out_cap: usize) -> Result<(usize, f32), Status> {
    let (n, a) = two_vectors(payload, out_cap)?;
    Ok((n, f32::from_bits(a)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl GemmDims {
    /// Byte offset of A in the payload.
    pub const A_OFFSET: usize = std::mem::size_of::<SgemmWire>();
    pub fn a_bytes(&self) -> usize {
        4 * self.m * self.k
    }
    pub fn b_bytes(&self) -> usize {
        4 * self.k * self.n
    }
    pub fn c_bytes(&self) -> usize {
        4 * self.m * self.n
    }
    /// Byte offset of B in the payload.
    pub fn b_offset(&self) -> usize {
        Self::A_OFFSET + self.a_bytes()
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// SGEMM_F32 shape: payload le32 m, n, k, f32 A[m*k], f32 B[k*n] (row-major);
/// output holds m*n f32. Every dimension is at least 1 and every matrix at
/// most `MAX_MATRIX_ELEMS` elements.
pub fn sgemm_shape(payload: Reader, out_cap: usize) -> Result<GemmDims, Status> {
    let h: SgemmWire = payload.read_obj(0)?;
    let (m, n, k) = (
        u64::from(u32::from(h.m) & !crate::protocol::SGEMM_TF32),
        u64::from(u32::from(h.n)),
        u64::from(u32::from(h.k)),
    );
    if m == 0 || n == 0 || k == 0 {
        return Err(Status::BadRequest);
    }
    if m * k > MAX_MATRIX_ELEMS || k * n > MAX_MATRIX_ELEMS || m * n > MAX_MATRIX_ELEMS {
        return Err(Status::TooLarge);
    }
    let d = GemmDims {
        m: m as usize,
        n: n as usize,
        k: k as usize,
    };
    if payload.len() != GemmDims::A_OFFSET + d.a_bytes() + d.b_bytes() {
        return Err(Status::BadRequest);
    }
    if out_cap < d.c_bytes() {
        return Err(Status::TooLarge);
    }
    Ok(d)
}

/// True when an SGEMM_F32 payload asks for TF32 math (bit 31 of `m`,
/// [`SGEMM_TF32`](crate::protocol::SGEMM_TF32)).
pub fn sgemm_tf32(payload: Reader) -> Result<bool, Status> {
    let h: SgemmWire = payload.read_obj(0)?;
    Ok(u32::from(h.m) & crate::protocol::SGEMM_TF32 != 0)
}

/// Little-endian f32s of a byte slice (a trailing partial float is ignored).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// f32s as little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// GET_INFO output.
pub fn write_info(output: &mut Writer, info: &DeviceInfo) -> Result<u32, Status> {
    output.write_output(&info.encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{test_memory, GuestBufs};
    use vm_memory::GuestAddress;

    fn bufs(mem: &std::sync::Arc<crate::guest::GuestMem>, at: u64, bytes: &[u8]) -> GuestBufs {
        let mut b = GuestBufs::new(mem.clone());
        b.push(GuestAddress(at), bytes.len()).unwrap();
        b.write_at(0, bytes).unwrap();
        b
    }

    // The shapes as the executors call them, on guest views.
    fn saxpy_shape(p: &GuestBufs, o: &GuestBufs) -> Result<(usize, f32), Status> {
        super::saxpy_shape(Reader::Guest(p), o.len())
    }
    fn sgemm_shape(p: &GuestBufs, o: &GuestBufs) -> Result<GemmDims, Status> {
        super::sgemm_shape(Reader::Guest(p), o.len())
    }

    fn out(mem: &std::sync::Arc<crate::guest::GuestMem>, at: u64, len: usize) -> GuestBufs {
        let mut b = GuestBufs::new(mem.clone());
        b.push(GuestAddress(at), len).unwrap();
        b
    }

    #[test]
    fn saxpy_shapes() {
        let mem = test_memory(1 << 20);
        let mut p = 2u32.to_le_bytes().to_vec();
        p.extend(2.5f32.to_le_bytes());
        p.extend(f32_bytes(&[1.0, 2.0, 3.0, 4.0]));
        let pb = bufs(&mem, 0, &p);
        assert_eq!(saxpy_shape(&pb, &out(&mem, 0x8000, 8)), Ok((2, 2.5)));
        assert_eq!(
            saxpy_shape(&pb, &out(&mem, 0x8000, 7)),
            Err(Status::TooLarge)
        );
        let short = bufs(&mem, 0x1000, &p[..p.len() - 1]);
        assert_eq!(
            saxpy_shape(&short, &out(&mem, 0x8000, 8)),
            Err(Status::BadRequest)
        );
        let mut huge = (MAX_VECTOR_LEN + 1).to_le_bytes().to_vec();
        huge.extend(1.0f32.to_le_bytes());
        assert_eq!(
            saxpy_shape(&bufs(&mem, 0x2000, &huge), &out(&mem, 0x8000, 8)),
            Err(Status::TooLarge)
        );
        assert_eq!(
            saxpy_shape(&bufs(&mem, 0x2000, &[0; 4]), &out(&mem, 0x8000, 8)),
            Err(Status::BadRequest)
        );
    }

    fn gemm_payload(m: u32, n: u32, k: u32, extra: usize) -> Vec<u8> {
        let mut p = Vec::new();
        for v in [m, n, k] {
            p.extend(v.to_le_bytes());
        }
        p.resize(12 + 4 * (m * k + k * n) as usize + extra, 0);
        p
    }

    #[test]
    fn sgemm_shapes() {
        let mem = test_memory(1 << 20);
        let p = gemm_payload(3, 5, 7, 0);
        let d = sgemm_shape(&bufs(&mem, 0, &p), &out(&mem, 0x8000, 60)).unwrap();
        assert_eq!(d, GemmDims { m: 3, n: 5, k: 7 });
        assert_eq!(d.b_offset(), 12 + 84);
        assert_eq!(d.c_bytes(), 60);
        assert_eq!(d.flops(), 210.0);
        assert_eq!(
            sgemm_shape(&bufs(&mem, 0, &p), &out(&mem, 0x8000, 59)),
            Err(Status::TooLarge)
        );
        let p = gemm_payload(3, 5, 7, 1);
        assert_eq!(
            sgemm_shape(&bufs(&mem, 0, &p), &out(&mem, 0x8000, 60)),
            Err(Status::BadRequest)
        );
        let p = gemm_payload(0, 5, 7, 0);
        assert_eq!(
            sgemm_shape(&bufs(&mem, 0, &p), &out(&mem, 0x8000, 60)),
            Err(Status::BadRequest)
        );
        // 16384 x 16384 A is past the limit; the payload is never read.
        let mut p = Vec::new();
        for v in [16384u32, 1, 16384] {
            p.extend(v.to_le_bytes());
        }
        assert_eq!(
            sgemm_shape(&bufs(&mem, 0, &p), &out(&mem, 0x8000, 60)),
            Err(Status::TooLarge)
        );
        // u32::MAX dimensions do not overflow.
        let mut p = Vec::new();
        for v in [u32::MAX, u32::MAX, u32::MAX] {
            p.extend(v.to_le_bytes());
        }
        assert_eq!(
            sgemm_shape(&bufs(&mem, 0, &p), &out(&mem, 0x8000, 60)),
            Err(Status::TooLarge)
        );
        assert_eq!(
            sgemm_shape(&bufs(&mem, 0, &[1, 2]), &out(&mem, 0x8000, 60)),
            Err(Status::BadRequest)
        );
    }

    #[test]
    fn sgemm_tf32_flag() {
        let mem = test_memory(1 << 20);
        let mut p = gemm_payload(3, 5, 7, 0);
        assert_eq!(
            super::sgemm_tf32(Reader::Guest(&bufs(&mem, 0, &p))),
            Ok(false)
        );
        p[3] |= 0x80; // bit 31 of m
        let b = bufs(&mem, 0, &p);
        assert_eq!(super::sgemm_tf32(Reader::Guest(&b)), Ok(true));
        // The flag is not part of m.
        assert_eq!(
            sgemm_shape(&b, &out(&mem, 0x8000, 60)),
            Ok(GemmDims { m: 3, n: 5, k: 7 })
        );
    }
}
