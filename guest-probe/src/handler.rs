//! Running the function handler: `exec` (one `/bin/sh -c HANDLER` per invoke) and
//! `persistent` (one long-lived runtime speaking `sandscope-lines/1`, see README.md).

use crate::outbox::{LineSink, LineSplitter, Outbox};
use crate::reaper::{ExitInfo, Reaper};
use std::collections::{HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use wire::{Invoke, InvokeResult, InvokeStatus, LogStream};

/// Why a handler process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// spawn failed.
    #[error("spawning /bin/sh -c {handler:?}")]
    Spawn {
        /// The handler command.
        handler: String,
        /// What spawn said.
        #[source]
        source: std::io::Error,
    },
    /// Turning a child pipe into an async pipe failed.
    #[error("registering the handler's {0} pipe")]
    Pipe(&'static str, #[source] std::io::Error),
}

/// Process groups of live handlers, killed on shutdown.
#[derive(Clone, Debug, Default)]
pub struct Groups(Arc<Mutex<HashSet<i32>>>);

impl Groups {
    fn insert(&self, pgid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pgid);
    }
    fn remove(&self, pgid: i32) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pgid);
    }

    /// Signal every registered group.
    pub fn signal_all(&self, sig: i32) {
        for &g in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            kill_group(g, sig);
        }
    }

    /// Whether any registered group still has a process.
    pub fn any_alive(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|&g| {
                // SAFETY: kill with signal 0 only checks for existence.
                unsafe { libc::kill(-g, 0) == 0 }
            })
    }
}

/// Send `sig` to process group `pgid`.
pub fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) on a process group we created.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// What every handler run needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct HandlerCtx {
    /// The shell command.
    pub handler: String,
    /// Sandbox id, exported as SANDSCOPE_SANDBOX_ID.
    pub sandbox_id: String,
    /// The send queue.
    pub outbox: Outbox,
    /// The reaper.
    pub reaper: Reaper,
    /// Live process groups.
    pub groups: Groups,
}

struct Spawned {
    pid: i32,
    exit: oneshot::Receiver<ExitInfo>,
    stdin: pipe::Sender,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
}

impl HandlerCtx {
    /// Spawn the handler with its three pipes and `env` added.
    fn spawn(&self, env: &[(&str, &str)]) -> Result<Spawned, HandlerError> {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, exit, pid) = self.launch(&mut cmd)?;
        let take = |name, fd: Option<OwnedFd>| {
            fd.ok_or_else(|| HandlerError::Pipe(name, std::io::ErrorKind::NotFound.into()))
        };
        let stdin = take("stdin", child.stdin.take().map(OwnedFd::from))?;
        let stdout = take("stdout", child.stdout.take().map(OwnedFd::from))?;
        let stderr = take("stderr", child.stderr.take().map(OwnedFd::from))?;
        // `child` is dropped without waiting: the reaper owns that.
        Ok(Spawned {
            pid,
            exit,
            stdin: pipe::Sender::from_owned_fd(stdin)
                .map_err(|e| HandlerError::Pipe("stdin", e))?,
            stdout: pipe::Receiver::from_owned_fd(stdout)
                .map_err(|e| HandlerError::Pipe("stdout", e))?,
            stderr: pipe::Receiver::from_owned_fd(stderr)
                .map_err(|e| HandlerError::Pipe("stderr", e))?,
        })
    }

    /// Spawn the handler with stdin on /dev/null and stdout + stderr on ONE pipe (a Lambda
    /// runtime: both streams are its log), `env` added. Returns (pid, exit, output pipe).
    pub(crate) fn spawn_merged(
        &self,
        env: &[(String, String)],
    ) -> Result<(i32, oneshot::Receiver<ExitInfo>, pipe::Receiver), HandlerError> {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(HandlerError::Pipe(
                "output",
                std::io::Error::last_os_error(),
            ));
        }
        use std::os::fd::FromRawFd;
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wr2 = wr
            .try_clone()
            .map_err(|e| HandlerError::Pipe("output", e))?;
        let mut cmd = self.command();
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(wr))
            .stderr(Stdio::from(wr2));
        let (child, exit, pid) = self.launch(&mut cmd)?;
        // Our copies of the write end must go, or the pipe never reaches EOF.
        drop(cmd);
        drop(child);
        let out = pipe::Receiver::from_owned_fd(rd).map_err(|e| HandlerError::Pipe("output", e))?;
        Ok((pid, exit, out))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&self.handler)
            .env("SANDSCOPE_SANDBOX_ID", &self.sandbox_id)
            .process_group(0);
        if Path::new("/var/task").is_dir() {
            cmd.current_dir("/var/task");
        }
        // SAFETY: the closure only makes async-signal-safe calls (sigprocmask, signal,
        // open, write, close) on memory it owns.
        unsafe {
            cmd.pre_exec(|| {
                crate::shell::child_defaults();
                Ok(())
            });
        }
        cmd
    }

    fn launch(
        &self,
        cmd: &mut Command,
    ) -> Result<(std::process::Child, oneshot::Receiver<ExitInfo>, i32), HandlerError> {
        let (child, exit) = self
            .reaper
            .spawn(cmd)
            .map_err(|source| HandlerError::Spawn {
                handler: self.handler.clone(),
                source,
            })?;
        let pid = child.id() as i32;
        self.groups.insert(pid);
        Ok((child, exit, pid))
    }

    /// Forget a handler group (it is dead).
    pub(crate) fn forget(&self, pgid: i32) {
        self.groups.remove(pgid);
    }
}

