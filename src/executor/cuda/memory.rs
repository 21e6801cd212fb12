//! Memory of the CUDA executor: buffers that grow on demand (device memory
//! and pinned host memory, one type), guest-memory registration for
//! zero-copy DMA, and the copies in and out of guest memory that use it or
//! fall back to staging through pinned memory.
//!
//! Registration: [`Executor::map_guest_memory`](crate::executor::Executor)
//! registers every region of a VM's memory table with `cuMemHostRegister` (in
//! [`REG_CHUNK`] pieces, paced: see there), so
//! payloads and outputs move by DMA straight from and to guest pages, one
//! `cuMemcpy*Async` per host range. Registration pins the whole table. It
//! happens in this process, where only the daemon's own kernels run: guest
//! kernels run in worker processes that hold only their own VM's memory
//! (measured: a second context of a process reads memory the process
//! registered, whatever the flags).

use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUdeviceptr};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use cudarc::driver::CudaContext;

use super::{bind, check, CudaExecutor};
use crate::bytes::{Reader, Writer};
use crate::executor::{Registrar, Registration};
use crate::guest::GuestMem;
use crate::protocol::Status;

/// Buffers start at this size and grow in powers of two.
const MIN_BUF: usize = 1 << 20;

/// Guest memory is registered in pieces of at most this size, aligned to it
/// in the host address space. Measured on the H200 host: while one
/// `cuMemHostRegister` runs (0.35-0.6 s per GiB), every other CUDA call of
/// the process waits, so a 1 GiB table registered in one call stalled
/// another VM's requests for 656 ms although it ran on a thread of its own.
/// So registration goes in 2 MiB pieces (about 1 ms each there), and after
/// each piece the registering thread pauses as long as the piece took:
/// other VMs get at least half of the driver's time while a table registers,
/// which takes about twice as long.
pub const REG_CHUNK: usize = 2 << 20;

/// Staged copies go in pieces of this size, so that the DMA of one runs
/// while the CPU copies the next into the staging buffer.
const STAGING_PIECE: usize = 4 << 20;

/// The registration pieces of a VM's worker (`worker/table.rs`), which
/// registers its own VM's table: only that VM's calls wait while one
/// registers (~25 ms each), and a 64 MiB copy needs one or two DMAs
/// instead of 32 (each queued copy leaves a gap on the link).
pub const WORKER_REG_CHUNK: usize = 64 << 20;

/// The registration pieces of this process: [`REG_CHUNK`] in the daemon,
/// [`WORKER_REG_CHUNK`] in a worker ([`use_worker_pieces`]). Copies that
/// DMA from guest pages split at these boundaries: one DMA whose host range
/// spans two registrations fails (CUDA_ERROR_INVALID_VALUE).
static REG_PIECE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(REG_CHUNK);

/// Called once by a worker process before it registers anything.
pub fn use_worker_pieces() {
    REG_PIECE.store(WORKER_REG_CHUNK, std::sync::atomic::Ordering::Relaxed);
}

/// See [`REG_PIECE`].
pub fn registration_piece() -> usize {
    REG_PIECE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Splits a host range at multiples of this process's registration pieces
/// ([`registration_piece`]), so that every piece lies in one registration
/// (a DMA never spans two).
pub fn dma_pieces(ptr: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    dma_pieces_in(ptr, len, registration_piece())
}

/// [`dma_pieces`] for registrations in pieces of `chunk` bytes.
pub fn dma_pieces_in(ptr: usize, len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    let end = ptr.saturating_add(len);
    let mut at = ptr;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let boundary = (at / chunk + 1).saturating_mul(chunk);
        let piece = (at, boundary.min(end) - at);
        at = boundary.min(end);
        Some(piece)
    })
}

/// Where a [`Grow`] buffer lives.
pub trait Place {
    const WHAT: &'static str;
    /// Allocates `bytes` in the current context.
    fn alloc(bytes: usize) -> Result<u64, DriverError>;
    /// # Safety
    /// `addr` came from `alloc` of the same place and nothing uses it.
    unsafe fn free(addr: u64) -> Result<(), DriverError>;
}

/// Device memory.
#[derive(Debug)]
pub struct Device;
/// Page-locked host memory.
#[derive(Debug)]
pub struct Pinned;

