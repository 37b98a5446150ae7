//! Counters and phase timestamps describing one VMM run.
//!
//! Everything is an atomic so vCPU threads, the event loop and the signal path can update
//! and read it without locks. [`Metrics::to_json`] produces the document the host agent
//! reads to build the cold-start waterfall.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// Phase timestamps are stored as nanoseconds since process start plus one (0 = unset).
#[derive(Debug, Default)]
pub struct Phase(AtomicU64);

impl Phase {
    /// Records the phase now, unless it was already recorded.
    pub fn mark(&self, start: Instant) {
        let ns = start.elapsed().as_nanos() as u64 + 1;
        let _ = self
            .0
            .compare_exchange(0, ns, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Microseconds since process start, if recorded.
    pub fn get_us(&self) -> Option<f64> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            ns => Some((ns - 1) as f64 / 1000.0),
        }
    }
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// vCPU exit counters, by kind.
#[derive(Debug, Default)]
pub struct VcpuExits {
    /// Port I/O reads.
    pub io_in: Counter,
    /// Port I/O writes.
    pub io_out: Counter,
    /// MMIO reads.
    pub mmio_read: Counter,
    /// MMIO writes.
    pub mmio_write: Counter,
    /// HLT exits.
    pub hlt: Counter,
    /// Shutdown (triple fault) exits.
    pub shutdown: Counter,
    /// Internal errors / emulation failures / entry failures.
    pub error: Counter,
    /// Interrupted by a signal.
    pub intr: Counter,
    /// Anything else.
    pub other: Counter,
}

/// virtio-vsock counters.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Packets taken from the guest's TX queue.
    pub tx_packets: Counter,
    /// Payload bytes from the guest.
    pub tx_bytes: Counter,
    /// Packets written to the guest's RX queue.
    pub rx_packets: Counter,
    /// Payload bytes to the guest.
    pub rx_bytes: Counter,
    /// Connections opened (either direction).
    pub conns_opened: Counter,
    /// Connections closed.
    pub conns_closed: Counter,
    /// RST packets sent to the guest.
    pub rst_sent: Counter,
    /// Malformed descriptor chains or packets from the guest.
    pub malformed: Counter,
    /// Host-side I/O errors.
    pub host_errors: Counter,
}

/// Guest misbehaviour that was contained.
#[derive(Debug, Default)]
pub struct GuestErrors {
    /// Accesses to unmapped port I/O or MMIO.
    pub bad_io: Counter,
    /// Invalid virtio-mmio register accesses.
    pub bad_mmio_reg: Counter,
}

/// All metrics of one VMM process.
#[derive(Debug)]
pub struct Metrics {
    /// Process start (captured as early as possible in `main`).
    pub start: Instant,
    /// CLOCK_MONOTONIC at process start, in ns, to anchor on the host's clock.
    pub start_monotonic_ns: u64,
    /// Guest memory mapped and registered.
    pub memory_ready: Phase,
    /// Kernel, cmdline and boot structures in memory.
    pub kernel_loaded: Phase,
    /// First KVM_RUN issued by vCPU 0.
    pub first_kvm_run: Phase,
    /// Guest wrote the boot-timer magic.
    pub boot_timer: Phase,
    /// Guest asked to stop (reset, shutdown, exit port).
    pub guest_stop: Phase,
    /// vCPU exits.
    pub exits: VcpuExits,
    /// Serial bytes written by the guest.
    pub serial_tx_bytes: Counter,
    /// Serial bytes fed to the guest.
    pub serial_rx_bytes: Counter,
    /// vsock counters.
    pub vsock: VsockMetrics,
    /// Contained guest errors.
    pub guest_errors: GuestErrors,
}

/// Reads CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes to it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

#[derive(Serialize)]
struct PhasesJson {
    process_start_us: f64,
    memory_ready_us: Option<f64>,
    kernel_loaded_us: Option<f64>,
    first_kvm_run_us: Option<f64>,
    boot_timer_us: Option<f64>,
    guest_stop_us: Option<f64>,
}

impl Metrics {
    /// New metrics anchored at `start` (which should be as close to exec as possible).
    pub fn new(start: Instant) -> Self {
        let now_mono = monotonic_ns();
        let since = start.elapsed().as_nanos() as u64;
        Metrics {
            start,
            start_monotonic_ns: now_mono.saturating_sub(since),
            memory_ready: Phase::default(),
            kernel_loaded: Phase::default(),
            first_kvm_run: Phase::default(),
            boot_timer: Phase::default(),
            guest_stop: Phase::default(),
            exits: VcpuExits::default(),
            serial_tx_bytes: Counter::default(),
            serial_rx_bytes: Counter::default(),
            vsock: VsockMetrics::default(),
            guest_errors: GuestErrors::default(),
        }
    }

    /// The metrics as a JSON value; `exit` describes how the VM ended, if it has.
    pub fn to_json(&self, exit: Option<(&str, i32)>) -> serde_json::Value {
        let e = &self.exits;
        let v = &self.vsock;
        let phases = PhasesJson {
            process_start_us: 0.0,
            memory_ready_us: self.memory_ready.get_us(),
            kernel_loaded_us: self.kernel_loaded.get_us(),
            first_kvm_run_us: self.first_kvm_run.get_us(),
            boot_timer_us: self.boot_timer.get_us(),
            guest_stop_us: self.guest_stop.get_us(),
        };
        serde_json::json!({
            "version": 1,
            "start_monotonic_ns": self.start_monotonic_ns,
            "uptime_us": self.start.elapsed().as_nanos() as f64 / 1000.0,
            "phases": phases,
            "exit": exit.map(|(reason, code)| serde_json::json!({"reason": reason, "code": code})),
            "vcpu_exits": {
                "io_in": e.io_in.get(), "io_out": e.io_out.get(),
                "mmio_read": e.mmio_read.get(), "mmio_write": e.mmio_write.get(),
                "hlt": e.hlt.get(), "shutdown": e.shutdown.get(), "error": e.error.get(),
                "intr": e.intr.get(), "other": e.other.get(),
            },
            "serial": {"tx_bytes": self.serial_tx_bytes.get(), "rx_bytes": self.serial_rx_bytes.get()},
            "vsock": {
                "tx_packets": v.tx_packets.get(), "tx_bytes": v.tx_bytes.get(),
                "rx_packets": v.rx_packets.get(), "rx_bytes": v.rx_bytes.get(),
                "conns_opened": v.conns_opened.get(), "conns_closed": v.conns_closed.get(),
                "rst_sent": v.rst_sent.get(), "malformed": v.malformed.get(),
                "host_errors": v.host_errors.get(),
            },
            "guest_errors": {
                "bad_io": self.guest_errors.bad_io.get(),
                "bad_mmio_reg": self.guest_errors.bad_mmio_reg.get(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_marks_once_and_serialises() {
        let m = Metrics::new(Instant::now());
        assert!(m.boot_timer.get_us().is_none());
        m.boot_timer.mark(m.start);
        let first = m.boot_timer.get_us().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        m.boot_timer.mark(m.start);
        assert_eq!(m.boot_timer.get_us().unwrap(), first);
        m.exits.io_out.add(3);
        let j = m.to_json(Some(("reset", 0)));
        assert_eq!(j["vcpu_exits"]["io_out"], 3);
        assert_eq!(j["exit"]["code"], 0);
        assert!(j["phases"]["boot_timer_us"].as_f64().is_some());
        assert!(j["phases"]["kernel_loaded_us"].is_null());
    }
}