pub(crate) fn result(inv_id: &str, status: InvokeStatus) -> InvokeResult {
    InvokeResult {
        invoke_id: inv_id.to_string(),
        status: status as i32,
        exit_code: -1,
        ..Default::default()
    }
}

/// An InvokeResult for an invoke the probe could not run at all.
pub fn runtime_error(invoke_id: &str, error_type: &str, message: String) -> InvokeResult {
    InvokeResult {
        error_type: error_type.into(),
        error_message: message,
        ..result(invoke_id, InvokeStatus::RuntimeError)
    }
}

pub(crate) fn timeout_message(timeout_ms: u64) -> String {
    format!(
        "Task timed out after {:.2} seconds",
        timeout_ms as f64 / 1000.0
    )
}

fn too_large_message() -> String {
    format!("response exceeds the {}-byte limit", wire::MAX_PAYLOAD)
}

/// Fill status, exit code, signal and error fields from how the handler ended.
pub(crate) fn apply_exit(r: &mut InvokeResult, e: &ExitInfo, what: &str) {
    if let Some(code) = e.exit_code() {
        r.exit_code = code;
        if code == 0 {
            r.status = InvokeStatus::Ok as i32;
        } else {
            r.status = InvokeStatus::FunctionError as i32;
            r.error_type = "Runtime.ExitError".into();
            r.error_message = format!("{what} exited with status {code}");
        }
    } else if let Some(sig) = e.signal() {
        r.status = InvokeStatus::Killed as i32;
        r.signal = sig;
        r.error_type = "Runtime.ExitError".into();
        r.error_message =
            format!("{what} killed by signal {sig} (SIGKILL usually means out of memory)");
    } else {
        r.status = InvokeStatus::RuntimeError as i32;
        r.error_type = "Runtime.ExitError".into();
        r.error_message = format!("{what} {}", e.describe());
    }
}

async fn optional<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Read to EOF, failing with `Err(())` once more than `cap` bytes arrived.
async fn read_capped(mut r: pipe::Receiver, cap: usize) -> Result<Vec<u8>, ()> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(out),
            Ok(n) => {
                if out.len() + n > cap {
                    return Err(());
                }
                out.extend_from_slice(&buf[..n]);
            }
        }
    }
}

/// Stream `r` line by line into `sink` until EOF.
async fn stream_lines(mut r: pipe::Receiver, mut sink: LineSink, invoke_id: String) {
    let mut split = LineSplitter::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut lines = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        split.push(&buf[..n], &mut lines);
        for (l, t) in lines.drain(..) {
            sink.line(l, t, &invoke_id).await;
        }
    }
    if let Some((l, t)) = split.finish() {
        sink.line(l, t, &invoke_id).await;
    }
    sink.report_drops(&invoke_id).await;
}