impl Place for Device {
    const WHAT: &'static str = "device";
    fn alloc(bytes: usize) -> Result<u64, DriverError> {
        // SAFETY: plain allocation in the current context.
        unsafe { result::malloc_sync(bytes) }
    }
    unsafe fn free(addr: u64) -> Result<(), DriverError> {
        // SAFETY: the caller's contract.
        unsafe { result::free_sync(addr as CUdeviceptr) }
    }
}

impl Place for Pinned {
    const WHAT: &'static str = "pinned";
    fn alloc(bytes: usize) -> Result<u64, DriverError> {
        // SAFETY: plain page-locked allocation in the current context.
        unsafe { result::malloc_host(bytes, 0) }.map(|p| p as u64)
    }
    unsafe fn free(addr: u64) -> Result<(), DriverError> {
        // SAFETY: the caller's contract.
        unsafe { result::free_host(addr as *mut c_void) }
    }
}

/// A buffer that grows on demand. A failed growth leaves the old buffer as
/// it was (the new one is allocated before the old one is freed), so the
/// executor never runs on a null buffer.
#[derive(Debug)]
pub struct Grow<P: Place> {
    addr: u64,
    cap: usize,
    place: PhantomData<P>,
}

impl<P: Place> Default for Grow<P> {
    fn default() -> Self {
        Grow {
            addr: 0,
            cap: 0,
            place: PhantomData,
        }
    }
}

impl<P: Place> Grow<P> {
    /// Makes room for `bytes` (the context must be current and idle) and
    /// returns the buffer's address: the only way to get it, so nothing
    /// uses a buffer it did not ensure. Never null on success (at least
    /// [`MIN_BUF`] is allocated, even for 0 bytes). A failed growth leaves
    /// the old buffer as it was: the new one is allocated first.
    pub fn ensure(&mut self, bytes: usize) -> Result<u64, DriverError> {
        if bytes <= self.cap && self.cap > 0 {
            return Ok(self.addr);
        }
        let want = bytes
            .checked_next_power_of_two()
            .ok_or(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY))?
            .max(MIN_BUF);
        let addr = P::alloc(want)?;
        self.release();
        self.addr = addr;
        self.cap = want;
        Ok(addr)
    }

    pub fn release(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated by `ensure` in this context, no work pending.
            if let Err(e) = unsafe { P::free(self.addr) } {
                log::warn!("freeing a {} buffer: {e}", P::WHAT);
            }
            self.addr = 0;
            self.cap = 0;
        }
    }
}

impl Grow<Pinned> {
    /// The first `len` bytes (at most the capacity).
    pub fn slice(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.cap);
        if len == 0 {
            return &mut [];
        }
        // SAFETY: `addr` points at `cap >= len` bytes of host memory that
        // this buffer owns exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, len) }
    }
}

/// A VM's guest memory as registered with the driver. Dropping it
/// unregisters the memory (in the context it was registered in), on the
/// thread that drops it.
pub struct RegToken {
    ctx: Arc<CudaContext>,
    gpu: u32,
    vm_id: u32,
    mem: Arc<GuestMem>,
    /// Host addresses (and lengths) that cuMemHostRegister accepted: pieces
    /// of at most [`REG_CHUNK`].
    regions: Vec<(usize, usize)>,
    /// Every region registered: copies may DMA straight from guest pages.
    complete: bool,
}

impl RegToken {
    /// Registers every region of `mem` in `ctx`, on the calling thread
    /// (which it makes `ctx` current on). Pins the whole table.
    pub fn register(ctx: &Arc<CudaContext>, gpu: u32, vm_id: u32, mem: &Arc<GuestMem>) -> Self {
        Self::register_in(ctx, gpu, vm_id, mem, REG_CHUNK)
    }

