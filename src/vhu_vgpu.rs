//! vhost-user glue: one `VhostUserBackend` per VM connection, serving the
//! device contract's config space and queue 0, and the loop that keeps a
//! VM's socket serving across frontend reconnects. What belongs to one
//! connection (the completion eventfd that wakes the ring thread, the
//! config-change channel, the hang-up handle) lives in [`Connection`]; the
//! device logic is `vm.rs`. The socket itself, the peer check and the relay
//! that hands an admitted connection to vhost-user-backend are
//! `vm_socket.rs`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chain;
use crate::config::SocketPolicy;
use crate::guest::GuestMem;
use crate::protocol::CONFIG_SIZE;
use crate::sync::lock;
use crate::vm::{Frontend, Link, Ring, TakenChain, Vm};
use crate::vm_socket::{self, Handoff, Relay, VmListener};

/// Largest queue the frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 1024;
const REQUEST_QUEUE: u16 = 0;
/// Device event of the completion eventfd (0 is the queue, 1 the library's
/// exit and vring-enable events).
const COMPLETION_EVENT: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unexpected event {0}")]
    UnexpectedEvent(u16),
    #[error("event {0:?} is not an input event")]
    UnexpectedEventSet(EventSet),
    // vhost-user-backend's Error is neither std::error::Error nor Sync, so
    // its message is kept instead of the value.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot watch the completion eventfd: {0}")]
    CompletionEvent(#[source] io::Error),
    #[error("vhost-user socket {path}: cannot listen: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user socket {path}: accept: {source}")]
    Accept {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user socket {path}: {msg}")]
    Serve { path: PathBuf, msg: String },
    #[error("cannot create the completion eventfd: {0}")]
    EventFd(#[source] io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;

/// The queue of one connection, as `Vm` drives it.
#[derive(Clone)]
pub struct VhostRing {
    vring: VringRwLock<GuestMemAtomic>,
    mem: GuestMemAtomic,
}

impl Ring for VhostRing {
    fn pop(&self) -> Option<TakenChain> {
        let mem = self.mem.memory().into_inner();
        let (chain, size) = {
            let mut state = self.vring.get_mut();
            // A stopped or reset queue has nothing to give (and popping it logs errors).
            if !state.get_queue().ready() {
                return None;
            }
            let size = usize::from(state.get_queue().size());
            (
                state.get_queue_mut().pop_descriptor_chain(mem.clone())?,
                size,
            )
        };
        let head = chain.head_index();
        // An indirect table may claim 65,535 entries: no chain is walked
        // past the queue size.
        Some(TakenChain {
            head,
            parsed: chain::parse_bounded(chain, &mem, size.max(1)),
        })
    }

    fn add_used(&self, head: u16, len: u32) {
        if let Err(e) = self.vring.add_used(head, len) {
            log::warn!("add_used({head}) failed: {e}");
        }
    }

    fn notify(&self) {
        // Without EVENT_IDX needs_notification() is always true.
        if self.vring.needs_notification().unwrap_or(true) {
            if let Err(e) = self.vring.signal_used_queue() {
                log::warn!("signalling the guest failed: {e}");
            }
        }
    }

    fn disable_notification(&self) {
        let _ = self.vring.disable_notification();
    }

    fn enable_notification(&self) -> bool {
        self.vring.get_ref().get_queue().ready()
            && self.vring.enable_notification().unwrap_or(false)
    }
}

/// What belongs to one frontend connection, as the VM logic's [`Frontend`].
pub struct Connection {
    vm_id: u32,
    socket: PathBuf,
    /// Written by the GPU worker when requests finish; read by the ring thread.
    completions: EventFd,
    /// The frontend's backend-request channel, for config-change messages.
    config_channel: Mutex<Option<OwnedFd>>,
    /// Closes the connection (set once the frontend is accepted).
    hangup: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// The exit-event consumers handed to vhost-user-backend. Its
    /// `VringEpollHandler::new` (0.24) takes them with `into_raw_fd` and
    /// never closes them: one eventfd per connection would leak (found by
    /// vgpu-soak). Closed by [`Connection::close_exit_consumers`] once the
    /// connection's daemon, and so its vring threads and epoll, are gone.
    exit_consumers: Mutex<Vec<RawFd>>,
}

impl Connection {
    fn new(vm_id: u32, socket: &Path) -> Result<Connection, Error> {
        Ok(Connection {
            vm_id,
            socket: socket.to_path_buf(),
            completions: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            config_channel: Mutex::new(None),
            hangup: Mutex::new(None),
            exit_consumers: Mutex::new(Vec::new()),
        })
    }

    /// Closes the exit-event consumers the library leaked; call only after
    /// the `VhostUserDaemon` that used them has been dropped.
    fn close_exit_consumers(&self) {
        for fd in lock(&self.exit_consumers).drain(..) {
            // SAFETY: `fd` is a consumer we created in `exit_event` and whose
            // ownership vhost-user-backend took with `into_raw_fd` right after
            // (the call happens only once its epoll exists) without ever
            // closing it; its epoll and threads went with the daemon, so
            // nothing uses this number and we close it exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Takes our handle on the frontend's backend-request channel: vhost's
    /// `Backend` cannot send CONFIG_CHANGE_MSG (see backend_channel).
    fn claim_config_channel(&self) {
        match crate::backend_channel::claim(self.vm_id, &self.socket) {
            Ok(fd) => {
                log::info!("vm{}: config-change channel fd {:?}", self.vm_id, fd);
                *lock(&self.config_channel) = Some(fd);
            }
            Err(e) => log::warn!("vm{}: config-change channel unavailable: {e}", self.vm_id),
        }
    }

    fn close(&self) {
        if lock(&self.config_channel).take().is_some() {
            crate::backend_channel::release(self.vm_id);
        }
        *lock(&self.hangup) = None;
    }
}

impl Frontend for Connection {
    fn wake(&self) {
        if let Err(e) = self.completions.write(1) {
            log::warn!("vm{}: cannot wake the ring thread: {e}", self.vm_id);
        }
    }

    fn config_changed(&self) {
        let chan = lock(&self.config_channel);
        let Some(fd) = chan.as_ref() else {
            log::info!(
                "vm{}: no backend channel, guest sees the change on its next config read",
                self.vm_id
            );
            return;
        };
        if let Err(e) = crate::backend_channel::send_config_change(fd) {
            log::warn!("vm{}: config-change notification failed: {e}", self.vm_id);
        }
    }

    fn hang_up(&self) {
        if let Some(hangup) = lock(&self.hangup).as_ref() {
            hangup();
        }
    }
}

/// The backend of one connection.
#[derive(Clone)]
pub struct VgpuBackend {
    vm: Arc<Vm>,
    mem: GuestMemAtomic,
    conn: Arc<Connection>,
    link: Arc<Link>,
    policy: SocketPolicy,
}

/// Whether the daemon may use a frontend's memory table: not larger than
/// the VM's bound (`max_bytes`: its own in the database, else the daemon's
/// `max_guest_memory_mib`), and (when required) sealed against shrinking.
fn acceptable(mem: &GuestMem, max_bytes: u64, policy: &SocketPolicy) -> Result<(), String> {
    use vm_memory::GuestMemoryBackend;
    let total: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    if total > max_bytes {
        return Err(format!(
            "{} MiB of guest memory, more than its bound ({} MiB, max_guest_memory_mib)",
            total >> 20,
            max_bytes >> 20
        ));
    }
    if policy.require_sealed_memory {
        let bad = shrinkable_regions(mem);
        if !bad.is_empty() {
            return Err(format!(
                "the frontend could shrink it ({}); use memory-backend-memfd with seal=on, or set require_sealed_memory = false",
                bad.join("; ")
            ));
        }
    }
    Ok(())
}

/// The regions of `mem` that their frontend could shrink under us: file
/// regions without `F_SEAL_SHRINK` (a file that cannot be sealed at all
/// answers `F_GET_SEALS` with EINVAL). Described for the log.
pub fn shrinkable_regions(mem: &GuestMem) -> Vec<String> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    // The Xen build maps guest pages through privcmd/gntdev: the hypervisor
    // owns them and a Dom0 frontend cannot truncate them.
    if cfg!(feature = "xen") {
        return Vec::new();
    }
    mem.iter()
        .filter_map(|r| {
            let fo = r.file_offset()?;
            // SAFETY: F_GET_SEALS on an fd the region owns; no memory is
            // passed.
            let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
            if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
                return None;
            }
            Some(format!(
                "region at {:#x} ({} MiB): {}",
                r.start_addr().0,
                r.len() >> 20,
                if seals < 0 {
                    "a file that cannot be sealed"
                } else {
                    "a memfd without F_SEAL_SHRINK"
                }
            ))
        })
        .collect()
}

impl VhostUserBackend for VgpuBackend {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemAtomic>;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vring applies EVENT_IDX itself; nothing else depends on it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.vm.device_config().to_bytes();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_SIZE => bytes[start..end].to_vec(),
            _ => {
                log::warn!(
                    "vm{}: config read {offset}+{size} out of range",
                    self.vm.id()
                );
                Vec::new()
            }
        }
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        // The library swaps the table inside the atomic we share; this hook
        // tells the executor (for DMA registration).
        let table = mem.memory().into_inner();
        // Received fds lack FD_CLOEXEC: no child of the daemon may inherit
        // guest RAM (workers close them anyway, see worker/sandbox.rs).
        for region in vm_memory::GuestMemoryBackend::iter(&*table) {
            if let Some(f) = vm_memory::GuestMemoryRegion::file_offset(region) {
                crate::executor::worker::sandbox::set_cloexec(f.file().as_raw_fd());
            }
        }
        let max = self.vm.settings().max_guest_memory;
        if let Err(why) = acceptable(&table, max, &self.policy) {
            // The table is already mapped: nothing may touch it. The
            // frontend's SET_MEM_TABLE fails and it is disconnected.
            log::error!("vm{}: refusing its guest memory: {why}", self.vm.id());
            self.conn.hang_up();
            return Err(io::Error::other(why));
        }
        self.vm.map_memory(table);
        Ok(())
    }

    fn set_backend_req_fd(&self, _backend: Backend) {
        self.conn.claim_config_channel();
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets serve_forever stop this connection's vring thread on disconnect.
        let pair = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| log::error!("vm{}: cannot create exit event: {e}", self.vm.id()))
            .ok()?;
        lock(&self.conn.exit_consumers).push(pair.0.as_raw_fd());
        Some(pair)
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.vm.quiesce();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(Error::UnexpectedEventSet(evset).into());
        }
        let Some(vring) = vrings.first() else {
            return Err(Error::UnexpectedEvent(device_event).into());
        };
        let ring = VhostRing {
            vring: vring.clone(),
            mem: self.mem.clone(),
        };
        match device_event {
            REQUEST_QUEUE => self.vm.serve(&ring, &self.link),
            COMPLETION_EVENT => {
                // Non-blocking: a wake-up already consumed reads EAGAIN.
                let _ = self.conn.completions.read();
                self.vm.serve(&ring, &self.link);
            }
            other => return Err(Error::UnexpectedEvent(other).into()),
        }
        Ok(())
    }
}