/// How long to keep draining a handler's pipes after it exited (background processes
/// that left the group could hold them open forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Run one exec-kind invoke: `/bin/sh -c HANDLER`, payload on stdin, stdout is the
/// response, stderr becomes Log frames.
pub async fn run_exec(ctx: HandlerCtx, inv: Invoke) -> InvokeResult {
    let start = Instant::now();
    let id = inv.invoke_id.clone();
    // The invocation's W3C trace context (OpenTelemetry's environment carrier), so the
    // handler's own spans can join the agent's invocation span.
    let trace: Vec<(&str, &str)> = if inv.traceparent.is_empty() {
        Vec::new()
    } else {
        vec![("TRACEPARENT", inv.traceparent.as_str())]
    };
    let sp = match ctx.spawn(&trace) {
        Ok(s) => s,
        Err(e) => return runtime_error(&id, "Runtime.SpawnError", crate::error_chain(&e)),
    };
    let pgid = sp.pid;
    let deadline = (inv.timeout_ms > 0).then(|| start + Duration::from_millis(inv.timeout_ms));
    let payload = inv.payload;
    let mut stdin = sp.stdin;
    let mut write = Some(Box::pin(async move {
        let _ = stdin.write_all(&payload).await;
        // dropping `stdin` closes it: EOF for the handler
    }));
    let mut out = Some(Box::pin(read_capped(sp.stdout, wire::MAX_PAYLOAD)));
    let sink = LineSink::new(ctx.outbox.clone(), LogStream::Stderr);
    let mut err = Some(Box::pin(stream_lines(sp.stderr, sink, id.clone())));
    let mut exit_rx = Some(sp.exit);

    let mut exit: Option<ExitInfo> = None;
    let mut stdout: Option<Result<Vec<u8>, ()>> = None;
    let mut timed_out = false;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if exit.is_some() && out.is_none() && err.is_none() {
            break;
        }
        tokio::select! {
            _ = optional(&mut write) => write = None,
            r = optional(&mut out) => {
                out = None;
                if r.is_err() {
                    kill_group(pgid, libc::SIGKILL);
                }
                stdout = Some(r);
            }
            _ = optional(&mut err) => err = None,
            r = optional(&mut exit_rx) => {
                exit_rx = None;
                match r {
                    Ok(e) => exit = Some(e),
                    // The reaper is gone: nothing more will come; treat as killed.
                    Err(_) => break,
                }
                // Leftover background processes of this invoke go with it.
                kill_group(pgid, libc::SIGKILL);
                write = None;
                drain_deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = sleep_until_opt(deadline), if !timed_out && exit.is_none() => {
                timed_out = true;
                kill_group(pgid, libc::SIGKILL);
            }
            _ = sleep_until_opt(drain_deadline) => break,
        }
    }
    ctx.groups.remove(pgid);
    let mut r = result(&id, InvokeStatus::RuntimeError);
    r.duration_us = start.elapsed().as_micros() as u64;
    if let Some(e) = &exit {
        r.max_rss_kib = e.max_rss_kib();
        r.cpu_user_us = e.cpu_user_us();
        r.cpu_system_us = e.cpu_system_us();
    }
    if timed_out {
        r.status = InvokeStatus::Timeout as i32;
        r.error_type = "Sandbox.Timeout".into();
        r.error_message = timeout_message(inv.timeout_ms);
        if let Some(sig) = exit.as_ref().and_then(ExitInfo::signal) {
            r.signal = sig;
        }
        return r;
    }
    if matches!(stdout, Some(Err(()))) {
        r.status = InvokeStatus::ResponseTooLarge as i32;
        r.error_type = "Function.ResponseSizeTooLarge".into();
        r.error_message = too_large_message();
        return r;
    }
    match &exit {
        Some(e) => apply_exit(&mut r, e, "handler"),
        None => {
            r.error_type = "Runtime.ExitError".into();
            r.error_message = "handler exit status was lost".into();
        }
    }
    if r.status == InvokeStatus::Ok as i32 || r.status == InvokeStatus::FunctionError as i32 {
        r.payload = stdout.and_then(Result::ok).unwrap_or_default();
    }
    r
}