    /// [`Self::register`] in pieces of `chunk` bytes (aligned to it).
    pub fn register_in(
        ctx: &Arc<CudaContext>,
        gpu: u32,
        vm_id: u32,
        mem: &Arc<GuestMem>,
        chunk: usize,
    ) -> Self {
        let mut reg = RegToken {
            ctx: ctx.clone(),
            gpu,
            vm_id,
            mem: mem.clone(),
            regions: Vec::new(),
            complete: true,
        };
        if let Err(e) = bind(ctx) {
            log::error!("gpu{gpu}: vm{vm_id}: cannot bind the context to register: {e}");
            reg.complete = false;
            return reg;
        }
        let mut regions_done = 0;
        for region in mem.iter() {
            let len = region.len() as usize;
            let addr = match region.get_host_address(MemoryRegionAddress(0)) {
                Ok(a) => a,
                Err(e) => {
                    log::warn!("vm{vm_id}: region without host address: {e}");
                    reg.complete = false;
                    continue;
                }
            };
            let addr = addr as usize;
            let mut ok = true;
            for (piece, n) in dma_pieces_in(addr, len, chunk) {
                let started = std::time::Instant::now();
                // SAFETY: `piece..piece+n` lies in a live mapping held by
                // `mem`, which the token keeps until it unregisters.
                match check(unsafe { sys::cuMemHostRegister_v2(piece as *mut c_void, n, 0) }) {
                    Ok(()) => reg.regions.push((piece, n)),
                    Err(e) => {
                        log::warn!(
                            "gpu{gpu}: vm{vm_id}: cuMemHostRegister of {n} bytes failed ({e}); staging its copies"
                        );
                        reg.complete = false;
                        ok = false;
                        break;
                    }
                }
                // Lets the GPU's worker take the driver between pieces (a
                // yield is not enough: the driver's lock is not fair).
                std::thread::sleep(started.elapsed().min(std::time::Duration::from_millis(10)));
            }
            if ok {
                regions_done += 1;
            }
        }
        log::info!(
            "gpu{gpu}: vm{vm_id}: registered {} of {} guest memory regions ({} MiB in {} pieces)",
            regions_done,
            mem.num_regions(),
            reg.bytes() >> 20,
            reg.regions.len()
        );
        reg
    }

    pub fn bytes(&self) -> u64 {
        self.regions.iter().map(|&(_, n)| n as u64).sum()
    }
}

impl Drop for RegToken {
    fn drop(&mut self) {
        if self.regions.is_empty() {
            return;
        }
        if let Err(e) = bind(&self.ctx) {
            log::error!(
                "gpu{}: vm{}: cannot bind the context to unregister: {e}",
                self.gpu,
                self.vm_id
            );
        }
        for &(addr, _) in &self.regions {
            // SAFETY: registered by `register` in this context; `self.mem`
            // keeps the mapping alive until after this call, and the owner
            // gave the token up only once no copy used it.
            if let Err(e) = check(unsafe { sys::cuMemHostUnregister(addr as *mut c_void) }) {
                log::warn!("vm{}: cuMemHostUnregister({addr:#x}): {e}", self.vm_id);
            }
        }
    }
}

/// The registered memory tables of the VMs.
#[derive(Default)]
pub struct Registrations {
    regs: HashMap<u32, RegToken>,
    pub registered_bytes: u64,
}

impl Registrations {
    /// True when `bytes` (a guest view) lie in memory registered in full.
    pub(super) fn zero_copy(&self, vm_id: u32, mem: Option<&Arc<GuestMem>>) -> bool {
        match (self.regs.get(&vm_id), mem) {
            (Some(r), Some(m)) => r.complete && Arc::ptr_eq(&r.mem, m),
            _ => false,
        }
    }

    fn is_current(&self, vm_id: u32, mem: &Arc<GuestMem>) -> bool {
        self.regs
            .get(&vm_id)
            .is_some_and(|r| Arc::ptr_eq(&r.mem, mem))
    }

    /// Takes `reg` into use; returns the one it replaces.
    pub fn insert(&mut self, vm_id: u32, reg: RegToken) -> Option<RegToken> {
        self.registered_bytes += reg.bytes();
        let old = self.regs.insert(vm_id, reg);
        if let Some(o) = &old {
            self.registered_bytes = self.registered_bytes.saturating_sub(o.bytes());
        }
        old
    }

    /// Stops using the VM's table and hands it back (not yet unregistered).
    pub fn take(&mut self, vm_id: u32) -> Option<RegToken> {
        let old = self.regs.remove(&vm_id);
        if let Some(o) = &old {
            self.registered_bytes = self.registered_bytes.saturating_sub(o.bytes());
        }
        old
    }

    pub fn vms(&self) -> Vec<u32> {
        self.regs.keys().copied().collect()
    }
}

