//! The link to the agent. A [`Transport`] produces a connected stream [`Link`]: an
//! inherited socket fd (process sandboxes), a Unix socket path, or AF_VSOCK to the host
//! (microVMs: the VMM forwards CID 2 port P to the host socket `<uds>_P`).
//! [`connect_with_retry`] keeps trying while the other side is not there yet.

use crate::args::Endpoint;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use tokio::io::{AsyncRead, AsyncWrite};

/// Why the link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The inherited fd is not usable.
    #[error("inherited link fd {fd} is not usable")]
    InheritedFd {
        /// The fd.
        fd: RawFd,
        /// What fstat/fcntl said.
        #[source]
        source: std::io::Error,
    },
    /// The inherited fd is not a stream socket.
    #[error("inherited link fd {fd} is not a socket")]
    NotSocket {
        /// The fd.
        fd: RawFd,
    },
    /// Connecting to the Unix socket failed.
    #[error("connecting to unix socket {path}")]
    ConnectUnix {
        /// The socket path.
        path: PathBuf,
        /// What connect said.
        #[source]
        source: std::io::Error,
    },
    /// Connecting over vsock failed.
    #[error("connecting to vsock cid {cid} port {port}")]
    ConnectVsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
        /// What socket/connect said.
        #[source]
        source: std::io::Error,
    },
    /// Retrying did not help.
    #[error("gave up after {attempts} attempts in {waited_ms} ms")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        waited_ms: u64,
        /// The last error.
        #[source]
        last: Box<TransportError>,
    },
    /// Registering the socket with the async runtime failed.
    #[error("registering the link with the runtime")]
    Register(#[source] std::io::Error),
}

/// A connected, bidirectional byte stream to the agent.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

/// Read half of a link, for [`wire::AsyncFrameReader`].
pub type LinkReader = Box<dyn AsyncRead + Unpin + Send>;
/// Write half of a link, for [`wire::AsyncFrameWriter`].
pub type LinkWriter = Box<dyn AsyncWrite + Unpin + Send>;

impl Link {
    /// Wrap a connected stream socket.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Link { fd }
    }

    /// Register with the tokio runtime (must be called inside it) and split in two.
    pub fn into_split(self) -> Result<(LinkReader, LinkWriter), TransportError> {
        // tokio's UnixStream only does read/write/shutdown/epoll on the fd, which behave the
        // same on any connected SOCK_STREAM socket, AF_VSOCK included (its address methods
        // are never called on a link).
        let std = UnixStream::from(self.fd);
        std.set_nonblocking(true)
            .map_err(TransportError::Register)?;
        let s = tokio::net::UnixStream::from_std(std).map_err(TransportError::Register)?;
        let (r, w) = s.into_split();
        Ok((Box::new(r), Box::new(w)))
    }
}

/// Something that can produce the link to the agent.
pub trait Transport {
    /// Produce a connected link.
    fn connect(&self) -> Result<Link, TransportError>;
    /// Whether a failed connect may succeed later (the listener may not be up yet).
    fn retryable(&self) -> bool {
        false
    }
}

/// Whether a connect error is worth retrying: nobody listening yet, the device or the
/// host side not ready, or a reset during setup.
fn transient(e: &TransportError) -> bool {
    let src = match e {
        TransportError::ConnectUnix { source, .. }
        | TransportError::ConnectVsock { source, .. } => source,
        _ => return false,
    };
    matches!(
        src.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ECONNRESET
                | libc::ENOENT
                | libc::ENODEV
                | libc::ETIMEDOUT
                | libc::EAGAIN
                | libc::EINTR
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
        )
    )
}

