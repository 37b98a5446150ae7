//! The 8250 UART (vm-superio) with a counting, line-flushed output sink.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::IrqLine;
use crate::metrics::Metrics;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 IRQ.
pub const COM1_IRQ: u32 = 4;

/// Output sink: counts bytes, flushes on newline.
pub struct SerialOut {
    inner: Box<dyn Write + Send>,
    metrics: Arc<Metrics>,
}

impl SerialOut {
    /// Wraps a writer.
    pub fn new(inner: Box<dyn Write + Send>, metrics: Arc<Metrics>) -> Self {
        SerialOut { inner, metrics }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.metrics.serial_tx_bytes.add(buf.len() as u64);
        // Output errors (closed pipe) must not stop the guest: swallow them.
        let _ = self.inner.write_all(buf);
        if buf.contains(&b'\n') {
            let _ = self.inner.flush();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.inner.flush();
        Ok(())
    }
}

/// The serial device as wired into the VM.
pub type SerialDevice = Serial<IrqLine, NoEvents, SerialOut>;

/// Creates COM1.
pub fn new_serial(irq: IrqLine, out: SerialOut) -> SerialDevice {
    Serial::new(irq, out)
}
