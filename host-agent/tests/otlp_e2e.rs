//! OTLP log export end to end against a real collector: rotel (PyPI `rotel`, a Rust
//! OpenTelemetry collector) receiving OTLP/HTTP, with a Python logs processor that writes
//! what arrives to a file. Function output, platform events and shell audits must arrive
//! with their severities and attributes; a dead backend must cost invocations nothing and
//! be counted.

mod common;

use common::{func, start_more};
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
        .ok()?;
    let p = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if out.status.success() && std::path::Path::new(&p).exists() {
        return Some(p);
    }
    let strict = std::env::var("CI").as_deref() == Ok("true");
    assert!(
        !strict,
        "rotel is required under CI (scripts/test installs it)"
    );
    eprintln!("SKIPPED: the OTLP tests need rotel (python3 -m pip install rotel==0.0.1a15)");
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
import json
OUT = "@OUT@"

def process_logs(resource_logs):
    res = {}
    if resource_logs.resource:
        for a in resource_logs.resource.attributes:
            res[a.key] = a.value.value
    with open(OUT, "a") as f:
        for sl in resource_logs.scope_logs:
            for lr in sl.log_records:
                f.write(json.dumps({
                    "body": lr.body.value if lr.body else None,
                    "severity_number": lr.severity_number,
                    "severity_text": lr.severity_text,
                    "attributes": {a.key: a.value.value for a in lr.attributes},
                    "resource": res,
                    "scope": sl.scope.name if sl.scope else "",
                }) + "\n")
"#;

struct Rotel {
    child: Child,
    out: std::path::PathBuf,
    http: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_rotel(bin: &str) -> Rotel {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logs.jsonl");
    let proc_py = dir.path().join("capture.py");
    std::fs::write(
        &proc_py,
        PROCESSOR.replace("@OUT@", &out.display().to_string()),
    )
    .unwrap();
    let (grpc, http) = (free_port(), free_port());
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
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rotel did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Rotel {
        child,
        out,
        http,
        _dir: dir,
    }
}

fn received(r: &Rotel) -> Vec<serde_json::Value> {
    std::fs::read_to_string(&r.out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const HELLO: &str = r#"event=$(cat)
echo "oops-marker from $(hostname)" >&2
echo '{"ok":true}'"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_logs_platform_events_and_shell_audits_arrive_as_otlp_log_records() {
    if !common::can_run() {
        return;
    }
    let Some(bin) = rotel() else { return };
    let r = start_rotel(&bin);
    let a = start_more(
        &[func("hello", HELLO, "")],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{}\"\ninterval_s = 0.05\n",
            r.http
        ),
    )
    .await;
    let resp = a.invoke("hello", "{}").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let sb = resp.sandbox.clone();
    // A shell session's audit record travels the same way.
    let ssh = common::ssh::have_ssh();
    if ssh {
        let c = common::ssh::SshClient::serve(&a.agent).await;
        assert_eq!(c.exec(&sb, "exit 2").await.0, 2);
    }

    let want = |recs: &[serde_json::Value]| {
        let stderr = recs
            .iter()
            .any(|r| r["body"] == format!("oops-marker from {sb}").as_str());
        let report = recs.iter().any(|r| {
            r["body"]
                .as_str()
                .unwrap_or("")
                .starts_with("REPORT RequestId: ")
        });
        let audit = !ssh
            || recs.iter().any(|r| {
                r["body"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("SHELL_SESSION ")
            });
        stderr && report && audit
    };
    let t0 = Instant::now();
    let recs = loop {
        let recs = received(&r);
        if want(&recs) {
            break recs;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "records so far: {recs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let line = recs
        .iter()
        .find(|r| r["body"] == format!("oops-marker from {sb}").as_str())
        .unwrap();
    assert_eq!(line["severity_number"], 17, "stderr is ERROR: {line}");
    assert_eq!(line["severity_text"], "ERROR");
    let at = &line["attributes"];
    assert_eq!(at["faas.name"], "hello", "{line}");
    assert_eq!(at["faas.instance"], sb.as_str());
    assert_eq!(at["log.iostream"], "stderr");
    let invocation = at["faas.invocation_id"].as_str().unwrap().to_string();
    assert_eq!(invocation.len(), 36, "{line}");
    assert_eq!(line["resource"]["service.name"], "sandscope-agent");
    assert!(!line["resource"]["host.id"].as_str().unwrap().is_empty());
    assert_eq!(line["scope"], "sandscope");

    let report = recs
        .iter()
        .find(|r| {
            r["body"]
                .as_str()
                .unwrap_or("")
                .starts_with("REPORT RequestId: ")
        })
        .unwrap();
    assert_eq!(report["severity_text"], "INFO");
    assert_eq!(report["attributes"]["sandscope.log.stream"], "platform");
    assert!(
        report["body"].as_str().unwrap().contains(&invocation),
        "the REPORT names the same invocation as the function's line: {report}"
    );
    if ssh {
        let audit = recs
            .iter()
            .find(|r| {
                r["body"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("SHELL_SESSION ")
            })
            .unwrap();
        let body = audit["body"].as_str().unwrap();
        assert!(
            body.contains(&format!("sandbox={sb}")) && body.contains("exit=2"),
            "{body}"
        );
        assert_eq!(audit["attributes"]["faas.instance"], sb.as_str());
    }
    let stats = a.get("/v1/stats").await;
    assert_eq!(
        stats["telemetry"]["dropped"]["otlp_logs"], 0,
        "{}",
        stats["telemetry"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_does_not_slow_invocations_and_losses_are_counted() {
    if !common::can_run() {
        return;
    }
    let port = free_port();
    let a = start_more(
        &[func("hello", HELLO, "")],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{port}\"\ninterval_s = 0.05\ntimeout_s = 0.5\n"
        ),
    )
    .await;
    assert_eq!(a.invoke("hello", "{}").await.status, 200);
    let t0 = Instant::now();
    for _ in 0..20 {
        let r = a.invoke("hello", "{}").await;
        assert_eq!(r.status, 200);
    }
    let warm = t0.elapsed();
    assert!(
        warm < Duration::from_secs(10),
        "20 warm invokes took {warm:?}"
    );
    // Each invocation put at least its stderr line and its REPORT on the bus; none of
    // them can be exported, and every one is counted once retries give up.
    let t0 = Instant::now();
    loop {
        let s = a.get("/v1/stats").await;
        let d = s["telemetry"]["dropped"]["otlp_logs"].as_u64().unwrap_or(0);
        if d >= 42 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "dropped so far {d}: {}",
            s["telemetry"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
