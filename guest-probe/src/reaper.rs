//! The one reaper. As PID 1 (and as a child subreaper otherwise) the probe inherits
//! orphans, so exactly one place calls wait: on every SIGCHLD it loops
//! `wait4(-1, WNOHANG)` and hands (status, rusage) to whoever registered that pid;
//! unknown pids (orphans) are discarded. Children are spawned through [`Reaper::spawn`],
//! which registers the pid under the same lock the reaper holds while it waits, so an
//! early exit cannot be missed. Never call `Child::wait` and never use `tokio::process`.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Why the reaper could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// Installing the SIGCHLD stream failed.
    #[error("installing the SIGCHLD handler")]
    InstallSignal(#[source] std::io::Error),
}

/// How a child ended, with its resource usage.
#[derive(Clone, Copy)]
pub struct ExitInfo {
    /// Raw wait status.
    pub status: i32,
    /// rusage from wait4 (the child and its reaped descendants).
    pub rusage: libc::rusage,
}

impl std::fmt::Debug for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitInfo")
            .field("exit_code", &self.exit_code())
            .field("signal", &self.signal())
            .finish()
    }
}

impl ExitInfo {
    /// Exit code if the child exited normally.
    pub fn exit_code(&self) -> Option<i32> {
        libc::WIFEXITED(self.status).then(|| libc::WEXITSTATUS(self.status))
    }

    /// Signal if the child was killed by one.
    pub fn signal(&self) -> Option<i32> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }

    /// Peak resident set, KiB (Linux reports ru_maxrss in KiB).
    pub fn max_rss_kib(&self) -> u64 {
        self.rusage.ru_maxrss.max(0) as u64
    }

    /// User CPU, microseconds.
    pub fn cpu_user_us(&self) -> u64 {
        tv_us(self.rusage.ru_utime)
    }

    /// System CPU, microseconds.
    pub fn cpu_system_us(&self) -> u64 {
        tv_us(self.rusage.ru_stime)
    }

    /// "exited with status N" / "killed by signal S".
    pub fn describe(&self) -> String {
        match (self.exit_code(), self.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (_, Some(s)) => format!("killed by signal {s}"),
            _ => format!("ended with wait status {:#x}", self.status),
        }
    }
}

fn tv_us(tv: libc::timeval) -> u64 {
    (tv.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000)
        .saturating_add(tv.tv_usec.max(0) as u64)
}

type Waiters = Arc<Mutex<HashMap<i32, oneshot::Sender<ExitInfo>>>>;

/// Handle to the reaper; cheap to clone.
#[derive(Clone, Debug)]
pub struct Reaper {
    waiters: Waiters,
}

impl Reaper {
    /// Install the SIGCHLD stream and start the reaping task (inside a tokio runtime).
    pub fn start() -> Result<Reaper, ReaperError> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sig = signal(SignalKind::child()).map_err(ReaperError::InstallSignal)?;
        let waiters: Waiters = Arc::default();
        let w = waiters.clone();
        tokio::spawn(async move {
            loop {
                reap_all(&w);
                if sig.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(Reaper { waiters })
    }

    /// Spawn `cmd` and register its pid; the receiver yields its [`ExitInfo`].
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Child, oneshot::Receiver<ExitInfo>)> {
        let mut map = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        map.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reap now (also done on every SIGCHLD).
    pub fn reap_now(&self) {
        reap_all(&self.waiters);
    }
}

fn reap_all(waiters: &Waiters) {
    let mut map = waiters.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data; all-zero is valid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointers for status and rusage.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut ru) };
        if pid <= 0 {
            break; // 0: children remain but none exited; -1: ECHILD (none) or EINTR.
        }
        if let Some(tx) = map.remove(&pid) {
            let _ = tx.send(ExitInfo { status, rusage: ru });
        }
    }
}

/// Make this process a child subreaper (so handler orphans come back to the reaper when
/// the probe is not PID 1).
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}
