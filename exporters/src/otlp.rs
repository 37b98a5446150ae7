//! OTLP log export over HTTP/protobuf (`POST {endpoint}/v1/logs`).
//!
//! The agent hands over one [`LogRecordIn`] per function log line or platform event with
//! [`LogsExporter::send`]: a non-blocking push onto a bounded queue. A background task
//! batches (up to [`OtlpConfig::max_batch`] records or every [`OtlpConfig::interval`]),
//! encodes an `ExportLogsServiceRequest` and posts it, retrying failed posts with backoff.
//! Nothing here ever waits on the caller's path: when the queue is full, or a batch still
//! fails after its retries, the records are dropped and counted ([`LogsExporter::dropped`]).

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not a plain `http://host:port[/path]` URL.
    #[error("OTLP endpoint `{0}`: {1}")]
    Endpoint(String, String),
    /// A header name or value is not valid HTTP.
    #[error("OTLP header `{0}`: not a valid HTTP header")]
    Header(String),
    /// Not inside a tokio runtime.
    #[error("the OTLP exporter needs a running tokio runtime")]
    NoRuntime,
}

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// Base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`: `/v1/logs` is appended.
    pub endpoint: String,
    /// Extra request headers (API keys, basic auth).
    pub headers: Vec<(String, String)>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Longest a record waits before its batch is sent.
    pub interval: Duration,
    /// Records per request at most.
    pub max_batch: usize,
    /// Records queued at most (beyond: dropped and counted).
    pub queue: usize,
    /// Retries of a failed request before its records are dropped.
    pub retries: u32,
    /// Resource attributes (service.name, host.id, ...).
    pub resource: Vec<(String, String)>,
}

impl OtlpConfig {
    /// Defaults for `endpoint`: 10 s timeout, 1 s interval, 512 per batch, 8192 queued,
    /// 3 retries.
    pub fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            interval: Duration::from_secs(1),
            max_batch: 512,
            queue: 8192,
            retries: 3,
            resource: Vec::new(),
        }
    }

    /// Check the endpoint: `http://` only (this build has no TLS), with a host.
    pub fn validate(&self) -> Result<(), OtlpError> {
        let bad = |why: &str| OtlpError::Endpoint(self.endpoint.clone(), why.to_string());
        let rest = if let Some(r) = self.endpoint.strip_prefix("http://") {
            r
        } else if self.endpoint.starts_with("https://") {
            return Err(bad(
                "https is not supported by this build; use a local collector (Alloy, the \
                 OpenTelemetry Collector, rotel) on http://",
            ));
        } else {
            return Err(bad("must start with http://"));
        };
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad("has no host"));
        }
        if let Some((_, port)) = host.rsplit_once(':') {
            if !host.ends_with(']') && port.parse::<u16>().is_err() {
                return Err(bad("has an invalid port"));
            }
        }
        for (k, v) in &self.headers {
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
                || reqwest::header::HeaderValue::from_str(v).is_err()
            {
                return Err(OtlpError::Header(k.clone()));
            }
        }
        Ok(())
    }

    fn logs_url(&self) -> String {
        format!("{}/v1/logs", self.endpoint.trim_end_matches('/'))
    }
}

/// OTLP severity numbers used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// INFO (9).
    Info,
    /// WARN (13).
    Warn,
    /// ERROR (17).
    Error,
}

impl Severity {
    fn number(self) -> i32 {
        match self {
            Severity::Info => 9,
            Severity::Warn => 13,
            Severity::Error => 17,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warn => "WARN",
            Severity::Error => "ERROR",
        }
    }
}

/// One log record as the agent hands it over.
#[derive(Debug, Clone)]
pub struct LogRecordIn {
    /// When it happened, ns since the Unix epoch.
    pub time_unix_nano: u64,
    /// Severity.
    pub severity: Severity,
    /// The line.
    pub body: String,
    /// Attributes (string values).
    pub attributes: Vec<(&'static str, String)>,
    /// Trace of the invocation it belongs to, if known.
    pub trace_id: Option<[u8; 16]>,
    /// Span of the invocation, if known.
    pub span_id: Option<[u8; 8]>,
}

fn kv(k: &str, v: String) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v)),
        }),
        ..Default::default()
    }
}

