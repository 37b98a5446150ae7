//! Device-model tests without KVM: virtio-mmio register protocol, feature negotiation,
//! queue setup, vsock packet parsing, malformed descriptor chains (fake backend), and the
//! Unix muxer's connection lifecycle and flow control over real Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_lite::boot::{create_memory, GuestMem};
use vmm_lite::devices::virtio::mmio::{self, status, MmioTransport};
use vmm_lite::devices::virtio::test_driver::TestDriver;
use vmm_lite::devices::vsock::muxer::{VsockMuxer, CONN_BUF_ALLOC, HOST_PORT_BASE};
use vmm_lite::devices::vsock::packet::{op, VsockHeader, VsockPacket, HDR_SIZE, TYPE_STREAM};
use vmm_lite::devices::vsock::{VsockBackend, VsockDevice, RXQ, TXQ};
use vmm_lite::devices::IrqLine;
use vmm_lite::metrics::Metrics;
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;

#[derive(Default)]
struct Fake {
    sent: Vec<VsockPacket>,
    out: VecDeque<VsockPacket>,
    evt: Option<EventFd>,
}

impl VsockBackend for Fake {
    fn send_pkt(&mut self, pkt: &VsockPacket) {
        self.sent.push(pkt.clone());
    }
    fn recv_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize) -> bool {
        let Some(p) = self.out.pop_front() else {
            return false;
        };
        pkt.hdr = p.hdr;
        pkt.data.clear();
        pkt.data
            .extend_from_slice(&p.data[..p.data.len().min(max_data)]);
        true
    }
    fn has_pending_rx(&self) -> bool {
        !self.out.is_empty()
    }
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_ref().map(|e| e.as_raw_fd()).unwrap_or(-1)
    }
    fn process_events(&mut self) {}
}

/// A guest: memory, driver, the transport, and where its RX buffers are.
struct Guest<B: VsockBackend> {
    t: MmioTransport<VsockDevice<B>>,
    drv: TestDriver,
    metrics: Arc<Metrics>,
    rx_bufs: HashMap<u16, u64>,
    next_buf: u64,
    irq: RawFd,
}

const RX_BUF: u32 = (HDR_SIZE + 4096) as u32;

impl<B: VsockBackend> Guest<B> {
    fn new(backend: B) -> Self {
        Self::with_init(backend, true)
    }

    fn with_init(backend: B, init: bool) -> Self {
        let mem: GuestMem = create_memory(8).unwrap();
        let metrics = Arc::new(Metrics::default());
        let dev = VsockDevice::new(GUEST_CID, mem.clone(), backend, metrics.clone()).unwrap();
        let irq = IrqLine::new().unwrap();
        let irq_fd = irq.eventfd().as_raw_fd();
        let mut t = MmioTransport::new(dev, irq, metrics.clone()).unwrap();
        let drv = TestDriver::new(mem, 3, 256);
        if init {
            drv.init(&mut t);
            assert!(t.is_activated());
        }
        Guest {
            t,
            drv,
            metrics,
            rx_bufs: HashMap::new(),
            next_buf: 0x10_0000,
            irq: irq_fd,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += (len + 0xfff) & !0xfff;
        if self.next_buf > 0x70_0000 {
            self.next_buf = 0x10_0000;
        }
        a
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let a = self.alloc(u64::from(RX_BUF));
            let head = self.drv.add_chain(RXQ, &[(a, RX_BUF, true)]);
            self.rx_bufs.insert(head, a);
        }
        self.t.device_mut().process_queue_event(RXQ);
    }

    fn send(&mut self, hdr: VsockHeader, data: &[u8]) {
        let a = self.alloc((HDR_SIZE + data.len()) as u64);
        let mem = &self.drv.mem;
        mem.write_slice(&hdr.to_bytes(), GuestAddress(a)).unwrap();
        mem.write_slice(data, GuestAddress(a + HDR_SIZE as u64))
            .unwrap();
        // Header and payload in separate descriptors, as Linux does.
        let mut bufs = vec![(a, HDR_SIZE as u32, false)];
        if !data.is_empty() {
            bufs.push((a + HDR_SIZE as u64, data.len() as u32, false));
        }
        self.drv.add_chain(TXQ, &bufs);
        self.t.device_mut().process_queue_event(TXQ);
        self.t.signal_used_if_needed();
    }

