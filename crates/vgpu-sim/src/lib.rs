//! A simulated guest: a vhost-user frontend with memfd guest RAM, a split
//! virtqueue laid out in that RAM, and kick/call eventfds — what QEMU and a
//! guest driver do together, in one process. The integration tests, the
//! benchmark and `--demo` drive the real daemon through it.

pub mod legacy;
pub mod report;
pub mod workload;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vgpu::backend_channel::MsgHeader;
use vhost::vhost_user::message::{
    BackendReq, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vgpu::guest::GuestMem;
use vgpu::protocol::{ReqHdr, RespHdr, CONFIG_SIZE, REQ_HDR_SIZE, RESP_HDR_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("no free descriptors")]
    RingFull,
    #[error("timed out after {0:?} waiting for the device")]
    Timeout(Duration),
    #[error("device returned unknown head {0}")]
    BadHead(u32),
    #[error("response: {0}")]
    Response(#[from] vgpu::protocol::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where the rings live; data slots start at `DATA_BASE`.
const RING_BASE: u64 = 0;
pub const DATA_BASE: u64 = 0x10_0000;

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub mem_size: usize,
    pub queue_size: u16,
    pub event_idx: bool,
    /// Bytes per request slot in the data area.
    pub slot_size: usize,
    /// Hand the backend a channel (BACKEND_REQ) for config-change messages.
    pub backend_channel: bool,
    /// Seal the guest RAM memfd against shrinking and growing, as QEMU's
    /// memory-backend-memfd does by default (the daemon refuses it otherwise).
    pub seal: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            mem_size: 16 << 20,
            queue_size: 256,
            event_idx: true,
            slot_size: 4096,
            backend_channel: false,
            seal: true,
        }
    }
}

/// One descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Desc {
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: false,
        }
    }
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: true,
        }
    }
}

/// A completed chain from the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

pub struct SimGuest {
    frontend: Frontend,
    /// Our end of the backend-request channel.
    channel: Option<UnixStream>,
    mem: GuestMem,
    _memfd: File,
    opts: SimOptions,
    kick: EventFd,
    call: EventFd,
    desc_table: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    /// Descriptors of each in-flight chain, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    kicked_at: u16,
}