/// Serves `socket` for `vm` until the VM is retired or the daemon stops:
/// one frontend at a time, and a new one may connect after the previous
/// went away. The listener is ours (`vm_socket.rs`): a peer is checked
/// before anything of it is read, a retired VM's thread is woken by its
/// [`Vm::retire`], and the socket file goes only while it is still the one
/// this thread bound (a VM registered again under the same id has its own).
pub fn serve_forever(vm: Arc<Vm>, socket: PathBuf, policy: SocketPolicy) -> Result<(), Error> {
    let listener = VmListener::bind(&socket, &policy).map_err(|source| Error::Listen {
        path: socket.clone(),
        source,
    })?;
    vm.set_listener_wake(Some(listener.waker()));
    let result = serve_listener(&vm, &listener, policy);
    vm.set_listener_wake(None);
    if vm.is_retired() {
        log::info!("vm{}: removed, socket closed", vm.id());
    }
    // Dropping the listener removes the socket file if it is still ours.
    drop(listener);
    result
}

fn serve_listener(vm: &Arc<Vm>, listener: &VmListener, policy: SocketPolicy) -> Result<(), Error> {
    let socket = listener.path();
    let refused_log = Mutex::new(crate::vm::LogLimit::new());
    log::info!("vm{}: listening on {}", vm.id(), socket.display());
    loop {
        if vm.is_retired() || vm.is_stopping() {
            return Ok(());
        }
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(source) => {
                return Err(Error::Accept {
                    path: socket.to_path_buf(),
                    source,
                })
            }
        };
        if vm.is_retired() || vm.is_stopping() {
            return Ok(());
        }
        if let Err(who) = vm_socket::peer_allowed(&stream, &policy) {
            use crate::vm::LogDecision;
            if let LogDecision::Log { suppressed } =
                lock(&refused_log).check(std::time::Instant::now())
            {
                log::warn!(
                    "vm{}: connection refused: {who} ({suppressed} more refused since the last line)",
                    vm.id()
                );
            }
            continue;
        }
        serve_connection(vm, stream, socket, policy)?;
    }
}

