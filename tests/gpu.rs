//! GPU tests of the CUDA executor, driven directly (no daemon). They need an
//! NVIDIA GPU and libcuda, so they are `#[ignore]`d; on the GPU machine run
//! them with (see docs/gpu.md):
//!
//!     cargo test --release --test gpu -- --ignored --test-threads=1
//!
//! or, where there is no cargo, the test binary built elsewhere with
//! `cargo test --release --no-run --test gpu`:
//!
//!     ./gpu-<hash> --ignored --test-threads=1

use vgpu_sim::workload as common;

use std::ffi::CString;
use std::time::{Duration, Instant};

use common::{f32_bytes, f32s, Call, Guest, Rng};
use vgpu::executor::cpu::{saxpy, sgemm, vector_add};
use vgpu::executor::remoting::{encode_launch, Launch, Param};
use vgpu::executor::{
    create, CpuExecutor, CudaConfig, CudaExecutor, Executor, ExecutorChoice, IsolatedCuda,
    Isolation, Request, Tenant,
};
use vgpu::protocol::{DeviceInfo, ExecutorKind, Opcode, Status};

const LIMIT: Duration = Duration::from_secs(10);
const TEST_PTX: &str = include_str!("kernels/remote_test.ptx");

fn cuda() -> IsolatedCuda {
    cuda_with(|_| {})
}

/// The CUDA executor with the worker settings of config/vgpu.toml changed by
/// `f`. `VGPU_TEST_SECCOMP=log` runs the workers' filter in log mode (the
/// kernel then logs, `dmesg | grep type=1326`, every syscall the driver
/// makes outside the allow-list).
fn cuda_with(f: impl FnOnce(&mut CudaConfig)) -> IsolatedCuda {
    let _ = env_logger::builder().is_test(true).try_init();
    let ex = CudaExecutor::new(0, LIMIT).expect("CUDA executor on GPU 0");
    let mut cfg = CudaConfig::default();
    if std::env::var("VGPU_TEST_SECCOMP").as_deref() == Ok("log") {
        cfg.worker.sandbox.seccomp = vgpu::executor::worker::SeccompMode::Log;
    }
    f(&mut cfg);
    IsolatedCuda::new(ex, &cfg)
}

/// VmPeak and VmRSS of the running worker processes (for RLIMIT_AS).
fn worker_memory() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("vgpu-cuda-work") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let pick: Vec<&str> = status
            .lines()
            .filter(|l| l.starts_with("VmPeak") || l.starts_with("VmRSS") || l.starts_with("Uid"))
            .collect();
        out.push(format!("{}: {}", dir.display(), pick.join(" | ")));
    }
    out
}

fn run(ex: &mut dyn Executor, req: &Call) -> Result<Vec<u8>, Status> {
    let n = ex.execute(req.tenant, req, LIMIT)?;
    let mut out = vec![0u8; n as usize];
    req.output.read_at(0, &mut out).unwrap();
    Ok(out)
}

