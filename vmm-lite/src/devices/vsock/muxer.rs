//! The Unix-socket vsock backend, with Firecracker's hybrid convention.
//!
//! - Guest connects to CID 2 port P: the muxer connects to the Unix socket `<uds>_P`.
//! - Host connects to `<uds>` and writes `CONNECT P\n`: the muxer asks the guest to accept on
//!   port P and, once it does, answers `OK <assigned_port>\n` on the host stream.
//!
//! Each connection runs a small state machine with credit-based flow control: we read from
//! a host stream only as much as the guest has room for (its `buf_alloc - (rx_cnt -
//! fwd_cnt)`), and we advertise a fixed receive buffer per connection; a guest that sends
//! more than it was granted is reset. Host I/O errors reset the connection, never the VM.
//! All host sockets sit in one inner epoll whose fd the VMM's event loop polls.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{
    op, VsockHeader, VsockPacket, HOST_CID, MAX_PKT_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::VsockBackend;
use crate::metrics::Metrics;

/// Receive buffer we advertise per connection (bytes the guest may have in flight to us).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send a credit update once this much was forwarded since the last one we sent.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// Most concurrent connections.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections waiting for their `CONNECT` line.
pub const MAX_PENDING_ACCEPTS: usize = 64;
/// First port assigned to host-initiated connections.
pub const HOST_PORT_BASE: u32 = 1 << 30;
/// Longest `CONNECT` line accepted.
const MAX_CONNECT_LINE: usize = 32;

/// Connection key: our (host-side) port and the guest's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host-side port (the guest's destination port).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    LocalInit,
    /// Data flows both ways.
    Established,
    /// The host closed its end; SHUTDOWN sent to the guest, waiting for its RST.
    LocalClosed,
}

/// Packets a connection owes the guest, in priority order.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    rw: bool,
    credit_update: bool,
}

