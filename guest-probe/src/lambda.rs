//! `lambda` handlers: a long-lived runtime that speaks the AWS Lambda Runtime API
//! (`2018-06-01`), served by the probe on `--runtime-api` (127.0.0.1:9001 by default,
//! inside the sandbox's own network namespace).
//!
//! The runtime is `/bin/sh -c HANDLER` with `AWS_LAMBDA_RUNTIME_API` and the standard
//! Lambda environment set. Its first `GET .../invocation/next` ends `runtime_init` (the
//! real end of the cold start); each invoke is handed to the pending `next` and answered by
//! `POST .../{id}/response` or `.../{id}/error`. stdout and stderr are one pipe: both are
//! the function's log (Log frames on stream Stderr, tagged with the current invoke).
//!
//! The HTTP server is a small HTTP/1.1 implementation (keep-alive, Content-Length and
//! chunked bodies), bounded: request heads at 64 KiB, bodies at `wire::MAX_PAYLOAD`.

use crate::handler::{self, HandlerCtx, ProcFiles, StderrCtl};
use crate::reaper::ExitInfo;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use wire::{Invoke, InvokeResult, InvokeStatus};

/// Lambda's own response limit, quoted in the too-large message.
pub const LAMBDA_RESPONSE_LIMIT: usize = 6 * 1024 * 1024;

const MAX_HEAD: usize = 64 * 1024;
const PREFIX: &str = "/2018-06-01/runtime/";

/// One event handed to the runtime by `next`.
#[derive(Debug)]
struct Event {
    id: String,
    payload: Vec<u8>,
    deadline_ms: u64,
    trace_id: String,
}

/// How the runtime answered an invoke.
#[derive(Debug)]
enum Outcome {
    Response(Vec<u8>),
    Error { error_type: String, body: Vec<u8> },
    TooLarge(u64),
}

#[derive(Debug)]
enum InitSignal {
    Next,
    Error { error_type: String, body: Vec<u8> },
}

