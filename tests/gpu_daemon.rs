//! GPU tests through the daemon: the real `vgpu-vhost-user` binary with
//! `--executor cuda`, driven over its vhost-user sockets by simulated guests
//! (memfd guest RAM, which the daemon registers with the CUDA driver). They
//! need an NVIDIA GPU, so they are `#[ignore]`d; on the GPU machine:
//!
//!     cargo test --release --test gpu_daemon -- --ignored --test-threads=1
//!
//! or, where there is no cargo, with the binaries built elsewhere
//! (`cargo build --release; cargo test --release --no-run --test gpu_daemon`)
//! and copied into one directory:
//!
//!     VGPU_DAEMON=./vgpu-vhost-user ./gpu_daemon-<hash> --ignored --test-threads=1
//!
//! The daemon finds `vgpu-cuda-worker` (remoting) next to itself, or through
//! `$VGPU_CUDA_WORKER`.

mod common;
use vgpu_sim::workload as gpu_common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::time::Duration;

use common::{busy_payload, DaemonProc, T};
use gpu_common::{f32_bytes, f32s, Rng};
use vgpu::executor::cpu::{saxpy, sgemm, vector_add};
use vgpu::executor::remoting::{encode_launch, Launch, Param};
use vgpu::protocol::*;
use vgpu_sim::{Desc, SimGuest, SimOptions};

const TEST_PTX: &str = include_str!("kernels/remote_test.ptx");

fn cuda_daemon(vms: &[(u32, &str, &str)], extra: &[&str]) -> DaemonProc {
    let _ = env_logger::builder().is_test(true).try_init();
    DaemonProc::start_executor("cuda", vms, extra)
}

fn big(d: &DaemonProc, id: u32, mem_mib: usize, slot_mib: usize) -> SimGuest {
    d.guest_with(
        id,
        SimOptions {
            mem_size: mem_mib << 20,
            slot_size: slot_mib << 20,
            ..Default::default()
        },
    )
}

/// One request in slot 0: output on OK, the status otherwise.
fn call(g: &mut SimGuest, op: Opcode, payload: &[u8], out: usize) -> Result<Vec<u8>, Status> {
    let (h, bytes) = g.call(op as u16, 9, payload, out).expect("round trip");
    assert_eq!(h.tag, 9);
    match Status::from_u32(h.status).expect("known status") {
        Status::Ok => {
            assert_eq!(h.output_len as usize, bytes.len());
            Ok(bytes)
        }
        s => Err(s),
    }
}