/// Runs `req` on the GPU and on the CPU executor (into a second output
/// buffer) and returns both outputs.
fn both(ex: &mut IsolatedCuda, g: &mut Guest, req: &Call) -> (Vec<u8>, Vec<u8>) {
    let gpu = run(ex, req).expect("GPU result");
    let cpu_req = Call {
        tenant: req.tenant,
        req: Request {
            opcode: req.opcode,
            tag: req.tag,
            payload: req.payload.clone(),
            output: g.alloc(req.output.len(), false),
        },
    };
    let cpu = run(&mut CpuExecutor::new(0, LIMIT), &cpu_req).expect("CPU result");
    (gpu, cpu)
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn create_picks_cuda() {
    for choice in [ExecutorChoice::Auto, ExecutorChoice::Cuda] {
        let ex = create(choice, 0, LIMIT).unwrap();
        let info = ex.info();
        assert_eq!(info.executor, ExecutorKind::Cuda);
        assert!(!info.name.is_empty());
        assert!(info.memory_total > 1 << 30);
        assert!(info.compute_capability >= 8 << 16, "{info:?}");
    }
    assert!(create(ExecutorChoice::Cuda, 1000, LIMIT).is_err());
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn builtin_ops_match_cpu_reference() {
    let mut ex = cuda();
    let mut g = Guest::new(256 << 20);
    ex.map_guest_memory(1, &g.mem);
    let mut rng = Rng::seeded();

    let r = g.request(1, Opcode::Ping, &[], 0);
    assert_eq!(ex.execute(r.tenant, &r, LIMIT), Ok(0));

    let r = g.request(1, Opcode::GetInfo, &[], 96);
    let info = DeviceInfo::decode(&run(&mut ex, &r).unwrap()).unwrap();
    eprintln!("GET_INFO: {info:?}");
    assert_eq!(info.executor, ExecutorKind::Cuda);
    assert_eq!(info.exec_limit_ms, 10_000);

    let mut cases = vec![(i32::MAX, 1), (-5, 3), (i32::MIN, -1)];
    for _ in 0..50 {
        cases.push((rng.next_u64() as i32, rng.next_u64() as i32));
    }
    for (a, b) in cases {
        let r = g.request(1, Opcode::ScalarAddI32, &common::scalar_payload(a, b), 4);
        assert_eq!(run(&mut ex, &r).unwrap(), a.wrapping_add(b).to_le_bytes());
    }
    g.reset();

    for n in [0usize, 1, 1000, 257 * 1024 + 3, 1 << 20] {
        let (a, b) = (rng.f32s(n), rng.f32s(n));
        let r = g.request(
            1,
            Opcode::VectorAddF32,
            &common::vector_add_payload(&a, &b),
            4 * n,
        );
        let (gpu, cpu) = both(&mut ex, &mut g, &r);
        assert_eq!(gpu, cpu, "VECTOR_ADD n={n}");
        assert_eq!(f32s(&gpu), vector_add(&a, &b));
        g.reset();

        let s = rng.f32() * 4.0;
        let r = g.request(
            1,
            Opcode::SaxpyF32,
            &common::saxpy_payload(s, &a, &b),
            4 * n,
        );
        let (gpu, cpu) = both(&mut ex, &mut g, &r);
        assert_eq!(gpu, cpu, "SAXPY n={n}");
        assert_eq!(f32s(&gpu), saxpy(s, &a, &b));
        g.reset();
    }

    for (m, n, k) in [
        (1, 1, 1),
        (3, 200, 17),
        (130, 257, 67),
        (256, 128, 512),
        (512, 512, 512),
    ] {
        let (a, b) = (rng.f32s(m * k), rng.f32s(k * n));
        let r = g.request(
            1,
            Opcode::SgemmF32,
            &common::sgemm_payload(m, n, k, &a, &b),
            4 * m * n,
        );
        let gpu = f32s(&run(&mut ex, &r).unwrap());
        let want = sgemm(m, n, k, &a, &b);
        // Inputs in [-1, 1): summation order differs, error grows with k.
        let tol = 1e-5 * k as f32 + 1e-6;
        let worst = gpu
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "SGEMM {m}x{n}x{k}: max error {worst} > {tol}");
        g.reset();
    }

    // Malformed requests are refused the same way as on the CPU executor.
    let r = g.request(1, Opcode::SgemmF32, &[1, 0, 0, 0], 4);
    assert_eq!(ex.execute(r.tenant, &r, LIMIT), Err(Status::BadRequest));
    let r = g.request(
        1,
        Opcode::VectorAddF32,
        &common::vector_add_payload(&[1.0], &[2.0]),
        3,
    );
    assert_eq!(ex.execute(r.tenant, &r, LIMIT), Err(Status::TooLarge));

    let st = ex.stats();
    eprintln!("stats: {st:?}");
    assert!(
        st.zero_copy > 0 && st.staged == 0,
        "zero-copy path used: {st:?}"
    );
    assert_eq!(st.registered_bytes, 256 << 20);
    ex.release_vm(1);
    assert_eq!(ex.stats().registered_bytes, 0);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn busy_wait_and_timeout() {
    let mut ex = cuda();
    let mut g = Guest::new(1 << 20);
    ex.map_guest_memory(1, &g.mem);
    let r = g.request(1, Opcode::BusyWait, &50_000_000u64.to_le_bytes(), 0);
    let t = Instant::now();
    assert_eq!(ex.execute(r.tenant, &r, LIMIT), Ok(0));
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(50) && el < Duration::from_millis(500),
        "{el:?}"
    );
    let r = g.request(1, Opcode::BusyWait, &5_000_000_000u64.to_le_bytes(), 0);
    let t = Instant::now();
    assert_eq!(
        ex.execute(r.tenant, &r, Duration::from_millis(200)),
        Err(Status::Timeout)
    );
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(200) && el < Duration::from_millis(1000),
        "{el:?}"
    );
    eprintln!("BUSY_WAIT 50 ms ok; 5 s under a 200 ms limit: TIMEOUT after {el:?}");
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn staging_fallback_without_registration() {
    let mut ex = cuda();
    let mut g = Guest::new(64 << 20);
    let mut rng = Rng::seeded();
    let n = 100_000;
    let (a, b) = (rng.f32s(n), rng.f32s(n));
    let r = g.request(
        7,
        Opcode::VectorAddF32,
        &common::vector_add_payload(&a, &b),
        4 * n,
    );
    assert_eq!(f32s(&run(&mut ex, &r).unwrap()), vector_add(&a, &b));
    let r = g.request(7, Opcode::ScalarAddI32, &common::scalar_payload(40, 2), 4);
    assert_eq!(run(&mut ex, &r).unwrap(), 42i32.to_le_bytes());
    let st = ex.stats();
    assert!(st.staged > 0 && st.zero_copy == 0, "{st:?}");
    // A request from an old memory table after the table changed: staged too.
    let mut g2 = Guest::new(1 << 20);
    ex.map_guest_memory(7, &g2.mem);
    ex.map_guest_memory(7, &g2.mem); // same table again: no-op
    let r = g.request(7, Opcode::ScalarAddI32, &common::scalar_payload(1, 2), 4);
    assert_eq!(run(&mut ex, &r).unwrap(), 3i32.to_le_bytes());
    let r = g2.request(7, Opcode::ScalarAddI32, &common::scalar_payload(1, 2), 4);
    assert_eq!(run(&mut ex, &r).unwrap(), 3i32.to_le_bytes());
    assert!(ex.stats().zero_copy > 0);
}

/// `execute_batch` (what the scheduler uses for runs of queued PINGs and
/// SCALAR_ADDs) answers exactly as `execute` one by one: results, statuses
/// of malformed requests, outputs; with the batched kernel and with the
/// per-request fallback; batches longer than the executor's chunk.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn batches_match_single_requests() {
    let mut ex = cuda();
    assert!(
        ex.batch_kernel_loaded(),
        "the driver refused kernels/vgpu_batch.ptx"
    );
    let mut g = Guest::new(16 << 20);
    ex.map_guest_memory(1, &g.mem);
    let mut rng = Rng::seeded();
    for fallback in [false, true] {
        if fallback {
            ex.disable_batch_kernel();
        }
        for len in [1usize, 2, 31, 64, 65, 150] {
            let specs: Vec<(Opcode, Vec<u8>, usize)> = (0..len)
                .map(|i| {
                    let (a, b) = (rng.next_u64() as i32, rng.next_u64() as i32);
                    match i % 10 {
                        3 => (Opcode::Ping, vec![], 0),
                        7 => (Opcode::ScalarAddI32, vec![1, 2, 3], 4),
                        8 => (Opcode::ScalarAddI32, common::scalar_payload(a, b), 3),
                        _ => (Opcode::ScalarAddI32, common::scalar_payload(a, b), 4),
                    }
                })
                .collect();
            let single: Vec<_> = specs
                .iter()
                .map(|(op, p, o)| {
                    let r = g.request(1, *op, p, *o);
                    // Memory reused after g.reset() holds older outputs.
                    r.output.write_at(0, &vec![0u8; *o]).unwrap();
                    let res = ex.execute(r.tenant, &r, LIMIT);
                    let mut out = vec![0u8; r.output.len()];
                    r.output.read_at(0, &mut out).unwrap();
                    (res, out)
                })
                .collect();
            let reqs: Vec<Call> = specs
                .iter()
                .map(|(op, p, o)| {
                    let r = g.request(1, *op, p, *o);
                    r.output.write_at(0, &vec![0u8; *o]).unwrap();
                    r
                })
                .collect();
            let refs: Vec<(Tenant, &Request)> = reqs.iter().map(|c| (c.tenant, &c.req)).collect();
            let before = ex.stats().batches;
            let got = ex.execute_batch(&refs, LIMIT);
            assert_eq!(ex.stats().batches, before + 1);
            assert_eq!(got.len(), len);
            for (i, (r, (res, out))) in reqs.iter().zip(&single).enumerate() {
                let mut o = vec![0u8; r.output.len()];
                r.output.read_at(0, &mut o).unwrap();
                assert_eq!(
                    (&got[i], &o),
                    (res, out),
                    "fallback {fallback}, len {len}, #{i}"
                );
            }
            assert!(single.iter().any(|(r, _)| *r == Ok(4)));
            g.reset();
        }
    }
    eprintln!("batches equal single execution; stats {:?}", ex.stats());
}

