//! Legacy port-I/O devices: the i8042 reset line and a debug exit port.

use std::sync::Arc;

use super::ExitHandle;

/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;
/// Command that pulses the CPU reset line.
pub const I8042_RESET_CMD: u8 = 0xfe;
/// Debug exit port: a byte written here ends the VMM with that byte as exit status.
pub const EXIT_PORT: u16 = 0x501;

/// A minimal i8042: reads return "nothing pending", a reset command stops the VM.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitHandle>,
}

impl I8042 {
    /// New controller bound to the stop latch.
    pub fn new(exit: Arc<ExitHandle>) -> Self {
        I8042 { exit }
    }

    /// Port read.
    pub fn read(&self, _port: u16) -> u8 {
        0
    }

    /// Port write.
    pub fn write(&self, port: u16, value: u8) {
        if port == I8042_CMD && value == I8042_RESET_CMD {
            self.exit.request("i8042-reset", 0);
        }
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
    use super::*;

    #[test]
    fn reset_command_stops_with_zero() {
        let e = ExitHandle::new().unwrap();
        let k = I8042::new(e.clone());
        k.write(I8042_DATA, 0xfe);
        assert!(e.reason().is_none());
        k.write(I8042_CMD, 0xfe);
        assert_eq!(e.reason().unwrap().code, 0);
        ExitPort::new(e.clone()).write(7);
        assert_eq!(e.reason().unwrap().reason, "i8042-reset");
    }
}
