//! POSIX signals in vmm-lite.
//!
//! Two uses, both process-wide, so they live here rather than in the event loop:
//!
//! - **Control signals** ([`CONTROL_SIGNALS`]: SIGUSR1 dumps metrics, SIGTERM/SIGINT stop
//!   the VM). The binary blocks them before `main` (an `.init_array` constructor) and again
//!   as `main`'s first statement ([`block_control_signals`]), so every thread created later
//!   inherits the mask and a signal that arrives while the VMM is still parsing its command
//!   line or building the VM stays pending instead of taking its default action (which ends
//!   the process without metrics). The event loop reads them from a signalfd
//!   ([`control_signal_fd`]); pending ones are delivered there at once.
//! - **The vCPU kick** ([`kick_signal`], the first real-time signal). On stop, every vCPU
//!   thread is sent it so that KVM_RUN returns EINTR. The handler sets `immediate_exit` in
//!   the interrupted thread's `kvm_run` ([`ImmediateExitOnKick`]), so a kick that lands
//!   between the vCPU's "stop requested?" check and its next KVM_RUN still makes that
//!   KVM_RUN return at once instead of being lost.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::thread::JoinHandle;

use kvm_ioctls::VcpuFd;

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

/// Makes `cmd` start its program with [`CONTROL_SIGNALS`] already blocked.
///
/// The signal mask survives `exec`, so a launcher that may signal vmm-lite right after
/// spawning it (the agent, tests) closes the window in which the signals would still take
/// their default action: between `exec` and vmm-lite's first instruction the dynamic
/// loader runs, which takes milliseconds, tens of them where the binary is paged in slowly
/// (measured: 5-50 ms in a nested L1 over 9p). vmm-lite reads them from its signalfd.
pub fn start_blocked(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let set = control_set();
    // SAFETY: runs in the child between fork and exec; pthread_sigmask is async-signal-safe
    // and `set` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::from_raw_os_error(rc))
            }
        });
    }
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

/// The signal that kicks a vCPU thread out of KVM_RUN (SIGRTMIN, as the C library numbers
/// it: glibc keeps the first two real-time signals for itself).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local without destructor is a plain TLS slot: reading it
    // is async-signal-safe.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer was registered by `ImmediateExitOnKick` on this thread and is
        // cleared before the vCPU's kvm_run mapping goes away; it points at the one-byte
        // `immediate_exit` field, which only the kernel reads (at KVM_RUN entry).
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the kick handler (process-wide). Idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Makes sure the calling thread can receive the kick (a thread spawned from one that blocked
/// everything would not).
pub fn unblock_kick_signal() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; only it and the calling thread's mask change.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// While alive, a kick delivered to this thread sets `immediate_exit` of the registered vCPU.
///
/// Create it on the vCPU's thread after the `VcpuFd` and drop it before the `VcpuFd` (declare
/// it after): the handler writes into the vCPU's `kvm_run` mapping. `immediate_exit` is
/// never cleared: a kick means "stop", and the vCPU thread leaves its loop on the EINTR.
#[derive(Debug)]
pub struct ImmediateExitOnKick {
    _not_send: std::marker::PhantomData<*mut u8>,
}

impl ImmediateExitOnKick {
    /// Registers `vcpu`'s `immediate_exit` for this thread.
    pub fn register(vcpu: &mut VcpuFd) -> Self {
        let p: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
        ImmediateExitOnKick {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for ImmediateExitOnKick {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Sends the kick to a (possibly finished but not yet joined) thread.
pub fn kick<T>(thread: &JoinHandle<T>) {
    // SAFETY: the handle is not joined, so its pthread_t is still valid (a thread that has
    // already returned gets ESRCH or nothing); the signal has a handler installed.
    unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
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

    #[test]
    fn kick_handler_sets_the_registered_byte_and_nothing_when_unregistered() {
        install_kick_handler().unwrap();
        std::thread::spawn(|| {
            unblock_kick_signal().unwrap();
            // Stand-in for kvm_run.immediate_exit.
            let mut byte = 0u8;
            IMMEDIATE_EXIT.with(|c| c.set(&mut byte));
            // SAFETY: the handler is installed; it runs on this thread before pthread_kill
            // returns (a thread-directed, unblocked signal is delivered on return to user).
            unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
            IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
            // SAFETY: `byte` is a live local; the volatile read sees the handler's write.
            assert_eq!(unsafe { std::ptr::read_volatile(&byte) }, 1);
            // SAFETY: as above; with nothing registered the handler does nothing.
            unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
        })
        .join()
        .unwrap();
    }
}