    fn recv(&mut self) -> Vec<VsockPacket> {
        self.t.signal_used_if_needed();
        let used = self.drv.take_used(RXQ);
        let mut out = Vec::new();
        for (id, len) in used {
            let a = self.rx_bufs.remove(&(id as u16)).expect("known buffer");
            let mut b = vec![0u8; len as usize];
            self.drv.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            let hdr = VsockHeader::from_bytes(b[..HDR_SIZE].try_into().unwrap());
            assert_eq!(hdr.len as usize, len as usize - HDR_SIZE);
            out.push(VsockPacket {
                hdr,
                data: b[HDR_SIZE..].to_vec(),
            });
        }
        out
    }

    fn irq_count(&self) -> u64 {
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd we own into a valid buffer.
        let n = unsafe { libc::read(self.irq, v.as_mut_ptr().cast(), 8) };
        if n == 8 {
            u64::from_ne_bytes(v)
        } else {
            0
        }
    }
}

fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn reg<B: VsockBackend>(g: &mut Guest<B>, off: u64) -> u32 {
    TestDriver::read_reg(&mut g.t, off)
}
fn wreg<B: VsockBackend>(g: &mut Guest<B>, off: u64, v: u32) {
    TestDriver::write_reg(&mut g.t, off, v)
}

// ---- virtio-mmio register protocol -------------------------------------------------------

