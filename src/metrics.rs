//! Prometheus / OpenMetrics exposition of the daemon (`--metrics-addr`).
//!
//! Two kinds of figures:
//!
//! * pushed as they happen, by the VM's ring thread when a chain goes back to
//!   the guest ([`Metrics::request`], [`Metrics::refused`],
//!   [`Metrics::backpressure`]): requests by opcode and status, queue-wait
//!   and execution-time histograms, back-pressure events. Labels are the
//!   VM's at that moment, so a counter series never goes down when an
//!   administrator changes a VM's priority: a new series starts.
//! * read when scraped, from the same live status the control socket serves
//!   (`control::Handler`): queued and in-flight gauges, connection, guest
//!   memory handed to the executor, device-memory quota, and per GPU its
//!   queue, dispatch count and busy time.
//!
//! Not measurable yet without a hook inside the executors (which this module
//! does not touch): CUDA worker-process starts and faults, and remoting device
//! memory in use (only the quota is known here). See docs/metrics.md.
//!
//! The HTTP side is one thread answering one connection at a time with short
//! timeouts: a slow scraper delays the next scrape, never the daemon.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::control::{GpuStatus, Handler};
use crate::protocol::{GpuState, Opcode, Priority, Status};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "refusing to serve metrics on {0}: not a loopback address (give --metrics-allow-remote to allow it)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Refuses an address other machines could reach unless `allow_remote`.
pub fn check_addr(addr: SocketAddr, allow_remote: bool) -> Result<(), Error> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(Error::NotLoopback(addr))
    }
}

/// Labels of every per-VM series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub vm_id: u32,
    pub pool: String,
    pub priority: &'static str,
    pub gpu: u32,
}

impl VmLabels {
    pub fn new(vm_id: u32, pool: impl ToString, priority: Priority, gpu: u32) -> Self {
        VmLabels {
            vm_id,
            pool: pool.to_string(),
            priority: priority.as_str(),
            gpu,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    #[prometheus(flatten)]
    vm: VmLabels,
    opcode: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: u32,
}

/// The opcode label: the protocol's name in lower case; `invalid` for a
/// chain refused before its opcode was known to be one.
pub fn opcode_label(op: Option<Opcode>) -> &'static str {
    match op {
        None => "invalid",
        Some(op) => match op {
            Opcode::Ping => "ping",
            Opcode::GetInfo => "get_info",
            Opcode::BusyWait => "busy_wait",
            Opcode::ScalarAddI32 => "scalar_add_i32",
            Opcode::VectorAddF32 => "vector_add_f32",
            Opcode::SaxpyF32 => "saxpy_f32",
            Opcode::SgemmF32 => "sgemm_f32",
            Opcode::MemAlloc => "mem_alloc",
            Opcode::MemFree => "mem_free",
            Opcode::MemcpyHtoD => "memcpy_htod",
            Opcode::MemcpyDtoH => "memcpy_dtoh",
            Opcode::ModuleLoad => "module_load",
            Opcode::ModuleUnload => "module_unload",
            Opcode::Launch => "launch",
            Opcode::Synchronize => "synchronize",
            Opcode::CuDeviceInfo => "cu_device_info",
            Opcode::CuMemAlloc => "cu_mem_alloc",
            Opcode::CuMemFree => "cu_mem_free",
            Opcode::CuMemcpyHtoD => "cu_memcpy_htod",
            Opcode::CuMemcpyDtoH => "cu_memcpy_dtoh",
            Opcode::CuModuleLoad => "cu_module_load",
            Opcode::CuModuleUnload => "cu_module_unload",
            Opcode::CuGetFunction => "cu_get_function",
            Opcode::CuGetGlobal => "cu_get_global",
            Opcode::CuFuncAttribute => "cu_func_attribute",
            Opcode::CuOccupancy => "cu_occupancy",
            Opcode::CuStreamCreate => "cu_stream_create",
            Opcode::CuStreamDestroy => "cu_stream_destroy",
            Opcode::CuEventCreate => "cu_event_create",
            Opcode::CuEventDestroy => "cu_event_destroy",
            Opcode::CuEventElapsed => "cu_event_elapsed",
            Opcode::CuMemInfo => "cu_mem_info",
            Opcode::CuCommandBuffer => "cu_command_buffer",
            Opcode::CuBlasInit => "cu_blas_init",
        },
    }
}

pub fn status_label(status: u32) -> &'static str {
    match Status::from_u32(status) {
        Some(Status::Ok) => "ok",
        Some(Status::BadRequest) => "bad_request",
        Some(Status::Unsupported) => "unsupported",
        Some(Status::TooLarge) => "too_large",
        Some(Status::NoResources) => "no_resources",
        Some(Status::DeviceError) => "device_error",
        Some(Status::Timeout) => "timeout",
        Some(Status::Cancelled) => "cancelled",
        Some(Status::NotFound) => "not_found",
        Some(Status::Denied) => "denied",
        None => "other",
    }
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 µs .. ~16 s.
    Histogram::new(exponential_buckets(1e-6, 2.0, 25))
}

