//! The agent's end of one probe link: handshake, a reader task that routes frames, and
//! request/response helpers for invokes, stats and pings.
//!
//! A link is untrusted input. Bad frames, an oversized length or an early close end
//! *this* link only: pending requests fail with the reason, the error is counted and
//! logged (rate-limited), and every other sandbox keeps serving.
//!
//! Nothing waits on a link without a deadline. Frames go out through one writer task
//! that owns the write half; every frame carries a deadline, and a write that has not
//! finished by it (the sandbox stopped reading: frozen, `SIGSTOP`ped, wedged) closes the
//! link, since a frame cut midway cannot be resumed. Callers wait at most until their
//! deadline, and a caller that goes away leaves the frame to the writer, so framing
//! never breaks. Closing a link also stops its reader and writer tasks.

use crate::metrics::AgentMetrics;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, oneshot};
use wire::frame::Body;
use wire::{AsyncFrameReader, AsyncFrameWriter, Frame};

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No Hello within the boot timeout.
    #[error("probe did not say Hello within {0:?}")]
    HelloTimeout(Duration),
    /// The first frame was not a Hello.
    #[error("probe sent `{0}` before Hello")]
    NotHello(&'static str),
    /// Hello from a different protocol version.
    #[error("probe speaks protocol {got}, agent speaks {want}")]
    Version {
        /// Probe's version.
        got: u32,
        /// Ours.
        want: u32,
    },
    /// Hello names another sandbox.
    #[error("probe says it is sandbox `{got}`, expected `{want}`")]
    WrongSandbox {
        /// What the probe said.
        got: String,
        /// What we spawned.
        want: String,
    },
    /// The link ended or broke.
    #[error("probe link closed: {0}")]
    Closed(String),
    /// Waiting for a reply timed out.
    #[error("no {what} from probe within {after:?}")]
    Timeout {
        /// What we waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// A frame could not be written by its deadline: the probe is not reading.
    #[error("probe did not take the {kind} frame within {after:?}: it is not reading its link")]
    WriteTimeout {
        /// Frame kind.
        kind: &'static str,
        /// The time it had.
        after: Duration,
    },
    /// Sending a frame failed.
    #[error("sending {kind} to probe")]
    Send {
        /// Frame kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A frame was undecodable.
    #[error("protocol error from probe")]
    Decode(#[source] wire::DecodeError),
}

/// A trace id and a span id: the invocation span a log line belongs to.
pub type TraceIds = ([u8; 16], [u8; 8]);

/// One function log line as the agent keeps it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogLine {
    /// Sandbox id.
    pub sandbox: Arc<str>,
    /// Function name.
    pub function: Arc<str>,
    /// Sequence number on the link.
    pub seq: u64,
    /// `stdout`, `stderr` or `platform`.
    pub stream: &'static str,
    /// Invocation that produced it, if any.
    pub invoke_id: String,
    /// The text.
    pub line: String,
    /// Wall-clock receive time, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Cut at the line-length limit.
    pub truncated: bool,
    /// The trace and span of the invocation (from the `traceparent` it was sent with).
    #[serde(skip)]
    pub trace: Option<TraceIds>,
}

/// What a shell session in the sandbox says, in order; [`ShellEvent::Exit`] is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    /// Output on the terminal or stdout.
    Stdout(Vec<u8>),
    /// Output on stderr (sessions without a PTY).
    Stderr(Vec<u8>),
    /// The session ended.
    Exit {
        /// Exit code (-1 when it did not exit normally).
        code: i32,
        /// Terminating signal, 0 if none.
        signal: i32,
        /// Why it could not start or ended abnormally (the sandbox ended, ...), empty if
        /// it simply exited.
        error: String,
    },
}

/// How many recent lines each link keeps for the API.
pub const RECENT_LOG_LINES: usize = 200;

#[derive(Default)]
struct Pending {
    ready: Option<oneshot::Sender<wire::Ready>>,
    invoke: Option<(String, oneshot::Sender<wire::InvokeResult>)>,
    /// The latest invocation's id and trace context (kept past its result, for late lines).
    trace: Option<(String, TraceIds)>,
    stats: Vec<oneshot::Sender<wire::Stats>>,
    ping: Option<(u64, oneshot::Sender<wire::Pong>)>,
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Frames waiting for the writer task, at most. Callers wait (until their deadline) for
/// room; a sandbox that stops reading fills it and its writes time out.
const WRITE_QUEUE: usize = 32;

/// How long a Shutdown frame may take to go out (ending a sandbox does not wait longer:
/// it is killed anyway).
const SHUTDOWN_WRITE: Duration = Duration::from_millis(250);

/// How long control frames (shell input, resize, signals, opens) may take to go out.
const CONTROL_WRITE: Duration = Duration::from_secs(5);

/// How long a Pong may take to go out.
const PONG_WRITE: Duration = Duration::from_secs(1);

/// Pongs the agent may owe a probe (queued, not yet written). A probe that pings faster
/// than it reads the answers is flooding: it loses its link (and so its sandbox).
pub const MAX_OWED_PONGS: usize = 16;

/// One frame for the writer task.
struct Outgoing {
    frame: Frame,
    /// Not written by then: fail it, and close the link if it was cut midway.
    deadline: tokio::time::Instant,
    /// The time it was given (for the error).
    budget: Duration,
    /// The frame's fate, if someone waits for it.
    done: Option<oneshot::Sender<Result<(), LinkError>>>,
    /// A reply the link owes the probe (counted in [`Link::owed`] until written).
    owed: bool,
}

/// The agent's end of a probe link.
pub struct Link {
    sandbox: Arc<str>,
    function: Arc<str>,
    out: mpsc::Sender<Outgoing>,
    /// Becomes true when the link closes; stops the reader and writer tasks.
    closing: tokio::sync::watch::Sender<bool>,
    /// Replies queued for the probe and not yet written: the only work a probe can make
    /// the agent do on its behalf, bounded by [`MAX_OWED_PONGS`].
    owed: Arc<AtomicUsize>,
    pending: Mutex<Pending>,
    alive: AtomicBool,
    closed_reason: Mutex<Option<String>>,
    recent: Mutex<VecDeque<LogLine>>,
    last_seq: AtomicU64,
    nonce: AtomicU64,
    metrics: Arc<AgentMetrics>,
    logs: broadcast::Sender<LogLine>,
    shells: Mutex<std::collections::HashMap<u64, mpsc::UnboundedSender<ShellEvent>>>,
    next_session: AtomicU64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("sandbox", &self.sandbox)
            .field("alive", &self.is_alive())
            .finish()
    }
}

/// What the handshake learned.
#[derive(Debug)]
pub struct Handshake {
    /// The link.
    pub link: Arc<Link>,
    /// The probe's Hello.
    pub hello: wire::Hello,
    /// When the Hello arrived.
    pub hello_at: Instant,
    /// Resolves with the probe's Ready.
    pub ready: oneshot::Receiver<wire::Ready>,
}

/// Whether a read error means the probe's end of the link is gone (not a bad frame).
fn peer_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

impl Link {
    /// Read the Hello (within `timeout`), validate it, and start the reader task.
    pub async fn handshake<S>(
        stream: S,
        sandbox: &str,
        function: &str,
        timeout: Duration,
        metrics: Arc<AgentMetrics>,
        logs: broadcast::Sender<LogLine>,
    ) -> Result<Handshake, LinkError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut reader = AsyncFrameReader::new(r);
        let first = match tokio::time::timeout(timeout, reader.next()).await {
            Err(_) => return Err(LinkError::HelloTimeout(timeout)),
            Ok(Err(e)) => {
                metrics.link_errors.fetch_add(1, Ordering::Relaxed);
                return Err(LinkError::Decode(e));
            }
            Ok(Ok(None)) => return Err(LinkError::Closed("probe exited before Hello".into())),
            Ok(Ok(Some(f))) => f,
        };
        let hello_at = Instant::now();
        let mut hello = match first.body {
            Some(Body::Hello(h)) => h,
            _ => {
                metrics.link_errors.fetch_add(1, Ordering::Relaxed);
                return Err(LinkError::NotHello(first.kind()));
            }
        };
        let cut = crate::guest_limits::hello(&mut hello);
        metrics.guest_fields_cut.fetch_add(cut, Ordering::Relaxed);
        if hello.protocol_version != wire::PROTOCOL_VERSION {
            return Err(LinkError::Version {
                got: hello.protocol_version,
                want: wire::PROTOCOL_VERSION,
            });
        }
        if hello.sandbox_id != sandbox {
            return Err(LinkError::WrongSandbox {
                got: hello.sandbox_id,
                want: sandbox.into(),
            });
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let (out, queued) = mpsc::channel(WRITE_QUEUE);
        let link = Arc::new(Link {
            sandbox: sandbox.into(),
            function: function.into(),
            out,
            closing: tokio::sync::watch::Sender::new(false),
            owed: Arc::default(),
            pending: Mutex::new(Pending {
                ready: Some(ready_tx),
                ..Default::default()
            }),
            alive: AtomicBool::new(true),
            closed_reason: Mutex::new(None),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_LOG_LINES)),
            last_seq: AtomicU64::new(0),
            nonce: AtomicU64::new(1),
            metrics,
            logs,
            shells: Mutex::default(),
            next_session: AtomicU64::new(1),
        });
        let l2 = link.clone();
        tokio::spawn(async move { l2.read_loop(reader).await });
        tokio::spawn(write_loop(
            Arc::downgrade(&link),
            link.closing.subscribe(),
            link.owed.clone(),
            queued,
            AsyncFrameWriter::new(Box::new(w) as Writer),
        ));
        Ok(Handshake {
            link,
            hello,
            hello_at,
            ready: ready_rx,
        })
    }

    async fn read_loop<R: AsyncRead + Unpin>(self: Arc<Self>, mut reader: AsyncFrameReader<R>) {
        let mut closing = self.closing.subscribe();
        let reason = loop {
            let next = tokio::select! {
                // Closed from our side (a write timed out, the sandbox is ending): stop
                // reading, whatever the probe does.
                _ = closing.wait_for(|c| *c) => return,
                next = reader.next() => next,
            };
            match next {
                Ok(Some(_)) if !self.is_alive() => return,
                Ok(Some(f)) => Self::route(&self, f),
                Ok(None) => break "probe closed the link".to_string(),
                // The probe died (killed after a timeout, say) with frames of ours unread,
                // or in the middle of writing one: the link is gone, nobody broke the
                // protocol.
                Err(wire::DecodeError::Io(e)) if peer_gone(&e) => {
                    break format!("probe's end went away: {e}")
                }
                Err(e) => {
                    self.metrics.link_errors.fetch_add(1, Ordering::Relaxed);
                    let (log, suppressed) = self.metrics.link_error_log.allow();
                    if log {
                        tracing::warn!(sandbox = %self.sandbox, error = %e, suppressed,
                            "protocol error on probe link; closing it");
                    }
                    break format!("protocol error: {e}");
                }
            }
        };
        self.close(reason);
    }

    fn close(&self, reason: String) {
        self.alive.store(false, Ordering::Release);
        self.closed_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason);
        self.closing.send_replace(true);
        // Dropping the senders wakes every waiter with an error.
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = Pending::default();
        let why = self.closed_reason().unwrap_or_default();
        for (_, tx) in self.shells().drain() {
            let _ = tx.send(ShellEvent::Exit {
                code: -1,
                signal: 0,
                error: format!("sandbox {} ended: {why}", self.sandbox),
            });
        }
    }

    fn shells(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, mpsc::UnboundedSender<ShellEvent>>>
    {
        self.shells.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_shell(&self, session: u64, ev: ShellEvent) {
        let mut shells = self.shells();
        let exit = matches!(ev, ShellEvent::Exit { .. });
        let delivered = match shells.get(&session) {
            Some(tx) => tx.send(ev).is_ok(),
            None => false,
        };
        if exit || !delivered {
            shells.remove(&session);
        }
        if !delivered && !exit {
            drop(shells);
            self.metrics
                .unexpected_frames
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn route(this: &Arc<Self>, f: Frame) {
        let Some(mut body) = f.body else { return };
        // Nothing from the probe is kept or passed on before the host's limits hold.
        crate::guest_limits::enforce(&mut body, &this.metrics);
        if let Body::Ping(ping) = body {
            this.answer_ping(ping);
            return;
        }
        this.route_body(body);
    }

    /// Queue a Pong without waiting (the reader never waits on the writer). A probe that
    /// is owed more than [`MAX_OWED_PONGS`], or whose queue is full, is not reading what
    /// it asks for: it is flooding, and loses its link.
    fn answer_ping(&self, ping: wire::Ping) {
        let owed = self.owed.fetch_add(1, Ordering::AcqRel) + 1;
        let item = Outgoing {
            frame: wire::Pong {
                nonce: ping.nonce,
                since_init_ns: 0,
            }
            .into(),
            deadline: tokio::time::Instant::now() + PONG_WRITE,
            budget: PONG_WRITE,
            done: None,
            owed: true,
        };
        let queued = owed <= MAX_OWED_PONGS && self.out.try_send(item).is_ok();
        if !queued {
            self.owed.fetch_sub(1, Ordering::AcqRel);
            if self.is_alive() {
                self.flooded(format!(
                    "probe flooded the link with pings: {MAX_OWED_PONGS} answers owed and \
                     it does not read them"
                ));
            }
        }
    }

    /// Close the link of a probe that makes the agent work faster than it reads: counted
    /// and logged (rate-limited); its sandbox is then replaced like any with a dead link.
    fn flooded(&self, why: String) {
        self.metrics.link_floods.fetch_add(1, Ordering::Relaxed);
        let (log, suppressed) = self.metrics.link_error_log.allow();
        if log {
            tracing::warn!(sandbox = %self.sandbox, suppressed, "{why}; closing its link");
        }
        self.close(why);
    }

    fn route_body(&self, body: Body) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match body {
            Body::Ready(r) => {
                if let Some(tx) = p.ready.take() {
                    let _ = tx.send(r);
                }
            }
            Body::InvokeResult(r) => match p.invoke.take() {
                Some((id, tx)) if id == r.invoke_id => {
                    let _ = tx.send(r);
                }
                other => {
                    p.invoke = other;
                    self.metrics
                        .unexpected_frames
                        .fetch_add(1, Ordering::Relaxed);
                }
            },
            Body::Stats(s) => {
                for tx in p.stats.drain(..) {
                    let _ = tx.send(s.clone());
                }
            }
            Body::Pong(pong) => match p.ping.take() {
                Some((n, tx)) if n == pong.nonce => {
                    let _ = tx.send(pong);
                }
                other => p.ping = other,
            },
            Body::Log(l) => {
                drop(p);
                self.on_log(l);
            }
            Body::ShellData(d) => {
                drop(p);
                let ev = match d.stream() {
                    wire::ShellStream::Stderr => ShellEvent::Stderr(d.data),
                    _ => ShellEvent::Stdout(d.data),
                };
                self.on_shell(d.session, ev);
            }
            Body::ShellExit(e) => {
                drop(p);
                self.on_shell(
                    e.session,
                    ShellEvent::Exit {
                        code: e.code,
                        signal: e.signal,
                        error: e.error,
                    },
                );
            }
            // Agent-to-probe frames coming back are protocol errors, counted.
            Body::Ping(_)
            | Body::Hello(_)
            | Body::Invoke(_)
            | Body::StatsRequest(_)
            | Body::Shutdown(_)
            | Body::ShellOpen(_)
            | Body::ShellResize(_)
            | Body::ShellSignal(_) => {
                self.metrics
                    .unexpected_frames
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn trace_of(&self, invoke_id: &str) -> Option<TraceIds> {
        if invoke_id.is_empty() {
            return None;
        }
        let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match &p.trace {
            Some((id, t)) if id == invoke_id => Some(*t),
            _ => None,
        }
    }

    fn on_log(&self, l: wire::Log) {
        self.metrics
            .log_lines_dropped
            .fetch_add(l.dropped, Ordering::Relaxed);
        // The probe picks `seq`: no arithmetic on it may overflow.
        let prev = self.last_seq.swap(l.seq, Ordering::AcqRel);
        if l.seq > prev.saturating_add(1) {
            self.metrics
                .log_lines_lost
                .fetch_add(l.seq - prev - 1, Ordering::Relaxed);
        }
        let stream = match l.stream() {
            wire::LogStream::Stdout => "stdout",
            wire::LogStream::Stderr => "stderr",
            wire::LogStream::Platform => "platform",
            wire::LogStream::Unspecified => "unknown",
        };
        let line = LogLine {
            sandbox: self.sandbox.clone(),
            function: self.function.clone(),
            seq: l.seq,
            stream,
            trace: self.trace_of(&l.invoke_id),
            invoke_id: l.invoke_id,
            line: l.line,
            ts_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            truncated: l.truncated,
        };
        self.metrics.log_lines.fetch_add(1, Ordering::Relaxed);
        {
            let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() == RECENT_LOG_LINES {
                r.pop_front();
            }
            r.push_back(line.clone());
        }
        // No receivers is fine; lagging receivers count their own losses.
        let _ = self.logs.send(line);
    }

    /// Whether the link is still up.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Why the link closed, if it did.
    pub fn closed_reason(&self) -> Option<String> {
        self.closed_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sequence number of the last log line received.
    pub fn last_log_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// The most recent log lines, oldest first.
    pub fn recent_logs(&self) -> Vec<LogLine> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn closed_err(&self) -> LinkError {
        LinkError::Closed(self.closed_reason().unwrap_or_else(|| "link closed".into()))
    }

    /// Hand `frame` to the writer and wait until it is written, at most `within`.
    async fn send(&self, frame: Frame, within: Duration) -> Result<(), LinkError> {
        self.send_by(frame, tokio::time::Instant::now() + within)
            .await
    }

    /// Hand `frame` to the writer and wait until it is written, at most until `deadline`
    /// (the writer gives up on it then too). Dropping this future leaves the frame to the
    /// writer, which still honours the deadline.
    async fn send_by(&self, frame: Frame, deadline: tokio::time::Instant) -> Result<(), LinkError> {
        if !self.is_alive() {
            return Err(self.closed_err());
        }
        let kind = frame.kind();
        let after = deadline.saturating_duration_since(tokio::time::Instant::now());
        let timed_out = LinkError::WriteTimeout { kind, after };
        let (done, written) = oneshot::channel();
        let item = Outgoing {
            frame,
            deadline,
            budget: after,
            done: Some(done),
            owed: false,
        };
        match tokio::time::timeout_at(deadline, self.out.send(item)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(self.closed_err()),
            Err(_) => return Err(timed_out),
        }
        match tokio::time::timeout_at(deadline, written).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.closed_err()),
            Err(_) => Err(timed_out),
        }
    }

    /// Send an Invoke and wait (up to `wait`, writing included) for its result.
    pub async fn invoke(
        &self,
        inv: wire::Invoke,
        wait: Duration,
    ) -> Result<wire::InvokeResult, LinkError> {
        let deadline = tokio::time::Instant::now() + wait;
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if !self.is_alive() {
                return Err(self.closed_err());
            }
            p.invoke = Some((inv.invoke_id.clone(), tx));
            p.trace = exporters::otlp::traces::TraceContext::parse(&inv.traceparent)
                .map(|c| (inv.invoke_id.clone(), (c.trace_id, c.span_id)));
        }
        self.send_by(inv.into(), deadline).await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(self.closed_err()),
            Err(_) => Err(LinkError::Timeout {
                what: "invoke result",
                after: wait,
            }),
        }
    }

    /// Ask the probe for its Stats.
    pub async fn stats(&self, wait: Duration) -> Result<wire::Stats, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats
            .push(tx);
        let deadline = tokio::time::Instant::now() + wait;
        self.send_by(wire::StatsRequest {}.into(), deadline).await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(self.closed_err()),
            Err(_) => Err(LinkError::Timeout {
                what: "stats",
                after: wait,
            }),
        }
    }

    /// Round-trip a Ping; returns the RTT and the probe's clock reading.
    pub async fn ping(&self, wait: Duration) -> Result<(Duration, u64), LinkError> {
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).ping = Some((nonce, tx));
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + wait;
        self.send_by(wire::Ping { nonce }.into(), deadline).await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(p)) => Ok((t0.elapsed(), p.since_init_ns)),
            Ok(Err(_)) => Err(self.closed_err()),
            Err(_) => Err(LinkError::Timeout {
                what: "pong",
                after: wait,
            }),
        }
    }

    /// Open a shell session in the sandbox (`open.session` is assigned here). Events
    /// arrive on the returned receiver until [`ShellEvent::Exit`], which also comes when
    /// the link closes.
    pub async fn open_shell(
        &self,
        mut open: wire::ShellOpen,
    ) -> Result<(u64, mpsc::UnboundedReceiver<ShellEvent>), LinkError> {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        open.session = session;
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut shells = self.shells();
            if !self.is_alive() {
                return Err(self.closed_err());
            }
            shells.insert(session, tx);
        }
        if let Err(e) = self.send(open.into(), CONTROL_WRITE).await {
            self.shells().remove(&session);
            return Err(e);
        }
        Ok((session, rx))
    }

    /// Send a shell frame (input, resize, signal) for an open session.
    pub async fn shell_frame(&self, frame: Frame) -> Result<(), LinkError> {
        self.send(frame, CONTROL_WRITE).await
    }

    /// Stop routing a session's events (its consumer is gone).
    pub fn forget_shell(&self, session: u64) {
        self.shells().remove(&session);
    }

    /// Ask the probe to end the sandbox. Best effort, and brief: a probe that does not
    /// take the frame at once gets none (its sandbox is killed anyway).
    pub async fn shutdown(&self, reason: &str, grace: Duration) {
        let frame = wire::Shutdown {
            reason: reason.into(),
            grace_ms: grace.as_millis().min(60_000) as u32,
        };
        let _ = self.send(frame.into(), SHUTDOWN_WRITE).await;
    }
}