#[test]
fn mmio_identity_registers() {
    let mut g = Guest::with_init(Fake::default(), false);
    assert_eq!(reg(&mut g, mmio::REG_MAGIC), 0x7472_6976);
    assert_eq!(reg(&mut g, mmio::REG_VERSION), 2);
    assert_eq!(reg(&mut g, mmio::REG_DEVICE_ID), 19);
    wreg(&mut g, mmio::REG_QUEUE_SEL, 0);
    assert_eq!(reg(&mut g, mmio::REG_QUEUE_NUM_MAX), 256);
    wreg(&mut g, mmio::REG_QUEUE_SEL, 7);
    assert_eq!(reg(&mut g, mmio::REG_QUEUE_NUM_MAX), 0, "nonexistent queue");
    // Config space: the guest CID, little endian, byte-wise readable.
    let mut cid = [0u8; 8];
    g.t.mmio_read(mmio::REG_CONFIG, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut b = [0u8; 2];
    g.t.mmio_read(mmio::REG_CONFIG + 0x7f0, &mut b);
    assert_eq!(b, [0, 0], "config read past the end is zero");
}

#[test]
fn mmio_wrong_width_and_unknown_registers_are_counted_not_fatal() {
    let mut g = Guest::with_init(Fake::default(), false);
    let mut b2 = [0u8; 2];
    g.t.mmio_read(mmio::REG_MAGIC, &mut b2);
    assert_eq!(b2, [0, 0]);
    g.t.mmio_write(mmio::REG_STATUS, &[1, 0]);
    assert_eq!(g.t.status(), 0);
    assert_eq!(reg(&mut g, 0x0c8), 0);
    wreg(&mut g, 0x0c8, 5);
    assert!(g.metrics.guest_errors.bad_mmio_reg.get() >= 4);
}

#[test]
fn feature_negotiation_requires_version_1_and_no_unknown_bits() {
    let mut g = Guest::with_init(Fake::default(), false);
    wreg(&mut g, mmio::REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        reg(&mut g, mmio::REG_DEVICE_FEATURES),
        1,
        "VERSION_1 offered"
    );
    wreg(&mut g, mmio::REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(reg(&mut g, mmio::REG_DEVICE_FEATURES), 0);

    let s = status::ACKNOWLEDGE | status::DRIVER;
    wreg(&mut g, mmio::REG_STATUS, status::ACKNOWLEDGE);
    wreg(&mut g, mmio::REG_STATUS, s);
    // No VERSION_1: FEATURES_OK refused.
    wreg(&mut g, mmio::REG_STATUS, s | status::FEATURES_OK);
    assert_eq!(reg(&mut g, mmio::REG_STATUS) & status::FEATURES_OK, 0);
    // Unknown feature bit: refused.
    wreg(&mut g, mmio::REG_DRIVER_FEATURES_SEL, 1);
    wreg(&mut g, mmio::REG_DRIVER_FEATURES, 1 | 4);
    wreg(&mut g, mmio::REG_STATUS, s | status::FEATURES_OK);
    assert_eq!(reg(&mut g, mmio::REG_STATUS) & status::FEATURES_OK, 0);
    // Exactly VERSION_1: accepted; later feature writes are ignored.
    wreg(&mut g, mmio::REG_DRIVER_FEATURES, 1);
    wreg(&mut g, mmio::REG_STATUS, s | status::FEATURES_OK);
    assert_ne!(reg(&mut g, mmio::REG_STATUS) & status::FEATURES_OK, 0);
    wreg(&mut g, mmio::REG_DRIVER_FEATURES, 1 | 4);
    assert!(g.metrics.guest_errors.bad_mmio_reg.get() >= 1);
}

#[test]
fn queue_setup_only_between_features_ok_and_driver_ok() {
    let mut g = Guest::with_init(Fake::default(), false);
    // Before FEATURES_OK: queue registers are ignored.
    wreg(
        &mut g,
        mmio::REG_STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    wreg(&mut g, mmio::REG_QUEUE_SEL, 0);
    wreg(&mut g, mmio::REG_QUEUE_READY, 1);
    assert_eq!(reg(&mut g, mmio::REG_QUEUE_READY), 0);
    // Full init works and activates.
    g.drv.init(&mut g.t);
    assert!(g.t.is_activated());
    assert_ne!(g.t.status() & status::DRIVER_OK, 0);
    // Status bits cannot be cleared except by reset.
    wreg(&mut g, mmio::REG_STATUS, status::ACKNOWLEDGE);
    assert_ne!(g.t.status() & status::DRIVER_OK, 0);
    // Reset, then a second init works.
    wreg(&mut g, mmio::REG_STATUS, 0);
    assert!(!g.t.is_activated());
    assert_eq!(g.t.status(), 0);
    g.drv = TestDriver::new(g.drv.mem.clone(), 3, 256);
    g.drv.init(&mut g.t);
    assert!(g.t.is_activated());
}

#[test]
fn activation_with_queue_outside_memory_sets_needs_reset() {
    let mut g = Guest::with_init(Fake::default(), false);
    let mut drv = TestDriver::new(g.drv.mem.clone(), 3, 256);
    drv.queues[1].desc = 0x4000_0000; // far beyond the 8 MiB of guest memory
    drv.init(&mut g.t);
    assert!(!g.t.is_activated());
    assert_ne!(g.t.status() & status::NEEDS_RESET, 0);
}

#[test]
fn queue_notify_without_ioeventfd_signals_the_queue_eventfd() {
    let mut g = Guest::new(Fake::default());
    wreg(&mut g, mmio::REG_QUEUE_NOTIFY, TXQ as u32);
    assert_eq!(g.t.queue_evts()[TXQ].read().unwrap(), 1);
    wreg(&mut g, mmio::REG_QUEUE_NOTIFY, 99);
    assert!(g.metrics.guest_errors.bad_mmio_reg.get() >= 1);
}

// ---- packet parsing and queues (fake backend) --------------------------------------------

#[test]
fn tx_packet_reaches_backend_with_payload() {
    let mut g = Guest::new(Fake::default());
    g.send(hdr(op::RW, 1024, 52, 5), b"hello");
    let sent = &g.t.device().backend().sent;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].hdr.op, op::RW);
    assert_eq!(sent[0].data, b"hello");
    assert_eq!(g.drv.take_used(TXQ).len(), 1);
    assert_eq!(g.metrics.vsock.tx_bytes.get(), 5);
    assert_eq!(g.irq_count(), 1, "used-ring interrupt raised");
    assert_eq!(g.t.interrupt().status() & 1, 1);
    wreg(&mut g, mmio::REG_INTERRUPT_ACK, 1);
    assert_eq!(g.t.interrupt().status(), 0);
}

#[test]
fn tx_header_split_across_descriptors_is_reassembled() {
    let mut g = Guest::new(Fake::default());
    let h = hdr(op::RW, 7, 52, 3).to_bytes();
    let a = 0x20_0000;
    g.drv.mem.write_slice(&h, GuestAddress(a)).unwrap();
    g.drv.mem.write_slice(b"xyz", GuestAddress(a + 44)).unwrap();
    // 10 + 30 + (4 header bytes + 3 data) descriptors.
    g.drv.add_chain(
        TXQ,
        &[(a, 10, false), (a + 10, 30, false), (a + 40, 7, false)],
    );
    g.t.device_mut().process_queue_event(TXQ);
    let sent = &g.t.device().backend().sent;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].hdr.src_port, 7);
    assert_eq!(sent[0].data, b"xyz");
}

