//! OTLP export: logs, traces and metrics over HTTP/protobuf or gRPC (cleartext HTTP/2),
//! with an optional on-disk spool that carries data across collector outages and agent
//! restarts.
//!
//! The module is one signal-agnostic pipeline ([`Exporter`]) plus one [`Encode`]r per
//! signal ([`LogsEncoder`] here; the metrics and traces encoders live in [`metrics`] and
//! [`traces`]). The agent hands items over with [`Exporter::send`]: a non-blocking push
//! onto a bounded queue. A background task batches (up to [`OtlpConfig::max_batch`] items
//! or every [`OtlpConfig::interval`]), encodes one `Export*ServiceRequest` and sends it
//! over the configured [`Protocol`], retrying retryable failures with backoff. Nothing
//! waits on the caller's path: a full queue drops and counts, a batch the backend refuses
//! is dropped and counted, and a batch that still fails after its retries goes to the
//! spool ([`OtlpConfig::spool`]) or is dropped and counted. Spooled requests are replayed
//! oldest first once the backend answers again.
//!
//! Every record is accounted for: once the pipeline is quiet,
//! `accepted == exported + dropped + spooled` (plus whatever a previous run left in the
//! spool, and whatever [`Exporter::count_dropped`] added).

pub mod attrs;
pub mod metrics;
mod pipeline;
mod spool;
pub mod traces;
mod transport;

pub use pipeline::{Encode, Encoded, Exporter, FILL_TICK};
pub use spool::SpoolError;

use attrs::truncate;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use std::time::Duration;

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not a plain `http://host:port[/path]` URL.
    #[error("OTLP endpoint `{0}`: {1}")]
    Endpoint(String, String),
    /// A header name or value is not valid HTTP.
    #[error("OTLP header `{0}`: not a valid HTTP header")]
    Header(String),
    /// The CA file cannot be read or holds no certificate.
    #[error("OTLP CA file {0}: {1}")]
    Ca(std::path::PathBuf, String),
    /// Not inside a tokio runtime.
    #[error("the OTLP exporter needs a running tokio runtime")]
    NoRuntime,
    /// The HTTP client could not be built.
    #[error("cannot build the OTLP HTTP client")]
    Client(#[source] reqwest::Error),
    /// The spool directory could not be opened.
    #[error("cannot open the OTLP spool")]
    Spool(#[from] SpoolError),
}

/// One OTLP signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Log records.
    Logs,
    /// Spans.
    Traces,
    /// Metric data points.
    Metrics,
}

impl Signal {
    /// `logs`, `traces` or `metrics` (also the spool subdirectory).
    pub fn name(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }

    /// The OTLP/HTTP path appended to the endpoint.
    pub fn http_path(self) -> &'static str {
        match self {
            Signal::Logs => "/v1/logs",
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        }
    }

    /// The gRPC method path of the collector service.
    pub fn grpc_path(self) -> &'static str {
        match self {
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }
}

/// Wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention).
    #[default]
    Http,
    /// OTLP/gRPC over cleartext HTTP/2 (port 4317 by convention).
    Grpc,
}

/// Request body compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Bodies as encoded.
    #[default]
    None,
    /// gzip (`content-encoding: gzip` over HTTP, `grpc-encoding: gzip` over gRPC).
    Gzip,
}

/// Aggregation temporality of exported sums and histograms (used by the metrics encoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Temporality {
    /// Values accumulate since the process started.
    #[default]
    Cumulative,
    /// Values cover one export interval.
    Delta,
}

/// Where requests that could not be delivered wait for the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Base directory; each signal uses `{dir}/{signal}/`.
    pub dir: std::path::PathBuf,
    /// Bytes kept per signal at most; beyond, the oldest requests are dropped and counted.
    pub max_bytes: u64,
}

