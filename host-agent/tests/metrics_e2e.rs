//! OTLP metrics end to end against a real backend: VictoriaMetrics (Debian trixie's
//! package, fetched by scripts/otlp-backends) receiving OTLP/HTTP with Prometheus naming.
//! The test runs invocations, then asks VictoriaMetrics' PromQL API for the counts, the
//! warm/cold split of the invoke-duration histogram and the per-sandbox labels.

mod common;

use common::{free_port, func, rotel, start_more};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The victoria-metrics binary: $SANDSCOPE_VICTORIA_METRICS, else the cache.
fn victoria_metrics() -> Option<String> {
    let from_env = std::env::var("SANDSCOPE_VICTORIA_METRICS").ok();
    let cached = || {
        let dir =
            std::path::PathBuf::from(std::env::var("HOME").ok()?).join(".cache/sandscope/tools");
        let mut found: Vec<_> = std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path().join("usr/bin/victoria-metrics"))
            .filter(|p| p.exists())
            .collect();
        found.sort();
        found.pop().map(|p| p.display().to_string())
    };
    if let Some(p) = from_env
        .filter(|p| std::path::Path::new(p).exists())
        .or_else(cached)
    {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "VictoriaMetrics is required under CI (scripts/test runs scripts/otlp-backends)"
    );
    eprintln!("SKIPPED: the OTLP metrics test needs VictoriaMetrics (run scripts/otlp-backends)");
    None
}