/// The daemon's metrics. Recording does nothing until [`Metrics::enable`]
/// (the daemon enables them when it starts serving them).
pub struct Metrics {
    enabled: AtomicBool,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    queue_wait: HistogramFamily<VmLabels>,
    exec_time: HistogramFamily<VmLabels>,
    backpressure: Family<VmLabels, Counter>,
    queued: Family<VmLabels, Gauge>,
    in_flight: Family<VmLabels, Gauge>,
    connected: Family<VmLabels, Gauge>,
    guest_mem: Family<VmLabels, Gauge>,
    gpu_mem_quota: Family<VmLabels, Gauge>,
    gpu_queued: Family<GpuLabels, Gauge>,
    gpu_busy: Family<GpuLabels, Counter<f64, AtomicU64>>,
    gpu_dispatched: Family<GpuLabels, Counter>,
    gpu_worker_starts: Family<GpuLabels, Counter>,
    gpu_worker_faults: Family<GpuLabels, Counter>,
    gpu_worker_pipe_bytes: Family<GpuLabels, Counter>,
    gpu_registered: Family<GpuLabels, Gauge>,
    gpu_state: Family<GpuLabels, Gauge>,
    gpu_epoch: Family<GpuLabels, Gauge>,
    gpu_faults: Family<GpuLabels, Counter>,
    gpu_recovery_attempts: Family<GpuLabels, Counter>,
    /// Last totals seen per GPU (the counters advance by the difference).
    gpu_seen: Mutex<BTreeMap<u32, GpuTotals>>,
}

