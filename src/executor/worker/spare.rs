//! Warm spare workers. Starting a worker costs its process start, the
//! sandbox and, above all, CUDA initialisation and context creation
//! (~0.25 s on the H200): a VM's first remoting call, and its first call
//! after a fault, would wait that long. So each GPU keeps `spares` workers
//! (config `[worker] spares`, 2 by default) that have done all of it and
//! wait for their VM (`wire.rs`: ready frame, then the assignment). Handing
//! one over writes one 16-byte frame; once the VM's call is answered a new
//! spare is started, which warms up in its own process, so the GPU's thread
//! only pays for the fork and exec. Two, because a VM's first call and its
//! call after a fault often come within the warm-up of the replacement
//! (measured on the H200: the call after a fault waited 10-111 ms for the
//! replacement with one spare).
//!
//! A spare that died (its process exited: a driver failure, a kill) is
//! never handed over: it is reaped and the VM gets a fresh worker.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::{Error, Worker, WorkerConfig};

/// Starts and hands out the workers of one GPU.
pub struct Launcher {
    path: PathBuf,
    gpu_index: u32,
    config: WorkerConfig,
    /// Warm spares, oldest (most likely warm) first.
    spares: VecDeque<Worker>,
    /// Spares being started, each on a thread of its own.
    starting: Vec<JoinHandle<Result<Worker, Error>>>,
    /// Spares handed over and spares found dead, for tests and logs.
    pub handed_over: u64,
    pub found_dead: u64,
}

impl Launcher {
    /// A launcher for GPU `gpu_index`; starts the spares when spares are on.
    pub fn new(path: &Path, gpu_index: u32, config: WorkerConfig) -> Self {
        let mut l = Launcher {
            path: path.to_path_buf(),
            gpu_index,
            config,
            spares: VecDeque::new(),
            starting: Vec::new(),
            handed_over: 0,
            found_dead: 0,
        };
        l.refill();
        l
    }

    pub fn copy_chunk(&self) -> usize {
        self.config.copy_chunk
    }

    /// The pid of the spare handed over next, when there is one (waits for
    /// those being started).
    pub fn spare_pid(&mut self) -> Option<u32> {
        self.collect();
        self.spares.front().map(Worker::pid)
    }

    fn start(&self) -> Result<Worker, Error> {
        Worker::spawn(&self.path, self.gpu_index, &self.config.sandbox, None)
    }

    /// Starts spares, each on a thread of its own, until `spares` are kept
    /// or being started: their fork and exec (milliseconds) delay no request.
    pub fn refill(&mut self) {
        while self.spares.len() + self.starting.len() < self.config.spares {
            let (path, gpu, sandbox) = (
                self.path.clone(),
                self.gpu_index,
                self.config.sandbox.clone(),
            );
            let started = std::thread::Builder::new()
                .name(format!("gpu{gpu}-spare"))
                .spawn(move || Worker::spawn(&path, gpu, &sandbox, None));
            match started {
                Ok(h) => self.starting.push(h),
                Err(e) => {
                    log::warn!("gpu{gpu}: cannot start a spare CUDA worker: {e}");
                    return;
                }
            }
        }
    }

    /// Takes the spares that were being started, waiting for their spawn.
    fn collect(&mut self) {
        for h in std::mem::take(&mut self.starting) {
            match h.join() {
                Ok(Ok(w)) => self.spares.push_back(w),
                Ok(Err(e)) => log::warn!(
                    "gpu{}: cannot start a spare CUDA worker: {e}",
                    self.gpu_index
                ),
                Err(_) => log::error!("gpu{}: the spare's starter panicked", self.gpu_index),
            }
        }
    }

    /// A worker for VM `vm_id`, its handles starting at `first_handle`: the
    /// oldest live spare, otherwise a new worker. [`Self::refill`] starts
    /// the next spare.
    pub fn take(&mut self, vm_id: u32, first_handle: u64) -> Result<Worker, Error> {
        self.collect();
        while let Some(mut s) = self.spares.pop_front() {
            if let Some(status) = s.exited() {
                log::warn!(
                    "gpu{}: spare CUDA worker {} had ended ({status}); trying the next",
                    self.gpu_index,
                    s.pid()
                );
                self.found_dead += 1;
                continue;
            }
            // The spare may still die between the check and the handover:
            // its assignment then fails and the next takes its place.
            if s.assign(vm_id, first_handle).is_ok() {
                self.handed_over += 1;
                return Ok(s);
            }
            self.found_dead += 1;
        }
        let mut fresh = self.start()?;
        fresh.assign(vm_id, first_handle)?;
        Ok(fresh)
    }
}