/// Registers guest memory in the executor's context from another thread.
pub struct CudaRegistrar {
    pub ctx: Arc<CudaContext>,
    pub gpu: u32,
}

impl Registrar for CudaRegistrar {
    fn register(&self, vm_id: u32, mem: &Arc<GuestMem>) -> Registration {
        Box::new(RegToken::register(&self.ctx, self.gpu, vm_id, mem))
    }
}

impl CudaExecutor {
    pub(super) fn map_memory(&mut self, vm_id: u32, mem: &Arc<GuestMem>) {
        if self.regs.is_current(vm_id, mem) {
            return;
        }
        self.unmap_memory(vm_id);
        let reg = RegToken::register(&self.ctx, self.gpu_index, vm_id, mem);
        drop(self.regs.insert(vm_id, reg));
        self.stats.registered_bytes = self.regs.registered_bytes;
    }

    /// Unregisters the VM's table here, on the calling thread.
    pub(super) fn unmap_memory(&mut self, vm_id: u32) {
        drop(self.regs.take(vm_id));
        self.stats.registered_bytes = self.regs.registered_bytes;
        // Unregistering binds the context on this thread: keep it current.
        let _ = bind(&self.ctx);
    }

    /// Takes a registration made by [`CudaRegistrar`] into use.
    pub(super) fn attach(&mut self, vm_id: u32, reg: Registration) -> Option<Registration> {
        match reg.downcast::<RegToken>() {
            Ok(tok) if Arc::ptr_eq(&tok.ctx, &self.ctx) => {
                let old = self.regs.insert(vm_id, *tok);
                self.stats.registered_bytes = self.regs.registered_bytes;
                old.map(|o| Box::new(o) as Registration)
            }
            Ok(tok) => Some(tok as Registration),
            Err(other) => Some(other),
        }
    }

    /// Hands the VM's registration back, still registered.
    pub(super) fn detach(&mut self, vm_id: u32) -> Option<Registration> {
        let old = self.regs.take(vm_id);
        self.stats.registered_bytes = self.regs.registered_bytes;
        old.map(|o| Box::new(o) as Registration)
    }

    fn log_staging(&mut self, why: &str) {
        if !self.staging_logged {
            self.staging_logged = true;
            log::warn!(
                "gpu{}: staging guest data through pinned memory ({why})",
                self.gpu_index
            );
        }
    }

    /// Queues a copy of `len` payload bytes at `off` to device address `dst`.
    pub(super) fn copy_in(
        &mut self,
        vm_id: u32,
        src: Reader,
        off: usize,
        len: usize,
        dst: CUdeviceptr,
    ) -> Result<(), Status> {
        if len == 0 {
            return Ok(());
        }
        let stream = self.stream.cu_stream();
        if self.regs.zero_copy(vm_id, src.guest().map(|g| g.memory())) {
            let mut done = 0u64;
            let ranges = src.host_ranges(off, len)?;
            for (ptr, n) in ranges
                .into_iter()
                .flat_map(|(p, n)| dma_pieces(p as usize, n))
            {
                // SAFETY: `ptr..ptr+n` is registered guest memory kept mapped
                // by `src`; the stream is synchronized before we return.
                check(unsafe {
                    sys::cuMemcpyHtoDAsync_v2(dst + done, ptr as *const c_void, n, stream)
                })
                .map_err(|e| self.own_error(e))?;
                done += n as u64;
            }
            self.stats.zero_copy += 1;
        } else {
            self.log_staging("guest memory not registered");
            let staging = self.staging.ensure(len).map_err(|e| self.own_error(e))?;
            // Piece by piece: the DMA of one piece runs while the next is
            // copied into the staging buffer (each piece has its own place
            // there, so nothing is overwritten before the sync below).
            let ranges = src.host_ranges(off, len)?;
            let mut done = 0usize;
            for (ptr, n) in ranges
                .iter()
                .flat_map(|(p, n)| dma_pieces_in(p as usize, n, STAGING_PIECE))
            {
                let at = staging + done as u64;
                // SAFETY: `ptr..ptr+n` is guest memory kept mapped by
                // `ranges`; `at..at+n` lies in the staging buffer (`len`
                // bytes in all). The guest may change its bytes meanwhile:
                // they are copied as opaque data, as a DMA would read them.
                unsafe { libc::memcpy(at as *mut c_void, ptr as *const c_void, n) };
                // SAFETY: the staging bytes just written; synchronized below
                // before the buffer is reused.
                check(unsafe {
                    sys::cuMemcpyHtoDAsync_v2(dst + done as u64, at as *const c_void, n, stream)
                })
                .map_err(|e| self.own_error(e))?;
                done += n;
            }
            drop(ranges);
            self.sync().map_err(|e| self.own_error(e))?;
            self.stats.staged += 1;
        }
        Ok(())
    }