/// Connect; if the transport is retryable and the error transient, retry with backoff
/// (1 ms doubling to 200 ms) until `limit` has passed.
pub fn connect_with_retry(
    t: &dyn Transport,
    limit: std::time::Duration,
) -> Result<Link, TransportError> {
    let t0 = std::time::Instant::now();
    let mut delay = std::time::Duration::from_millis(1);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match t.connect() {
            Ok(l) => return Ok(l),
            Err(e) if t.retryable() && transient(&e) => {
                if t0.elapsed() + delay > limit {
                    return Err(TransportError::GaveUp {
                        attempts,
                        waited_ms: t0.elapsed().as_millis() as u64,
                        last: Box::new(e),
                    });
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A socket inherited from the agent on a known fd.
#[derive(Debug, Clone, Copy)]
pub struct InheritedFd(pub RawFd);

impl Transport for InheritedFd {
    fn connect(&self) -> Result<Link, TransportError> {
        let fd = self.0;
        // SAFETY: `st` is a valid, writable stat buffer; fstat on any fd number is safe.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(TransportError::InheritedFd {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(TransportError::NotSocket { fd });
        }
        // SAFETY: fstat proved `fd` is open; the command line hands its ownership to us and
        // nothing else in the probe uses that fd number.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Keep it out of handler processes.
        // SAFETY: F_SETFD on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Link::from_fd(owned))
    }
}

/// A Unix socket path to connect to.
#[derive(Debug, Clone)]
pub struct UnixPath(pub PathBuf);

impl Transport for UnixPath {
    fn connect(&self) -> Result<Link, TransportError> {
        let s = UnixStream::connect(&self.0).map_err(|source| TransportError::ConnectUnix {
            path: self.0.clone(),
            source,
        })?;
        Ok(Link::from_fd(s.into()))
    }

    fn retryable(&self) -> bool {
        true
    }
}

/// AF_VSOCK to (cid, port).
#[derive(Debug, Clone, Copy)]
pub struct Vsock {
    /// Context id (2 = host).
    pub cid: u32,
    /// Port.
    pub port: u32,
}

impl Transport for Vsock {
    fn connect(&self) -> Result<Link, TransportError> {
        let err = |source| TransportError::ConnectVsock {
            cid: self.cid,
            port: self.port,
            source,
        };
        // SAFETY: socket(2) takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: socket() just returned this fd and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = self.cid;
        addr.svm_port = self.port;
        // SAFETY: addr is a valid sockaddr_vm and the length passed is its size.
        let rc = unsafe {
            libc::connect(
                fd,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(Link::from_fd(owned))
    }

    fn retryable(&self) -> bool {
        true
    }
}

/// The transport for an endpoint given on the command line.
pub fn for_endpoint(e: &Endpoint) -> Box<dyn Transport> {
    match e {
        Endpoint::Fd(fd) => Box::new(InheritedFd(*fd)),
        Endpoint::Unix(p) => Box::new(UnixPath(p.clone())),
        Endpoint::Vsock { cid, port } => Box::new(Vsock {
            cid: *cid,
            port: *port,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn vsock_errors_name_cid_and_port() {
        // No vsock transport on a plain host (or nobody on port 1 of CID 2): a clear error.
        let e = for_endpoint(&Endpoint::Vsock { cid: 2, port: 1 })
            .connect()
            .unwrap_err();
        assert!(e.to_string().contains("vsock cid 2 port 1"), "{e}");
    }

    #[test]
    fn retry_waits_for_a_late_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.sock");
        let p2 = path.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(60));
            let l = std::os::unix::net::UnixListener::bind(&p2).unwrap();
            l.accept().unwrap()
        });
        let link = connect_with_retry(&UnixPath(path), std::time::Duration::from_secs(5));
        assert!(link.is_ok(), "{link:?}");
        th.join().unwrap();
    }

    #[test]
    fn retry_gives_up_with_the_last_error() {
        let t0 = std::time::Instant::now();
        let e = connect_with_retry(
            &UnixPath("/nonexistent/sock".into()),
            std::time::Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
        let msg = crate::error_chain(&e);
        assert!(
            msg.contains("gave up after") && msg.contains("/nonexistent/sock"),
            "{msg}"
        );
        // A non-retryable transport fails at once.
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let e = connect_with_retry(
            &InheritedFd(f.as_raw_fd()),
            std::time::Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(e, TransportError::NotSocket { .. }), "{e}");
    }

    #[test]
    fn inherited_fd_must_be_a_socket() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let e = InheritedFd(f.as_raw_fd()).connect().unwrap_err();
        assert!(matches!(e, TransportError::NotSocket { .. }), "{e}");
        let e = InheritedFd(100_000).connect().unwrap_err();
        assert!(matches!(e, TransportError::InheritedFd { .. }), "{e}");
    }

    #[test]
    fn unix_path_missing_names_path() {
        let e = UnixPath("/nonexistent/sock".into()).connect().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/sock"), "{e}");
    }
}