#[test]
fn rx_packet_written_into_guest_buffers() {
    let mut fake = Fake::default();
    let mut h = hdr(op::RW, 52, 1024, 0);
    h.src_cid = 2;
    fake.out.push_back(VsockPacket {
        hdr: h,
        data: b"from host".to_vec(),
    });
    let mut g = Guest::new(fake);
    g.post_rx(2);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].hdr.dst_cid, GUEST_CID);
    assert_eq!(pkts[0].hdr.src_cid, 2);
    assert_eq!(pkts[0].data, b"from host");
    assert_eq!(g.metrics.vsock.rx_packets.get(), 1);
}

#[test]
fn rx_waits_for_guest_buffers() {
    let mut fake = Fake::default();
    for i in 0..3u8 {
        fake.out.push_back(VsockPacket {
            hdr: hdr(op::RW, 52, 1024, 1),
            data: vec![i],
        });
    }
    let mut g = Guest::new(fake);
    g.post_rx(1);
    assert_eq!(g.recv().len(), 1);
    assert!(g.t.device().backend().has_pending_rx());
    g.post_rx(5);
    let p = g.recv();
    assert_eq!(p.iter().map(|p| p.data[0]).collect::<Vec<_>>(), vec![1, 2]);
}

fn assert_malformed(g: &mut Guest<Fake>, before: u64) {
    assert!(
        g.metrics.vsock.malformed.get() > before,
        "malformed not counted"
    );
    assert!(
        g.t.device().backend().sent.is_empty(),
        "nothing reaches the backend"
    );
}

#[test]
fn malformed_tx_chains_are_contained() {
    let mut g = Guest::new(Fake::default());
    let a = 0x20_0000u64;
    let h = hdr(op::RW, 1, 52, 100).to_bytes();
    g.drv.mem.write_slice(&h, GuestAddress(a)).unwrap();

    // Header shorter than 44 bytes.
    let m = g.metrics.vsock.malformed.get();
    g.drv.add_chain(TXQ, &[(a, 20, false)]);
    g.t.device_mut().process_queue_event(TXQ);
    assert_malformed(&mut g, m);

    // Payload length larger than the chain.
    let m = g.metrics.vsock.malformed.get();
    g.drv.add_chain(TXQ, &[(a, 44, false), (a + 44, 10, false)]);
    g.t.device_mut().process_queue_event(TXQ);
    assert_malformed(&mut g, m);

    // Huge length field.
    let big = hdr(op::RW, 1, 52, u32::MAX).to_bytes();
    g.drv
        .mem
        .write_slice(&big, GuestAddress(a + 0x1000))
        .unwrap();
    let m = g.metrics.vsock.malformed.get();
    g.drv
        .add_chain(TXQ, &[(a + 0x1000, 44, false), (a, 0xffff_ffff, false)]);
    g.t.device_mut().process_queue_event(TXQ);
    assert_malformed(&mut g, m);

    // Device-writable descriptor in a TX chain.
    let m = g.metrics.vsock.malformed.get();
    g.drv.add_chain(TXQ, &[(a, 44, true)]);
    g.t.device_mut().process_queue_event(TXQ);
    assert_malformed(&mut g, m);

    // Descriptor pointing outside guest memory.
    let m = g.metrics.vsock.malformed.get();
    g.drv.add_chain(TXQ, &[(0x7fff_0000_0000, 44, false)]);
    g.t.device_mut().process_queue_event(TXQ);
    assert_malformed(&mut g, m);

    // A descriptor loop (next points back to itself): bounded, not a hang.
    let m = g.metrics.vsock.malformed.get();
    g.drv.add_raw(TXQ, &[(a, 8, 1, 0)], false);
    g.t.device_mut().process_queue_event(TXQ);
    assert_malformed(&mut g, m);

    // Every chain was returned to the guest.
    assert_eq!(g.drv.take_used(TXQ).len(), 6);
}

