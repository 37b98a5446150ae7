//! Shell sessions into live sandboxes, on the agent's side: what a session asks for, the
//! handle the SSH server drives ([`ShellSession`]), and the registry behind `/v1/sessions`
//! and the audit trail.
//!
//! A session pins its sandbox: while it is open the sandbox is not reaped or frozen (it
//! still serves invocations; shells are not invocations). A session ends when the shell
//! exits, the client goes away, the sandbox ends, or the max shell lifetime passes.
//! Every session is audited when it ends: who (key fingerprint), where (sandbox,
//! function), when, how long, how it ended, and the bytes each way.

use crate::link::{LinkError, ShellEvent};
use crate::pool::Sandbox;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// A terminal for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    /// `TERM`.
    pub term: String,
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
}

/// What a client asks for.
#[derive(Debug, Clone, Default)]
pub struct ShellRequest {
    /// Command to run with `sh -c`; empty = an interactive login shell.
    pub command: String,
    /// Run it on a pseudo-terminal.
    pub pty: Option<PtyRequest>,
    /// Extra environment, `NAME=value`.
    pub env: Vec<String>,
    /// Who: the client key's fingerprint.
    pub who: String,
    /// Where from: the client's address.
    pub peer: String,
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The target names neither a live sandbox nor a function.
    #[error("no live sandbox or function named `{target}` on this agent ({known})")]
    Unknown {
        /// What the client asked for.
        target: String,
        /// What exists, for the message.
        known: String,
    },
    /// No sandbox could be started for the function.
    #[error("function `{function}`: no sandbox to attach to: {reason}")]
    Start {
        /// The function.
        function: String,
        /// Why.
        reason: String,
    },
    /// The sandbox's probe link failed.
    #[error("sandbox {sandbox}: {source}")]
    Link {
        /// The sandbox.
        sandbox: String,
        /// Cause.
        #[source]
        source: LinkError,
    },
}

/// How the sandbox of a session was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Picked {
    /// The client named the sandbox.
    Named,
    /// A live sandbox of the named function.
    Live,
    /// A sandbox started for this session.
    Started,
}

