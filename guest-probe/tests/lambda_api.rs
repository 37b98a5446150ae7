//! The `lambda` handler kind: the probe serves the AWS Lambda Runtime API and a real
//! (stdlib-only Python) custom runtime talks to it over HTTP.

mod common;

use common::{spawn, status, Probe};
use wire::InvokeStatus;

fn runtime(mode: &str) -> String {
    format!(
        "exec /usr/bin/python3 {}/tests/fixtures/lambda_runtime.py {mode}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn lambda(mode: &str, extra: &[&str]) -> Option<Probe> {
    if !std::path::Path::new("/usr/bin/python3").exists() {
        eprintln!("SKIPPED: /usr/bin/python3 is missing");
        return None;
    }
    let h = runtime(mode);
    let mut args = vec![
        "--handler-kind",
        "lambda",
        "--runtime-api",
        "127.0.0.1:0",
        "--handler",
        &h,
    ];
    args.extend_from_slice(extra);
    Some(spawn(&args, 0))
}

/// Ready, skipping the runtime's init log lines.
fn ready(p: &mut Probe) -> wire::Ready {
    loop {
        match p.next_body() {
            wire::frame::Body::Log(_) => continue,
            wire::frame::Body::Ready(r) => return r,
            b => panic!("expected Ready, got {b:?}"),
        }
    }
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

#[test]
fn lambda_cold_then_warm_keeps_global_state() {
    let Some(mut p) = lambda("ok", &[]) else {
        return;
    };
    let h = p.hello();
    assert_eq!(h.handler_kind, "lambda");
    let ready = p.ready();
    assert_eq!(ready.error, "");
    assert!(ready.runtime_init_us > 0);

    let (logs, r) = p.invoke("req-1", br#"{"k":1}"#, 5000);
    assert_eq!(status(&r), InvokeStatus::Ok, "{r:?}");
    let v = json(&r.payload);
    assert_eq!(v["count"], 1);
    assert_eq!(v["event"]["k"], 1);
    assert_eq!(v["headers"]["Lambda-Runtime-Aws-Request-Id"], "req-1");
    let deadline: u64 = v["headers"]["Lambda-Runtime-Deadline-Ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(deadline > 1_600_000_000_000);
    assert!(v["headers"]["Lambda-Runtime-Invoked-Function-Arn"]
        .as_str()
        .unwrap()
        .starts_with("arn:aws:lambda:"));
    assert!(v["headers"]["Lambda-Runtime-Trace-Id"]
        .as_str()
        .unwrap()
        .starts_with("Root=1-"));
    assert_eq!(v["env"]["AWS_LAMBDA_FUNCTION_VERSION"], "$LATEST");
    assert_eq!(v["env"]["LAMBDA_TASK_ROOT"], "/var/task");
    assert_eq!(v["env"]["AWS_REGION"], "us-east-1");
    assert!(v["env"]["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"].is_string());
    assert!(v["env"]["_HANDLER"].is_string());
    let lines: Vec<&str> = logs.iter().map(|l| l.line.as_str()).collect();
    assert!(lines.contains(&"handling req-1 count=1"), "{lines:?}");
    assert!(lines.contains(&"stderr line for req-1"), "{lines:?}");
    assert!(logs
        .iter()
        .filter(|l| l.line.contains("req-1"))
        .all(|l| l.invoke_id == "req-1"));

    let (_, r) = p.invoke("req-2", b"{}", 5000);
    assert_eq!(status(&r), InvokeStatus::Ok, "{r:?}");
    assert_eq!(json(&r.payload)["count"], 2);
}

#[test]
fn lambda_error_post_is_function_error_and_runtime_lives_on() {
    let Some(mut p) = lambda("ok", &[]) else {
        return;
    };
    p.handshake();
    let (_, r) = p.invoke("bad", br#"{"fail":true}"#, 5000);
    assert_eq!(status(&r), InvokeStatus::FunctionError, "{r:?}");
    assert_eq!(r.error_type, "ValueError");
    assert_eq!(r.error_message, "boom 1");
    assert_eq!(json(&r.payload)["errorType"], "ValueError");
    let (_, r) = p.invoke("good", b"{}", 5000);
    assert_eq!(status(&r), InvokeStatus::Ok, "{r:?}");
    assert_eq!(json(&r.payload)["count"], 2);
}

#[test]
fn lambda_response_over_the_wire_limit_is_a_clear_error() {
    let Some(mut p) = lambda("ok", &[]) else {
        return;
    };
    p.handshake();
    let n = wire::MAX_PAYLOAD + 1000;
    let (_, r) = p.invoke("big", format!(r#"{{"big":{n}}}"#).as_bytes(), 10000);
    assert_eq!(status(&r), InvokeStatus::ResponseTooLarge, "{r:?}");
    assert_eq!(r.error_type, "Function.ResponseSizeTooLarge");
    assert!(
        r.error_message
            .contains(&format!("response of {n} bytes exceeds the")),
        "{}",
        r.error_message
    );
    // The runtime survives, like Lambda's.
    let (_, r) = p.invoke("after", b"{}", 5000);
    assert_eq!(status(&r), InvokeStatus::Ok, "{r:?}");
}

#[test]
fn lambda_runtime_that_never_calls_next_hits_the_init_timeout() {
    let Some(mut p) = lambda("nonext", &["--init-timeout-ms", "700"]) else {
        return;
    };
    p.hello();
    let ready = ready(&mut p);
    assert!(ready.error.contains("init timeout"), "{}", ready.error);
    assert!(
        ready.error.contains("initialising forever"),
        "{}",
        ready.error
    );
    let (_, r) = p.invoke("x", b"{}", 1000);
    assert_eq!(status(&r), InvokeStatus::RuntimeError);
    assert_eq!(r.error_type, "Runtime.Unavailable");
}

#[test]
fn lambda_init_error_is_reported_in_ready() {
    let Some(mut p) = lambda("initerror", &[]) else {
        return;
    };
    p.hello();
    let ready = ready(&mut p);
    assert!(
        ready
            .error
            .contains("init error: Runtime.ImportModuleError: cannot load"),
        "{}",
        ready.error
    );
}
