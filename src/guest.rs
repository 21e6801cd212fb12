//! Views of guest buffers: a list of guest-physical ranges, checked against the
//! memory map when built, read and written with bounds checks. A view keeps its
//! memory map alive (an `Arc`), so it stays valid after the frontend replaces
//! the memory table, and it can travel to an executor thread.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest RAM as the daemon maps it (the memfd regions of SET_MEM_TABLE).
pub type GuestMem = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange { addr: u64, len: usize },
    #[error("access {off}+{len} past the end of a {size}-byte buffer")]
    PastEnd { off: usize, len: usize, size: usize },
    #[error("guest memory access failed: {0}")]
    Access(#[source] vm_memory::GuestMemoryError),
    #[error("cannot map anonymous guest memory: {0}")]
    Anonymous(#[source] vm_memory::mmap::FromRangesError),
}

/// An ordered list of guest ranges seen as one byte buffer.
#[derive(Clone)]
pub struct GuestBufs {
    mem: Arc<GuestMem>,
    segs: Vec<(GuestAddress, usize)>,
    len: usize,
}

impl std::fmt::Debug for GuestBufs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBufs")
            .field("segs", &self.segs)
            .field("len", &self.len)
            .finish()
    }
}

impl GuestBufs {
    pub fn new(mem: Arc<GuestMem>) -> Self {
        GuestBufs {
            mem,
            segs: Vec::new(),
            len: 0,
        }
    }

    /// Appends a guest range after checking that all of it is guest RAM.
    pub fn push(&mut self, addr: GuestAddress, len: usize) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        if !self.mem.check_range(addr, len) {
            return Err(Error::OutOfRange { addr: addr.0, len });
        }
        self.segs.push((addr, len));
        self.len += len;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// The `len` bytes at `off` as a new view.
    pub fn sub(&self, off: usize, len: usize) -> Result<GuestBufs, Error> {
        self.check(off, len)?;
        let mut out = GuestBufs::new(self.mem.clone());
        for (addr, n) in self.ranges(off, len) {
            out.segs.push((addr, n));
            out.len += n;
        }
        Ok(out)
    }

    /// Everything from `off` to the end as a new view.
    pub fn tail(&self, off: usize) -> Result<GuestBufs, Error> {
        let len = self.len.checked_sub(off).ok_or(Error::PastEnd {
            off,
            len: 0,
            size: self.len,
        })?;
        self.sub(off, len)
    }

    pub fn read_at(&self, off: usize, buf: &mut [u8]) -> Result<(), Error> {
        self.check(off, buf.len())?;
        let mut done = 0;
        for (addr, n) in self.ranges(off, buf.len()) {
            self.mem
                .read_slice(&mut buf[done..done + n], addr)
                .map_err(Error::Access)?;
            done += n;
        }
        Ok(())
    }

    pub fn write_at(&self, off: usize, data: &[u8]) -> Result<(), Error> {
        self.check(off, data.len())?;
        let mut done = 0;
        for (addr, n) in self.ranges(off, data.len()) {
            self.mem
                .write_slice(&data[done..done + n], addr)
                .map_err(Error::Access)?;
            done += n;
        }
        Ok(())
    }

    pub fn to_vec(&self) -> Result<Vec<u8>, Error> {
        let mut v = vec![0u8; self.len];
        self.read_at(0, &mut v)?;
        Ok(v)
    }

    /// Host virtual address ranges behind `len` bytes at `off`, for DMA by an
    /// executor. Valid while `self` (and so the memory map) lives.
    pub fn host_ranges(&self, off: usize, len: usize) -> Result<Vec<(*mut u8, usize)>, Error> {
        self.check(off, len)?;
        let mut out = Vec::new();
        for (addr, n) in self.ranges(off, len) {
            // A descriptor may straddle two memory regions: split it.
            for slice in self.mem.get_slices(addr, n) {
                let slice = slice.map_err(Error::Access)?;
                out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
            }
        }
        Ok(out)
    }

    fn check(&self, off: usize, len: usize) -> Result<(), Error> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::PastEnd {
                off,
                len,
                size: self.len,
            }),
        }
    }

    /// Guest ranges covering `len` bytes from `off` (caller checked bounds).
    fn ranges(
        &self,
        mut off: usize,
        mut len: usize,
    ) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        self.segs.iter().filter_map(move |&(addr, n)| {
            if len == 0 {
                return None;
            }
            if off >= n {
                off -= n;
                return None;
            }
            let take = (n - off).min(len);
            let start = GuestAddress(addr.0 + off as u64);
            off = 0;
            len -= take;
            Some((start, take))
        })
    }
}

/// Anonymous (not file-backed) guest memory with regions at the given guest
/// addresses, for tests and benchmarks that drive an executor directly.
pub fn anonymous_memory(ranges: &[(u64, usize)]) -> Result<Arc<GuestMem>, Error> {
    let ranges: Vec<(GuestAddress, usize)> =
        ranges.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    GuestMem::from_ranges(&ranges)
        .map(Arc::new)
        .map_err(Error::Anonymous)
}

#[cfg(test)]
pub(crate) fn test_memory(size: usize) -> Arc<GuestMem> {
    Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), size)]).expect("anonymous test memory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_reads_and_writes() {
        let mem = test_memory(0x10000);
        let mut b = GuestBufs::new(mem.clone());
        b.push(GuestAddress(0x1000), 3).unwrap();
        b.push(GuestAddress(0x3000), 5).unwrap();
        b.push(GuestAddress(0x2000), 0).unwrap();
        assert_eq!(b.len(), 8);
        b.write_at(0, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 4);
        let mut out = [0u8; 4];
        b.read_at(2, &mut out).unwrap();
        assert_eq!(out, [3, 4, 5, 6]);
        let s = b.sub(2, 4).unwrap();
        assert_eq!(s.to_vec().unwrap(), vec![3, 4, 5, 6]);
        assert_eq!(b.tail(6).unwrap().to_vec().unwrap(), vec![7, 8]);
        assert!(b.read_at(6, &mut out).is_err());
        assert!(b.sub(usize::MAX, 2).is_err());
        assert!(b.tail(9).is_err());
        assert_eq!(b.host_ranges(1, 6).unwrap().len(), 2);
    }

    #[test]
    fn rejects_ranges_outside_memory() {
        let mem = test_memory(0x1000);
        let mut b = GuestBufs::new(mem);
        assert!(b.push(GuestAddress(0xfff), 2).is_err());
        assert!(b.push(GuestAddress(u64::MAX - 1), 8).is_err());
        assert!(b.push(GuestAddress(0xfff), 1).is_ok());
    }
}
