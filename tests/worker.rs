//! The CUDA remoting worker process as the daemon starts it: the real
//! `vgpu-cuda-worker` binary, started by the real client
//! (`vgpu::executor::worker`) with the sandbox of config/vgpu.toml. Without
//! a GPU the worker answers UNSUPPORTED, so these tests cover what does not
//! need one: what the sandboxed process can and cannot do, which fds it
//! has, and the warm spare's life (start, handover, replacement). The GPU
//! side (the filter against the real driver) is in tests/gpu.rs.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vgpu::executor::worker::{
    sandbox::SECCOMP_EXIT, Launcher, Probe, VmWorker, Worker, WorkerConfig,
};
use vgpu::protocol::{Opcode, Status};
use vgpu_sim::workload::Guest;

const LIMIT: Duration = Duration::from_secs(10);

fn worker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vgpu-cuda-worker"))
}

fn no_gpu() -> bool {
    if vgpu::executor::cuda::driver_present() {
        eprintln!("libcuda present: tests/gpu.rs covers the worker here");
        return false;
    }
    true
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `probe` in a sandboxed worker; its stdout and exit code.
fn probe(p: Probe) -> (String, Option<i32>) {
    let cfg = WorkerConfig::embedded();
    // The client starts a probe exactly as it starts a worker.
    let mut worker = Worker::spawn(&worker_bin(), 0, &cfg.sandbox, Some(p)).unwrap();
    let out = read_all_stdout(&mut worker);
    let code = wait_exit(&mut worker);
    (out, code)
}

fn read_all_stdout(w: &mut Worker) -> String {
    let mut s = String::new();
    let _ = w.stdout_mut().read_to_string(&mut s);
    s
}

fn wait_exit(w: &mut Worker) -> Option<i32> {
    let end = Instant::now() + LIMIT;
    while Instant::now() < end {
        if let Some(st) = w.exited() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("worker {} did not exit", w.pid());
}

#[test]
fn forbidden_syscalls_stop_the_sandboxed_worker() {
    for p in [Probe::Execve, Probe::Ptrace, Probe::Fork] {
        let (out, code) = probe(p);
        assert_eq!(code, Some(SECCOMP_EXIT), "{p:?} was not stopped: {out}");
        assert!(!out.contains("ret="), "{p:?} returned: {out}");
    }
    // socket() answers EACCES rather than killing (a driver may probe it).
    let (out, code) = probe(Probe::Socket);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), format!("ret=-1 errno={}", libc::EACCES));
}