struct Vm {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_vm(bin: &str) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg(format!("-storageDataPath={}", dir.path().display()))
        .args([
            "-search.latencyOffset=0s",
            "-opentelemetry.usePrometheusNaming",
            "-loggerLevel=ERROR",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "VictoriaMetrics did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Vm {
        child,
        port,
        _dir: dir,
    }
}

impl Vm {
    /// One PromQL instant query: the result vector.
    async fn query(&self, http: &reqwest::Client, q: &str) -> Vec<serde_json::Value> {
        let base = format!("http://127.0.0.1:{}", self.port);
        let _ = http
            .get(format!("{base}/internal/force_flush"))
            .send()
            .await;
        let v: serde_json::Value = http
            .get(format!("{base}/api/v1/query"))
            .query(&[("query", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "success", "{q}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of `q`, if it has exactly one series.
    async fn value(&self, http: &reqwest::Client, q: &str) -> Option<f64> {
        let r = self.query(http, q).await;
        (r.len() == 1).then(|| r[0]["value"][1].as_str().unwrap().parse().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_metrics_arrive_in_victoria_metrics_with_warm_cold_split_and_sandbox_labels() {
    if !common::can_run() {
        return;
    }
    let Some(bin) = victoria_metrics() else {
        return;
    };
    let vm = start_vm(&bin);
    let a = start_more(
        &[
            func("hello", "cat >/dev/null; echo '{\"ok\":true}'", ""),
            func(
                "boom",
                "cat >/dev/null; echo broken >&2; exit 3",
                "memory_mb = 64",
            ),
        ],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{}/opentelemetry\"\nmetrics_interval_s = 0.2\n\
             [otlp.logs]\nenabled = false\n[otlp.traces]\nenabled = false\n",
            vm.port
        ),
    )
    .await;
    let first = a.invoke("hello", "{}").await;
    assert!(first.cold, "{first:?}");
    for _ in 0..5 {
        let r = a.invoke("hello", "{}").await;
        assert!(!r.cold && r.sandbox == first.sandbox, "{r:?}");
    }
    let b = a.invoke("boom", "{}").await;
    assert_eq!(b.function_error.as_deref(), Some("Unhandled"), "{b:?}");

    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let want = [
        ("sum(faas_invocations_total{faas_name=\"hello\"})", 6.0),
        ("sum(faas_coldstarts_total{faas_name=\"hello\"})", 1.0),
        (
            "sum(faas_invoke_duration_seconds_count{faas_name=\"hello\",faas_coldstart=\"false\"})",
            5.0,
        ),
        (
            "sum(faas_invoke_duration_seconds_count{faas_name=\"hello\",faas_coldstart=\"true\"})",
            1.0,
        ),
        ("sum(faas_errors_total{faas_name=\"boom\"})", 1.0),
        (
            "sum(sandscope_coldstart_phase_duration_seconds_count{faas_name=\"hello\",phase=\"spawn\"})",
            1.0,
        ),
        (
            "sum(sandscope_coldstart_phase_duration_seconds_count{faas_name=\"hello\",phase=\"invoke\"})",
            6.0,
        ),
    ];
    loop {
        let mut got = Vec::new();
        for (q, _) in &want {
            got.push(vm.value(&http, q).await);
        }
        if want.iter().zip(&got).all(|((_, w), g)| *g == Some(*w)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "VictoriaMetrics has {:?}",
            want.iter().map(|w| w.0).zip(&got).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The series carry the sandbox's resource: its id, memory limit and the boot id its
    // probe reported, and the host's id.
    let series = vm
        .query(&http, "faas_invocations_total{faas_name=\"hello\"}")
        .await;
    assert_eq!(series.len(), 1, "one sandbox served hello: {series:#?}");
    let m = &series[0]["metric"];
    assert_eq!(m["faas_instance"], first.sandbox.as_str(), "{m}");
    assert_eq!(
        m["faas_max_memory"],
        (128u64 << 20).to_string().as_str(),
        "{m}"
    );
    assert_eq!(m["service_name"], "sandscope-agent");
    assert_eq!(m["sandscope_driver"], "process");
    let sb = a.sandbox(&first.sandbox).await.unwrap();
    assert_eq!(m["sandscope_guest_boot_id"], sb["probe"]["boot_id"], "{m}");
    let host_id = m["host_id"].as_str().unwrap();
    assert!(!host_id.is_empty());
    let boom = vm
        .query(&http, "faas_errors_total{faas_name=\"boom\"}")
        .await;
    assert_eq!(
        boom[0]["metric"]["faas_max_memory"],
        (64u64 << 20).to_string().as_str()
    );
    assert_eq!(boom[0]["metric"]["host_id"], host_id);

    // A histogram a dashboard can use: warm p50 within the buckets, below the cold start.
    let warm_p50 = vm
        .value(
            &http,
            "histogram_quantile(0.5, sum(faas_invoke_duration_seconds_bucket{faas_name=\"hello\",faas_coldstart=\"false\"}) by (le))",
        )
        .await
        .unwrap();
    let cold = vm
        .value(
            &http,
            "sum(faas_invoke_duration_seconds_sum{faas_name=\"hello\",faas_coldstart=\"true\"})",
        )
        .await
        .unwrap();
    assert!(warm_p50 > 0.0 && warm_p50 < 60.0, "warm p50 {warm_p50}");
    assert!(cold > 0.0, "cold sum {cold}");
    let stats = a.get("/v1/stats").await;
    let f = stats["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "hello")
        .unwrap()
        .clone();
    let exported_sum = vm
        .value(
            &http,
            "sum(faas_invoke_duration_seconds_sum{faas_name=\"hello\"})",
        )
        .await
        .unwrap();
    let cold_us = f["cold"]["max_us"].as_f64().unwrap();
    assert!(
        exported_sum >= cold_us / 1e6 * 0.99,
        "the exported sum ({exported_sum} s) includes the cold start ({cold_us} µs)"
    );

    // Host-level series: sandboxes by state, and no metric lost.
    assert_eq!(
        vm.value(
            &http,
            "sandscope_sandboxes{faas_name=\"hello\",state=\"idle\"}"
        )
        .await,
        Some(1.0)
    );
    assert!(vm
        .value(&http, "sandscope_host_memory_committed_bytes")
        .await
        .is_some_and(|v| v >= (128u64 << 20) as f64));
    assert_eq!(
        vm.value(
            &http,
            "sandscope_telemetry_dropped_total{signal=\"otlp_metrics\"}"
        )
        .await,
        Some(0.0)
    );
    assert_eq!(
        stats["telemetry"]["dropped"]["otlp_metrics"], 0,
        "{}",
        stats["telemetry"]
    );
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_grpc_with_gzip_reach_victoria_metrics_through_a_collector() {
    if !common::can_run() {
        return;
    }
    let (Some(vm_bin), Some(rotel_bin)) = (victoria_metrics(), rotel()) else {
        return;
    };
    let vm = start_vm(&vm_bin);
    // agent --OTLP/gRPC+gzip--> rotel --OTLP/HTTP--> VictoriaMetrics: the pipeline a fleet
    // runs (examples/grafana/README.md).
    let (grpc, http) = (free_port(), free_port());
    let _rotel = Proc(
        Command::new(&rotel_bin)
            .args(["start", "--otlp-grpc-endpoint"])
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--otlp-http-endpoint")
            .arg(format!("127.0.0.1:{http}"))
            .args([
                "--exporters",
                "vm:otlp,bh:blackhole",
                "--exporters-metrics",
                "vm",
            ])
            .args(["--exporters-traces", "bh", "--exporters-logs", "bh"])
            .args(["--metrics-batch-timeout", "100ms"])
            .env(
                "ROTEL_EXPORTER_VM_METRICS_ENDPOINT",
                format!("http://127.0.0.1:{}/opentelemetry/v1/metrics", vm.port),
            )
            .env("ROTEL_EXPORTER_VM_PROTOCOL", "http")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", grpc)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rotel did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = start_more(
        &[func("hello", "cat >/dev/null; echo '{\"ok\":true}'", "")],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{grpc}\"\nprotocol = \"grpc\"\n\
             compression = \"gzip\"\nmetrics_interval_s = 0.2\n"
        ),
    )
    .await;
    let first = a.invoke("hello", "{}").await;
    for _ in 0..3 {
        assert_eq!(a.invoke("hello", "{}").await.status, 200);
    }
    let http_client = reqwest::Client::new();
    let q = format!(
        "faas_invocations_total{{faas_instance=\"{}\"}}",
        first.sandbox
    );
    let t0 = Instant::now();
    while vm.value(&http_client, &q).await != Some(4.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "VictoriaMetrics has {:?}",
            vm.query(&http_client, &q).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        vm.value(
            &http_client,
            "sum(faas_invoke_duration_seconds_count{faas_name=\"hello\",faas_coldstart=\"false\"})"
        )
        .await,
        Some(3.0)
    );
    let stats = a.get("/v1/stats").await;
    assert_eq!(
        stats["telemetry"]["dropped"]["otlp_metrics"], 0,
        "{}",
        stats["telemetry"]
    );
}
