//! Per-VM device state that outlives a vhost-user connection: identity and
//! scheduling settings, the requests it has outstanding (back-pressure), and
//! the figures `vgpu-admin status` shows. Free of vhost types: the vhost glue
//! (`vhu_vgpu`) drives it through the `Ring` trait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::chain::{self, Parsed};
use crate::control::VmStatus;
use crate::guest::{GuestBufs, GuestMem};
use crate::protocol::{DeviceConfig, PoolId, Priority, RespHdr};
use crate::scheduler::{ArrivalCounter, Completion, Control, Gpu, Job};

/// Last waits kept per VM for the p50/p99 of `status`.
const WAIT_SAMPLES: usize = 1024;

/// What the host assigned to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    pub vm_id: u32,
    pub pool: PoolId,
    pub priority: Priority,
    /// Most requests taken off the ring and not yet answered.
    pub max_queued: usize,
}

impl VmSettings {
    pub fn config(&self) -> DeviceConfig {
        DeviceConfig {
            pool: self.pool,
            priority: self.priority,
            vm_id: self.vm_id,
        }
    }
}

/// A chain taken off a ring, as the VM sees it.
pub struct TakenChain {
    pub head: u16,
    pub parsed: Parsed,
}

/// The virtqueue of one connection, as seen by the VM logic.
pub trait Ring: Send + Sync + Clone + 'static {
    /// Pops the next available chain, parsed; `None` when the ring is empty
    /// or not ready.
    fn pop(&self, vm_id: u32) -> Option<TakenChain>;
    /// Returns a chain to the guest.
    fn add_used(&self, head: u16, len: u32);
    /// Interrupts the guest if the ring's notification rules ask for it.
    fn notify(&self);
    /// Turns guest kicks off while the ring is being drained.
    fn disable_notification(&self);
    /// Turns kicks back on; true when chains arrived meanwhile (EVENT_IDX).
    fn enable_notification(&self) -> bool;
}

pub struct Vm {
    settings: Mutex<VmSettings>,
    gpu: Mutex<Arc<Gpu>>,
    arrivals: Arc<ArrivalCounter>,
    /// Bumped on every connect and disconnect; completions of an older
    /// connection must not touch the new one's ring.
    generation: AtomicU64,
    connected: AtomicBool,
    /// Daemon-wide stop.
    stopping: Arc<AtomicBool>,
    /// This VM was removed from the configuration: take no more chains.
    retired: AtomicBool,
    /// Closes the current connection (set while a frontend is connected).
    hangup: Mutex<Option<Box<dyn Fn() + Send>>>,
    /// The current memory table, handed to a new GPU when the VM moves.
    mem: Mutex<Option<Arc<GuestMem>>>,
    /// The frontend's backend-request channel, for config-change notifications.
    config_channel: Mutex<Option<std::os::fd::OwnedFd>>,
    outstanding: AtomicUsize,
    /// The last pump stopped at the cap: the next completion must pump.
    at_cap: AtomicBool,
    drained: Condvar,
    drain_lock: Mutex<()>,
    /// Serialises draining the ring (kick thread and completions).
    pump_lock: Mutex<()>,
    done: AtomicU64,
    waits: Mutex<VecDeque<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    pub fn new(
        settings: VmSettings,
        gpu: Arc<Gpu>,
        arrivals: Arc<ArrivalCounter>,
        stopping: Arc<AtomicBool>,
    ) -> Arc<Vm> {
        Arc::new(Vm {
            settings: Mutex::new(settings),
            gpu: Mutex::new(gpu),
            arrivals,
            generation: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            stopping,
            retired: AtomicBool::new(false),
            hangup: Mutex::new(None),
            mem: Mutex::new(None),
            config_channel: Mutex::new(None),
            outstanding: AtomicUsize::new(0),
            at_cap: AtomicBool::new(false),
            drained: Condvar::new(),
            drain_lock: Mutex::new(()),
            pump_lock: Mutex::new(()),
            done: AtomicU64::new(0),
            waits: Mutex::new(VecDeque::with_capacity(WAIT_SAMPLES)),
        })
    }

    pub fn settings(&self) -> VmSettings {
        lock(&self.settings).clone()
    }

    pub fn id(&self) -> u32 {
        lock(&self.settings).vm_id
    }

    pub fn gpu(&self) -> Arc<Gpu> {
        lock(&self.gpu).clone()
    }

