//! What an earlier agent on the same state directory left when it died without ending its
//! sandboxes (`kill -9`, the OOM killer, a power cut): their state directories, their
//! cgroups and any of their processes still running.
//!
//! An agent holds an exclusive `flock` on `STATE/agent.lock` (its pid written inside, for
//! people) for its whole life. The kernel drops the lock when the holder dies, however it
//! dies, so an agent that gets the lock knows the one before it is gone and that every
//! sandbox under `STATE/sandboxes/` was that agent's. Their cgroups are found by the same
//! sandbox ids: the `sandscope` cgroup parent is shared by every agent on the machine, and
//! nothing else in it is touched. An agent that finds the lock held by a live agent sweeps
//! nothing.

use crate::cgroup::Cgroups;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be opened or written.
    #[error("opening the agent lock {path}")]
    Open {
        /// Lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A live agent holds it.
    #[error("the state directory is in use by another agent (lock {path} held, pid {pid})")]
    Held {
        /// Lock file.
        path: PathBuf,
        /// What the holder wrote in it.
        pid: String,
    },
}

/// This agent's hold on its state directory; released when dropped or when the process
/// dies.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Take `STATE/agent.lock`, creating the state directory if need be.
pub fn lock(state_dir: &Path) -> Result<StateLock, LockError> {
    let path = state_dir.join("agent.lock");
    let open_err = |source| LockError::Open {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(open_err)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(open_err)?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(LockError::Held {
                pid: pid.trim().to_string(),
                path,
            });
        }
        return Err(open_err(e));
    }
    file.set_len(0).map_err(open_err)?;
    writeln!(file, "{}", std::process::id()).map_err(open_err)?;
    Ok(StateLock { _file: file })
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Sandboxes (state directories) removed.
    pub sandboxes: u64,
    /// Of those, sandboxes that still had a cgroup.
    pub cgroups: u64,
}

/// The sandbox directories under `STATE/sandboxes/` now. Taken holding the [`StateLock`]
/// and before this agent starts a sandbox, it lists only a dead agent's.
pub fn leftover_dirs(state_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("sandboxes")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Remove the sandboxes in `dirs` (from [`leftover_dirs`]) with their cgroups (`cgroups`,
/// when the host has them) and their processes.
pub async fn sweep(dirs: &[PathBuf], cgroups: Option<&Cgroups>) -> Swept {
    let mut swept = Swept::default();
    for dir in dirs {
        let Some(id) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if let Some(cg) = cgroups.and_then(|c| c.existing(&id)) {
            cg.kill_all();
            cg.remove().await;
            swept.cgroups += 1;
        }
        crate::drivers::remove_state_dir(dir).await;
        swept.sandboxes += 1;
    }
    swept
}

/// Lock `state_dir` and sweep what a dead agent left there, counting it in `metrics` and
/// saying so in the log. Returns the lock to hold for the agent's life (`None` when
/// another agent holds it: then nothing is swept).
pub fn lock_and_sweep(
    state_dir: &Path,
    metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
) -> Option<StateLock> {
    let lock = match lock(state_dir) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %crate::agent::chain(&e), "leftovers of earlier agents not swept");
            metrics.leftover_sweep_done.store(1, Ordering::Release);
            return None;
        }
    };
    // Listed now, before any sandbox of this agent exists; removed in the background.
    let dirs = leftover_dirs(state_dir);
    let dir = state_dir.to_path_buf();
    tokio::spawn(async move {
        let cgroups = Cgroups::detect("sandscope").ok();
        let s = sweep(&dirs, cgroups.as_ref()).await;
        if s.sandboxes > 0 {
            tracing::info!(
                sandboxes = s.sandboxes,
                cgroups = s.cgroups,
                state_dir = %dir.display(),
                "swept the sandboxes an earlier agent left when it died"
            );
        }
        metrics
            .leftovers_swept
            .fetch_add(s.sandboxes, Ordering::Relaxed);
        metrics.leftover_sweep_done.store(1, Ordering::Release);
    });
    Some(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_holder_and_a_dropped_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        match lock(dir.path()) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("{other:?}"),
        }
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn sweep_removes_every_sandbox_dir_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for id in ["f-1", "f-2"] {
            std::fs::create_dir_all(dir.path().join("sandboxes").join(id).join("root")).unwrap();
        }
        std::fs::write(dir.path().join("sandboxes").join("stray-file"), "x").unwrap();
        let s = sweep(&leftover_dirs(dir.path()), None).await;
        assert_eq!(
            s,
            Swept {
                sandboxes: 2,
                cgroups: 0
            }
        );
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sandboxes"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["stray-file"]);
    }
}