/// The running totals of one GPU last published as counters.
#[derive(Debug, Clone, Copy, Default)]
struct GpuTotals {
    busy_ns: u64,
    dispatched: u64,
    worker_starts: u64,
    worker_faults: u64,
    faults: u64,
    recovery_attempts: u64,
    worker_pipe_bytes: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            enabled: AtomicBool::new(false),
            registry: Registry::with_prefix("vgpu"),
            requests: Family::default(),
            queue_wait: Family::new_with_constructor(latency_histogram),
            exec_time: Family::new_with_constructor(latency_histogram),
            backpressure: Family::default(),
            queued: Family::default(),
            in_flight: Family::default(),
            connected: Family::default(),
            guest_mem: Family::default(),
            gpu_mem_quota: Family::default(),
            gpu_queued: Family::default(),
            gpu_busy: Family::default(),
            gpu_dispatched: Family::default(),
            gpu_worker_starts: Family::default(),
            gpu_worker_faults: Family::default(),
            gpu_worker_pipe_bytes: Family::default(),
            gpu_registered: Family::default(),
            gpu_state: Family::default(),
            gpu_epoch: Family::default(),
            gpu_faults: Family::default(),
            gpu_recovery_attempts: Family::default(),
            gpu_seen: Mutex::default(),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "Requests answered, by VM, opcode and status",
            m.requests.clone(),
        );
        r.register_with_unit(
            "queue_wait",
            "Time from taking the chain off the ring to dispatch on the GPU",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register_with_unit(
            "exec",
            "Execution time of dispatched requests (of the whole batch for batched ones)",
            Unit::Seconds,
            m.exec_time.clone(),
        );
        r.register(
            "backpressure_events",
            "Times the VM reached its max_queued and its chains were left in the ring",
            m.backpressure.clone(),
        );
        r.register(
            "vm_queued",
            "Requests of the VM waiting in the GPU's queue",
            m.queued.clone(),
        );
        r.register(
            "vm_in_flight",
            "Requests of the VM dispatched and not yet back in its ring",
            m.in_flight.clone(),
        );
        r.register(
            "vm_connected",
            "1 while a frontend (QEMU) is connected to the VM's socket",
            m.connected.clone(),
        );
        r.register_with_unit(
            "vm_guest_memory",
            "Guest RAM of the VM's current memory table, handed to its GPU's executor for registration",
            Unit::Bytes,
            m.guest_mem.clone(),
        );
        r.register_with_unit(
            "vm_gpu_memory_quota",
            "Device memory the VM's CUDA remoting may hold",
            Unit::Bytes,
            m.gpu_mem_quota.clone(),
        );
        r.register(
            "gpu_queued",
            "Requests waiting in the GPU's queue",
            m.gpu_queued.clone(),
        );
        r.register_with_unit(
            "gpu_busy",
            "Time the GPU's executor spent executing requests",
            Unit::Seconds,
            m.gpu_busy.clone(),
        );
        r.register(
            "gpu_dispatched",
            "Requests dispatched on the GPU",
            m.gpu_dispatched.clone(),
        );
        r.register(
            "gpu_worker_starts",
            "CUDA worker processes started (a VM's first remoting call, after a fault)",
            m.gpu_worker_starts.clone(),
        );
        r.register(
            "gpu_worker_faults",
            "Remoting calls that ended their CUDA worker (fault or timeout)",
            m.gpu_worker_faults.clone(),
        );
        r.register_with_unit(
            "gpu_worker_pipe",
            "Request payload and output bytes that crossed the CUDA workers' pipes (guest ranges only once a VM's memory table is passed)",
            Unit::Bytes,
            m.gpu_worker_pipe_bytes.clone(),
        );
        r.register_with_unit(
            "gpu_registered_guest_memory",
            "Guest memory registered with the CUDA driver for zero-copy DMA",
            Unit::Bytes,
            m.gpu_registered.clone(),
        );
        r.register(
            "gpu_state",
            "Health of the GPU: 0 ok, 1 degraded, 2 failed, 3 recovering (config space gpu_state)",
            m.gpu_state.clone(),
        );
        r.register(
            "gpu_epoch",
            "Executors of the GPU rebuilt after faults (config space gpu_epoch)",
            m.gpu_epoch.clone(),
        );
        r.register(
            "gpu_faults",
            "Executors of the GPU ended by a fault (sticky CUDA error, lost device) or a panic",
            m.gpu_faults.clone(),
        );
        r.register(
            "gpu_recovery_attempts",
            "Attempts to build the GPU's executor after a fault, successful or not",
            m.gpu_recovery_attempts.clone(),
        );
        m
    }

    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// A dispatched (or cancelled) request went back to its VM.
    pub fn request(&self, vm: &VmLabels, opcode: Opcode, status: u32, queue_ns: u64, exec_ns: u64) {
        if !self.is_enabled() {
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                vm: vm.clone(),
                opcode: opcode_label(Some(opcode)),
                status: status_label(status),
            })
            .inc();
        self.queue_wait
            .get_or_create(vm)
            .observe(queue_ns as f64 / 1e9);
        if status != Status::Cancelled as u32 {
            self.exec_time
                .get_or_create(vm)
                .observe(exec_ns as f64 / 1e9);
        }
    }

    /// A chain answered at once, without scheduling (malformed, unknown
    /// opcode, no room for a response).
    pub fn refused(&self, vm: &VmLabels, opcode: Option<Opcode>, status: u32) {
        if !self.is_enabled() {
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                vm: vm.clone(),
                opcode: opcode_label(opcode),
                status: status_label(status),
            })
            .inc();
    }

    /// The VM reached its cap of outstanding requests.
    pub fn backpressure(&self, vm: &VmLabels) {
        if self.is_enabled() {
            self.backpressure.get_or_create(vm).inc();
        }
    }

    /// Sets the read-when-scraped figures from the live status.
    fn refresh(&self, handler: &dyn Handler) {
        for f in [
            &self.queued,
            &self.in_flight,
            &self.connected,
            &self.guest_mem,
            &self.gpu_mem_quota,
        ] {
            f.clear();
        }
        for vm in handler.status() {
            let Ok(priority) = vm.priority.parse::<Priority>() else {
                continue;
            };
            let l = VmLabels::new(vm.vm_id, &vm.pool, priority, vm.gpu);
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.queued.get_or_create(&l).set(g(vm.queued));
            self.in_flight.get_or_create(&l).set(g(vm.in_flight));
            self.connected
                .get_or_create(&l)
                .set(i64::from(vm.connected));
            self.guest_mem.get_or_create(&l).set(g(vm.guest_mem_bytes));
            self.gpu_mem_quota
                .get_or_create(&l)
                .set(g(vm.gpu_mem_quota_bytes));
        }
        self.gpu_queued.clear();
        let mut seen = lock(&self.gpu_seen);
        for GpuStatus {
            gpu,
            queued,
            busy_ns,
            dispatched,
            counters,
            state,
            epoch,
            faults,
            recovery_attempts,
            ..
        } in handler.gpus()
        {
            let l = GpuLabels { gpu };
            if let Some(s) = GpuState::ALL.iter().find(|s| s.as_str() == state) {
                self.gpu_state.get_or_create(&l).set(*s as i64);
            }
            self.gpu_epoch.get_or_create(&l).set(i64::from(epoch));
            self.gpu_queued
                .get_or_create(&l)
                .set(i64::try_from(queued).unwrap_or(i64::MAX));
            self.gpu_registered
                .get_or_create(&l)
                .set(i64::try_from(counters.registered_bytes).unwrap_or(i64::MAX));
            let last = seen.get(&gpu).copied().unwrap_or_default();
            self.gpu_busy
                .get_or_create(&l)
                .inc_by(busy_ns.saturating_sub(last.busy_ns) as f64 / 1e9);
            self.gpu_dispatched
                .get_or_create(&l)
                .inc_by(dispatched.saturating_sub(last.dispatched));
            self.gpu_worker_starts
                .get_or_create(&l)
                .inc_by(counters.worker_starts.saturating_sub(last.worker_starts));
            self.gpu_worker_faults
                .get_or_create(&l)
                .inc_by(counters.worker_faults.saturating_sub(last.worker_faults));
            self.gpu_faults
                .get_or_create(&l)
                .inc_by(faults.saturating_sub(last.faults));
            self.gpu_recovery_attempts
                .get_or_create(&l)
                .inc_by(recovery_attempts.saturating_sub(last.recovery_attempts));
            self.gpu_worker_pipe_bytes.get_or_create(&l).inc_by(
                counters
                    .worker_pipe_bytes
                    .saturating_sub(last.worker_pipe_bytes),
            );
            seen.insert(
                gpu,
                GpuTotals {
                    busy_ns: busy_ns.max(last.busy_ns),
                    dispatched: dispatched.max(last.dispatched),
                    worker_starts: counters.worker_starts.max(last.worker_starts),
                    worker_faults: counters.worker_faults.max(last.worker_faults),
                    faults: faults.max(last.faults),
                    recovery_attempts: recovery_attempts.max(last.recovery_attempts),
                    worker_pipe_bytes: counters.worker_pipe_bytes.max(last.worker_pipe_bytes),
                },
            );
        }
    }

    /// The OpenMetrics text of everything, refreshed from `handler`.
    pub fn render(&self, handler: &dyn Handler) -> String {
        self.refresh(handler);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest request head read from a scraper.
const MAX_REQUEST: usize = 8192;
const CONN_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` and serves `GET /metrics` on a thread of its own. Returns
/// the address bound (the port, when `addr` asked for port 0).
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    handler: Arc<dyn Handler>,
) -> Result<SocketAddr, Error> {
    let bind_err = |source| Error::Bind { addr, source };
    let listener = TcpListener::bind(addr).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    metrics.enable();
    std::thread::Builder::new()
        .name("vgpu-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => serve_conn(c, &metrics, handler.as_ref()),
                    Err(e) => {
                        log::debug!("metrics: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
        .map_err(bind_err)?;
    log::info!("metrics on http://{local}/metrics");
    Ok(local)
}

fn serve_conn(mut conn: TcpStream, metrics: &Metrics, handler: &dyn Handler) {
    let _ = conn.set_read_timeout(Some(CONN_TIMEOUT));
    let _ = conn.set_write_timeout(Some(CONN_TIMEOUT));
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST {
            respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
            return;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    match (method, path) {
        (Some("GET"), Some("/metrics")) => {
            let body = metrics.render(handler);
            respond(&mut conn, "200 OK", CONTENT_TYPE, &body);
        }
        (Some("GET"), Some("/")) => respond(
            &mut conn,
            "200 OK",
            "text/plain; charset=utf-8",
            "vgpu-vhost-user: metrics at /metrics\n",
        ),
        (Some("GET"), Some(_)) => respond(&mut conn, "404 Not Found", "text/plain", "not found\n"),
        (Some(_), Some(_)) => respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        ),
        _ => respond(&mut conn, "400 Bad Request", "text/plain", "bad request\n"),
    }
}

fn respond(conn: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body.as_bytes());
    let _ = conn.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::VmStatus;

    struct Fixed;
    impl Handler for Fixed {
        fn reload(&self) -> Result<(), String> {
            Ok(())
        }
        fn status(&self) -> Vec<VmStatus> {
            vec![VmStatus {
                vm_id: 3,
                pool: "B".into(),
                priority: "low".into(),
                queued: 2,
                in_flight: 1,
                connected: true,
                gpu_mem_quota_bytes: 1 << 20,
                ..VmStatus::default()
            }]
        }
        fn gpus(&self) -> Vec<GpuStatus> {
            vec![GpuStatus {
                gpu: 0,
                queued: 2,
                busy_ns: 1_500_000_000,
                dispatched: 10,
                counters: crate::executor::ExecutorCounters {
                    worker_starts: 2,
                    worker_faults: 1,
                    registered_bytes: 4096,
                    worker_pipe_bytes: 512,
                },
                state: "failed".into(),
                epoch: 3,
                faults: 4,
                recovery_attempts: 7,
                ..GpuStatus::default()
            }]
        }
    }

    #[test]
    fn addresses() {
        let lo: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        let lo6: SocketAddr = "[::1]:9100".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9100".parse().unwrap();
        assert!(check_addr(lo, false).is_ok());
        assert!(check_addr(lo6, false).is_ok());
        assert!(matches!(check_addr(any, false), Err(Error::NotLoopback(_))));
        assert!(check_addr(any, true).is_ok());
    }

    #[test]
    fn disabled_records_nothing_and_render_has_gauges() {
        let m = Metrics::new();
        let l = VmLabels::new(3, "B", Priority::Low, 0);
        m.request(&l, Opcode::Ping, 0, 10, 10);
        let text = m.render(&Fixed);
        assert!(!text.contains("vgpu_requests_total{"), "{text}");
        assert!(text.contains(r#"vgpu_vm_queued{vm_id="3",pool="B",priority="low",gpu="0"} 2"#));
        assert!(
            text.contains(r#"vgpu_gpu_busy_seconds_total{gpu="0"} 1.5"#),
            "{text}"
        );
        for line in [
            r#"vgpu_gpu_state{gpu="0"} 2"#,
            r#"vgpu_gpu_epoch{gpu="0"} 3"#,
            r#"vgpu_gpu_faults_total{gpu="0"} 4"#,
            r#"vgpu_gpu_recovery_attempts_total{gpu="0"} 7"#,
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        assert!(text.trim_end().ends_with("# EOF"));
        m.enable();
        m.request(&l, Opcode::ScalarAddI32, 0, 1000, 2000);
        m.request(&l, Opcode::ScalarAddI32, 0, 1000, 2000);
        m.refused(&l, None, Status::BadRequest as u32);
        let text = m.render(&Fixed);
        assert!(text.contains(r#"vgpu_requests_total{vm_id="3",pool="B",priority="low",gpu="0",opcode="scalar_add_i32",status="ok"} 2"#), "{text}");
        assert!(
            text.contains(r#"opcode="invalid",status="bad_request"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vgpu_queue_wait_seconds_count{vm_id="3",pool="B",priority="low",gpu="0"} 2"#
            ),
            "{text}"
        );
        // Busy time advances by the difference: still 1.5 s.
        assert!(
            text.contains(r#"vgpu_gpu_busy_seconds_total{gpu="0"} 1.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vgpu_gpu_dispatched_total{gpu="0"} 10"#),
            "{text}"
        );
        for line in [
            r#"vgpu_gpu_worker_starts_total{gpu="0"} 2"#,
            r#"vgpu_gpu_worker_faults_total{gpu="0"} 1"#,
            r#"vgpu_gpu_worker_pipe_bytes_total{gpu="0"} 512"#,
            r#"vgpu_gpu_registered_guest_memory_bytes{gpu="0"} 4096"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