/// The writer task: writes queued frames in order, each by its deadline. A frame whose
/// deadline passed before it was started fails alone; one cut midway by its deadline (or
/// by a write error) closes the link. Ends when the link closes or is dropped.
async fn write_loop(
    link: std::sync::Weak<Link>,
    mut closing: tokio::sync::watch::Receiver<bool>,
    owed: Arc<AtomicUsize>,
    mut queued: mpsc::Receiver<Outgoing>,
    mut w: AsyncFrameWriter<Writer>,
) {
    loop {
        let item = tokio::select! {
            biased;
            _ = closing.wait_for(|c| *c) => break,
            item = queued.recv() => match item {
                Some(item) => item,
                None => break,
            },
        };
        if item.owed {
            owed.fetch_sub(1, Ordering::AcqRel);
        }
        let kind = item.frame.kind();
        let now = tokio::time::Instant::now();
        if now >= item.deadline {
            if let Some(done) = item.done {
                let _ = done.send(Err(LinkError::WriteTimeout {
                    kind,
                    after: item.budget,
                }));
            }
            continue;
        }
        let after = item.budget;
        let r = tokio::select! {
            _ = closing.wait_for(|c| *c) => break,
            r = tokio::time::timeout_at(item.deadline, w.send(&item.frame)) => r,
        };
        let (result, broke) = match r {
            Ok(Ok(())) => (Ok(()), None),
            Ok(Err(source)) => {
                let why = format!("writing {kind} to the probe failed: {source}");
                (Err(LinkError::Send { kind, source }), Some(why))
            }
            Err(_) => (
                Err(LinkError::WriteTimeout { kind, after }),
                Some(format!(
                    "the probe stopped reading: a {kind} frame was not taken within {after:?}"
                )),
            ),
        };
        if let Some(done) = item.done {
            let _ = done.send(result);
        }
        if let Some(why) = broke {
            if let Some(link) = link.upgrade() {
                tracing::debug!(sandbox = %link.sandbox, "closing probe link: {why}");
                link.close(why);
            }
            break;
        }
    }
    // Queued frames fail (their senders drop); the probe sees end of stream.
    drop(queued);
    let mut inner = w.into_inner();
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        use tokio::io::AsyncWriteExt;
        let _ = inner.shutdown().await;
    })
    .await;
}