#[test]
fn packets_with_wrong_cids_are_dropped() {
    let mut g = Guest::new(Fake::default());
    let mut h = hdr(op::REQUEST, 1, 52, 0);
    h.src_cid = 99;
    g.send(h, b"");
    let mut h = hdr(op::REQUEST, 1, 52, 0);
    h.dst_cid = 7;
    g.send(h, b"");
    assert!(g.t.device().backend().sent.is_empty());
    assert_eq!(g.metrics.vsock.malformed.get(), 2);
}

#[test]
fn malformed_rx_chains_are_returned_unused() {
    let mut fake = Fake::default();
    fake.out.push_back(VsockPacket {
        hdr: hdr(op::RW, 52, 1, 1),
        data: vec![1],
    });
    let mut g = Guest::new(fake);
    // Read-only buffer in RX, then one too small for a header.
    g.drv.add_chain(RXQ, &[(0x30_0000, 100, false)]);
    g.drv.add_chain(RXQ, &[(0x30_1000, 10, true)]);
    g.t.device_mut().process_queue_event(RXQ);
    let used = g.drv.take_used(RXQ);
    assert_eq!(used, vec![(0, 0), (1, 0)]);
    assert_eq!(g.metrics.vsock.malformed.get(), 2);
    assert!(
        g.t.device().backend().has_pending_rx(),
        "packet kept for a good buffer"
    );
}

#[test]
fn avail_ring_overflow_is_contained() {
    let mut g = Guest::new(Fake::default());
    g.drv.set_avail_idx(TXQ, 1000); // more entries than the queue holds
    g.t.device_mut().process_queue_event(TXQ);
    assert!(g.metrics.vsock.malformed.get() >= 1);
    assert!(g.t.device().backend().sent.is_empty());
}

// ---- the Unix muxer over real sockets ----------------------------------------------------

fn uds_path(tag: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    d.join(format!("v{}-{tag}.sock", std::process::id()))
}

fn muxer_guest(tag: &str) -> (Guest<VsockMuxer>, PathBuf) {
    let uds = uds_path(tag);
    let metrics = Arc::new(Metrics::default());
    let m = VsockMuxer::new(GUEST_CID, &uds, metrics).unwrap();
    let mut g = Guest::new(m);
    g.post_rx(64);
    (g, uds)
}

/// Lets host-side events land, then runs the backend and collects guest packets: waits up
/// to 2 s for the first packet, then until the flow has been quiet for a few rounds.
fn pump(g: &mut Guest<VsockMuxer>) -> Vec<VsockPacket> {
    pump_for(g, 1000)
}

/// Like [`pump`] but gives up after ~40 ms: for asserting that nothing arrives.
fn pump_quiet(g: &mut Guest<VsockMuxer>) -> Vec<VsockPacket> {
    pump_for(g, 20)
}

fn pump_for(g: &mut Guest<VsockMuxer>, max_wait_rounds: usize) -> Vec<VsockPacket> {
    let mut out = Vec::new();
    let mut quiet = 0;
    for _ in 0..max_wait_rounds {
        std::thread::sleep(Duration::from_millis(2));
        g.t.device_mut().process_backend_event();
        let got = g.recv();
        if !got.is_empty() {
            quiet = 0;
            let n = got.len();
            out.extend(got);
            g.post_rx(n);
        } else if !out.is_empty() {
            quiet += 1;
            if quiet >= 3 {
                break;
            }
        }
    }
    out
}

fn collect_rx(g: &mut Guest<VsockMuxer>) -> Vec<VsockPacket> {
    let p = g.recv();
    let n = p.len();
    g.post_rx(n);
    p
}

fn listen_port(uds: &std::path::Path, port: u32) -> UnixListener {
    let p = format!("{}_{port}", uds.display());
    let _ = std::fs::remove_file(&p);
    UnixListener::bind(p).unwrap()
}