/// Where and how to export.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// Base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT`: the signal's path is appended (HTTP),
    /// or only scheme, host and port are used (gRPC).
    pub endpoint: String,
    /// Extra request headers (API keys, basic auth); gRPC metadata when over gRPC.
    pub headers: Vec<(String, String)>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Longest an item waits before its batch is sent.
    pub interval: Duration,
    /// Items per request at most.
    pub max_batch: usize,
    /// Items queued at most (beyond: dropped and counted).
    pub queue: usize,
    /// Retries of a failed request before its records are spooled or dropped.
    pub retries: u32,
    /// Resource attributes (service.name, host.id, ...).
    pub resource: Vec<(String, String)>,
    /// HTTP/protobuf or gRPC.
    pub protocol: Protocol,
    /// Request body compression.
    pub compression: Compression,
    /// On-disk spool for requests that could not be delivered; `None` drops them.
    pub spool: Option<SpoolConfig>,
    /// Temporality of exported metrics.
    pub temporality: Temporality,
    /// Longest attribute value or log body in bytes (cut at a char boundary); `None`: no
    /// limit.
    pub max_attr_value_len: Option<usize>,
    /// Extra CA certificates (PEM) trusted for `https://` endpoints, beyond the built-in
    /// web roots (a private CA in front of a gateway).
    pub ca_file: Option<std::path::PathBuf>,
}

impl OtlpConfig {
    /// Defaults for `endpoint`: HTTP/protobuf, no compression, no spool, cumulative
    /// temporality, no value limit, 10 s timeout, 1 s interval, 512 per batch, 8192 queued,
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
            protocol: Protocol::Http,
            compression: Compression::None,
            spool: None,
            temporality: Temporality::Cumulative,
            max_attr_value_len: None,
            ca_file: None,
        }
    }

    /// Check the endpoint: `http://`, or `https://` for HTTP/protobuf (gRPC here is
    /// cleartext h2c only), with a host; the headers; the CA file.
    pub fn validate(&self) -> Result<(), OtlpError> {
        let bad = |why: &str| OtlpError::Endpoint(self.endpoint.clone(), why.to_string());
        let rest = if let Some(r) = self.endpoint.strip_prefix("http://") {
            r
        } else if let Some(r) = self.endpoint.strip_prefix("https://") {
            if self.protocol == Protocol::Grpc {
                return Err(bad(
                    "gRPC over TLS is not built; use protocol `http` (HTTP/protobuf over \
                     https) or a local collector on http://",
                ));
            }
            r
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).map_err(|e| OtlpError::Ca(ca.clone(), e.to_string()))?;
            reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| OtlpError::Ca(ca.clone(), "no PEM certificate in it".into()))?;
        }
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

    /// `scheme://host[:port]` of the endpoint, without any path.
    fn origin(&self) -> &str {
        let after = self.endpoint.find("://").map(|i| i + 3).unwrap_or(0);
        match self.endpoint[after..].find('/') {
            Some(i) => &self.endpoint[..after + i],
            None => &self.endpoint,
        }
    }

    /// The request URL of `s`: HTTP: the endpoint (trailing `/` trimmed) plus
    /// [`Signal::http_path`]; gRPC: `scheme://host:port` plus [`Signal::grpc_path`] (any
    /// path in the endpoint is ignored).
    pub fn url(&self, s: Signal) -> String {
        match self.protocol {
            Protocol::Http => format!("{}{}", self.endpoint.trim_end_matches('/'), s.http_path()),
            Protocol::Grpc => format!("{}{}", self.origin(), s.grpc_path()),
        }
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

/// Encode records as one `ExportLogsServiceRequest` (protobuf), without value limits.
pub fn encode(resource: &[(String, String)], records: Vec<LogRecordIn>) -> Vec<u8> {
    encode_limited(resource, records, None)
}

fn encode_limited(
    resource: &[(String, String)],
    records: Vec<LogRecordIn>,
    limit: Option<usize>,
) -> Vec<u8> {
    let log_records = records
        .into_iter()
        .map(|r| LogRecord {
            time_unix_nano: r.time_unix_nano,
            observed_time_unix_nano: r.time_unix_nano,
            severity_number: r.severity.number(),
            severity_text: r.severity.text().to_string(),
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(truncate(r.body, limit))),
            }),
            attributes: r
                .attributes
                .into_iter()
                .map(|(k, v)| kv(k, truncate(v, limit)))
                .collect(),
            trace_id: r.trace_id.map(|t| t.to_vec()).unwrap_or_default(),
            span_id: r.span_id.map(|s| s.to_vec()).unwrap_or_default(),
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: resource
                    .iter()
                    .map(|(k, v)| kv(k, truncate(v.clone(), limit)))
                    .collect(),
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(attrs::scope()),
                log_records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
}

