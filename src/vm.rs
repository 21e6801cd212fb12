//! Per-VM device state that outlives a vhost-user connection: identity and
//! scheduling settings, the requests it has outstanding (back-pressure), and
//! the figures `vgpu-admin status` shows. Free of vhost types: the vhost glue
//! (`vhu_vgpu`) drives it through the [`Ring`] and [`Frontend`] traits.
//!
//! Threads: the VM's ring thread alone touches the ring. It pumps chains off
//! the ring ([`Vm::pump`]) and, when the GPU worker has finished requests,
//! returns them to the guest ([`Vm::reap`]). The GPU worker only writes the
//! response header and puts the finished chain into the connection's
//! [`Link`], then wakes the ring thread: no work for one VM runs on the
//! thread that every VM of the GPU waits for.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::chain::{self, Parsed};
use crate::control::VmStatus;
use crate::executor::Tenant;
use crate::guest::{GuestBufs, GuestMem};
use crate::metrics::{Metrics, VmLabels};
use crate::protocol::{DeviceConfig, GpuHealth, Opcode, PoolId, Priority, RespHdr, Status};
use crate::scheduler::{ArrivalCounter, Completion, Control, GpuQueue, Job};
use crate::stats::WaitSamples;
use crate::sync::lock;

/// Most chains (valid or refused) one pump takes before it yields back to
/// the ring thread's event loop: a refused chain costs the ring thread as
/// much as a valid one, so refusals are charged to this budget too.
/// docs/scheduling.md has the bound.
pub const PUMP_BUDGET: usize = 64;

/// At most one line per this interval about a VM's refused chains; the rest
/// are counted and summed up in the next line.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Rate limit for what a bad ring writes to the log.
#[derive(Debug)]
pub struct LogLimit {
    window_start: Option<Instant>,
    suppressed: u64,
}

/// What to do with one event under a [`LogLimit`].
#[derive(Debug, PartialEq, Eq)]
pub enum LogDecision {
    /// Log it; `suppressed` lines were dropped since the last one.
    Log { suppressed: u64 },
    /// Drop it (counted).
    Drop,
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            window_start: None,
            suppressed: 0,
        }
    }

    /// One event at `now`: the first of each interval is logged.
    pub fn check(&mut self, now: Instant) -> LogDecision {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < REFUSAL_LOG_INTERVAL => {
                self.suppressed += 1;
                LogDecision::Drop
            }
            _ => {
                self.window_start = Some(now);
                LogDecision::Log {
                    suppressed: std::mem::take(&mut self.suppressed),
                }
            }
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new()
    }
}

/// What the host assigned to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    pub vm_id: u32,
    pub pool: PoolId,
    pub priority: Priority,
    /// Most requests taken off the ring and not yet answered.
    pub max_queued: usize,
    /// Device memory the VM's CUDA remoting may hold, in bytes.
    pub gpu_mem_quota: u64,
    /// Whether its guest memory is registered for DMA, or staged.
    pub register: crate::config::Register,
    /// Largest memory table (all regions) its frontend may share, bytes.
    pub max_guest_memory: u64,
}

impl VmSettings {
    pub fn config(&self) -> DeviceConfig {
        DeviceConfig {
            pool: self.pool,
            priority: self.priority,
            vm_id: self.vm_id,
            health: GpuHealth::default(),
        }
    }

    fn tenant(&self) -> Tenant {
        Tenant {
            vm_id: self.vm_id,
            gpu_mem_quota: self.gpu_mem_quota,
        }
    }
}

/// Wakes a VM's socket thread (see [`Vm::set_listener_wake`]).
pub type ListenerWake = Box<dyn Fn() + Send + Sync>;

/// A chain taken off a ring, as the VM sees it.
pub struct TakenChain {
    pub head: u16,
    pub parsed: Parsed,
}

/// The virtqueue of one connection, as seen by the VM logic.
pub trait Ring {
    /// Pops the next available chain, parsed; `None` when the ring is empty
    /// or not ready.
    fn pop(&self) -> Option<TakenChain>;
    /// Returns a chain to the guest.
    fn add_used(&self, head: u16, len: u32);
    /// Interrupts the guest if the ring's notification rules ask for it.
    fn notify(&self);
    /// Turns guest kicks off while the ring is being drained.
    fn disable_notification(&self);
    /// Turns kicks back on; true when chains arrived meanwhile (EVENT_IDX).
    fn enable_notification(&self) -> bool;
}

