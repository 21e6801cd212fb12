//! The worker's sandbox. A worker runs a guest's PTX through the CUDA
//! driver's JIT and launches it: a driver or JIT bug exploited by that code
//! must reach no more than that one VM's worker. So, before the worker reads
//! any guest request, it
//!
//! 1. closes every fd but stdin/stdout/stderr (the parent already marked all
//!    others close-on-exec with `close_range`, see [`mark_inherited_cloexec`]);
//! 2. sets `RLIMIT_CORE` 0, `RLIMIT_NOFILE` and `RLIMIT_AS` from the settings
//!    (`RLIMIT_AS`: the soft limit `rlimit_as`; the hard limit that plus
//!    `rlimit_as_guest`, the largest guest memory table, so that the worker
//!    can raise its soft limit by the size of the table it is given and map
//!    its VM's RAM, see `table.rs`, but never beyond);
//! 3. moves into the configured cgroup v2 directory (writes its pid);
//! 4. enters new network, mount, IPC and UTS namespaces (as root directly,
//!    otherwise inside a new user namespace; where the host forbids either,
//!    it logs and goes on: the seccomp filter below still holds);
//! 5. drops to the configured uid/gid (when started as root) and becomes
//!    non-dumpable;
//! 6. opens the GPU (done by the caller, `server.rs`: the driver needs files
//!    and threads the filter would not allow at every point);
//! 7. installs the seccomp filter ([`seccomp_filter`]) on all its threads.
//!
//! A PID namespace is not used: it applies only to children, and the
//! worker starts none (the filter denies fork and exec).

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as ArgLen, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

/// What the filter does with a syscall outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The syscall does not run; the worker reports its number on stderr and
    /// exits with [`SECCOMP_EXIT`].
    Enforce,
    /// The syscall runs and the kernel logs it (audit log / `dmesg`,
    /// `type=1326`): for finding what a new driver needs. Not a sandbox.
    Log,
    /// No filter.
    Off,
}

/// Exit status of a worker stopped by its seccomp filter.
pub const SECCOMP_EXIT: i32 = 159;

/// The sandbox settings (`[worker]` in config/vgpu.toml, which documents
/// each key). The parent hands them to the worker on its command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// Everything below; `false` runs the worker as the daemon runs.
    pub enabled: bool,
    /// The uid/gid a worker started as root drops to.
    pub uid: u32,
    pub gid: u32,
    /// New network, mount, IPC and UTS namespaces.
    pub namespaces: bool,
    /// Address-space limit in bytes; 0 leaves it as inherited.
    pub rlimit_as: u64,
    /// Bytes the limit may grow by to map the VM's guest memory table (the
    /// daemon's `max_guest_memory_mib`).
    #[serde(default)]
    pub rlimit_as_guest: u64,
    pub rlimit_nofile: u64,
    pub seccomp: SeccompMode,
    /// A cgroup v2 directory the worker moves into.
    pub cgroup: Option<PathBuf>,
    /// Run remoting even where the device reads pageable host memory.
    pub allow_pageable_memory_access: bool,
}

