//! The OTLP pipeline against a real collector: rotel (PyPI `rotel`, a Rust OpenTelemetry
//! collector) receiving OTLP over gRPC and HTTP, with a Python logs processor that appends
//! every record it gets to a file. Records must arrive exactly once over both protocols
//! with gzip, survive an outage and an exporter restart through the spool, and be counted
//! exactly when the collector dies mid-run.

use exporters::otlp::{
    Compression, Exporter, LogRecordIn, LogsEncoder, OtlpConfig, Protocol, Severity, SpoolConfig,
};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// rotel's collector binary (inside the Python package), if installed.
fn rotel() -> Option<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok();
    if let Some(out) = out {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && std::path::Path::new(&p).exists() {
            return Some(p);
        }
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "rotel is required under CI: python3 -m pip install rotel==0.0.1a15"
    );
    eprintln!("SKIPPED: the rotel tests need rotel (python3 -m pip install rotel==0.0.1a15)");
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const PROCESSOR: &str = r#"
OUT = "@OUT@"

def process_logs(resource_logs):
    with open(OUT, "a") as f:
        for sl in resource_logs.scope_logs:
            for lr in sl.log_records:
                f.write((lr.body.value if lr.body else "") + "\n")
"#;

/// A running rotel; killed (by its PID, through `Child`) when dropped.
struct Rotel {
    child: Child,
    out: std::path::PathBuf,
    grpc: u16,
    http: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Rotel {
    fn start(bin: &str, grpc: u16, http: u16) -> Rotel {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("logs.txt");
        let proc_py = dir.path().join("capture.py");
        std::fs::write(
            &proc_py,
            PROCESSOR.replace("@OUT@", &out.display().to_string()),
        )
        .unwrap();
        let child = Command::new(bin)
            .args(["start", "--otlp-grpc-endpoint"])
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--otlp-http-endpoint")
            .arg(format!("127.0.0.1:{http}"))
            .args(["--exporter", "blackhole", "--otlp-with-logs-processor"])
            .arg(&proc_py)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        for port in [grpc, http] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "rotel did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Rotel {
            child,
            out,
            grpc,
            http,
            _dir: dir,
        }
    }

    /// Bodies received so far, with how often each arrived.
    fn received(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for l in std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
        {
            *m.entry(l.to_string()).or_insert(0) += 1;
        }
        m
    }

