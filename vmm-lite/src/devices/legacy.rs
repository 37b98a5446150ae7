//! Legacy port-I/O devices: the i8042 (reset line only) and a debug exit port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::ExitHandle;
use crate::metrics::Metrics;

/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;
/// Command that pulses the CPU reset line (output port bit 0).
pub const I8042_RESET_CMD: u8 = 0xfe;
/// Command: the next byte written to the data port becomes the output port.
pub const I8042_WRITE_OUTPUT_CMD: u8 = 0xd1;
/// Status bit: output buffer full (a byte waits at the data port).
pub const I8042_STR_OBF: u8 = 0x01;
/// Status bit: input buffer full (the controller has not taken the last byte yet).
pub const I8042_STR_IBF: u8 = 0x02;
/// Status register value: output buffer full, input buffer empty, nothing else.
pub const I8042_STATUS: u8 = I8042_STR_OBF;
/// What a data port read returns: an undriven bus.
pub const I8042_DATA_VALUE: u8 = 0xff;
/// Debug exit port: a byte written here ends the VMM with that byte as exit status.
pub const EXIT_PORT: u16 = 0x501;

/// An i8042 with no keyboard or mouse behind it, shaped so that a driver concludes at once
/// that there is no controller, while the CPU reset line works.
///
/// State model (reads never change state):
///
/// | access | result |
/// |---|---|
/// | read 0x64 (status) | [`I8042_STATUS`]: OBF set, IBF clear, always |
/// | read 0x60 (data) | [`I8042_DATA_VALUE`]; the output buffer stays full |
/// | write 0x64 `0xf0..=0xfe`, bit 0 clear (pulse output lines, 0xfe in practice) | CPU reset: the VM stops with code 0 |
/// | write 0x64 `0xd1`, then 0x60 a byte with bit 0 clear | output port written with the reset line low: CPU reset |
/// | any other write | taken at once (IBF never rises) and ignored; a pending `0xd1` is cancelled by a command |
///
/// Why these values. Linux's `i8042_controller_check()` flushes the output buffer: it reads
/// the data port while the status shows OBF, and after 16 reads (`I8042_BUFFER_SIZE`) with
/// OBF still set gives up with "No controller found" (33 port reads, under 1 ms). A status
/// of 0 (what this device answered before) makes the flush succeed, and Linux then polls the
/// status port for ~10,000 reads waiting for the controller to answer a CTR read (1-2 s of
/// boot). The reboot path (`reboot=k`) polls the status until IBF is clear (`kb_wait()`,
/// up to 131 ms) and then writes 0xfe to 0x64: with IBF never set that takes one read. A
/// floating bus (0xff) would look absent too, but would make every reboot wait the full
/// 131 ms.
///
/// Boot code that empties the controller before enabling A20 through it (the 16-bit setup
/// code's `empty_8042()`) would keep reading; it is not run here: vmm-lite enters the kernel
/// through the 64-bit boot protocol or PVH, and A20 is always enabled under KVM.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitHandle>,
    metrics: Arc<Metrics>,
    /// A `0xd1` command was written: the next data byte is the output port.
    output_port_next: AtomicBool,
}

impl I8042 {
    /// New controller bound to the stop latch; a reset marks the `guest_stop` phase.
    pub fn new(exit: Arc<ExitHandle>, metrics: Arc<Metrics>) -> Self {
        I8042 {
            exit,
            metrics,
            output_port_next: AtomicBool::new(false),
        }
    }

    /// Port read.
    pub fn read(&self, port: u16) -> u8 {
        match port {
            I8042_CMD => I8042_STATUS,
            _ => I8042_DATA_VALUE,
        }
    }

    /// Port write. Returns true when the write pulsed the CPU reset line (the VM stops).
    pub fn write(&self, port: u16, value: u8) -> bool {
        let reset = match port {
            I8042_CMD => {
                self.output_port_next
                    .store(value == I8042_WRITE_OUTPUT_CMD, Ordering::Relaxed);
                // 0xf0-0xff pulse the output port bits whose mask bit is 0; bit 0 is reset.
                value & 0xf0 == 0xf0 && value & 1 == 0
            }
            I8042_DATA => self.output_port_next.swap(false, Ordering::Relaxed) && value & 1 == 0,
            _ => false,
        };
        if reset {
            self.metrics.guest_stop.mark(self.metrics.start);
            self.exit.request("i8042-reset", 0);
        }
        reset
    }
}