// ---------------------------------------------------------------------------------------
// persistent

pub(crate) enum StderrCtl {
    Begin(String),
    End(oneshot::Sender<()>),
}

const LAST_STDERR_LINES: usize = 10;

/// A long-lived runtime speaking `sandscope-lines/1`.
#[derive(Debug)]
pub struct Persistent {
    ctx: HandlerCtx,
    pid: i32,
    stdin: pipe::Sender,
    stdout: LineReader,
    exit: oneshot::Receiver<ExitInfo>,
    stderr_ctl: mpsc::Sender<StderrCtl>,
    last_stderr: Arc<Mutex<VecDeque<String>>>,
    procfs: Option<ProcFiles>,
}

/// The runtime's procfs files, opened once. Per-invoke CPU and peak RSS are read with
/// `pread` (no path lookups on the invoke path), the end-of-invoke CPU reading is the next
/// invoke's baseline, and the peak is reset after the reply has gone out.
#[derive(Debug)]
pub(crate) struct ProcFiles {
    stat: std::fs::File,
    status: std::fs::File,
    clear_refs: Option<std::fs::File>,
    buf: Vec<u8>,
    last: crate::procinfo::ProcStat,
    peak_dirty: bool,
}

impl ProcFiles {
    pub(crate) fn open(pid: i32) -> Option<Self> {
        let f = |n: &str| std::fs::File::open(format!("/proc/{pid}/{n}")).ok();
        let mut p = ProcFiles {
            stat: f("stat")?,
            status: f("status")?,
            clear_refs: std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/{pid}/clear_refs"))
                .ok(),
            buf: Vec::with_capacity(2048),
            last: Default::default(),
            peak_dirty: true,
        };
        p.last = p.read_stat().unwrap_or_default();
        Some(p)
    }

