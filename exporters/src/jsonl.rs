//! JSON-lines platform events shaped like the AWS Lambda Telemetry API
//! (`platform.initStart`, `platform.initRuntimeDone`, `platform.initReport`,
//! `platform.start`, `platform.runtimeDone`, `platform.report`), so existing parsers work.
//!
//! The agent hands over one [`InvokeRecord`] per invocation with [`JsonlSink::send`]:
//! a non-blocking push onto a bounded channel. A writer thread formats and writes the
//! lines; when it falls behind, records are dropped and counted, never waited for.

use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

/// Why the sink could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// The output file could not be opened for appending.
    #[error("cannot open JSON-lines output {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the JSON-lines writer thread")]
    Thread(#[source] std::io::Error),
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl Target {
    /// `-` means stdout, anything else a file path.
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(s))
        }
    }
}

/// Outcome in Telemetry API terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStatus {
    /// `success`.
    Success,
    /// `error` (the function failed).
    Error,
    /// `timeout`.
    Timeout,
    /// `failure` (the runtime or platform failed).
    Failure,
}

impl EventStatus {
    fn as_str(self) -> &'static str {
        match self {
            EventStatus::Success => "success",
            EventStatus::Error => "error",
            EventStatus::Timeout => "timeout",
            EventStatus::Failure => "failure",
        }
    }
}

/// One invocation, as the agent reports it.
#[derive(Debug, Clone)]
pub struct InvokeRecord {
    /// Function name.
    pub function: String,
    /// Sandbox id.
    pub sandbox: String,
    /// Request id.
    pub request_id: String,
    /// Whether a sandbox was started for it.
    pub cold: bool,
    /// Outcome.
    pub status: EventStatus,
    /// Error class, empty on success.
    pub error_type: String,
    /// Wall-clock start, ms since the Unix epoch.
    pub start_unix_ms: u64,
    /// Invoke phase (request sent to the sandbox → result), ms.
    pub duration_ms: f64,
    /// Init duration (cold starts only), ms.
    pub init_duration_ms: Option<f64>,
    /// Memory limit, MiB.
    pub memory_size_mb: u64,
    /// Peak memory of the handler, MiB.
    pub max_memory_used_mb: u64,
}

/// Telemetry API events for one invocation, in order.
pub fn events(r: &InvokeRecord) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(6);
    let end_ms = r.start_unix_ms
        + r.duration_ms.ceil() as u64
        + r.init_duration_ms.unwrap_or(0.0).ceil() as u64;
    let ev = |t: &str, at_ms: u64, record: serde_json::Value| json!({"time": rfc3339_ms(at_ms), "type": t, "record": record});
    let mut t = r.start_unix_ms;
    if let Some(init) = r.init_duration_ms {
        out.push(ev(
            "platform.initStart",
            t,
            json!({"initializationType": "on-demand", "phase": "init",
                   "functionName": r.function, "functionVersion": "$LATEST",
                   "instanceId": r.sandbox}),
        ));
        t += init.ceil() as u64;
        out.push(ev(
            "platform.initRuntimeDone",
            t,
            json!({"initializationType": "on-demand", "phase": "init", "status": "success"}),
        ));
        out.push(ev(
            "platform.initReport",
            t,
            json!({"initializationType": "on-demand", "phase": "init", "status": "success",
                   "metrics": {"durationMs": round3(init)}}),
        ));
    }
    out.push(ev(
        "platform.start",
        t,
        json!({"requestId": r.request_id, "version": "$LATEST"}),
    ));
    let mut done = json!({"requestId": r.request_id, "status": r.status.as_str(),
                          "metrics": {"durationMs": round3(r.duration_ms)}});
    if !r.error_type.is_empty() {
        done["errorType"] = json!(r.error_type);
    }
    out.push(ev("platform.runtimeDone", end_ms, done));
    let mut metrics = json!({
        "durationMs": round3(r.duration_ms),
        "billedDurationMs": r.duration_ms.ceil().max(1.0) as u64,
        "memorySizeMB": r.memory_size_mb,
        "maxMemoryUsedMB": r.max_memory_used_mb,
    });
    if let Some(init) = r.init_duration_ms {
        metrics["initDurationMs"] = json!(round3(init));
    }
    out.push(ev(
        "platform.report",
        end_ms,
        json!({"requestId": r.request_id, "status": r.status.as_str(), "metrics": metrics}),
    ));
    out
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `2026-11-22T16:07:24.123Z` from ms since the epoch (proleptic Gregorian, UTC).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A background JSON-lines writer.
#[derive(Debug, Clone)]
pub struct JsonlSink {
    tx: SyncSender<InvokeRecord>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl JsonlSink {
    /// Open `target` and start the writer thread; at most `capacity` records wait.
    pub fn open(target: &Target, capacity: usize) -> Result<Self, JsonlError> {
        let mut out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| JsonlError::Open {
                        path: p.clone(),
                        source,
                    })?,
            ),
        };
        let (tx, rx) = sync_channel::<InvokeRecord>(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let (d2, w2) = (dropped.clone(), written.clone());
        std::thread::Builder::new()
            .name("jsonl-writer".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(4096);
                while let Ok(rec) = rx.recv() {
                    buf.clear();
                    let evs = events(&rec);
                    for e in &evs {
                        let _ = serde_json::to_writer(&mut buf, e);
                        buf.push(b'\n');
                    }
                    if out.write_all(&buf).and_then(|_| out.flush()).is_ok() {
                        w2.fetch_add(evs.len() as u64, Ordering::Relaxed);
                    } else {
                        d2.fetch_add(evs.len() as u64, Ordering::Relaxed);
                    }
                }
            })
            .map_err(JsonlError::Thread)?;
        Ok(Self {
            tx,
            dropped,
            written,
        })
    }

    /// Hand over a record; never blocks. A full queue counts the record's events as dropped.
    pub fn send(&self, rec: InvokeRecord) {
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(r)) | Err(TrySendError::Disconnected(r)) => {
                self.dropped.fetch_add(events_len(&r), Ordering::Relaxed);
            }
        }
    }

    /// Events dropped (queue full or write failed).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events written.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

