//! A VM's guest memory in its own worker process. The daemon got the VM's
//! RAM as memfds in SET_MEM_TABLE; it passes those fds (of the VM the worker
//! serves, never another's) to the worker over the worker's stdin socket
//! with `SCM_RIGHTS`, and the worker maps them shared, read/write, so that
//! MEMCPY_HTOD/DTOH (and the CUDA API's copies) DMA straight between guest
//! pages and device memory instead of crossing the pipe twice (measured on
//! the H200: 0.7-1.0 GB/s through the pipe, 55 GB/s pinned).
//!
//! The worker then registers the mapping with `cuMemHostRegister` on a
//! thread of its own, in 64 MiB pieces (`WORKER_REG_CHUNK`; only this VM's
//! calls share the process's driver, and only they wait for it); until that ends, and for good if it fails, the
//! copies go from the same pages through the driver's own staging buffers.
//! A VM with `register=staging` is never pinned: its worker maps the table
//! but does not register it.
//!
//! The worker does not trust its parent blindly either: it checks each fd's
//! size against its region, and every guest range of a call against its own
//! table (`GuestBufs::push`) before it touches a byte.
//!
//! Not under the `xen` feature: there guest memory is foreign mappings, not
//! memfds, and the calls keep crossing the pipe.

use std::io;
use std::os::fd::{OwnedFd, RawFd};

use super::wire::{RegionWire, MAX_REGIONS};

/// Sends `bytes` and `fds` in one message on the stream socket `sock`.
pub fn send_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_REGIONS || bytes.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "fds"));
    }
    // One byte (the only use): a short send cannot happen.
    if crate::scm::send(sock, bytes, fds)? == bytes.len() {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::WriteZero, "short sendmsg"))
    }
}

/// Receives one byte and up to `max` fds (close-on-exec) from `sock`.
/// Fewer fds than announced, or a truncated control message, is an error
/// (the fds that did arrive are closed).
pub fn recv_fds(sock: RawFd, max: usize) -> io::Result<Vec<OwnedFd>> {
    let max = max.min(MAX_REGIONS);
    let mut byte = [0u8; 1];
    let r = crate::scm::recv(sock, &mut byte, max)?;
    if r.len != 1 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "no fd message",
        ));
    }
    // The control buffer's alignment may leave room for one more fd.
    if r.truncated || r.fds.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "too many fds"));
    }
    Ok(r.fds)
}

/// The regions of `mem` and their fds, when every region is backed by a
/// file (memfd guest RAM) and there are few enough to pass at once.
#[cfg(not(feature = "xen"))]
pub fn table_of(mem: &crate::guest::GuestMem) -> Option<(Vec<RegionWire>, Vec<RawFd>)> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut regions = Vec::new();
    let mut fds = Vec::new();
    for r in mem.iter() {
        let f = r.file_offset()?;
        regions.push(RegionWire {
            guest_addr: r.start_addr().0.into(),
            size: r.len().into(),
            file_offset: f.start().into(),
        });
        fds.push(f.file().as_raw_fd());
    }
    (!regions.is_empty() && regions.len() <= MAX_REGIONS).then_some((regions, fds))
}

/// Under `xen` guest memory is not memfds: nothing to pass.
#[cfg(feature = "xen")]
pub fn table_of(_mem: &crate::guest::GuestMem) -> Option<(Vec<RegionWire>, Vec<RawFd>)> {
    None
}

/// Total bytes of a table's regions; `None` on overflow.
pub fn table_bytes(regions: &[RegionWire]) -> Option<u64> {
    regions
        .iter()
        .try_fold(0u64, |t, r| t.checked_add(u64::from(r.size)))
}

/// Maps a received table: one shared read/write mapping per region, after
/// checking that each fd holds its region (a mapping past the end of a
/// file would fault on access) and that regions do not overlap.
#[cfg(not(feature = "xen"))]
pub fn map_table(
    regions: &[RegionWire],
    fds: Vec<OwnedFd>,
) -> io::Result<std::sync::Arc<crate::guest::GuestMem>> {
    use vm_memory::{FileOffset, GuestAddress};
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if fds.len() != regions.len() {
        return Err(bad("fd count differs from the table"));
    }
    let mut ranges = Vec::with_capacity(regions.len());
    for (r, fd) in regions.iter().zip(fds) {
        let file = std::fs::File::from(fd);
        let (start, size, off) = (
            u64::from(r.guest_addr),
            u64::from(r.size),
            u64::from(r.file_offset),
        );
        let len = file.metadata()?.len();
        if off.checked_add(size).is_none_or(|end| end > len) {
            return Err(bad("region past the end of its file"));
        }
        if start.checked_add(size).is_none() {
            return Err(bad("region past the end of the address space"));
        }
        let size = usize::try_from(size).map_err(|_| bad("region size"))?;
        ranges.push((GuestAddress(start), size, Some(FileOffset::new(file, off))));
    }
    ranges.sort_by_key(|r| r.0);
    crate::guest::GuestMem::from_ranges_with_files(ranges)
        .map(std::sync::Arc::new)
        .map_err(|e| io::Error::other(format!("map guest memory: {e}")))
}

