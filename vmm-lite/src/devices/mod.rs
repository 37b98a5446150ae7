//! Device models: legacy port-I/O devices, the boot-timer marker and virtio over MMIO.

pub mod boot_timer;
pub mod legacy;
pub mod serial;
pub mod virtio;
pub mod vsock;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped and the process exit code it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReason {
    /// Short reason: `i8042-reset`, `exit-port`, `shutdown`, `vcpu-error`, `signal`, ...
    pub reason: String,
    /// Exit code for the VMM process.
    pub code: i32,
}

/// Shared "stop the VM" latch: the first request wins and wakes the event loop.
#[derive(Debug)]
pub struct ExitHandle {
    reason: Mutex<Option<StopReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl ExitHandle {
    /// Creates the latch.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ExitHandle {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// Requests a stop; later requests are ignored.
    pub fn request(&self, reason: &str, code: i32) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(StopReason {
                reason: reason.to_string(),
                code,
            });
        }
        drop(g);
        self.stopping.store(true, Ordering::Release);
        let _ = self.evt.write(1);
    }

    /// Cheap check whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The stop reason, if one was requested.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd signalled on a stop request.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// An interrupt line backed by an eventfd (registered as a KVM irqfd).
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
}

impl IrqLine {
    /// New line.
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqLine {
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }
    /// Raise the interrupt (edge).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
    /// The eventfd, to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}