/// What [`enter`] did, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Entered {
    pub namespaces: bool,
    pub dropped_to: Option<(u32, u32)>,
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Called in the forked child before exec: every fd above stderr gets
/// close-on-exec, so the worker starts with none of the daemon's fds (guest
/// RAM memfds, eventfds, sockets) even where they lack `FD_CLOEXEC`.
/// Async-signal-safe (one syscall). An old kernel without `close_range`
/// is not an error: the worker closes them itself in [`enter`].
pub fn mark_inherited_cloexec() -> io::Result<()> {
    // SAFETY: close_range only changes fd flags of this (forked) process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `FD_CLOEXEC` on `fd` (one the daemon received without it).
pub fn set_cloexec(fd: std::os::fd::RawFd) {
    // SAFETY: F_GETFD/F_SETFD change only the flags of an fd the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Closes every fd above stderr.
pub fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: closes fds of this process; nothing in it holds them (called
    // first thing in the worker's main).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    // Kernels before 5.9: close the fds /proc lists.
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: as above; the read_dir fd is already closed.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    set_rlimits(resource, value, value)
}

fn set_rlimits(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: a valid rlimit for this process.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(os_err("setrlimit"));
    }
    Ok(())
}

fn write_file(path: &str, text: &str) -> io::Result<()> {
    std::fs::write(path, text).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// Steps 1 to 5 of the module doc. Must run while the process has one
/// thread (a user namespace requires it), before the GPU is opened.
pub fn enter(cfg: &SandboxConfig) -> io::Result<Entered> {
    close_inherited_fds()?;
    let mut done = Entered::default();
    if !cfg.enabled {
        return Ok(done);
    }
    set_rlimit(libc::RLIMIT_CORE, 0)?;
    set_rlimit(libc::RLIMIT_NOFILE, cfg.rlimit_nofile)?;
    if cfg.rlimit_as > 0 {
        let hard = cfg.rlimit_as.saturating_add(cfg.rlimit_as_guest);
        set_rlimits(libc::RLIMIT_AS, cfg.rlimit_as, hard)?;
    }
    if let Some(dir) = &cfg.cgroup {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", procs.display())))?;
    }
    // SAFETY: geteuid/getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if cfg.namespaces {
        let ns = libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        done.namespaces = if euid == 0 {
            // SAFETY: unshare changes only this process's namespaces.
            unsafe { libc::unshare(ns) == 0 }
        } else {
            // SAFETY: as above; the process has one thread.
            let entered = unsafe { libc::unshare(libc::CLONE_NEWUSER | ns) == 0 };
            entered && map_ids(euid, egid).is_ok()
        };
        if !done.namespaces {
            log::warn!(
                "worker: no new namespaces ({}); going on with the rest of the sandbox",
                io::Error::last_os_error()
            );
        } else {
            // Mounts made in here stay in here.
            let root = c"/";
            // SAFETY: valid C strings; changes propagation in the new
            // mount namespace only.
            unsafe {
                libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            };
        }
    }
    if euid == 0 {
        drop_privileges(cfg.uid, cfg.gid)?;
        done.dropped_to = Some((cfg.uid, cfg.gid));
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    Ok(done)
}

/// Sets the soft address-space limit (at most the hard one, which only
/// [`enter`] sets): the worker sizes it to its guest memory table.
pub fn set_soft_rlimit_as(soft: u64) -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // prlimit64 is the one rlimit syscall the filter allows.
    // SAFETY: pid 0 is this process; a valid rlimit to fill.
    if unsafe { libc::prlimit(0, libc::RLIMIT_AS, std::ptr::null(), &mut lim) } != 0 {
        return Err(os_err("prlimit"));
    }
    let new = libc::rlimit {
        rlim_cur: soft.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above, setting only.
    if unsafe { libc::prlimit(0, libc::RLIMIT_AS, &new, std::ptr::null_mut()) } != 0 {
        return Err(os_err("prlimit"));
    }
    Ok(())
}

/// In a new user namespace: the worker keeps its own ids (mapped 1:1).
fn map_ids(uid: u32, gid: u32) -> io::Result<()> {
    write_file("/proc/self/setgroups", "deny")?;
    write_file("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
    write_file("/proc/self/gid_map", &format!("{gid} {gid} 1"))
}

fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain credential syscalls of a single-threaded process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_err("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(os_err("setresgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(os_err("setresuid"));
        }
        // Root must be out of reach for good.
        if libc::setuid(0) == 0 && uid != 0 {
            return Err(io::Error::other(
                "setuid(0) still works after dropping root",
            ));
        }
    }
    Ok(())
}

/// The syscalls a Rust program with glibc and the CUDA driver's threads make
/// once the GPU is open: memory, files (the driver opens `/dev/nvidia*` and
/// reads `/proc` and `/sys` as it goes), ioctls on its devices, futexes,
/// time, signals, threads; `recvmsg` on the socket that is its stdin, for
/// the fds of its VM's memory table (see `table.rs`; it maps them with the
/// `mmap` already here). Everything else is denied; in particular
/// `execve`/`execveat`, `fork`/`vfork` and `clone` without `CLONE_THREAD`,
/// `socket`/`socketpair`/`connect`, `ptrace`, `process_vm_readv/writev`,
/// `kill` (only `tgkill` of itself stays), `mount`, `unshare`/`setns`,
/// `bpf`, `userfaultfd`, `io_uring_*`, `keyctl`, `perf_event_open`.
const ALLOWED: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_recvmsg,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_stat,
    libc::SYS_fstat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_flock,
    libc::SYS_fadvise64,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_memfd_create,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_ioctl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_munlock,
    libc::SYS_brk,
    libc::SYS_get_mempolicy,
    libc::SYS_set_mempolicy,
    libc::SYS_mbind,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_rseq,
    libc::SYS_membarrier,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getpriority,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_times,
    libc::SYS_getcpu,
    libc::SYS_sched_getattr,
    libc::SYS_getrusage,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrandom,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, ArgLen::Qword, op, value)
}