#[derive(Debug)]
struct Shared {
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    /// The invoke waiting for its answer.
    current: Mutex<Option<(String, oneshot::Sender<Outcome>)>>,
    init: Mutex<Option<oneshot::Sender<InitSignal>>>,
    arn: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running Lambda runtime and its Runtime API server.
#[derive(Debug)]
pub struct Lambda {
    ctx: HandlerCtx,
    pid: i32,
    exit: oneshot::Receiver<ExitInfo>,
    events: mpsc::Sender<Event>,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    log_ctl: mpsc::Sender<StderrCtl>,
    procfs: Option<ProcFiles>,
}

impl Drop for Lambda {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn env_or(k: &str, default: &str) -> String {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The Lambda environment for the runtime (values already in the probe's environment win).
fn lambda_env(ctx: &HandlerCtx, api: SocketAddr) -> Vec<(String, String)> {
    let name = env_or(
        "AWS_LAMBDA_FUNCTION_NAME",
        &env_or("SANDSCOPE_FUNCTION_NAME", &ctx.sandbox_id),
    );
    let region = env_or("AWS_REGION", "us-east-1");
    let v: Vec<(String, String)> = vec![
        ("AWS_LAMBDA_RUNTIME_API".into(), api.to_string()),
        ("AWS_LAMBDA_FUNCTION_NAME".into(), name.clone()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(),
            env_or(
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                &env_or("SANDSCOPE_MEMORY_MB", "128"),
            ),
        ),
        (
            "AWS_LAMBDA_FUNCTION_VERSION".into(),
            env_or("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME".into(),
            format!("/aws/lambda/{name}"),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME".into(), ctx.sandbox_id.clone()),
        ("AWS_REGION".into(), region.clone()),
        (
            "AWS_DEFAULT_REGION".into(),
            env_or("AWS_DEFAULT_REGION", &region),
        ),
        ("AWS_EXECUTION_ENV".into(), "sandscope".into()),
        ("LAMBDA_TASK_ROOT".into(), "/var/task".into()),
        ("LAMBDA_RUNTIME_DIR".into(), "/var/runtime".into()),
        ("_HANDLER".into(), env_or("_HANDLER", &ctx.handler)),
        ("TZ".into(), env_or("TZ", ":UTC")),
    ];
    v
}

fn arn(env: &[(String, String)]) -> String {
    let get = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    format!(
        "arn:aws:lambda:{}:000000000000:function:{}",
        get("AWS_REGION"),
        get("AWS_LAMBDA_FUNCTION_NAME")
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Lambda {
    /// Bind the Runtime API, spawn the runtime and wait (at most `init_timeout`) for its
    /// first `next` call. Errors are the reason to put in `Ready.error`.
    pub async fn start(
        ctx: HandlerCtx,
        init_timeout: Duration,
        addr: SocketAddr,
    ) -> Result<Lambda, String> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("binding the Runtime API on {addr}: {e}"))?;
        let api = listener
            .local_addr()
            .map_err(|e| format!("Runtime API address: {e}"))?;
        let env = lambda_env(&ctx, api);
        let (ev_tx, ev_rx) = mpsc::channel(1);
        let (init_tx, init_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            events: tokio::sync::Mutex::new(ev_rx),
            current: Mutex::new(None),
            init: Mutex::new(Some(init_tx)),
            arn: arn(&env),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        let (pid, exit, out) = match ctx.spawn_merged(&env) {
            Ok(s) => s,
            Err(e) => {
                server.abort();
                return Err(crate::error_chain(&e));
            }
        };
        let (ctl_tx, ctl_rx) = mpsc::channel(4);
        let last = Arc::new(Mutex::new(VecDeque::new()));
        tokio::spawn(handler::stderr_task(
            out,
            ctl_rx,
            ctx.outbox.clone(),
            last.clone(),
        ));
        let mut l = Lambda {
            ctx,
            pid,
            exit,
            events: ev_tx,
            shared,
            server,
            log_ctl: ctl_tx,
            procfs: None,
        };
        let failure = tokio::select! {
            s = init_rx => match s {
                Ok(InitSignal::Next) => {
                    l.procfs = ProcFiles::open(l.pid);
                    return Ok(l);
                }
                Ok(InitSignal::Error { error_type, body }) => format!(
                    "runtime reported an init error: {}: {}",
                    if error_type.is_empty() { "Runtime.Unknown" } else { &error_type },
                    error_message(&body)
                ),
                Err(_) => "Runtime API server ended".into(),
            },
            e = &mut l.exit => match e {
                Ok(e) => format!("runtime {} before calling next (init)", e.describe()),
                Err(_) => "runtime ended before calling next (init)".into(),
            },
            _ = tokio::time::sleep(init_timeout) => format!(
                "runtime did not call the Runtime API's next within {} ms (init timeout)",
                init_timeout.as_millis()
            ),
        };
        let tail = l.log_tail(&last).await;
        l.finish_dead();
        Err(format!("{failure}{tail}"))
    }

    async fn log_tail(&self, last: &Mutex<VecDeque<String>>) -> String {
        handler::output_tail(&self.log_ctl, last, "output").await
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
    pub async fn invoke(mut self, inv: Invoke) -> (Option<Lambda>, InvokeResult) {
        let start = Instant::now();
        let id = inv.invoke_id.clone();
        let mut r = handler::result(&id, InvokeStatus::RuntimeError);
        // An exit the reaper has not collected yet counts as before this invoke.
        self.ctx.reaper.reap_now();
        if let Ok(e) = self.exit.try_recv() {
            r.error_type = "Runtime.ExitError".into();
            r.error_message = format!("runtime {} before this invoke", e.describe());
            self.finish_dead();
            return (None, r);
        }
        if let Some(pf) = &mut self.procfs {
            pf.reset_peak();
        }
        let _ = self.log_ctl.send(StderrCtl::Begin(id.clone())).await;
        let (tx, rx) = oneshot::channel();
        *lock(&self.shared.current) = Some((id.clone(), tx));
        let timeout_ms = if inv.timeout_ms > 0 {
            inv.timeout_ms
        } else {
            900_000
        };
        let ev = Event {
            id: id.clone(),
            payload: inv.payload,
            deadline_ms: now_ms() + timeout_ms,
            trace_id: trace_id(&inv.traceparent),
        };
        let deadline = (inv.timeout_ms > 0).then(|| start + Duration::from_millis(inv.timeout_ms));
        enum End {
            Answer(Option<Outcome>),
            Exit(Option<ExitInfo>),
            Timeout,
        }
        let end = {
            let events = &self.events;
            let answer = async move {
                if events.send(ev).await.is_err() {
                    return None;
                }
                rx.await.ok()
            };
            tokio::select! {
                a = answer => End::Answer(a),
                e = &mut self.exit => End::Exit(e.ok()),
                _ = handler::sleep_until_opt(deadline) => End::Timeout,
            }
        };
        *lock(&self.shared.current) = None;
        r.duration_us = start.elapsed().as_micros() as u64;
        if let Some(pf) = &mut self.procfs {
            pf.measure(&mut r);
        }
        let keep = match end {
            End::Answer(Some(Outcome::Response(b))) => {
                r.status = InvokeStatus::Ok as i32;
                r.exit_code = 0;
                r.payload = b;
                true
            }
            End::Answer(Some(Outcome::Error { error_type, body })) => {
                r.status = InvokeStatus::FunctionError as i32;
                r.exit_code = 0;
                r.error_message = error_message(&body);
                r.error_type = if error_type.is_empty() {
                    json_string_field(&body, "errorType").unwrap_or_else(|| "Unhandled".into())
                } else {
                    error_type
                };
                r.payload = body;
                true
            }
            End::Answer(Some(Outcome::TooLarge(n))) => {
                r.status = InvokeStatus::ResponseTooLarge as i32;
                r.error_type = "Function.ResponseSizeTooLarge".into();
                r.error_message = too_large_message(n);
                true
            }
            End::Answer(None) => {
                r.error_type = "Runtime.Unavailable".into();
                r.error_message = "the Runtime API server is gone".into();
                false
            }
            End::Exit(e) => {
                match e {
                    Some(e) => handler::apply_exit(&mut r, &e, "runtime"),
                    None => {
                        r.error_type = "Runtime.ExitError".into();
                        r.error_message = "runtime exit status was lost".into();
                    }
                }
                if r.status == InvokeStatus::Ok as i32 {
                    r.status = InvokeStatus::FunctionError as i32;
                    r.error_type = "Runtime.ExitError".into();
                    r.error_message = "runtime exited with status 0 without a response".into();
                }
                false
            }
            End::Timeout => {
                handler::kill_group(self.pid, libc::SIGKILL);
                r.status = InvokeStatus::Timeout as i32;
                r.error_type = "Sandbox.Timeout".into();
                r.error_message = handler::timeout_message(inv.timeout_ms);
                r.signal = libc::SIGKILL;
                false
            }
        };
        handler::flush_output(&self.log_ctl, Duration::from_millis(500)).await;
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
        handler::kill_group(self.pid, libc::SIGKILL);
        self.ctx.forget(self.pid);
        self.server.abort();
    }
}

fn too_large_message(n: u64) -> String {
    format!(
        "response of {n} bytes exceeds the {}-byte limit (the sandscope wire's MAX_PAYLOAD; \
         Lambda's own limit is {LAMBDA_RESPONSE_LIMIT} bytes)",
        wire::MAX_PAYLOAD
    )
}

/// X-Amzn-Trace-Id style id from a W3C traceparent (`00-TRACE-SPAN-FLAGS`), or a fresh
/// looking one.
fn trace_id(traceparent: &str) -> String {
    let parts: Vec<&str> = traceparent.split('-').collect();
    if parts.len() == 4 && parts[1].len() == 32 {
        let t = parts[1];
        let sampled = if parts[3] == "01" { 1 } else { 0 };
        return format!(
            "Root=1-{}-{};Parent={};Sampled={sampled}",
            &t[..8],
            &t[8..],
            parts[2]
        );
    }
    let ms = now_ms();
    format!(
        "Root=1-{:08x}-{:024x};Sampled=0",
        ms / 1000,
        ms as u128 * 2654435761
    )
}

/// `errorMessage` of a Lambda error body, or the body itself.
fn error_message(body: &[u8]) -> String {
    json_string_field(body, "errorMessage").unwrap_or_else(|| {
        let mut s = String::from_utf8_lossy(body).into_owned();
        wire::truncate_line(&mut s, 4096);
        s
    })
}

/// The string value of a top-level-ish `"key": "..."` in a JSON text (enough for Lambda
/// error bodies; no full JSON parser in the probe).
fn json_string_field(body: &[u8], key: &str) -> Option<String> {
    let s = std::str::from_utf8(body).ok()?;
    let pat = format!("\"{key}\"");
    let at = s.find(&pat)? + pat.len();
    let rest = s[at..].trim_start().strip_prefix(':')?.trim_start();
    let mut chars = rest.strip_prefix('"')?.chars();
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let h: String = chars.by_ref().take(4).collect();
                    let c = u32::from_str_radix(&h, 16).ok().and_then(char::from_u32);
                    out.push(c.unwrap_or('\u{fffd}'));
                }
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(connection(s, shared.clone()));
    }
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    error_type: String,
    body: Result<Vec<u8>, u64>,
    close: bool,
}

#[derive(Debug, PartialEq)]
enum ReadError {
    Closed,
    Bad(&'static str),
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn fill(&mut self) -> Result<(), ReadError> {
        let mut chunk = [0u8; 16 * 1024];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => Err(ReadError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    async fn line(&mut self) -> Result<String, ReadError> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(String::from_utf8_lossy(&l[..i]).into_owned());
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::Bad("line too long"));
            }
            self.fill().await?;
        }
    }

    async fn exact(&mut self, n: usize) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn request(&mut self) -> Result<Request, ReadError> {
        let head = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let h: Vec<u8> = self.buf.drain(..i + 4).collect();
                break String::from_utf8_lossy(&h[..i]).into_owned();
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::Bad("request head too long"));
            }
            self.fill().await?;
        };
        let mut lines = head.split("\r\n");
        let first = lines.next().unwrap_or("");
        let mut it = first.split(' ');
        let method = it.next().unwrap_or("").to_string();
        let path = it.next().unwrap_or("").to_string();
        let version = it.next().unwrap_or("");
        let mut len: Option<u64> = None;
        let mut chunked = false;
        let mut close = version == "HTTP/1.0";
        let mut error_type = String::new();
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    len = Some(
                        v.parse()
                            .map_err(|_| ReadError::Bad("bad Content-Length"))?,
                    )
                }
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                "connection" => close = v.eq_ignore_ascii_case("close"),
                "lambda-runtime-function-error-type" => error_type = v.to_string(),
                _ => {}
            }
        }
        let cap = wire::MAX_PAYLOAD as u64;
        let body = if chunked {
            let mut body = Vec::new();
            let mut total = 0u64;
            loop {
                let l = self.line().await?;
                let size = l.split(';').next().unwrap_or("").trim();
                let n = u64::from_str_radix(size, 16).map_err(|_| ReadError::Bad("bad chunk"))?;
                if n == 0 {
                    // trailers until the empty line
                    while !self.line().await?.is_empty() {}
                    break;
                }
                total += n;
                if total > cap {
                    // Not worth reading the rest: answer and close.
                    return Ok(Request {
                        method,
                        path,
                        error_type,
                        body: Err(total),
                        close: true,
                    });
                }
                body.extend(self.exact(n as usize).await?);
                self.exact(2).await?;
            }
            Ok(body)
        } else {
            match len.unwrap_or(0) {
                n if n > cap => {
                    close = true;
                    Err(n)
                }
                n => Ok(self.exact(n as usize).await?),
            }
        };
        Ok(Request {
            method,
            path,
            error_type,
            body,
            close,
        })
    }
}

