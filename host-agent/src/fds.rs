//! Open files. Every sandbox holds a few of the agent's file descriptors (its link, its
//! output pipes, its process's handles), so the open-file limit caps how many sandboxes
//! one agent can run. The common default soft limit of 1024 stops an agent at about 200;
//! the agent raises its soft limit to the hard one at start and reports its budget.

use serde::Serialize;

/// File descriptors the agent holds per live sandbox (the process driver: the link
/// socket, the probe's stdout and stderr pipes, and what tokio keeps to wait for the
/// child; a VM driver holds no more). Checked by `tests/failed_starts.rs`.
pub const FDS_PER_SANDBOX: u64 = 5;

/// The open-file limit, soft and hard.
pub fn nofile() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raise the soft open-file limit to the hard one. Returns the soft limit before and
/// after.
pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = nofile()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    let r = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the initialised rlimit it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((soft, hard))
}

/// Descriptors this process has open.
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        // The directory handle read_dir holds is one of them.
        .map(|d| (d.count() as u64).saturating_sub(1))
        .unwrap_or(0)
}

/// How many sandboxes the open-file limit allows (`/v1/stats` `fds`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct FdBudget {
    /// Soft open-file limit in force.
    pub limit: u64,
    /// Descriptors open now.
    pub open: u64,
    /// Descriptors one sandbox holds.
    pub per_sandbox: u64,
    /// Sandboxes that fit: the live ones plus as many more as the free descriptors allow.
    pub sandboxes_fit: u64,
}

impl FdBudget {
    /// The budget now, with `live` sandboxes running.
    pub fn now(live: u64) -> Self {
        let limit = nofile().map_or(0, |(soft, _)| soft);
        let open = open_fds();
        Self::of(limit, open, live)
    }

    /// The budget for `open` descriptors of `limit`, with `live` sandboxes running.
    pub fn of(limit: u64, open: u64, live: u64) -> Self {
        Self {
            limit,
            open,
            per_sandbox: FDS_PER_SANDBOX,
            sandboxes_fit: live + limit.saturating_sub(open) / FDS_PER_SANDBOX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_descriptors_are_shared_out_per_sandbox() {
        let b = FdBudget::of(1024, 24, 3);
        assert_eq!(b.sandboxes_fit, 3 + 1000 / FDS_PER_SANDBOX);
        assert_eq!(FdBudget::of(10, 40, 2).sandboxes_fit, 2);
    }
}