/// Log records as `ExportLogsServiceRequest`s.
#[derive(Debug, Clone)]
pub struct LogsEncoder {
    resource: Vec<(String, String)>,
    max_value: Option<usize>,
}

impl LogsEncoder {
    /// Resource and value limit from `cfg`.
    pub fn new(cfg: &OtlpConfig) -> Self {
        Self {
            resource: cfg.resource.clone(),
            max_value: cfg.max_attr_value_len,
        }
    }
}

impl Encode for LogsEncoder {
    type Item = LogRecordIn;
    const SIGNAL: Signal = Signal::Logs;

    fn records(_: &LogRecordIn) -> u64 {
        1
    }

    fn encode(&mut self, items: Vec<LogRecordIn>) -> Encoded {
        let records = items.len() as u64;
        Encoded {
            body: encode_limited(&self.resource, items, self.max_value),
            records,
        }
    }
}

/// The log exporter the agent uses: an [`Exporter`] of [`LogsEncoder`] (every
/// [`Exporter`] method is reachable through `Deref`).
#[derive(Debug, Clone)]
pub struct LogsExporter(Exporter<LogsEncoder>);

impl LogsExporter {
    /// Validate `cfg` and start the export task on the current tokio runtime.
    pub fn start(cfg: OtlpConfig) -> Result<Self, OtlpError> {
        Exporter::start(&cfg, LogsEncoder::new(&cfg)).map(Self)
    }

    /// The underlying generic exporter.
    pub fn into_inner(self) -> Exporter<LogsEncoder> {
        self.0
    }
}

impl std::ops::Deref for LogsExporter {
    type Target = Exporter<LogsEncoder>;

    fn deref(&self) -> &Exporter<LogsEncoder> {
        &self.0
    }
}

/// A minimal HTTP/1.1 backend for the tests here and in `pipeline`: answers every
/// request with a settable status (or never, when `hang` is set) and keeps what it got.
#[cfg(test)]
pub(crate) mod test_http {
    use super::{LogRecordIn, Severity};
    use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One request: lower-cased head, body, the status it was answered with.
    #[derive(Debug, Clone)]
    pub(crate) struct Got {
        pub(crate) head: String,
        pub(crate) body: Vec<u8>,
        pub(crate) status: u16,
    }

    pub(crate) struct Backend {
        pub(crate) port: u16,
        pub(crate) status: Arc<AtomicU16>,
        pub(crate) hang: Arc<AtomicBool>,
        pub(crate) got: Arc<Mutex<Vec<Got>>>,
    }

    /// A numbered INFO record.
    pub(crate) fn rec(i: u64) -> LogRecordIn {
        LogRecordIn {
            time_unix_nano: i,
            severity: Severity::Info,
            body: format!("line {i}"),
            attributes: Vec::new(),
            trace_id: None,
            span_id: None,
        }
    }

    impl Backend {
        pub(crate) async fn start(status: u16) -> Backend {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            let b = Backend {
                port,
                status: Arc::new(AtomicU16::new(status)),
                hang: Arc::new(AtomicBool::new(false)),
                got: Arc::default(),
            };
            let (st, hang, got) = (b.status.clone(), b.hang.clone(), b.got.clone());
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let (st, hang, got) = (st.clone(), hang.clone(), got.clone());
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 65536];
                        loop {
                            let n = match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
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
                            if hang.load(Ordering::SeqCst) {
                                std::future::pending::<()>().await;
                            }
                            let status = st.load(Ordering::SeqCst);
                            got.lock().unwrap().push(Got { head, body, status });
                            let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            b
        }