    fn pread(file: &std::fs::File, buf: &mut Vec<u8>) -> Option<()> {
        use std::os::unix::fs::FileExt;
        buf.clear();
        let mut chunk = [0u8; 2048];
        loop {
            let n = file.read_at(&mut chunk, buf.len() as u64).ok()?;
            if n == 0 {
                return Some(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn read_stat(&mut self) -> Option<crate::procinfo::ProcStat> {
        Self::pread(&self.stat, &mut self.buf)?;
        crate::procinfo::parse_proc_stat(std::str::from_utf8(&self.buf).ok()?)
    }

    fn vm_hwm_kib(&mut self) -> Option<u64> {
        Self::pread(&self.status, &mut self.buf)?;
        crate::procinfo::parse_status_kib(std::str::from_utf8(&self.buf).ok()?, "VmHWM")
    }

    /// Per-invoke CPU (delta since the last reading) and peak RSS into `r`.
    pub(crate) fn measure(&mut self, r: &mut InvokeResult) {
        if let Some(a) = self.read_stat() {
            let before = std::mem::replace(&mut self.last, a);
            r.cpu_user_us =
                crate::procinfo::ticks_to_us(a.utime_ticks.saturating_sub(before.utime_ticks));
            r.cpu_system_us =
                crate::procinfo::ticks_to_us(a.stime_ticks.saturating_sub(before.stime_ticks));
        }
        r.max_rss_kib = self.vm_hwm_kib().unwrap_or(0);
        self.peak_dirty = true;
    }

    /// Reset the peak RSS (`clear_refs` 5) if an invoke read it since the last reset.
    pub(crate) fn reset_peak(&mut self) {
        if std::mem::take(&mut self.peak_dirty) {
            if let Some(f) = &self.clear_refs {
                use std::os::unix::fs::FileExt;
                let _ = f.write_at(b"5", 0);
            }
        }
    }
}

impl std::fmt::Debug for StderrCtl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StderrCtl")
    }
}

/// Bounded line reader over a pipe; partial input stays buffered (cancel-safe).
#[derive(Debug)]
struct LineReader {
    r: pipe::Receiver,
    buf: Vec<u8>,
    eof: bool,
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

impl LineReader {
    async fn next(&mut self, cap: usize) -> Line {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut l: Vec<u8> = self.buf.drain(..=i).collect();
                l.pop();
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                return Line::Text(l);
            }
            if self.buf.len() > cap {
                return Line::TooLong;
            }
            if self.eof {
                return Line::Eof;
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.r.read(&mut chunk).await {
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

pub(crate) async fn stderr_task(
    mut r: pipe::Receiver,
    mut ctl: mpsc::Receiver<StderrCtl>,
    outbox: Outbox,
    last: Arc<Mutex<VecDeque<String>>>,
) {
    let mut sink = LineSink::new(outbox, LogStream::Stderr);
    let mut split = LineSplitter::default();
    let mut current = String::new();
    let mut eof = false;
    let mut buf = vec![0u8; 16 * 1024];
    let mut lines = Vec::new();
    loop {
        tokio::select! {
            c = ctl.recv() => match c {
                None => break,
                Some(StderrCtl::Begin(id)) => current = id,
                Some(StderrCtl::End(ack)) => {
                    // Whatever the runtime wrote before its response is in the pipe now.
                    // Read the fd directly: tokio's try_read trusts cached readiness and
                    // could report WouldBlock before the reactor saw the new data.
                    while !eof {
                        match read_now(&r, &mut buf) {
                            Some(0) => eof = true,
                            Some(n) => split.push(&buf[..n], &mut lines),
                            None => break,
                        }
                    }
                    if eof {
                        lines.extend(split.finish());
                    }
                    emit(&mut sink, &mut lines, &current, &last).await;
                    sink.report_drops(&current).await;
                    current.clear();
                    let _ = ack.send(());
                }
            },
            n = r.read(&mut buf), if !eof => {
                match n {
                    Ok(0) | Err(_) => {
                        eof = true;
                        lines.extend(split.finish());
                    }
                    Ok(n) => split.push(&buf[..n], &mut lines),
                }
                emit(&mut sink, &mut lines, &current, &last).await;
            }
        }
    }
}

/// One non-blocking read(2) on the pipe; `None` when nothing is there (or on error).
fn read_now(r: &pipe::Receiver, buf: &mut [u8]) -> Option<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the fd is open (owned by
    // `r`) and non-blocking.
    let n = unsafe {
        libc::read(
            r.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    (n >= 0).then_some(n as usize)
}

async fn emit(
    sink: &mut LineSink,
    lines: &mut Vec<(String, bool)>,
    id: &str,
    last: &Mutex<VecDeque<String>>,
) {
    for (l, t) in lines.drain(..) {
        {
            let mut q = last.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() == LAST_STDERR_LINES {
                q.pop_front();
            }
            let mut short = l.clone();
            wire::truncate_line(&mut short, 512);
            q.push_back(short);
        }
        sink.line(l, t, id).await;
    }
}

impl Persistent {
    /// Spawn the runtime and wait (at most `init_timeout`) for its `ready` line.
    /// Errors are the reason to put in `Ready.error`.
    pub async fn start(ctx: HandlerCtx, init_timeout: Duration) -> Result<Persistent, String> {
        let sp = ctx.spawn(&[]).map_err(|e| crate::error_chain(&e))?;
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        let last = Arc::new(Mutex::new(VecDeque::new()));
        tokio::spawn(stderr_task(
            sp.stderr,
            ctl_rx,
            ctx.outbox.clone(),
            last.clone(),
        ));
        let mut p = Persistent {
            ctx,
            pid: sp.pid,
            stdin: sp.stdin,
            stdout: LineReader {
                r: sp.stdout,
                buf: Vec::new(),
                eof: false,
            },
            exit: sp.exit,
            stderr_ctl: ctl_tx,
            last_stderr: last,
            procfs: None,
        };
        let deadline = tokio::time::sleep(init_timeout);
        tokio::pin!(deadline);
        let failure = loop {
            tokio::select! {
                l = p.stdout.next(wire::MAX_LOG_LINE) => match l {
                    Line::Text(t) if t.trim_ascii() == b"ready" => {
                        p.procfs = ProcFiles::open(p.pid);
                        return Ok(p);
                    }
                    Line::Text(t) => {
                        let mut s = String::from_utf8_lossy(&t).into_owned();
                        let cut = wire::truncate_line(&mut s, wire::MAX_LOG_LINE);
                        p.ctx.outbox.log(LogStream::Stdout, s, cut, "").await;
                    }
                    Line::TooLong => break "runtime printed an over-long line before ready".into(),
                    Line::Eof => {
                        // Closed stdout: most likely exiting; give the exit a moment.
                        let e = tokio::time::timeout(Duration::from_millis(500), &mut p.exit).await;
                        break match e {
                            Ok(Ok(e)) => format!("runtime {} before printing ready", e.describe()),
                            _ => "runtime closed its stdout before printing ready".into(),
                        };
                    }
                },
                e = &mut p.exit => break match e {
                    Ok(e) => format!("runtime {} before printing ready", e.describe()),
                    Err(_) => "runtime ended before printing ready".into(),
                },
                _ = &mut deadline => break format!(
                    "runtime did not print ready within {} ms", init_timeout.as_millis()
                ),
            }
        };
        kill_group(p.pid, libc::SIGKILL);
        Err(format!("{failure}{}", p.stderr_tail().await))
    }

    /// "; last stderr: a | b" with the runtime's last stderr lines, or "".
    async fn stderr_tail(&self) -> String {
        output_tail(&self.stderr_ctl, &self.last_stderr, "stderr").await
    }

    /// The runtime's pid (its process group).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Work deferred until the reply has been sent: reset the peak-RSS counter.
    pub fn after_reply(&mut self) {
        if let Some(pf) = &mut self.procfs {
            pf.reset_peak();
        }
    }

    /// Resolves when the runtime exits between invokes, saying how. Cancel-safe; not to
    /// be awaited again once it has resolved.
    pub async fn exited(&mut self) -> String {
        match (&mut self.exit).await {
            Ok(e) => format!("runtime {}", e.describe()),
            Err(_) => "runtime ended".into(),
        }
    }

    /// Run one invoke. Returns the runtime if it can take more invokes.
    pub async fn invoke(mut self, inv: Invoke) -> (Option<Persistent>, InvokeResult) {
        let start = Instant::now();
        let id = inv.invoke_id.clone();
        let mut r = result(&id, InvokeStatus::RuntimeError);
        // An exit the reaper has not collected yet counts as before this invoke.
        self.ctx.reaper.reap_now();
        if let Ok(e) = self.exit.try_recv() {
            r.error_type = "Runtime.ExitError".into();
            r.error_message = format!("runtime {} before this invoke", e.describe());
            self.finish_dead();
            return (None, r);
        }
        if let Some(pf) = &mut self.procfs {
            // Normally already done after the previous reply; covers the first invoke.
            pf.reset_peak();
        }
        let _ = self.stderr_ctl.send(StderrCtl::Begin(id.clone())).await;

        let mut line: Vec<u8> = inv
            .payload
            .iter()
            .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b })
            .collect();
        line.push(b'\n');
        let deadline = (inv.timeout_ms > 0).then(|| start + Duration::from_millis(inv.timeout_ms));

        enum End {
            Response(Line),
            Exit(Option<ExitInfo>),
            Timeout,
        }
        let end = {
            let Persistent {
                stdin,
                stdout,
                exit,
                ..
            } = &mut self;
            let io = async {
                if stdin.write_all(&line).await.is_err() {
                    // Broken stdin: the runtime is exiting; let the exit branch report it.
                    std::future::pending::<()>().await;
                }
                stdout.next(wire::MAX_PAYLOAD).await
            };
            tokio::select! {
                l = io => End::Response(l),
                e = exit => End::Exit(e.ok()),
                _ = sleep_until_opt(deadline) => End::Timeout,
            }
        };
        r.duration_us = start.elapsed().as_micros() as u64;
        if let Some(pf) = &mut self.procfs {
            if let Some(a) = pf.read_stat() {
                let before = std::mem::replace(&mut pf.last, a);
                r.cpu_user_us =
                    crate::procinfo::ticks_to_us(a.utime_ticks.saturating_sub(before.utime_ticks));
                r.cpu_system_us =
                    crate::procinfo::ticks_to_us(a.stime_ticks.saturating_sub(before.stime_ticks));
            }
            r.max_rss_kib = pf.vm_hwm_kib().unwrap_or(0);
            pf.peak_dirty = true;
        }
        let keep = match end {
            End::Response(Line::Text(t)) => {
                r.exit_code = 0;
                if let Some(msg) = t.strip_prefix(b"!error ") {
                    r.status = InvokeStatus::FunctionError as i32;
                    r.error_type = "Function.Error".into();
                    r.error_message = String::from_utf8_lossy(msg).into_owned();
                } else {
                    r.status = InvokeStatus::Ok as i32;
                    r.payload = t;
                }
                true
            }
            End::Response(Line::TooLong) => {
                kill_group(self.pid, libc::SIGKILL);
                r.status = InvokeStatus::ResponseTooLarge as i32;
                r.error_type = "Function.ResponseSizeTooLarge".into();
                r.error_message = too_large_message();
                false
            }
            End::Response(Line::Eof) => {
                // stdout closed: wait briefly for the exit status to say why.
                let e = tokio::time::timeout(Duration::from_millis(500), &mut self.exit).await;
                match e {
                    Ok(Ok(e)) => apply_exit(&mut r, &e, "runtime"),
                    _ => {
                        kill_group(self.pid, libc::SIGKILL);
                        r.status = InvokeStatus::FunctionError as i32;
                        r.error_type = "Runtime.ExitError".into();
                        r.error_message = "runtime closed its stdout".into();
                    }
                }
                if r.status == InvokeStatus::Ok as i32 {
                    // exit 0 without answering is still a failed invoke
                    r.status = InvokeStatus::FunctionError as i32;
                    r.error_type = "Runtime.ExitError".into();
                    r.error_message = "runtime exited with status 0 without a response".into();
                }
                false
            }
            End::Exit(Some(e)) => {
                apply_exit(&mut r, &e, "runtime");
                if r.status == InvokeStatus::Ok as i32 {
                    r.status = InvokeStatus::FunctionError as i32;
                    r.error_type = "Runtime.ExitError".into();
                    r.error_message = "runtime exited with status 0 without a response".into();
                }
                false
            }
            End::Exit(None) => {
                r.error_type = "Runtime.ExitError".into();
                r.error_message = "runtime exit status was lost".into();
                false
            }
            End::Timeout => {
                kill_group(self.pid, libc::SIGKILL);
                r.status = InvokeStatus::Timeout as i32;
                r.error_type = "Sandbox.Timeout".into();
                r.error_message = timeout_message(inv.timeout_ms);
                r.signal = libc::SIGKILL;
                false
            }
        };
        // Flush the runtime's stderr for this invoke before the result goes out.
        flush_output(&self.stderr_ctl, Duration::from_millis(500)).await;
        if keep {
            (Some(self), r)
        } else {
            self.ctx
                .outbox
                .platform(format!("runtime stopped: {}", r.error_message), &id)
                .await;
            self.finish_dead();
            (None, r)
        }
    }

    fn finish_dead(&self) {
        kill_group(self.pid, libc::SIGKILL);
        self.ctx.groups.remove(self.pid);
    }
}

/// "; last {what}: a | b" with a runtime's last output lines (after asking its output task
/// to finish the current line), or "" when there were none.
pub(crate) async fn output_tail(
    ctl: &mpsc::Sender<StderrCtl>,
    last: &Mutex<VecDeque<String>>,
    what: &str,
) -> String {
    flush_output(ctl, Duration::from_millis(200)).await;
    let q = last.lock().unwrap_or_else(|p| p.into_inner());
    if q.is_empty() {
        return String::new();
    }
    format!(
        "; last {what}: {}",
        q.iter().cloned().collect::<Vec<_>>().join(" | ")
    )
}

/// Ask a runtime's output task to finish the current invoke's lines, waiting at most `wait`.
pub(crate) async fn flush_output(ctl: &mpsc::Sender<StderrCtl>, wait: Duration) {
    let (tx, rx) = oneshot::channel();
    if ctl.send(StderrCtl::End(tx)).await.is_ok() {
        let _ = tokio::time::timeout(wait, rx).await;
    }
}
