//! virtio: the device trait and the MMIO transport.

pub mod mmio;
pub mod test_driver;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;

use super::IrqLine;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: used ring updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// Interrupt status bit: configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// The interrupt shared by a transport and its device.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: IrqLine,
}

impl Interrupt {
    /// New interrupt on `irq`.
    pub fn new(irq: IrqLine) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }
    /// Sets `bits` in the interrupt status and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        let _ = self.irq.trigger();
    }
    /// Current status.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// Why activation failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs is not ready or not valid in guest memory.
    #[error("queue {0} is not ready or not valid")]
    BadQueue(usize),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// virtio device id (vsock = 19).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of the offer).
    fn set_acked_features(&mut self, features: u64);
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Resets the device, returning it to the pre-activation state.
    fn reset(&mut self);
    /// Signals the used-ring interrupt if the device produced used entries since last call.
    fn flush_interrupt(&mut self);
}
