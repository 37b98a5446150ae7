//! End to end on the process driver: a real agent, real namespace sandboxes running the
//! guest probe as PID 1, invoked through the HTTP API.

mod common;

use common::{func, start};
use std::time::{Duration, Instant};

const ECHO_HOST: &str = r#"event=$(cat)
echo "log-line from $(hostname)" >&2
if [ "$event" = '"sleep"' ]; then sleep 10; fi
if [ "$event" = '"fail"' ]; then echo '{"partial":true}'; exit 3; fi
if [ "$event" = '"fs"' ]; then
  cat /var/task/data.txt
  if touch /var/task/x 2>/dev/null; then echo task-writable; else echo task-readonly; fi
  echo private > /tmp/mine && ls /tmp
  exit 0
fi
printf '{"host":"%s","pid1":"%s"}\n' "$(hostname)" "$(tr '\0' ' ' </proc/1/cmdline | cut -c1-300)""#;

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

fn host_mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_invoke_is_cold_then_warm_reuses_the_sandbox_and_probe_report_is_real() {
    if !common::can_run() {
        return;
    }
    let a = start(&[func("hello", ECHO_HOST, "")], "").await;
    let r1 = a.invoke("hello", "{}").await;
    assert_eq!(r1.status, 200, "{r1:?}");
    assert!(r1.cold, "first invocation must be cold: {r1:?}");
    assert!(r1.function_error.is_none(), "{r1:?}");
    let v = r1.json();
    // The handler sees the sandbox's hostname and the probe as PID 1.
    assert_eq!(v["host"], r1.sandbox.as_str());
    assert!(v["pid1"].as_str().unwrap().contains("guest-probe"), "{v}");

    let r2 = a.invoke("hello", "{}").await;
    assert_eq!(r2.status, 200);
    assert!(!r2.cold, "second invocation must be warm");
    assert_eq!(
        r2.sandbox, r1.sandbox,
        "warm invocation must reuse the sandbox"
    );

    let sb = a.sandbox(&r1.sandbox).await.expect("sandbox listed");
    let p = &sb["probe"];
    assert_eq!(
        p["boot_id"],
        host_boot_id().as_str(),
        "namespace sandboxes share the host kernel"
    );
    assert_eq!(p["hostname"], r1.sandbox.as_str());
    assert_eq!(p["mem_total_kib"].as_u64().unwrap(), host_mem_total_kib());
    assert!(p["mem_available_kib"].as_u64().unwrap() > 0);
    assert_eq!(p["probe_pid"], 1);
    assert!(!p["kernel"].as_str().unwrap().is_empty());
    assert!(!p["cpu_model"].as_str().unwrap().is_empty());
    assert_eq!(sb["invocations"], 2);
    assert_eq!(sb["driver"], "process");
    assert!(sb["rss_bytes"].as_u64().unwrap() > 0);

    let stats = a.get("/v1/stats").await;
    let f = &stats["functions"][0];
    assert_eq!(f["name"], "hello");
    assert_eq!(f["invocations"], 2);
    assert_eq!(f["coldstarts"], 1);
    assert_eq!(f["warm"]["count"], 1);
    assert_eq!(f["cold"]["count"], 1);
    for phase in ["spawn", "probe_init", "runtime_init", "invoke"] {
        assert!(
            f["phases"][phase]["count"].as_u64().unwrap() >= 1,
            "phase {phase} missing: {f}"
        );
    }
    assert!(f["cold"]["p50_us"].as_u64() > f["phases"]["invoke"]["p50_us"].as_u64().map(|v| v / 4));

    // Function logs arrive with the sandbox.
    let d = a.get(&format!("/v1/sandboxes/{}", r1.sandbox)).await;
    let logs = d["logs"].as_array().unwrap();
    assert!(
        logs.iter()
            .any(|l| l["line"].as_str().unwrap().contains("log-line from")
                && l["stream"] == "stderr"),
        "{logs:?}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_filesystem_has_readonly_code_and_private_tmp() {
    if !common::can_run() {
        return;
    }
    let a = start(&[func("hello", ECHO_HOST, "")], "").await;
    let r = a.invoke("hello", "\"fs\"").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("code-dir-marker"), "{}", r.body);
    assert!(r.body.contains("task-readonly"), "{}", r.body);
    // /tmp is the sandbox's own: only what the handler wrote is there.
    assert_eq!(r.body.lines().last().unwrap().trim(), "mine", "{}", r.body);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonzero_exit_is_a_function_error_and_the_sandbox_stays_warm() {
    if !common::can_run() {
        return;
    }
    let a = start(&[func("hello", ECHO_HOST, "")], "").await;
    let r = a.invoke("hello", "\"fail\"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"));
    let v = r.json();
    assert_eq!(v["errorType"], "Runtime.ExitError");
    assert!(v["errorMessage"].as_str().unwrap().contains('3'), "{v}");
    assert!(v["output"].as_str().unwrap().contains("partial"), "{v}");
    let r2 = a.invoke("hello", "{}").await;
    assert!(
        !r2.cold && r2.sandbox == r.sandbox,
        "exec sandbox survives a handler error"
    );
    let stats = a.get("/v1/stats").await;
    assert_eq!(stats["functions"][0]["errors"], 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_handler_and_replaces_the_sandbox() {
    if !common::can_run() {
        return;
    }
    let a = start(&[func("hello", ECHO_HOST, "timeout_s = 0.5")], "").await;
    let warm = a.invoke("hello", "{}").await;
    assert!(warm.cold);
    let t0 = Instant::now();
    let r = a.invoke("hello", "\"sleep\"").await;
    let took = t0.elapsed();
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"), "{r:?}");
    let v = r.json();
    assert_eq!(v["errorType"], "Sandbox.Timedout", "{v}");
    assert!(
        v["errorMessage"].as_str().unwrap().contains("0.50 seconds"),
        "{v}"
    );
    assert!(took < Duration::from_secs(3), "timeout took {took:?}");
    assert_eq!(r.sandbox, warm.sandbox);
    // The timed-out sandbox is gone and its cgroup removed; the next invocation is cold.
    let gone = a
        .wait_for(Duration::from_secs(5), || async {
            a.sandbox(&r.sandbox).await.is_none()
        })
        .await;
    assert!(gone, "timed-out sandbox still listed");
    let cg = format!("/sys/fs/cgroup/memory/sandscope/{}", r.sandbox);
    let removed = a
        .wait_for(Duration::from_secs(5), || {
            let cg = cg.clone();
            async move { !std::path::Path::new(&cg).exists() }
        })
        .await;
    assert!(
        removed || !std::path::Path::new("/sys/fs/cgroup/memory").exists(),
        "{cg} left behind"
    );
    let r2 = a.invoke("hello", "{}").await;
    assert_eq!(r2.status, 200);
    assert!(r2.cold, "replacement sandbox must be a cold start");
    assert_ne!(r2.sandbox, r.sandbox);
    let stats = a.get("/v1/stats").await;
    assert_eq!(stats["functions"][0]["timeouts"], 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocating_past_the_memory_limit_is_killed_and_reported() {
    if !common::can_run() {
        return;
    }
    let script = r#"cat >/dev/null
x=$(head -c 120000000 /dev/zero | tr '\0' a)
echo "{\"len\":${#x}}""#;
    let a = start(
        &[func("hog", script, "memory_mb = 32"), func("ok", "cat", "")],
        "",
    )
    .await;
    let r = a.invoke("hog", "{}").await;
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"), "{r:?}");
    let v = r.json();
    assert_eq!(v["errorType"], "Runtime.OutOfMemory", "{v}");
    assert!(
        v["errorMessage"].as_str().unwrap().contains("32 MiB"),
        "{v}"
    );
    let stats = a.get("/v1/stats").await;
    assert_eq!(stats["functions"][0]["oom_kills"], 1);
    // Other functions are unaffected.
    let ok = a.invoke("ok", "{\"a\":1}").await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, "{\"a\":1}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sandboxes_are_reaped_after_keep_alive() {
    if !common::can_run() {
        return;
    }
    let a = start(
        &[func("hello", "cat", "[functions.pool]\nkeep_alive_s = 0.3")],
        "",
    )
    .await;
    let r = a.invoke("hello", "{}").await;
    assert_eq!(r.status, 200);
    assert!(a.sandbox(&r.sandbox).await.is_some());
    let reaped = a
        .wait_for(Duration::from_secs(5), || async {
            a.sandbox(&r.sandbox).await.is_none()
        })
        .await;
    assert!(reaped, "idle sandbox not reaped");
    let r2 = a.invoke("hello", "{}").await;
    assert!(r2.cold, "after reaping, the next invocation is cold");
    assert_eq!(
        a.agent
            .metrics()
            .sandboxes_ended
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_sandboxes_thaw_on_invoke() {
    if !common::can_run() {
        return;
    }
    let counter = "echo ready; n=0; while read l; do n=$((n+1)); echo \"{\\\"n\\\":$n}\"; done";
    let a = start(
        &[func(
            "f",
            counter,
            "kind = \"persistent\"\n[functions.pool]\nfreeze_idle = true",
        )],
        "",
    )
    .await;
    let r1 = a.invoke("f", "{}").await;
    assert_eq!(r1.json()["n"], 1);
    let frozen = a
        .wait_for(Duration::from_secs(5), || async {
            a.sandbox(&r1.sandbox)
                .await
                .map(|s| s["state"] == "frozen")
                .unwrap_or(false)
        })
        .await;
    assert!(frozen, "idle sandbox not frozen");
    let state = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/sandscope/{}/freezer.state",
        r1.sandbox
    ));
    if let Ok(s) = state {
        assert_eq!(s.trim(), "FROZEN");
    }
    let r2 = a.invoke("f", "{}").await;
    assert_eq!(r2.status, 200, "{r2:?}");
    assert!(!r2.cold);
    assert_eq!(r2.sandbox, r1.sandbox);
    assert_eq!(r2.json()["n"], 2, "state survives freeze/thaw");
    let stats = a.get("/v1/stats").await;
    assert_eq!(
        stats["functions"][0]["phases"]["thaw"]["count"], 1,
        "{stats}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_capacity_requests_queue_then_get_throttled() {
    if !common::can_run() {
        return;
    }
    let a = start(
        &[func(
            "slow",
            "cat >/dev/null; sleep 1; echo done",
            "[functions.pool]\nmax_sandboxes = 1\nqueue = 1\nqueue_timeout_s = 5",
        )],
        "",
    )
    .await;
    let (r1, r2, r3) = tokio::join!(
        a.invoke("slow", "{}"),
        a.invoke("slow", "{}"),
        a.invoke("slow", "{}")
    );
    let mut statuses = vec![r1.status, r2.status, r3.status];
    statuses.sort();
    assert_eq!(
        statuses,
        vec![200, 200, 429],
        "one runs, one queues, one is throttled"
    );
    let throttled = [r1, r2, r3].into_iter().find(|r| r.status == 429).unwrap();
    assert!(
        throttled.body.contains("limit of 1 sandboxes"),
        "{}",
        throttled.body
    );
    let stats = a.get("/v1/stats").await;
    assert_eq!(stats["functions"][0]["throttles"], 1);
    assert_eq!(
        stats["functions"][0]["coldstarts"], 1,
        "the queued one reuses the sandbox"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_runtime_keeps_state_and_init_failure_is_reported() {
    if !common::can_run() {
        return;
    }
    let counter =
        "echo ready; n=0; while read l; do n=$((n+1)); echo \"{\\\"n\\\":$n,\\\"e\\\":$l}\"; done";
    let a = start(
        &[
            func("counter", counter, "kind = \"persistent\""),
            func(
                "broken",
                "echo 'cannot import handler' >&2; exit 1",
                "kind = \"persistent\"",
            ),
        ],
        "",
    )
    .await;
    let r1 = a.invoke("counter", "{\"x\":\n1}").await;
    assert_eq!(r1.status, 200, "{r1:?}");
    assert_eq!(r1.json()["n"], 1);
    assert_eq!(
        r1.json()["e"]["x"],
        1,
        "multi-line JSON arrives as one line"
    );
    let r2 = a.invoke("counter", "{}").await;
    assert_eq!(
        r2.json()["n"],
        2,
        "global state persists across warm invocations"
    );
    assert!(!r2.cold);

    let b = a.invoke("broken", "{}").await;
    assert_eq!(b.function_error.as_deref(), Some("Unhandled"), "{b:?}");
    let v = b.json();
    assert_eq!(v["errorType"], "Runtime.InitError", "{v}");
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("cannot import handler"),
        "{v}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    if !common::can_run() {
        return;
    }
    let a = start(&[func("hello", "cat", "")], "").await;
    let r = a.invoke("nope", "{}").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("Function not found: nope"), "{}", r.body);
    let big = "x".repeat(wire::MAX_PAYLOAD + 10);
    let r = a.invoke("hello", &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let fns = a.get("/v1/functions").await;
    assert_eq!(fns["functions"][0]["name"], "hello");
    assert_eq!(fns["functions"][0]["memory_mb"], 128);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarmed_sandboxes_serve_the_first_invocation_warm_and_survive_reaping() {
    if !common::can_run() {
        return;
    }
    let a = start(
        &[func(
            "pw",
            "cat",
            "[functions.pool]\nprewarm = 2\nkeep_alive_s = 0.2",
        )],
        "",
    )
    .await;
    let ready = a
        .wait_for(Duration::from_secs(10), || async {
            a.get("/v1/functions").await["functions"][0]["sandboxes"]["idle"] == 2
        })
        .await;
    assert!(ready, "two pre-warmed sandboxes expected");
    let r = a.invoke("pw", "{}").await;
    assert_eq!(r.status, 200);
    assert!(
        !r.cold,
        "a pre-warmed sandbox serves the first invocation warm"
    );
    // Past keep-alive, the reaper keeps the pre-warm count.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let v = a.get("/v1/functions").await;
    assert_eq!(v["functions"][0]["sandboxes"]["idle"], 2, "{v}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_sink_writes_telemetry_api_events_per_invocation() {
    if !common::can_run() {
        return;
    }
    let out = tempfile::NamedTempFile::new().unwrap();
    let a = start(
        &[func("hello", ECHO_HOST, "")],
        &format!("jsonl = \"{}\"", out.path().display()),
    )
    .await;
    let r1 = a.invoke("hello", "{}").await;
    let r2 = a.invoke("hello", "\"fail\"").await;
    assert!(r1.cold && !r2.cold);
    let mut events: Vec<serde_json::Value> = Vec::new();
    let complete = a
        .wait_for(Duration::from_secs(5), || {
            events = std::fs::read_to_string(out.path())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let n = events.len();
            async move { n >= 9 }
        })
        .await;
    assert!(complete, "{events:?}");
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "platform.initStart",
            "platform.initRuntimeDone",
            "platform.initReport",
            "platform.start",
            "platform.runtimeDone",
            "platform.report",
            "platform.start",
            "platform.runtimeDone",
            "platform.report"
        ]
    );
    assert_eq!(events[0]["record"]["instanceId"], r1.sandbox.as_str());
    assert_eq!(events[5]["record"]["status"], "success");
    assert!(
        events[5]["record"]["metrics"]["initDurationMs"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(events[5]["record"]["metrics"]["memorySizeMB"], 128);
    assert_eq!(events[8]["record"]["status"], "error");
    assert!(events[8]["record"]["metrics"]
        .get("initDurationMs")
        .is_none());
    assert_ne!(
        events[5]["record"]["requestId"],
        events[8]["record"]["requestId"]
    );
    let stats = a.get("/v1/stats").await;
    assert_eq!(stats["telemetry"]["dropped"]["jsonl"], 0);
    a.stop().await;
}
