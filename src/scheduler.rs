//! One queue and one worker per GPU. Dispatch order: higher priority first,
//! then the order in which the daemon took the chains off the rings (a global
//! arrival counter). Non-preemptive; every response carries the dispatch
//! sequence number and the queue and execution times.
//!
//! Batching: when the popped job is batchable (the executor says so), the
//! worker keeps taking the queue's next choices while they are batchable too,
//! up to [`MAX_BATCH`], and hands them to the executor together. The order
//! and the dispatch sequence numbers are those of one-by-one dispatch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::executor::{Executor, Fault, Registrar, Registration, Request, Tenant};
use crate::guest::GuestMem;
use crate::protocol::{GpuHealth, GpuState, Priority, RespHdr, Status};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Executor(#[from] crate::executor::Error),
    #[error("the worker of GPU {0} died while starting")]
    WorkerDied(u32),
    #[error("the executor of GPU {0} cannot be rebuilt from a one-shot factory")]
    NoRestart(u32),
    #[error("cannot start the worker thread of GPU {gpu}: {source}")]
    Spawn {
        gpu: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Most jobs the worker hands to the executor at once.
pub const MAX_BATCH: usize = 32;

/// How the queue picks among priorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Always the highest priority present.
    Strict,
    /// A queued request gains one priority level per `step` of waiting, so a
    /// low request competes as high after at most `2 * step` (docs/scheduling.md).
    Aging { step: Duration },
}

/// Source of arrival numbers: one counter for the whole daemon.
#[derive(Debug, Default)]
pub struct ArrivalCounter(AtomicU64);

impl ArrivalCounter {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// How a finished job reaches its VM: writes the response header, returns
/// the chain to the ring and notifies the guest.
pub trait Completion: Send {
    fn complete(self: Box<Self>, resp: RespHdr);
}

pub struct Job {
    /// The VM the request runs for, and the limits its settings give it.
    pub tenant: Tenant,
    pub priority: Priority,
    pub arrival: u64,
    /// When the chain was taken off the ring.
    pub taken_at: Instant,
    pub req: Request,
    pub done: Box<dyn Completion>,
}

impl Job {
    /// Answers a job that never ran.
    pub fn cancel(self) {
        self.fail(Status::Cancelled)
    }

    /// Answers a job that never ran with `status`.
    pub fn fail(self, status: Status) {
        self.done.complete(RespHdr {
            status: status as u32,
            tag: self.req.tag,
            queue_ns: elapsed_ns(self.taken_at),
            ..Default::default()
        });
    }
}

/// Work for a GPU's worker besides jobs.
pub enum Control {
    /// The VM's memory table changed (executors may register it for DMA).
    /// `register` is the VM's setting: false keeps the VM on the staging
    /// path (nothing of its RAM is pinned).
    MapMemory {
        vm_id: u32,
        mem: Arc<GuestMem>,
        register: bool,
    },
    /// The registration thread finished registering `mem` for the VM.
    Registered {
        vm_id: u32,
        mem: Arc<GuestMem>,
        reg: Registration,
        /// The [`RegThread`] that made it (a rebuilt executor has a new one).
        thread: u64,
    },
    /// The VM's frontend went away.
    ReleaseVm { vm_id: u32 },
}

/// One priority level: a FIFO per VM (by arrival) and the round-robin
/// order of the VMs that have jobs queued at this level.
#[derive(Default)]
struct Level {
    vms: HashMap<u32, VecDeque<Job>>,
    /// VMs with jobs here; the front one is served next.
    order: VecDeque<u32>,
    len: usize,
}

impl Level {
    fn push(&mut self, job: Job) {
        let vm = job.tenant.vm_id;
        let fifo = self.vms.entry(vm).or_default();
        if fifo.is_empty() {
            self.order.push_back(vm);
        }
        match fifo.back() {
            Some(last) if last.arrival > job.arrival => {
                let at = fifo.partition_point(|j| j.arrival < job.arrival);
                fifo.insert(at, job);
            }
            _ => fifo.push_back(job),
        }
        self.len += 1;
    }

    fn head(&self, vm: u32) -> Option<&Job> {
        self.vms.get(&vm).and_then(VecDeque::front)
    }

    /// The VM whose turn it is.
    fn front(&self) -> Option<&Job> {
        self.order.front().and_then(|&vm| self.head(vm))
    }

    /// The oldest job of the level (each VM's head is its oldest).
    fn oldest(&self) -> Option<&Job> {
        self.order
            .iter()
            .filter_map(|&vm| self.head(vm))
            .min_by_key(|j| j.arrival)
    }

    /// Takes the head of `vm`; the VM goes to the back of the round.
    fn pop(&mut self, vm: u32) -> Option<Job> {
        let fifo = self.vms.get_mut(&vm)?;
        let job = fifo.pop_front()?;
        self.len -= 1;
        let more = !fifo.is_empty();
        if !more {
            self.vms.remove(&vm);
        }
        if let Some(at) = self.order.iter().position(|&v| v == vm) {
            self.order.remove(at);
        }
        if more {
            self.order.push_back(vm);
        }
        Some(job)
    }

    fn take_vm(&mut self, vm: u32) -> Vec<Job> {
        self.order.retain(|&v| v != vm);
        let gone: Vec<Job> = self.vms.remove(&vm).map(Vec::from).unwrap_or_default();
        self.len -= gone.len();
        gone
    }

    fn drain(&mut self) -> Vec<Job> {
        let mut out = Vec::with_capacity(self.len);
        for vm in std::mem::take(&mut self.order) {
            out.extend(self.vms.remove(&vm).into_iter().flatten());
        }
        self.len = 0;
        out
    }
}

/// The queue of one GPU: per priority, a FIFO per VM served round robin
/// (one request per turn), so that within a priority a VM with many queued
/// requests delays a peer by at most one request per turn
/// (docs/scheduling.md). Between priorities, strict (or aging).
pub struct RunQueue {
    levels: [Level; 3],
    policy: Policy,
}

impl RunQueue {
    pub fn new(policy: Policy) -> Self {
        RunQueue {
            levels: Default::default(),
            policy,
        }
    }

    /// Queues a job behind the VM's jobs that arrived before it (a job
    /// moved from another queue may be older than the VM's tail).
    pub fn push(&mut self, job: Job) {
        self.levels[job.priority as usize].push(job);
    }

    pub fn count_vm(&self, vm_id: u32) -> usize {
        self.levels
            .iter()
            .filter_map(|l| l.vms.get(&vm_id))
            .map(VecDeque::len)
            .sum()
    }

    pub fn len(&self) -> usize {
        self.levels.iter().map(|l| l.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the next job to dispatch.
    pub fn pop(&mut self, now: Instant) -> Option<Job> {
        self.pop_if(now, |_| true)
    }

    /// The job a level offers: the head of the VM whose turn it is; under
    /// aging, the level's oldest job instead when it has aged further (so
    /// that the aging bound holds whatever the round's order).
    fn candidate(&self, level: &Level, now: Instant) -> Option<(u32, u32, u64)> {
        let front = level.front()?;
        let mut pick = (
            front.tenant.vm_id,
            self.effective_priority(front, now),
            front.arrival,
        );
        if matches!(self.policy, Policy::Aging { .. }) {
            if let Some(old) = level.oldest() {
                let eff = self.effective_priority(old, now);
                if eff > pick.1 {
                    pick = (old.tenant.vm_id, eff, old.arrival);
                }
            }
        }
        Some(pick)
    }

    /// Takes the next job to dispatch only if `pred` accepts it; otherwise
    /// leaves the queue as it is. Each level offers one candidate; the
    /// highest effective priority wins, ties go to the earlier arrival.
    pub fn pop_if(&mut self, now: Instant, pred: impl FnOnce(&Job) -> bool) -> Option<Job> {
        let mut best: Option<(usize, u32, u32, u64)> = None;
        for (index, level) in self.levels.iter().enumerate() {
            let Some((vm, effective, arrival)) = self.candidate(level, now) else {
                continue;
            };
            let better = match best {
                None => true,
                Some((_, _, p, a)) => effective > p || (effective == p && arrival < a),
            };
            if better {
                best = Some((index, vm, effective, arrival));
            }
        }
        let (index, vm, _, _) = best?;
        let level = &mut self.levels[index];
        if level.head(vm).is_some_and(pred) {
            level.pop(vm)
        } else {
            None
        }
    }

    fn effective_priority(&self, job: &Job, now: Instant) -> u32 {
        let base = job.priority as u32;
        match self.policy {
            Policy::Strict => base,
            Policy::Aging { step } => {
                let waited = now.saturating_duration_since(job.taken_at);
                let steps = waited.as_nanos() / step.as_nanos().max(1);
                (base as u128 + steps).min(Priority::High as u128) as u32
            }
        }
    }

    /// Removes every queued job of one VM.
    pub fn take_vm(&mut self, vm_id: u32) -> Vec<Job> {
        let mut out: Vec<Job> = self
            .levels
            .iter_mut()
            .flat_map(|l| l.take_vm(vm_id))
            .collect();
        out.sort_by_key(|j| j.arrival);
        out
    }

    pub fn drain_all(&mut self) -> Vec<Job> {
        self.levels.iter_mut().flat_map(Level::drain).collect()
    }
}

struct Shared {
    queue: RunQueue,
    control: VecDeque<Control>,
    shutdown: bool,
    /// The GPU's state and recovery epoch; not OK: [`GpuQueue::submit`]
    /// answers DEVICE_ERROR at once.
    health: GpuHealth,
}

/// What the worker does next.
enum Work {
    Control(Control),
    Jobs(Vec<Job>),
    /// Try building an executor again (none since a fault).
    Retry,
}

/// How a GPU's worker retries building its executor while it cannot: the
/// first attempt right after the fault, the next after `first`, each wait
/// twice the last, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            first: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

/// One GPU's queue and worker: the run queue plus the worker thread that
/// owns the GPU's executor.
pub struct GpuQueue {
    index: u32,
    shared: Mutex<Shared>,
    wake: Condvar,
    /// Bumped by every submit, control message and shutdown: what the worker
    /// watches, without the lock, while it polls.
    arrivals: AtomicU64,
    /// How long the worker polls for new work after it ran out, before it
    /// sleeps on `wake` (ns; 0: never polls). Saves the wake-up of a request
    /// that follows soon, at the cost of a busy core meanwhile.
    poll_ns: AtomicU64,
    exec_limit: Duration,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// What the executor runs on, once started; dispatch count and busy
    /// time, for `status` and the metrics.
    executor_name: Mutex<String>,
    dispatched: AtomicU64,
    busy_ns: AtomicU64,
    /// The executor's running totals, published after each piece of work.
    counters: Mutex<crate::executor::ExecutorCounters>,
    restarts: AtomicU64,
    /// Executors ended by a fault or panic, attempts to build one after
    /// that, and the last fault.
    faults: AtomicU64,
    recovery_attempts: AtomicU64,
    last_fault: Mutex<String>,
    recovery: Recovery,
    /// Told the GPU's index whenever its state changes (the daemon tells
    /// the VMs' guests).
    watchers: Mutex<Vec<std::sync::mpsc::Sender<u32>>>,
}

impl GpuQueue {
    /// Starts the GPU's worker, which builds its executor with `make` on its
    /// own thread (CUDA contexts belong to the thread that drives them). A
    /// one-shot factory: after a panic of the executor the queue answers
    /// DEVICE_ERROR (see [`GpuQueue::start_restartable`]).
    pub fn start<F>(
        index: u32,
        make: F,
        policy: Policy,
        exec_limit: Duration,
    ) -> Result<Arc<GpuQueue>, Error>
    where
        F: FnOnce() -> Result<Box<dyn Executor>, crate::executor::Error> + Send + 'static,
    {
        let mut once = Some(make);
        GpuQueue::start_restartable(
            index,
            move || once.take().map(|make| make().map_err(Error::Executor)),
            policy,
            exec_limit,
        )
    }

    /// Starts the GPU's worker with a factory it may call again: the worker
    /// is supervised. When the executor panics, the panic is caught and
    /// logged, the running job(s) and every queued job are answered
    /// DEVICE_ERROR, and the worker builds a new executor with `make` (and
    /// hands it the VMs' memory tables again). `make` returning `None` means
    /// it cannot build another.
    pub fn start_restartable<F>(
        index: u32,
        make: F,
        policy: Policy,
        exec_limit: Duration,
    ) -> Result<Arc<GpuQueue>, Error>
    where
        F: FnMut() -> Option<Result<Box<dyn Executor>, Error>> + Send + 'static,
    {
        GpuQueue::start_supervised(index, make, policy, exec_limit, Recovery::default())
    }

    /// [`GpuQueue::start_restartable`] with explicit retry timing.
    pub fn start_supervised<F>(
        index: u32,
        mut make: F,
        policy: Policy,
        exec_limit: Duration,
        recovery: Recovery,
    ) -> Result<Arc<GpuQueue>, Error>
    where
        F: FnMut() -> Option<Result<Box<dyn Executor>, Error>> + Send + 'static,
    {
        let gpu = Arc::new(GpuQueue {
            index,
            shared: Mutex::new(Shared {
                queue: RunQueue::new(policy),
                control: VecDeque::new(),
                shutdown: false,
                health: GpuHealth::default(),
            }),
            wake: Condvar::new(),
            arrivals: AtomicU64::new(0),
            poll_ns: AtomicU64::new(0),
            exec_limit,
            worker: Mutex::new(None),
            executor_name: Mutex::default(),
            dispatched: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            counters: Mutex::default(),
            restarts: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            recovery_attempts: AtomicU64::new(0),
            last_fault: Mutex::default(),
            recovery,
            watchers: Mutex::default(),
        });
        let worker_gpu = gpu.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vgpu-gpu{index}"))
            .spawn(move || match make() {
                Some(Ok(executor)) => {
                    let name = executor.info().name;
                    log::info!("gpu{index}: {name}");
                    *lock(&worker_gpu.executor_name) = name;
                    let _ = ready_tx.send(Ok(()));
                    worker_gpu.supervise(executor, &mut make)
                }
                Some(Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                }
                None => {
                    let _ = ready_tx.send(Err(Error::NoRestart(index)));
                }
            })
            .map_err(|source| Error::Spawn { gpu: index, source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => {
                let _ = handle.join();
                return Err(Error::WorkerDied(index));
            }
        }
        *lock(&gpu.worker) = Some(handle);
        Ok(gpu)
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Live figures of the GPU.
    pub fn status(&self) -> crate::control::GpuStatus {
        let (queued, health) = {
            let s = self.shared();
            (s.queue.len() as u64, s.health)
        };
        crate::control::GpuStatus {
            gpu: self.index,
            executor: lock(&self.executor_name).clone(),
            queued,
            dispatched: self.dispatched.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            counters: *lock(&self.counters),
            state: health.state.as_str().to_string(),
            epoch: health.epoch,
            faults: self.faults.load(Ordering::Relaxed),
            recovery_attempts: self.recovery_attempts.load(Ordering::Relaxed),
            last_fault: lock(&self.last_fault).clone(),
        }
    }

    /// The GPU's state and recovery epoch (config space `gpu_state`,
    /// `gpu_epoch`).
    pub fn health(&self) -> GpuHealth {
        self.shared().health
    }

    /// `tx` is sent the GPU's index whenever its health changes.
    pub fn watch_health(&self, tx: std::sync::mpsc::Sender<u32>) {
        lock(&self.watchers).push(tx);
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Queues a job; after shutdown it is answered CANCELLED at once, and
    /// DEVICE_ERROR at once while the GPU is not serving (FAILED,
    /// RECOVERING).
    pub fn submit(&self, job: Job) {
        let mut s = self.shared();
        if s.shutdown {
            drop(s);
            job.cancel();
            return;
        }
        if !s.health.state.serves() {
            drop(s);
            job.fail(Status::DeviceError);
            return;
        }
        s.queue.push(job);
        self.arrivals.fetch_add(1, Ordering::Release);
        drop(s);
        self.wake.notify_one();
    }

    pub fn control(&self, msg: Control) {
        self.shared().control.push_back(msg);
        self.arrivals.fetch_add(1, Ordering::Release);
        self.wake.notify_one();
    }

    /// Sets how long the worker polls for work before it sleeps
    /// (`poll_us` of `config/vgpu.toml`, the same window as the ring threads').
    pub fn set_poll(&self, poll: Duration) {
        let ns = u64::try_from(poll.as_nanos()).unwrap_or(u64::MAX);
        self.poll_ns.store(ns, Ordering::Relaxed);
    }

    /// Spins until something arrives after `seen` or `poll_ns` passes; true
    /// when something arrived.
    fn poll_arrivals(&self, seen: u64) -> bool {
        let poll = Duration::from_nanos(self.poll_ns.load(Ordering::Relaxed));
        if poll.is_zero() {
            return false;
        }
        let until = Instant::now() + poll;
        loop {
            if self.arrivals.load(Ordering::Acquire) != seen {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Removes every queued job of `vm_id` (to move them elsewhere).
    pub fn take_vm(&self, vm_id: u32) -> Vec<Job> {
        self.shared().queue.take_vm(vm_id)
    }

    pub fn queued_for(&self, vm_id: u32) -> usize {
        self.shared().queue.count_vm(vm_id)
    }

    /// Answers CANCELLED to every queued job of `vm_id`.
    pub fn cancel_vm(&self, vm_id: u32) -> usize {
        let jobs = self.take_vm(vm_id);
        let n = jobs.len();
        jobs.into_iter().for_each(Job::cancel);
        n
    }

    /// Stops the worker: the running job completes, queued jobs are answered
    /// CANCELLED, then the thread exits and is joined.
    pub fn shutdown(&self) {
        let jobs = {
            let mut s = self.shared();
            s.shutdown = true;
            self.arrivals.fetch_add(1, Ordering::Release);
            s.queue.drain_all()
        };
        jobs.into_iter().for_each(Job::cancel);
        self.wake.notify_all();
        let handle = lock(&self.worker).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                log::error!("gpu{}: worker thread panicked", self.index);
            }
        }
    }

    /// The worker's loop, supervised. An executor ends when it panics or
    /// reports a [`Fault`] after a piece of work; then everything queued
    /// is answered DEVICE_ERROR, the GPU's state goes to RECOVERING (or
    /// FAILED for a lost device) and a new executor is built. While none
    /// can be built, the state is FAILED, every request answers
    /// DEVICE_ERROR at once (in [`GpuQueue::submit`]), and the worker retries
    /// with exponential backoff ([`Recovery`]).
    fn supervise<F>(self: &Arc<Self>, executor: Box<dyn Executor>, make: &mut F)
    where
        F: FnMut() -> Option<Result<Box<dyn Executor>, Error>>,
    {
        let mut regs = RegThread::start(self, executor.registrar());
        let mut executor = Some(executor);
        let mut dispatch_seq = 0u64;
        // The VMs' memory tables and register settings, handed again to a
        // rebuilt executor.
        let mut tables: HashMap<u32, (Arc<GuestMem>, bool)> = HashMap::new();
        // Without an executor: when to try building one next, and the wait
        // after that attempt.
        let mut retry_at: Option<Instant> = None;
        let mut backoff = self.recovery.first;
        loop {
            let work = {
                let mut s = self.shared();
                // Polls once per idle spell: a miss sleeps on `wake`.
                let mut polled = false;
                loop {
                    if let Some(c) = s.control.pop_front() {
                        break Some(Work::Control(c));
                    }
                    if executor.is_none() && retry_at.is_some_and(|t| Instant::now() >= t) {
                        break Some(Work::Retry);
                    }
                    if let Some(job) = s.queue.pop(Instant::now()) {
                        let mut jobs = vec![job];
                        if let Some(ex) = executor.as_ref().filter(|e| e.batchable(&jobs[0].req)) {
                            // The queue's next choices, while they are
                            // batchable; a control message ends the batch.
                            let now = Instant::now();
                            while jobs.len() < MAX_BATCH && s.control.is_empty() {
                                match s.queue.pop_if(now, |j| ex.batchable(&j.req)) {
                                    Some(j) => jobs.push(j),
                                    None => break,
                                }
                            }
                        }
                        break Some(Work::Jobs(jobs));
                    }
                    if s.shutdown {
                        break None;
                    }
                    if let (None, Some(at)) = (executor.as_ref(), retry_at) {
                        let left = at.saturating_duration_since(Instant::now());
                        s = self
                            .wake
                            .wait_timeout(s, left)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                        continue;
                    }
                    if !polled {
                        polled = true;
                        let seen = self.arrivals.load(Ordering::Acquire);
                        drop(s);
                        self.poll_arrivals(seen);
                        s = self.shared();
                        continue;
                    }
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            let index = self.index;
            let panicked = match (work, executor.as_mut()) {
                (None, _) => {
                    regs.stop();
                    return;
                }
                (Some(Work::Retry), _) => {
                    self.recovery_attempts.fetch_add(1, Ordering::Relaxed);
                    executor = self.rebuild(make, &tables, &mut regs);
                    if executor.is_some() {
                        retry_at = None;
                        backoff = self.recovery.first;
                    } else {
                        backoff = (backoff * 2).min(self.recovery.max);
                        retry_at = Some(Instant::now() + backoff);
                        log::warn!("gpu{index}: next attempt in {backoff:?}");
                    }
                    false
                }
                (
                    Some(Work::Control(Control::MapMemory {
                        vm_id,
                        mem,
                        register,
                    })),
                    ex,
                ) => {
                    tables.insert(vm_id, (mem.clone(), register));
                    ex.is_some_and(|ex| {
                        catch(index, || {
                            ex.memory_policy(vm_id, register);
                            regs.map(ex.as_mut(), vm_id, mem, register)
                        })
                        .is_none()
                    })
                }
                (
                    Some(Work::Control(Control::Registered {
                        vm_id,
                        mem,
                        reg,
                        thread,
                    })),
                    ex,
                ) => match ex {
                    Some(ex) if thread == regs.id => {
                        catch(index, || regs.registered(ex.as_mut(), vm_id, &mem, reg)).is_none()
                    }
                    // Made for an executor that is gone: unregister it.
                    _ => {
                        regs.discard(reg);
                        false
                    }
                },
                (Some(Work::Control(Control::ReleaseVm { vm_id })), ex) => {
                    tables.remove(&vm_id);
                    match ex {
                        Some(ex) => catch(index, || {
                            regs.release(ex.as_mut(), vm_id);
                            ex.release_vm(vm_id)
                        })
                        .is_none(),
                        None => {
                            regs.wanted.remove(&vm_id);
                            false
                        }
                    }
                }
                (Some(Work::Jobs(jobs)), Some(ex)) => {
                    !self.dispatch(ex.as_mut(), jobs, &mut dispatch_seq)
                }
                (Some(Work::Jobs(jobs)), None) => {
                    for job in jobs {
                        job.fail(Status::DeviceError);
                    }
                    false
                }
            };
            let fault = if panicked {
                Some(Fault::Context("the executor panicked".into()))
            } else {
                executor.as_ref().and_then(|ex| {
                    catch(index, || ex.fault())
                        .unwrap_or_else(|| Some(Fault::Context("the executor panicked".into())))
                })
            };
            if let Some(fault) = fault {
                // The executor's state is unknown: everything queued is
                // answered, and a new executor takes over.
                log::error!("gpu{index}: {fault}: ending the executor");
                self.faults.fetch_add(1, Ordering::Relaxed);
                *lock(&self.last_fault) = fault.to_string();
                let state = match fault {
                    Fault::Context(_) => GpuState::Recovering,
                    Fault::Device(_) => GpuState::Failed,
                };
                let queued = self.set_state(state, false);
                if !queued.is_empty() {
                    log::error!(
                        "gpu{index}: {} queued request(s) answered DEVICE_ERROR",
                        queued.len()
                    );
                }
                for job in queued {
                    job.fail(Status::DeviceError);
                }
                if let Some(old) = executor.take() {
                    // Its drop may fail too: contained like the rest.
                    catch(index, move || drop(old));
                }
                self.recovery_attempts.fetch_add(1, Ordering::Relaxed);
                executor = self.rebuild(make, &tables, &mut regs);
                backoff = self.recovery.first;
                retry_at = match executor {
                    Some(_) => None,
                    None => {
                        log::warn!("gpu{index}: next attempt in {backoff:?}");
                        Some(Instant::now() + backoff)
                    }
                };
            }
            if let Some(ex) = executor.as_ref() {
                *lock(&self.counters) = ex.counters();
            }
        }
    }

    /// Sets the GPU's state (and bumps its epoch after a rebuild); tells
    /// the watchers when it changed. Leaving OK empties the queue under the
    /// same lock that [`GpuQueue::submit`] checks the state under, so no job
    /// is queued behind the change: the jobs returned are for the caller to
    /// answer.
    fn set_state(&self, state: GpuState, rebuilt: bool) -> Vec<Job> {
        let (changed, jobs) = {
            let mut s = self.shared();
            let before = s.health;
            s.health.state = state;
            if rebuilt {
                s.health.epoch = s.health.epoch.wrapping_add(1);
            }
            let jobs = if state == GpuState::Ok {
                Vec::new()
            } else {
                s.queue.drain_all()
            };
            (before != s.health, jobs)
        };
        if changed {
            log::warn!("gpu{}: state {state}", self.index);
            lock(&self.watchers).retain(|w| w.send(self.index).is_ok());
        }
        jobs
    }

    /// Tries to build a new executor; sets the GPU's state to what came of it.
    fn rebuild<F>(
        self: &Arc<Self>,
        make: &mut F,
        tables: &HashMap<u32, (Arc<GuestMem>, bool)>,
        regs: &mut RegThread,
    ) -> Option<Box<dyn Executor>>
    where
        F: FnMut() -> Option<Result<Box<dyn Executor>, Error>>,
    {
        let built = self.try_build(make, tables, regs);
        let jobs = match built {
            Some(_) => {
                self.restarts.fetch_add(1, Ordering::Relaxed);
                self.set_state(GpuState::Ok, true)
            }
            None => self.set_state(GpuState::Failed, false),
        };
        for job in jobs {
            job.fail(Status::DeviceError);
        }
        built
    }

    fn try_build<F>(
        self: &Arc<Self>,
        make: &mut F,
        tables: &HashMap<u32, (Arc<GuestMem>, bool)>,
        regs: &mut RegThread,
    ) -> Option<Box<dyn Executor>>
    where
        F: FnMut() -> Option<Result<Box<dyn Executor>, Error>>,
    {
        match catch(self.index, make) {
            Some(Some(Ok(mut ex))) => {
                log::warn!("gpu{}: executor restarted", self.index);
                // Registrations belong to the executor that made them: a new
                // registration thread registers the tables for the new one.
                // The old thread is not waited for (it may be registering a
                // large table): it ends when its queue is done, and what it
                // still sends back is discarded by its id.
                *regs = RegThread::start(self, ex.registrar());
                for (&vm_id, (mem, register)) in tables {
                    catch(self.index, || {
                        regs.map(ex.as_mut(), vm_id, mem.clone(), *register)
                    })?;
                }
                Some(ex)
            }
            Some(Some(Err(e))) => {
                log::error!("gpu{}: cannot restart the executor: {e}", self.index);
                None
            }
            Some(None) => {
                log::error!("gpu{}: the executor cannot be restarted", self.index);
                None
            }
            None => None,
        }
    }

    /// How many times the executor was rebuilt after a panic.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Runs `jobs` (one, or a batch in dispatch order) and completes each.
    /// In a batch every job's `exec_ns` is the time of the whole batch, from
    /// handing it to the executor until the executor returned.
    /// Returns false when the executor panicked (its jobs are then
    /// answered DEVICE_ERROR).
    fn dispatch(
        &self,
        executor: &mut dyn Executor,
        jobs: Vec<Job>,
        dispatch_seq: &mut u64,
    ) -> bool {
        let start = Instant::now();
        let limit = self.exec_limit;
        let results = catch(self.index, || match jobs.as_slice() {
            [job] => vec![executor.execute(job.tenant, &job.req, limit)],
            _ => {
                let batch: Vec<(Tenant, &Request)> =
                    jobs.iter().map(|j| (j.tenant, &j.req)).collect();
                executor.execute_batch(&batch, limit)
            }
        });
        let alive = results.is_some();
        let results = results.unwrap_or_default();
        let exec = start.elapsed();
        self.busy_ns.fetch_add(duration_ns(exec), Ordering::Relaxed);
        self.dispatched
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        if alive && results.len() != jobs.len() {
            log::error!(
                "gpu{}: executor returned {} results for a batch of {}",
                self.index,
                results.len(),
                jobs.len()
            );
        }
        for (i, job) in jobs.into_iter().enumerate() {
            *dispatch_seq += 1;
            let result = results.get(i).copied().unwrap_or(Err(Status::DeviceError));
            self.complete(job, result, start, exec, *dispatch_seq);
        }
        alive
    }

    fn complete(
        &self,
        job: Job,
        result: Result<u32, Status>,
        start: Instant,
        exec: Duration,
        dispatch_seq: u64,
    ) {
        let queue_ns = duration_ns(start.saturating_duration_since(job.taken_at));
        // The executor alone decides a timeout (it knows whether the output
        // was written); a late OK stays OK.
        let (status, output_len) = match result {
            Ok(n) => (Status::Ok, n),
            Err(s) => (s, 0),
        };
        job.done.complete(RespHdr {
            status: status as u32,
            output_len,
            tag: job.req.tag,
            dispatch_seq,
            queue_ns,
            exec_ns: duration_ns(exec),
        });
    }
}

/// Runs `f`, catching a panic (logged): `None` when it panicked.
fn catch<T>(gpu: u32, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            log::error!("gpu{gpu}: the executor panicked: {what}");
            None
        }
    }
}

/// Work for a GPU's registration thread.
enum RegWork {
    Register {
        vm_id: u32,
        mem: Arc<GuestMem>,
    },
    /// Unregister (drop) a registration the executor gave up.
    Drop(Registration),
}

/// The GPU worker's side of registration: guest memory is registered and
/// unregistered on a thread of its own, so the worker keeps dispatching
/// (other VMs' requests, and this VM's on the staging path) meanwhile.
struct RegThread {
    tx: Option<std::sync::mpsc::Sender<RegWork>>,
    handle: Option<JoinHandle<()>>,
    /// The table each VM wants registered (pending or attached).
    wanted: std::collections::HashMap<u32, Arc<GuestMem>>,
    /// Tells this thread's registrations from those of a thread that served
    /// an executor since replaced.
    id: u64,
}

/// Source of [`RegThread::id`].
static REG_THREAD_IDS: AtomicU64 = AtomicU64::new(0);

impl RegThread {
    fn start(gpu: &Arc<GpuQueue>, registrar: Option<Arc<dyn Registrar>>) -> RegThread {
        let id = REG_THREAD_IDS.fetch_add(1, Ordering::Relaxed);
        let mut t = RegThread {
            tx: None,
            handle: None,
            wanted: Default::default(),
            id,
        };
        let Some(registrar) = registrar else {
            return t;
        };
        let (tx, rx) = std::sync::mpsc::channel::<RegWork>();
        let back = Arc::downgrade(gpu);
        let index = gpu.index;
        let spawned = std::thread::Builder::new()
            .name(format!("vgpu-gpu{index}-reg"))
            .spawn(move || {
                for work in rx {
                    match work {
                        RegWork::Register { vm_id, mem } => {
                            let started = Instant::now();
                            let reg = registrar.register(vm_id, &mem);
                            log::info!(
                                "gpu{index}: vm{vm_id}: memory table registered in {:?}",
                                started.elapsed()
                            );
                            match back.upgrade() {
                                Some(gpu) => gpu.control(Control::Registered {
                                    vm_id,
                                    mem,
                                    reg,
                                    thread: id,
                                }),
                                None => drop(reg),
                            }
                        }
                        RegWork::Drop(reg) => drop(reg),
                    }
                }
            });
        match spawned {
            Ok(h) => {
                t.tx = Some(tx);
                t.handle = Some(h);
            }
            Err(e) => log::error!(
                "gpu{index}: no registration thread ({e}): guest memory stays on the staging path"
            ),
        }
        t
    }

    /// Hands `reg` to the registration thread to unregister there.
    fn discard(&self, reg: Registration) {
        if let Some(tx) = &self.tx {
            if let Err(std::sync::mpsc::SendError(RegWork::Drop(reg))) = tx.send(RegWork::Drop(reg))
            {
                drop(reg);
            }
        }
    }

    fn map(&mut self, ex: &mut dyn Executor, vm_id: u32, mem: Arc<GuestMem>, register: bool) {
        if self.tx.is_none() {
            // Nothing to register off-thread: the executor's own handling.
            if register {
                ex.map_guest_memory(vm_id, &mem);
            }
            return;
        }
        if register
            && self
                .wanted
                .get(&vm_id)
                .is_some_and(|m| Arc::ptr_eq(m, &mem))
        {
            return; // the same table again
        }
        if let Some(old) = ex.detach_memory(vm_id) {
            self.discard(old);
        }
        if !register {
            self.wanted.remove(&vm_id);
            log::info!("vm{vm_id}: register=staging: its guest memory is not registered");
            return;
        }
        self.wanted.insert(vm_id, mem.clone());
        if let Some(tx) = &self.tx {
            if tx.send(RegWork::Register { vm_id, mem }).is_err() {
                self.wanted.remove(&vm_id);
            }
        }
    }

    fn registered(
        &mut self,
        ex: &mut dyn Executor,
        vm_id: u32,
        mem: &Arc<GuestMem>,
        reg: Registration,
    ) {
        let current = self.wanted.get(&vm_id).is_some_and(|m| Arc::ptr_eq(m, mem));
        let leftover = if current {
            ex.attach_memory(vm_id, reg)
        } else {
            Some(reg) // the VM left or changed its table meanwhile
        };
        if let Some(r) = leftover {
            self.discard(r);
        }
    }

    fn release(&mut self, ex: &mut dyn Executor, vm_id: u32) {
        self.wanted.remove(&vm_id);
        if let Some(old) = ex.detach_memory(vm_id) {
            self.discard(old);
        }
    }

    /// Lets the thread finish what it was given, then joins it.
    fn stop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                log::error!("registration thread panicked");
            }
        }
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub fn elapsed_ns(since: Instant) -> u64 {
    duration_ns(since.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{test_memory, GuestBufs};
    use crate::protocol::Opcode;
    use proptest::prelude::*;

    struct Nothing;
    impl Completion for Nothing {
        fn complete(self: Box<Self>, _resp: RespHdr) {}
    }

    fn job(priority: Priority, arrival: u64, taken_at: Instant) -> Job {
        job_of(arrival as u32, priority, arrival, taken_at)
    }

    fn job_of(vm_id: u32, priority: Priority, arrival: u64, taken_at: Instant) -> Job {
        let mem = test_memory(0x1000);
        Job {
            tenant: Tenant {
                vm_id,
                gpu_mem_quota: 0,
            },
            priority,
            arrival,
            taken_at,
            req: Request {
                opcode: Opcode::Ping,
                tag: arrival,
                payload: GuestBufs::new(mem.clone()),
                output: GuestBufs::new(mem),
            },
            done: Box::new(Nothing),
        }
    }

    proptest! {
        /// Random arrivals of random priorities from a few VMs, interleaved
        /// with dispatches: each dispatch takes the highest priority present;
        /// within it, the VM whose turn it is in the level's round (a VM
        /// joins the round at the back when it has nothing queued at that
        /// level, and goes to the back after each dispatch), and that VM's
        /// earliest arrival.
        #[test]
        fn dispatch_is_priority_then_round_robin_by_vm_then_arrival(
            ops in prop::collection::vec(prop::option::of((0u32..3, 0u32..4)), 1..200)
        ) {
            let mut q = RunQueue::new(Policy::Strict);
            // (priority, vm, arrival) queued, and each level's round.
            let mut present: Vec<(u32, u32, u64)> = Vec::new();
            let mut rounds: [VecDeque<u32>; 3] = Default::default();
            let now = Instant::now();
            for (arrival, op) in ops.into_iter().enumerate() {
                let arrival = arrival as u64;
                match op {
                    Some((p, vm)) => {
                        if !present.iter().any(|&(pp, v, _)| pp == p && v == vm) {
                            rounds[p as usize].push_back(vm);
                        }
                        q.push(job_of(vm, Priority::from_u32(p).unwrap(), arrival, now));
                        present.push((p, vm, arrival));
                    }
                    None => {
                        let want = present.iter().map(|&(p, _, _)| p).max().map(|p| {
                            let vm = rounds[p as usize].pop_front().unwrap();
                            let a = present
                                .iter()
                                .filter(|&&(pp, v, _)| pp == p && v == vm)
                                .map(|&(_, _, a)| a)
                                .min()
                                .unwrap();
                            present.retain(|&x| x != (p, vm, a));
                            if present.iter().any(|&(pp, v, _)| pp == p && v == vm) {
                                rounds[p as usize].push_back(vm);
                            }
                            (p, vm, a)
                        });
                        let got = q
                            .pop(now)
                            .map(|j| (j.priority as u32, j.tenant.vm_id, j.arrival));
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(q.len(), present.len());
            }
        }
    }

    #[test]
    fn a_vm_with_many_queued_cannot_delay_a_peer_of_its_priority() {
        let now = Instant::now();
        let mut q = RunQueue::new(Policy::Strict);
        // VM 1 queues 64 long requests, then VM 2 one.
        for a in 0..64 {
            q.push(job_of(1, Priority::Medium, a, now));
        }
        q.push(job_of(2, Priority::Medium, 64, now));
        let order: Vec<(u32, u64)> = std::iter::from_fn(|| q.pop(now))
            .map(|j| (j.tenant.vm_id, j.arrival))
            .take(3)
            .collect();
        assert_eq!(order, vec![(1, 0), (2, 64), (1, 1)]);
        // Strict between levels stays: a high request still goes first.
        let mut q = RunQueue::new(Policy::Strict);
        q.push(job_of(1, Priority::Medium, 0, now));
        q.push(job_of(2, Priority::High, 1, now));
        assert_eq!(q.pop(now).unwrap().tenant.vm_id, 2);
    }

    #[test]
    fn aging_lets_no_flood_of_low_requests_compete_as_high_within_200_ms() {
        let step = Duration::from_millis(100);
        let now = Instant::now();
        let mut q = RunQueue::new(Policy::Aging { step });
        // 1,000 low requests from 10 VMs, all waiting just under 2 steps.
        let almost = step * 2 - Duration::from_nanos(1);
        for a in 0..1000u64 {
            q.push(job_of((a % 10) as u32, Priority::Low, a, now - almost));
        }
        q.push(job_of(99, Priority::High, 1000, now));
        // They compete as medium at most: the newer high request wins.
        assert_eq!(q.pop(now).unwrap().tenant.vm_id, 99);
        // Another high request, newer still, also wins within 200 ms.
        q.push(job_of(98, Priority::High, 1001, now));
        assert_eq!(q.pop(now).unwrap().tenant.vm_id, 98);
        // At 200 ms they compete as high, and the older goes first.
        q.push(job_of(97, Priority::High, 1002, now));
        let later = now + Duration::from_nanos(1);
        assert_eq!(q.pop(later).unwrap().arrival, 0);
        // The aged request of the level is found whatever the round's order.
        let mut q = RunQueue::new(Policy::Aging { step });
        // VM 1 is first in the round; VM 2's request is older and aged.
        q.push(job_of(1, Priority::Low, 1, now));
        q.push(job_of(2, Priority::Low, 0, now - step * 2));
        q.push(job_of(3, Priority::High, 2, now));
        assert_eq!(q.pop(now).unwrap().tenant.vm_id, 2);
    }

    #[test]
    fn aging_lifts_a_starved_request_within_two_steps() {
        let step = Duration::from_millis(100);
        let now = Instant::now();
        let mut q = RunQueue::new(Policy::Aging { step });
        q.push(job(Priority::Low, 1, now - step * 2));
        q.push(job(Priority::High, 2, now));
        q.push(job(Priority::Medium, 3, now - step));
        // The low request has aged to high and arrived first.
        assert_eq!(q.pop(now).unwrap().arrival, 1);
        // Medium aged one step is high too, but arrived after the high one.
        assert_eq!(q.pop(now).unwrap().arrival, 2);
        assert_eq!(q.pop(now).unwrap().arrival, 3);
        // Without aging the same queue is strict.
        let mut q = RunQueue::new(Policy::Strict);
        q.push(job(Priority::Low, 1, now - step * 2));
        q.push(job(Priority::High, 2, now));
        assert_eq!(q.pop(now).unwrap().arrival, 2);
    }

    /// Records every batch it is given (tags in order); GET_INFO is not
    /// batchable, BUSY_WAIT blocks until the test releases it.
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u64>>>>,
        started: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Executor for Recorder {
        fn info(&self) -> crate::protocol::DeviceInfo {
            crate::executor::CpuExecutor::new(0, Duration::from_secs(1)).info()
        }
        fn execute(
            &mut self,
            _tenant: Tenant,
            req: &Request,
            _limit: Duration,
        ) -> Result<u32, Status> {
            self.batches.lock().unwrap().push(vec![req.tag]);
            if req.opcode == Opcode::BusyWait {
                self.started.send(()).unwrap();
                self.release.recv().unwrap();
            }
            Ok(0)
        }
        fn batchable(&self, req: &Request) -> bool {
            req.opcode == Opcode::Ping
        }
        fn execute_batch(
            &mut self,
            batch: &[(Tenant, &Request)],
            _limit: Duration,
        ) -> Vec<Result<u32, Status>> {
            let reqs: Vec<&Request> = batch.iter().map(|&(_, r)| r).collect();
            assert!(reqs.iter().all(|r| self.batchable(r)));
            self.batches
                .lock()
                .unwrap()
                .push(reqs.iter().map(|r| r.tag).collect());
            reqs.iter().map(|r| Ok(r.tag as u32)).collect()
        }
    }

    struct Record(Arc<Mutex<Vec<RespHdr>>>);
    impl Completion for Record {
        fn complete(self: Box<Self>, resp: RespHdr) {
            self.0.lock().unwrap().push(resp);
        }
    }

    #[test]
    fn batches_keep_dispatch_order() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let rec = batches.clone();
        let gpu = GpuQueue::start(
            0,
            move || {
                Ok(Box::new(Recorder {
                    batches: rec,
                    started: started_tx,
                    release: release_rx,
                }) as Box<dyn Executor>)
            },
            Policy::Strict,
            Duration::from_secs(10),
        )
        .unwrap();
        let resps = Arc::new(Mutex::new(Vec::new()));
        let submit = |tag: u64, opcode: Opcode, priority: Priority| {
            let mut j = job(priority, tag, Instant::now());
            j.req.opcode = opcode;
            j.done = Box::new(Record(resps.clone()));
            gpu.submit(j);
        };
        // Tag 0 occupies the worker while the rest queue up.
        submit(0, Opcode::BusyWait, Priority::Medium);
        started_rx.recv().unwrap();
        for tag in 1..=42 {
            let (op, prio) = match tag {
                36 => (Opcode::GetInfo, Priority::Medium),
                41 | 42 => (Opcode::Ping, Priority::Low),
                _ => (Opcode::Ping, Priority::Medium),
            };
            submit(tag, op, prio);
        }
        submit(43, Opcode::Ping, Priority::High);
        release_tx.send(()).unwrap();
        let t = Instant::now();
        while resps.lock().unwrap().len() < 44 {
            assert!(t.elapsed() < Duration::from_secs(10), "not all answered");
            std::thread::sleep(Duration::from_millis(1));
        }
        gpu.shutdown();
        // One-by-one order: high first, then medium by arrival, then low.
        let order: Vec<u64> = [0, 43].into_iter().chain(1..=40).chain([41, 42]).collect();
        let resps = resps.lock().unwrap();
        let got: Vec<(u64, u64)> = resps.iter().map(|r| (r.tag, r.dispatch_seq)).collect();
        let want: Vec<(u64, u64)> = order.iter().copied().zip(1..).collect();
        assert_eq!(got, want);
        // Each batched job got its own result; GET_INFO ran alone.
        for r in resps.iter().filter(|r| r.tag != 0 && r.tag != 36) {
            assert_eq!(r.status, Status::Ok as u32);
            assert_eq!(u64::from(r.output_len), r.tag);
        }
        let batches = batches.lock().unwrap();
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        // [busy], [43, 1..=31] (32), [32..=35], [36: GET_INFO], [37..=42].
        assert_eq!(sizes, vec![1, MAX_BATCH, 4, 1, 6]);
        let flat: Vec<u64> = batches.iter().flatten().copied().collect();
        assert_eq!(flat, order);
    }

    /// Panics on tag 666 once `go` says so; everything else is OK.
    struct Panicky {
        go: std::sync::mpsc::Receiver<()>,
    }

    impl Executor for Panicky {
        fn info(&self) -> crate::protocol::DeviceInfo {
            crate::executor::CpuExecutor::new(0, Duration::from_secs(1)).info()
        }
        fn execute(&mut self, _t: Tenant, req: &Request, _l: Duration) -> Result<u32, Status> {
            if req.tag == 666 {
                let _ = self.go.recv();
                panic!("injected executor panic");
            }
            Ok(0)
        }
    }

    #[test]
    fn a_panicking_executor_is_restarted_and_everything_is_answered() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(Some(go_rx)));
        let builds = Arc::new(AtomicU64::new(0));
        let b = builds.clone();
        let gpu = GpuQueue::start_restartable(
            0,
            move || {
                b.fetch_add(1, Ordering::Relaxed);
                // The first executor gets the trigger; later ones never panic.
                let go = lock(&go_rx)
                    .take()
                    .unwrap_or_else(|| std::sync::mpsc::channel().1);
                Some(Ok(Box::new(Panicky { go }) as Box<dyn Executor>))
            },
            Policy::Strict,
            Duration::from_secs(10),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<RespHdr>();
        struct Tx(std::sync::mpsc::Sender<RespHdr>);
        impl Completion for Tx {
            fn complete(self: Box<Self>, resp: RespHdr) {
                let _ = self.0.send(resp);
            }
        }
        let submit = |tag: u64| {
            let mut j = job(Priority::Medium, tag, Instant::now());
            j.req.tag = tag;
            j.done = Box::new(Tx(tx.clone()));
            gpu.submit(j);
        };
        submit(666);
        for tag in 1..=3 {
            submit(tag);
        }
        go_tx.send(()).unwrap();
        let mut got: Vec<(u64, u32)> = (0..4)
            .map(|_| {
                let r = rx.recv_timeout(Duration::from_secs(30)).expect("answered");
                (r.tag, r.status)
            })
            .collect();
        got.sort();
        let dev = Status::DeviceError as u32;
        assert_eq!(got, vec![(1, dev), (2, dev), (3, dev), (666, dev)]);
        // A new executor serves what comes next (while it is being built
        // the GPU is RECOVERING and requests answer DEVICE_ERROR at once).
        let t = Instant::now();
        while gpu.health().state != GpuState::Ok {
            assert!(t.elapsed() < Duration::from_secs(30), "never rebuilt");
            std::thread::sleep(Duration::from_millis(1));
        }
        submit(7);
        let r = rx.recv_timeout(Duration::from_secs(30)).expect("answered");
        assert_eq!((r.tag, r.status), (7, Status::Ok as u32));
        assert_eq!(builds.load(Ordering::Relaxed), 2);
        assert_eq!(gpu.restarts(), 1);
        assert_eq!(
            gpu.health(),
            GpuHealth {
                state: GpuState::Ok,
                epoch: 1
            }
        );
        assert_eq!(gpu.status().faults, 1);
        gpu.shutdown();
    }

    /// Reports a lost device after the request tagged 13; OK otherwise.
    struct Loses {
        lost: bool,
    }

    impl Executor for Loses {
        fn info(&self) -> crate::protocol::DeviceInfo {
            crate::executor::CpuExecutor::new(0, Duration::from_secs(1)).info()
        }
        fn execute(&mut self, _t: Tenant, req: &Request, _l: Duration) -> Result<u32, Status> {
            if req.tag == 13 {
                self.lost = true;
            }
            if self.lost {
                Err(Status::DeviceError)
            } else {
                Ok(0)
            }
        }
        fn fault(&self) -> Option<Fault> {
            self.lost
                .then(|| Fault::Device("injected: fell off the bus".into()))
        }
    }

    /// A lost device: the GPU goes FAILED, requests answer DEVICE_ERROR at
    /// once, the worker retries building the executor with growing waits
    /// (every failed build counted), and once one builds the GPU is OK
    /// with the next epoch. The watchers hear of each change.
    #[test]
    fn a_lost_device_is_retried_with_backoff_until_it_comes_back() {
        let builds = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, f) = (builds.clone(), failing.clone());
        let gpu = GpuQueue::start_supervised(
            0,
            move || {
                b.fetch_add(1, Ordering::SeqCst);
                if f.load(Ordering::SeqCst) {
                    return Some(Err(Error::Executor(crate::executor::Error::Unavailable(
                        "gone".into(),
                    ))));
                }
                Some(Ok(Box::new(Loses { lost: false }) as Box<dyn Executor>))
            },
            Policy::Strict,
            Duration::from_secs(10),
            Recovery {
                first: Duration::from_millis(1),
                max: Duration::from_millis(8),
            },
        )
        .unwrap();
        let (watch_tx, watch_rx) = std::sync::mpsc::channel();
        gpu.watch_health(watch_tx);
        let (tx, rx) = std::sync::mpsc::channel::<RespHdr>();
        struct Tx(std::sync::mpsc::Sender<RespHdr>);
        impl Completion for Tx {
            fn complete(self: Box<Self>, resp: RespHdr) {
                let _ = self.0.send(resp);
            }
        }
        let submit = |tag: u64| {
            let mut j = job(Priority::Medium, tag, Instant::now());
            j.req.tag = tag;
            j.done = Box::new(Tx(tx.clone()));
            gpu.submit(j);
            let r = rx.recv_timeout(Duration::from_secs(30)).expect("answered");
            assert_eq!(r.tag, tag);
            Status::from_u32(r.status).unwrap()
        };
        assert_eq!(submit(1), Status::Ok);
        failing.store(true, Ordering::SeqCst);
        assert_eq!(submit(13), Status::DeviceError);
        assert_eq!(watch_rx.recv_timeout(Duration::from_secs(30)), Ok(0));
        assert_eq!(gpu.health().state, GpuState::Failed);
        // Refused at once while FAILED.
        assert_eq!(submit(2), Status::DeviceError);
        // The worker keeps trying: several failed builds.
        let t = Instant::now();
        while builds.load(Ordering::SeqCst) < 5 {
            assert!(t.elapsed() < Duration::from_secs(30), "no retries");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(gpu.health().state, GpuState::Failed);
        failing.store(false, Ordering::SeqCst);
        assert_eq!(watch_rx.recv_timeout(Duration::from_secs(30)), Ok(0));
        assert_eq!(
            gpu.health(),
            GpuHealth {
                state: GpuState::Ok,
                epoch: 1
            }
        );
        assert_eq!(submit(3), Status::Ok);
        let st = gpu.status();
        assert_eq!((st.state.as_str(), st.epoch, st.faults), ("ok", 1, 1));
        assert!(st.recovery_attempts >= 5, "{st:?}");
        assert!(st.last_fault.contains("fell off the bus"), "{st:?}");
        gpu.shutdown();
    }

    #[test]
    fn a_polling_worker_serves_and_shuts_down_without_its_wake_up() {
        let gpu = GpuQueue::start(
            0,
            || {
                Ok(
                    Box::new(crate::executor::CpuExecutor::new(0, Duration::from_secs(1)))
                        as Box<dyn Executor>,
                )
            },
            Policy::Strict,
            Duration::from_secs(10),
        )
        .unwrap();
        // A window far longer than the waits below: whatever arrives while
        // the worker polls must be seen by the poll itself.
        gpu.set_poll(Duration::from_secs(600));
        let (tx, rx) = std::sync::mpsc::channel::<RespHdr>();
        struct Tx(std::sync::mpsc::Sender<RespHdr>);
        impl Completion for Tx {
            fn complete(self: Box<Self>, resp: RespHdr) {
                let _ = self.0.send(resp);
            }
        }
        for tag in 1..=3u64 {
            let mut j = job(Priority::Medium, tag, Instant::now());
            j.req.opcode = Opcode::Ping;
            j.req.tag = tag;
            j.done = Box::new(Tx(tx.clone()));
            gpu.submit(j);
            let r = rx.recv_timeout(Duration::from_secs(60)).expect("answered");
            assert_eq!((r.tag, r.status), (tag, Status::Ok as u32));
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let g = gpu.clone();
        std::thread::spawn(move || {
            g.shutdown();
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("shutdown ends the poll");
    }

    #[test]
    fn take_vm_removes_only_that_vm() {
        let now = Instant::now();
        let mut q = RunQueue::new(Policy::Strict);
        for a in 0..6 {
            q.push(job(Priority::from_u32((a % 3) as u32).unwrap(), a, now));
        }
        let gone = q.take_vm(4);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].arrival, 4);
        assert_eq!(q.len(), 5);
        assert_eq!(q.drain_all().len(), 5);
        assert!(q.is_empty());
    }

    /// A registration of [`SlowReg`]: says on which thread it was dropped
    /// (unregistered).
    struct FakeReg {
        vm_id: u32,
        dropped: std::sync::mpsc::Sender<(u32, String)>,
    }
    impl Drop for FakeReg {
        fn drop(&mut self) {
            let name = std::thread::current().name().unwrap_or("").to_string();
            let _ = self.dropped.send((self.vm_id, name));
        }
    }

    /// A registrar as slow as the test wants: it tells the test it started,
    /// then waits for the test's go (a 1 GiB registration takes 0.35–0.6 s
    /// on the H200 host, a 32 GiB one 20 s).
    struct SlowRegistrar {
        started: Mutex<std::sync::mpsc::Sender<u32>>,
        go: Mutex<std::sync::mpsc::Receiver<()>>,
        dropped: std::sync::mpsc::Sender<(u32, String)>,
    }
    impl Registrar for SlowRegistrar {
        fn register(&self, vm_id: u32, _mem: &Arc<GuestMem>) -> Registration {
            let _ = lock(&self.started).send(vm_id);
            let _ = lock(&self.go).recv();
            Box::new(FakeReg {
                vm_id,
                dropped: self.dropped.clone(),
            })
        }
    }

    /// An executor whose registration is slow on purpose; it logs, for each
    /// request, the VM and whether that VM's memory was registered (DMA) or
    /// not (staging), and the thread every call ran on.
    struct SlowReg {
        registrar: Arc<SlowRegistrar>,
        attached: std::collections::HashMap<u32, Registration>,
        log: Arc<Mutex<Vec<(u64, u32, bool)>>>,
        threads: Arc<Mutex<Vec<String>>>,
    }
    impl Executor for SlowReg {
        fn info(&self) -> crate::protocol::DeviceInfo {
            crate::executor::CpuExecutor::new(0, Duration::from_secs(1)).info()
        }
        fn execute(
            &mut self,
            tenant: Tenant,
            req: &Request,
            _limit: Duration,
        ) -> Result<u32, Status> {
            let registered = self.attached.contains_key(&tenant.vm_id);
            lock(&self.log).push((req.tag, tenant.vm_id, registered));
            lock(&self.threads).push(std::thread::current().name().unwrap_or("").to_string());
            Ok(u32::from(registered))
        }
        fn map_guest_memory(&mut self, _vm_id: u32, _mem: &Arc<GuestMem>) {
            panic!("the scheduler registers off-thread when there is a registrar");
        }
        fn registrar(&self) -> Option<Arc<dyn Registrar>> {
            Some(self.registrar.clone())
        }
        fn attach_memory(&mut self, vm_id: u32, reg: Registration) -> Option<Registration> {
            self.attached.insert(vm_id, reg)
        }
        fn detach_memory(&mut self, vm_id: u32) -> Option<Registration> {
            self.attached.remove(&vm_id)
        }
    }

    /// Registration never stalls other VMs: while VM 1's (large) table
    /// registers, VM 2's requests are dispatched and answered, and so are
    /// VM 1's own, on the staging path; once registered, VM 1's requests use
    /// the registration; unregistration happens on the registration thread,
    /// never on the GPU's worker. A VM with register=staging is never
    /// registered.
    #[test]
    fn registration_runs_off_the_gpu_thread() {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let registrar = Arc::new(SlowRegistrar {
            started: Mutex::new(started_tx),
            go: Mutex::new(go_rx),
            dropped: dropped_tx,
        });
        let (l, t) = (log.clone(), threads.clone());
        let gpu = GpuQueue::start(
            0,
            move || {
                Ok(Box::new(SlowReg {
                    registrar,
                    attached: Default::default(),
                    log: l,
                    threads: t,
                }) as Box<dyn Executor>)
            },
            Policy::Strict,
            Duration::from_secs(10),
        )
        .unwrap();
        let resps = Arc::new(Mutex::new(Vec::new()));
        let submit = |tag: u64, vm: u32, priority: Priority| {
            let mut j = job(priority, tag, Instant::now());
            j.tenant.vm_id = vm;
            j.done = Box::new(Record(resps.clone()));
            gpu.submit(j);
        };
        let wait_answers = |n: usize| {
            // A bound against hangs only; nothing is timed.
            let t = Instant::now();
            while resps.lock().unwrap().len() < n {
                assert!(t.elapsed() < Duration::from_secs(30), "not all answered");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let big = test_memory(64 << 20);
        let recv = Duration::from_secs(30);

        // VM 1 connects: its registration starts and hangs there.
        gpu.control(Control::MapMemory {
            vm_id: 1,
            mem: big.clone(),
            register: true,
        });
        assert_eq!(started_rx.recv_timeout(recv), Ok(1));
        // Meanwhile VM 2 (high) and VM 1 (medium) submit: both answered
        // while the registration has not returned.
        submit(1, 2, Priority::High);
        submit(2, 1, Priority::Medium);
        submit(3, 2, Priority::Low);
        wait_answers(3);
        {
            let resps = resps.lock().unwrap();
            let got: Vec<(u64, u64, u32)> = resps
                .iter()
                .map(|r| (r.tag, r.dispatch_seq, r.status))
                .collect();
            assert_eq!(got, vec![(1, 1, 0), (2, 2, 0), (3, 3, 0)]);
            assert!(resps.iter().all(|r| r.output_len == 0), "all staged");
        }
        assert_eq!(
            *log.lock().unwrap(),
            vec![(1, 2, false), (2, 1, false), (3, 2, false)]
        );
        // The same table again while it registers: no second registration.
        gpu.control(Control::MapMemory {
            vm_id: 1,
            mem: big.clone(),
            register: true,
        });
        // The registration ends; VM 1's next request uses it.
        go_tx.send(()).unwrap();
        let t = Instant::now();
        loop {
            let n = resps.lock().unwrap().len() + 1;
            submit(100, 1, Priority::Medium);
            wait_answers(n);
            if resps
                .lock()
                .unwrap()
                .last()
                .is_some_and(|r| r.output_len == 1)
            {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "never attached");
        }
        assert_eq!(
            started_rx.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty),
            "one registration per table"
        );
        // VM 2 still staged: it never asked for registration.
        let n = resps.lock().unwrap().len();
        submit(200, 2, Priority::Medium);
        wait_answers(n + 1);
        assert_eq!(resps.lock().unwrap().last().map(|r| r.output_len), Some(0));

        // register=staging for VM 3: nothing registered, never.
        gpu.control(Control::MapMemory {
            vm_id: 3,
            mem: test_memory(1 << 20),
            register: false,
        });
        let n = resps.lock().unwrap().len();
        submit(300, 3, Priority::Medium);
        wait_answers(n + 1);
        assert_eq!(resps.lock().unwrap().last().map(|r| r.output_len), Some(0));

        // VM 1 leaves: its registration is dropped on the registration thread.
        gpu.control(Control::ReleaseVm { vm_id: 1 });
        assert_eq!(
            dropped_rx.recv_timeout(recv),
            Ok((1, "vgpu-gpu0-reg".to_string()))
        );
        assert_eq!(
            started_rx.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty),
            "VM 3 (staging) never registered"
        );
        gpu.shutdown();
        assert!(threads.lock().unwrap().iter().all(|t| t == "vgpu-gpu0"));
    }
}
