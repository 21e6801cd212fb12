//! Helpers shared by the GPU tests and the GPU benchmark: requests built over
//! anonymous guest memory, payload encoders, a small PRNG.

use std::sync::Arc;

use vgpu::config::VmDefaults;
use vgpu::executor::{Request, Tenant};
use vgpu::guest::{GuestBufs, GuestMem};
use vgpu::protocol::Opcode;
use vm_memory::GuestAddress;

/// Guest memory with a bump allocator for payloads and outputs.
pub struct Guest {
    pub mem: Arc<GuestMem>,
    next: u64,
    end: u64,
    quota: u64,
}

/// A request and the VM it runs for, as the scheduler hands them to an
/// executor.
pub struct Call {
    pub tenant: Tenant,
    pub req: Request,
}

impl std::ops::Deref for Call {
    type Target = Request;
    fn deref(&self) -> &Request {
        &self.req
    }
}

/// The embedded default quota (config/vgpu.toml), in bytes.
pub fn default_quota() -> u64 {
    VmDefaults::embedded()
        .map(|d| d.gpu_mem_quota_mib << 20)
        .unwrap_or(0)
}

impl Guest {
    /// `size` bytes of guest RAM in two regions (so that buffers may straddle
    /// a region boundary).
    pub fn new(size: usize) -> Guest {
        let half = (size / 2) & !0xfff;
        let mem = vgpu::guest::anonymous_memory(&[(0, half), (half as u64, size - half)])
            .expect("anonymous guest memory");
        Guest {
            mem,
            next: 0x1000,
            end: size as u64,
            quota: default_quota(),
        }
    }

    pub fn reset(&mut self) {
        self.next = 0x1000;
    }

    /// A view of `len` fresh bytes, split into two descriptors when `split`.
    pub fn alloc(&mut self, len: usize, split: bool) -> GuestBufs {
        let mut b = GuestBufs::new(self.mem.clone());
        let start = self.next;
        assert!(
            start + len as u64 + 0x2000 <= self.end,
            "test guest memory full"
        );
        if split && len > 1 {
            let first = len / 3;
            b.push(GuestAddress(start), first).unwrap();
            // A gap between the two descriptors.
            b.push(GuestAddress(start + first as u64 + 64), len - first)
                .unwrap();
            self.next = (start + len as u64 + 64 + 0xfff) & !0xfff;
        } else {
            b.push(GuestAddress(start), len).unwrap();
            self.next = (start + len as u64 + 0xfff) & !0xfff;
        }
        b
    }

    /// The device-memory quota of the VMs this guest's requests run for.
    pub fn set_quota(&mut self, bytes: u64) {
        self.quota = bytes;
    }

    /// A request of VM `vm_id` with `payload` written into guest memory and
    /// `out_len` output bytes.
    pub fn request(&mut self, vm_id: u32, op: Opcode, payload: &[u8], out_len: usize) -> Call {
        let p = self.alloc(payload.len(), true);
        p.write_at(0, payload).unwrap();
        let o = self.alloc(out_len, true);
        Call {
            tenant: Tenant {
                vm_id,
                gpu_mem_quota: self.quota,
            },
            req: Request {
                opcode: op,
                tag: 1,
                payload: p,
                output: o,
            },
        }
    }
}

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        eprintln!("rng seed {t}");
        Rng::new(t)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn vector_add_payload(a: &[f32], b: &[f32]) -> Vec<u8> {
    let mut p = (a.len() as u32).to_le_bytes().to_vec();
    p.extend(0u32.to_le_bytes());
    p.extend(f32_bytes(a));
    p.extend(f32_bytes(b));
    p
}

pub fn saxpy_payload(a: f32, x: &[f32], y: &[f32]) -> Vec<u8> {
    let mut p = (x.len() as u32).to_le_bytes().to_vec();
    p.extend(a.to_le_bytes());
    p.extend(f32_bytes(x));
    p.extend(f32_bytes(y));
    p
}

pub fn sgemm_payload(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<u8> {
    let mut p = Vec::with_capacity(12 + 4 * (a.len() + b.len()));
    for v in [m as u32, n as u32, k as u32] {
        p.extend(v.to_le_bytes());
    }
    p.extend(f32_bytes(a));
    p.extend(f32_bytes(b));
    p
}

pub fn scalar_payload(a: i32, b: i32) -> Vec<u8> {
    let mut p = a.to_le_bytes().to_vec();
    p.extend(b.to_le_bytes());
    p
}

fn wait_readable(fd: &vmm_sys_util::eventfd::EventFd) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, -1) };
    let _ = fd.read();
}

/// Round trips of two threads bouncing a token through two eventfds, each
/// blocking in poll as a guest waiting for its interrupt and a backend
/// waiting for its kick do: the floor of a kick/call round trip without
/// polling, measured on the machine the benchmark runs on.
pub fn eventfd_pingpong(iterations: usize) -> std::io::Result<Vec<std::time::Duration>> {
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let ping = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let pong = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (p2, q2) = (ping.clone(), pong.clone());
    let echo = std::thread::spawn(move || {
        for _ in 0..iterations {
            wait_readable(&p2);
            let _ = q2.write(1);
        }
    });
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = std::time::Instant::now();
        ping.write(1)?;
        wait_readable(&pong);
        samples.push(t.elapsed());
    }
    echo.join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))?;
    Ok(samples)
}

/// CPU time (user + system) this process has used so far.
pub fn process_cpu_time() -> std::time::Duration {
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return std::time::Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec.max(0) as u64)
            + std::time::Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
