//! sandscope's guest probe: the init of a sandbox.
//!
//! It runs as PID 1 of a namespace sandbox (later a microVM): it builds the sandbox's
//! filesystem ([`setup`]), records cold-start markers ([`clock`]), reads the sandbox's view
//! of itself ([`procinfo`]), connects to the agent ([`transport`]), sends `Hello`, then
//! serves `Invoke` frames by running the function handler ([`handler`]) — all over the
//! [`wire`] protocol. The binary (`src/main.rs`) only sequences these steps; a fork for
//! `--fork-init` ([`forkinit`]) happens before any thread exists, and the async part runs
//! on a current-thread tokio runtime so the probe starts fast and stays small.
//!
//! As a microVM's init it first writes the VMM's boot-timer marker ([`boot_timer`]), so
//! the host can time the kernel's boot on the VMM's clock.
//!
//! PID 1 duties: one [`reaper`] waits for every child; handler processes are spawned only
//! through it.

#![warn(missing_docs)]

pub mod args;
pub mod boot_timer;
pub mod clock;
pub mod forkinit;
pub mod handler;
pub mod lambda;
pub mod outbox;
pub mod probe;
pub mod procinfo;
pub mod reaper;
pub mod setup;
pub mod shell;
pub mod transport;

pub use wire::error_chain;

/// End the sandbox after a clean shutdown. As PID 1 of a machine (a VM's init: PID 1
/// without `--fork-init`) it ends the machine, since init must not exit; otherwise it exits
/// 0. Our guest kernels have no ACPI, so "power off" would only halt the CPU: the machine
/// is reset instead, and the VMM (QEMU with `-no-reboot` and `reboot=t`, vmm-lite with
/// `reboot=k`) exits on reset. Should reboot fail, exiting makes the kernel panic, and
/// `panic=-1` resets as well.
pub fn power_off(fork_init: bool) -> ! {
    if std::process::id() == 1 && !fork_init {
        // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_AUTOBOOT);
        }
    }
    std::process::exit(0)
}
