//! A request's payload and output as executors see them: a [`Reader`] and a
//! [`Writer`] over guest memory (a [`GuestBufs`] view, the daemon's case) or
//! over plain bytes (the CUDA worker process, which gets the payload through
//! its pipe). Executors parse, copy and DMA through these, so the same code
//! runs in both places without building stand-in guest memory. Reads and
//! writes are at offsets: the operations need random access (a vector add
//! reads its second array at `8 + 4n`).

use vm_memory::ByteValued;

use crate::guest::{GuestBufs, HostRanges};
use crate::protocol::Status;

/// Read access to a request's payload.
#[derive(Clone, Copy)]
pub enum Reader<'a> {
    Guest(&'a GuestBufs),
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    pub fn len(&self) -> usize {
        match self {
            Reader::Guest(b) => b.len(),
            Reader::Bytes(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from offset `off`; BAD_REQUEST past the end.
    pub fn read_at(&self, off: usize, buf: &mut [u8]) -> Result<(), Status> {
        match self {
            Reader::Guest(b) => b.read_at(off, buf).map_err(|_| Status::BadRequest),
            Reader::Bytes(b) => {
                let src = off
                    .checked_add(buf.len())
                    .and_then(|end| b.get(off..end))
                    .ok_or(Status::BadRequest)?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// The wire struct at `off`.
    pub fn read_obj<T: ByteValued + Default>(&self, off: usize) -> Result<T, Status> {
        let mut v = T::default();
        self.read_at(off, v.as_mut_slice())?;
        Ok(v)
    }

    /// The whole payload, after checking it is at most `max` bytes (so that
    /// a guest's length costs memory only once it is known to be allowed).
    pub fn to_vec_max(&self, max: usize) -> Result<Vec<u8>, Status> {
        if self.len() > max {
            return Err(Status::TooLarge);
        }
        let mut v = vec![0u8; self.len()];
        self.read_at(0, &mut v)?;
        Ok(v)
    }

    /// Host address ranges behind `len` bytes at `off`, for a DMA engine;
    /// valid while the returned ranges live (they hold the mapping guards, see
    /// [`HostRanges`]) and never longer than the reader's source.
    pub fn host_ranges(&self, off: usize, len: usize) -> Result<HostRanges<'a, *const u8>, Status> {
        match *self {
            Reader::Guest(b) => Ok(b
                .host_ranges(off, len)
                .map_err(|_| Status::BadRequest)?
                .map_ptr(|p| p as *const u8)),
            Reader::Bytes(b) => {
                let s = off
                    .checked_add(len)
                    .and_then(|end| b.get(off..end))
                    .ok_or(Status::BadRequest)?;
                Ok(HostRanges::unguarded(s.as_ptr(), s.len()))
            }
        }
    }

    /// The guest view, when the payload is in guest memory.
    pub fn guest(&self) -> Option<&'a GuestBufs> {
        match self {
            Reader::Guest(b) => Some(b),
            Reader::Bytes(_) => None,
        }
    }
}

/// Write access to a request's output.
pub enum Writer<'a> {
    Guest(&'a GuestBufs),
    Bytes(&'a mut [u8]),
}

impl<'a> Writer<'a> {
    /// Bytes the output can hold.
    pub fn capacity(&self) -> usize {
        match self {
            Writer::Guest(b) => b.len(),
            Writer::Bytes(b) => b.len(),
        }
    }

    /// Writes `data` at the start of the output and returns its length as
    /// the response's `output_len`; TOO_LARGE when it does not fit.
    pub fn write_output(&mut self, data: &[u8]) -> Result<u32, Status> {
        self.write_at(0, data)?;
        u32::try_from(data.len()).map_err(|_| Status::TooLarge)
    }

    /// Writes `data` at offset `off`; TOO_LARGE past the end.
    pub fn write_at(&mut self, off: usize, data: &[u8]) -> Result<(), Status> {
        let end = off.checked_add(data.len()).ok_or(Status::TooLarge)?;
        if end > self.capacity() {
            return Err(Status::TooLarge);
        }
        match self {
            Writer::Guest(b) => b.write_at(off, data).map_err(|_| Status::BadRequest),
            Writer::Bytes(b) => {
                b.get_mut(off..end)
                    .ok_or(Status::TooLarge)?
                    .copy_from_slice(data);
                Ok(())
            }
        }
    }

    /// Host address ranges behind `len` output bytes at `off`, for a DMA
    /// engine; valid while the returned ranges live (they hold the mapping
    /// guards) and never longer than the writer's destination.
    pub fn host_ranges(
        &mut self,
        off: usize,
        len: usize,
    ) -> Result<HostRanges<'_, *mut u8>, Status> {
        match self {
            Writer::Guest(b) => b.host_ranges(off, len).map_err(|_| Status::TooLarge),
            Writer::Bytes(b) => {
                let s = off
                    .checked_add(len)
                    .and_then(|end| b.get_mut(off..end))
                    .ok_or(Status::TooLarge)?;
                Ok(HostRanges::unguarded(s.as_mut_ptr(), s.len()))
            }
        }
    }

    /// The guest view, when the output is in guest memory.
    pub fn guest(&self) -> Option<&'a GuestBufs> {
        match self {
            Writer::Guest(b) => Some(b),
            Writer::Bytes(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::test_memory;
    use vm_memory::endian::Le32;
    use vm_memory::GuestAddress;

    #[test]
    fn guest_and_bytes_read_the_same() {
        let mem = test_memory(0x4000);
        let mut g = GuestBufs::new(mem);
        g.push(GuestAddress(0x1000), 3).unwrap();
        g.push(GuestAddress(0x2000), 5).unwrap();
        g.write_at(0, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let plain = [1u8, 2, 3, 4, 5, 6, 7, 8];
        for r in [Reader::Guest(&g), Reader::Bytes(&plain)] {
            assert_eq!(r.len(), 8);
            let v: Le32 = r.read_obj(2).unwrap();
            assert_eq!(u32::from(v), u32::from_le_bytes([3, 4, 5, 6]));
            assert_eq!(r.read_obj::<Le32>(5), Err(Status::BadRequest));
            assert_eq!(r.to_vec_max(8).unwrap(), plain.to_vec());
            assert_eq!(r.to_vec_max(7), Err(Status::TooLarge));
            let total: usize = r.host_ranges(1, 6).unwrap().iter().map(|(_, n)| n).sum();
            assert_eq!(total, 6);
            assert!(r.host_ranges(usize::MAX, 2).is_err());
        }
    }

    #[test]
    fn writers_bound_their_output() {
        let mut out = [0u8; 4];
        let mut w = Writer::Bytes(&mut out);
        assert_eq!(w.write_output(&[9, 9, 9]), Ok(3));
        assert_eq!(w.write_output(&[0; 5]), Err(Status::TooLarge));
        assert_eq!(w.write_at(usize::MAX, &[1]), Err(Status::TooLarge));
        assert_eq!(w.host_ranges(2, 2).unwrap().len(), 1);
        assert!(w.host_ranges(3, 2).is_err());
        assert_eq!(out, [9, 9, 9, 0]);
        let mem = test_memory(0x2000);
        let mut g = GuestBufs::new(mem);
        g.push(GuestAddress(0x1000), 4).unwrap();
        let mut w = Writer::Guest(&g);
        assert_eq!(w.write_output(&[1, 2, 3, 4]), Ok(4));
        assert_eq!(w.write_output(&[1, 2, 3, 4, 5]), Err(Status::TooLarge));
        assert_eq!(g.to_vec().unwrap(), vec![1, 2, 3, 4]);
    }
}