#[cfg(feature = "xen")]
pub fn map_table(
    _regions: &[RegionWire],
    _fds: Vec<OwnedFd>,
) -> io::Result<std::sync::Arc<crate::guest::GuestMem>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "guest memory tables are not passed under xen",
    ))
}

#[cfg(all(test, not(feature = "xen")))]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: a NUL-terminated name; the new fd is ours.
        let fd = unsafe { libc::memfd_create(c"vgpu-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn a_memfd_table_crosses_a_socketpair_and_maps_the_same_pages() {
        use vm_memory::FileOffset;
        let a = memfd(0x4000);
        let b = memfd(0x3000);
        let mem = crate::guest::GuestMem::from_ranges_with_files([
            (GuestAddress(0), 0x4000, Some(FileOffset::new(a, 0))),
            (
                GuestAddress(0x10_0000),
                0x2000,
                Some(FileOffset::new(b, 0x1000)),
            ),
        ])
        .unwrap();
        let (regions, fds) = table_of(&mem).expect("memfd regions");
        assert_eq!(regions.len(), 2);
        assert_eq!(table_bytes(&regions), Some(0x6000));
        let (tx, rx) = UnixStream::pair().unwrap();
        send_fds(tx.as_raw_fd(), &[0], &fds).unwrap();
        let got = recv_fds(rx.as_raw_fd(), regions.len()).unwrap();
        assert_eq!(got.len(), 2);
        for fd in &got {
            // SAFETY: F_GETFD only reads flags.
            let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(fl & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
        let theirs = map_table(&regions, got).unwrap();
        // Shared: a write on either side is seen on the other.
        mem.write_slice(&[7, 8], GuestAddress(0x3ffe)).unwrap();
        let mut two = [0u8; 2];
        theirs.read_slice(&mut two, GuestAddress(0x3ffe)).unwrap();
        assert_eq!(two, [7, 8]);
        theirs.write_slice(&[9], GuestAddress(0x10_1fff)).unwrap();
        let mut one = [0u8; 1];
        mem.read_slice(&mut one, GuestAddress(0x10_1fff)).unwrap();
        assert_eq!(one, [9]);
        assert!(!theirs.check_range(GuestAddress(0x10_1fff), 2));
        assert!(!theirs.check_range(GuestAddress(0x4000), 1));
    }

    #[test]
    fn bad_tables_are_refused() {
        let f = memfd(0x1000);
        let r = |addr: u64, size: u64, off: u64| RegionWire {
            guest_addr: addr.into(),
            size: size.into(),
            file_offset: off.into(),
        };
        let fd = || OwnedFd::from(f.try_clone().unwrap());
        // Past the end of the file, or with the offset pushing it there.
        assert!(map_table(&[r(0, 0x2000, 0)], vec![fd()]).is_err());
        assert!(map_table(&[r(0, 0x1000, 1)], vec![fd()]).is_err());
        assert!(map_table(&[r(0, 0x1000, u64::MAX)], vec![fd()]).is_err());
        // Fewer fds than regions; overlapping regions.
        assert!(map_table(&[r(0, 0x1000, 0), r(0x1000, 0x1000, 0)], vec![fd()]).is_err());
        assert!(map_table(&[r(0, 0x1000, 0), r(0x800, 0x800, 0)], vec![fd(), fd()]).is_err());
        assert!(map_table(&[r(u64::MAX - 0xfff, 0x1000, 0)], vec![fd()]).is_err());
        assert!(map_table(&[r(0, 0x1000, 0)], vec![fd()]).is_ok());
        // Announcing more fds than sent, or sending more than asked for.
        let (tx, rx) = UnixStream::pair().unwrap();
        send_fds(tx.as_raw_fd(), &[0], &[f.as_raw_fd(), f.as_raw_fd()]).unwrap();
        assert!(recv_fds(rx.as_raw_fd(), 1).is_err());
        drop(tx);
        assert!(recv_fds(rx.as_raw_fd(), 1).is_err(), "end of stream");
    }
}