fn events_len(r: &InvokeRecord) -> u64 {
    if r.init_duration_ms.is_some() {
        6
    } else {
        3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cold: bool) -> InvokeRecord {
        InvokeRecord {
            function: "f".into(),
            sandbox: "f-1".into(),
            request_id: "r-1".into(),
            cold,
            status: EventStatus::Success,
            error_type: String::new(),
            start_unix_ms: 1_700_000_000_000,
            duration_ms: 1.2345,
            init_duration_ms: cold.then_some(10.5),
            memory_size_mb: 128,
            max_memory_used_mb: 3,
        }
    }

    #[test]
    fn cold_invocation_has_init_events_and_report_fields() {
        let e = events(&rec(true));
        let types: Vec<&str> = e.iter().map(|v| v["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "platform.initStart",
                "platform.initRuntimeDone",
                "platform.initReport",
                "platform.start",
                "platform.runtimeDone",
                "platform.report"
            ]
        );
        let m = &e[5]["record"]["metrics"];
        assert_eq!(m["durationMs"], 1.235);
        assert_eq!(m["billedDurationMs"], 2);
        assert_eq!(m["memorySizeMB"], 128);
        assert_eq!(m["maxMemoryUsedMB"], 3);
        assert_eq!(m["initDurationMs"], 10.5);
        assert_eq!(e[5]["record"]["requestId"], "r-1");
        assert_eq!(e[0]["time"], "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn warm_invocation_has_three_events_and_errors_carry_type() {
        let mut r = rec(false);
        r.status = EventStatus::Timeout;
        r.error_type = "Sandbox.Timedout".into();
        let e = events(&r);
        assert_eq!(e.len(), 3);
        assert!(e[2]["record"]["metrics"].get("initDurationMs").is_none());
        assert_eq!(e[1]["record"]["status"], "timeout");
        assert_eq!(e[1]["record"]["errorType"], "Sandbox.Timedout");
    }

    #[test]
    fn timestamps_match_known_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339_ms(1_795_363_644_999), "2026-11-22T16:07:24.999Z");
    }

    #[test]
    fn sink_writes_lines_and_counts_drops_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let sink = JsonlSink::open(&Target::File(p.clone()), 1024).unwrap();
        sink.send(rec(true));
        sink.send(rec(false));
        let t0 = std::time::Instant::now();
        while sink.written() < 9 && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 9);
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["type"].as_str().unwrap().starts_with("platform."));
        }
        // A sink whose writer cannot keep up: a one-slot queue, many sends.
        let slow = JsonlSink::open(&Target::File(dir.path().join("b.jsonl")), 1).unwrap();
        for _ in 0..10_000 {
            slow.send(rec(false));
        }
        assert!(slow.dropped() > 0, "a full queue must drop, not block");
        assert_eq!(slow.dropped() % 3, 0);
    }

    #[test]
    fn unwritable_target_is_a_clear_error() {
        let e = JsonlSink::open(&Target::File("/nonexistent/dir/x.jsonl".into()), 4).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/x.jsonl"), "{e}");
        assert_eq!(Target::parse("-"), Target::Stdout);
    }
}