async fn connection(s: TcpStream, shared: Arc<Shared>) {
    let mut c = Conn { s, buf: Vec::new() };
    loop {
        let req = match c.request().await {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Bad(why)) => {
                let _ = respond(&mut c.s, 400, &[], &error_json("InvalidRequest", why), true).await;
                return;
            }
        };
        let close = req.close;
        let ok = route(&mut c.s, req, &shared).await.is_ok();
        if close || !ok {
            return;
        }
    }
}

fn error_json(t: &str, msg: &str) -> Vec<u8> {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "{{\"errorMessage\":\"{}\",\"errorType\":\"{}\"}}",
        esc(msg),
        esc(t)
    )
    .into_bytes()
}

const ACCEPTED: &[u8] = b"{\"status\":\"OK\"}";

async fn route(s: &mut TcpStream, req: Request, shared: &Shared) -> std::io::Result<()> {
    let close = req.close;
    let Some(rest) = req.path.strip_prefix(PREFIX) else {
        return respond(s, 404, &[], &error_json("NotFound", "unknown path"), close).await;
    };
    match (req.method.as_str(), rest) {
        ("GET", "invocation/next") => {
            let init = lock(&shared.init).take();
            if let Some(tx) = init {
                let _ = tx.send(InitSignal::Next);
            }
            let ev = {
                let mut rx = shared.events.lock().await;
                rx.recv().await
            };
            let Some(ev) = ev else {
                return respond(s, 500, &[], &error_json("Shutdown", "no more events"), true).await;
            };
            let headers = [
                ("Lambda-Runtime-Aws-Request-Id", ev.id.clone()),
                ("Lambda-Runtime-Deadline-Ms", ev.deadline_ms.to_string()),
                ("Lambda-Runtime-Invoked-Function-Arn", shared.arn.clone()),
                ("Lambda-Runtime-Trace-Id", ev.trace_id),
                ("Content-Type", "application/json".into()),
            ];
            respond(s, 200, &headers, &ev.payload, close).await
        }
        ("POST", "init/error") => {
            let body = req.body.unwrap_or_default();
            let init = lock(&shared.init).take();
            if let Some(tx) = init {
                let _ = tx.send(InitSignal::Error {
                    error_type: req.error_type,
                    body,
                });
                respond(s, 202, &[], ACCEPTED, close).await
            } else {
                let e = error_json("InvalidStateTransition", "init already finished");
                respond(s, 403, &[], &e, close).await
            }
        }
        ("POST", r) if r.starts_with("invocation/") => {
            let r = &r["invocation/".len()..];
            let (id, what) = match r.rsplit_once('/') {
                Some((id, w @ ("response" | "error"))) => (id, w),
                _ => {
                    return respond(s, 404, &[], &error_json("NotFound", "unknown path"), close)
                        .await
                }
            };
            let tx = {
                let mut cur = lock(&shared.current);
                match cur.as_ref() {
                    Some((cid, _)) if cid == id => cur.take().map(|(_, tx)| tx),
                    _ => None,
                }
            };
            let Some(tx) = tx else {
                let e = error_json(
                    "InvalidRequestID",
                    &format!("no invocation {id} is waiting"),
                );
                return respond(s, 400, &[], &e, close).await;
            };
            match (what, req.body) {
                (_, Err(n)) if what == "response" => {
                    let _ = tx.send(Outcome::TooLarge(n));
                    let e = error_json("RequestEntityTooLarge", &too_large_message(n));
                    respond(s, 413, &[], &e, true).await
                }
                ("response", Ok(b)) => {
                    let _ = tx.send(Outcome::Response(b));
                    respond(s, 202, &[], ACCEPTED, close).await
                }
                (_, body) => {
                    let body = body.unwrap_or_else(|n| {
                        format!("{{\"errorMessage\":\"error body of {n} bytes too large\"}}")
                            .into_bytes()
                    });
                    let _ = tx.send(Outcome::Error {
                        error_type: req.error_type,
                        body,
                    });
                    respond(s, 202, &[], ACCEPTED, close).await
                }
            }
        }
        _ => respond(s, 404, &[], &error_json("NotFound", "unknown path"), close).await,
    }
}

async fn respond(
    s: &mut TcpStream,
    code: u16,
    headers: &[(&str, String)],
    body: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    };
    let mut out = format!("HTTP/1.1 {code} {reason}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| *k == "Content-Type") {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).await?;
    if close {
        let _ = s.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_extraction() {
        let b = br#"{"errorMessage": "bad \"x\"\nline", "errorType":"ValueError"}"#;
        assert_eq!(
            json_string_field(b, "errorMessage").as_deref(),
            Some("bad \"x\"\nline")
        );
        assert_eq!(
            json_string_field(b, "errorType").as_deref(),
            Some("ValueError")
        );
        assert_eq!(json_string_field(b"not json", "errorType"), None);
        assert_eq!(error_message(b"plain"), "plain");
    }

    #[test]
    fn trace_id_from_traceparent() {
        let t = trace_id("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(
            t,
            "Root=1-0af76519-16cd43dd8448eb211c80319c;Parent=b7ad6b7169203331;Sampled=1"
        );
        assert!(trace_id("").starts_with("Root=1-"));
    }
}