#[test]
fn guest_initiated_connection_lifecycle() {
    let (mut g, uds) = muxer_guest("gi");
    let l = listen_port(&uds, 52);
    g.send(hdr(op::REQUEST, 1024, 52, 0), b"");
    let p = collect_rx(&mut g);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].hdr.op, op::RESPONSE);
    assert_eq!((p[0].hdr.src_port, p[0].hdr.dst_port), (52, 1024));
    assert_eq!(p[0].hdr.buf_alloc, CONN_BUF_ALLOC);
    let (mut host, _) = l.accept().unwrap();

    g.send(hdr(op::RW, 1024, 52, 5), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").unwrap();
    let p = pump(&mut g);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].hdr.op, op::RW);
    assert_eq!(p[0].data, b"world");

    // Host closes: guest gets SHUTDOWN; guest answers RST; connection is gone.
    drop(host);
    let p = pump(&mut g);
    assert_eq!(p.last().unwrap().hdr.op, op::SHUTDOWN);
    g.send(hdr(op::RST, 1024, 52, 0), b"");
    assert_eq!(g.t.device().backend().conn_count(), 0);
}

#[test]
fn guest_connect_to_missing_listener_gets_rst() {
    let (mut g, _uds) = muxer_guest("norst");
    g.send(hdr(op::REQUEST, 1024, 4444, 0), b"");
    let p = collect_rx(&mut g);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].hdr.op, op::RST);
}

#[test]
fn unknown_connection_packets_get_rst() {
    let (mut g, _uds) = muxer_guest("unk");
    g.send(hdr(op::RW, 1, 2, 3), b"abc");
    let p = collect_rx(&mut g);
    assert_eq!(p[0].hdr.op, op::RST);
    // A RST for an unknown connection is not answered.
    g.send(hdr(op::RST, 1, 2, 0), b"");
    assert!(collect_rx(&mut g).is_empty());
}

#[test]
fn host_initiated_connect_handshake() {
    let (mut g, uds) = muxer_guest("hi");
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 5000\nearly").unwrap();
    let p = pump(&mut g);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].hdr.op, op::REQUEST);
    assert_eq!(p[0].hdr.dst_port, 5000);
    let hp = p[0].hdr.src_port;
    assert!(hp >= HOST_PORT_BASE);
    // Guest accepts.
    g.send(hdr(op::RESPONSE, 5000, hp, 0), b"");
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        host.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    assert_eq!(String::from_utf8(line).unwrap(), format!("OK {hp}\n"));
    // Bytes sent with the CONNECT line reach the guest.
    let p = pump(&mut g);
    assert_eq!(p[0].hdr.op, op::RW);
    assert_eq!(p[0].data, b"early");
    // Guest → host.
    g.send(hdr(op::RW, 5000, hp, 4), b"pong");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    // Guest resets: host sees EOF.
    g.send(hdr(op::RST, 5000, hp, 0), b"");
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn bad_connect_line_closes_host_stream() {
    let (mut g, uds) = muxer_guest("badc");
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"HELLO 5000\n").unwrap();
    assert!(pump_quiet(&mut g).is_empty());
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    // An over-long line without a newline is also refused.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(&[b'C'; 100]).unwrap();
    pump_quiet(&mut g);
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // Closed with unread bytes: EOF or ECONNRESET, never a hang.
    match host.read_to_end(&mut rest) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert_eq!(g.t.device().backend().conn_count(), 0);
}

#[test]
fn flow_control_respects_guest_credit() {
    let (mut g, uds) = muxer_guest("fc");
    let l = listen_port(&uds, 60);
    let mut h = hdr(op::REQUEST, 2000, 60, 0);
    h.buf_alloc = 1000; // the guest can hold 1000 bytes
    g.send(h, b"");
    assert_eq!(collect_rx(&mut g)[0].hdr.op, op::RESPONSE);
    let (mut host, _) = l.accept().unwrap();
    host.write_all(&vec![7u8; 5000]).unwrap();
    let got: usize = pump(&mut g).iter().map(|p| p.data.len()).sum();
    assert_eq!(got, 1000, "never more than the guest's credit");
    assert!(
        pump_quiet(&mut g).is_empty(),
        "stalled until credit returns"
    );
    // Guest consumed 1000 bytes: credit update unblocks the next 1000.
    let mut cu = hdr(op::CREDIT_UPDATE, 2000, 60, 0);
    cu.buf_alloc = 1000;
    cu.fwd_cnt = 1000;
    g.send(cu, b"");
    let got: usize = pump(&mut g).iter().map(|p| p.data.len()).sum();
    assert_eq!(got, 1000);
    // CREDIT_REQUEST is answered with our credit.
    let mut cr = hdr(op::CREDIT_REQUEST, 2000, 60, 0);
    cr.buf_alloc = 1000;
    cr.fwd_cnt = 2000;
    g.send(cr, b"");
    let p = collect_rx(&mut g);
    assert!(p.iter().any(|p| p.hdr.op == op::CREDIT_UPDATE), "{:?}", p);
}

