//! File descriptors over unix stream sockets (`SCM_RIGHTS`): one message
//! with bytes and descriptors each way. Used by the socket handoff
//! (`vm_socket`, vhost-user messages relayed with their fds) and by the
//! memfd tables sent to the workers (`executor::worker::table`).
//!
//! Written here rather than taken from vmm-sys-util's `ScmSocket`: that one
//! receives without `MSG_CMSG_CLOEXEC`, and the daemon starts worker
//! processes from other threads, so a descriptor received on one thread
//! could leak into a worker started on another before it is marked.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes read into the caller's buffer (0: the peer closed).
    pub len: usize,
    /// The descriptors, close-on-exec, now this process's alone.
    pub fds: Vec<OwnedFd>,
    /// The peer sent more descriptors than there was room for (the kernel
    /// closed the rest).
    pub truncated: bool,
}

/// Sends `data` and `fds` in one `sendmsg`; the number of bytes sent (the
/// descriptors go with the first byte, so the caller writes any rest plainly).
pub fn send(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let bytes = std::mem::size_of_val(fds);
    let bytes32 = u32::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds"))?;
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte",
        ));
    }
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set below to
    // buffers that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one header of `bytes` bytes
        // (sized with CMSG_SPACE above), so the first header and its data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers; the fds are the caller's.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `recvmsg` into `buf`, with room for `max_fds` descriptors, received
/// close-on-exec.
pub fn recv(sock: RawFd, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let bytes = u32::try_from(max_fds.saturating_mul(std::mem::size_of::<RawFd>()))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds"))?;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(bytes) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set below to
    // buffers that outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let len = loop {
        // SAFETY: `msg` points at live buffers of the sizes it states.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg`; the CMSG macros walk only the
    // control bytes it reports, and each SCM_RIGHTS payload is whole fds
    // that are now this process's.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let payload = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn memfd(text: &[u8]) -> std::fs::File {
        // SAFETY: a NUL-terminated name; the new fd is ours alone.
        let fd = unsafe { libc::memfd_create(c"scm-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nothing else.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.write_all(text).unwrap();
        f
    }

    fn cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn bytes_and_descriptors_arrive_together_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = memfd(b"guest ram");
        assert_eq!(send(a.as_raw_fd(), b"hello", &[f.as_raw_fd()]).unwrap(), 5);
        let mut buf = [0u8; 16];
        let r = recv(b.as_raw_fd(), &mut buf, 4).unwrap();
        assert_eq!(
            (&buf[..r.len], r.fds.len(), r.truncated),
            (&b"hello"[..], 1, false)
        );
        assert!(cloexec(&r.fds[0]));
        let mut got = std::fs::File::from(r.fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "guest ram");
    }

    #[test]
    fn more_descriptors_than_room_is_reported_and_plain_bytes_carry_none() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..3).map(|_| memfd(b"x")).collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send(a.as_raw_fd(), b"m", &raw).unwrap();
        let mut buf = [0u8; 1];
        let r = recv(b.as_raw_fd(), &mut buf, 1).unwrap();
        assert!(r.truncated && r.fds.len() <= 2, "{r:?}");
        send(a.as_raw_fd(), b"plain", &[]).unwrap();
        let mut buf = [0u8; 8];
        let r = recv(b.as_raw_fd(), &mut buf, 4).unwrap();
        assert_eq!((r.len, r.fds.len(), r.truncated), (5, 0, false));
        assert!(send(a.as_raw_fd(), b"", &raw).is_err());
        drop(a);
        assert_eq!(recv(b.as_raw_fd(), &mut buf, 4).unwrap().len, 0);
    }
}