/// Serves one admitted frontend until it goes away (or is hung up on).
fn serve_connection(
    vm: &Arc<Vm>,
    stream: UnixStream,
    socket: &Path,
    policy: SocketPolicy,
) -> Result<(), Error> {
    let mem = GuestMemoryAtomic::new(GuestMem::default());
    let conn = Arc::new(Connection::new(vm.id(), socket)?);
    let link = Link::new(conn.clone());
    let backend = VgpuBackend {
        vm: vm.clone(),
        mem: mem.clone(),
        conn: conn.clone(),
        link: link.clone(),
        policy,
    };
    let mut daemon = VhostUserDaemon::new(format!("vgpu-vhu{}", vm.id()), backend, mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    // Completions come back to this connection's ring thread.
    if let Some(handler) = daemon.get_epoll_handlers().first() {
        handler
            .register_listener(
                conn.completions.as_raw_fd(),
                EventSet::IN,
                u64::from(COMPLETION_EVENT),
            )
            .map_err(Error::CompletionEvent)?;
    }
    let result = serve_one(&mut daemon, stream, socket, vm, &conn, &link);
    vm.disconnect(&link);
    conn.close();
    // Joins the vring threads and closes their epolls.
    drop(daemon);
    conn.close_exit_consumers();
    match result {
        Ok(()) => log::info!("vm{}: frontend disconnected", vm.id()),
        Err(e) => log::warn!("vm{}: connection ended: {e}", vm.id()),
    }
    Ok(())
}

fn serve_one(
    daemon: &mut VhostUserDaemon<VgpuBackend>,
    stream: UnixStream,
    socket: &Path,
    vm: &Arc<Vm>,
    conn: &Connection,
    link: &Arc<Link>,
) -> Result<(), Error> {
    let serve_err = |msg: String| Error::Serve {
        path: socket.to_path_buf(),
        msg,
    };
    let io_err = |e: io::Error| serve_err(e.to_string());
    // The library connects to a private socket; its end and the frontend's
    // are joined by the relay.
    let handoff = Handoff::bind(socket).map_err(io_err)?;
    let path = handoff
        .path()
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| serve_err("the socket path is not UTF-8".into()))?;
    daemon
        .start_client(&path)
        .map_err(|e| serve_err(e.to_string()))?;
    let library = handoff.accept_own().map_err(io_err)?;
    let relay = Relay::start(stream, library, vm.id()).map_err(io_err)?;
    if let Some(handle) = daemon.shutdown_handle() {
        *lock(&conn.hangup) = Some(Box::new(move || handle.shutdown()));
    }
    vm.connect(link.clone());
    log::info!("vm{}: frontend connected", vm.id());
    if vm.is_retired() || vm.is_stopping() {
        // Retired while this frontend was being admitted: nobody else
        // would hang up on it.
        conn.hang_up();
    }
    let result = match daemon.wait() {
        // A frontend that goes away mid-message is an ordinary disconnect.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        other => other.map_err(|e| serve_err(e.to_string())),
    };
    // The library's end is closed: the relay ends and closes the frontend's.
    relay.join();
    // Stop this connection's vring threads.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn connection_wakes_hangs_up_and_closes() {
        let conn = Connection::new(7, Path::new("/nonexistent/vm7.sock")).unwrap();
        // Nothing pending: the eventfd reads EAGAIN (it is non-blocking).
        assert!(conn.completions.read().is_err());
        conn.wake();
        conn.wake();
        assert_eq!(conn.completions.read().unwrap(), 2);
        // No channel: a config change is a logged no-op, not an error.
        conn.config_changed();
        let hung = Arc::new(AtomicUsize::new(0));
        let h = hung.clone();
        *lock(&conn.hangup) = Some(Box::new(move || {
            h.fetch_add(1, Ordering::Relaxed);
        }));
        conn.hang_up();
        assert_eq!(hung.load(Ordering::Relaxed), 1);
        conn.close();
        conn.hang_up();
        assert_eq!(hung.load(Ordering::Relaxed), 1, "closed: no hang-up handle");
    }
}
