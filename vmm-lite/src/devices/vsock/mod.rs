//! virtio-vsock: the device model, generic over its backend.
//!
//! The device moves packets between the guest's queues and a [`VsockBackend`]. It owns no
//! connection state: that lives in the backend (the Unix-socket [`muxer::VsockMuxer`] in
//! production, a scripted fake in tests), so the queue handling is tested with plain guest
//! memory and no KVM.

pub mod muxer;
pub mod packet;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use self::packet::{read_tx_chain, RxBuffers, VsockPacket, HDR_SIZE, HOST_CID, MAX_PKT_DATA};
use crate::boot::GuestMem;
use crate::devices::virtio::{
    ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::metrics::Metrics;

/// virtio device id of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// RX queue index.
pub const RXQ: usize = 0;
/// TX queue index.
pub const TXQ: usize = 1;
/// Event queue index.
pub const EVQ: usize = 2;

/// The host side of the device: connection state machine and host I/O.
pub trait VsockBackend: Send {
    /// Handles a packet the guest sent (already bounds-checked, CIDs validated).
    fn send_pkt(&mut self, pkt: &VsockPacket);
    /// Fills `pkt` with the next packet for the guest, payload at most `max_data` bytes.
    /// Returns false when nothing is pending.
    fn recv_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize) -> bool;
    /// Whether [`recv_pkt`](Self::recv_pkt) would produce a packet.
    fn has_pending_rx(&self) -> bool;
    /// A file descriptor that becomes readable when the backend has host events.
    fn as_raw_fd(&self) -> RawFd;
    /// Processes ready host events without blocking.
    fn process_events(&mut self);
}

/// The virtio-vsock device.
pub struct VsockDevice<B: VsockBackend> {
    cid: u64,
    mem: GuestMem,
    backend: B,
    metrics: Arc<Metrics>,
    acked_features: u64,
    queues: Vec<Queue>,
    interrupt: Option<Arc<Interrupt>>,
    used_pending: bool,
    rx_pkt: VsockPacket,
    tx_pkt: VsockPacket,
}

impl<B: VsockBackend> VsockDevice<B> {
    /// New device for guest `cid`.
    pub fn new(
        cid: u64,
        mem: GuestMem,
        backend: B,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Ok(VsockDevice {
            cid,
            mem,
            backend,
            metrics,
            acked_features: 0,
            queues: Vec::new(),
            interrupt: None,
            used_pending: false,
            rx_pkt: VsockPacket {
                data: Vec::with_capacity(MAX_PKT_DATA),
                ..Default::default()
            },
            tx_pkt: VsockPacket {
                data: Vec::with_capacity(MAX_PKT_DATA),
                ..Default::default()
            },
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }
    /// The backend's pollable fd.
    pub fn backend_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }
    /// Whether activated.
    pub fn is_active(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Handles a notification on queue `q`.
    pub fn process_queue_event(&mut self, q: usize) {
        if !self.is_active() {
            return;
        }
        match q {
            TXQ => {
                self.process_tx();
                self.process_rx();
            }
            RXQ => self.process_rx(),
            _ => {}
        }
    }

    /// Handles host-side events, then delivers whatever became pending.
    pub fn process_backend_event(&mut self) {
        self.backend.process_events();
        if self.is_active() {
            self.process_rx();
        }
    }

    /// Drains the TX queue into the backend.
    pub fn process_tx(&mut self) {
        let mem = &self.mem;
        let Some(q) = self.queues.get_mut(TXQ) else {
            return;
        };
        loop {
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.metrics.vsock.malformed.inc();
                    crate::guest_warn!("vsock: TX queue unusable: {e}");
                    return;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            match read_tx_chain(chain, mem, &mut self.tx_pkt) {
                Ok(()) => {
                    let h = &self.tx_pkt.hdr;
                    if h.src_cid != self.cid || h.dst_cid != HOST_CID {
                        self.metrics.vsock.malformed.inc();
                        crate::guest_warn!(
                            "vsock: dropping packet {} -> {} (guest cid {})",
                            h.src_cid,
                            h.dst_cid,
                            self.cid
                        );
                    } else {
                        self.metrics.vsock.tx_packets.inc();
                        self.metrics
                            .vsock
                            .tx_bytes
                            .add(self.tx_pkt.data.len() as u64);
                        self.backend.send_pkt(&self.tx_pkt);
                    }
                }
                Err(e) => {
                    self.metrics.vsock.malformed.inc();
                    crate::guest_warn!("vsock: bad TX descriptor chain: {e}");
                }
            }
            if q.add_used(mem, head, 0).is_err() {
                self.metrics.vsock.malformed.inc();
                return;
            }
            self.used_pending = true;
        }
    }

    /// Fills RX buffers from the backend while both are available.
    pub fn process_rx(&mut self) {
        let mem = &self.mem;
        let Some(q) = self.queues.get_mut(RXQ) else {
            return;
        };
        while self.backend.has_pending_rx() {
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.metrics.vsock.malformed.inc();
                    crate::guest_warn!("vsock: RX queue unusable: {e}");
                    return;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let bufs = match RxBuffers::from_chain(chain, mem) {
                Ok(b) => b,
                Err(e) => {
                    self.metrics.vsock.malformed.inc();
                    crate::guest_warn!("vsock: bad RX descriptor chain: {e}");
                    if q.add_used(mem, head, 0).is_err() {
                        return;
                    }
                    self.used_pending = true;
                    continue;
                }
            };
            let max_data = (bufs.capacity - HDR_SIZE).min(MAX_PKT_DATA);
            if !self.backend.recv_pkt(&mut self.rx_pkt, max_data) {
                q.go_to_previous_position();
                break;
            }
            let pkt = &mut self.rx_pkt;
            pkt.data.truncate(max_data);
            pkt.hdr.len = pkt.data.len() as u32;
            pkt.hdr.dst_cid = self.cid;
            pkt.hdr.src_cid = HOST_CID;
            let hdr = pkt.hdr.to_bytes();
            let written = match bufs.write_packet(mem, &hdr, &pkt.data) {
                Ok(n) => n,
                Err(_) => {
                    self.metrics.vsock.malformed.inc();
                    0
                }
            };
            self.metrics.vsock.rx_packets.inc();
            self.metrics.vsock.rx_bytes.add(pkt.data.len() as u64);
            if q.add_used(mem, head, written as u32).is_err() {
                return;
            }
            self.used_pending = true;
        }
    }
}

impl<B: VsockBackend> VirtioDevice for VsockDevice<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The guest CID is read-only.
        self.metrics.guest_errors.bad_mmio_reg.inc();
    }
    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        for (i, q) in queues.iter().enumerate().take(2) {
            if !q.is_valid(&self.mem) {
                return Err(ActivateError::BadQueue(i));
            }
        }
        self.queues = queues;
        self.interrupt = Some(interrupt);
        // Deliver anything the backend queued before the driver was ready.
        self.process_rx();
        Ok(())
    }
    fn reset(&mut self) {
        self.queues.clear();
        self.interrupt = None;
        self.used_pending = false;
    }
    fn flush_interrupt(&mut self) {
        if self.used_pending {
            self.used_pending = false;
            if let Some(i) = &self.interrupt {
                i.signal(VIRTIO_MMIO_INT_VRING);
            }
        }
    }
}

// Keep the Bytes import used for tests in this module.
#[allow(unused_imports)]
use Bytes as _;
