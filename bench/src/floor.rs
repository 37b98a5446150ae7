//! The wake-up floor: a raw Unix-socket ping-pong between two processes.

use crate::stats::{usf, Summary, Table, SUMMARY_HEADER};
use crate::sys;
use std::os::fd::RawFd;
use std::time::Instant;

/// Message size.
const MSG: usize = 64;

/// Where the two processes run.
#[derive(Debug, Clone, Copy)]
pub enum Placement {
    /// Both may run anywhere the bench may.
    Unpinned,
    /// Both pinned to CPU 0.
    SameCore,
    /// Parent on CPU 0, child on CPU 1.
    SplitCores,
}

impl Placement {
    fn label(self) -> &'static str {
        match self {
            Placement::Unpinned => "unpinned",
            Placement::SameCore => "both pinned to CPU 0",
            Placement::SplitCores => "pinned to CPU 0 and CPU 1",
        }
    }
}

fn read_full(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: writes at most buf.len() - got bytes into buf's remaining part.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n <= 0 {
            return false;
        }
        got += n as usize;
    }
    true
}

fn write_full(fd: RawFd, buf: &[u8]) -> bool {
    let mut put = 0;
    while put < buf.len() {
        // SAFETY: reads at most buf.len() - put bytes from buf's remaining part.
        let n = unsafe { libc::write(fd, buf[put..].as_ptr().cast(), buf.len() - put) };
        if n <= 0 {
            return false;
        }
        put += n as usize;
    }
    true
}

/// Ping-pong `rounds` 64-byte round trips; per-round-trip µs.
pub fn pingpong(rounds: usize, placement: Placement) -> anyhow::Result<Summary> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds points to two ints, as socketpair requires.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    let before = sys::affinity();
    let (parent_cpus, child_cpus): (Vec<usize>, Vec<usize>) = match placement {
        Placement::Unpinned => (before.clone(), before.clone()),
        Placement::SameCore => (vec![0], vec![0]),
        Placement::SplitCores => (vec![0], vec![1]),
    };
    let child_set = sys::cpu_set(&child_cpus);
    // SAFETY: the child only calls async-signal-safe functions (sched_setaffinity, read,
    // write, close, _exit) on data prepared before the fork, then exits; no allocation.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        // SAFETY: see the fork above: async-signal-safe calls only, ending in _exit.
        unsafe {
            libc::close(fds[0]);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &child_set);
            let mut buf = [0u8; MSG];
            while read_full(fds[1], &mut buf) {
                if !write_full(fds[1], &buf) {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing the child's end in the parent; we own it.
    unsafe { libc::close(fds[1]) };
    sys::set_affinity(&parent_cpus)?;
    let fd = fds[0];
    let mut msg = [7u8; MSG];
    let mut v = Vec::with_capacity(rounds);
    let warm = (rounds / 20).max(100);
    let mut ok = true;
    for i in 0..rounds + warm {
        let t = Instant::now();
        if !write_full(fd, &msg) || !read_full(fd, &mut msg) {
            ok = false;
            break;
        }
        if i >= warm {
            v.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    // SAFETY: our end; the child sees EOF and exits; then we reap it.
    unsafe {
        libc::close(fd);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
    sys::set_affinity(&before)?;
    if !ok {
        anyhow::bail!("ping-pong peer went away");
    }
    Ok(Summary::of(v))
}

/// The floor table for the given placements.
pub fn run(
    rounds: usize,
    placements: &[Placement],
) -> anyhow::Result<(Table, Vec<(Placement, Summary)>)> {
    let mut t = Table::new(
        format!("Wake-up floor: Unix-socket ping-pong, 2 processes, 64-byte messages, {rounds} round trips"),
        &SUMMARY_HEADER,
    );
    let mut out = Vec::new();
    for p in placements {
        let s = pingpong(rounds, *p)?;
        t.summary_row(p.label(), &s, usf);
        out.push((*p, s));
    }
    t.note("Per round trip: write 64 B → peer read → peer write 64 B → read. Two wake-ups per round trip.");
    Ok((t, out))
}
