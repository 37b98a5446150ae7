//! Shell sessions inside the sandbox (remote shells): the agent opens a session with
//! [`wire::ShellOpen`]; the probe runs `/bin/sh` on a pseudo-terminal (as a session leader
//! with the PTY as its controlling terminal, so job control, Ctrl-C and window changes
//! work and state persists between commands) or one command on pipes, and streams bytes
//! both ways as [`wire::ShellData`] until [`wire::ShellExit`].

use crate::outbox::Outbox;
use crate::reaper::Reaper;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use wire::{ShellData, ShellExit, ShellOpen, ShellStream};

/// Output is sent in chunks of at most this many bytes.
const CHUNK: usize = 16 * 1024;

struct Ctl {
    input: mpsc::UnboundedSender<Vec<u8>>,
    pgid: i32,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
}

/// The open sessions of one probe link.
#[derive(Clone)]
pub struct Shells {
    sessions: Arc<Mutex<HashMap<u64, Ctl>>>,
    outbox: Outbox,
    reaper: Reaper,
    sandbox_id: String,
}

fn exit_frame(session: u64, code: i32, signal: i32, error: String) -> ShellExit {
    ShellExit {
        session,
        code,
        signal,
        error,
    }
}

impl Shells {
    /// Sessions reporting through `outbox`; children are reaped by `reaper`.
    pub fn new(outbox: Outbox, reaper: Reaper, sandbox_id: &str) -> Self {
        Self {
            sessions: Arc::default(),
            outbox,
            reaper,
            sandbox_id: sandbox_id.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Ctl>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open sessions.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Start a session; failures are reported as a ShellExit with `error`.
    pub async fn open(&self, o: ShellOpen) {
        if self.lock().contains_key(&o.session) {
            let e = format!("session {} is already open", o.session);
            self.outbox.frame(exit_frame(o.session, -1, 0, e)).await;
            return;
        }
        if let Err(e) = self.start(&o) {
            let msg = format!("cannot start the shell: {e}");
            self.outbox.frame(exit_frame(o.session, -1, 0, msg)).await;
        }
    }

    /// Input for a session (empty = end of input). Unknown sessions are ignored.
    pub fn data(&self, d: ShellData) {
        if d.stream != ShellStream::Stdin as i32 {
            return;
        }
        if let Some(c) = self.lock().get(&d.session) {
            let _ = c.input.send(d.data);
        }
    }

    /// New terminal size (the kernel sends SIGWINCH to the foreground group).
    pub fn resize(&self, session: u64, cols: u32, rows: u32) {
        if let Some(Some(m)) = self.lock().get(&session).map(|c| c.master.clone()) {
            set_winsize(m.get_ref().as_raw_fd(), cols, rows);
        }
    }

    /// Signal a session's process group.
    pub fn signal(&self, session: u64, sig: i32) {
        if let Some(pgid) = self.lock().get(&session).map(|c| c.pgid) {
            if (1..65).contains(&sig) {
                // SAFETY: kill(2) on a process group we created; no memory involved.
                unsafe { libc::kill(-pgid, sig) };
            }
        }
    }

    /// SIGKILL every session (the probe is shutting down).
    pub fn kill_all(&self) {
        for c in self.lock().values() {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(-c.pgid, libc::SIGKILL) };
        }
    }

    fn start(&self, o: &ShellOpen) -> std::io::Result<()> {
        let mut cmd = Command::new("/bin/sh");
        if !o.command.is_empty() {
            cmd.arg("-c").arg(&o.command);
        } else if o.pty {
            cmd.arg("-l");
        }
        let home = if std::path::Path::new("/var/task").is_dir() {
            "/var/task"
        } else {
            "/"
        };
        cmd.current_dir(home)
            .env("SANDSCOPE_SANDBOX_ID", &self.sandbox_id)
            .env("TERM", if o.term.is_empty() { "dumb" } else { &o.term });
        for kv in &o.env {
            if let Some((k, v)) = kv.split_once('=') {
                if !k.is_empty() {
                    cmd.env(k, v);
                }
            }
        }
        let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        if o.pty {
            let (master, slave) = open_pty(o.cols, o.rows)?;
            let s = |f: &OwnedFd| f.try_clone().map(Stdio::from);
            cmd.stdin(s(&slave)?).stdout(s(&slave)?).stderr(s(&slave)?);
            // SAFETY: async-signal-safe calls only: the child becomes a session leader
            // with the PTY (already on fd 0) as its controlling terminal; signal state is
            // reset as for handlers.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    child_defaults();
                    Ok(())
                });
            }
            let (child, exit) = self.reaper.spawn(&mut cmd)?;
            drop(cmd);
            drop(slave);
            let pid = child.id() as i32;
            drop(child);
            set_nonblocking(master.as_raw_fd())?;
            let master = Arc::new(register(master)?);
            self.lock().insert(
                o.session,
                Ctl {
                    input: tx,
                    pgid: pid,
                    master: Some(master.clone()),
                },
            );
            let reader = tokio::spawn(pump_out(
                master.clone(),
                self.outbox.clone(),
                o.session,
                ShellStream::Stdout,
            ));
            tokio::spawn(pump_in_pty(master, rx));
            self.finish(o.session, exit, vec![reader]);
        } else {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            // SAFETY: async-signal-safe calls only (see `child_defaults`).
            unsafe {
                cmd.pre_exec(|| {
                    child_defaults();
                    Ok(())
                });
            }
            let (mut child, exit) = self.reaper.spawn(&mut cmd)?;
            let pid = child.id() as i32;
            let fd = |f: Option<OwnedFd>| f.ok_or_else(|| std::io::Error::other("no pipe"));
            let stdin = fd(child.stdin.take().map(OwnedFd::from))?;
            let stdout = fd(child.stdout.take().map(OwnedFd::from))?;
            let stderr = fd(child.stderr.take().map(OwnedFd::from))?;
            drop(child);
            self.lock().insert(
                o.session,
                Ctl {
                    input: tx,
                    pgid: pid,
                    master: None,
                },
            );
            let mut readers = Vec::new();
            for (f, stream) in [(stdout, ShellStream::Stdout), (stderr, ShellStream::Stderr)] {
                set_nonblocking(f.as_raw_fd())?;
                let f = Arc::new(register(f)?);
                readers.push(tokio::spawn(pump_out(
                    f,
                    self.outbox.clone(),
                    o.session,
                    stream,
                )));
            }
            tokio::spawn(pump_in_pipe(stdin, rx));
            self.finish(o.session, exit, readers);
        }
        Ok(())
    }

    /// When the process exits: let its output drain (briefly: a background job may keep
    /// the terminal open), then report the exit and forget the session.
    fn finish(
        &self,
        session: u64,
        exit: tokio::sync::oneshot::Receiver<crate::reaper::ExitInfo>,
        readers: Vec<tokio::task::JoinHandle<()>>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let info = exit.await;
            for r in readers {
                let abort = r.abort_handle();
                if tokio::time::timeout(Duration::from_millis(500), r)
                    .await
                    .is_err()
                {
                    abort.abort();
                }
            }
            me.lock().remove(&session);
            let f = match info {
                Ok(i) => exit_frame(
                    session,
                    i.exit_code().unwrap_or(-1),
                    i.signal().unwrap_or(0),
                    String::new(),
                ),
                Err(_) => exit_frame(session, -1, 0, "lost track of the shell process".into()),
            };
            me.outbox.frame(f).await;
        });
    }
}