fn memfd(size: usize, seal: bool) -> Result<File> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: the name is a valid C string; the returned fd is owned by File.
    let fd = unsafe { libc::memfd_create(c"vgpu-sim-guest".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fd was just created and is not owned elsewhere.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    if seal {
        // SAFETY: F_ADD_SEALS on the memfd just created; no memory passed.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(file)
}

impl SimGuest {
    pub fn connect(socket: &Path, opts: SimOptions) -> Result<SimGuest> {
        let file = memfd(opts.mem_size, opts.seal)?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(0),
            opts.mem_size,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )
        .map_err(|e| Error::Memory(format!("{e:?}")))?;
        let mem = GuestMem::from_regions(vec![region]).map_err(|e| Error::Memory(e.to_string()))?;

        let mut frontend = Frontend::connect(socket, 1)?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let mut want = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if opts.event_idx {
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        frontend.set_features(offered & want)?;
        let proto = frontend.get_protocol_features()?;
        // REPLY_ACK as QEMU takes it: a refused SET_MEM_TABLE fails here.
        let mut want_proto = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if opts.backend_channel {
            want_proto |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        frontend.set_protocol_features(proto & want_proto)?;
        let channel = if opts.backend_channel {
            let (ours, theirs) = UnixStream::pair()?;
            frontend.set_backend_request_fd(&theirs)?;
            Some(ours)
        } else {
            None
        };

        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<std::result::Result<_, _>>()?;
        // Asks for the ack, as QEMU does: a refused table fails here.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let table = frontend.set_mem_table(&regions);
        frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        table?;

        let n = opts.queue_size as u64;
        let desc_table = RING_BASE;
        let avail = desc_table + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let host = |gpa: u64| -> Result<u64> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|e| Error::Memory(e.to_string()))
        };
        frontend.set_vring_num(0, opts.queue_size)?;
        frontend.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: opts.queue_size,
                queue_size: opts.queue_size,
                flags: 0,
                desc_table_addr: host(desc_table)?,
                used_ring_addr: host(used)?,
                avail_ring_addr: host(avail)?,
                log_addr: None,
            },
        )?;
        frontend.set_vring_base(0, 0)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        frontend.set_vring_call(0, &call)?;
        frontend.set_vring_kick(0, &kick)?;
        frontend.set_vring_enable(0, true)?;

        Ok(SimGuest {
            frontend,
            channel,
            mem,
            _memfd: file,
            free: (0..opts.queue_size).rev().collect(),
            chains: vec![Vec::new(); opts.queue_size as usize],
            opts,
            kick,
            call,
            desc_table,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            kicked_at: 0,
        })
    }

    /// Connects, retrying while the daemon is still creating the socket.
    pub fn connect_retry(socket: &Path, opts: SimOptions, within: Duration) -> Result<SimGuest> {
        let start = Instant::now();
        loop {
            match SimGuest::connect(socket, opts.clone()) {
                Ok(g) => return Ok(g),
                Err(e) if start.elapsed() > within => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    pub fn options(&self) -> &SimOptions {
        &self.opts
    }

    /// Reads `size` bytes of config space at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let (_, payload) = self.frontend.get_config(
            offset,
            size,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; size as usize],
        )?;
        Ok(payload.to_vec())
    }

    /// Waits for VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend channel.
    pub fn wait_config_change(&mut self, timeout: Duration) -> Result<()> {
        let chan = self
            .channel
            .as_mut()
            .ok_or_else(|| Error::Memory("no backend channel negotiated".into()))?;
        chan.set_read_timeout(Some(timeout))?;
        let mut hdr = MsgHeader::default();
        chan.read_exact(hdr.as_mut_slice())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    Error::Timeout(timeout)
                }
                _ => Error::Io(e),
            })?;
        match u32::from(hdr.request) {
            r if r == u32::from(BackendReq::CONFIG_CHANGE_MSG) => {}
            other => {
                return Err(Error::Memory(format!(
                    "unexpected backend request {other:?}"
                )))
            }
        }
        Ok(())
    }

    pub fn config_space(&mut self) -> Result<Vec<u8>> {
        self.config(0, CONFIG_SIZE as u32)
    }

    /// Guest address of request slot `i`.
    pub fn slot(&self, i: usize) -> u64 {
        DATA_BASE + (i * self.opts.slot_size) as u64
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .map_err(|e| Error::Memory(e.to_string()))?;
        Ok(v)
    }

    fn write_desc(&self, index: u16, d: &Desc, next: Option<u16>, extra_flags: u16) -> Result<()> {
        let mut flags = extra_flags;
        if d.writable {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let raw = Descriptor::new(d.addr, d.len, flags, next.unwrap_or(0));
        self.write(self.desc_table + 16 * index as u64, raw.as_slice())
    }

    /// Puts a chain on the avail ring (without kicking). Returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> Result<u16> {
        if descs.is_empty() || self.free.len() < descs.len() {
            return Err(Error::RingFull);
        }
        let idx: Vec<u16> = (0..descs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(idx[i], d, idx.get(i + 1).copied(), 0)?;
        }
        Ok(self.publish(idx))
    }

    /// Puts a chain on the avail ring as one indirect descriptor whose table
    /// lives at `table` in guest memory.
    pub fn add_indirect_chain(&mut self, descs: &[Desc], table: u64) -> Result<u16> {
        let head = self.free.pop().ok_or(Error::RingFull)?;
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let raw = Descriptor::new(d.addr, d.len, flags, (i + 1) as u16);
            self.write(table + 16 * i as u64, raw.as_slice())?;
        }
        let d = Desc::r(table, 16 * descs.len() as u32);
        self.write_desc(head, &d, None, VRING_DESC_F_INDIRECT as u16)?;
        Ok(self.publish(vec![head]))
    }

    /// Puts a chain on the avail ring as one indirect descriptor pointing at
    /// a table of `entries` descriptors already written at `table` (a table
    /// may be shared by many chains: the device only reads it).
    pub fn add_indirect_table(&mut self, table: u64, entries: u32) -> Result<u16> {
        let head = self.free.pop().ok_or(Error::RingFull)?;
        let d = Desc::r(table, entries.saturating_mul(16));
        self.write_desc(head, &d, None, VRING_DESC_F_INDIRECT as u16)?;
        Ok(self.publish(vec![head]))
    }

    /// Free descriptors in the ring's table.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    fn publish(&mut self, idx: Vec<u16>) -> u16 {
        let head = idx[0];
        let n = self.opts.queue_size;
        let slot = self.avail + 4 + 2 * (self.avail_idx % n) as u64;
        let _ = self.mem.write_obj(head.to_le(), GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = self.mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        );
        self.chains[head as usize] = idx;
        head
    }

    /// Notifies the device of new chains, if its EVENT_IDX asks for it.
    pub fn kick(&mut self) -> Result<()> {
        let new = self.avail_idx;
        let old = self.kicked_at;
        self.kicked_at = new;
        if self.opts.event_idx {
            std::sync::atomic::fence(Ordering::SeqCst);
            let ev_addr = self.used + 4 + 8 * self.opts.queue_size as u64;
            let event: u16 = self
                .mem
                .load(GuestAddress(ev_addr), Ordering::Acquire)
                .map_err(|e| Error::Memory(e.to_string()))?;
            // vring_need_event(event, new, old)
            if new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old) {
                return Ok(());
            }
        }
        self.kick.write(1)?;
        Ok(())
    }

    /// Chains the device has returned since the last call; waits up to
    /// `timeout` for at least one.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.reap()?;
            if !done.is_empty() {
                return Ok(done);
            }
            if self.opts.event_idx {
                // used_event: interrupt me at the next completion.
                let ue = self.avail + 4 + 2 * self.opts.queue_size as u64;
                let _ = self
                    .mem
                    .store(self.last_used.to_le(), GuestAddress(ue), Ordering::Release);
                std::sync::atomic::fence(Ordering::SeqCst);
                let done = self.reap()?;
                if !done.is_empty() {
                    return Ok(done);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(timeout));
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.call),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.call.read();
        }
    }

    fn reap(&mut self) -> Result<Vec<Used>> {
        let n = self.opts.queue_size;
        let used_idx: u16 = self
            .mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .map_err(|e| Error::Memory(e.to_string()))?;
        let mut out = Vec::new();
        while self.last_used != used_idx {
            let elem = self.used + 4 + 8 * (self.last_used % n) as u64;
            let raw: VirtqUsedElem = self
                .mem
                .read_obj(GuestAddress(elem))
                .map_err(|e| Error::Memory(e.to_string()))?;
            let (id, len) = (raw.id(), raw.len());
            let head = u16::try_from(id)
                .ok()
                .filter(|h| *h < n && !self.chains[*h as usize].is_empty())
                .ok_or(Error::BadHead(id))?;
            self.free
                .extend(std::mem::take(&mut self.chains[head as usize]));
            out.push(Used { head, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// Waits until every chain in `heads` is back; returns their used entries.
    pub fn wait_all(&mut self, heads: &[u16], timeout: Duration) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        let mut pending: std::collections::BTreeSet<u16> = heads.iter().copied().collect();
        let mut got = Vec::new();
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            for u in self.wait_used(left)? {
                pending.remove(&u.head);
                got.push(u);
            }
        }
        Ok(got)
    }

    /// Lays a request out in slot `slot` (header, payload, response header,
    /// output, contiguous) and puts it on the ring as two descriptors.
    pub fn submit(
        &mut self,
        slot: usize,
        hdr: &ReqHdr,
        payload: &[u8],
        out_cap: usize,
    ) -> Result<u16> {
        let base = self.slot(slot);
        let rlen = REQ_HDR_SIZE + payload.len();
        let wbase = base + rlen as u64;
        let wlen = RESP_HDR_SIZE + out_cap;
        if rlen + wlen > self.opts.slot_size {
            return Err(Error::Memory(format!(
                "request of {} bytes exceeds the slot",
                rlen + wlen
            )));
        }
        self.write(base, &hdr.encode())?;
        self.write(base + REQ_HDR_SIZE as u64, payload)?;
        self.add_chain(&[Desc::r(base, rlen as u32), Desc::w(wbase, wlen as u32)])
    }

    /// Response header and output of a request laid out by `submit`.
    pub fn response(
        &self,
        slot: usize,
        payload_len: usize,
        out_cap: usize,
    ) -> Result<(RespHdr, Vec<u8>)> {
        let wbase = self.slot(slot) + (REQ_HDR_SIZE + payload_len) as u64;
        let hdr = RespHdr::decode(&self.read(wbase, RESP_HDR_SIZE)?)?;
        let n = (hdr.output_len as usize).min(out_cap);
        let out = self.read(wbase + RESP_HDR_SIZE as u64, n)?;
        Ok((hdr, out))
    }

    /// One request, start to finish, in slot 0.
    pub fn call(
        &mut self,
        opcode: u16,
        tag: u64,
        payload: &[u8],
        out_cap: usize,
    ) -> Result<(RespHdr, Vec<u8>)> {
        let hdr = ReqHdr::new(opcode, tag, payload.len() as u32);
        let head = self.submit(0, &hdr, payload, out_cap)?;
        self.kick()?;
        self.wait_all(&[head], Duration::from_secs(30))?;
        self.response(0, payload.len(), out_cap)
    }
}