impl Pending {
    fn any(&self) -> bool {
        self.request || self.response || self.rw || self.credit_update
    }
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest → host bytes not yet accepted by the host stream.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of tx_buf that are ours (the `OK` line), not guest data.
    tx_uncounted: usize,
    /// Host → guest bytes read with the CONNECT line.
    pre_data: Vec<u8>,
    pending: Pending,
    in_rxq: bool,
    /// Guest said it sends no more: shut the host write side once tx_buf drains.
    guest_send_done: bool,
    /// Guest said it receives no more.
    guest_recv_done: bool,
    /// "OK <port>\n" must be written once the guest accepts.
    host_initiated: bool,
    interest: EventSet,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            pre_data: Vec::new(),
            pending: Pending::default(),
            in_rxq: false,
            guest_send_done: false,
            guest_recv_done: false,
            host_initiated: false,
            interest: EventSet::empty(),
        }
    }

    /// Bytes the guest can still take.
    fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.guest_recv_done
            && !self.pending.rw
            && self.peer_free() > 0
    }

    /// Writes as much of tx_buf as the host takes. Returns Err on a fatal I/O error.
    fn flush_tx(&mut self) -> std::io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ours = n.min(self.tx_uncounted);
                    self.tx_uncounted -= ours;
                    self.fwd_cnt += Wrapping((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.tx_buf.is_empty() && self.guest_send_done {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum FdOwner {
    Listener,
    PendingAccept,
    Conn(ConnKey),
}

/// The Unix-socket muxer backend.
pub struct VsockMuxer {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Conn>,
    pending_accepts: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    fds: HashMap<RawFd, FdOwner>,
    rxq: VecDeque<ConnKey>,
    rst_queue: VecDeque<ConnKey>,
    next_host_port: u32,
    metrics: Arc<Metrics>,
}

impl VsockMuxer {
    /// Listens on `uds` (removing a stale socket first) for guest `cid`.
    pub fn new(cid: u64, uds: &Path, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(uds);
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
        )?;
        let mut fds = HashMap::new();
        fds.insert(listener.as_raw_fd(), FdOwner::Listener);
        Ok(VsockMuxer {
            cid,
            uds: uds.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            pending_accepts: HashMap::new(),
            fds,
            rxq: VecDeque::new(),
            rst_queue: VecDeque::new(),
            next_host_port: HOST_PORT_BASE,
            metrics,
        })
    }

    /// Number of live connections.
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// State of a connection, if it exists.
    pub fn conn_state(&self, key: ConnKey) -> Option<ConnState> {
        self.conns.get(&key).map(|c| c.state)
    }

    fn header(&self, key: ConnKey, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() < 4 * MAX_CONNECTIONS {
            self.rst_queue.push_back(key);
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.get_mut(&key) {
            if c.pending.any() && !c.in_rxq {
                c.in_rxq = true;
                self.rxq.push_back(key);
            }
        }
        self.update_interest(key);
    }

    fn update_interest(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        if c.wants_read() {
            want |= EventSet::IN;
        }
        if !c.tx_buf.is_empty() {
            want |= EventSet::OUT;
        }
        if want != c.interest {
            let fd = c.stream.as_raw_fd();
            let op = if c.interest.is_empty() {
                ControlOperation::Add
            } else if want.is_empty() {
                ControlOperation::Delete
            } else {
                ControlOperation::Modify
            };
            if self
                .epoll
                .ctl(op, fd, EpollEvent::new(want, fd as u64))
                .is_ok()
            {
                c.interest = want;
            }
        }
    }

    fn remove(&mut self, key: ConnKey, send_rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            if !c.interest.is_empty() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.fds.remove(&fd);
            self.metrics.vsock.conns_closed.inc();
        }
        if send_rst {
            self.queue_rst(key);
        }
    }

    fn add_conn(&mut self, key: ConnKey, conn: Conn) {
        let fd = conn.stream.as_raw_fd();
        self.fds.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.metrics.vsock.conns_opened.inc();
        self.schedule(key);
    }

    fn guest_connect(&mut self, pkt: &VsockPacket, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.queue_rst(key);
            return;
        }
        let path = format!("{}_{}", self.uds.display(), key.local_port);
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => {
                let mut c = Conn::new(stream, ConnState::Established);
                c.peer_buf_alloc = pkt.hdr.buf_alloc;
                c.peer_fwd_cnt = Wrapping(pkt.hdr.fwd_cnt);
                c.pending.response = true;
                self.add_conn(key, c);
            }
            Err(e) => {
                crate::guest_warn!("vsock: guest connect to {path} failed: {e}");
                self.queue_rst(key);
            }
        }
    }

    fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.pending_accepts.len() >= MAX_PENDING_ACCEPTS
                        || s.set_nonblocking(true).is_err()
                    {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.fds.insert(fd, FdOwner::PendingAccept);
                        self.pending_accepts.insert(fd, (s, Vec::new()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(HOST_PORT_BASE);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return p;
            }
        }
    }

    /// Reads the `CONNECT P\n` line from a pending host connection.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some((stream, buf)) = self.pending_accepts.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 64];
        let done = match stream.read(&mut chunk) {
            Ok(0) => Some(None),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                        let rest = buf[i + 1..].to_vec();
                        Some(parse_connect(&line).map(|p| (p, rest)))
                    }
                    None if buf.len() > MAX_CONNECT_LINE => Some(None),
                    None => None,
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                None
            }
            Err(_) => Some(None),
        };
        let Some(result) = done else { return };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.fds.remove(&fd);
        let Some((stream, _)) = self.pending_accepts.remove(&fd) else {
            return;
        };
        let Some((peer_port, rest)) = result else {
            // Malformed or closed: drop the stream (the host sees EOF).
            self.metrics.vsock.host_errors.inc();
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let local_port = self.alloc_host_port();
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let mut c = Conn::new(stream, ConnState::LocalInit);
        c.host_initiated = true;
        c.pre_data = rest;
        c.pending.request = true;
        self.add_conn(key, c);
    }

    fn conn_event(&mut self, key: ConnKey, ev: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if ev.contains(EventSet::OUT) && c.flush_tx().is_err() {
            self.metrics.vsock.host_errors.inc();
            self.remove(key, true);
            return;
        }
        if ev.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) && c.wants_read() {
            // Defer the read to recv_pkt, which reads straight into the guest's packet.
            c.pending.rw = true;
        }
        self.schedule(key);
    }

    /// Builds the next packet for connection `key`. Returns false if it had nothing.
    fn conn_packet(&mut self, key: ConnKey, pkt: &mut VsockPacket, max_data: usize) -> bool {
        let mut hdr = self.header(key, 0);
        let Some(c) = self.conns.get_mut(&key) else {
            return false;
        };
        pkt.data.clear();
        let p = &mut c.pending;
        if p.request {
            p.request = false;
            hdr.op = op::REQUEST;
        } else if p.response {
            p.response = false;
            hdr.op = op::RESPONSE;
        } else if p.rw {
            p.rw = false;
            let want = (c.peer_free() as usize).min(max_data).min(MAX_PKT_DATA);
            if want == 0 || c.state != ConnState::Established {
                return self.conn_packet_tail(key, pkt, max_data);
            }
            if !c.pre_data.is_empty() {
                let n = want.min(c.pre_data.len());
                pkt.data.extend_from_slice(&c.pre_data[..n]);
                c.pre_data.drain(..n);
                if !c.pre_data.is_empty() {
                    c.pending.rw = true;
                }
            } else {
                pkt.data.resize(want, 0);
                match c.stream.read(&mut pkt.data) {
                    Ok(0) => {
                        // Host closed: tell the guest, wait for its RST.
                        pkt.data.clear();
                        c.state = ConnState::LocalClosed;
                        hdr.op = op::SHUTDOWN;
                        hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                        hdr.fwd_cnt = c.fwd_cnt.0;
                        c.last_fwd_cnt_sent = c.fwd_cnt;
                        pkt.hdr = hdr;
                        self.update_interest(key);
                        return true;
                    }
                    Ok(n) => {
                        pkt.data.truncate(n);
                        // More may be waiting: poll again.
                    }
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted =>
                    {
                        pkt.data.clear();
                        return self.conn_packet_tail(key, pkt, max_data);
                    }
                    Err(_) => {
                        pkt.data.clear();
                        self.metrics.vsock.host_errors.inc();
                        self.remove(key, false);
                        hdr.op = op::RST;
                        self.metrics.vsock.rst_sent.inc();
                        pkt.hdr = hdr;
                        return true;
                    }
                }
            }
            c.rx_cnt += Wrapping(pkt.data.len() as u32);
            hdr.op = op::RW;
            hdr.len = pkt.data.len() as u32;
        } else if p.credit_update {
            p.credit_update = false;
            hdr.op = op::CREDIT_UPDATE;
        } else {
            return false;
        }
        hdr.fwd_cnt = c.fwd_cnt.0;
        c.last_fwd_cnt_sent = c.fwd_cnt;
        pkt.hdr = hdr;
        self.update_interest(key);
        true
    }

    /// After an RW that produced nothing, fall through to the lower-priority packets.
    fn conn_packet_tail(&mut self, key: ConnKey, pkt: &mut VsockPacket, max_data: usize) -> bool {
        self.update_interest(key);
        let has_more = self.conns.get(&key).is_some_and(|c| c.pending.any());
        has_more && self.conn_packet(key, pkt, max_data)
    }

    fn guest_rw(&mut self, key: ConnKey, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state != ConnState::Established || c.guest_send_done {
            self.remove(key, true);
            return;
        }
        // Credit check: the guest may have at most CONN_BUF_ALLOC bytes unforwarded.
        if c.tx_buf.len() - c.tx_uncounted + data.len() > CONN_BUF_ALLOC as usize {
            crate::guest_warn!("vsock: guest overran its credit on port {}", key.local_port);
            self.metrics.vsock.malformed.inc();
            self.remove(key, true);
            return;
        }
        let mut off = 0;
        if c.tx_buf.is_empty() {
            loop {
                match c.stream.write(&data[off..]) {
                    Ok(n) => {
                        off += n;
                        c.fwd_cnt += Wrapping(n as u32);
                        if off == data.len() || n == 0 {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        self.metrics.vsock.host_errors.inc();
                        self.remove(key, true);
                        return;
                    }
                }
            }
        }
        c.tx_buf.extend(&data[off..]);
        if (c.fwd_cnt - c.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            c.pending.credit_update = true;
        }
        self.schedule(key);
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &str) -> Option<u32> {
    let mut it = line.trim_end_matches('\r').split_ascii_whitespace();
    if it.next()? != "CONNECT" {
        return None;
    }
    let port = it.next()?.parse().ok()?;
    it.next().is_none().then_some(port)
}

impl VsockBackend for VsockMuxer {
    fn send_pkt(&mut self, pkt: &VsockPacket) {
        let h = &pkt.hdr;
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.queue_rst(key);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match h.op {
                op::REQUEST => self.guest_connect(pkt, key),
                op::RST => {}
                _ => self.queue_rst(key),
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        }
        match h.op {
            op::RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if c.state != ConnState::LocalInit {
                    self.remove(key, true);
                    return;
                }
                c.state = ConnState::Established;
                if c.host_initiated {
                    // The OK line goes ahead of any data, through the same buffered path,
                    // without counting as forwarded guest bytes.
                    let line = format!("OK {}\n", key.local_port).into_bytes();
                    c.tx_uncounted += line.len();
                    for b in line.into_iter().rev() {
                        c.tx_buf.push_front(b);
                    }
                    if c.flush_tx().is_err() {
                        self.metrics.vsock.host_errors.inc();
                        self.remove(key, true);
                        return;
                    }
                    if !c.pre_data.is_empty() {
                        c.pending.rw = true;
                    }
                }
                self.schedule(key);
            }
            op::RW => self.guest_rw(key, &pkt.data),
            op::CREDIT_UPDATE => self.schedule(key),
            op::CREDIT_REQUEST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.pending.credit_update = true;
                }
                self.schedule(key);
            }
            op::SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_send_done = true;
                }
                if h.flags & SHUTDOWN_RCV != 0 {
                    c.guest_recv_done = true;
                }
                let _ = c.flush_tx();
                if c.guest_send_done && c.guest_recv_done {
                    // Fully closed by the guest: best-effort flush done; reset to finish.
                    self.remove(key, true);
                } else {
                    self.schedule(key);
                }
            }
            op::RST => self.remove(key, false),
            _ => {
                // REQUEST on an existing connection or an unknown op.
                self.remove(key, true);
            }
        }
    }

    fn recv_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize) -> bool {
        if let Some(key) = self.rst_queue.pop_front() {
            pkt.data.clear();
            pkt.hdr = self.header(key, op::RST);
            pkt.hdr.buf_alloc = 0;
            self.metrics.vsock.rst_sent.inc();
            return true;
        }
        while let Some(key) = self.rxq.pop_front() {
            if let Some(c) = self.conns.get_mut(&key) {
                c.in_rxq = false;
            } else {
                continue;
            }
            let produced = self.conn_packet(key, pkt, max_data);
            // Re-queue if it still owes packets.
            self.schedule(key);
            if produced {
                return true;
            }
        }
        false
    }

    fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            match self.fds.get(&fd).copied() {
                Some(FdOwner::Listener) => self.accept_host(),
                Some(FdOwner::PendingAccept) => self.read_connect_line(fd),
                Some(FdOwner::Conn(key)) => self.conn_event(key, ev.event_set()),
                None => {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
            }
        }
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect("CONNECT 52"), Some(52));
        assert_eq!(parse_connect("CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect("connect 52"), None);
        assert_eq!(parse_connect("CONNECT"), None);
        assert_eq!(parse_connect("CONNECT 99999999999"), None);
        assert_eq!(parse_connect("CONNECT 1 2"), None);
    }
}
