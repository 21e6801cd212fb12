//! Where CUDA remoting (guest kernels) runs: a wrapper around a GPU's
//! executor that sends remoting opcodes elsewhere and everything else to the
//! executor it wraps.
//!
//! * [`Isolation::Process`], the default: each VM's calls go to a worker
//!   process of its own (`worker/`), which holds only that VM's data. A
//!   faulting guest kernel ends only that process.
//! * [`Isolation::InProcess`]: the calls run in this process, in a CUDA
//!   context per VM. This is not isolation: measured on the H200, a fault in
//!   one context poisons every context of the process, and a kernel in one
//!   context reads memory that another context registered or pinned. For
//!   tests and single-VM setups only, and enforced: in-process remoting
//!   answers UNSUPPORTED while this executor holds anything of another VM
//!   (its memory table, registered or staged, or its remoting state).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::cuda::{CudaExecutor, CudaStats, RemotingExecutor};
use super::worker::{self, Launcher, VmWorker, WorkerConfig, WORKER_BIN};
use super::{Executor, ExecutorCounters, Registrar, Registration, Request, Tenant};
use crate::bytes::{Reader, Writer};
use crate::guest::GuestMem;
use crate::protocol::{DeviceInfo, Status};

/// Where a VM's CUDA remoting calls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// In a worker process per VM (`vgpu-cuda-worker`). The default.
    Process,
    /// In this process, one CUDA context per VM (see the module doc).
    InProcess,
}

/// Settings of the remoting wrapper.
#[derive(Debug, Clone)]
pub struct CudaConfig {
    pub isolation: Isolation,
    /// The worker binary; by default `$VGPU_CUDA_WORKER` or
    /// `vgpu-cuda-worker` next to the running executable.
    pub worker_path: Option<PathBuf>,
    /// Spares, copy chunks and the sandbox of the workers.
    pub worker: WorkerConfig,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            isolation: Isolation::Process,
            worker_path: None,
            worker: WorkerConfig::embedded(),
        }
    }
}

enum Remoting {
    Workers {
        launcher: Option<Launcher>,
        vms: HashMap<u32, VmWorker>,
    },
    InProcess(Option<RemotingExecutor>),
}

/// A GPU's executor `E` with CUDA remoting attached.
pub struct Isolated<E> {
    inner: E,
    remoting: Remoting,
    started: u64,
    faulted: u64,
    /// With [`Isolation::InProcess`], the VMs this executor holds something
    /// of (memory table, requests): remoting serves only while there is one.
    /// Not kept for worker processes, which hold one VM each by design.
    vms: std::collections::BTreeSet<u32>,
    /// In-process remoting refused for sharing: logged once.
    refusal_logged: bool,
    /// The VMs' registration choices, for their workers.
    register: HashMap<u32, bool>,
    /// Payload and output bytes that crossed the workers' pipes.
    pipe_bytes: u64,
}

/// The CUDA executor as the daemon runs it.
pub type IsolatedCuda = Isolated<CudaExecutor>;

impl<E: Executor> Isolated<E> {
    pub fn new(inner: E, config: &CudaConfig) -> Self {
        let gpu_index = inner.info().gpu_index;
        let remoting = match config.isolation {
            Isolation::Process => {
                let path = worker::worker_path(config.worker_path.as_deref());
                if path.is_none() {
                    log::warn!(
                        "gpu{gpu_index}: {WORKER_BIN} not found: CUDA remoting calls will answer UNSUPPORTED"
                    );
                }
                Remoting::Workers {
                    launcher: path.map(|p| Launcher::new(&p, gpu_index, config.worker.clone())),
                    vms: HashMap::new(),
                }
            }
            Isolation::InProcess => Remoting::InProcess(
                RemotingExecutor::new(gpu_index)
                    .map_err(|e| log::warn!("gpu{gpu_index}: no in-process remoting: {e}"))
                    .ok(),
            ),
        };
        Isolated {
            inner,
            remoting,
            started: 0,
            faulted: 0,
            vms: Default::default(),
            refusal_logged: false,
            register: HashMap::new(),
            pipe_bytes: 0,
        }
    }

    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Records that this executor now holds something of `vm_id`.
    fn note_vm(&mut self, vm_id: u32) {
        if matches!(self.remoting, Remoting::InProcess(_)) {
            self.vms.insert(vm_id);
        }
    }

    fn release_remoting(&mut self, vm_id: u32) {
        match &mut self.remoting {
            Remoting::Workers { vms, .. } => {
                vms.remove(&vm_id);
            }
            Remoting::InProcess(Some(ex)) => ex.release_vm(vm_id),
            Remoting::InProcess(None) => {}
        }
        self.inner.release_vm(vm_id);
    }

    pub fn inner_mut(&mut self) -> &mut E {
        &mut self.inner
    }