/// The frontend of one connection, as the VM logic sees it.
pub trait Frontend: Send + Sync {
    /// Wakes the VM's ring thread: finished requests wait in the link.
    fn wake(&self);
    /// Tells the guest that its config space changed.
    fn config_changed(&self);
    /// Closes the connection.
    fn hang_up(&self);
}

/// A chain the GPU worker finished, waiting to go back to the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Finished {
    head: u16,
    used: u32,
    opcode: Opcode,
    resp: RespHdr,
}

#[derive(Default)]
struct Inbox {
    closed: bool,
    /// The ring thread is polling: finished chains need no wake-up.
    polling: bool,
    finished: Vec<Finished>,
}

/// One frontend connection of a VM. Chains taken from its ring are answered
/// through it; once it is closed, their completions only settle the VM's
/// accounting (the ring belongs to a frontend that has gone).
pub struct Link {
    frontend: Arc<dyn Frontend>,
    inbox: Mutex<Inbox>,
}

impl Link {
    pub fn new(frontend: Arc<dyn Frontend>) -> Arc<Link> {
        Arc::new(Link {
            frontend,
            inbox: Mutex::default(),
        })
    }

    /// Closes the link and hands back what was finished but not reaped.
    fn close(&self) -> Vec<Finished> {
        let mut inbox = lock(&self.inbox);
        inbox.closed = true;
        std::mem::take(&mut inbox.finished)
    }
}

pub struct Vm {
    settings: Mutex<VmSettings>,
    gpu: Mutex<Arc<GpuQueue>>,
    arrivals: Arc<ArrivalCounter>,
    /// Daemon-wide stop.
    stopping: Arc<AtomicBool>,
    /// This VM was removed from the configuration: take no more chains.
    retired: AtomicBool,
    /// The connected frontend, if any.
    link: Mutex<Option<Arc<Link>>>,
    /// Wakes the VM's socket thread out of waiting for a frontend (set by
    /// that thread while it listens).
    listener_wake: Mutex<Option<ListenerWake>>,
    /// The current memory table, handed to a new GPU when the VM moves.
    mem: Mutex<Option<Arc<GuestMem>>>,
    /// Chains taken off the ring and not yet back in it (or settled).
    outstanding: AtomicUsize,
    /// The last pump stopped at the cap: the next reap pumps again.
    at_cap: AtomicBool,
    drained: Condvar,
    drain_lock: Mutex<()>,
    done: AtomicU64,
    /// Answers other than OK, refused chains included.
    errors: AtomicU64,
    /// Times a pump stopped at the cap.
    backpressure: AtomicU64,
    waits: Mutex<WaitSamples>,
    /// What the VM's refused chains may write to the log.
    refusal_log: Mutex<LogLimit>,
    /// How long the ring thread polls after its last progress (0: never).
    poll: Duration,
    metrics: Arc<Metrics>,
}

