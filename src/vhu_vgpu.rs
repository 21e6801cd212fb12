//! vhost-user glue: one `VhostUserBackend` per VM connection, serving the
//! device contract's config space and queue 0, and the loop that keeps a
//! VM's socket serving across frontend reconnects.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

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

use crate::chain;
use crate::guest::GuestMem;
use crate::protocol::CONFIG_SIZE;
use crate::vm::{Ring, TakenChain, Vm};

/// Largest queue the frontend may set up.
pub const MAX_QUEUE_SIZE: usize = 1024;
const REQUEST_QUEUE: u16 = 0;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unexpected event {0}")]
    UnexpectedEvent(u16),
    #[error("event {0:?} is not an input event")]
    UnexpectedEventSet(EventSet),
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("vhost-user socket {path}: {msg}")]
    Serve { path: PathBuf, msg: String },
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
    fn pop(&self, vm_id: u32) -> Option<TakenChain> {
        let mem = self.mem.memory().into_inner();
        let chain = {
            let mut state = self.vring.get_mut();
            // A stopped or reset queue has nothing to give (and popping it logs errors).
            if !state.get_queue().ready() {
                return None;
            }
            state.get_queue_mut().pop_descriptor_chain(mem.clone())?
        };
        let head = chain.head_index();
        Some(TakenChain {
            head,
            parsed: chain::parse(chain, &mem, vm_id),
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

/// The backend of one connection.
#[derive(Clone)]
pub struct VgpuBackend {
    vm: Arc<Vm>,
    mem: GuestMemAtomic,
    socket: PathBuf,
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
        let bytes = self.vm.settings().config().to_bytes();
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
        self.vm.map_memory(mem.memory().into_inner());
        Ok(())
    }

    fn set_backend_req_fd(&self, _backend: Backend) {
        // The library's Backend cannot send CONFIG_CHANGE_MSG: keep our own
        // handle on the same socket (see backend_channel).
        match crate::backend_channel::claim(self.vm.id(), &self.socket) {
            Ok(fd) => {
                log::info!("vm{}: config-change channel fd {:?}", self.vm.id(), fd);
                self.vm.set_config_channel(Some(fd))
            }
            Err(e) => log::warn!("vm{}: config-change channel unavailable: {e}", self.vm.id()),
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets serve_forever stop this connection's vring thread on disconnect.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| log::error!("vm{}: cannot create exit event: {e}", self.vm.id()))
            .ok()
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
        if device_event != REQUEST_QUEUE {
            return Err(Error::UnexpectedEvent(device_event).into());
        }
        let Some(vring) = vrings.first() else {
            return Err(Error::UnexpectedEvent(device_event).into());
        };
        let ring = VhostRing {
            vring: vring.clone(),
            mem: self.mem.clone(),
        };
        self.vm.pump(&ring);
        Ok(())
    }
}

/// Serves `socket` for `vm` until the process exits: one frontend at a time,
/// and a new one may connect after the previous went away.
pub fn serve_forever(vm: Arc<Vm>, socket: PathBuf) -> Result<(), Error> {
    loop {
        if vm.is_retired() {
            let _ = std::fs::remove_file(&socket);
            log::info!("vm{}: removed, socket closed", vm.id());
            return Ok(());
        }
        let mem = GuestMemoryAtomic::new(GuestMem::default());
        let backend = VgpuBackend {
            vm: vm.clone(),
            mem: mem.clone(),
            socket: socket.clone(),
        };
        let mut daemon = VhostUserDaemon::new(format!("vgpu-vm{}", vm.id()), backend, mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        log::info!("vm{}: listening on {}", vm.id(), socket.display());
        let result = serve_one(&mut daemon, &socket, &vm);
        vm.disconnect();
        match result {
            Ok(()) => log::info!("vm{}: frontend disconnected", vm.id()),
            Err(e) => {
                log::warn!("vm{}: connection ended: {e}", vm.id());
                // A socket we cannot bind would spin: give up on this VM.
                if !socket.exists() {
                    return Err(e);
                }
            }
        }
    }
}

fn serve_one(
    daemon: &mut VhostUserDaemon<VgpuBackend>,
    socket: &std::path::Path,
    vm: &Arc<Vm>,
) -> Result<(), Error> {
    let mut listener =
        vhost::vhost_user::Listener::new(socket, true).map_err(|e| Error::Serve {
            path: socket.to_path_buf(),
            msg: e.to_string(),
        })?;
    let err = |e: vhost_user_backend::Error| Error::Serve {
        path: socket.to_path_buf(),
        msg: e.to_string(),
    };
    daemon.start(&mut listener).map_err(err)?;
    vm.connect();
    if let Some(handle) = daemon.shutdown_handle() {
        vm.set_hangup(Some(Box::new(move || handle.shutdown())));
    }
    log::info!("vm{}: frontend connected", vm.id());
    let result = match daemon.wait() {
        // A frontend that goes away mid-message is an ordinary disconnect.
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        other => other.map_err(err),
    };
    // Stop this connection's vring threads.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    result
}
