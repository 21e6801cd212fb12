//! systemd readiness (`Type=notify`): `READY=1` on `$NOTIFY_SOCKET` once
//! every VM socket exists, so that units ordered after the daemon (and xapi's
//! vm-pre-start hook) find the sockets listening.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Sends `state` to the service manager. `Ok(false)`: not run by systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name)?
    } else {
        SocketAddr::from_pathname(PathBuf::from(&path))?
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Waits until each path in `sockets` is a socket (bound by its VM thread),
/// then sends READY=1. Gives up after `timeout` and says which are missing.
pub fn ready_when_listening(sockets: &[PathBuf], timeout: Duration) -> io::Result<bool> {
    let end = Instant::now() + timeout;
    loop {
        let missing: Vec<&PathBuf> = sockets
            .iter()
            .filter(|p| {
                !std::fs::metadata(p)
                    .map(|m| m.file_type().is_socket())
                    .unwrap_or(false)
            })
            .collect();
        if missing.is_empty() {
            return notify("READY=1");
        }
        if Instant::now() >= end {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("sockets not listening: {missing:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_goes_to_the_notify_socket_once_the_sockets_exist() {
        let dir = tempfile::tempdir().unwrap();
        let notify_path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&notify_path).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let vm_sock = dir.path().join("vm1.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&vm_sock).unwrap();
        // The one test that sets the variable: nothing else reads it.
        std::env::set_var("NOTIFY_SOCKET", &notify_path);
        assert!(ready_when_listening(&[vm_sock], Duration::from_secs(5)).unwrap());
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let missing = dir.path().join("vm2.sock");
        assert!(ready_when_listening(&[missing], Duration::from_millis(50)).is_err());
        std::env::remove_var("NOTIFY_SOCKET");
    }
}