#[test]
fn guest_overrunning_host_credit_is_reset() {
    let (mut g, uds) = muxer_guest("over");
    let l = listen_port(&uds, 61);
    g.send(hdr(op::REQUEST, 2001, 61, 0), b"");
    collect_rx(&mut g);
    let (_host, _) = l.accept().unwrap(); // never reads
    let chunk = vec![1u8; 60 * 1024];
    for _ in 0..12 {
        g.send(hdr(op::RW, 2001, 61, chunk.len() as u32), &chunk);
    }
    let p = collect_rx(&mut g);
    assert!(p.iter().any(|p| p.hdr.op == op::RST), "overrun must reset");
    assert_eq!(g.t.device().backend().conn_count(), 0);
}

#[test]
fn host_gets_credit_updates_as_it_drains() {
    let (mut g, uds) = muxer_guest("cu");
    let l = listen_port(&uds, 62);
    g.send(hdr(op::REQUEST, 2002, 62, 0), b"");
    collect_rx(&mut g);
    let (mut host, _) = l.accept().unwrap();
    let chunk = vec![2u8; 32 * 1024];
    let mut seen_update = false;
    let mut fwd = 0u32;
    for _ in 0..8 {
        g.send(hdr(op::RW, 2002, 62, chunk.len() as u32), &chunk);
        let mut b = vec![0u8; chunk.len()];
        host.read_exact(&mut b).unwrap();
        for p in collect_rx(&mut g) {
            if p.hdr.op == op::CREDIT_UPDATE {
                seen_update = true;
                fwd = p.hdr.fwd_cnt;
            }
        }
    }
    assert!(
        seen_update,
        "credit update sent after a quarter of the buffer"
    );
    assert!(fwd >= CONN_BUF_ALLOC / 4);
}

#[test]
fn many_concurrent_connections() {
    let (mut g, uds) = muxer_guest("many");
    let l = listen_port(&uds, 70);
    let n = 100u32;
    for i in 0..n {
        g.send(hdr(op::REQUEST, 10_000 + i, 70, 0), b"");
    }
    let mut responses = 0;
    for _ in 0..10 {
        responses += collect_rx(&mut g)
            .iter()
            .filter(|p| p.hdr.op == op::RESPONSE)
            .count();
    }
    assert_eq!(responses, n as usize);
    let mut hosts: Vec<UnixStream> = (0..n).map(|_| l.accept().unwrap().0).collect();
    for i in 0..n {
        g.send(hdr(op::RW, 10_000 + i, 70, 4), &i.to_le_bytes());
    }
    // Each host stream got exactly its connection's bytes (accept order = request order).
    let mut seen: Vec<u32> = hosts
        .iter_mut()
        .map(|h| {
            let mut b = [0u8; 4];
            h.read_exact(&mut b).unwrap();
            u32::from_le_bytes(b)
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    for h in hosts.iter_mut() {
        h.write_all(b"x").unwrap();
    }
    let mut got = 0;
    for _ in 0..10 {
        got += pump(&mut g).iter().filter(|p| p.hdr.op == op::RW).count();
        if got == n as usize {
            break;
        }
    }
    assert_eq!(got, n as usize);
    assert_eq!(g.t.device().backend().conn_count(), n as usize);
}

#[test]
fn guest_shutdown_closes_host_side() {
    let (mut g, uds) = muxer_guest("shut");
    let l = listen_port(&uds, 63);
    g.send(hdr(op::REQUEST, 2003, 63, 0), b"");
    collect_rx(&mut g);
    let (mut host, _) = l.accept().unwrap();
    g.send(hdr(op::RW, 2003, 63, 3), b"bye");
    let mut sd = hdr(op::SHUTDOWN, 2003, 63, 0);
    sd.flags = 3;
    g.send(sd, b"");
    let p = collect_rx(&mut g);
    assert_eq!(p.last().unwrap().hdr.op, op::RST);
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"bye");
}

#[test]
fn stale_socket_is_replaced_at_start() {
    let uds = uds_path("stale");
    let _old = UnixListener::bind(&uds).unwrap();
    drop(_old); // leaves the socket file behind
    assert!(uds.exists());
    let m = VsockMuxer::new(GUEST_CID, &uds, Arc::new(Metrics::default()));
    assert!(m.is_ok(), "{:?}", m.err());
}

#[test]
fn guest_refusing_host_connect_closes_host_stream() {
    let (mut g, uds) = muxer_guest("refuse");
    let mut host = UnixStream::connect(&uds).unwrap();
    host.write_all(b"CONNECT 7000\n").unwrap();
    let p = pump(&mut g);
    assert_eq!(p[0].hdr.op, op::REQUEST);
    // The guest has no listener on 7000: it answers RST.
    g.send(hdr(op::RST, 7000, p[0].hdr.src_port, 0), b"");
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        host.read_to_end(&mut rest).unwrap(),
        0,
        "no OK line, just EOF"
    );
    assert_eq!(g.t.device().backend().conn_count(), 0);
}