        pub(crate) fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        pub(crate) fn got(&self) -> Vec<Got> {
            self.got.lock().unwrap().clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_http::{rec, Backend};
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert!(OtlpConfig::new("http://127.0.0.1:4318").validate().is_ok());
        assert!(OtlpConfig::new("http://collector/otlp/").validate().is_ok());
        assert!(OtlpConfig::new("https://otlp.nr-data.net")
            .validate()
            .is_ok());
        let mut g = OtlpConfig::new("https://otlp.nr-data.net:4317");
        g.protocol = Protocol::Grpc;
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gRPC over TLS is not built"));
        let mut c = OtlpConfig::new("https://h");
        c.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/ca.pem"));
        let junk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(junk.path(), "not a certificate").unwrap();
        c.ca_file = Some(junk.path().into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("no PEM certificate"));
        for protocol in [Protocol::Http, Protocol::Grpc] {
            for (bad, why) in [
                ("127.0.0.1:4318", "http://"),
                ("ftp://h", "https://"),
                ("http://", "no host"),
                ("http://h:notaport", "port"),
            ] {
                let mut c = OtlpConfig::new(bad);
                c.protocol = protocol;
                let e = c.validate().unwrap_err().to_string();
                assert!(e.contains(bad) && e.contains(why), "{e}");
            }
        }
        let mut c = OtlpConfig::new("http://h:1");
        c.headers.push(("bad header".into(), "x".into()));
        assert!(c.validate().unwrap_err().to_string().contains("bad header"));
    }