    /// Applies new settings at once: requests already queued move to the
    /// new priority (and GPU) keeping their arrival order, and the guest is
    /// told when what it sees in config space changed.
    pub fn update(&self, settings: VmSettings, gpu: Arc<Gpu>) {
        let old = std::mem::replace(&mut *lock(&self.settings), settings.clone());
        let old_gpu = std::mem::replace(&mut *lock(&self.gpu), gpu.clone());
        let moved_gpu = !Arc::ptr_eq(&old_gpu, &gpu);
        if moved_gpu {
            // The new GPU's executor needs the memory table; the old one lets go.
            old_gpu.control(Control::ReleaseVm {
                vm_id: settings.vm_id,
            });
            if let Some(mem) = lock(&self.mem).clone() {
                gpu.control(Control::MapMemory {
                    vm_id: settings.vm_id,
                    mem,
                });
            }
        }
        if old.priority != settings.priority || moved_gpu {
            let moved = old_gpu.take_vm(settings.vm_id);
            for mut job in moved {
                job.priority = settings.priority;
                gpu.submit(job);
            }
        }
        if old.config() != settings.config() {
            log::info!(
                "vm{}: now pool {} priority {}",
                settings.vm_id,
                settings.pool,
                settings.priority
            );
            self.notify_config_change();
        }
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the frontend's channel.
    pub fn notify_config_change(&self) {
        let chan = lock(&self.config_channel);
        let Some(fd) = chan.as_ref() else {
            log::info!(
                "vm{}: no backend channel, guest sees the change on its next config read",
                self.id()
            );
            return;
        };
        if let Err(e) = crate::backend_channel::send_config_change(fd) {
            log::warn!("vm{}: config-change notification failed: {e}", self.id());
        }
    }

    pub fn set_config_channel(&self, fd: Option<std::os::fd::OwnedFd>) {
        if fd.is_none() {
            crate::backend_channel::release(self.id());
        }
        *lock(&self.config_channel) = fd;
    }

    pub fn set_hangup(&self, hangup: Option<Box<dyn Fn() + Send>>) {
        *lock(&self.hangup) = hangup;
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Removes the VM from service: no more chains are taken, what it has
    /// queued is answered, then its connection is closed.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wait_drained();
        if let Some(hangup) = lock(&self.hangup).as_ref() {
            hangup();
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A frontend connected; returns the connection's generation.
    pub fn connect(&self) -> u64 {
        self.connected.store(true, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The frontend went away: nothing can be answered to it any more, so
    /// its queued requests are cancelled and the executor frees its state.
    pub fn disconnect(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.connected.store(false, Ordering::Release);
        self.set_config_channel(None);
        self.set_hangup(None);
        let gpu = self.gpu();
        let n = gpu.cancel_vm(self.id());
        if n > 0 {
            log::info!(
                "vm{}: frontend gone, {n} queued request(s) cancelled",
                self.id()
            );
        }
        *lock(&self.mem) = None;
        gpu.control(Control::ReleaseVm { vm_id: self.id() });
    }

    pub fn map_memory(&self, mem: Arc<GuestMem>) {
        *lock(&self.mem) = Some(mem.clone());
        self.gpu().control(Control::MapMemory {
            vm_id: self.id(),
            mem,
        });
    }

    /// The ring is stopping (GET_VRING_BASE): answer queued requests as
    /// CANCELLED and wait for the running one, so that every chain taken is
    /// back in the used ring before the frontend reads the ring base.
    pub fn quiesce(&self) {
        self.gpu().cancel_vm(self.id());
        self.wait_drained();
    }

    fn wait_drained(&self) {
        let mut g = lock(&self.drain_lock);
        while self.outstanding.load(Ordering::Acquire) > 0 {
            g = self
                .drained
                .wait_timeout(g, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn stats(&self) -> VmStatus {
        let mut waits: Vec<u64> = lock(&self.waits).iter().copied().collect();
        waits.sort_unstable();
        let pct = |p: usize| {
            if waits.is_empty() {
                0
            } else {
                waits[(waits.len() - 1) * p / 100]
            }
        };
        let queued = self.gpu().queued_for(self.id()) as u64;
        let outstanding = self.outstanding.load(Ordering::Acquire) as u64;
        VmStatus {
            vm_id: self.id(),
            connected: self.connected.load(Ordering::Acquire),
            queued,
            in_flight: outstanding.saturating_sub(queued),
            done: self.done.load(Ordering::Relaxed),
            wait_p50_ns: pct(50),
            wait_p99_ns: pct(99),
        }
    }

    /// Takes chains off the ring while the VM is under its cap; refused
    /// chains are answered at once, valid ones go to the scheduler.
    pub fn pump<R: Ring>(self: &Arc<Self>, ring: &R) {
        let _serial = lock(&self.pump_lock);
        let gen = self.generation();
        let mut answered = false;
        let mut empty_rounds = 0;
        loop {
            ring.disable_notification();
            let mut blocked = false;
            let mut took = 0usize;
            loop {
                if self.stopping.load(Ordering::Acquire) || self.is_retired() {
                    blocked = true;
                    break;
                }
                let settings = self.settings();
                if self.outstanding.load(Ordering::Acquire) >= settings.max_queued {
                    // Back-pressure: the rest waits in the ring; the next
                    // completion pumps again. Re-check after raising the flag
                    // so that a completion in between is not missed.
                    self.at_cap.store(true, Ordering::Release);
                    if self.outstanding.load(Ordering::Acquire) >= settings.max_queued {
                        blocked = true;
                        break;
                    }
                    self.at_cap.store(false, Ordering::Release);
                }
                let Some(taken) = ring.pop(settings.vm_id) else {
                    break;
                };
                took += 1;
                answered |= self.take(ring, taken, &settings, gen);
            }
            if blocked {
                break;
            }
            let more = ring.enable_notification();
            // Chains that arrived while kicks were off are ours to take; but a
            // ring that keeps announcing chains and yields none is broken (a
            // bad avail index): stop rather than spin, the next kick retries.
            empty_rounds = if took == 0 { empty_rounds + 1 } else { 0 };
            if !more || empty_rounds >= 2 {
                break;
            }
        }
        if answered {
            ring.notify();
        }
    }

    /// Returns true when the chain was answered without scheduling.
    fn take<R: Ring>(
        self: &Arc<Self>,
        ring: &R,
        taken: TakenChain,
        s: &VmSettings,
        gen: u64,
    ) -> bool {
        let taken_at = Instant::now();
        let Parsed { resp, outcome } = taken.parsed;
        match (outcome, resp) {
            (Ok(req), Some(resp)) => {
                self.outstanding.fetch_add(1, Ordering::AcqRel);
                self.gpu().submit(Job {
                    priority: s.priority,
                    arrival: self.arrivals.next(),
                    taken_at,
                    req,
                    done: Box::new(ChainCompletion {
                        vm: self.clone(),
                        ring: ring.clone(),
                        head: taken.head,
                        resp,
                        gen,
                    }),
                });
                false
            }
            (outcome, resp) => {
                let used = match (outcome, &resp) {
                    (Err((err, tag)), Some(resp)) => {
                        log::debug!("vm{}: chain {} refused: {err}", s.vm_id, taken.head);
                        chain::write_response(resp, &Parsed::refusal(err, tag))
                    }
                    _ => {
                        log::debug!(
                            "vm{}: chain {} has no room for a response",
                            s.vm_id,
                            taken.head
                        );
                        0
                    }
                };
                ring.add_used(taken.head, used);
                true
            }
        }
    }

    fn finish<R: Ring>(self: &Arc<Self>, ring: &R, head: u16, used: u32, gen: u64, wait_ns: u64) {
        if gen == self.generation() {
            ring.add_used(head, used);
            ring.notify();
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = lock(&self.waits);
            if w.len() == WAIT_SAMPLES {
                w.pop_front();
            }
            w.push_back(wait_ns);
        }
        let before = self.outstanding.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            let _g = lock(&self.drain_lock);
            self.drained.notify_all();
        }
        if self.at_cap.swap(false, Ordering::AcqRel) && gen == self.generation() {
            self.pump(ring);
        }
    }
}

struct ChainCompletion<R: Ring> {
    vm: Arc<Vm>,
    ring: R,
    head: u16,
    resp: GuestBufs,
    gen: u64,
}

impl<R: Ring> Completion for ChainCompletion<R> {
    fn complete(self: Box<Self>, hdr: RespHdr) {
        let used = chain::write_response(&self.resp, &hdr);
        self.vm
            .finish(&self.ring, self.head, used, self.gen, hdr.queue_ns);
    }
}