impl Picked {
    /// The name used in the API and the audit line.
    pub fn as_str(self) -> &'static str {
        match self {
            Picked::Named => "named",
            Picked::Live => "live",
            Picked::Started => "started",
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SessionEnd {
    /// Exit code of the shell or command (-1 if it did not exit normally).
    pub code: i32,
    /// Terminating signal, 0 if none.
    pub signal: i32,
    /// Why it ended otherwise (sandbox ended, client gone, lifetime), empty if it exited.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A session as `/v1/sessions` shows it (and as the audit records it).
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// Agent-wide session number.
    pub id: u64,
    /// Sandbox.
    pub sandbox: String,
    /// Function.
    pub function: String,
    /// `shell` or `exec`.
    pub kind: &'static str,
    /// The exec command (empty for shells).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub command: String,
    /// Whether it has a PTY.
    pub pty: bool,
    /// Key fingerprint (SHA256:...).
    pub who: String,
    /// Client address.
    pub peer: String,
    /// How the sandbox was chosen.
    pub picked: Picked,
    /// Start, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// Open for (or lasted), s.
    pub duration_s: f64,
    /// Bytes from the client to the sandbox.
    pub bytes_in: u64,
    /// Bytes from the sandbox to the client.
    pub bytes_out: u64,
    /// How it ended (None while open).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<SessionEnd>,
}

struct Info {
    id: u64,
    sandbox: String,
    function: String,
    command: String,
    pty: bool,
    who: String,
    peer: String,
    picked: Picked,
    started_unix_ms: u64,
    started: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Info {
    fn view(&self, end: Option<SessionEnd>) -> SessionView {
        SessionView {
            id: self.id,
            sandbox: self.sandbox.clone(),
            function: self.function.clone(),
            kind: if self.command.is_empty() {
                "shell"
            } else {
                "exec"
            },
            command: self.command.clone(),
            pty: self.pty,
            who: self.who.clone(),
            peer: self.peer.clone(),
            picked: self.picked,
            started_unix_ms: self.started_unix_ms,
            duration_s: self.started.elapsed().as_secs_f64(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            end,
        }
    }
}

/// How many ended sessions `/v1/sessions` keeps.
pub const RECENT_SESSIONS: usize = 100;

/// Open sessions and the recently ended ones.
#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Info>>>,
    recent: Mutex<VecDeque<SessionView>>,
}

/// `/v1/sessions` body.
#[derive(Debug, Clone, Serialize)]
pub struct SessionsView {
    /// Open now.
    pub open: Vec<SessionView>,
    /// Ended, newest last.
    pub recent: Vec<SessionView>,
}

impl Sessions {
    /// Open and recently ended sessions.
    pub fn view(&self) -> SessionsView {
        SessionsView {
            open: lock(&self.open).values().map(|i| i.view(None)).collect(),
            recent: lock(&self.recent).iter().cloned().collect(),
        }
    }

    /// Open sessions on one sandbox.
    pub fn open_on(&self, sandbox: &str) -> usize {
        lock(&self.open)
            .values()
            .filter(|i| i.sandbox == sandbox)
            .count()
    }

    fn end(&self, info: &Info, end: SessionEnd) -> SessionView {
        lock(&self.open).remove(&info.id);
        let v = info.view(Some(end));
        let mut r = lock(&self.recent);
        if r.len() == RECENT_SESSIONS {
            r.pop_front();
        }
        r.push_back(v.clone());
        v
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Called with the audit record when a session ends.
pub type AuditFn = Arc<dyn Fn(&SessionView) + Send + Sync>;

/// An open session. Drive it with [`input`](Self::input) and friends and read it with
/// [`next`](Self::next) until [`ShellEvent::Exit`]. Dropping it before then hangs the
/// session up (SIGHUP to its process group) and audits it as ended by the client.
pub struct ShellSession {
    sb: Arc<Sandbox>,
    session: u64,
    events: mpsc::UnboundedReceiver<ShellEvent>,
    info: Arc<Info>,
    sessions: Arc<Sessions>,
    audit: AuditFn,
    deadline: Instant,
    lifetime: Duration,
    ended: bool,
}

impl std::fmt::Debug for ShellSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellSession")
            .field("id", &self.info.id)
            .field("sandbox", &self.sb.id)
            .finish()
    }
}

impl ShellSession {
    /// Open a session on `sb`, which the caller chose and pinned (unpinned here on failure).
    pub(crate) async fn open(
        sb: Arc<Sandbox>,
        req: &ShellRequest,
        picked: Picked,
        sessions: Arc<Sessions>,
        audit: AuditFn,
        lifetime: Duration,
    ) -> Result<Self, ShellError> {
        let open = wire::ShellOpen {
            session: 0,
            command: req.command.clone(),
            pty: req.pty.is_some(),
            term: req.pty.as_ref().map(|p| p.term.clone()).unwrap_or_default(),
            cols: req.pty.as_ref().map_or(0, |p| p.cols),
            rows: req.pty.as_ref().map_or(0, |p| p.rows),
            env: req.env.clone(),
        };
        let (session, events) = match sb.link.open_shell(open).await {
            Ok(x) => x,
            Err(source) => {
                sb.unpin();
                return Err(ShellError::Link {
                    sandbox: sb.id.clone(),
                    source,
                });
            }
        };
        let info = Arc::new(Info {
            id: sessions.next.fetch_add(1, Ordering::Relaxed) + 1,
            sandbox: sb.id.clone(),
            function: sb.function.name.clone(),
            command: req.command.clone(),
            pty: req.pty.is_some(),
            who: req.who.clone(),
            peer: req.peer.clone(),
            picked,
            started_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            started: Instant::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        lock(&sessions.open).insert(info.id, info.clone());
        Ok(Self {
            sb,
            session,
            events,
            info,
            sessions,
            audit,
            deadline: Instant::now() + lifetime,
            lifetime,
            ended: false,
        })
    }

    /// The sandbox.
    pub fn sandbox_id(&self) -> &str {
        &self.sb.id
    }

    /// Its function.
    pub fn function(&self) -> &str {
        &self.sb.function.name
    }

    /// How the sandbox was chosen.
    pub fn picked(&self) -> Picked {
        self.info.picked
    }

    /// Agent-wide session number.
    pub fn id(&self) -> u64 {
        self.info.id
    }

    async fn frame(&self, frame: wire::Frame) -> Result<(), LinkError> {
        self.sb.link.shell_frame(frame).await
    }

    /// Bytes for the shell's stdin or terminal; empty = end of input.
    pub async fn input(&self, data: &[u8]) -> Result<(), LinkError> {
        self.info
            .bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        // Keep each frame well inside the wire's size limit.
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(64 * 1024).collect()
        };
        for c in chunks {
            self.frame(
                wire::ShellData {
                    session: self.session,
                    stream: wire::ShellStream::Stdin as i32,
                    data: c.to_vec(),
                }
                .into(),
            )
            .await?;
        }
        Ok(())
    }

    /// The client's terminal changed size.
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), LinkError> {
        self.frame(
            wire::ShellResize {
                session: self.session,
                cols,
                rows,
            }
            .into(),
        )
        .await
    }

    /// Signal the session's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), LinkError> {
        self.frame(
            wire::ShellSignal {
                session: self.session,
                signal,
            }
            .into(),
        )
        .await
    }

    /// The next event; `Exit` is the last (then `None`). When the max lifetime passes the
    /// session is killed and ends with an `Exit` saying so.
    pub async fn next(&mut self) -> Option<ShellEvent> {
        if self.ended {
            return None;
        }
        let ev = tokio::select! {
            ev = self.events.recv() => ev.unwrap_or_else(|| ShellEvent::Exit {
                code: -1,
                signal: 0,
                error: format!("sandbox {} ended", self.sb.id),
            }),
            _ = tokio::time::sleep_until(self.deadline.into()) => {
                let _ = self.signal(libc::SIGKILL).await;
                ShellEvent::Exit {
                    code: -1,
                    signal: 0,
                    error: format!(
                        "session closed: it reached the max shell lifetime of {} s",
                        self.lifetime.as_secs()
                    ),
                }
            }
        };
        match &ev {
            ShellEvent::Stdout(d) | ShellEvent::Stderr(d) => {
                self.info
                    .bytes_out
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            ShellEvent::Exit {
                code,
                signal,
                error,
            } => self.finish(SessionEnd {
                code: *code,
                signal: *signal,
                error: error.clone(),
            }),
        }
        Some(ev)
    }

    fn finish(&mut self, end: SessionEnd) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.sb.link.forget_shell(self.session);
        self.sb.unpin();
        let view = self.sessions.end(&self.info, end);
        (self.audit)(&view);
    }
}

impl Drop for ShellSession {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // The client went away: hang the session up like a closed terminal would.
        let link = self.sb.link.clone();
        let session = self.session;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // SIGHUP as a closed terminal would send; SIGKILL for whatever ignores
                // it (the probe ignores signals for sessions that already ended).
                for (signal, after) in [(libc::SIGHUP, 0), (libc::SIGKILL, 2)] {
                    tokio::time::sleep(Duration::from_secs(after)).await;
                    let frame = wire::ShellSignal { session, signal }.into();
                    if link.shell_frame(frame).await.is_err() {
                        break;
                    }
                }
            });
        }
        self.finish(SessionEnd {
            code: -1,
            signal: 0,
            error: "client disconnected".into(),
        });
    }
}