    #[test]
    fn signals_have_their_otlp_paths_and_urls_for_both_protocols() {
        let names: Vec<_> = [Signal::Logs, Signal::Traces, Signal::Metrics]
            .iter()
            .map(|s| (s.name(), s.http_path(), s.grpc_path()))
            .collect();
        assert_eq!(
            names,
            [
                (
                    "logs",
                    "/v1/logs",
                    "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
                ),
                (
                    "traces",
                    "/v1/traces",
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
                ),
                (
                    "metrics",
                    "/v1/metrics",
                    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
                ),
            ]
        );
        let mut c = OtlpConfig::new("http://h:1/base/");
        assert_eq!(c.url(Signal::Logs), "http://h:1/base/v1/logs");
        assert_eq!(c.url(Signal::Metrics), "http://h:1/base/v1/metrics");
        c.protocol = Protocol::Grpc;
        assert_eq!(
            c.url(Signal::Traces),
            "http://h:1/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        let mut c = OtlpConfig::new("http://[::1]:4317");
        c.protocol = Protocol::Grpc;
        assert_eq!(
            c.url(Signal::Logs),
            "http://[::1]:4317/opentelemetry.proto.collector.logs.v1.LogsService/Export"
        );
        let c = OtlpConfig::new("http://collector");
        assert_eq!(c.url(Signal::Traces), "http://collector/v1/traces");
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

    fn string(v: &Option<AnyValue>) -> String {
        match v.as_ref().and_then(|v| v.value.clone()) {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("not a string: {other:?}"),
        }
    }

    #[test]
    fn the_logs_encoder_cuts_bodies_and_values_at_a_char_boundary() {
        let mut cfg = OtlpConfig::new("http://h:1");
        cfg.max_attr_value_len = Some(5);
        cfg.resource = vec![("service.name".into(), "sandscope-agent".into())];
        let mut e = LogsEncoder::new(&cfg);
        let mut r = rec(1);
        r.body = "ab\u{e9}\u{e9}cd".into(); // a b é(2) é(2) c d: byte 5 is inside the 2nd é
        r.attributes = vec![("k", "0123456789".into()), ("short", "ok".into())];
        assert_eq!(LogsEncoder::records(&r), 1);
        let out = e.encode(vec![r, rec(2)]);
        assert_eq!(out.records, 2);
        let req = ExportLogsServiceRequest::decode(&out.body[..]).unwrap();
        let rl = &req.resource_logs[0];
        assert_eq!(
            string(&rl.resource.as_ref().unwrap().attributes[0].value),
            "sands"
        );
        let lr = &rl.scope_logs[0].log_records;
        assert_eq!(string(&lr[0].body), "ab\u{e9}");
        assert_eq!(string(&lr[0].attributes[0].value), "01234");
        assert_eq!(string(&lr[0].attributes[1].value), "ok");
        assert_eq!(string(&lr[1].body), "line ", "6 bytes cut to 5");

        // No limit: untouched.
        let mut e = LogsEncoder::new(&OtlpConfig::new("http://h:1"));
        let mut r = rec(1);
        r.body = "x".repeat(10_000);
        let req = ExportLogsServiceRequest::decode(&e.encode(vec![r]).body[..]).unwrap();
        assert_eq!(
            string(&req.resource_logs[0].scope_logs[0].log_records[0].body).len(),
            10_000
        );
    }

    #[test]
    fn starting_needs_a_runtime_and_a_valid_config() {
        assert!(matches!(
            LogsExporter::start(OtlpConfig::new("http://127.0.0.1:1")),
            Err(OtlpError::NoRuntime)
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(matches!(
                LogsExporter::start(OtlpConfig::new("https:/h")),
                Err(OtlpError::Endpoint(..))
            ));
        });
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
        cfg.max_batch = 50;
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
        assert_eq!(e.accepted(), 1000);
        e.flush(Duration::from_secs(10)).await;
        assert_eq!(e.dropped(), 1000);
        assert_eq!(e.exported(), 0);
        assert_eq!(e.spooled(), 0);
        // At most 100 were queued (2 batches of 50), each tried twice.
        assert!(e.failed_requests() >= 2, "{}", e.failed_requests());
        assert_eq!(e.failed_requests() % 2, 0, "two attempts per request");
        e.count_dropped(5);
        assert_eq!(e.dropped(), 1005);
        assert_eq!(e.accepted(), 1000, "count_dropped is not accepted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_reach_a_listening_backend_with_headers() {
        let b = Backend::start(200).await;
        let mut cfg = OtlpConfig::new(&b.url());
        cfg.interval = Duration::from_millis(30);
        cfg.max_batch = 10;
        cfg.headers.push(("api-key".into(), "secret".into()));
        let e = LogsExporter::start(cfg).unwrap();
        for i in 0..25 {
            e.send(rec(i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!(e.exported(), 25);
        let got = b.got();
        assert_eq!(got.len(), 3, "25 records in batches of at most 10");
        let mut lines = Vec::new();
        for g in &got {
            assert!(g.head.starts_with("post /v1/logs "), "{}", g.head);
            assert!(g.head.contains("api-key: secret"), "{}", g.head);
            assert!(
                g.head.contains("content-type: application/x-protobuf"),
                "{}",
                g.head
            );
            assert!(!g.head.contains("content-encoding"), "{}", g.head);
            let req = ExportLogsServiceRequest::decode(&g.body[..]).unwrap();
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
        assert_eq!(e.failed_requests(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gzip_bodies_carry_content_encoding_and_decompress_to_the_request() {
        use std::io::Read;
        let b = Backend::start(200).await;
        let mut cfg = OtlpConfig::new(&b.url());
        cfg.interval = Duration::from_millis(10);
        cfg.compression = Compression::Gzip;
        let e = LogsExporter::start(cfg).unwrap();
        for i in 0..3 {
            e.send(rec(i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!(e.exported(), 3);
        let got = b.got();
        assert_eq!(got.len(), 1);
        assert!(
            got[0].head.contains("content-encoding: gzip"),
            "{}",
            got[0].head
        );
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&got[0].body[..])
            .read_to_end(&mut raw)
            .unwrap();
        let req = ExportLogsServiceRequest::decode(&raw[..]).unwrap();
        assert_eq!(req.resource_logs[0].scope_logs[0].log_records.len(), 3);
    }
}