    /// Wait until `n` distinct bodies arrived; then they must each have arrived once.
    async fn wait_for(&self, n: usize, what: &str) -> HashMap<String, usize> {
        let t0 = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                // Give duplicates, if any, a moment to show up.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return self.received();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "{what}: {} of {n} records arrived",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn rec(tag: &str, i: u64) -> LogRecordIn {
    LogRecordIn {
        time_unix_nano: 1_700_000_000_000_000_000 + i,
        severity: Severity::Info,
        body: format!("{tag}-{i}"),
        attributes: vec![("faas.name", "rotel-test".into())],
        trace_id: None,
        span_id: None,
    }
}

fn config(protocol: Protocol, port: u16) -> OtlpConfig {
    let mut c = OtlpConfig::new(&format!("http://127.0.0.1:{port}"));
    c.protocol = protocol;
    c.compression = Compression::Gzip;
    c.interval = Duration::from_millis(50);
    c.timeout = Duration::from_secs(2);
    c.resource = vec![("service.name".into(), "sandscope-test".into())];
    c
}

fn start(c: &OtlpConfig) -> Exporter<LogsEncoder> {
    Exporter::start(c, LogsEncoder::new(c)).unwrap()
}

fn exactly_once(got: &HashMap<String, usize>, tag: &str, n: u64) {
    for i in 0..n {
        assert_eq!(got.get(&format!("{tag}-{i}")), Some(&1), "{tag}-{i}");
    }
    assert_eq!(got.len() as u64, n, "nothing else arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_over_grpc_with_gzip_arrive_exactly_once() {
    let Some(bin) = rotel() else { return };
    let r = Rotel::start(&bin, free_port(), free_port());
    let mut c = config(Protocol::Grpc, r.grpc);
    c.max_batch = 100;
    let e = start(&c);
    for i in 0..300 {
        e.send(rec("grpc", i));
    }
    e.flush(Duration::from_secs(10)).await;
    assert_eq!((e.exported(), e.dropped(), e.spooled()), (300, 0, 0));
    assert_eq!(e.failed_requests(), 0);
    let got = r.wait_for(300, "gRPC").await;
    exactly_once(&got, "grpc", 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_over_http_with_gzip_arrive_exactly_once() {
    let Some(bin) = rotel() else { return };
    let r = Rotel::start(&bin, free_port(), free_port());
    let e = start(&config(Protocol::Http, r.http));
    for i in 0..50 {
        e.send(rec("http", i));
    }
    e.flush(Duration::from_secs(10)).await;
    assert_eq!((e.exported(), e.dropped(), e.spooled()), (50, 0, 0));
    let got = r.wait_for(50, "HTTP").await;
    exactly_once(&got, "http", 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_carries_records_across_an_outage_and_an_exporter_restart() {
    let Some(bin) = rotel() else { return };
    let spool = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let mut c = config(Protocol::Grpc, grpc);
    c.max_batch = 10;
    c.retries = 1;
    c.spool = Some(SpoolConfig {
        dir: spool.path().to_path_buf(),
        max_bytes: 1 << 20,
    });
    const N: u64 = 45;
    {
        // Nothing listens on `grpc` yet.
        let e = start(&c);
        for i in 0..N {
            e.send(rec("spooled", i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!((e.spooled(), e.dropped(), e.exported()), (N, 0, 0));
        assert!(e.failed_requests() >= 10, "5 requests, 2 attempts each");
    }
    let files = std::fs::read_dir(spool.path().join("logs"))
        .unwrap()
        .count();
    assert_eq!(files, 5, "one file per request");
    // The collector comes up; a new exporter (the agent restarted) finds the spool.
    let r = Rotel::start(&bin, grpc, http);
    let e = start(&c);
    assert_eq!((e.spooled(), e.accepted()), (N, 0));
    let got = r.wait_for(N as usize, "spool replay").await;
    exactly_once(&got, "spooled", N);
    let t0 = Instant::now();
    while e.spooled() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", e.spooled());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((e.exported(), e.dropped()), (N, 0));
    assert_eq!(
        std::fs::read_dir(spool.path().join("logs"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_dying_mid_run_loses_only_counted_records_and_coming_back_works() {
    let Some(bin) = rotel() else { return };
    let (grpc, http) = (free_port(), free_port());
    let r = Rotel::start(&bin, grpc, http);
    let mut c = config(Protocol::Grpc, grpc);
    c.max_batch = 20;
    c.retries = 1;
    let e = start(&c);
    let mut r = Some(r);
    for i in 0..400 {
        e.send(rec("live", i));
        if i == 200 {
            // Kill it by PID (Child::kill in Drop).
            drop(r.take());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    e.flush(Duration::from_secs(10)).await;
    assert_eq!(e.accepted(), 400);
    assert_eq!(e.spooled(), 0);
    assert_eq!(
        e.accepted(),
        e.exported() + e.dropped(),
        "every record counted"
    );
    assert!(e.exported() > 0, "records before the kill were exported");
    assert!(e.dropped() > 0, "records after the kill were dropped");
    let before = (e.exported(), e.dropped());

    // The collector comes back on the same port; the same exporter reconnects.
    let r = Rotel::start(&bin, grpc, http);
    for i in 0..30 {
        e.send(rec("again", i));
    }
    e.flush(Duration::from_secs(10)).await;
    assert_eq!(
        (e.exported(), e.dropped()),
        (before.0 + 30, before.1),
        "all new records exported"
    );
    let got = r.wait_for(30, "after restart").await;
    exactly_once(&got, "again", 30);
}
