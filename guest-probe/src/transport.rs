//! The link to the agent. A [`Transport`] produces a connected stream [`Link`]; today an
//! inherited socket fd or a Unix socket path, later AF_VSOCK (microVMs) behind the same
//! trait.

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
    /// vsock is not implemented yet.
    #[error("vsock transport (cid {cid}, port {port}) is not supported yet")]
    VsockUnsupported {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
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
        // AF_UNIX today; an AF_VSOCK link will get its own AsyncFd-based wrapper here.
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
}

/// AF_VSOCK to (cid, port). Not implemented yet: [`Transport::connect`] says so.
#[derive(Debug, Clone, Copy)]
pub struct Vsock {
    /// Context id (2 = host).
    pub cid: u32,
    /// Port.
    pub port: u32,
}

impl Transport for Vsock {
    fn connect(&self) -> Result<Link, TransportError> {
        Err(TransportError::VsockUnsupported {
            cid: self.cid,
            port: self.port,
        })
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
    fn vsock_says_not_supported() {
        let e = for_endpoint(&Endpoint::Vsock { cid: 2, port: 52 })
            .connect()
            .unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
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