fn handle(g: &mut SimGuest, op: Opcode, payload: &[u8]) -> Result<u64, Status> {
    let b = call(g, op, payload, 8)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8-byte handle")))
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn get_info_reports_cuda_and_the_gpu() {
    let d = cuda_daemon(&[(1, "A", "high")], &["--exec-limit-ms", "4000"]);
    let mut g = d.guest(1);
    let info = DeviceInfo::decode(&call(&mut g, Opcode::GetInfo, &[], INFO_SIZE).unwrap()).unwrap();
    eprintln!("GET_INFO through the daemon: {info:?}");
    assert_eq!(info.executor, ExecutorKind::Cuda);
    assert!(info.name.contains("NVIDIA"), "GPU name {:?}", info.name);
    assert!(info.memory_total > 1 << 30);
    assert!(info.compute_capability >= 8 << 16, "{info:?}");
    assert_eq!(info.exec_limit_ms, 4000);
    assert_eq!(info.gpu_index, 0);
    let h = common::ping(&mut g);
    assert_eq!(h.status, Status::Ok as u32);
    assert!(h.dispatch_seq > 0);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn builtin_ops_match_cpu_reference() {
    let d = cuda_daemon(&[(1, "A", "high")], &[]);
    // 64 MiB slots: SGEMM 512^3 and VECTOR_ADD of 1 Mi floats fit one.
    let mut g = big(&d, 1, 160, 64);
    let mut rng = Rng::seeded();

    assert_eq!(call(&mut g, Opcode::Ping, &[], 0), Ok(vec![]));

    let mut cases = vec![(i32::MAX, 1), (-5, 3), (i32::MIN, -1), (40, 2)];
    for _ in 0..100 {
        cases.push((rng.next_u64() as i32, rng.next_u64() as i32));
    }
    for (a, b) in cases {
        let out = call(
            &mut g,
            Opcode::ScalarAddI32,
            &gpu_common::scalar_payload(a, b),
            4,
        );
        assert_eq!(out, Ok(a.wrapping_add(b).to_le_bytes().to_vec()), "{a}+{b}");
    }

    for n in [0usize, 1, 1000, 257 * 1024 + 3, 1 << 20] {
        let (a, b) = (rng.f32s(n), rng.f32s(n));
        let out = call(
            &mut g,
            Opcode::VectorAddF32,
            &gpu_common::vector_add_payload(&a, &b),
            4 * n,
        )
        .unwrap();
        assert!(f32s(&out) == vector_add(&a, &b), "VECTOR_ADD n={n}");

        let s = rng.f32() * 4.0;
        let out = call(
            &mut g,
            Opcode::SaxpyF32,
            &gpu_common::saxpy_payload(s, &a, &b),
            4 * n,
        )
        .unwrap();
        assert!(f32s(&out) == saxpy(s, &a, &b), "SAXPY n={n}");
    }

    for (m, n, k) in [
        (1, 1, 1),
        (3, 200, 17),
        (130, 257, 67),
        (256, 128, 512),
        (512, 512, 512),
    ] {
        let (a, b) = (rng.f32s(m * k), rng.f32s(k * n));
        let out = call(
            &mut g,
            Opcode::SgemmF32,
            &gpu_common::sgemm_payload(m, n, k, &a, &b),
            4 * m * n,
        )
        .unwrap();
        let want = sgemm(m, n, k, &a, &b);
        // Inputs in [-1, 1): summation order differs, error grows with k.
        let tol = 1e-5 * k as f32 + 1e-6;
        let worst = f32s(&out)
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "SGEMM {m}x{n}x{k}: max error {worst} > {tol}");
    }

    // VECTOR_ADD with payload and output cut into pieces at odd places,
    // spread over guest memory: one DMA per piece, result unchanged.
    let n = 100_003usize;
    let (a, b) = (rng.f32s(n), rng.f32s(n));
    let mut req = ReqHdr::new(Opcode::VectorAddF32 as u16, 5, (8 + 8 * n) as u32)
        .encode()
        .to_vec();
    req.extend(gpu_common::vector_add_payload(&a, &b));
    let base = g.slot(1);
    let mut descs = Vec::new();
    let mut at = base;
    for piece in [&req[..13], &req[13..4099], &req[4099..]] {
        g.write(at, piece).unwrap();
        descs.push(Desc::r(at, piece.len() as u32));
        at = (at + piece.len() as u64 + 0x1234) & !3;
    }
    let resp_at = at;
    let wlen = RESP_HDR_SIZE + 4 * n;
    descs.push(Desc::w(resp_at, 1001));
    descs.push(Desc::w(resp_at + 1001 + 77, (wlen - 1001) as u32));
    let head = g.add_chain(&descs).unwrap();
    g.kick().unwrap();
    g.wait_all(&[head], T).unwrap();
    let mut resp = g.read(resp_at, 1001).unwrap();
    resp.extend(g.read(resp_at + 1001 + 77, wlen - 1001).unwrap());
    let h = RespHdr::decode(&resp[..RESP_HDR_SIZE]).unwrap();
    assert_eq!((h.status, h.tag), (Status::Ok as u32, 5));
    assert!(f32s(&resp[RESP_HDR_SIZE..]) == vector_add(&a, &b));

    // Refusals as on the CPU executor.
    assert_eq!(
        call(&mut g, Opcode::SgemmF32, &[1, 0, 0, 0], 4),
        Err(Status::BadRequest)
    );
    assert_eq!(
        call(
            &mut g,
            Opcode::VectorAddF32,
            &gpu_common::vector_add_payload(&[1.0], &[2.0]),
            3
        ),
        Err(Status::TooLarge)
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn priority_order_and_timing_on_the_gpu() {
    let d = cuda_daemon(
        &[(1, "A", "high"), (2, "B", "medium"), (3, "A", "low")],
        &["--exec-limit-ms", "1000"],
    );
    let mut high = d.guest(1);
    let mut med = d.guest(2);
    let mut low = d.guest(3);

    // A 50 ms BUSY_WAIT alone: exec_ns covers it, it hardly queued.
    let (h, _) = low
        .call(
            Opcode::BusyWait as u16,
            1,
            &busy_payload(Duration::from_millis(50)),
            0,
        )
        .unwrap();
    eprintln!(
        "BUSY_WAIT 50 ms: queue_ns {} exec_ns {}",
        h.queue_ns, h.exec_ns
    );
    assert_eq!(h.status, Status::Ok as u32);
    assert!(
        (50_000_000..500_000_000).contains(&h.exec_ns),
        "exec_ns {}",
        h.exec_ns
    );
    assert!(h.queue_ns < 50_000_000, "queue_ns {}", h.queue_ns);
    // Past the limit: held for the limit, then TIMEOUT.
    let (h, _) = low
        .call(
            Opcode::BusyWait as u16,
            2,
            &busy_payload(Duration::from_secs(3)),
            0,
        )
        .unwrap();
    assert_eq!(h.status, Status::Timeout as u32);
    assert!(
        (1_000_000_000..2_500_000_000).contains(&h.exec_ns),
        "exec_ns {}",
        h.exec_ns
    );

    // Hold the GPU, then queue SCALAR_ADDs lowest priority first.
    let hold = Duration::from_millis(400);
    let busy = ReqHdr::new(Opcode::BusyWait as u16, 0, 8);
    let busy_head = low.submit(0, &busy, &busy_payload(hold), 0).unwrap();
    low.kick().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut heads = BTreeMap::new();
    for (name, vm, g) in [
        ("low", 3, &mut low),
        ("medium", 2, &mut med),
        ("high", 1, &mut high),
    ] {
        let mut hs = Vec::new();
        for i in 0..3usize {
            let slot = if name == "low" { i + 1 } else { i };
            let h = ReqHdr::new(Opcode::ScalarAddI32 as u16, i as u64, 8);
            let p = gpu_common::scalar_payload(vm, i as i32);
            hs.push((slot, g.submit(slot, &h, &p, 4).unwrap()));
        }
        g.kick().unwrap();
        heads.insert(name, hs);
    }
    let mut seqs = BTreeMap::new();
    for (name, vm, g) in [
        ("high", 1, &mut high),
        ("medium", 2, &mut med),
        ("low", 3, &mut low),
    ] {
        let hs = &heads[name];
        let mut want: Vec<u16> = hs.iter().map(|&(_, h)| h).collect();
        if name == "low" {
            want.push(busy_head);
        }
        g.wait_all(&want, T).unwrap();
        let mut s = Vec::new();
        for (i, &(slot, _)) in hs.iter().enumerate() {
            let (h, out) = g.response(slot, 8, 4).unwrap();
            assert_eq!(h.status, Status::Ok as u32);
            assert_eq!(out, (vm + i as i32).to_le_bytes());
            // Queued behind the busy wait, then a few microseconds of GPU work.
            assert!(h.queue_ns >= 100_000_000, "{name} queue_ns {}", h.queue_ns);
            assert!(
                h.exec_ns > 0 && h.exec_ns < 50_000_000,
                "{name} exec_ns {}",
                h.exec_ns
            );
            s.push(h.dispatch_seq);
        }
        seqs.insert(name, s);
    }
    let (bh, _) = low.response(0, 8, 0).unwrap();
    assert_eq!(bh.status, Status::Ok as u32);
    assert!(
        bh.exec_ns >= hold.as_nanos() as u64,
        "exec_ns {}",
        bh.exec_ns
    );
    let order: Vec<u64> = ["high", "medium", "low"]
        .iter()
        .flat_map(|n| seqs[n].clone())
        .collect();
    eprintln!("dispatch_seq: busy {} then {seqs:?}", bh.dispatch_seq);
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "dispatch order {seqs:?}"
    );
    assert!(bh.dispatch_seq < order[0]);
}

fn launch_payload(module: u64, name: &str, grid: u32, block: u32, params: Vec<Param>) -> Vec<u8> {
    encode_launch(&Launch {
        module,
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_mem_bytes: 0,
        name: CString::new(name).unwrap(),
        params,
    })
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn remoting_round_trip_through_the_daemon() {
    let d = cuda_daemon(&[(1, "A", "high"), (2, "A", "low")], &[]);
    let mut g = big(&d, 1, 64, 8);
    let mut other = d.guest(2);
    let mut rng = Rng::seeded();
    let n = 100_000u32;
    let data = rng.f32s(n as usize);
    let bytes = 4 * n as u64;

    let buf = handle(&mut g, Opcode::MemAlloc, &bytes.to_le_bytes()).unwrap();
    let mut p = buf.to_le_bytes().to_vec();
    p.extend(0u64.to_le_bytes());
    p.extend(f32_bytes(&data));
    assert_eq!(call(&mut g, Opcode::MemcpyHtoD, &p, 0), Ok(vec![]));
    let module = handle(&mut g, Opcode::ModuleLoad, TEST_PTX.as_bytes()).unwrap();
    let l = launch_payload(
        module,
        "scale_add_f32",
        n.div_ceil(128),
        128,
        vec![
            Param::Buffer(buf),
            Param::Bytes(3.0f32.to_le_bytes().to_vec()),
            Param::Bytes(0.5f32.to_le_bytes().to_vec()),
            Param::Bytes(n.to_le_bytes().to_vec()),
        ],
    );
    assert_eq!(call(&mut g, Opcode::Launch, &l, 0), Ok(vec![]));
    assert_eq!(call(&mut g, Opcode::Synchronize, &[], 0), Ok(vec![]));
    let mut p = buf.to_le_bytes().to_vec();
    p.extend(0u64.to_le_bytes());
    p.extend(bytes.to_le_bytes());
    let out = f32s(&call(&mut g, Opcode::MemcpyDtoH, &p, bytes as usize).unwrap());
    // nvcc contracts p * s + t into one fma.
    let want: Vec<f32> = data.iter().map(|x| x.mul_add(3.0, 0.5)).collect();
    assert!(out == want, "scale_add_f32 result");

    // Another VM cannot use these handles.
    let mut p4 = buf.to_le_bytes().to_vec();
    p4.extend(0u64.to_le_bytes());
    p4.extend(4u64.to_le_bytes());
    assert_eq!(
        call(&mut other, Opcode::MemcpyDtoH, &p4, 4),
        Err(Status::NotFound)
    );
    assert_eq!(
        call(&mut other, Opcode::MemFree, &buf.to_le_bytes(), 0),
        Err(Status::NotFound)
    );
    // Unknown kernel; wrong parameter list.
    assert_eq!(
        call(
            &mut g,
            Opcode::Launch,
            &launch_payload(module, "no_such_kernel", 1, 1, vec![]),
            0
        ),
        Err(Status::NotFound)
    );
    assert_eq!(
        call(
            &mut g,
            Opcode::Launch,
            &launch_payload(module, "scale_add_f32", 1, 1, vec![Param::Buffer(buf)]),
            0
        ),
        Err(Status::BadRequest)
    );

    assert_eq!(
        call(&mut g, Opcode::ModuleUnload, &module.to_le_bytes(), 0),
        Ok(vec![])
    );
    assert_eq!(
        call(&mut g, Opcode::MemFree, &buf.to_le_bytes(), 0),
        Ok(vec![])
    );
    assert_eq!(
        call(&mut g, Opcode::MemFree, &buf.to_le_bytes(), 0),
        Err(Status::NotFound)
    );
    assert_eq!(
        call(&mut g, Opcode::MemcpyDtoH, &p, bytes as usize),
        Err(Status::NotFound)
    );
    // Built-in operations are unaffected.
    assert_eq!(
        call(
            &mut g,
            Opcode::ScalarAddI32,
            &gpu_common::scalar_payload(2, 2),
            4
        ),
        Ok(4i32.to_le_bytes().to_vec())
    );
}

/// 64 MiB copies through the daemon, both remoting opcodes and the CUDA
/// API's: the VM's memfd table went to its worker, so the bytes move
/// between guest pages and the device without crossing the worker's pipe
/// (the daemon's pipe-bytes counter stays at the size of the ranges).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn large_remoting_copies_do_not_cross_the_pipe() {
    const LEN: usize = 64 << 20;
    let (d, addr) = common::start_with_metrics("cuda", &[(1, "A", "high")], &[]);
    let mut g = big(&d, 1, 160, 66);
    let mut rng = Rng::seeded();
    let data: Vec<u8> = (0..LEN).map(|_| rng.next_u64() as u8).collect();
    let pipe =
        || common::scrape(&addr, r#"vgpu_gpu_worker_pipe_bytes_total{gpu="0"}"#).unwrap_or(-1.0);

    let buf = handle(&mut g, Opcode::MemAlloc, &(LEN as u64).to_le_bytes()).unwrap();
    let mut p = buf.to_le_bytes().to_vec();
    p.extend(0u64.to_le_bytes());
    p.extend(&data);
    assert_eq!(call(&mut g, Opcode::MemcpyHtoD, &p, 0), Ok(vec![]));
    let mut p = buf.to_le_bytes().to_vec();
    p.extend(0u64.to_le_bytes());
    p.extend((LEN as u64).to_le_bytes());
    let out = call(&mut g, Opcode::MemcpyDtoH, &p, LEN).unwrap();
    assert!(out == data, "MEMCPY_DTOH returned other bytes");

    // The CUDA API's copies (reply header, then data).
    let out = call(&mut g, Opcode::CuMemAlloc, &(LEN as u64).to_le_bytes(), 16).unwrap();
    assert_eq!(out[..4], 0u32.to_le_bytes(), "cuMemAlloc result");
    let dptr = u64::from_le_bytes(out[8..16].try_into().unwrap());
    let mut p = dptr.to_le_bytes().to_vec();
    p.extend(data.iter().rev());
    let out = call(&mut g, Opcode::CuMemcpyHtoD, &p, 8).unwrap();
    assert_eq!(out[..4], 0u32.to_le_bytes(), "cuMemcpyHtoD result");
    let mut p = dptr.to_le_bytes().to_vec();
    p.extend((LEN as u64).to_le_bytes());
    let out = call(&mut g, Opcode::CuMemcpyDtoH, &p, 8 + LEN).unwrap();
    assert_eq!(out[..4], 0u32.to_le_bytes(), "cuMemcpyDtoH result");
    assert!(
        out[8..].iter().eq(data.iter().rev()),
        "CU_MEMCPY_DTOH returned other bytes"
    );

    // Metrics are published once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let crossed = pipe();
    eprintln!("bytes through the worker's pipe for 4 x 64 MiB of copies: {crossed}");
    assert!(
        (0.0..65536.0).contains(&crossed),
        "{crossed} bytes crossed the pipe"
    );
}

/// A command buffer of `recs` (all on the default stream): (result, done).
fn run_records(g: &mut SimGuest, recs: &[vgpu::executor::cuda_api::Record]) -> (u32, u32) {
    use vgpu::executor::cuda_api as api;
    let mut b = Vec::new();
    for r in recs {
        api::encode_record(&mut b, 0, r);
    }
    let out = call(
        g,
        Opcode::CuCommandBuffer,
        &api::command_buffer_payload(recs.len() as u32, &b),
        api::REPLY_SIZE,
    )
    .expect("command buffer answered");
    let word = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
    (word(0), word(4))
}

/// CUDA API result and data of a call.
fn cu_call(g: &mut SimGuest, op: Opcode, payload: &[u8], out: usize) -> (u32, Vec<u8>) {
    let b = call(g, op, payload, 8 + out).expect("answered");
    (
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        b[8..].to_vec(),
    )
}

/// cuBLAS GEMM records (API version 2) on the GPU: the real cuBLAS computes
/// column-major C = alpha·op(A)·op(B) + beta·C on the VM's buffers (FP32 and
/// TF32), and a hostile record — a leading dimension whose extent leaves
/// the allocation, C spanning two allocations, an unknown address,
/// misalignment, negative m, an unsupported compute type — fails with its
/// CUresult, runs nothing, and leaves the worker serving.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cublas_gemm_records_run_on_checked_ranges() {
    use vgpu::executor::cuda_api::{self as api, blas, cu, Gemm, Record};
    let d = cuda_daemon(&[(1, "A", "high")], &[]);
    let mut g = big(&d, 1, 64, 8);
    let (r, info) = cu_call(&mut g, Opcode::CuDeviceInfo, &[], 4096);
    assert_eq!(r, 0);
    assert_eq!(u32::from_le_bytes(info[0..4].try_into().unwrap()), 2);
    let (r, v) = cu_call(&mut g, Opcode::CuBlasInit, &[], 4);
    assert_eq!(r, 0, "CU_BLAS_INIT");
    let version = u32::from_le_bytes(v[0..4].try_into().unwrap());
    assert!(version >= 130000, "cuBLAS version {version}");

    let (m, n, k) = (96i32, 40i32, 72i32);
    let mut rng = Rng::seeded();
    let a = rng.f32s((m * k) as usize); // m×k, ld m
    let b = rng.f32s((k * n) as usize); // k×n, ld k
    let c0 = rng.f32s((m * n) as usize);
    let alloc = |g: &mut SimGuest, data: &[f32]| {
        let (r, p) = cu_call(
            g,
            Opcode::CuMemAlloc,
            &(4 * data.len() as u64).to_le_bytes(),
            8,
        );
        assert_eq!(r, 0);
        let ptr = u64::from_le_bytes(p.try_into().unwrap());
        let mut h = ptr.to_le_bytes().to_vec();
        h.extend(f32_bytes(data));
        assert_eq!(cu_call(g, Opcode::CuMemcpyHtoD, &h, 0).0, 0);
        ptr
    };
    let (da, db, dc) = (alloc(&mut g, &a), alloc(&mut g, &b), alloc(&mut g, &c0));
    let read_c = |g: &mut SimGuest| {
        let mut p = dc.to_le_bytes().to_vec();
        p.extend((4 * c0.len() as u64).to_le_bytes());
        let (r, out) = cu_call(g, Opcode::CuMemcpyDtoH, &p, 4 * c0.len());
        assert_eq!(r, 0);
        f32s(&out)
    };
    let (alpha, beta) = (1.5f32, -0.5f32);
    let want: Vec<f64> = (0..(m * n) as usize)
        .map(|idx| {
            let (i, j) = (idx % m as usize, idx / m as usize);
            let dot: f64 = (0..k as usize)
                .map(|p| a[p * m as usize + i] as f64 * b[j * k as usize + p] as f64)
                .sum();
            alpha as f64 * dot + beta as f64 * c0[idx] as f64
        })
        .collect();
    let max_err = |got: &[f32]| {
        got.iter()
            .zip(&want)
            .map(|(&x, &w)| (x as f64 - w).abs() / (w.abs() + 1.0))
            .fold(0.0, f64::max)
    };
    let good = Gemm {
        op: blas::SGEMM,
        m,
        n,
        k,
        a: da,
        lda: m,
        b: db,
        ldb: k,
        c: dc,
        ldc: m,
        compute_type: blas::COMPUTE_32F,
        algo: blas::GEMM_DEFAULT,
        alpha: alpha.to_bits(),
        beta: beta.to_bits(),
        ..Default::default()
    };
    assert_eq!(
        run_records(&mut g, &[Record::Gemm(good)]),
        (0, api::ALL_DONE)
    );
    let e = max_err(&read_c(&mut g));
    assert!(e < 1e-5, "SGEMM FP32 error {e}");

    let hostile = [
        (
            "lda past the allocation",
            Gemm { lda: m + 1, ..good },
            cu::INVALID_VALUE,
        ),
        (
            "C spans two allocations",
            Gemm {
                c: db,
                ldc: m,
                ..good
            },
            cu::INVALID_VALUE,
        ),
        (
            "not an allocation",
            Gemm { a: 0x10, ..good },
            cu::INVALID_VALUE,
        ),
        ("misaligned", Gemm { b: db + 2, ..good }, cu::INVALID_VALUE),
        ("negative m", Gemm { m: -1, ..good }, cu::INVALID_VALUE),
        (
            "huge k",
            Gemm {
                k: i32::MAX,
                ldb: i32::MAX,
                ..good
            },
            cu::INVALID_VALUE,
        ),
        (
            "FP16 compute",
            Gemm {
                op: blas::GEMM_EX,
                compute_type: 64,
                ..good
            },
            cu::NOT_SUPPORTED,
        ),
    ];
    for (what, bad, code) in hostile {
        // The bad record stops the buffer: the good one after it never runs.
        let (r, done) = run_records(&mut g, &[Record::Gemm(bad), Record::Gemm(good)]);
        assert_eq!((r, done), (code, 0), "{what}");
    }
    // Nothing of those ran: C is as the first GEMM left it...
    let e = max_err(&read_c(&mut g));
    assert!(e < 1e-5, "C untouched by refused records ({e})");
    // ... and the worker still serves: TF32 through GemmEx, C rewritten
    // from C0 first (beta reads it).
    let mut h = dc.to_le_bytes().to_vec();
    h.extend(f32_bytes(&c0));
    let tf32 = Gemm {
        op: blas::GEMM_EX,
        compute_type: blas::COMPUTE_32F_FAST_TF32,
        ..good
    };
    assert_eq!(
        run_records(
            &mut g,
            &[
                Record::HtoD {
                    dst: dc,
                    data: &h[8..]
                },
                Record::Gemm(tf32)
            ]
        ),
        (0, api::ALL_DONE)
    );
    let e = max_err(&read_c(&mut g));
    assert!(e < 1e-2, "TF32 error {e}");
}
