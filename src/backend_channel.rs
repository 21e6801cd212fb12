//! Config-change notifications to the frontend.
//!
//! vhost 0.18's `Backend` (the VHOST_USER_SET_BACKEND_REQ_FD channel) sends
//! shared-object and shmem messages only, and keeps its socket private. So
//! when the frontend hands the channel over, we find that socket among our
//! descriptors — the one unnamed unix stream socket whose peer is the process
//! connected to this VM's vhost-user socket and that no other VM claimed —
//! keep a duplicate, and write VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on it.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use vhost::vhost_user::message::BackendReq;
use vm_memory::endian::Le32;
use vm_memory::ByteValued;

/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;

/// The vhost-user message header (vhost keeps its own type private).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsgHeader {
    pub request: Le32,
    pub flags: Le32,
    pub size: Le32,
}

// SAFETY: three little-endian u32s, no padding; any bit pattern is valid.
unsafe impl ByteValued for MsgHeader {}

impl MsgHeader {
    /// A backend request without payload.
    pub fn backend(req: BackendReq) -> MsgHeader {
        MsgHeader {
            request: u32::from(req).into(),
            flags: VERSION_1.into(),
            size: 0.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot list our file descriptors: {0}")]
    Proc(io::Error),
    #[error("no frontend connected on {0}")]
    NoPeer(String),
    #[error("no unclaimed backend channel from pid {0}")]
    NotFound(i32),
    #[error("cannot duplicate the channel: {0}")]
    Dup(io::Error),
}

struct UnixSock {
    fd: RawFd,
    name: Option<Vec<u8>>,
    peer_pid: Option<i32>,
    stream: bool,
}

fn describe(fd: RawFd) -> Option<UnixSock> {
    // SAFETY: fstat/getsockname/getsockopt write into local, correctly sized
    // buffers; a closed or foreign fd only makes them fail.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return None;
        }
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) != 0
            || addr.sun_family != libc::AF_UNIX as libc::sa_family_t
        {
            return None;
        }
        let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
        let name: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
            .iter()
            .map(|&c| c as u8)
            .take_while(|&c| c != 0)
            .collect();
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut clen = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let peer_pid = (libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut clen,
        ) == 0
            && cred.pid > 0)
            .then_some(cred.pid);
        let mut ty: libc::c_int = 0;
        let mut tlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let stream = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut ty as *mut _ as *mut libc::c_void,
            &mut tlen,
        ) == 0
            && ty == libc::SOCK_STREAM;
        // A listening socket reports our own pid as its peer: skip it.
        let mut listening: libc::c_int = 0;
        let mut llen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut listening as *mut _ as *mut libc::c_void,
            &mut llen,
        ) != 0
            || listening != 0
        {
            return None;
        }
        Some(UnixSock {
            fd,
            name: (!name.is_empty()).then_some(name),
            peer_pid,
            stream,
        })
    }
}

fn unix_sockets() -> Result<Vec<UnixSock>, Error> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").map_err(Error::Proc)? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        out.extend(describe(fd));
    }
    Ok(out)
}

/// Inode of a socket, to tell channels apart across duplicates.
pub fn inode(fd: &OwnedFd) -> Option<u64> {
    fd_inode(fd.as_raw_fd())
}

fn fd_inode(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat into a local buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(fd, &mut st) == 0).then_some(st.st_ino)
    }
}

/// Finds the backend channel the frontend connected to `listen_path` just
/// handed over, skipping channels whose inode is in `claimed`.
pub fn find(listen_path: &Path, claimed: &[u64]) -> Result<OwnedFd, Error> {
    let socks = unix_sockets()?;
    let want: &OsStr = listen_path.as_os_str();
    let peer = socks
        .iter()
        .find(|s| s.name.as_deref() == Some(want.as_bytes()) && s.peer_pid.is_some())
        .and_then(|s| s.peer_pid)
        .filter(|&pid| pid != std::process::id() as i32)
        .ok_or_else(|| Error::NoPeer(listen_path.display().to_string()))?;
    let candidate = socks
        .iter()
        .filter(|s| s.stream && s.name.is_none() && s.peer_pid == Some(peer))
        .filter(|s| fd_inode(s.fd).is_some_and(|i| !claimed.contains(&i)))
        // The channel arrived last: with several, the newest fd is the best guess.
        .max_by_key(|s| s.fd)
        .ok_or(Error::NotFound(peer))?;
    // SAFETY: the fd is open (just described); dup gives us our own copy.
    let dup = unsafe { libc::fcntl(candidate.fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(Error::Dup(io::Error::last_os_error()));
    }
    // SAFETY: dup is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Channels held by VMs, by vm_id: a channel belongs to one VM only.
static CLAIMS: std::sync::Mutex<std::collections::BTreeMap<u32, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Finds and claims the channel of `vm_id`, whose frontend is connected to
/// `listen_path`.
pub fn claim(vm_id: u32, listen_path: &Path) -> Result<OwnedFd, Error> {
    let mut claims = crate::sync::lock(&CLAIMS);
    claims.remove(&vm_id);
    let taken: Vec<u64> = claims.values().copied().collect();
    let fd = find(listen_path, &taken)?;
    if let Some(ino) = inode(&fd) {
        claims.insert(vm_id, ino);
    }
    Ok(fd)
}

pub fn release(vm_id: u32) {
    crate::sync::lock(&CLAIMS).remove(&vm_id);
}

/// Writes a CONFIG_CHANGE_MSG header (no payload, no reply requested).
pub fn send_config_change(fd: &OwnedFd) -> io::Result<()> {
    let hdr = MsgHeader::backend(BackendReq::CONFIG_CHANGE_MSG);
    let msg = hdr.as_slice();
    // SAFETY: sending from a local buffer on an open socket.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n == msg.len() as isize {
        Ok(())
    } else if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::other("short write"))
    }
}