#[test]
fn the_worker_inherits_no_fd_and_drops_root() {
    // Stand-ins for guest RAM and an eventfd as the daemon receives them:
    // without CLOEXEC.
    // SAFETY: plain fd-creating syscalls; the fds are closed below.
    let (memfd, evfd) = unsafe {
        (
            libc::memfd_create(c"guest-ram".as_ptr(), 0),
            libc::eventfd(0, 0),
        )
    };
    assert!(memfd > 2 && evfd > 2);
    let cfg = WorkerConfig::embedded();
    let mut w = Worker::spawn(&worker_bin(), 0, &cfg.sandbox, Some(Probe::Report)).unwrap();
    let pid = w.pid();
    let mut line = String::new();
    BufReader::new(w.stdout_mut()).read_line(&mut line).unwrap();
    // SAFETY: our own fds, not used after this.
    drop(unsafe {
        (
            std::fs::File::from_raw_fd(memfd),
            std::fs::File::from_raw_fd(evfd),
        )
    });
    let mut fields = line.split_whitespace();
    assert_eq!(fields.next(), Some("fds=0,1,2"), "{line}");
    if is_root() {
        let (uid, gid) = (cfg.sandbox.uid, cfg.sandbox.gid);
        assert_eq!(fields.next(), Some(format!("uid={uid}").as_str()), "{line}");
        assert_eq!(fields.next(), Some(format!("gid={gid}").as_str()), "{line}");
        // Seen from outside: the same three fds, and its own network
        // namespace where the host allows one.
        let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let mut fds: Vec<String> = std::fs::read_dir(&fd_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        fds.sort();
        assert_eq!(fds, ["0", "1", "2"]);
        let ns = |p: &str| std::fs::read_link(p).ok();
        let (ours, theirs) = (ns("/proc/self/ns/net"), ns(&format!("/proc/{pid}/ns/net")));
        if unshare_allowed() {
            assert_ne!(ours, theirs, "the worker shares the daemon's network");
        }
    }
    drop(w);
}

/// Whether this host lets a root process create a network namespace (a
/// container may not).
fn unshare_allowed() -> bool {
    Command::new("unshare")
        .args(["--net", "true"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn alloc_call(g: &mut Guest, vm: u32) -> vgpu_sim::workload::Call {
    g.request(vm, Opcode::MemAlloc, &4096u64.to_le_bytes(), 8)
}

#[test]
fn a_sandboxed_worker_without_gpu_answers_unsupported() {
    if !no_gpu() {
        return;
    }
    let mut cfg = WorkerConfig::embedded();
    assert!(cfg.sandbox.enabled);
    cfg.spares = 0;
    let mut launcher = Launcher::new(&worker_bin(), 0, cfg);
    let mut g = Guest::new(1 << 20);
    let mut vm = VmWorker::default();
    let call = alloc_call(&mut g, 1);
    let (res, taken) = vm.execute(&mut launcher, call.tenant, &call, LIMIT);
    assert_eq!(res, Err(Status::Unsupported));
    assert!(taken);
    // The same worker answers the next call too: no fault, no new process.
    let pid = vm.pid();
    let (res, taken) = vm.execute(&mut launcher, call.tenant, &call, LIMIT);
    assert_eq!((res, taken), (Err(Status::Unsupported), false));
    assert_eq!(vm.pid(), pid);
}

fn kill_and_reap_wait(pid: u32) {
    // SAFETY: a worker this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // Dead once it is a zombie (its parent, this process, reaps it).
    let end = Instant::now() + LIMIT;
    let stat = PathBuf::from(format!("/proc/{pid}/stat"));
    while Instant::now() < end {
        match std::fs::read_to_string(&stat) {
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return
            }
            Err(_) => return,
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    panic!("worker {pid} did not die");
}

#[test]
fn spares_are_handed_over_replaced_and_never_handed_over_dead() {
    if !no_gpu() {
        return;
    }
    // One spare, so that each step names the spare it hands over.
    let mut cfg = WorkerConfig::embedded();
    assert!(cfg.spares >= 1);
    cfg.spares = 1;
    let mut launcher = Launcher::new(&worker_bin(), 0, cfg);
    let first_spare = launcher.spare_pid().expect("a spare at start");
    let mut g = Guest::new(1 << 20);
    let call = alloc_call(&mut g, 1);

    // Handover: VM 1's first call runs in the spare; a new spare follows.
    let mut vm1 = VmWorker::default();
    let (res, taken) = vm1.execute(&mut launcher, call.tenant, &call, LIMIT);
    assert_eq!((res, taken), (Err(Status::Unsupported), true));
    assert_eq!(vm1.pid(), Some(first_spare));
    let second_spare = launcher.spare_pid().expect("a new spare");
    assert_ne!(second_spare, first_spare);
    assert_eq!(launcher.handed_over, 1);

    // After a fault (here: VM 1's worker dies), VM 1's next call fails with
    // DEVICE_ERROR, and the one after runs in the spare.
    kill_and_reap_wait(first_spare);
    let (res, _) = vm1.execute(&mut launcher, call.tenant, &call, LIMIT);
    assert_eq!(res, Err(Status::DeviceError));
    assert_eq!(vm1.pid(), None);
    let (res, taken) = vm1.execute(&mut launcher, call.tenant, &call, LIMIT);
    assert_eq!((res, taken), (Err(Status::Unsupported), true));
    assert_eq!(vm1.pid(), Some(second_spare));
    assert_eq!(launcher.handed_over, 2);

    // A spare that died is replaced, never handed over.
    let third_spare = launcher.spare_pid().expect("a new spare");
    kill_and_reap_wait(third_spare);
    let mut vm2 = VmWorker::default();
    let call2 = alloc_call(&mut g, 2);
    let (res, taken) = vm2.execute(&mut launcher, call2.tenant, &call2, LIMIT);
    assert_eq!((res, taken), (Err(Status::Unsupported), true));
    let vm2_pid = vm2.pid().expect("vm2 has a worker");
    assert_ne!(vm2_pid, third_spare);
    assert_eq!(launcher.found_dead, 1);
    assert_eq!(launcher.handed_over, 2);
    let fourth = launcher.spare_pid().expect("a spare again");
    assert!(![first_spare, second_spare, third_spare, vm2_pid].contains(&fourth));
}

/// The handover's cost on this machine (no GPU: the worker's warm-up is its
/// process start and sandbox only; on the GPU it includes CUDA init and the
/// context, which the spare has already paid for). Printed, not asserted.
#[test]
fn measure_first_call_warm_and_cold() {
    if !no_gpu() {
        return;
    }
    let mut g = Guest::new(1 << 20);
    let call = alloc_call(&mut g, 1);
    for spare in [true, false] {
        let mut cfg = WorkerConfig::embedded();
        cfg.spares = usize::from(spare);
        let mut launcher = Launcher::new(&worker_bin(), 0, cfg);
        if spare {
            // Let the spare finish its warm-up, as it would between VMs.
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut vm = VmWorker::default();
        let t = Instant::now();
        let (res, _) = vm.execute(&mut launcher, call.tenant, &call, LIMIT);
        let took = t.elapsed();
        assert_eq!(res, Err(Status::Unsupported));
        eprintln!(
            "MEASURE first remoting call, {} worker: {:.3} ms",
            if spare { "spare" } else { "cold" },
            took.as_secs_f64() * 1e3
        );
    }
}

/// The cgroup v2 mount of this host, when there is one we may create in.
fn cgroup2_dir() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let root = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))?;
    let dir = root.join(format!("vgpu-worker-test-{}", std::process::id()));
    std::fs::create_dir(&dir).ok()?;
    Some(dir)
}

#[test]
fn the_worker_moves_into_its_cgroup() {
    let Some(dir) = cgroup2_dir() else {
        eprintln!("no cgroup v2 directory can be created here: skipped");
        return;
    };
    let mut cfg = WorkerConfig::embedded();
    cfg.sandbox.cgroup = Some(dir.clone());
    let mut w = Worker::spawn(&worker_bin(), 0, &cfg.sandbox, Some(Probe::Report)).unwrap();
    let mut line = String::new();
    BufReader::new(w.stdout_mut()).read_line(&mut line).unwrap();
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
    let pid = w.pid();
    drop(w);
    let _ = std::fs::remove_dir(&dir);
    assert!(line.starts_with("fds="), "{line}");
    assert_eq!(procs.trim(), pid.to_string());
}

/// Guest RAM as the daemon gets it from a frontend: one memfd per region.
fn memfd_memory(regions: &[(u64, usize)]) -> std::sync::Arc<vgpu::guest::GuestMem> {
    use vm_memory::{FileOffset, GuestAddress};
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(addr, len)| {
            // SAFETY: a NUL-terminated name; the fd is owned by the File.
            let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a fresh fd of ours.
            let f = unsafe { std::fs::File::from_raw_fd(fd) };
            f.set_len(len as u64).unwrap();
            (GuestAddress(addr), len, Some(FileOffset::new(f, 0)))
        })
        .collect();
    std::sync::Arc::new(vgpu::guest::GuestMem::from_ranges_with_files(ranges).unwrap())
}

fn guest_request(
    mem: &std::sync::Arc<vgpu::guest::GuestMem>,
    payload: (u64, usize),
    output: (u64, usize),
) -> vgpu::executor::Request {
    use vgpu::guest::GuestBufs;
    use vm_memory::GuestAddress;
    let view = |(addr, len): (u64, usize)| {
        let mut b = GuestBufs::new(mem.clone());
        b.push(GuestAddress(addr), len).unwrap();
        b
    };
    vgpu::executor::Request {
        opcode: Opcode::MemcpyDtoH,
        tag: 1,
        payload: view(payload),
        output: view(output),
    }
}

/// What a sandboxed worker can touch of guest memory: the table its parent
/// passes it (over its socket, under the seccomp filter and an address-space
/// limit sized by the table), and within it only the ranges that lie in it:
/// a range of another VM's memory, or past the end of a region, is refused
/// by the worker's own check whatever its parent sends.
#[test]
fn the_worker_touches_only_the_memory_table_it_was_given() {
    if !no_gpu() {
        return;
    }
    let deadline = || Instant::now() + LIMIT;
    let vm1 = memfd_memory(&[(0, 2 << 20), (1 << 32, 1 << 20)]);
    let vm2 = memfd_memory(&[(0x4000_0000, 1 << 20)]);
    let mut cfg = WorkerConfig::embedded();
    assert!(cfg.sandbox.enabled);
    // A small address space: the table must fit the allowance on top.
    cfg.sandbox.rlimit_as = 1 << 30;
    cfg.sandbox.rlimit_as_guest = 4 << 20;
    let mut w = Worker::spawn(&worker_bin(), 0, &cfg.sandbox, None).unwrap();
    w.assign(1, 1).unwrap();
    assert_eq!(w.send_table(&vm1, true, deadline()).unwrap(), Status::Ok);
    let t = vgpu::executor::Tenant {
        vm_id: 1,
        gpu_mem_quota: 1 << 20,
    };
    // In VM 1's table: past the worker's check, to the executor (none
    // without a GPU: its ready status).
    for (p, o) in [
        ((0x1000, 24), (0x2000, 4096)),
        ((1 << 32, 24), ((2 << 20) - 4096, 4096)),
    ] {
        let req = guest_request(&vm1, p, o);
        assert_eq!(
            w.call_guest(t, &req, deadline()).unwrap(),
            (Status::Unsupported, 0)
        );
    }
    // VM 2's memory is not in the table: refused by the worker itself.
    let req = guest_request(&vm2, (0x4000_0000, 24), (0x4000_1000, 8));
    assert_eq!(
        w.call_guest(t, &req, deadline()).unwrap(),
        (Status::BadRequest, 0)
    );
    // A range valid in a larger table (the parent's bug or a lie) but past
    // the end of VM 1's second region.
    let big = memfd_memory(&[(1 << 32, 2 << 20)]);
    let req = guest_request(&big, ((1 << 32) + (1 << 20) - 8, 24), (1 << 32, 8));
    assert_eq!(
        w.call_guest(t, &req, deadline()).unwrap(),
        (Status::BadRequest, 0)
    );
    // A table larger than the address-space allowance is refused; the
    // worker keeps serving (no seccomp stop, no crash) without a table.
    let huge = memfd_memory(&[(0, 8 << 20)]);
    assert_eq!(
        w.send_table(&huge, true, deadline()).unwrap(),
        Status::BadRequest
    );
    let req = guest_request(&vm1, (0x1000, 24), (0x2000, 8));
    assert_eq!(
        w.call_guest(t, &req, deadline()).unwrap(),
        (Status::BadRequest, 0)
    );
    // And a table that fits is taken again.
    assert_eq!(w.send_table(&vm2, false, deadline()).unwrap(), Status::Ok);
    let req = guest_request(&vm2, (0x4000_0000, 24), (0x4000_1000, 8));
    assert_eq!(
        w.call_guest(t, &req, deadline()).unwrap(),
        (Status::Unsupported, 0)
    );
    assert!(w.exited().is_none(), "the worker died: {:?}", w.exited());
    // Anonymous memory has no fds to pass: the pipe path stays.
    let anon = vgpu::guest::anonymous_memory(&[(0, 1 << 20)]).unwrap();
    assert_eq!(
        w.send_table(&anon, true, deadline()).unwrap(),
        Status::Unsupported
    );
}

/// Through the client as the daemon uses it: with a memfd table the calls
/// cross the pipe as guest ranges only (a few bytes each), however large
/// the copy; with anonymous memory the bytes themselves cross.
#[test]
fn with_a_memfd_table_only_ranges_cross_the_pipe() {
    if !no_gpu() {
        return;
    }
    let mut cfg = WorkerConfig::embedded();
    cfg.spares = 0;
    let mut launcher = Launcher::new(&worker_bin(), 0, cfg);
    let t = vgpu::executor::Tenant {
        vm_id: 1,
        gpu_mem_quota: 1 << 30,
    };
    let mem = memfd_memory(&[(0, 32 << 20)]);
    let mut req = guest_request(&mem, (0x1000, 16 + (8 << 20)), (0x100_0000, 0));
    req.opcode = Opcode::MemcpyHtoD;
    let mut vm = VmWorker::default();
    vm.set_register(true);
    for _ in 0..3 {
        // No GPU here: UNSUPPORTED, but decided in the worker after the
        // call crossed, as ranges.
        let (res, _) = vm.execute(&mut launcher, t, &req, LIMIT);
        assert_eq!(res, Err(Status::Unsupported));
    }
    assert!(vm.pipe_bytes() < 3 * 64, "{} bytes", vm.pipe_bytes());
    let mut g = Guest::new(16 << 20);
    let mut anon = g.request(1, Opcode::MemcpyHtoD, &vec![0u8; 16 + (1 << 20)], 0);
    anon.tenant = t;
    let mut vm = VmWorker::default();
    let (res, _) = vm.execute(&mut launcher, anon.tenant, &anon, LIMIT);
    assert_eq!(res, Err(Status::Unsupported));
    assert!(vm.pipe_bytes() >= 1 << 20, "{} bytes", vm.pipe_bytes());
}
