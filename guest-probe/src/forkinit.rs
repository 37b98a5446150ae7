//! `--fork-init`: the agent unshared the namespaces (pid included) before exec, so the
//! probe forks once. The child is PID 1 of the new pid namespace and carries on as the
//! probe; the parent stays outside as a minimal watcher that forwards SIGTERM, SIGINT and
//! SIGHUP to the child and exits with the child's status. Runs before any thread exists.

/// Why the fork could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ForkInitError {
    /// pipe(2) failed.
    #[error("creating the parent-death pipe")]
    Pipe(#[source] std::io::Error),
    /// fork(2) failed.
    #[error("fork")]
    Fork(#[source] std::io::Error),
    /// prctl(PR_SET_PDEATHSIG) failed in the child.
    #[error("prctl(PR_SET_PDEATHSIG)")]
    DeathSignal(#[source] std::io::Error),
    /// The watcher died before the child armed its death signal.
    #[error("the watcher process died during start-up")]
    WatcherGone,
}

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Fork. Returns `Ok(())` in the child (the probe continues); the parent never returns:
/// it watches the child and exits with its status. `link_fd` (the inherited link, if any)
/// is closed in the watcher.
pub fn fork_init(link_fd: Option<i32>) -> Result<(), ForkInitError> {
    let set = forwarded_set();
    let mut old: libc::sigset_t = forwarded_set();
    // Block the forwarded signals before forking so none is lost between fork and wait.
    // SAFETY: valid sigset pointers; single-threaded at this point.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) };
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ForkInitError::Pipe(std::io::Error::last_os_error()));
    }
    let [rd, wr] = fds;
    // SAFETY: the process is single-threaded (no runtime yet), so fork is safe; the child
    // continues with ordinary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(ForkInitError::Fork(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // Child: die with the watcher; check it did not die already (the pipe's write end
        // is held only by the watcher, so POLLHUP on the read end means it is gone).
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(ForkInitError::DeathSignal(std::io::Error::last_os_error()));
        }
        // SAFETY: closing our copy of the write end; we own it.
        unsafe { libc::close(wr) };
        let mut pfd = libc::pollfd {
            fd: rd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        // SAFETY: closing the read end; we own it.
        unsafe { libc::close(rd) };
        if n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLIN) != 0 {
            return Err(ForkInitError::WatcherGone);
        }
        // SAFETY: restoring the mask saved above.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        return Ok(());
    }
    // Watcher.
    // SAFETY: closing fds this process owns and no longer needs.
    unsafe {
        libc::close(rd);
        if let Some(fd) = link_fd {
            libc::close(fd);
        }
    }
    let code = watch(pid, &set);
    // Keep `wr` open until here so the child's check above is meaningful.
    // SAFETY: closing the write end we own.
    unsafe { libc::close(wr) };
    std::process::exit(code);
}

fn watch(child: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        // SAFETY: `set` is a valid sigset; null info is allowed.
        let sig = unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        if sig < 0 {
            continue; // EINTR
        }
        if sig != libc::SIGCHLD {
            // SAFETY: kill with a valid pid and signal.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if r < 0 {
            return 1;
        }
    }
}