/// In a forked child before exec (async-signal-safe calls only): undo the probe's signal
/// mask and handlers, and its OOM protection, so handlers and shells start with default
/// signal behaviour and are what the OOM killer picks.
pub(crate) fn child_defaults() {
    // SAFETY: sigset_t is plain data; sigemptyset/sigprocmask/signal/open/write/close are
    // async-signal-safe and only touch memory owned here.
    unsafe {
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
        if fd >= 0 {
            libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
            libc::close(fd);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Register an owned, non-blocking fd with the runtime.
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd is valid, stays open and refers to
    // the same file description for the AsyncFd's whole lifetime; OwnedFd::as_raw_fd always
    // returns that fd.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_winsize(fd: RawFd, cols: u32, rows: u32) {
    let ws = libc::winsize {
        ws_row: rows.clamp(1, 10_000) as u16,
        ws_col: cols.clamp(1, 10_000) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// A new PTY pair (master, slave), both close-on-exec, with the given size.
fn open_pty(cols: u32, rows: u32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt takes flags only.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: posix_openpt returned a new fd owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on the master fd we own.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer is valid for its length; ptsname_r NUL-terminates on success.
    if unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: name is NUL-terminated (above).
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_winsize(
        m,
        if cols == 0 { 80 } else { cols },
        if rows == 0 { 24 } else { rows },
    );
    Ok((master, slave))
}

/// Copy output to ShellData frames until EOF (a PTY master reports EIO once the last
/// slave fd is closed).
async fn pump_out(fd: Arc<AsyncFd<OwnedFd>>, outbox: Outbox, session: u64, stream: ShellStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        let r = guard.try_io(|f| {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                outbox
                    .frame(ShellData {
                        session,
                        stream: stream as i32,
                        data: buf[..n].to_vec(),
                    })
                    .await
            }
            Err(_would_block) => continue,
        }
    }
}

/// Write input to the PTY master.
async fn pump_in_pty(fd: Arc<AsyncFd<OwnedFd>>, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(data) = rx.recv().await {
        if data.is_empty() {
            // End of input on a terminal: the EOF character, as a user's Ctrl-D.
            if write_all(&fd, &[4]).await.is_err() {
                return;
            }
            continue;
        }
        if write_all(&fd, &data).await.is_err() {
            return;
        }
    }
}

/// Write input to a pipe; empty data closes it.
async fn pump_in_pipe(stdin: OwnedFd, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    if set_nonblocking(stdin.as_raw_fd()).is_err() {
        return;
    }
    let Ok(fd) = register(stdin) else {
        return;
    };
    let fd = Arc::new(fd);
    while let Some(data) = rx.recv().await {
        if data.is_empty() || write_all(&fd, &data).await.is_err() {
            return; // dropping the fd closes the pipe: EOF for the command
        }
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|f| {
            // SAFETY: data is valid for data.len() bytes.
            let n = unsafe { libc::write(f.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}
