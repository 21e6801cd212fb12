//! A VM's vhost-user socket, below the vhost-user library: our own listener,
//! the check of who connected, and the relay that hands an admitted
//! connection to the library.
//!
//! Why our own listener: vhost-user-backend 0.24 accepts connections itself
//! (`VhostUserDaemon::start(listener)`) and offers no way to serve a stream
//! accepted elsewhere, so a peer could only be checked after the library had
//! already read its first messages. And a thread blocked in the library's
//! `accept` can only be woken by connecting to the path, which, once the VM
//! was removed and registered again, is the *new* VM's socket: the old
//! thread stayed blocked forever and, on its way out, removed the new
//! socket. Here:
//!
//! * [`VmListener`] binds the path, remembers the file it created (device
//!   and inode), waits for a frontend together with a wake-up eventfd, and
//!   on drop removes the path only while it is still that file. Binding and
//!   removing take one process-wide lock, so an old VM's thread and the new
//!   VM's never interleave on one path.
//! * [`peer_allowed`] reads `SO_PEERCRED` of an accepted connection before
//!   any byte of it is read; a refused peer is closed.
//! * [`Relay`] carries an admitted connection to the library: the library
//!   connects (`start_client`) to a private one-shot socket next to the VM's
//!   socket, we accept that connection (checking that it is our own process
//!   at the other end), and two threads forward vhost-user messages, with
//!   their file descriptors, between the frontend and the library. Only the
//!   control messages take this path (a few per connection and per ring
//!   setup); requests and completions go through guest memory and the
//!   eventfds the frontend handed over, as before.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::SocketPolicy;
use crate::sync::lock;
use crate::vm::ListenerWake;

/// Serialises binding and removing VM socket paths in this process.
static PATHS: Mutex<()> = Mutex::new(());

/// The listening socket of one VM.
pub struct VmListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we bound.
    file: (u64, u64),
    wake: Arc<EventFd>,
}

impl VmListener {
    /// Binds `path` (replacing a stale socket there) and gives it the
    /// policy's owner and mode.
    pub fn bind(path: &Path, policy: &SocketPolicy) -> io::Result<VmListener> {
        let _g = lock(&PATHS);
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let md = std::fs::symlink_metadata(path)?;
        let me = VmListener {
            listener,
            path: path.to_path_buf(),
            file: (md.dev(), md.ino()),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        };
        // Bound under the process umask (0022 by default, or stricter),
        // which lets nobody else connect before the mode below is set.
        set_socket_permissions(path, policy)?;
        me.listener.set_nonblocking(true)?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gets [`VmListener::accept`] out of its wait.
    pub fn waker(&self) -> ListenerWake {
        let wake = self.wake.clone();
        Box::new(move || {
            let _ = wake.write(1);
        })
    }

    /// Waits for a frontend; `None` when woken.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds in a local array.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                let _ = self.wake.read();
                return Ok(None);
            }
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    return Ok(Some(s));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether `path` is still the socket file this listener created.
    fn owns_path(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file)
    }
}