/// The debug exit port (like QEMU's isa-debug-exit, but the status is the byte itself).
#[derive(Debug)]
pub struct ExitPort {
    exit: Arc<ExitHandle>,
}

impl ExitPort {
    /// New port.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        ExitPort { exit }
    }
    /// Port write: stop with `value` as the exit code.
    pub fn write(&self, value: u8) {
        self.exit.request("exit-port", i32::from(value));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn dev() -> (Arc<ExitHandle>, I8042) {
        let e = ExitHandle::new().unwrap();
        let m = Arc::new(Metrics::new(Instant::now()));
        (e.clone(), I8042::new(e, m))
    }

    /// Linux's i8042_flush(): read data while OBF is set, give up after 16 bytes.
    /// Returns (data reads, "No controller found").
    fn linux_flush(k: &I8042) -> (u32, bool) {
        let mut reads = 0;
        while k.read(I8042_CMD) & I8042_STR_OBF != 0 {
            if reads == 16 {
                return (reads, true);
            }
            k.read(I8042_DATA);
            reads += 1;
        }
        (reads, false)
    }

    #[test]
    fn linux_flush_gives_up_at_once_no_controller() {
        let (e, k) = dev();
        assert_eq!(linux_flush(&k), (16, true));
        // Reads change nothing: a second probe decides the same way.
        assert_eq!(linux_flush(&k), (16, true));
        assert!(e.reason().is_none());
    }

    #[test]
    fn kb_wait_sees_the_input_buffer_empty_on_the_first_read() {
        let (_, k) = dev();
        assert_eq!(k.read(I8042_CMD) & I8042_STR_IBF, 0);
        // Writes are taken at once: still empty after commands and data.
        k.write(I8042_CMD, 0x20);
        k.write(I8042_DATA, 0x47);
        assert_eq!(k.read(I8042_CMD), I8042_STATUS);
        assert_eq!(k.read(I8042_DATA), I8042_DATA_VALUE);
    }

    #[test]
    fn reset_command_stops_with_zero() {
        let (e, k) = dev();
        assert!(!k.write(I8042_DATA, 0xfe));
        assert!(e.reason().is_none());
        assert!(k.write(I8042_CMD, I8042_RESET_CMD));
        assert_eq!(e.reason().unwrap().code, 0);
        ExitPort::new(e.clone()).write(7);
        assert_eq!(e.reason().unwrap().reason, "i8042-reset");
    }

    #[test]
    fn pulse_commands_reset_only_when_bit_0_is_pulsed() {
        for cmd in 0xf0..=0xffu8 {
            let (e, k) = dev();
            assert_eq!(k.write(I8042_CMD, cmd), cmd & 1 == 0, "{cmd:#x}");
            assert_eq!(e.reason().is_some(), cmd & 1 == 0, "{cmd:#x}");
        }
        let (e, k) = dev();
        for cmd in [0x20, 0x60, 0xa7, 0xad, 0xae, 0xaa] {
            assert!(!k.write(I8042_CMD, cmd));
        }
        assert!(e.reason().is_none());
    }

    #[test]
    fn output_port_write_with_reset_line_low_resets() {
        let (e, k) = dev();
        // Reset line kept high: nothing happens, and the command is used up.
        k.write(I8042_CMD, I8042_WRITE_OUTPUT_CMD);
        assert!(!k.write(I8042_DATA, 0xdf));
        assert!(
            !k.write(I8042_DATA, 0xde),
            "a data byte without 0xd1 is no output port"
        );
        // A command in between cancels the pending 0xd1.
        k.write(I8042_CMD, I8042_WRITE_OUTPUT_CMD);
        k.write(I8042_CMD, 0xad);
        assert!(!k.write(I8042_DATA, 0xde));
        assert!(e.reason().is_none());
        k.write(I8042_CMD, I8042_WRITE_OUTPUT_CMD);
        assert!(k.write(I8042_DATA, 0xde));
        assert_eq!(e.reason().unwrap().reason, "i8042-reset");
    }
}