    fn remote(&mut self, tenant: Tenant, req: &Request, limit: Duration) -> Result<u32, Status> {
        let res = match &mut self.remoting {
            Remoting::Workers { launcher, vms } => {
                let Some(launcher) = launcher.as_mut() else {
                    return Err(Status::Unsupported);
                };
                let w = vms.entry(tenant.vm_id).or_default();
                // Not pinned unless the VM's table said it may be.
                w.set_register(self.register.get(&tenant.vm_id).copied().unwrap_or(false));
                let before = w.pipe_bytes();
                let (res, spawned) = w.execute(launcher, tenant, req, limit);
                self.pipe_bytes += w.pipe_bytes().saturating_sub(before);
                if spawned {
                    self.started += 1;
                }
                res
            }
            Remoting::InProcess(Some(_)) if self.vms.iter().any(|&v| v != tenant.vm_id) => {
                // A guest kernel here could read the other VMs' registered
                // or pinned memory (measured on the H200).
                if !self.refusal_logged {
                    self.refusal_logged = true;
                    log::warn!(
                        "in-process CUDA remoting serves one VM only: vm{} refused while this executor also serves {:?}",
                        tenant.vm_id,
                        self.vms
                    );
                }
                Err(Status::Unsupported)
            }
            Remoting::InProcess(Some(ex)) => {
                let before = ex.stats();
                let res = ex.call(
                    tenant,
                    req.opcode,
                    Reader::Guest(&req.payload),
                    &mut Writer::Guest(&req.output),
                    limit,
                );
                self.started += ex.stats().contexts_created - before.contexts_created;
                res
            }
            Remoting::InProcess(None) => Err(Status::Unsupported),
        };
        if matches!(res, Err(Status::DeviceError) | Err(Status::Timeout)) {
            self.faulted += 1;
            // A worker's fault is usually its guest's doing, but may be the
            // GPU going away: the daemon's own context tells which.
            self.inner.probe();
        }
        res
    }
}

impl Isolated<CudaExecutor> {
    /// The CUDA executor's counters, with the remoting contexts (worker
    /// processes) started and ended by faults.
    pub fn stats(&self) -> CudaStats {
        CudaStats {
            vm_contexts_created: self.started,
            vm_contexts_faulted: self.faulted,
            ..self.inner.stats()
        }
    }
}

impl<E> std::ops::Deref for Isolated<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.inner
    }
}

impl<E> std::ops::DerefMut for Isolated<E> {
    fn deref_mut(&mut self) -> &mut E {
        &mut self.inner
    }
}

impl<E: Executor> Executor for Isolated<E> {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn execute(&mut self, tenant: Tenant, req: &Request, limit: Duration) -> Result<u32, Status> {
        if req.opcode.is_remoting() {
            let res = self.remote(tenant, req, limit);
            if res != Err(Status::Unsupported) {
                self.note_vm(tenant.vm_id);
            }
            res
        } else {
            self.note_vm(tenant.vm_id);
            self.inner.execute(tenant, req, limit)
        }
    }

    fn batchable(&self, req: &Request) -> bool {
        !req.opcode.is_remoting() && self.inner.batchable(req)
    }

    fn execute_batch(
        &mut self,
        batch: &[(Tenant, &Request)],
        limit: Duration,
    ) -> Vec<Result<u32, Status>> {
        for (t, _) in batch {
            self.note_vm(t.vm_id);
        }
        self.inner.execute_batch(batch, limit)
    }

    fn release_vm(&mut self, vm_id: u32) {
        self.vms.remove(&vm_id);
        self.register.remove(&vm_id);
        // Its worker ends, and with it the worker's mapping of its memory.
        self.release_remoting(vm_id);
    }

    fn memory_policy(&mut self, vm_id: u32, register: bool) {
        self.register.insert(vm_id, register);
        self.inner.memory_policy(vm_id, register)
    }

    fn map_guest_memory(&mut self, vm_id: u32, mem: &Arc<GuestMem>) {
        self.note_vm(vm_id);
        self.inner.map_guest_memory(vm_id, mem)
    }

    fn fault(&self) -> Option<super::Fault> {
        self.inner.fault()
    }

    fn probe(&mut self) {
        self.inner.probe()
    }

    fn counters(&self) -> ExecutorCounters {
        ExecutorCounters {
            worker_starts: self.started,
            worker_faults: self.faulted,
            worker_pipe_bytes: self.pipe_bytes,
            ..self.inner.counters()
        }
    }

    fn registrar(&self) -> Option<Arc<dyn Registrar>> {
        self.inner.registrar()
    }

    fn attach_memory(&mut self, vm_id: u32, reg: Registration) -> Option<Registration> {
        self.note_vm(vm_id);
        self.inner.attach_memory(vm_id, reg)
    }

    fn detach_memory(&mut self, vm_id: u32) -> Option<Registration> {
        self.inner.detach_memory(vm_id)
    }
}