impl Drop for VmListener {
    fn drop(&mut self) {
        let _g = lock(&PATHS);
        if self.owns_path() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Gives the socket its owner, then its mode (`vm_socket_owner`,
/// `vm_socket_mode` of `config/vgpu.toml`).
fn set_socket_permissions(socket: &Path, policy: &SocketPolicy) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some((uid, gid)) = policy.owner {
        std::os::unix::fs::chown(socket, Some(uid), Some(gid))?;
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(policy.mode))
}

/// Credentials of the process at the other end of `s` (`SO_PEERCRED`:
/// taken by the kernel when it connected).
pub fn peer_cred(s: &impl AsRawFd) -> io::Result<libc::ucred> {
    // SAFETY: zeroed ucred is a valid value of a plain C struct.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a local, correctly sized buffer.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Whether the policy admits the peer of `s`: `Err` says who it was.
pub fn peer_allowed(s: &UnixStream, policy: &SocketPolicy) -> Result<(), String> {
    let Some(want) = policy.peer_uid else {
        return Ok(());
    };
    match peer_cred(s) {
        Ok(c) if c.uid == want => Ok(()),
        Ok(c) => Err(format!(
            "pid {} uid {} gid {}, not uid {want} (vm_socket_peer_uid)",
            c.pid, c.uid, c.gid
        )),
        Err(e) => Err(format!("cannot read its credentials: {e}")),
    }
}

/// The private one-shot socket through which the library connects.
pub struct Handoff {
    listener: UnixListener,
    path: PathBuf,
}

impl Handoff {
    /// Binds `.<socket name>.handoff` next to `socket`.
    pub fn bind(socket: &Path) -> io::Result<Handoff> {
        let name = socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = socket.with_file_name(format!(".{name}.handoff"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok(Handoff { listener, path })
    }

    /// Where the library connects.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection the library made: our own process at the other end
    /// (anything else that got in first is closed). The library connected
    /// before this is called, so its connection is in the backlog.
    pub fn accept_own(self) -> io::Result<UnixStream> {
        let me = std::process::id() as i32;
        loop {
            let (s, _) = self.listener.accept()?;
            if peer_cred(&s).is_ok_and(|c| c.pid == me) {
                return Ok(s);
            }
            log::warn!("{}: a foreign connection, closed", self.path.display());
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// vhost-user message header: request, flags, size (u32 each).
const HDR_SIZE: usize = 12;

/// Two threads forwarding vhost-user messages between a frontend and the
/// library, until either side closes.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    pub fn start(frontend: UnixStream, library: UnixStream, vm_id: u32) -> io::Result<Relay> {
        let (f2, l2) = (frontend.try_clone()?, library.try_clone()?);
        let mut threads = Vec::new();
        for (from, to) in [(frontend, library), (l2, f2)] {
            let t = std::thread::Builder::new()
                .name(format!("vgpu-relay{vm_id}"))
                .spawn(move || {
                    if let Err(e) = forward(&from, &to) {
                        log::debug!("vm{vm_id}: relay: {e}");
                    }
                    // Either side gone: end both directions.
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Relay { threads })
    }

    /// Waits for both directions to end (after either side closed).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Forwards whole messages from `from` to `to`, each with the descriptors
/// that came with its header. Ends at a clean end of stream.
fn forward(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let max_body = vhost::vhost_user::message::MAX_MSG_SIZE;
    let mut buf = vec![0u8; HDR_SIZE + max_body];
    loop {
        let (n, fds) = recv_with_fds(from, &mut buf[..HDR_SIZE])?;
        if n == 0 {
            return Ok(());
        }
        let mut got = n;
        let mut reader = from;
        while got < HDR_SIZE {
            match reader.read(&mut buf[got..HDR_SIZE])? {
                0 => return Err(io::Error::other("end of stream inside a header")),
                k => got += k,
            }
        }
        let size = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if size > max_body {
            return Err(io::Error::other(format!("a {size}-byte message body")));
        }
        reader.read_exact(&mut buf[HDR_SIZE..HDR_SIZE + size])?;
        send_with_fds(to, &buf[..HDR_SIZE + size], &fds)?;
        // Our copies of the descriptors close here; the receiver has its own.
        drop(fds);
    }
}

/// Room for vhost-user's most descriptors per message.
const MAX_FDS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;

fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let r = crate::scm::recv(s.as_raw_fd(), buf, MAX_FDS)?;
    if r.truncated {
        return Err(io::Error::other(
            "more descriptors than a message may carry",
        ));
    }
    Ok((r.len, r.fds))
}

fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let mut sent = 0;
    if !fds.is_empty() {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        sent = crate::scm::send(s.as_raw_fd(), data, &raw)?;
    }
    let mut w = s;
    w.write_all(data.get(sent..).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SocketPolicy {
        SocketPolicy {
            mode: 0o600,
            owner: None,
            peer_uid: None,
            require_sealed_memory: false,
            max_guest_memory: 1 << 30,
        }
    }

    /// A listener removes its path only while the path is its own: the
    /// socket a newer listener bound there stays.
    #[test]
    fn a_listener_removes_only_its_own_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm1.sock");
        let old = VmListener::bind(&p, &policy()).unwrap();
        let new = VmListener::bind(&p, &policy()).unwrap();
        drop(old);
        assert!(p.exists(), "the newer socket stays");
        assert!(UnixStream::connect(&p).is_ok());
        drop(new);
        assert!(!p.exists());
    }

    #[test]
    fn a_woken_listener_returns_none() {
        let dir = tempfile::tempdir().unwrap();
        let l = VmListener::bind(&dir.path().join("vm2.sock"), &policy()).unwrap();
        (l.waker())();
        assert!(l.accept().unwrap().is_none());
        let _c = UnixStream::connect(l.path()).unwrap();
        assert!(l.accept().unwrap().is_some());
    }

    /// Messages cross the relay whole, with their descriptors.
    #[test]
    fn the_relay_forwards_messages_and_descriptors() {
        let (front, front_peer) = UnixStream::pair().unwrap();
        let (lib, lib_peer) = UnixStream::pair().unwrap();
        let relay = Relay::start(front_peer, lib_peer, 9).unwrap();
        let file = tempfile::tempfile().unwrap();
        let fd = OwnedFd::from(file.try_clone().unwrap());
        let mut msg = vec![5u8, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0];
        msg.extend([1, 2, 3, 4]);
        send_with_fds(&front, &msg, &[fd]).unwrap();
        let mut got = vec![0u8; 16];
        let (n, fds) = recv_with_fds(&lib, &mut got).unwrap();
        assert_eq!((n, &got[..]), (16, &msg[..]));
        assert_eq!(fds.len(), 1);
        // And back, without descriptors.
        (&lib).write_all(&msg).unwrap();
        let mut back = vec![0u8; 16];
        (&front).read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
        // A body past vhost-user's bound ends the relay.
        (&front)
            .write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0, 0])
            .unwrap();
        relay.join();
        assert_eq!((&lib).read(&mut back).unwrap(), 0);
    }
}
