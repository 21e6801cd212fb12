//! Warm spare workers. Starting a worker costs its process start, the
//! sandbox and, above all, CUDA initialisation and context creation
//! (~0.25 s on the H200): a VM's first remoting call, and its first call
//! after a fault, would wait that long. So each GPU keeps one spare worker
//! that has done all of it and waits for its VM (`wire.rs`: ready frame,
//! then the assignment). Handing it over writes one 16-byte frame; once
//! the VM's call is answered a new spare is started, which warms up in its
//! own process, so the GPU's thread only pays for the fork and exec.
//!
//! A spare that died (its process exited: a driver failure, a kill) is
//! never handed over: it is reaped and the VM gets a fresh worker.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::{Error, Worker, WorkerConfig};

/// Starts and hands out the workers of one GPU.
pub struct Launcher {
    path: PathBuf,
    gpu_index: u32,
    config: WorkerConfig,
    spare: Option<Worker>,
    /// A spare being started on a thread of its own.
    starting: Option<JoinHandle<Result<Worker, Error>>>,
    /// Spares handed over and spares found dead, for tests and logs.
    pub handed_over: u64,
    pub found_dead: u64,
}

impl Launcher {
    /// A launcher for GPU `gpu_index`; starts the first spare when spares
    /// are on.
    pub fn new(path: &Path, gpu_index: u32, config: WorkerConfig) -> Self {
        let mut l = Launcher {
            path: path.to_path_buf(),
            gpu_index,
            config,
            spare: None,
            starting: None,
            handed_over: 0,
            found_dead: 0,
        };
        l.refill();
        l
    }

    pub fn copy_chunk(&self) -> usize {
        self.config.copy_chunk
    }

    /// The spare's pid, when there is one (waits for one being started).
    pub fn spare_pid(&mut self) -> Option<u32> {
        self.collect();
        self.spare.as_ref().map(Worker::pid)
    }

    fn start(&self) -> Result<Worker, Error> {
        Worker::spawn(&self.path, self.gpu_index, &self.config.sandbox, None)
    }

    /// Starts a spare, on a thread of its own, if spares are on and there
    /// is none: its fork and exec (milliseconds) then delay no request.
    pub fn refill(&mut self) {
        if !self.config.spare || self.spare.is_some() || self.starting.is_some() {
            return;
        }
        let (path, gpu, sandbox) = (
            self.path.clone(),
            self.gpu_index,
            self.config.sandbox.clone(),
        );
        let started = std::thread::Builder::new()
            .name(format!("gpu{gpu}-spare"))
            .spawn(move || Worker::spawn(&path, gpu, &sandbox, None));
        match started {
            Ok(h) => self.starting = Some(h),
            Err(e) => log::warn!("gpu{gpu}: cannot start a spare CUDA worker: {e}"),
        }
    }

    /// Takes the spare that was being started, waiting for its spawn.
    fn collect(&mut self) {
        let Some(h) = self.starting.take() else {
            return;
        };
        match h.join() {
            Ok(Ok(w)) => self.spare = Some(w),
            Ok(Err(e)) => log::warn!(
                "gpu{}: cannot start a spare CUDA worker: {e}",
                self.gpu_index
            ),
            Err(_) => log::error!("gpu{}: the spare's starter panicked", self.gpu_index),
        }
    }

    /// A worker for VM `vm_id`, its handles starting at `first_handle`: the
    /// spare when it is alive, otherwise a new worker. [`Self::refill`]
    /// starts the next spare.
    pub fn take(&mut self, vm_id: u32, first_handle: u64) -> Result<Worker, Error> {
        self.collect();
        let mut w = match self.spare.take() {
            Some(mut s) => match s.exited() {
                None => Some(s),
                Some(status) => {
                    log::warn!(
                        "gpu{}: spare CUDA worker {} had ended ({status}); starting another",
                        self.gpu_index,
                        s.pid()
                    );
                    self.found_dead += 1;
                    None
                }
            },
            None => None,
        };
        // The spare may still die between the check and the handover: its
        // assignment then fails and a fresh worker takes its place.
        if let Some(s) = w.as_mut() {
            if s.assign(vm_id, first_handle).is_ok() {
                self.handed_over += 1;
            } else {
                self.found_dead += 1;
                w = None;
            }
        }
        match w {
            Some(s) => Ok(s),
            None => {
                let mut fresh = self.start()?;
                fresh.assign(vm_id, first_handle)?;
                Ok(fresh)
            }
        }
    }
}
