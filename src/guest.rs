//! Views of guest buffers: a list of guest-physical ranges, checked against the
//! memory map when built, read and written with bounds checks. A view keeps its
//! memory map alive (an `Arc`), so it stays valid after the frontend replaces
//! the memory table, and it can travel to an executor thread.
//!
//! Host pointers for DMA come as [`HostRanges`], which owns the mapping guard
//! of every range: under the `xen` feature a guard of a grant (or on-demand
//! foreign) region maps the pages when made and unmaps them when dropped, so
//! a pointer is only valid while its guard lives. `HostRanges` borrows the
//! view it came from, so neither outlives the memory map.

use std::marker::PhantomData;
use std::sync::Arc;

use vm_memory::volatile_memory::PtrGuardMut;
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

    /// The guest-physical ranges of the view, in order (each checked
    /// against the memory map when pushed).
    pub fn segments(&self) -> impl ExactSizeIterator<Item = (u64, usize)> + '_ {
        self.segs.iter().map(|&(a, n)| (a.0, n))
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
    /// executor, with the guards that keep them mapped: a pointer is valid
    /// while the returned value (or the iterator it turns into) lives, which
    /// is at most as long as `self`.
    pub fn host_ranges(&self, off: usize, len: usize) -> Result<HostRanges<'_>, Error> {
        self.check(off, len)?;
        let mut out = HostRanges::default();
        for (addr, n) in self.ranges(off, len) {
            // A descriptor may straddle two memory regions: split it.
            for slice in self.mem.get_slices(addr, n) {
                let slice = slice.map_err(Error::Access)?;
                let guard = slice.ptr_guard_mut();
                out.ranges.push((guard.as_ptr(), slice.len()));
                out.guards.push(guard);
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

/// Host address ranges (`P` is `*mut u8` or `*const u8`) and the mapping
/// guards that keep them valid. Iterate by reference (`ranges.iter()`) to keep
/// the mappings past the loop, e.g. until an asynchronous copy has finished;
/// iterating by value moves the guards into the iterator, so they last until
/// the loop ends.
///
/// ```
/// use vgpu::guest::{anonymous_memory, GuestBufs};
/// use vm_memory::GuestAddress;
/// let mut b = GuestBufs::new(anonymous_memory(&[(0, 0x1000)]).unwrap());
/// b.push(GuestAddress(0), 16).unwrap();
/// let r = b.host_ranges(0, 16).unwrap();
/// assert_eq!(r.iter().map(|(_, n)| n).sum::<usize>(), 16);
/// ```
///
/// It borrows the buffer it was taken from, so it cannot outlive it:
///
/// ```compile_fail,E0515
/// use vgpu::guest::{anonymous_memory, GuestBufs, HostRanges};
/// use vm_memory::GuestAddress;
/// fn outlives() -> HostRanges<'static> {
///     let mut b = GuestBufs::new(anonymous_memory(&[(0, 0x1000)]).unwrap());
///     b.push(GuestAddress(0), 16).unwrap();
///     b.host_ranges(0, 16).unwrap() // error: `b` does not live long enough
/// }
/// ```
pub struct HostRanges<'a, P = *mut u8> {
    ranges: Vec<(P, usize)>,
    // Never read: dropping one unmaps its range (grant mappings under `xen`).
    guards: Vec<PtrGuardMut>,
    _buf: PhantomData<&'a ()>,
}

impl<P> Default for HostRanges<'_, P> {
    fn default() -> Self {
        HostRanges {
            ranges: Vec::new(),
            guards: Vec::new(),
            _buf: PhantomData,
        }
    }
}

impl<'a, P: Copy> HostRanges<'a, P> {
    /// One range of host memory that needs no guard (plain bytes of the
    /// process), valid for `'a`.
    pub fn unguarded(ptr: P, len: usize) -> Self {
        HostRanges {
            ranges: vec![(ptr, len)],
            ..Default::default()
        }
    }

    /// The ranges; the pointers are valid while `self` lives.
    pub fn iter(&self) -> impl Iterator<Item = (P, usize)> + '_ {
        self.ranges.iter().copied()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The same ranges and guards with another pointer type (e.g. read-only).
    pub fn map_ptr<Q>(self, f: impl Fn(P) -> Q) -> HostRanges<'a, Q> {
        HostRanges {
            ranges: self.ranges.into_iter().map(|(p, n)| (f(p), n)).collect(),
            guards: self.guards,
            _buf: PhantomData,
        }
    }
}

impl<P> std::fmt::Debug for HostRanges<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRanges")
            .field("ranges", &self.ranges.len())
            .field("guards", &self.guards.len())
            .finish()
    }
}

/// [`HostRanges`] by value: the iterator owns the guards.
pub struct HostRangesIter<'a, P> {
    ranges: std::vec::IntoIter<(P, usize)>,
    _guards: Vec<PtrGuardMut>,
    _buf: PhantomData<&'a ()>,
}

impl<P> Iterator for HostRangesIter<'_, P> {
    type Item = (P, usize);
    fn next(&mut self) -> Option<(P, usize)> {
        self.ranges.next()
    }
}

impl<'a, P> IntoIterator for HostRanges<'a, P> {
    type Item = (P, usize);
    type IntoIter = HostRangesIter<'a, P>;
    fn into_iter(self) -> HostRangesIter<'a, P> {
        HostRangesIter {
            ranges: self.ranges.into_iter(),
            _guards: self.guards,
            _buf: PhantomData,
        }
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
    fn host_ranges_hold_a_guard_per_range() {
        // Two regions: a range across their border is split in two.
        let mem = anonymous_memory(&[(0, 0x1000), (0x1000, 0x1000)]).unwrap();
        let mut b = GuestBufs::new(mem.clone());
        b.push(GuestAddress(0xff0), 0x20).unwrap();
        b.write_at(0, &[7u8; 0x20]).unwrap();
        let r = b.host_ranges(0, 0x20).unwrap();
        assert_eq!((r.len(), r.guards.len()), (2, 2));
        assert_eq!(r.iter().map(|(_, n)| n).collect::<Vec<_>>(), [0x10, 0x10]);
        for (p, n) in r.iter() {
            // SAFETY: `p..p+n` is guest memory kept mapped by `r`'s guards.
            let s = unsafe { std::slice::from_raw_parts(p, n) };
            assert!(s.iter().all(|&x| x == 7));
        }
        // Read-only view and the by-value iterator keep the guards with them.
        let ro = r.map_ptr(|p| p as *const u8);
        assert_eq!(ro.guards.len(), 2);
        let it = ro.into_iter();
        assert_eq!(it._guards.len(), 2);
        assert_eq!(it.map(|(_, n)| n).sum::<usize>(), 0x20);
        assert!(b.host_ranges(0x10, 0x11).is_err());
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
