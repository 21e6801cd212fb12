//! How requests reach the vgpu device. Chosen by environment:
//!
//! * `VGPU_SOCKET=/path/vm.sock`: the library is itself a vhost-user
//!   frontend on the daemon's socket for one VM (memfd guest memory, one
//!   split ring; `vgpu-sim`'s `SimGuest`). For host-side tests and for
//!   containers on the host.
//! * otherwise `VGPU_DEVICE` (default `/dev/vgpu0`): the guest driver's
//!   character device, one `VGPU_IOC_SUBMIT` ioctl per request.

use std::path::PathBuf;
use std::time::Duration;

use vgpu::protocol::{Opcode, ReqHdr, RespHdr, SubmitIoctl, VGPU_IOC_SUBMIT};
use vgpu_sim::{SimGuest, SimOptions, DATA_BASE};

/// Largest request plus response a transport carries (payload + output).
pub const MAX_EXCHANGE: usize = 160 << 20;
/// How long one request may take before the library gives up on it.
const TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct Answer {
    pub status: u32,
    pub output: Vec<u8>,
}

pub trait Transport: Send {
    /// Sends one request and waits for its answer.
    fn call(&mut self, opcode: Opcode, payload: &[u8], out_cap: usize) -> Result<Answer, String>;
}

/// Opens the transport the environment names.
pub fn open() -> Result<Box<dyn Transport>, String> {
    if let Some(sock) = std::env::var_os("VGPU_SOCKET") {
        return Ok(Box::new(SocketTransport::connect(PathBuf::from(sock))?));
    }
    let dev = std::env::var_os("VGPU_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/vgpu0"));
    Ok(Box::new(DeviceTransport::open(dev)?))
}

/// User-space vhost-user frontend.
pub struct SocketTransport {
    guest: SimGuest,
    tag: u64,
}

impl SocketTransport {
    pub fn connect(path: PathBuf) -> Result<Self, String> {
        let opts = SimOptions {
            mem_size: DATA_BASE as usize + MAX_EXCHANGE + (1 << 20),
            queue_size: 16,
            event_idx: true,
            slot_size: MAX_EXCHANGE,
            backend_channel: false,
            seal: true,
        };
        let guest =
            SimGuest::connect(&path, opts).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(SocketTransport { guest, tag: 0 })
    }
}

impl Transport for SocketTransport {
    fn call(&mut self, opcode: Opcode, payload: &[u8], out_cap: usize) -> Result<Answer, String> {
        self.tag += 1;
        let len = u32::try_from(payload.len()).map_err(|_| "payload too large".to_string())?;
        let hdr = ReqHdr::new(opcode as u16, self.tag, len);
        let head = self
            .guest
            .submit(0, &hdr, payload, out_cap)
            .map_err(|e| e.to_string())?;
        self.guest.kick().map_err(|e| e.to_string())?;
        self.guest
            .wait_all(&[head], TIMEOUT)
            .map_err(|e| e.to_string())?;
        let (resp, output) = self
            .guest
            .response(0, payload.len(), out_cap)
            .map_err(|e| e.to_string())?;
        Ok(Answer {
            status: resp.status,
            output,
        })
    }
}

/// The guest driver's `/dev/vgpuN`.
pub struct DeviceTransport {
    fd: std::fs::File,
    tag: u64,
}

impl DeviceTransport {
    pub fn open(path: PathBuf) -> Result<Self, String> {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(DeviceTransport { fd, tag: 0 })
    }
}

impl Transport for DeviceTransport {
    fn call(&mut self, opcode: Opcode, payload: &[u8], out_cap: usize) -> Result<Answer, String> {
        use std::os::fd::AsRawFd;
        self.tag += 1;
        let mut output = vec![0u8; out_cap];
        let mut s = SubmitIoctl {
            opcode: opcode as u16,
            tag: self.tag,
            payload: payload.as_ptr() as u64,
            payload_len: u32::try_from(payload.len()).map_err(|_| "payload too large")?,
            output_cap: u32::try_from(out_cap).map_err(|_| "output too large")?,
            output: output.as_mut_ptr() as u64,
            timeout_ms: TIMEOUT.as_millis() as u32,
            ..Default::default()
        };
        // SAFETY: `s` is the ioctl's argument struct; the pointers in it name
        // `payload` and `output`, which live across the call, with the
        // lengths given.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), VGPU_IOC_SUBMIT as _, &mut s) };
        if r != 0 {
            return Err(format!(
                "VGPU_IOC_SUBMIT: {}",
                std::io::Error::last_os_error()
            ));
        }
        let resp =
            RespHdr::decode(vm_memory::ByteValued::as_slice(&s.resp)).map_err(|e| e.to_string())?;
        output.truncate((s.output_len as usize).min(out_cap));
        Ok(Answer {
            status: resp.status,
            output,
        })
    }
}
