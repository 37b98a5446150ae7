//! `kind = "lambda"` functions end to end: a real agent with the process driver, the
//! probe's Runtime API inside the sandbox, a stdlib-only Python custom runtime, and the
//! Invoke API's Lambda headers (Tail logs, executed version, function errors). The AWS CLI
//! test runs when `aws` is on PATH.

mod common;

use common::{can_run, func, start, start_more};
use std::time::Duration;

const RUNTIME: &str = include_str!("../../guest-probe/tests/fixtures/lambda_runtime.py");

/// handler.sh for a Python custom runtime run with `mode`.
fn script(mode: &str) -> String {
    format!("exec /usr/bin/python3 - {mode} <<'PY'\n{RUNTIME}\nPY")
}

fn python_ok() -> bool {
    if std::path::Path::new("/usr/bin/python3").exists() {
        return true;
    }
    eprintln!("SKIPPED: /usr/bin/python3 (visible inside sandboxes) is missing");
    false
}

fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    };
    let b: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for ch in b.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in ch.iter().enumerate() {
            n |= u32::from(val(c)) << (18 - 6 * i);
        }
        for i in 0..ch.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

struct Raw {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: serde_json::Value,
}

async fn invoke_tail(url: &str, name: &str, payload: &str) -> Raw {
    let r = reqwest::Client::new()
        .post(format!("{url}/2015-03-31/functions/{name}/invocations"))
        .header("X-Amz-Log-Type", "Tail")
        .body(payload.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    Raw {
        status,
        headers,
        body,
    }
}

fn hdr<'a>(r: &'a Raw, k: &str) -> &'a str {
    r.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn tail(r: &Raw) -> String {
    String::from_utf8(b64decode(hdr(r, "x-amz-log-result"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_runtime_api_cold_then_warm_with_log_tail() {
    if !can_run() || !python_ok() {
        return;
    }
    let s = script("ok");
    let a = start(&[func("lam", &s, "kind = \"lambda\"\nmemory_mb = 192")], "").await;
    let r = invoke_tail(&a.url, "lam", r#"{"n":1}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(hdr(&r, "x-amz-function-error"), "");
    assert_eq!(hdr(&r, "x-sandscope-coldstart"), "true");
    assert_eq!(hdr(&r, "x-amz-executed-version"), "$LATEST");
    assert_eq!(r.body["count"], 1);
    assert_eq!(r.body["event"]["n"], 1);
    assert_eq!(r.body["env"]["AWS_LAMBDA_FUNCTION_NAME"], "lam");
    assert_eq!(r.body["env"]["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "192");
    assert_eq!(r.body["env"]["LAMBDA_TASK_ROOT"], "/var/task");
    assert_eq!(r.body["env"]["AWS_REGION"], "us-east-1");
    let id = hdr(&r, "x-amzn-requestid").to_string();
    assert_eq!(r.body["headers"]["Lambda-Runtime-Aws-Request-Id"], id);
    let t = tail(&r);
    assert!(t.starts_with(&format!("START RequestId: {id}")), "{t}");
    assert!(t.contains(&format!("handling {id} count=1")), "{t}");
    assert!(
        t.contains(&format!("REPORT RequestId: {id}\tDuration: ")),
        "{t}"
    );
    assert!(t.contains("Billed Duration: "), "{t}");
    assert!(t.contains("Memory Size: 192 MB\tMax Memory Used: "), "{t}");
    assert!(
        t.contains("Init Duration: "),
        "cold start reports init: {t}"
    );

    let r = invoke_tail(&a.url, "lam", "{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(hdr(&r, "x-sandscope-coldstart"), "false");
    assert_eq!(
        r.body["count"], 2,
        "global state persists across warm invokes"
    );
    let t = tail(&r);
    assert!(t.contains("REPORT RequestId: "), "{t}");
    assert!(!t.contains("Init Duration"), "warm: {t}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_error_post_is_an_unhandled_function_error() {
    if !can_run() || !python_ok() {
        return;
    }
    let s = script("ok");
    let a = start(&[func("lamerr", &s, "kind = \"lambda\"")], "").await;
    let r = invoke_tail(&a.url, "lamerr", r#"{"fail":true}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(hdr(&r, "x-amz-function-error"), "Unhandled");
    assert_eq!(r.body["errorType"], "ValueError");
    assert_eq!(r.body["errorMessage"], "boom 1");
    // The runtime lives on: the next invoke is warm.
    let r = invoke_tail(&a.url, "lamerr", "{}").await;
    assert_eq!(r.body["count"], 2);
    assert_eq!(hdr(&r, "x-sandscope-coldstart"), "false");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_runtime_without_next_reports_init_timeout() {
    if !can_run() || !python_ok() {
        return;
    }
    let s = script("nonext");
    let a = start(
        &[func("lamslow", &s, "kind = \"lambda\"")],
        "boot_timeout_s = 2",
    )
    .await;
    let r = a.invoke("lamslow", "{}").await;
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"), "{}", r.body);
    let v = r.json();
    assert_eq!(v["errorType"], "Runtime.InitError");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("not ready within"),
        "{v}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_response_over_wire_limit_is_a_clear_error() {
    if !can_run() || !python_ok() {
        return;
    }
    let s = script("ok");
    let a = start(&[func("lambig", &s, "kind = \"lambda\"")], "").await;
    let r = a.invoke("lambig", r#"{"big":7000000}"#).await;
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"), "{}", r.body);
    let v = r.json();
    assert_eq!(v["errorType"], "Function.ResponseSizeTooLarge");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("response of 7000000 bytes exceeds the"),
        "{v}"
    );
    a.stop().await;
}

fn aws_cli() -> bool {
    let ok = std::process::Command::new("aws")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: the AWS CLI (`pip install awscli`) is not on PATH");
    }
    ok
}

async fn aws_invoke(url: &str, name: &str, payload: &str, out: &std::path::Path) -> String {
    let out = out.to_path_buf();
    let (url, name, payload) = (url.to_string(), name.to_string(), payload.to_string());
    tokio::task::spawn_blocking(move || {
        let o = std::process::Command::new("aws")
            .args(["lambda", "invoke", "--endpoint-url", &url])
            .args(["--function-name", &name, "--log-type", "Tail"])
            .args(["--payload", &payload])
            .arg(&out)
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_PAGER", "")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "aws failed: {stdout}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        stdout
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_invokes_through_the_agent() {
    if !can_run() || !python_ok() || !aws_cli() {
        return;
    }
    let s = script("ok");
    let a = start(&[func("cli", &s, "kind = \"lambda\"")], "").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.json");

    let meta = aws_invoke(&a.url, "cli", r#"{"hello":"cli"}"#, &out).await;
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["StatusCode"], 200, "{meta}");
    assert_eq!(meta["ExecutedVersion"], "$LATEST", "{meta}");
    assert!(meta.get("FunctionError").is_none(), "{meta}");
    let log = String::from_utf8(b64decode(meta["LogResult"].as_str().unwrap())).unwrap();
    assert!(log.contains("REPORT RequestId: "), "{log}");
    assert!(log.contains("Init Duration: "), "{log}");
    let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(body["event"]["hello"], "cli");
    assert_eq!(body["count"], 1);

    let meta = aws_invoke(&a.url, "cli", r#"{"fail":true}"#, &out).await;
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["FunctionError"], "Unhandled", "{meta}");
    let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(body["errorType"], "ValueError");
    assert_eq!(body["errorMessage"], "boom 2");
    tokio::time::sleep(Duration::from_millis(10)).await;
    a.stop().await;
}

/// examples/functions/python-ric with awslambdaric installed (build.sh), or None.
fn python_ric_example() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/functions/python-ric")
        .canonicalize()
        .unwrap();
    if !dir.join("package/awslambdaric").is_dir() {
        let ok = std::process::Command::new(dir.join("build.sh"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: could not pip-install awslambdaric (examples/functions/python-ric/build.sh)");
            return None;
        }
    }
    Some(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_awslambdaric_example_cold_then_warm() {
    if !can_run() || !python_ok() {
        return;
    }
    let Some(code) = python_ric_example() else {
        return;
    };
    let more = format!(
        "\n[[functions]]\nname = \"pyric\"\nkind = \"lambda\"\nhandler = \"./bootstrap\"\n\
         code = \"{}\"\nmemory_mb = 256\n",
        code.display()
    );
    let a = start_more(&[], "", &more).await;
    let r = invoke_tail(&a.url, "pyric", r#"{"x":1}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(hdr(&r, "x-amz-function-error"), "", "{}", r.body);
    assert_eq!(hdr(&r, "x-sandscope-coldstart"), "true");
    assert_eq!(r.body["count"], 1, "{}", r.body);
    assert_eq!(r.body["event"]["x"], 1);
    assert_eq!(r.body["function"], "pyric");
    assert_eq!(r.body["memory_mb"], "256");
    assert_eq!(r.body["task_root"], "/var/task");
    assert!(r.body["remaining_ms"].as_i64().unwrap() > 0);
    let t = tail(&r);
    assert!(t.contains("invocation 1 of this sandbox"), "{t}");
    assert!(t.contains("Init Duration: "), "{t}");

    let r = invoke_tail(&a.url, "pyric", r#"{"x":2}"#).await;
    assert_eq!(hdr(&r, "x-sandscope-coldstart"), "false");
    assert_eq!(
        r.body["count"], 2,
        "warm invoke keeps the global: {}",
        r.body
    );

    let r = invoke_tail(&a.url, "pyric", r#"{"fail":true}"#).await;
    assert_eq!(hdr(&r, "x-amz-function-error"), "Unhandled");
    assert_eq!(r.body["errorType"], "ValueError", "{}", r.body);
    assert_eq!(r.body["errorMessage"], "asked to fail");
    a.stop().await;
}

/// examples/functions/rust-counter with its static `bootstrap` built (build.sh), or None.
fn rust_example() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/functions/rust-counter")
        .canonicalize()
        .unwrap();
    if !dir.join("bootstrap").is_file() {
        let ok = std::process::Command::new(dir.join("build.sh"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: could not build examples/functions/rust-counter (build.sh)");
            return None;
        }
    }
    Some(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_lambda_runtime_example_cold_then_warm() {
    if !can_run() {
        return;
    }
    let Some(code) = rust_example() else {
        return;
    };
    let more = format!(
        "\n[[functions]]\nname = \"rustfn\"\nkind = \"lambda\"\nhandler = \"./bootstrap\"\n\
         code = \"{}\"\n",
        code.display()
    );
    let a = start_more(&[], "", &more).await;
    let r = invoke_tail(&a.url, "rustfn", r#"{"x":1}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(hdr(&r, "x-amz-function-error"), "", "{}", r.body);
    assert_eq!(hdr(&r, "x-sandscope-coldstart"), "true");
    assert_eq!(r.body["count"], 1, "{}", r.body);
    assert_eq!(r.body["event"]["x"], 1);
    assert_eq!(r.body["function"], "rustfn");
    assert_eq!(r.body["request_id"], hdr(&r, "x-amzn-requestid"));
    let t = tail(&r);
    assert!(t.contains("invocation 1 of this sandbox"), "{t}");
    assert!(t.contains("Init Duration: "), "{t}");

    let r = invoke_tail(&a.url, "rustfn", "{}").await;
    assert_eq!(hdr(&r, "x-sandscope-coldstart"), "false");
    assert_eq!(
        r.body["count"], 2,
        "warm invoke keeps the global: {}",
        r.body
    );

    let r = invoke_tail(&a.url, "rustfn", r#"{"fail":true}"#).await;
    assert_eq!(hdr(&r, "x-amz-function-error"), "Unhandled");
    assert_eq!(r.body["errorMessage"], "asked to fail", "{}", r.body);

    // Warm round trip through the Runtime API, agent-side (request in -> response out).
    let mut us: Vec<f64> = Vec::new();
    for _ in 0..300 {
        let r = a
            .http
            .post(format!("{}/2015-03-31/functions/rustfn/invocations", a.url))
            .body("{}")
            .send()
            .await
            .unwrap();
        let ms: f64 = r.headers()["x-sandscope-duration-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        us.push(ms * 1000.0);
    }
    us.sort_by(f64::total_cmp);
    let p50 = us[us.len() / 2];
    let p99 = us[us.len() * 99 / 100];
    eprintln!(
        "BENCH lambda warm invoke (agent-side, debug agent): p50 {p50:.0} us, p99 {p99:.0} us"
    );
    assert!(p50 < 20_000.0, "warm p50 {p50} us");
    a.stop().await;
}
