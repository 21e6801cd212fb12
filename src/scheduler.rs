//! One queue and one worker per GPU. Dispatch order: higher priority first,
//! then the order in which the daemon took the chains off the rings (a global
//! arrival counter). Non-preemptive; every response carries the dispatch
//! sequence number and the queue and execution times.
//!
//! Batching: when the popped job is batchable (the executor says so), the
//! worker keeps taking the queue's next choices while they are batchable too,
//! up to [`MAX_BATCH`], and hands them to the executor together. The order
//! and the dispatch sequence numbers are those of one-by-one dispatch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::executor::{Executor, Registrar, Registration, Request, Tenant};
use crate::guest::GuestMem;
use crate::protocol::{Priority, RespHdr, Status};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Executor(#[from] crate::executor::Error),
    #[error("the worker of GPU {0} died while starting")]
    WorkerDied(u32),
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
        self.done.complete(RespHdr {
            status: Status::Cancelled as u32,
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
    },
    /// The VM's frontend went away.
    ReleaseVm { vm_id: u32 },
}

/// The queue of one GPU: three FIFOs, one per priority.
pub struct RunQueue {
    fifos: [VecDeque<Job>; 3],
    policy: Policy,
}

impl RunQueue {
    pub fn new(policy: Policy) -> Self {
        RunQueue {
            fifos: Default::default(),
            policy,
        }
    }

    /// Queues a job behind those that arrived before it (a job moved from
    /// another queue may be older than the tail).
    pub fn push(&mut self, job: Job) {
        let fifo = &mut self.fifos[job.priority as usize];
        match fifo.back() {
            Some(last) if last.arrival > job.arrival => {
                let at = fifo.partition_point(|j| j.arrival < job.arrival);
                fifo.insert(at, job);
            }
            _ => fifo.push_back(job),
        }
    }

    pub fn count_vm(&self, vm_id: u32) -> usize {
        self.fifos
            .iter()
            .flatten()
            .filter(|j| j.tenant.vm_id == vm_id)
            .count()
    }

    pub fn len(&self) -> usize {
        self.fifos.iter().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.fifos.iter().all(VecDeque::is_empty)
    }

    /// Takes the next job to dispatch. Within a priority the FIFO head is the
    /// oldest, so only the three heads compete.
    pub fn pop(&mut self, now: Instant) -> Option<Job> {
        self.pop_if(now, |_| true)
    }

    /// Takes the next job to dispatch only if `pred` accepts it; otherwise
    /// leaves the queue as it is.
    pub fn pop_if(&mut self, now: Instant, pred: impl FnOnce(&Job) -> bool) -> Option<Job> {
        let mut best: Option<(usize, u32, u64)> = None;
        for (level, fifo) in self.fifos.iter().enumerate() {
            let Some(head) = fifo.front() else { continue };
            let effective = self.effective_priority(head, now);
            let better = match best {
                None => true,
                Some((_, p, arrival)) => {
                    effective > p || (effective == p && head.arrival < arrival)
                }
            };
            if better {
                best = Some((level, effective, head.arrival));
            }
        }
        let (level, _, _) = best?;
        let fifo = &mut self.fifos[level];
        if fifo.front().is_some_and(pred) {
            fifo.pop_front()
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
        let mut out = Vec::new();
        for fifo in &mut self.fifos {
            let (gone, kept): (VecDeque<Job>, VecDeque<Job>) =
                fifo.drain(..).partition(|j| j.tenant.vm_id == vm_id);
            *fifo = kept;
            out.extend(gone);
        }
        out
    }

    pub fn drain_all(&mut self) -> Vec<Job> {
        self.fifos.iter_mut().flat_map(|f| f.drain(..)).collect()
    }
}

struct Shared {
    queue: RunQueue,
    control: VecDeque<Control>,
    shutdown: bool,
}

/// One GPU's queue and worker: the run queue plus the worker thread that
/// owns the GPU's executor.
pub struct GpuQueue {
    index: u32,
    shared: Mutex<Shared>,
    wake: Condvar,
    exec_limit: Duration,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// What the executor runs on, once started; dispatch count and busy
    /// time, for `status` and the metrics.
    executor_name: Mutex<String>,
    dispatched: AtomicU64,
    busy_ns: AtomicU64,
}

impl GpuQueue {
    /// Starts the GPU's worker, which builds its executor with `make` on its
    /// own thread (CUDA contexts belong to the thread that drives them).
    pub fn start<F>(
        index: u32,
        make: F,
        policy: Policy,
        exec_limit: Duration,
    ) -> Result<Arc<GpuQueue>, Error>
    where
        F: FnOnce() -> Result<Box<dyn Executor>, crate::executor::Error> + Send + 'static,
    {
        let gpu = Arc::new(GpuQueue {
            index,
            shared: Mutex::new(Shared {
                queue: RunQueue::new(policy),
                control: VecDeque::new(),
                shutdown: false,
            }),
            wake: Condvar::new(),
            exec_limit,
            worker: Mutex::new(None),
            executor_name: Mutex::default(),
            dispatched: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
        });
        let worker_gpu = gpu.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vgpu-gpu{index}"))
            .spawn(move || match make() {
                Ok(executor) => {
                    let name = executor.info().name;
                    log::info!("gpu{index}: {name}");
                    *lock(&worker_gpu.executor_name) = name;
                    let _ = ready_tx.send(Ok(()));
                    worker_gpu.run(executor)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|source| Error::Spawn { gpu: index, source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(Error::Executor(e));
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
        crate::control::GpuStatus {
            gpu: self.index,
            executor: lock(&self.executor_name).clone(),
            queued: self.shared().queue.len() as u64,
            dispatched: self.dispatched.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Queues a job; after shutdown it is answered CANCELLED at once.
    pub fn submit(&self, job: Job) {
        let mut s = self.shared();
        if s.shutdown {
            drop(s);
            job.cancel();
            return;
        }
        s.queue.push(job);
        drop(s);
        self.wake.notify_one();
    }

    pub fn control(&self, msg: Control) {
        self.shared().control.push_back(msg);
        self.wake.notify_one();
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

    fn run(self: &Arc<Self>, mut executor: Box<dyn Executor>) {
        let mut dispatch_seq = 0u64;
        let mut regs = RegThread::start(self, executor.registrar());
        loop {
            let work = {
                let mut s = self.shared();
                loop {
                    if let Some(c) = s.control.pop_front() {
                        break Some(Err(c));
                    }
                    if let Some(job) = s.queue.pop(Instant::now()) {
                        let mut jobs = vec![job];
                        if executor.batchable(&jobs[0].req) {
                            // The queue's next choices, while they are
                            // batchable; a control message ends the batch.
                            let now = Instant::now();
                            while jobs.len() < MAX_BATCH && s.control.is_empty() {
                                match s.queue.pop_if(now, |j| executor.batchable(&j.req)) {
                                    Some(j) => jobs.push(j),
                                    None => break,
                                }
                            }
                        }
                        break Some(Ok(jobs));
                    }
                    if s.shutdown {
                        break None;
                    }
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            match work {
                None => {
                    regs.stop();
                    return;
                }
                Some(Err(Control::MapMemory {
                    vm_id,
                    mem,
                    register,
                })) => regs.map(executor.as_mut(), vm_id, mem, register),
                Some(Err(Control::Registered { vm_id, mem, reg })) => {
                    regs.registered(executor.as_mut(), vm_id, &mem, reg)
                }
                Some(Err(Control::ReleaseVm { vm_id })) => {
                    regs.release(executor.as_mut(), vm_id);
                    executor.release_vm(vm_id)
                }
                Some(Ok(jobs)) => self.dispatch(executor.as_mut(), jobs, &mut dispatch_seq),
            }
        }
    }

    /// Runs `jobs` (one, or a batch in dispatch order) and completes each.
    /// In a batch every job's `exec_ns` is the time of the whole batch, from
    /// handing it to the executor until the executor returned.
    fn dispatch(&self, executor: &mut dyn Executor, jobs: Vec<Job>, dispatch_seq: &mut u64) {
        let start = Instant::now();
        let results = match jobs.as_slice() {
            [job] => vec![executor.execute(job.tenant, &job.req, self.exec_limit)],
            _ => {
                let batch: Vec<(Tenant, &Request)> =
                    jobs.iter().map(|j| (j.tenant, &j.req)).collect();
                executor.execute_batch(&batch, self.exec_limit)
            }
        };
        let exec = start.elapsed();
        self.busy_ns.fetch_add(duration_ns(exec), Ordering::Relaxed);
        self.dispatched
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        if results.len() != jobs.len() {
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
}

impl RegThread {
    fn start(gpu: &Arc<GpuQueue>, registrar: Option<Arc<dyn Registrar>>) -> RegThread {
        let mut t = RegThread {
            tx: None,
            handle: None,
            wanted: Default::default(),
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
                                Some(gpu) => gpu.control(Control::Registered { vm_id, mem, reg }),
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
        let mem = test_memory(0x1000);
        Job {
            tenant: Tenant {
                vm_id: arrival as u32,
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
        /// Random arrivals of random priorities, interleaved with dispatches:
        /// each dispatch takes the highest priority present, and the earliest
        /// arrival within it.
        #[test]
        fn dispatch_is_priority_then_arrival(ops in prop::collection::vec(prop::option::of(0u32..3), 1..200)) {
            let mut q = RunQueue::new(Policy::Strict);
            let mut present: Vec<(u32, u64)> = Vec::new();
            let now = Instant::now();
            for (arrival, op) in ops.into_iter().enumerate() {
                let arrival = arrival as u64;
                match op {
                    Some(p) => {
                        q.push(job(Priority::from_u32(p).unwrap(), arrival, now));
                        present.push((p, arrival));
                    }
                    None => {
                        let want = present.iter().copied().max_by_key(|&(p, a)| (p, std::cmp::Reverse(a)));
                        let got = q.pop(now).map(|j| (j.priority as u32, j.arrival));
                        prop_assert_eq!(got, want);
                        present.retain(|&x| Some(x) != want);
                    }
                }
                prop_assert_eq!(q.len(), present.len());
            }
        }
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
