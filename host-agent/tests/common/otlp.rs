//! A real OTLP collector for tests: rotel (PyPI `rotel`, a Rust OpenTelemetry collector)
//! with a Python processor that appends what arrives (logs, spans, metrics) to files as
//! JSON lines.

use super::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Python processors for rotel: what arrives is appended to files as JSON lines.
const PROCESSOR: &str = r#"
import json
LOGS = "@LOGS@"
SPANS = "@SPANS@"
METRICS = "@METRICS@"

def hx(v):
    if v is None:
        return ""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, list):
        return bytes(v).hex()
    return str(v)

def val(v):
    return v.value if v is not None else None

def attrs(a):
    return {x.key: val(x.value) for x in a}

def res(r):
    return attrs(r.resource.attributes) if r.resource else {}

def process_logs(resource_logs):
    with open(LOGS, "a") as f:
        for sl in resource_logs.scope_logs:
            for lr in sl.log_records:
                f.write(json.dumps({
                    "body": lr.body.value if lr.body else None,
                    "severity_number": lr.severity_number,
                    "severity_text": lr.severity_text,
                    "attributes": attrs(lr.attributes),
                    "trace_id": hx(lr.trace_id),
                    "span_id": hx(lr.span_id),
                    "resource": res(resource_logs),
                    "scope": sl.scope.name if sl.scope else "",
                }) + "\n")

def process_metrics(resource_metrics):
    with open(METRICS, "a") as f:
        for sm in resource_metrics.scope_metrics:
            for m in sm.metrics:
                inner = m.data._0
                for p in inner.data_points:
                    v = getattr(p, "value", None)
                    f.write(json.dumps({
                        "name": m.name,
                        "kind": type(m.data).__name__,
                        "temporality": str(getattr(inner, "aggregation_temporality", "")),
                        "start": p.start_time_unix_nano,
                        "time": p.time_unix_nano,
                        "value": getattr(v, "_0", None) if v is not None else None,
                        "count": getattr(p, "count", None),
                        "attributes": attrs(p.attributes),
                        "resource": res(resource_metrics),
                    }) + "\n")

def process_spans(resource_spans):
    with open(SPANS, "a") as f:
        for ss in resource_spans.scope_spans:
            for s in ss.spans:
                f.write(json.dumps({
                    "name": s.name,
                    "trace_id": hx(s.trace_id),
                    "span_id": hx(s.span_id),
                    "parent_span_id": hx(s.parent_span_id),
                    "kind": str(s.kind),
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "attributes": attrs(s.attributes),
                    "status": str(s.status.code) if s.status else "",
                    "resource": res(resource_spans),
                }) + "\n")
"#;

pub struct Rotel {
    child: Child,
    pub logs: std::path::PathBuf,
    pub spans: std::path::PathBuf,
    pub metrics: std::path::PathBuf,
    pub http: u16,
    pub grpc: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_rotel(bin: &str) -> Rotel {
    start_rotel_on(bin, free_port(), free_port())
}

/// rotel listening on these ports (a restart reuses them).
pub fn start_rotel_on(bin: &str, grpc: u16, http: u16) -> Rotel {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs.jsonl");
    let spans = dir.path().join("spans.jsonl");
    let metrics = dir.path().join("metrics.jsonl");
    let proc_py = dir.path().join("capture.py");
    std::fs::write(
        &proc_py,
        PROCESSOR
            .replace("@LOGS@", &logs.display().to_string())
            .replace("@SPANS@", &spans.display().to_string())
            .replace("@METRICS@", &metrics.display().to_string()),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["start", "--otlp-grpc-endpoint"])
        .arg(format!("127.0.0.1:{grpc}"))
        .arg("--otlp-http-endpoint")
        .arg(format!("127.0.0.1:{http}"))
        .args(["--exporter", "blackhole", "--otlp-with-logs-processor"])
        .arg(&proc_py)
        .arg("--otlp-with-trace-processor")
        .arg(&proc_py)
        .arg("--otlp-with-metrics-processor")
        .arg(&proc_py)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rotel did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Rotel {
        child,
        logs,
        spans,
        metrics,
        http,
        grpc,
        _dir: dir,
    }
}

/// The complete JSON lines rotel's processor has written to `p` so far. A last line without
/// its newline is still being written (seen in a slow nested L1) and is left for the next
/// read; any other line that does not parse is an error.
pub fn lines(p: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

pub fn received(r: &Rotel) -> Vec<serde_json::Value> {
    lines(&r.logs)
}

/// Poll `f` on what rotel wrote to `p` until it holds (15 s at most).
pub async fn until(
    p: &std::path::Path,
    what: &str,
    f: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let t0 = Instant::now();
    loop {
        let v = lines(p);
        if f(&v) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{what}: so far {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