/// The filters the worker installs, in order: one answers `clone3` with
/// ENOSYS (its flags are out of a filter's reach, and glibc then creates
/// threads with `clone`, whose flags the allow-list checks), one `socket`
/// with EACCES, and the allow-list (anything else: the mode's action).
/// Where filters disagree the stricter answer wins.
pub fn seccomp_filter(mode: SeccompMode, pid: u32) -> Result<Vec<BpfProgram>, seccompiler::Error> {
    let denied = match mode {
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(Vec::new()),
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let rule = |c: Vec<SeccompCondition>| SeccompRule::new(c);
    // Threads only: a clone without CLONE_THREAD would be a new process.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, Op::MaskedEq(thread), thread)?])?],
    );
    rules.insert(libc::SYS_clone3, Vec::new());
    rules.insert(libc::SYS_socket, Vec::new());
    // Signals to its own threads only (abort, thread wake-ups).
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Op::Eq, u64::from(pid))?])?],
    );
    // prctl, but not to become dumpable or traceable again.
    rules.insert(
        libc::SYS_prctl,
        vec![rule(vec![
            cond(0, Op::Ne, libc::PR_SET_DUMPABLE as u64)?,
            cond(0, Op::Ne, libc::PR_SET_PTRACER as u64)?,
            cond(0, Op::Ne, libc::PR_SET_SECCOMP as u64)?,
        ])?],
    );
    let allow = SeccompFilter::new(rules, denied, SeccompAction::Allow, arch)?;
    let only = |nr: i64| -> BTreeMap<i64, Vec<SeccompRule>> { [(nr, Vec::new())].into() };
    let enosys = SeccompFilter::new(
        only(libc::SYS_clone3),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let eacces = SeccompFilter::new(
        only(libc::SYS_socket),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )?;
    // The allow-list goes last: it denies seccomp() itself.
    Ok(vec![
        enosys.try_into()?,
        eacces.try_into()?,
        allow.try_into()?,
    ])
}

/// SIGSYS handler of [`SeccompMode::Enforce`]: says which syscall was
/// denied and ends the process (a denied syscall never ran).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo_t's SIGSYS fields (si_call_addr, si_syscall) follow the
    // common header: on 64-bit Linux, si_syscall is the int at byte 24.
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let msg = b"vgpu-cuda-worker: seccomp denied syscall ";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::write(2, digits[i..].as_ptr().cast(), digits.len() - i);
        libc::write(2, b"\n".as_ptr().cast(), 1);
        libc::_exit(SECCOMP_EXIT);
    }
}

/// Step 7: installs the filters on every thread of the process.
pub fn install_seccomp(mode: SeccompMode) -> io::Result<()> {
    let filters = seccomp_filter(mode, std::process::id())
        .map_err(|e| io::Error::other(format!("seccomp filter: {e}")))?;
    if filters.is_empty() {
        return Ok(());
    }
    if mode == SeccompMode::Enforce {
        // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(os_err("sigaction(SIGSYS)"));
            }
        }
    }
    for f in &filters {
        seccompiler::apply_filter_all_threads(f)
            .map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    }
    Ok(())
}

/// The syscalls a probe tries ([`probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// Reports the open fds, uid and gid on stdout, then waits for stdin
    /// to close (so that the parent can look at the process).
    Report,
    /// `execve("/bin/true")`.
    Execve,
    /// `socket(AF_INET, SOCK_STREAM)`.
    Socket,
    /// `ptrace(PTRACE_ATTACH, parent)`.
    Ptrace,
    /// `fork()`.
    Fork,
}

/// Test-only helper of the worker binary, selected by its command line
/// (which only the parent writes, never a guest): runs one probe inside
/// the sandbox and prints what happened. Returns the exit status.
pub fn probe(p: Probe) -> i32 {
    use std::io::{Read, Write};
    let mut out = io::stdout().lock();
    let r: i64 = match p {
        Probe::Report => {
            let open: Vec<String> = (0..4096)
                // SAFETY: F_GETFD only reads the fd's flags.
                .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
                .map(|fd| fd.to_string())
                .collect();
            // SAFETY: no preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            let _ = writeln!(out, "fds={} uid={uid} gid={gid}", open.join(","));
            let _ = out.flush();
            let mut rest = Vec::new();
            let _ = io::stdin().read_to_end(&mut rest);
            return 0;
        }
        Probe::Execve => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and arrays.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) }.into()
        }
        // SAFETY: plain syscalls; a new socket or child is the test's subject.
        Probe::Socket => unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }.into(),
        // SAFETY: as above.
        Probe::Ptrace => unsafe { libc::ptrace(libc::PTRACE_ATTACH, libc::getppid(), 0, 0) },
        Probe::Fork => {
            // SAFETY: the child exits at once.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: in the child.
                unsafe { libc::_exit(0) };
            }
            pid.into()
        }
    };
    let err = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let _ = writeln!(out, "ret={r} errno={err}");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_for_every_mode() {
        assert_eq!(seccomp_filter(SeccompMode::Enforce, 1).unwrap().len(), 3);
        assert_eq!(seccomp_filter(SeccompMode::Log, 1).unwrap().len(), 3);
        assert!(seccomp_filter(SeccompMode::Off, 1).unwrap().is_empty());
    }

    #[test]
    fn the_allow_list_leaves_out_what_escapes() {
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_kill,
            libc::SYS_connect,
            libc::SYS_socketpair,
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_perf_event_open,
            libc::SYS_keyctl,
        ] {
            assert!(!ALLOWED.contains(&nr), "syscall {nr} must not be allowed");
        }
    }
}