#[test]
fn large_transfer_both_directions_is_byte_exact() {
    let (mut g, uds) = muxer_guest("large");
    let l = listen_port(&uds, 64);
    g.send(hdr(op::REQUEST, 3000, 64, 0), b"");
    collect_rx(&mut g);
    let (host, _) = l.accept().unwrap();
    // Host -> guest: 1 MiB, the guest returning credit as it consumes.
    let data: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 + 3) as u8).collect();
    let writer = {
        let mut h = host.try_clone().unwrap();
        let d = data.clone();
        std::thread::spawn(move || h.write_all(&d).unwrap())
    };
    let mut got = Vec::new();
    for _ in 0..5000 {
        for p in pump(&mut g) {
            if p.hdr.op == op::RW {
                got.extend_from_slice(&p.data);
            }
        }
        let mut cu = hdr(op::CREDIT_UPDATE, 3000, 64, 0);
        cu.fwd_cnt = got.len() as u32;
        g.send(cu, b"");
        if got.len() == data.len() {
            break;
        }
    }
    writer.join().unwrap();
    assert!(
        got == data,
        "host -> guest bytes differ ({} of {})",
        got.len(),
        data.len()
    );
    // Guest -> host: 1 MiB in 4 KiB packets.
    let reader = {
        let mut h = host.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 1_048_576];
            h.read_exact(&mut b).unwrap();
            b
        })
    };
    // Respect the muxer's credit like a real driver: track its fwd_cnt.
    let (mut sent, mut host_fwd) = (0u32, 0u32);
    for chunk in data.chunks(4096) {
        let mut spins = 0;
        while sent - host_fwd + chunk.len() as u32 > CONN_BUF_ALLOC {
            spins += 1;
            assert!(spins < 2000, "credit never returned");
            g.t.device_mut().process_backend_event();
            let mut got_any = false;
            for p in collect_rx(&mut g) {
                host_fwd = host_fwd.max(p.hdr.fwd_cnt);
                got_any = true;
            }
            if !got_any {
                g.send(hdr(op::CREDIT_REQUEST, 3000, 64, 0), b"");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        g.send(hdr(op::RW, 3000, 64, chunk.len() as u32), chunk);
        sent += chunk.len() as u32;
        for p in collect_rx(&mut g) {
            host_fwd = host_fwd.max(p.hdr.fwd_cnt);
        }
    }
    for _ in 0..200 {
        if reader.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        g.t.device_mut().process_backend_event();
    }
    assert!(reader.join().unwrap() == data, "guest -> host bytes differ");
    host.shutdown(std::net::Shutdown::Both).unwrap();
}
