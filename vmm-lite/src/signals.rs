//! POSIX signals in vmm-lite.
//!
//! Process-wide, so it lives here rather than in the event loop:
//!
//! - **Control signals** ([`CONTROL_SIGNALS`]: SIGUSR1 dumps metrics, SIGTERM/SIGINT stop
//!   the VM). The binary blocks them before `main` (an `.init_array` constructor) and again
//!   as `main`'s first statement ([`block_control_signals`]), so every thread created later
//!   inherits the mask and a signal that arrives while the VMM is still parsing its command
//!   line or building the VM stays pending instead of taking its default action (which ends
//!   the process without metrics). The event loop reads them from a signalfd
//!   ([`control_signal_fd`]); pending ones are delivered there at once.

use std::fs::File;
use std::os::fd::FromRawFd;

/// The signals the event loop handles.
pub const CONTROL_SIGNALS: [libc::c_int; 3] = [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT];

fn control_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only modify it.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in CONTROL_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks [`CONTROL_SIGNALS`] in the calling thread; threads it creates inherit the mask.
///
/// Call it first thing in `main`, before anything that could take time or spawn threads.
/// Idempotent.
pub fn block_control_signals() -> std::io::Result<()> {
    let set = control_set();
    // SAFETY: `set` is a valid, initialised sigset_t; only the calling thread's mask changes.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Blocks the control signals (again, in case `main` did not) and returns a non-blocking
/// signalfd that reads them, including those already pending.
pub fn control_signal_fd() -> std::io::Result<File> {
    block_control_signals()?;
    let set = control_set();
    // SAFETY: `set` is a valid sigset_t; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor returned by signalfd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_signals_are_blocked_and_read_from_the_signalfd() {
        // Run in a thread of its own so the test harness's threads keep their masks.
        std::thread::spawn(|| {
            block_control_signals().unwrap();
            // SAFETY: raising a blocked signal on this thread only marks it pending.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR1) };
            let fd = control_signal_fd().unwrap();
            let mut info = [0u8; 128];
            // SAFETY: reading one signalfd_siginfo (128 bytes) into a buffer of that size.
            let n = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    info.as_mut_ptr().cast(),
                    info.len(),
                )
            };
            assert_eq!(
                n, 128,
                "the signal raised before the signalfd existed is read"
            );
            assert_eq!(
                i32::from_ne_bytes(info[..4].try_into().unwrap()),
                libc::SIGUSR1
            );
        })
        .join()
        .unwrap();
    }
}
