//! Boot-timer marker: the guest writes a magic byte and the VMM records the time.
//!
//! Same idea as Firecracker's boot timer: an init (or a tiny guest) writes
//! [`BOOT_TIMER_MAGIC`] to offset 0 of the device's MMIO page; the VMM records the time since
//! its own process start as the `boot_timer` phase and logs it once.

use std::sync::Arc;

use crate::metrics::Metrics;

/// MMIO address of the boot-timer page.
pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
/// Size of the MMIO window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// Value the guest writes.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The boot-timer device.
#[derive(Debug)]
pub struct BootTimer {
    metrics: Arc<Metrics>,
    quiet: bool,
}

impl BootTimer {
    /// New device recording into `metrics`; `quiet` suppresses the log line.
    pub fn new(metrics: Arc<Metrics>, quiet: bool) -> Self {
        BootTimer { metrics, quiet }
    }

    /// MMIO write at `offset` within the page.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            let first = self.metrics.boot_timer.get_us().is_none();
            self.metrics.boot_timer.mark(self.metrics.start);
            if first && !self.quiet {
                let us = self.metrics.boot_timer.get_us().unwrap_or_default();
                eprintln!("vmm-lite: boot-timer: guest marker at {us:.0} us since VMM start");
            }
        }
    }

    /// MMIO read: always zero.
    pub fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}