impl Vm {
    pub fn new(
        settings: VmSettings,
        gpu: Arc<GpuQueue>,
        arrivals: Arc<ArrivalCounter>,
        stopping: Arc<AtomicBool>,
        poll: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Vm> {
        Arc::new(Vm {
            settings: Mutex::new(settings),
            gpu: Mutex::new(gpu),
            arrivals,
            stopping,
            retired: AtomicBool::new(false),
            link: Mutex::new(None),
            listener_wake: Mutex::new(None),
            mem: Mutex::new(None),
            outstanding: AtomicUsize::new(0),
            at_cap: AtomicBool::new(false),
            drained: Condvar::new(),
            drain_lock: Mutex::new(()),
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            backpressure: AtomicU64::new(0),
            waits: Mutex::default(),
            refusal_log: Mutex::default(),
            poll,
            metrics,
        })
    }

    pub fn settings(&self) -> VmSettings {
        lock(&self.settings).clone()
    }

    pub fn id(&self) -> u32 {
        lock(&self.settings).vm_id
    }

    pub fn gpu(&self) -> Arc<GpuQueue> {
        lock(&self.gpu).clone()
    }

    /// The labels of the VM's metrics, as its settings are now.
    fn labels(&self) -> VmLabels {
        let s = self.settings();
        VmLabels::new(s.vm_id, s.pool, s.priority, self.gpu().index())
    }

    fn link(&self) -> Option<Arc<Link>> {
        lock(&self.link).clone()
    }

    /// What the guest reads from config space: its settings and the health
    /// of the GPU that serves it.
    pub fn device_config(&self) -> DeviceConfig {
        DeviceConfig {
            health: self.gpu().health(),
            ..self.settings().config()
        }
    }

    /// The health of the VM's GPU changed: tell the guest (a config-change
    /// notification where the frontend took the backend channel).
    pub fn gpu_health_changed(&self) {
        let h = self.gpu().health();
        log::info!(
            "vm{}: gpu{} now {} (epoch {})",
            self.id(),
            self.gpu().index(),
            h.state,
            h.epoch
        );
        if let Some(link) = self.link() {
            link.frontend.config_changed();
        }
    }

    /// Applies new settings at once: requests already queued move to the
    /// new priority (and GPU) keeping their arrival order, and the guest is
    /// told when what it sees in config space changed.
    pub fn update(&self, settings: VmSettings, gpu: Arc<GpuQueue>) {
        let seen = self.device_config();
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
                    register: settings.register.registers(),
                });
            }
        } else if old.register != settings.register {
            if let Some(mem) = lock(&self.mem).clone() {
                gpu.control(Control::MapMemory {
                    vm_id: settings.vm_id,
                    mem,
                    register: settings.register.registers(),
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
        if settings.max_guest_memory < old.max_guest_memory {
            let held = self.guest_mem_bytes();
            if held > settings.max_guest_memory {
                log::warn!(
                    "vm{}: its {} MiB of guest memory are now past its bound ({} MiB): disconnecting",
                    settings.vm_id,
                    held >> 20,
                    settings.max_guest_memory >> 20
                );
                if let Some(link) = self.link() {
                    link.frontend.hang_up();
                }
            }
        }
        if seen != self.device_config() {
            log::info!(
                "vm{}: now pool {} priority {}",
                settings.vm_id,
                settings.pool,
                settings.priority
            );
            match self.link() {
                Some(link) => link.frontend.config_changed(),
                None => log::info!(
                    "vm{}: not connected, the guest sees the change when it reads its config",
                    settings.vm_id
                ),
            }
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// The daemon is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.link).is_some()
    }

    /// Removes the VM from service: no more chains are taken, what it has
    /// queued is answered, then its connection is closed and its socket
    /// thread woken (it then removes the socket, if the path is still its
    /// own, and ends).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.wait_drained();
        if let Some(link) = self.link() {
            link.frontend.hang_up();
        }
        self.wake_listener();
    }

    /// Gets the VM's socket thread out of waiting for a frontend, so that
    /// it sees a retirement or the daemon's stop.
    pub fn wake_listener(&self) {
        if let Some(wake) = lock(&self.listener_wake).as_ref() {
            wake();
        }
    }

    /// The socket thread listens: `wake` gets it out of waiting for a
    /// frontend. Set before it checks [`Vm::is_retired`], so a retirement is
    /// never missed.
    pub fn set_listener_wake(&self, wake: Option<ListenerWake>) {
        *lock(&self.listener_wake) = wake;
    }

    /// A frontend connected through `link`.
    pub fn connect(&self, link: Arc<Link>) {
        *lock(&self.link) = Some(link);
    }

    /// The frontend of `link` went away: nothing can be answered to it any
    /// more, so its queued requests are cancelled and the executor frees the
    /// VM's state.
    pub fn disconnect(&self, link: &Arc<Link>) {
        {
            let mut current = lock(&self.link);
            if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
                *current = None;
            }
        }
        for f in link.close() {
            self.settle(&f);
        }
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
        let register = self.settings().register.registers();
        self.gpu().control(Control::MapMemory {
            vm_id: self.id(),
            mem,
            register,
        });
    }

    /// The ring is stopping (GET_VRING_BASE): answer queued requests as
    /// CANCELLED and wait until the ring thread has returned every chain
    /// taken, so that all are in the used ring before the frontend reads the
    /// ring base. Must not run on the ring thread.
    pub fn quiesce(&self) {
        self.gpu().cancel_vm(self.id());
        self.wait_drained();
    }

    fn wait_drained(&self) {
        while !self.drain_within(Duration::from_secs(3600)) {}
    }

    /// Waits until every chain taken is back in the ring (or settled), for
    /// at most `within`; true when it is.
    pub fn drain_within(&self, within: Duration) -> bool {
        let end = Instant::now() + within;
        let mut g = lock(&self.drain_lock);
        while self.outstanding.load(Ordering::Acquire) > 0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .drained
                .wait_timeout(g, left.min(Duration::from_millis(100)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Bytes of the memory table its frontend shares now.
    fn guest_mem_bytes(&self) -> u64 {
        lock(&self.mem).as_ref().map_or(0, |m| {
            use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
            m.iter().map(|r| r.len()).sum()
        })
    }

    pub fn stats(&self) -> VmStatus {
        let (wait_p50_ns, wait_p99_ns) = {
            let w = lock(&self.waits);
            (w.percentile(50), w.percentile(99))
        };
        let s = self.settings();
        let gpu = self.gpu();
        let queued = gpu.queued_for(s.vm_id) as u64;
        let outstanding = self.outstanding.load(Ordering::Acquire) as u64;
        let guest_mem_bytes = self.guest_mem_bytes();
        VmStatus {
            vm_id: s.vm_id,
            connected: self.is_connected(),
            queued,
            in_flight: outstanding.saturating_sub(queued),
            done: self.done.load(Ordering::Relaxed),
            wait_p50_ns,
            wait_p99_ns,
            pool: s.pool.to_string(),
            priority: s.priority.as_str().to_string(),
            gpu: gpu.index(),
            errors: self.errors.load(Ordering::Relaxed),
            backpressure: self.backpressure.load(Ordering::Relaxed),
            max_queued: s.max_queued as u64,
            guest_mem_bytes,
            gpu_mem_quota_bytes: s.gpu_mem_quota,
        }
    }

    /// The ring thread's work after an event: pump the ring or reap the
    /// finished chains, then keep polling both for up to the poll window
    /// after the last progress, so that a busy VM's requests and
    /// completions need no wake-up (each costs several microseconds). Idle,
    /// the thread sleeps on its eventfds as before.
    ///
    /// A pump that spends its budget ([`PUMP_BUDGET`]) has woken the ring
    /// thread again and `serve` returns at once, so that the event loop
    /// (completions, the frontend's exit) runs between budgets.
    pub fn serve<R: Ring>(self: &Arc<Self>, ring: &R, link: &Arc<Link>) {
        let pumped = self.pump(ring, link);
        let mut progress = pumped + self.reap(ring, link);
        if self.poll.is_zero() || pumped >= PUMP_BUDGET {
            return;
        }
        lock(&link.inbox).polling = true;
        let mut last = Instant::now();
        let mut spins = 0u32;
        loop {
            if progress > 0 {
                last = Instant::now();
            } else if last.elapsed() >= self.poll {
                break;
            }
            // Two cores may be shared by many threads: spin briefly, then
            // let others run between looks.
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(16) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            let reaped = self.reap(ring, link);
            let pumped = self.pump(ring, link);
            progress = reaped + pumped;
            if pumped >= PUMP_BUDGET {
                break;
            }
        }
        lock(&link.inbox).polling = false;
        // A chain finished between the last look and the flag going down
        // found `polling` set and woke nobody: take it now.
        self.reap(ring, link);
    }

    /// Takes chains off the ring while the VM is under its cap; refused
    /// chains are answered at once, valid ones go to the scheduler. Takes at
    /// most [`PUMP_BUDGET`] chains, refused ones included; at the budget it
    /// wakes the ring thread (the rest is taken on the next turn of its
    /// event loop). Runs on the VM's ring thread; returns how many chains it
    /// took.
    pub fn pump<R: Ring>(self: &Arc<Self>, ring: &R, link: &Arc<Link>) -> usize {
        let mut total = 0usize;
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
                if total >= PUMP_BUDGET {
                    // Yield: the event loop calls serve again.
                    link.frontend.wake();
                    blocked = true;
                    break;
                }
                let settings = self.settings();
                if self.outstanding.load(Ordering::Acquire) >= settings.max_queued {
                    // Back-pressure: the rest waits in the ring; the next
                    // reap (on this thread) pumps again.
                    if !self.at_cap.swap(true, Ordering::AcqRel) {
                        self.backpressure.fetch_add(1, Ordering::Relaxed);
                        if self.metrics.is_enabled() {
                            self.metrics.backpressure(&self.labels());
                        }
                    }
                    blocked = true;
                    break;
                }
                let Some(taken) = ring.pop() else {
                    break;
                };
                took += 1;
                total += 1;
                answered |= self.take(ring, taken, &settings, link);
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
        total
    }

    /// Returns the chains the GPU finished to the ring, notifies the guest
    /// once, and resumes a pump that stopped at the cap. Runs on the VM's
    /// ring thread; returns how many chains went back.
    pub fn reap<R: Ring>(self: &Arc<Self>, ring: &R, link: &Arc<Link>) -> usize {
        let finished = std::mem::take(&mut lock(&link.inbox).finished);
        if finished.is_empty() {
            return 0;
        }
        for f in &finished {
            ring.add_used(f.head, f.used);
        }
        ring.notify();
        for f in &finished {
            self.settle(f);
        }
        if self.at_cap.swap(false, Ordering::AcqRel) {
            self.pump(ring, link);
        }
        finished.len()
    }

    /// Returns true when the chain was answered without scheduling.
    fn take<R: Ring>(
        self: &Arc<Self>,
        ring: &R,
        taken: TakenChain,
        s: &VmSettings,
        link: &Arc<Link>,
    ) -> bool {
        let taken_at = Instant::now();
        let Parsed { resp, outcome } = taken.parsed;
        match (outcome, resp) {
            (Ok(req), Some(resp)) => {
                self.outstanding.fetch_add(1, Ordering::AcqRel);
                let opcode = req.opcode;
                self.gpu().submit(Job {
                    tenant: s.tenant(),
                    priority: s.priority,
                    arrival: self.arrivals.next(),
                    taken_at,
                    req,
                    done: Box::new(ChainCompletion {
                        vm: self.clone(),
                        link: link.clone(),
                        head: taken.head,
                        opcode,
                        resp,
                    }),
                });
                false
            }
            (outcome, resp) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let used = match (outcome, &resp) {
                    (Err((err, tag)), Some(resp)) => {
                        self.log_refusal(format_args!("chain {} refused: {err}", taken.head));
                        let hdr = Parsed::refusal(err, tag);
                        if self.metrics.is_enabled() {
                            self.metrics.refused(&self.labels(), None, hdr.status);
                        }
                        chain::write_response(resp, &hdr)
                    }
                    _ => {
                        if self.metrics.is_enabled() {
                            let bad = Status::BadRequest as u32;
                            self.metrics.refused(&self.labels(), None, bad);
                        }
                        self.log_refusal(format_args!(
                            "chain {} has no room for a response",
                            taken.head
                        ));
                        0
                    }
                };
                ring.add_used(taken.head, used);
                true
            }
        }
    }

    /// Logs a refused chain, at most once per [`REFUSAL_LOG_INTERVAL`] per
    /// VM: a ring full of garbage must not fill the host's log.
    fn log_refusal(&self, what: std::fmt::Arguments<'_>) {
        if let LogDecision::Log { suppressed } = lock(&self.refusal_log).check(Instant::now()) {
            if suppressed > 0 {
                log::warn!(
                    "vm{}: {what} ({suppressed} more refused chain(s) not logged)",
                    self.id()
                );
            } else {
                log::warn!("vm{}: {what}", self.id());
            }
        }
    }

    /// Accounts for one chain that is back in the ring, or whose frontend
    /// has gone.
    fn settle(&self, f: &Finished) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if f.resp.status != Status::Ok as u32 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.metrics.is_enabled() {
            let r = &f.resp;
            self.metrics
                .request(&self.labels(), f.opcode, r.status, r.queue_ns, r.exec_ns);
        }
        lock(&self.waits).push(f.resp.queue_ns);
        let before = self.outstanding.fetch_sub(1, Ordering::AcqRel);
        if before == 1 {
            let _g = lock(&self.drain_lock);
            self.drained.notify_all();
        }
    }
}

/// Completion of one chain: runs on the GPU worker, and only writes the
/// response header and hands the chain to the VM's ring thread.
struct ChainCompletion {
    vm: Arc<Vm>,
    link: Arc<Link>,
    head: u16,
    opcode: Opcode,
    resp: GuestBufs,
}

impl Completion for ChainCompletion {
    fn complete(self: Box<Self>, hdr: RespHdr) {
        let mut inbox = lock(&self.link.inbox);
        if inbox.closed {
            drop(inbox);
            self.vm.settle(&Finished {
                head: self.head,
                used: 0,
                opcode: self.opcode,
                resp: hdr,
            });
            return;
        }
        let used = chain::write_response(&self.resp, &hdr);
        // One wake-up per batch of finished chains the ring thread has not
        // yet collected, and none while it polls.
        let wake = inbox.finished.is_empty() && !inbox.polling;
        inbox.finished.push(Finished {
            head: self.head,
            used,
            opcode: self.opcode,
            resp: hdr,
        });
        drop(inbox);
        if wake {
            self.link.frontend.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::CpuExecutor;
    use crate::guest::test_memory;
    use crate::protocol::{Opcode, ReqHdr, Status, RESP_HDR_SIZE};
    use crate::scheduler::Policy;
    use std::sync::mpsc;
    use vm_memory::{Bytes, GuestAddress};

    /// A ring of prepared requests in one guest memory; records what goes
    /// back to the guest.
    struct MockRing {
        mem: Arc<GuestMem>,
        avail: Mutex<std::collections::VecDeque<u16>>,
        used: Mutex<Vec<(u16, u32)>>,
        notified: AtomicUsize,
    }

    const SLOT: u64 = 0x100;

    impl MockRing {
        fn new(slots: usize) -> MockRing {
            MockRing {
                mem: test_memory(SLOT as usize * slots),
                avail: Mutex::default(),
                used: Mutex::default(),
                notified: AtomicUsize::new(0),
            }
        }

        /// Puts a request in slot `head`: header and payload, then room for
        /// the response and `out` output bytes.
        fn offer(&self, head: u16, op: Opcode, payload: &[u8]) {
            let hdr = ReqHdr::new(op as u16, u64::from(head), payload.len() as u32);
            self.offer_hdr(head, hdr, payload);
        }

        fn offer_hdr(&self, head: u16, hdr: ReqHdr, payload: &[u8]) {
            let base = u64::from(head) * SLOT;
            self.mem
                .write_slice(&hdr.encode(), GuestAddress(base))
                .unwrap();
            self.mem
                .write_slice(payload, GuestAddress(base + 24))
                .unwrap();
            self.avail.lock().unwrap().push_back(head);
        }

        fn response(&self, head: u16) -> RespHdr {
            let mut b = [0u8; RESP_HDR_SIZE];
            self.mem
                .read_slice(&mut b, GuestAddress(u64::from(head) * SLOT + 0x80))
                .unwrap();
            RespHdr::decode(&b).unwrap()
        }
    }

    impl Ring for MockRing {
        fn pop(&self) -> Option<TakenChain> {
            let head = self.avail.lock().unwrap().pop_front()?;
            let base = u64::from(head) * SLOT;
            let mut hdr = [0u8; 24];
            self.mem.read_slice(&mut hdr, GuestAddress(base)).unwrap();
            let plen = ReqHdr::decode(&hdr).unwrap().payload_len;
            let descs = [
                virtio_queue::desc::split::Descriptor::new(base, 24 + plen, 0, 0),
                virtio_queue::desc::split::Descriptor::new(
                    base + 0x80,
                    0x80,
                    virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
                    0,
                ),
            ];
            Some(TakenChain {
                head,
                parsed: chain::parse(descs.into_iter(), &self.mem),
            })
        }
        fn add_used(&self, head: u16, len: u32) {
            self.used.lock().unwrap().push((head, len));
        }
        fn notify(&self) {
            self.notified.fetch_add(1, Ordering::Relaxed);
        }
        fn disable_notification(&self) {}
        fn enable_notification(&self) -> bool {
            false
        }
    }

    /// Counts wake-ups and sends each to the test, standing in for the
    /// ring thread's eventfd.
    struct MockFrontend {
        wakes: mpsc::Sender<()>,
        config_changes: Arc<AtomicUsize>,
    }

    impl Frontend for MockFrontend {
        fn wake(&self) {
            let _ = self.wakes.send(());
        }
        fn config_changed(&self) {
            self.config_changes.fetch_add(1, Ordering::Relaxed);
        }
        fn hang_up(&self) {}
    }

    struct Fixture {
        vm: Arc<Vm>,
        link: Arc<Link>,
        wakes: mpsc::Receiver<()>,
        config_changes: Arc<AtomicUsize>,
        gpu: Arc<GpuQueue>,
    }

    fn settings(max_queued: usize) -> VmSettings {
        VmSettings {
            vm_id: 7,
            pool: PoolId::DEFAULT,
            priority: Priority::Medium,
            max_queued,
            gpu_mem_quota: 0,
            register: crate::config::Register::All,
            max_guest_memory: 1 << 30,
        }
    }

    fn fixture(max_queued: usize) -> Fixture {
        let limit = Duration::from_secs(10);
        let gpu = GpuQueue::start(
            0,
            move || Ok(Box::new(CpuExecutor::new(0, limit)) as Box<dyn crate::executor::Executor>),
            Policy::Strict,
            limit,
        )
        .unwrap();
        let vm = Vm::new(
            settings(max_queued),
            gpu.clone(),
            Arc::new(ArrivalCounter::default()),
            Arc::new(AtomicBool::new(false)),
            Duration::ZERO,
            Arc::new(Metrics::new()),
        );
        let (tx, rx) = mpsc::channel();
        let config_changes = Arc::new(AtomicUsize::new(0));
        let link = Link::new(Arc::new(MockFrontend {
            wakes: tx,
            config_changes: config_changes.clone(),
        }));
        vm.connect(link.clone());
        Fixture {
            vm,
            link,
            wakes: rx,
            config_changes,
            gpu,
        }
    }

    fn add_payload(a: i32, b: i32) -> Vec<u8> {
        [a.to_le_bytes(), b.to_le_bytes()].concat()
    }

    /// The ring thread's loop: reap on every wake-up until `n` chains are
    /// back in the ring.
    fn reap_until(f: &Fixture, ring: &MockRing, n: usize) {
        while ring.used.lock().unwrap().len() < n {
            f.wakes
                .recv_timeout(Duration::from_secs(10))
                .expect("a wake-up for finished requests");
            f.vm.reap(ring, &f.link);
        }
    }

    #[test]
    fn finished_chains_return_only_when_the_ring_thread_reaps() {
        let f = fixture(64);
        let ring = MockRing::new(4);
        ring.offer(0, Opcode::ScalarAddI32, &add_payload(100, 200));
        f.vm.pump(&ring, &f.link);
        // The GPU worker finishes the request and wakes the ring thread, but
        // the ring is untouched until the ring thread reaps.
        f.wakes.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(ring.used.lock().unwrap().is_empty());
        f.vm.reap(&ring, &f.link);
        assert_eq!(ring.used.lock().unwrap().as_slice(), &[(0, 44)]);
        assert_eq!(ring.notified.load(Ordering::Relaxed), 1);
        let r = ring.response(0);
        assert_eq!(r.status, Status::Ok as u32);
        let mut sum = [0u8; 4];
        ring.mem
            .read_slice(&mut sum, GuestAddress(0x80 + 40))
            .unwrap();
        assert_eq!(i32::from_le_bytes(sum), 300);
        assert_eq!(f.vm.stats().done, 1);
        f.gpu.shutdown();
    }

    #[test]
    fn a_vm_at_its_cap_resumes_when_its_completions_are_reaped() {
        let f = fixture(2);
        let ring = MockRing::new(8);
        for head in 0..6 {
            ring.offer(head, Opcode::ScalarAddI32, &add_payload(i32::from(head), 1));
        }
        f.vm.pump(&ring, &f.link);
        // Two taken, four wait in the ring.
        assert_eq!(ring.avail.lock().unwrap().len(), 4);
        reap_until(&f, &ring, 6);
        let used = ring.used.lock().unwrap().clone();
        let heads: Vec<u16> = used.iter().map(|&(h, _)| h).collect();
        assert_eq!(heads, vec![0, 1, 2, 3, 4, 5]);
        for head in 0..6u16 {
            assert_eq!(ring.response(head).status, Status::Ok as u32);
        }
        assert!(ring.avail.lock().unwrap().is_empty());
        assert_eq!(f.vm.stats().in_flight, 0);
        f.gpu.shutdown();
    }

    #[test]
    fn refused_chains_are_answered_at_once() {
        let f = fixture(64);
        let ring = MockRing::new(2);
        let mut hdr = ReqHdr::new(Opcode::Ping as u16, 0, 0);
        hdr.flags = 1;
        ring.offer_hdr(0, hdr, &[]);
        ring.offer_hdr(1, ReqHdr::new(0x7777, 1, 0), &[]);
        f.vm.pump(&ring, &f.link);
        // Answered by the pump itself, on the ring thread: no GPU work.
        assert_eq!(ring.used.lock().unwrap().as_slice(), &[(0, 40), (1, 40)]);
        assert_eq!(ring.response(0).status, Status::BadRequest as u32);
        assert_eq!(ring.response(1).status, Status::Unsupported as u32);
        assert_eq!(f.vm.stats().in_flight, 0);
        f.gpu.shutdown();
    }

    #[test]
    fn a_closed_link_settles_without_touching_the_ring() {
        let f = fixture(64);
        let ring = MockRing::new(2);
        let ns: u64 = 50_000_000;
        ring.offer(0, Opcode::BusyWait, &ns.to_le_bytes());
        f.vm.pump(&ring, &f.link);
        f.vm.disconnect(&f.link);
        assert!(!f.vm.is_connected());
        // The running request ends and is settled; nothing reaches the ring.
        f.vm.wait_drained();
        assert!(ring.used.lock().unwrap().is_empty());
        assert_eq!(f.vm.stats().done, 1);
        f.gpu.shutdown();
    }

    #[test]
    fn a_pump_takes_at_most_its_budget_of_refused_chains_then_wakes_its_thread() {
        let f = fixture(2);
        let n = PUMP_BUDGET as u16 * 2 + 5;
        let ring = MockRing::new(usize::from(n));
        for head in 0..n {
            ring.offer_hdr(head, ReqHdr::new(0x7777, u64::from(head), 0), &[]);
        }
        assert_eq!(f.vm.pump(&ring, &f.link), PUMP_BUDGET);
        assert_eq!(ring.used.lock().unwrap().len(), PUMP_BUDGET);
        // It asked its ring thread for another turn.
        f.wakes.recv_timeout(Duration::from_secs(10)).unwrap();
        f.vm.serve(&ring, &f.link);
        f.wakes.recv_timeout(Duration::from_secs(10)).unwrap();
        f.vm.serve(&ring, &f.link);
        assert_eq!(ring.used.lock().unwrap().len(), usize::from(n));
        assert!(ring.avail.lock().unwrap().is_empty());
        f.gpu.shutdown();
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let mut l = LogLimit::new();
        let t0 = Instant::now();
        assert_eq!(l.check(t0), LogDecision::Log { suppressed: 0 });
        for i in 1..1000u32 {
            assert_eq!(
                l.check(t0 + Duration::from_micros(u64::from(i))),
                LogDecision::Drop
            );
        }
        assert_eq!(
            l.check(t0 + REFUSAL_LOG_INTERVAL),
            LogDecision::Log { suppressed: 999 }
        );
        assert_eq!(l.check(t0 + REFUSAL_LOG_INTERVAL), LogDecision::Drop);
    }

    #[test]
    fn a_config_change_reaches_the_frontend() {
        let f = fixture(64);
        let mut s = settings(64);
        s.max_queued = 8;
        f.vm.update(s.clone(), f.gpu.clone());
        assert_eq!(f.config_changes.load(Ordering::Relaxed), 0);
        s.priority = Priority::High;
        f.vm.update(s, f.gpu.clone());
        assert_eq!(f.config_changes.load(Ordering::Relaxed), 1);
        f.gpu.shutdown();
    }
}