// ---- remoting ------------------------------------------------------------

struct Vm<'a> {
    id: u32,
    g: &'a mut Guest,
}

impl Vm<'_> {
    fn call(
        &mut self,
        ex: &mut IsolatedCuda,
        op: Opcode,
        payload: &[u8],
        out: usize,
    ) -> Result<Vec<u8>, Status> {
        let r = self.g.request(self.id, op, payload, out);
        let res = run(ex, &r);
        self.g.reset();
        res
    }
    fn handle(&mut self, ex: &mut IsolatedCuda, op: Opcode, payload: &[u8]) -> Result<u64, Status> {
        let b = self.call(ex, op, payload, 8)?;
        Ok(u64::from_le_bytes(
            b.try_into().map_err(|_| Status::BadRequest)?,
        ))
    }
    fn alloc(&mut self, ex: &mut IsolatedCuda, size: u64) -> Result<u64, Status> {
        self.handle(ex, Opcode::MemAlloc, &size.to_le_bytes())
    }
    fn free(&mut self, ex: &mut IsolatedCuda, h: u64) -> Result<(), Status> {
        self.call(ex, Opcode::MemFree, &h.to_le_bytes(), 0)
            .map(|_| ())
    }
    fn htod(&mut self, ex: &mut IsolatedCuda, h: u64, off: u64, data: &[u8]) -> Result<(), Status> {
        let mut p = h.to_le_bytes().to_vec();
        p.extend(off.to_le_bytes());
        p.extend(data);
        self.call(ex, Opcode::MemcpyHtoD, &p, 0).map(|_| ())
    }
    fn dtoh(
        &mut self,
        ex: &mut IsolatedCuda,
        h: u64,
        off: u64,
        len: u64,
    ) -> Result<Vec<u8>, Status> {
        let mut p = h.to_le_bytes().to_vec();
        p.extend(off.to_le_bytes());
        p.extend(len.to_le_bytes());
        self.call(ex, Opcode::MemcpyDtoH, &p, len as usize)
    }
    fn load(&mut self, ex: &mut IsolatedCuda) -> Result<u64, Status> {
        self.handle(ex, Opcode::ModuleLoad, TEST_PTX.as_bytes())
    }
    fn launch(
        &mut self,
        ex: &mut IsolatedCuda,
        module: u64,
        name: &str,
        grid: u32,
        block: u32,
        params: Vec<Param>,
    ) -> Result<(), Status> {
        let l = Launch {
            module,
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            shared_mem_bytes: 0,
            name: CString::new(name).unwrap(),
            params,
        };
        self.call(ex, Opcode::Launch, &encode_launch(&l), 0)
            .map(|_| ())
    }
    /// p[i] = p[i] * s + t on a device buffer of n floats.
    fn scale_add(
        &mut self,
        ex: &mut IsolatedCuda,
        module: u64,
        buf: u64,
        s: f32,
        t: f32,
        n: u32,
    ) -> Result<(), Status> {
        self.launch(
            ex,
            module,
            "scale_add_f32",
            n.div_ceil(128),
            128,
            vec![
                Param::Buffer(buf),
                Param::Bytes(s.to_le_bytes().to_vec()),
                Param::Bytes(t.to_le_bytes().to_vec()),
                Param::Bytes(n.to_le_bytes().to_vec()),
            ],
        )
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn remoting_round_trip() {
    let mut ex = cuda();
    let mut g = Guest::new(64 << 20);
    ex.map_guest_memory(1, &g.mem);
    let mut vm = Vm { id: 1, g: &mut g };
    let mut rng = Rng::seeded();
    let n = 100_000u32;
    let data = rng.f32s(n as usize);

    let buf = vm.alloc(&mut ex, 4 * n as u64).unwrap();
    vm.htod(&mut ex, buf, 0, &f32_bytes(&data)).unwrap();
    let m = vm.load(&mut ex).unwrap();
    vm.scale_add(&mut ex, m, buf, 3.0, 0.5, n).unwrap();
    assert_eq!(vm.call(&mut ex, Opcode::Synchronize, &[], 0), Ok(vec![]));
    let out = f32s(&vm.dtoh(&mut ex, buf, 0, 4 * n as u64).unwrap());
    // nvcc contracts p * s + t into one fma.
    let want: Vec<f32> = data.iter().map(|x| x.mul_add(3.0, 0.5)).collect();
    assert_eq!(out, want);
    // Partial copies at an offset.
    vm.htod(&mut ex, buf, 8, &f32_bytes(&[7.0, 8.0])).unwrap();
    assert_eq!(
        f32s(&vm.dtoh(&mut ex, buf, 4, 12).unwrap()),
        vec![want[1], 7.0, 8.0]
    );

    // Refusals.
    assert_eq!(
        vm.dtoh(&mut ex, buf, 4 * n as u64 - 4, 8),
        Err(Status::BadRequest)
    );
    assert_eq!(
        vm.htod(&mut ex, buf, u64::MAX, &[1]),
        Err(Status::BadRequest)
    );
    assert_eq!(
        vm.launch(&mut ex, m, "no_such_kernel", 1, 1, vec![]),
        Err(Status::NotFound)
    );
    assert_eq!(
        vm.launch(&mut ex, m, "scale_add_f32", 1, 1, vec![Param::Buffer(buf)]),
        Err(Status::BadRequest),
        "too few parameters"
    );
    assert_eq!(
        vm.launch(
            &mut ex,
            m,
            "poke_u32",
            1,
            1,
            vec![Param::Buffer(buf), Param::Bytes(vec![0; 8])]
        ),
        Err(Status::BadRequest),
        "wrong parameter size"
    );
    assert_eq!(
        vm.launch(&mut ex, m, "scale_add_f32", 1, 4096, vec![]),
        Err(Status::BadRequest)
    );
    assert_eq!(
        vm.launch(&mut ex, buf, "scale_add_f32", 1, 1, vec![]),
        Err(Status::NotFound)
    );
    assert_eq!(
        vm.call(&mut ex, Opcode::ModuleLoad, b"not ptx at all", 8),
        Err(Status::BadRequest)
    );
    assert_eq!(
        vm.call(&mut ex, Opcode::ModuleLoad, b"a\0b", 8),
        Err(Status::BadRequest)
    );
    // Bad requests did not cost the context.
    assert_eq!(ex.stats().vm_contexts_created, 1);
    assert_eq!(ex.stats().vm_contexts_faulted, 0);

    assert_eq!(
        vm.call(&mut ex, Opcode::ModuleUnload, &m.to_le_bytes(), 0),
        Ok(vec![])
    );
    assert_eq!(
        vm.call(&mut ex, Opcode::ModuleUnload, &m.to_le_bytes(), 0),
        Err(Status::NotFound)
    );
    vm.free(&mut ex, buf).unwrap();
    assert_eq!(vm.free(&mut ex, buf), Err(Status::NotFound));
    assert_eq!(vm.dtoh(&mut ex, buf, 0, 4), Err(Status::NotFound));
    // Built-in operations still fine on the executor's own context.
    let r =
        vm.g.request(1, Opcode::ScalarAddI32, &common::scalar_payload(2, 2), 4);
    assert_eq!(run(&mut ex, &r).unwrap(), 4i32.to_le_bytes());
    ex.release_vm(1);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn handles_are_per_vm_and_quota_holds() {
    let mut ex = cuda();
    let (mut g1, mut g2) = (Guest::new(8 << 20), Guest::new(8 << 20));
    let mut vm1 = Vm { id: 1, g: &mut g1 };
    let mut vm2 = Vm { id: 2, g: &mut g2 };
    let b1 = vm1.alloc(&mut ex, 4096).unwrap();
    let m1 = vm1.load(&mut ex).unwrap();
    assert_eq!(vm2.dtoh(&mut ex, b1, 0, 4), Err(Status::NotFound));
    assert_eq!(
        vm2.htod(&mut ex, b1, 0, &[1, 2, 3, 4]),
        Err(Status::NotFound)
    );
    assert_eq!(vm2.free(&mut ex, b1), Err(Status::NotFound));
    assert_eq!(
        vm2.launch(&mut ex, m1, "scale_add_f32", 1, 1, vec![]),
        Err(Status::NotFound)
    );
    let b2 = vm2.alloc(&mut ex, 16).unwrap();
    let m2 = vm2.load(&mut ex).unwrap();
    assert_eq!(
        vm2.scale_add(&mut ex, m2, b1, 1.0, 1.0, 4),
        Err(Status::NotFound),
        "another VM's buffer as a parameter"
    );
    vm2.htod(&mut ex, b2, 0, &f32_bytes(&[1.0; 4])).unwrap();
    vm2.scale_add(&mut ex, m2, b2, 2.0, 0.0, 4).unwrap();
    assert_eq!(f32s(&vm2.dtoh(&mut ex, b2, 0, 16).unwrap()), vec![2.0; 4]);
    assert_eq!(ex.stats().vm_contexts_created, 2);

    // Quota: 1 MiB for VM 3.
    let mut g3 = Guest::new(1 << 20);
    g3.set_quota(1 << 20);
    let mut vm3 = Vm { id: 3, g: &mut g3 };
    let a = vm3.alloc(&mut ex, 768 << 10).unwrap();
    assert_eq!(vm3.alloc(&mut ex, 512 << 10), Err(Status::NoResources));
    let b = vm3.alloc(&mut ex, 256 << 10).unwrap();
    assert_eq!(vm3.alloc(&mut ex, 1), Err(Status::NoResources));
    vm3.free(&mut ex, a).unwrap();
    let c = vm3.alloc(&mut ex, 512 << 10).unwrap();
    vm3.free(&mut ex, b).unwrap();
    vm3.free(&mut ex, c).unwrap();
    // More than the GPU has: the quota allows it, the driver does not.
    vm3.g.set_quota(u64::MAX);
    assert_eq!(vm3.alloc(&mut ex, 1 << 50), Err(Status::NoResources));
    assert!(
        vm3.alloc(&mut ex, 1 << 20).is_ok(),
        "quota released after the failed allocation"
    );
    assert_eq!(vm3.alloc(&mut ex, 0), Err(Status::BadRequest));
    for v in [1, 2, 3] {
        ex.release_vm(v);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn faulting_kernel_only_hurts_its_vm() {
    let mut ex = cuda();
    let (mut g1, mut g2) = (Guest::new(8 << 20), Guest::new(8 << 20));
    ex.map_guest_memory(1, &g1.mem);
    ex.map_guest_memory(2, &g2.mem);
    let mut vm1 = Vm { id: 1, g: &mut g1 };
    let mut vm2 = Vm { id: 2, g: &mut g2 };
    let b1 = vm1.alloc(&mut ex, 64).unwrap();
    let m1 = vm1.load(&mut ex).unwrap();
    let b2 = vm2.alloc(&mut ex, 64).unwrap();
    let m2 = vm2.load(&mut ex).unwrap();
    vm2.htod(&mut ex, b2, 0, &f32_bytes(&[1.0; 16])).unwrap();

    // VM 1 writes to an address that is mapped nowhere.
    let t = Instant::now();
    let r = vm1.launch(
        &mut ex,
        m1,
        "poke_u32",
        1,
        1,
        vec![
            Param::Bytes(0x10u64.to_le_bytes().to_vec()),
            Param::Bytes(7u32.to_le_bytes().to_vec()),
        ],
    );
    assert_eq!(r, Err(Status::DeviceError));
    eprintln!("fault detected and context torn down in {:?}", t.elapsed());
    assert_eq!(ex.stats().vm_contexts_faulted, 1);
    // Its handles are gone.
    assert_eq!(vm1.dtoh(&mut ex, b1, 0, 4), Err(Status::NotFound));
    assert_eq!(
        vm1.launch(&mut ex, m1, "spin_ns", 1, 1, vec![]),
        Err(Status::NotFound)
    );

    // VM 2 is untouched: its buffer, module and results.
    vm2.scale_add(&mut ex, m2, b2, 5.0, 1.0, 16).unwrap();
    assert_eq!(f32s(&vm2.dtoh(&mut ex, b2, 0, 64).unwrap()), vec![6.0; 16]);
    // So are the built-in operations.
    let r = vm2
        .g
        .request(2, Opcode::ScalarAddI32, &common::scalar_payload(20, 22), 4);
    assert_eq!(run(&mut ex, &r).unwrap(), 42i32.to_le_bytes());
    vm2.g.reset();

    // VM 1 works again in a rebuilt context.
    let b1 = vm1.alloc(&mut ex, 64).unwrap();
    let m1 = vm1.load(&mut ex).unwrap();
    vm1.htod(&mut ex, b1, 0, &f32_bytes(&[2.0; 16])).unwrap();
    vm1.scale_add(&mut ex, m1, b1, 2.0, 0.0, 16).unwrap();
    assert_eq!(f32s(&vm1.dtoh(&mut ex, b1, 0, 64).unwrap()), vec![4.0; 16]);
    assert_eq!(ex.stats().vm_contexts_created, 3);

    // A guest kernel past the execution limit: TIMEOUT, context torn down,
    // the GPU free again for the others.
    let t = Instant::now();
    let r = vm1.g.request(
        1,
        Opcode::Launch,
        &encode_launch(&Launch {
            module: m1,
            grid: [1, 1, 1],
            block: [1, 1, 1],
            shared_mem_bytes: 0,
            name: CString::new("spin_ns").unwrap(),
            params: vec![Param::Bytes(3_000_000_000u64.to_le_bytes().to_vec())],
        }),
        0,
    );
    assert_eq!(
        ex.execute(r.tenant, &r, Duration::from_millis(300)),
        Err(Status::Timeout)
    );
    vm1.g.reset();
    let timeout_at = t.elapsed();
    let r = vm2
        .g
        .request(2, Opcode::ScalarAddI32, &common::scalar_payload(1, 1), 4);
    assert_eq!(run(&mut ex, &r).unwrap(), 2i32.to_le_bytes());
    vm2.g.reset();
    eprintln!(
        "3 s guest kernel under a 300 ms limit: TIMEOUT after {timeout_at:?}, next built-in op done after {:?}",
        t.elapsed()
    );
    vm2.scale_add(&mut ex, m2, b2, 1.0, 1.0, 16).unwrap();
    assert_eq!(f32s(&vm2.dtoh(&mut ex, b2, 0, 64).unwrap()), vec![7.0; 16]);
    ex.release_vm(1);
    ex.release_vm(2);
}

/// SGEMM through cuBLAS: FP32 matches the CPU within FP32 tolerance on the
/// pipelined path (registered memory, several row blocks, ragged last
/// block) and on the staged one; the TF32 flag gives TF32 accuracy; without
/// cuBLAS the built-in kernel answers the same.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn sgemm_cublas_fp32_tf32_and_fallback() {
    let mut ex = cuda();
    assert!(
        ex.uses_cublas(),
        "libcublas is on the GPU machine: SGEMM must use it"
    );
    let mut g = Guest::new(256 << 20);
    let mut staged = Guest::new(64 << 20);
    ex.map_guest_memory(1, &g.mem);
    let mut rng = Rng::seeded();
    let worst = |got: &[f32], want: &[f32]| {
        got.iter()
            .zip(want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let shapes = [(1, 1, 1), (3, 200, 17), (2100, 300, 257), (4097, 64, 96)];
    for (i, (m, n, k)) in shapes.into_iter().enumerate() {
        let (a, b) = (rng.f32s(m * k), rng.f32s(k * n));
        let want = sgemm(m, n, k, &a, &b);
        let payload = common::sgemm_payload(m, n, k, &a, &b);
        let fp32_tol = 1e-5 * k as f32 + 1e-6;
        // FP32, zero-copy (pipelined) and staged (another table).
        for guest in [&mut g, &mut staged] {
            let r = guest.request(1, Opcode::SgemmF32, &payload, 4 * m * n);
            let got = f32s(&run(&mut ex, &r).unwrap());
            let e = worst(&got, &want);
            assert!(e <= fp32_tol, "FP32 {m}x{n}x{k}: {e} > {fp32_tol}");
            guest.reset();
        }
        // TF32: inputs rounded to 10-bit mantissas.
        let mut p = payload.clone();
        p[..4].copy_from_slice(&(m as u32 | vgpu::protocol::SGEMM_TF32).to_le_bytes());
        let r = g.request(1, Opcode::SgemmF32, &p, 4 * m * n);
        let got = f32s(&run(&mut ex, &r).unwrap());
        let e = worst(&got, &want);
        let tf32_tol = 4e-3 * (k as f32).sqrt() + 1e-3;
        assert!(e <= tf32_tol, "TF32 {m}x{n}x{k}: {e} > {tf32_tol}");
        eprintln!("SGEMM {m}x{n}x{k}: TF32 max error {e:.2e}");
        g.reset();
        if i == 1 {
            // A malformed TF32 request is refused like any other.
            let r = g.request(1, Opcode::SgemmF32, &p[..p.len() - 1], 4 * m * n);
            assert_eq!(ex.execute(r.tenant, &r, LIMIT), Err(Status::BadRequest));
            g.reset();
        }
    }
    let st = ex.stats();
    assert!(st.zero_copy > 0 && st.staged > 0, "{st:?}");
    // The fallback when libcublas is absent: the built-in kernel, FP32
    // whatever the flag says.
    ex.disable_cublas();
    let (m, n, k) = (130, 257, 67);
    let (a, b) = (rng.f32s(m * k), rng.f32s(k * n));
    let want = sgemm(m, n, k, &a, &b);
    let mut p = common::sgemm_payload(m, n, k, &a, &b);
    p[..4].copy_from_slice(&(m as u32 | vgpu::protocol::SGEMM_TF32).to_le_bytes());
    let r = g.request(1, Opcode::SgemmF32, &p, 4 * m * n);
    let got = f32s(&run(&mut ex, &r).unwrap());
    assert!(worst(&got, &want) <= 1e-5 * k as f32 + 1e-6);
    g.reset();
    // Taller than one grid of the built-in kernel (65,535 x 128 rows).
    let (m, n, k) = (65_535 * 128 + 1, 1, 2);
    let (a, b) = (rng.f32s(m * k), rng.f32s(k * n));
    let want = sgemm(m, n, k, &a, &b);
    let r = g.request(
        1,
        Opcode::SgemmF32,
        &common::sgemm_payload(m, n, k, &a, &b),
        4 * m,
    );
    let got = f32s(&run(&mut ex, &r).unwrap());
    assert!(worst(&got, &want) <= 1e-5 * k as f32 + 1e-6, "tall SGEMM");
    ex.release_vm(1);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn remoting_large_copies_cross_in_chunks() {
    let mut ex = cuda();
    let mut g = Guest::new(200 << 20);
    let mut vm = Vm { id: 1, g: &mut g };
    // 40 MiB and 3 bytes: five full 8 MiB chunks and a short one.
    let len = (40 << 20) + 3;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let buf = vm.alloc(&mut ex, len as u64).unwrap();
    vm.htod(&mut ex, buf, 0, &data).unwrap();
    assert!(vm.dtoh(&mut ex, buf, 0, len as u64).unwrap() == data);
    // A copy that ends one byte past the buffer fails before a byte moved
    // (its last chunk goes first).
    let other = vec![0xAAu8; len];
    assert_eq!(vm.htod(&mut ex, buf, 1, &other), Err(Status::BadRequest));
    assert_eq!(
        vm.dtoh(&mut ex, buf, 1, len as u64),
        Err(Status::BadRequest)
    );
    assert!(vm.dtoh(&mut ex, buf, 0, len as u64).unwrap() == data);
    // An output buffer too small for the copy.
    let mut p = buf.to_le_bytes().to_vec();
    p.extend(0u64.to_le_bytes());
    p.extend((len as u64).to_le_bytes());
    assert_eq!(
        vm.call(&mut ex, Opcode::MemcpyDtoH, &p, len - 1),
        Err(Status::TooLarge)
    );
    for line in worker_memory() {
        eprintln!("MEASURE worker memory after 40 MiB copies: {line}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn spare_worker_makes_the_first_call_fast() {
    let mut g = Guest::new(8 << 20);
    for spares in [2, 1, 0] {
        let mut ex = cuda_with(|c| c.worker.spares = spares);
        // The spare warms up while no VM needs it.
        std::thread::sleep(Duration::from_secs(3));
        for line in worker_memory() {
            eprintln!("MEASURE worker (spares={spares}) warmed up: {line}");
        }
        let mut vm = Vm { id: 5, g: &mut g };
        let t = Instant::now();
        let b = vm.alloc(&mut ex, 4096).unwrap();
        let first = t.elapsed();
        let t = Instant::now();
        vm.alloc(&mut ex, 4096).unwrap();
        let second = t.elapsed();
        vm.free(&mut ex, b).unwrap();
        // After a fault the next call takes the spare that followed.
        let m = vm.load(&mut ex).unwrap();
        let r = vm.launch(
            &mut ex,
            m,
            "poke_u32",
            1,
            1,
            vec![
                Param::Bytes(0x10u64.to_le_bytes().to_vec()),
                Param::Bytes(7u32.to_le_bytes().to_vec()),
            ],
        );
        assert_eq!(r, Err(Status::DeviceError));
        std::thread::sleep(Duration::from_secs(3));
        let t = Instant::now();
        vm.alloc(&mut ex, 4096).unwrap();
        let after_fault = t.elapsed();
        eprintln!(
            "MEASURE first remoting call (MEM_ALLOC), spares={spares}: first {:.3} ms, second {:.3} ms, first after a fault {:.3} ms",
            first.as_secs_f64() * 1e3,
            second.as_secs_f64() * 1e3,
            after_fault.as_secs_f64() * 1e3
        );
    }
}

/// In-process remoting is not isolation (a kernel reads memory another
/// context of the process registered or pinned), so it serves one VM only:
/// while the executor holds anything of a second VM, remoting answers
/// UNSUPPORTED for both.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn in_process_remoting_serves_a_single_vm_only() {
    let mut ex = cuda_with(|c| c.isolation = Isolation::InProcess);
    let (mut g1, mut g2) = (Guest::new(8 << 20), Guest::new(8 << 20));
    let mut vm1 = Vm { id: 1, g: &mut g1 };
    let b = vm1.alloc(&mut ex, 64).expect("the only VM is served");
    // A second VM's memory table joins this process.
    ex.map_guest_memory(2, &g2.mem.clone());
    let mut vm1 = Vm { id: 1, g: &mut g1 };
    assert_eq!(vm1.alloc(&mut ex, 64), Err(Status::Unsupported));
    let mut vm2 = Vm { id: 2, g: &mut g2 };
    assert_eq!(vm2.alloc(&mut ex, 64), Err(Status::Unsupported));
    // Built-in operations serve both meanwhile.
    let r = vm2
        .g
        .request(2, Opcode::ScalarAddI32, &common::scalar_payload(20, 22), 4);
    assert_eq!(run(&mut ex, &r).unwrap(), 42i32.to_le_bytes());
    // Once VM 2 is gone, VM 1 is alone again and keeps its state.
    ex.release_vm(2);
    let mut vm1 = Vm { id: 1, g: &mut g1 };
    vm1.free(&mut ex, b).expect("VM 1's buffer survived");
    ex.release_vm(1);
}

/// PTX of a module with a `.global` array of `bytes` bytes and a kernel
/// that writes to it (so that no compiler drops it).
fn ptx_with_global(bytes: u64) -> String {
    format!(
        ".version 9.0\n.target sm_80\n.address_size 64\n\n\
         .visible .global .align 8 .u64 big[{}];\n\n\
         .visible .entry touch()\n{{\n\t.reg .b64 %rd<3>;\n\
         \tmov.u64 %rd1, big;\n\tmov.u64 %rd2, 1;\n\
         \tst.global.u64 [%rd1], %rd2;\n\tret;\n}}\n",
        bytes / 8
    )
}

/// CU_MEM_INFO of a VM: (free, total) as the VM sees them (its quota).
fn cu_mem_info(vm: &mut Vm<'_>, ex: &mut IsolatedCuda) -> (u64, u64) {
    let r = vm.call(ex, Opcode::CuMemInfo, &[], 24).unwrap();
    assert_eq!(
        u32::from_le_bytes(r[0..4].try_into().unwrap()),
        0,
        "CUDA_SUCCESS"
    );
    let free = u64::from_le_bytes(r[8..16].try_into().unwrap());
    let total = u64::from_le_bytes(r[16..24].try_into().unwrap());
    (free, total)
}

/// A module's `.global` arrays are charged to the VM's quota: one larger
/// than the quota is refused (and unloaded), a small one loads and its
/// charge shows in what the VM may still allocate, and goes with it.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn module_globals_are_charged_to_the_quota() {
    const GIB: u64 = 1 << 30;
    let mut ex = cuda();
    let mut g = Guest::new(4 << 20);
    g.set_quota(GIB);
    let mut vm = Vm { id: 41, g: &mut g };
    let big = ptx_with_global(4 * GIB);
    let small = ptx_with_global(64 << 20);

    // MODULE_LOAD (0x02xx): over the quota is the quota's answer.
    assert_eq!(
        vm.handle(&mut ex, Opcode::ModuleLoad, big.as_bytes()),
        Err(Status::NoResources),
        "a 4 GiB .global with a 1 GiB quota"
    );
    let (free0, total) = cu_mem_info(&mut vm, &mut ex);
    assert_eq!(total, GIB);
    assert_eq!(free0, GIB, "nothing charged after the refused load");
    let m = vm
        .handle(&mut ex, Opcode::ModuleLoad, small.as_bytes())
        .expect("a 64 MiB .global loads");
    let (free1, _) = cu_mem_info(&mut vm, &mut ex);
    eprintln!(
        "MODULE_LOAD of a 64 MiB .global charged {} bytes",
        free0 - free1
    );
    assert!(free0 - free1 >= 64 << 20, "charged {}", free0 - free1);
    // What fits without the module's charge does not fit with it.
    let want = free0 - (32 << 20);
    assert_eq!(vm.alloc(&mut ex, want), Err(Status::NoResources));
    vm.call(&mut ex, Opcode::ModuleUnload, &m.to_le_bytes(), 0)
        .unwrap();
    assert_eq!(cu_mem_info(&mut vm, &mut ex).0, GIB, "released at unload");
    let b = vm
        .alloc(&mut ex, want)
        .expect("fits once the module is gone");
    vm.free(&mut ex, b).unwrap();

    // CU_MODULE_LOAD (0x03xx): CUDA_ERROR_OUT_OF_MEMORY, nothing else.
    let r = vm
        .call(&mut ex, Opcode::CuModuleLoad, big.as_bytes(), 16)
        .unwrap();
    assert_eq!(r.len(), 8, "a reply without data: {r:?}");
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 2);
    assert_eq!(cu_mem_info(&mut vm, &mut ex).0, GIB);
    let r = vm
        .call(&mut ex, Opcode::CuModuleLoad, small.as_bytes(), 16)
        .unwrap();
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 0);
    let h = u64::from_le_bytes(r[8..16].try_into().unwrap());
    let (free2, _) = cu_mem_info(&mut vm, &mut ex);
    eprintln!(
        "CU_MODULE_LOAD of a 64 MiB .global charged {} bytes",
        GIB - free2
    );
    assert!(GIB - free2 >= 64 << 20);
    let r = vm
        .call(&mut ex, Opcode::CuModuleUnload, &h.to_le_bytes(), 8)
        .unwrap();
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 0);
    assert_eq!(cu_mem_info(&mut vm, &mut ex).0, GIB);
    ex.release_vm(41);
}

/// PTX with one kernel, `deep(out)`, that keeps `local` bytes per thread in
/// local memory (an array indexed at run time, so the JIT keeps it).
fn ptx_with_local(local: u32) -> String {
    format!(
        ".version 9.0\n.target sm_80\n.address_size 64\n\n\
         .visible .entry deep(.param .u64 out)\n{{\n\
         \t.local .align 4 .b8 buf[{local}];\n\
         \t.reg .b64 %rd<5>;\n\t.reg .b32 %r<3>;\n\
         \tld.param.u64 %rd1, [out];\n\tmov.u32 %r1, %tid.x;\n\
         \tmov.u64 %rd2, buf;\n\tmul.wide.u32 %rd3, %r1, 4;\n\
         \tadd.u64 %rd4, %rd2, %rd3;\n\tst.local.u32 [%rd4], %r1;\n\
         \tld.local.u32 %r2, [%rd2];\n\tst.global.u32 [%rd1], %r2;\n\tret;\n}}\n"
    )
}

/// The stack a kernel can make the driver reserve (its local memory per
/// thread, for every thread the device holds resident, kept for the
/// context's life) is charged to the VM's quota before the kernel can run:
/// 64 KiB a thread (17.7 GB on the H200) is refused under a 1 GiB quota on
/// both launch paths, with nothing charged; 2 KiB a thread is charged once
/// and the kernel runs.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn kernel_stacks_are_charged_to_the_quota() {
    const GIB: u64 = 1 << 30;
    let mut ex = cuda();
    let mut g = Guest::new(4 << 20);
    g.set_quota(GIB);
    let mut vm = Vm { id: 42, g: &mut g };
    let out = vm.alloc(&mut ex, 4096).unwrap();
    let (free0, _) = cu_mem_info(&mut vm, &mut ex);

    // LAUNCH (0x02xx): NO_RESOURCES, the quota's answer.
    let deep = vm
        .handle(
            &mut ex,
            Opcode::ModuleLoad,
            ptx_with_local(64 << 10).as_bytes(),
        )
        .expect("the module loads");
    assert_eq!(
        vm.launch(&mut ex, deep, "deep", 1, 32, vec![Param::Buffer(out)]),
        Err(Status::NoResources),
        "64 KiB of local memory a thread under a 1 GiB quota"
    );
    assert_eq!(cu_mem_info(&mut vm, &mut ex).0, free0, "nothing charged");

    // CU_GET_FUNCTION (0x03xx): CUDA_ERROR_OUT_OF_MEMORY.
    let r = vm
        .call(
            &mut ex,
            Opcode::CuModuleLoad,
            ptx_with_local(64 << 10).as_bytes(),
            16,
        )
        .unwrap();
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 0);
    let m = u64::from_le_bytes(r[8..16].try_into().unwrap());
    let mut p = m.to_le_bytes().to_vec();
    p.extend_from_slice(b"deep");
    let cap = 8 + 16 + 8 * vgpu::executor::cuda_api::MAX_FUNCTION_PARAMS;
    let r = vm.call(&mut ex, Opcode::CuGetFunction, &p, cap).unwrap();
    assert_eq!(
        u32::from_le_bytes(r[0..4].try_into().unwrap()),
        2,
        "OUT_OF_MEMORY"
    );
    assert_eq!(cu_mem_info(&mut vm, &mut ex).0, free0, "nothing charged");

    // 2 KiB a thread: charged once, and the kernel runs.
    let small = vm
        .handle(
            &mut ex,
            Opcode::ModuleLoad,
            ptx_with_local(2 << 10).as_bytes(),
        )
        .expect("the module loads");
    vm.launch(&mut ex, small, "deep", 1, 32, vec![Param::Buffer(out)])
        .expect("2 KiB a thread fits");
    let (free1, _) = cu_mem_info(&mut vm, &mut ex);
    eprintln!(
        "MEASURE a kernel with 2 KiB of local memory a thread charged {} bytes",
        free0 - free1
    );
    assert!(free1 < free0, "the stack growth is charged");
    vm.launch(&mut ex, small, "deep", 1, 32, vec![Param::Buffer(out)])
        .expect("runs again");
    assert_eq!(cu_mem_info(&mut vm, &mut ex).0, free1, "charged once");
}
