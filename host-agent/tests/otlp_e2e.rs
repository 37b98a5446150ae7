//! OTLP log export end to end against a real collector: rotel (PyPI `rotel`, a Rust
//! OpenTelemetry collector) receiving OTLP/HTTP, with a Python logs processor that writes
//! what arrives to a file. Function output, platform events and shell audits must arrive
//! with their severities and attributes; a dead backend must cost invocations nothing and
//! be counted.

mod common;

use common::otlp::{received, start_rotel, start_rotel_on, until};
use common::{free_port, func, rotel, start_more};
use std::time::{Duration, Instant};

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

const TRACED: &str = r#"event=$(cat)
echo "traced-line tp=$TRACEPARENT" >&2
echo '{"ok":true}'"#;

/// POST an invocation with these headers; returns (status, headers).
async fn invoke_with(
    a: &common::TestAgent,
    name: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap) {
    let mut req = a
        .http
        .post(format!("{}/2015-03-31/functions/{name}/invocations", a.url))
        .body("{}");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let _ = r.text().await;
    (status, h)
}

fn hdr(h: &reqwest::header::HeaderMap, k: &str) -> String {
    h.get(k).unwrap().to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocation_spans_over_grpc_join_the_callers_trace_and_logs_over_http_carry_their_ids() {
    if !common::can_run() {
        return;
    }
    let Some(bin) = rotel() else { return };
    let r = start_rotel(&bin);
    let a = start_more(
        &[func("traced", TRACED, "")],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{}\"\ninterval_s = 0.05\n\
             [otlp.traces]\nendpoint = \"http://127.0.0.1:{}\"\nprotocol = \"grpc\"\n\
             [otlp.metrics]\nenabled = false\n",
            r.http, r.grpc
        ),
    )
    .await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let tp = format!("00-{caller_trace}-{caller_span}-01");
    let (status, h) = invoke_with(&a, "traced", &[("traceparent", &tp)]).await;
    assert_eq!(status, 200);
    assert_eq!(hdr(&h, "x-sandscope-coldstart"), "true");
    let sandbox = hdr(&h, "x-sandscope-sandbox-id");
    let cold_id = hdr(&h, "x-amzn-requestid");
    // A caller that did not sample its trace: passed through, no spans recorded.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let (status, _) = invoke_with(
        &a,
        "traced",
        &[(
            "traceparent",
            &format!("00-{unsampled}-b7ad6b7169203331-00"),
        )],
    )
    .await;
    assert_eq!(status, 200);
    let (status, h) = invoke_with(&a, "traced", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(hdr(&h, "x-sandscope-coldstart"), "false");
    let warm_id = hdr(&h, "x-amzn-requestid");

    let root_of = |spans: &[serde_json::Value], id: &str| {
        spans
            .iter()
            .find(|s| s["name"] == "traced" && s["attributes"]["faas.invocation_id"] == id)
            .cloned()
    };
    let children_of = |spans: &[serde_json::Value],
                       root: &serde_json::Value|
     -> Vec<serde_json::Value> {
        spans
            .iter()
            .filter(|s| s["parent_span_id"] == root["span_id"] && s["trace_id"] == root["trace_id"])
            .cloned()
            .collect()
    };
    let spans = until(&r.spans, "both invocations' spans", |v| {
        [&cold_id, &warm_id].iter().all(|id| {
            root_of(v, id)
                .is_some_and(|root| children_of(v, &root).iter().any(|c| c["name"] == "invoke"))
        })
    })
    .await;

    // The cold invocation: a child of the caller's span, in the caller's trace.
    let root = root_of(&spans, &cold_id).unwrap();
    assert_eq!(root["trace_id"], caller_trace, "{root}");
    assert_eq!(root["parent_span_id"], caller_span, "{root}");
    assert_eq!(root["attributes"]["faas.coldstart"], true, "{root}");
    assert_eq!(root["attributes"]["faas.trigger"], "http");
    assert_eq!(root["resource"]["faas.instance"], sandbox.as_str());
    assert_eq!(root["resource"]["faas.name"], "traced");
    assert_eq!(root["resource"]["faas.max_memory"], 128 << 20, "{root}");
    assert_eq!(root["resource"]["service.name"], "sandscope-agent");
    let kids = children_of(&spans, &root);
    let names: Vec<&str> = kids.iter().map(|k| k["name"].as_str().unwrap()).collect();
    for want in ["spawn", "probe_init", "runtime_init", "invoke"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let (rs, re) = (
        root["start"].as_u64().unwrap(),
        root["end"].as_u64().unwrap(),
    );
    for k in &kids {
        let (s, e) = (k["start"].as_u64().unwrap(), k["end"].as_u64().unwrap());
        assert!(
            rs <= s && s <= e && e <= re,
            "child outside its parent: {k} in {root}"
        );
        assert_ne!(
            k["kind"], root["kind"],
            "phases are INTERNAL, the invocation SERVER"
        );
    }
    let at = |n: &str| kids.iter().find(|k| k["name"] == n).unwrap();
    // One timeline: the start-up phases follow each other, the invoke comes after them.
    assert_eq!(at("probe_init")["start"], at("spawn")["end"]);
    assert_eq!(at("runtime_init")["start"], at("probe_init")["end"]);
    assert!(at("invoke")["start"].as_u64() >= at("runtime_init")["end"].as_u64());

    assert!(
        !spans.iter().any(|s| s["trace_id"] == unsampled),
        "an unsampled trace records no spans"
    );
    // The warm one: a new trace, no start-up phases.
    let warm = root_of(&spans, &warm_id).unwrap();
    assert_ne!(warm["trace_id"], caller_trace);
    assert_eq!(warm["parent_span_id"], "");
    assert_eq!(warm["attributes"]["faas.coldstart"], false);
    let warm_kids: Vec<String> = children_of(&spans, &warm)
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect();
    assert!(warm_kids.contains(&"invoke".to_string()), "{warm_kids:?}");
    for phase in ["spawn", "probe_init", "runtime_init"] {
        assert!(
            !warm_kids.contains(&phase.to_string()),
            "warm has no {phase}: {warm_kids:?}"
        );
    }

    // Logs (over HTTP) carry the invocation's trace and span, and the handler saw the
    // invocation span as its parent.
    let span_id = root["span_id"].as_str().unwrap().to_string();
    let logs = until(&r.logs, "the handler's line and the REPORT", |v| {
        v.iter().any(|l| {
            l["attributes"]["faas.invocation_id"] == cold_id.as_str()
                && l["body"].as_str().unwrap_or("").starts_with("traced-line")
        }) && v.iter().any(|l| {
            l["body"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("REPORT RequestId: {cold_id}"))
        })
    })
    .await;
    let line = logs
        .iter()
        .find(|l| {
            l["body"].as_str().unwrap_or("").starts_with("traced-line")
                && l["attributes"]["faas.invocation_id"] == cold_id.as_str()
        })
        .unwrap();
    assert_eq!(line["trace_id"], caller_trace, "{line}");
    assert_eq!(line["span_id"], span_id.as_str(), "{line}");
    assert_eq!(
        line["body"],
        format!("traced-line tp=00-{caller_trace}-{span_id}-01").as_str(),
        "the handler gets TRACEPARENT naming the invocation span"
    );
    let report = logs
        .iter()
        .find(|l| {
            l["body"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("REPORT RequestId: {cold_id}"))
        })
        .unwrap();
    assert_eq!(
        report["trace_id"], caller_trace,
        "platform lines too: {report}"
    );
    assert_eq!(report["span_id"], span_id.as_str());
    let stats = a.get("/v1/stats").await;
    assert_eq!(
        stats["telemetry"]["dropped"]["otlp_traces"], 0,
        "{}",
        stats["telemetry"]
    );
    assert_eq!(
        stats["telemetry"]["dropped"]["otlp_logs"], 0,
        "{}",
        stats["telemetry"]
    );
}

const MARKED: &str = r#"event=$(cat)
echo "marker-line" >&2
echo '{"ok":true}'"#;

fn reports(recs: &[serde_json::Value]) -> Vec<String> {
    recs.iter()
        .filter_map(|r| r["body"].as_str())
        .filter_map(|b| b.strip_prefix("REPORT RequestId: "))
        .map(|b| b.split('\t').next().unwrap().to_string())
        .collect()
}

async fn telemetry(a: &common::TestAgent, what: &str) -> u64 {
    let s = a.get("/v1/stats").await;
    s["telemetry"][what]["otlp_logs"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_outage_is_spooled_to_disk_and_delivered_after_collector_and_agent_restarts() {
    if !common::can_run() {
        return;
    }
    let Some(bin) = rotel() else { return };
    let r1 = start_rotel(&bin);
    let (grpc, http) = (r1.grpc, r1.http);
    let spool = tempfile::tempdir().unwrap();
    let cfg = format!(
        "\n[otlp]\nendpoint = \"http://127.0.0.1:{http}\"\ninterval_s = 0.05\ntimeout_s = 0.5\n\
         spool_dir = \"{}\"\n[otlp.traces]\nenabled = false\n[otlp.metrics]\nenabled = false\n",
        spool.path().display()
    );
    let a = start_more(&[func("hello", MARKED, "")], "", &cfg).await;
    let first = a.invoke("hello", "{}").await;
    assert_eq!(first.status, 200);
    until(&r1.logs, "the first REPORT", |v| !reports(v).is_empty()).await;

    // The collector goes away: invocations carry on, their records go to the spool.
    drop(r1);
    let mut ids = Vec::new();
    for _ in 0..10 {
        let r = a
            .http
            .post(format!("{}/2015-03-31/functions/hello/invocations", a.url))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "invocations go on during the outage");
        ids.push(hdr(r.headers(), "x-amzn-requestid"));
    }
    let otlp = a.agent.otlp().unwrap().clone();
    // Each invocation put its marker line and its REPORT on the bus: 20 records.
    let t0 = Instant::now();
    while telemetry(&a, "spooled").await < 20 {
        otlp.flush(Duration::from_secs(2)).await;
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "spooled {}",
            telemetry(&a, "spooled").await
        );
    }
    assert_eq!(
        telemetry(&a, "spooled").await,
        20,
        "exactly the outage's records"
    );
    assert_eq!(telemetry(&a, "dropped").await, 0, "nothing lost");
    assert!(
        std::fs::read_dir(spool.path().join("logs"))
            .unwrap()
            .count()
            > 0
    );

    // The collector is back on the same ports: the spool drains into it.
    let r2 = start_rotel_on(&bin, grpc, http);
    until(&r2.logs, "the outage's REPORTs", |v| {
        ids.iter().all(|id| reports(v).contains(id))
    })
    .await;
    assert!(
        a.wait_for(Duration::from_secs(10), || async {
            telemetry(&a, "spooled").await == 0
        })
        .await,
        "spool drained"
    );
    // Nothing arrives twice (a little time for any duplicate to show up).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = received(&r2);
    assert_eq!(got.len(), 20, "every spooled record once: {got:#?}");
    assert_eq!(
        got.iter().filter(|r| r["body"] == "marker-line").count(),
        10
    );

    // Now the agent restarts during an outage: its last records are spooled at shutdown
    // and the next agent on the same spool delivers them.
    drop(r2);
    let mut late = Vec::new();
    for _ in 0..3 {
        let r = a
            .http
            .post(format!("{}/2015-03-31/functions/hello/invocations", a.url))
            .body("{}")
            .send()
            .await
            .unwrap();
        late.push(hdr(r.headers(), "x-amzn-requestid"));
    }
    a.stop().await;
    let r3 = start_rotel_on(&bin, grpc, http);
    let b = start_more(&[func("hello", MARKED, "")], "", &cfg).await;
    until(
        &r3.logs,
        "the last agent's REPORTs, sent by the next one",
        |v| late.iter().all(|id| reports(v).contains(id)),
    )
    .await;
    assert!(
        b.wait_for(Duration::from_secs(10), || async {
            telemetry(&b, "spooled").await == 0
        })
        .await,
        "spool drained after the restart"
    );
    assert_eq!(telemetry(&b, "dropped").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otlp_alert_action_sends_the_alarm_transition_as_a_warn_log_record() {
    if !common::can_run() {
        return;
    }
    let Some(bin) = rotel() else { return };
    let r = start_rotel(&bin);
    let a = start_more(
        &[func("hello", HELLO, "")],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{}\"\ninterval_s = 0.05\n\
             [otlp.metrics]\nenabled = false\n\
             [[rules]]\nname = \"oops\"\npattern = \"oops-marker\"\nsource = \"stderr\"\n\
             [rules.alarm]\nthreshold = 1\nwindow_s = 0.2\n[[rules.actions]]\nkind = \"otlp\"\n",
            r.http
        ),
    )
    .await;
    let resp = a.invoke("hello", "{}").await;
    assert_eq!(resp.status, 200);
    let recs = until(&r.logs, "the ALARM record", |v| {
        v.iter()
            .any(|l| l["attributes"]["sandscope.alert.state"] == "ALARM")
    })
    .await;
    let rec = recs
        .iter()
        .find(|l| l["attributes"]["sandscope.alert.state"] == "ALARM")
        .unwrap();
    assert_eq!(rec["severity_text"], "WARN", "{rec}");
    assert_eq!(rec["severity_number"], 13);
    assert_eq!(rec["attributes"]["sandscope.alert.rule"], "oops");
    assert_eq!(rec["attributes"]["faas.name"], "hello");
    assert_eq!(rec["attributes"]["faas.instance"], resp.sandbox.as_str());
    assert!(
        rec["body"].as_str().unwrap().starts_with("ALARM oops: "),
        "{rec}"
    );
    let alerts = a.get("/v1/alerts").await;
    assert!(
        alerts["counters"]["otlp_actions"].as_u64().unwrap() >= 1,
        "{alerts}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_temporality_exports_each_intervals_change() {
    if !common::can_run() {
        return;
    }
    let Some(bin) = rotel() else { return };
    let r = start_rotel(&bin);
    let a = start_more(
        &[func("hello", HELLO, "")],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{}\"\ntemporality = \"delta\"\n\
             metrics_interval_s = 0.2\n[otlp.logs]\nenabled = false\n[otlp.traces]\nenabled = false\n",
            r.http
        ),
    )
    .await;
    let sandbox = a.invoke("hello", "{}").await.sandbox;
    for _ in 0..2 {
        assert_eq!(a.invoke("hello", "{}").await.status, 200);
    }
    let mine = |v: &[serde_json::Value], name: &str| -> Vec<serde_json::Value> {
        v.iter()
            .filter(|m| m["name"] == name && m["resource"]["faas.instance"] == sandbox.as_str())
            .cloned()
            .collect()
    };
    let total = |pts: &[serde_json::Value], key: &str| -> u64 {
        pts.iter().map(|p| p[key].as_u64().unwrap_or(0)).sum()
    };
    // Wait for the three invocations and at least two quiet intervals after them.
    let got = until(&r.metrics, "three invocations in delta points", |v| {
        let pts = mine(v, "faas.invocations");
        total(&pts, "value") == 3 && pts.iter().filter(|p| p["value"] == 0).count() >= 2
    })
    .await;
    let mut inv = mine(&got, "faas.invocations");
    // The collector may hand batches to its processor out of order.
    inv.sort_by_key(|p| p["start"].as_u64());
    assert!(
        inv.iter()
            .all(|p| p["temporality"].as_str().unwrap().contains("Delta")),
        "{inv:#?}"
    );
    // Each point covers the interval since the previous one: no overlap, no gap.
    for w in inv.windows(2) {
        assert_eq!(w[1]["start"], w[0]["time"], "{w:#?}");
    }
    let durations = mine(&got, "faas.invoke_duration");
    assert_eq!(total(&durations, "count"), 3, "{durations:#?}");
    // Up-down counters stay levels: the idle sandbox is 1 in every export.
    let idle: Vec<_> = got
        .iter()
        .filter(|m| m["name"] == "sandscope.sandboxes" && m["attributes"]["state"] == "idle")
        .collect();
    assert!(
        idle.last().is_some_and(
            |p| p["value"] == 1 && p["temporality"].as_str().unwrap().contains("Cumulative")
        ),
        "{idle:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_invocations_nothing_and_every_record_is_accounted_for(
) {
    if !common::can_run() {
        return;
    }
    // Accepts connections and reads requests, never answers: every export times out.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().flatten() {
            held.push(c);
        }
    });
    let a = start_more(
        &[func("hello", HELLO, "")],
        "",
        &format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{port}\"\ninterval_s = 0.05\ntimeout_s = 0.2\n\
             [otlp.metrics]\nenabled = false\n"
        ),
    )
    .await;
    assert_eq!(a.invoke("hello", "{}").await.status, 200);
    let t0 = Instant::now();
    for _ in 0..20 {
        assert_eq!(a.invoke("hello", "{}").await.status, 200);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "20 warm invocations took {:?} with a hanging collector",
        t0.elapsed()
    );
    let otlp = a.agent.otlp().unwrap().clone();
    let (logs, traces) = (otlp.logs.clone().unwrap(), otlp.traces.clone().unwrap());
    // Every invocation put at least its stderr line and REPORT on the bus and two spans
    // (the invocation and its invoke phase) into the trace exporter.
    let handed_over = a
        .wait_for(Duration::from_secs(5), || async {
            logs.accepted() >= 42 && traces.accepted() >= 42
        })
        .await;
    assert!(handed_over, "{} {}", logs.accepted(), traces.accepted());
    otlp.flush(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    while logs.dropped() < logs.accepted() || traces.dropped() < traces.accepted() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "logs {}/{} traces {}/{} dropped",
            logs.dropped(),
            logs.accepted(),
            traces.dropped(),
            traces.accepted()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for e in [
        logs.dropped() - logs.accepted(),
        traces.dropped() - traces.accepted(),
    ] {
        assert_eq!(e, 0, "dropped exactly what was accepted");
    }
    assert_eq!((logs.exported(), traces.exported()), (0, 0));
    assert!(logs.failed_requests() > 0);
    let stats = a.get("/v1/stats").await;
    assert_eq!(
        stats["telemetry"]["dropped"]["otlp_logs"],
        logs.accepted(),
        "{}",
        stats["telemetry"]
    );
    assert_eq!(
        stats["telemetry"]["dropped"]["otlp_traces"],
        traces.accepted()
    );
}