/// Encode records as one `ExportLogsServiceRequest` (protobuf).
pub fn encode(resource: &[(String, String)], records: Vec<LogRecordIn>) -> Vec<u8> {
    let log_records = records
        .into_iter()
        .map(|r| LogRecord {
            time_unix_nano: r.time_unix_nano,
            observed_time_unix_nano: r.time_unix_nano,
            severity_number: r.severity.number(),
            severity_text: r.severity.text().to_string(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(r.body)),
            }),
            attributes: r.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
            trace_id: r.trace_id.map(|t| t.to_vec()).unwrap_or_default(),
            span_id: r.span_id.map(|s| s.to_vec()).unwrap_or_default(),
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: resource.iter().map(|(k, v)| kv(k, v.clone())).collect(),
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "sandscope".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    exported: AtomicU64,
    dropped: AtomicU64,
    failed_requests: AtomicU64,
}

/// See the module docs. Cheap to clone; the task ends when every clone is dropped.
#[derive(Debug, Clone)]
pub struct LogsExporter {
    tx: mpsc::Sender<LogRecordIn>,
    counters: Arc<Counters>,
}

impl LogsExporter {
    /// Validate `cfg` and start the export task on the current tokio runtime.
    pub fn start(cfg: OtlpConfig) -> Result<Self, OtlpError> {
        cfg.validate()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| OtlpError::NoRuntime)?;
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let counters = Arc::new(Counters::default());
        rt.spawn(run(cfg, rx, counters.clone()));
        Ok(Self { tx, counters })
    }

    /// Queue a record; never waits (a full queue drops it, counted).
    pub fn send(&self, rec: LogRecordIn) {
        match self.tx.try_send(rec) {
            Ok(()) => self.counters.accepted.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Count records lost before they reached the exporter (e.g. a lagging subscriber).
    pub fn count_dropped(&self, n: u64) {
        self.counters.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Records dropped (queue full, export failed after retries, lost upstream).
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Records the backend accepted.
    pub fn exported(&self) -> u64 {
        self.counters.exported.load(Ordering::Relaxed)
    }

    /// Records queued so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Requests that failed (each retry counts).
    pub fn failed_requests(&self) -> u64 {
        self.counters.failed_requests.load(Ordering::Relaxed)
    }
}

async fn run(cfg: OtlpConfig, mut rx: mpsc::Receiver<LogRecordIn>, c: Arc<Counters>) {
    let client = match reqwest::Client::builder().timeout(cfg.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sandscope: OTLP exporter disabled: cannot build an HTTP client: {e}");
            return;
        }
    };
    let url = cfg.logs_url();
    let mut batch: Vec<LogRecordIn> = Vec::with_capacity(cfg.max_batch);
    loop {
        // Wait for a first record, then fill the batch until it is full or the interval
        // passes.
        match rx.recv().await {
            Some(r) => batch.push(r),
            None => break,
        }
        let deadline = tokio::time::Instant::now() + cfg.interval;
        while batch.len() < cfg.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let body = encode(&cfg.resource, std::mem::take(&mut batch));
        if post(&client, &url, &cfg, body, &c).await {
            c.exported.fetch_add(n, Ordering::Relaxed);
        } else {
            c.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// POST with retries (backoff 200 ms, 400 ms, 800 ms, ...); true when accepted.
async fn post(
    client: &reqwest::Client,
    url: &str,
    cfg: &OtlpConfig,
    body: Vec<u8>,
    c: &Counters,
) -> bool {
    let mut delay = Duration::from_millis(200);
    for attempt in 0..=cfg.retries {
        let mut req = client
            .post(url)
            .header("content-type", "application/x-protobuf")
            .body(body.clone());
        for (k, v) in &cfg.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => return true,
            // 4xx other than 429 will not get better with retries.
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                c.failed_requests.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            _ => {
                c.failed_requests.fetch_add(1, Ordering::Relaxed);
            }
        }
        if attempt < cfg.retries {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(OtlpConfig::new("http://127.0.0.1:4318").validate().is_ok());
        assert!(OtlpConfig::new("http://collector/otlp/").validate().is_ok());
        for (bad, why) in [
            ("127.0.0.1:4318", "http://"),
            ("https://otlp.nr-data.net", "https"),
            ("http://", "no host"),
            ("http://h:notaport", "port"),
        ] {
            let e = OtlpConfig::new(bad).validate().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(why), "{e}");
        }
        let mut c = OtlpConfig::new("http://h:1");
        c.headers.push(("bad header".into(), "x".into()));
        assert!(c.validate().unwrap_err().to_string().contains("bad header"));
        assert_eq!(
            OtlpConfig::new("http://h:1/base/").logs_url(),
            "http://h:1/base/v1/logs"
        );
    }

    #[test]
    fn encoding_round_trips_through_the_otlp_schema() {
        let body = encode(
            &[("service.name".into(), "sandscope-agent".into())],
            vec![LogRecordIn {
                time_unix_nano: 42,
                severity: Severity::Error,
                body: "boom".into(),
                attributes: vec![("faas.name", "hello".into())],
                trace_id: Some([7; 16]),
                span_id: Some([9; 8]),
            }],
        );
        let req = ExportLogsServiceRequest::decode(&body[..]).unwrap();
        let rl = &req.resource_logs[0];
        assert_eq!(
            rl.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
        let r = &rl.scope_logs[0].log_records[0];
        assert_eq!((r.severity_number, r.severity_text.as_str()), (17, "ERROR"));
        assert_eq!(r.time_unix_nano, 42);
        assert_eq!(r.trace_id, vec![7; 16]);
        assert_eq!(r.span_id, vec![9; 8]);
        assert_eq!(
            r.body.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("boom".into()))
        );
        assert_eq!(r.attributes[0].key, "faas.name");
    }

    fn rec(i: u64) -> LogRecordIn {
        LogRecordIn {
            time_unix_nano: i,
            severity: Severity::Info,
            body: format!("line {i}"),
            attributes: Vec::new(),
            trace_id: None,
            span_id: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_backend_costs_the_caller_nothing_and_every_record_is_counted() {
        // A port with nothing listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = OtlpConfig::new(&format!("http://127.0.0.1:{port}"));
        cfg.queue = 100;
        cfg.interval = Duration::from_millis(20);
        cfg.retries = 1;
        let e = LogsExporter::start(cfg).unwrap();
        let t0 = std::time::Instant::now();
        for i in 0..1000 {
            e.send(rec(i));
        }
        assert!(
            t0.elapsed() < Duration::from_millis(200),
            "send must not block"
        );
        let t0 = std::time::Instant::now();
        while e.dropped() < 1000 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "dropped {}",
                e.dropped()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(e.dropped(), 1000);
        assert_eq!(e.exported(), 0);
        assert!(e.failed_requests() >= 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_reach_a_listening_backend_with_headers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let got = Arc::new(tokio::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
        let g2 = got.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let g3 = g2.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 65536];
                    loop {
                        let n = s.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            continue;
                        }
                        let body = buf[end + 4..end + 4 + len].to_vec();
                        buf.drain(..end + 4 + len);
                        g3.lock().await.push((head, body));
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        let mut cfg = OtlpConfig::new(&format!("http://127.0.0.1:{port}"));
        cfg.interval = Duration::from_millis(30);
        cfg.max_batch = 10;
        cfg.headers.push(("api-key".into(), "secret".into()));
        let e = LogsExporter::start(cfg).unwrap();
        for i in 0..25 {
            e.send(rec(i));
        }
        let t0 = std::time::Instant::now();
        while e.exported() < 25 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "exported {}",
                e.exported()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = got.lock().await;
        assert!(got.len() >= 3, "25 records in batches of at most 10");
        let mut lines = Vec::new();
        for (head, body) in got.iter() {
            assert!(head.starts_with("post /v1/logs "), "{head}");
            assert!(head.contains("api-key: secret"), "{head}");
            assert!(
                head.contains("content-type: application/x-protobuf"),
                "{head}"
            );
            let req = ExportLogsServiceRequest::decode(&body[..]).unwrap();
            for r in &req.resource_logs[0].scope_logs[0].log_records {
                lines.push(r.time_unix_nano);
            }
        }
        lines.sort();
        assert_eq!(
            lines,
            (0..25).collect::<Vec<u64>>(),
            "every record exactly once"
        );
        assert_eq!(e.dropped(), 0);
    }
}