    /// Copies `len` bytes from device address `src` to the start of `out`
    /// and waits for the stream (so the whole request is complete).
    pub(super) fn copy_out(
        &mut self,
        vm_id: u32,
        src: CUdeviceptr,
        out: &mut Writer,
        len: usize,
    ) -> Result<u32, Status> {
        let out_len = u32::try_from(len).map_err(|_| Status::TooLarge)?;
        if out.capacity() < len {
            return Err(Status::TooLarge);
        }
        let stream = self.stream.cu_stream();
        if self.regs.zero_copy(vm_id, out.guest().map(|g| g.memory())) {
            let mut done = 0u64;
            let ranges = out.host_ranges(0, len)?;
            for (ptr, n) in ranges
                .into_iter()
                .flat_map(|(p, n)| dma_pieces(p as usize, n))
            {
                // SAFETY: registered guest memory kept mapped by `out`.
                check(unsafe {
                    sys::cuMemcpyDtoHAsync_v2(ptr as *mut c_void, src + done, n, stream)
                })
                .map_err(|e| self.own_error(e))?;
                done += n as u64;
            }
            self.sync().map_err(|e| self.own_error(e))?;
            if len > 0 {
                self.stats.zero_copy += 1;
            }
        } else {
            self.log_staging("guest memory not registered");
            let staging = self.staging.ensure(len).map_err(|e| self.own_error(e))?;
            if len > 0 {
                // SAFETY: staging holds `len` bytes, synchronized right after.
                check(unsafe {
                    sys::cuMemcpyDtoHAsync_v2(staging as *mut c_void, src, len, stream)
                })
                .map_err(|e| self.own_error(e))?;
            }
            self.sync().map_err(|e| self.own_error(e))?;
            if len > 0 {
                let mut done = 0usize;
                for (ptr, n) in out.host_ranges(0, len)?.iter() {
                    // SAFETY: `ptr..ptr+n` is output memory kept mapped by the
                    // ranges; the staging buffer holds `len` bytes the DMA
                    // above completed.
                    unsafe {
                        libc::memcpy(
                            ptr as *mut c_void,
                            (staging + done as u64) as *const c_void,
                            n,
                        )
                    };
                    done += n;
                }
                self.stats.staged += 1;
            }
        }
        Ok(out_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_pieces_split_at_registration_boundaries_only() {
        let c = REG_CHUNK;
        let collect = |p, n| dma_pieces(p, n).collect::<Vec<_>>();
        assert_eq!(collect(c, 0), vec![]);
        assert_eq!(collect(c + 4096, 100), vec![(c + 4096, 100)]);
        assert_eq!(collect(c, c), vec![(c, c)]);
        assert_eq!(collect(c - 10, 20), vec![(c - 10, 10), (c, 10)]);
        assert_eq!(
            collect(c - 1, 2 * c + 2),
            vec![(c - 1, 1), (c, c), (2 * c, c), (3 * c, 1)]
        );
        // Pieces cover the range exactly, in order, each inside one chunk.
        for (p, n) in [(12345usize, 5 * c + 777), (7 * c, 3 * c), (1, c)] {
            let v = collect(p, n);
            assert_eq!(v.iter().map(|&(_, k)| k).sum::<usize>(), n);
            assert_eq!(v[0].0, p);
            for w in v.windows(2) {
                assert_eq!(w[0].0 + w[0].1, w[1].0);
            }
            assert!(v.iter().all(|&(a, k)| k > 0 && a / c == (a + k - 1) / c));
        }
        // No overflow at the top of the address space.
        assert_eq!(
            collect(usize::MAX - 5, 5)
                .iter()
                .map(|p| p.1)
                .sum::<usize>(),
            5
        );
    }
}
