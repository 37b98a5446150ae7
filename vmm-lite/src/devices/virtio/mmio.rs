//! virtio-mmio (version 2) transport.
//!
//! The register protocol is enforced: feature and queue registers are honoured only in the
//! device status phase where the spec allows them, accesses of the wrong width are counted
//! and ignored, and a queue configuration that is not valid in guest memory fails
//! activation with DEVICE_NEEDS_RESET instead of touching memory outside the guest.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::IrqLine;
use crate::metrics::Metrics;

/// Size of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// "virt" magic.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Vendor id we report.
pub const VENDOR_ID: u32 = 0x564d_4d4c; // "LMMV"

/// Register offsets.
pub const REG_MAGIC: u64 = 0x000;
/// Version register.
pub const REG_VERSION: u64 = 0x004;
/// Device id register.
pub const REG_DEVICE_ID: u64 = 0x008;
/// Vendor id register.
pub const REG_VENDOR_ID: u64 = 0x00c;
/// Device features (selected word).
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// Device features word select.
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// Driver features (selected word).
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// Driver features word select.
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// Queue select.
pub const REG_QUEUE_SEL: u64 = 0x030;
/// Queue max size.
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// Queue size.
pub const REG_QUEUE_NUM: u64 = 0x038;
/// Queue ready.
pub const REG_QUEUE_READY: u64 = 0x044;
/// Queue notify.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// Interrupt status.
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// Interrupt acknowledge.
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Device status.
pub const REG_STATUS: u64 = 0x070;
/// Descriptor table low.
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// Descriptor table high.
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// Available ring low.
pub const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
/// Available ring high.
pub const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
/// Used ring low.
pub const REG_QUEUE_USED_LOW: u64 = 0x0a0;
/// Used ring high.
pub const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
/// Config generation.
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of device config space.
pub const REG_CONFIG: u64 = 0x100;

/// Device status bits.
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const NEEDS_RESET: u32 = 64;
    /// FAILED.
    pub const FAILED: u32 = 128;
}

/// A virtio device behind an MMIO window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    metrics: Arc<Metrics>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    status: u32,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    config_generation: u32,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, with `irq` as its interrupt line.
    pub fn new(device: D, irq: IrqLine, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            // Queue::new only fails for a max size that is zero, too big or not a power of 2,
            // which is a programming error in the device; fall back to 256.
            queues.push(Queue::new(max).or_else(|_| Queue::new(256)).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            metrics,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            queue_evts,
            status: 0,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }
    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }
    /// One eventfd per queue, signalled on QUEUE_NOTIFY (directly by KVM when registered as
    /// ioeventfds).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }
    /// Current device status.
    pub fn status(&self) -> u32 {
        self.status
    }
    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }
    /// The interrupt (for tests).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }
    /// Raises the used-ring interrupt if the device produced used entries.
    pub fn signal_used_if_needed(&mut self) {
        if self.activated {
            self.device.flush_interrupt();
        }
    }

    fn bad(&self, what: &str, offset: u64) {
        self.metrics.guest_errors.bad_mmio_reg.inc();
        crate::guest_warn!("virtio-mmio: {what} at offset {offset:#x}");
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// Guest MMIO read at `offset` within the window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            self.bad("register read of wrong width", offset);
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => 2,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map(|q| q.max_size()).unwrap_or(0) as u32,
            REG_QUEUE_READY => self.selected_queue().map(|q| q.ready()).unwrap_or(false) as u32,
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.bad("read of unknown or write-only register", offset);
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest MMIO write at `offset` within the window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - REG_CONFIG, data);
            } else {
                self.bad("config write before DRIVER", offset);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad("register write of wrong width", offset);
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let features_phase = self.status & status::DRIVER != 0
            && self.status & (status::FEATURES_OK | status::FAILED) == 0;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if features_phase => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= u64::from(v) << shift;
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v.min(u32::from(u16::MAX)) as u16);
                }
            }
            REG_QUEUE_READY if self.queue_config_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW | REG_QUEUE_USED_HIGH
                if self.queue_config_allowed() =>
            {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        REG_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            REG_QUEUE_NOTIFY => {
                // Only reached when the notify is not handled by a KVM ioeventfd.
                match self.queue_evts.get(v as usize) {
                    Some(evt) => {
                        let _ = evt.write(1);
                    }
                    None => self.bad("notify of a nonexistent queue", offset),
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            _ => self.bad(
                "write to unknown register or in the wrong device state",
                offset,
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, never cleared (except by reset).
        if v & self.status != self.status {
            self.bad("status write clearing bits", REG_STATUS);
            return;
        }
        let new = v & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Refuse: the driver reads FEATURES_OK back and sees it unset.
                self.status = v & !status::FEATURES_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            let queues = std::mem::take(&mut self.queues);
            let maxes: Vec<u16> = queues.iter().map(|q| q.max_size()).collect();
            match self.device.activate(queues, self.interrupt.clone()) {
                Ok(()) => self.activated = true,
                Err(e) => {
                    crate::guest_warn!("virtio-mmio: activation failed: {e}");
                    self.metrics.guest_errors.bad_mmio_reg.inc();
                    self.status |= status::NEEDS_RESET;
                    self.interrupt.signal(super::VIRTIO_MMIO_INT_CONFIG);
                }
            }
            if !self.activated {
                self.queues = maxes
                    .into_iter()
                    .filter_map(|m| Queue::new(m).ok())
                    .collect();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.interrupt.reset();
        self.queues = self
            .device
            .queue_max_sizes()
            .iter()
            .filter_map(|&m| Queue::new(m).ok())
            .collect();
    }
}
