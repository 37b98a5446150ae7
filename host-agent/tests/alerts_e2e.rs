//! Alert rules end to end: real sandboxes print lines, the agent's engine drives alarms,
//! a webhook receiver in the test counts POSTs, bad reloads keep the old rules.

mod common;

use common::{can_run, func, start, TestAgent};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP server: stores each POSTed JSON body, answers 200.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let g = g.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
                    assert!(head.starts_with("post /hook "), "{head}");
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if buf.len() < h + 4 + len {
                        continue;
                    }
                    let body: Value = serde_json::from_slice(&buf[h + 4..h + 4 + len]).unwrap();
                    g.lock().unwrap().push(body);
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
            });
        }
    });
    (url, got)
}

fn rules_toml(url: &str) -> String {
    format!(
        r#"
[[rules]]
name = "errors"
terms = '"ERROR" -"retry"'
source = "stderr"
functions = ["errs"]
default_value = 0
[rules.alarm]
threshold = 3
window_s = 0.2
datapoints = 2
of = 3
[[rules.actions]]
kind = "webhook"
url = "{url}"
retries = 1
[[rules.actions]]
kind = "log"
"#
    )
}

async fn alert(a: &TestAgent, rule: &str) -> Value {
    let v = a.get("/v1/alerts").await;
    v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == rule)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Start an agent whose rules file is `rules` (written next to the config).
async fn start_with_rules(
    rules: &str,
    funcs: &[common::Func<'_>],
) -> (TestAgent, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("sandscope-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("rules-{}.toml", rand_suffix()));
    std::fs::write(&p, rules).unwrap();
    let a = start(funcs, &format!("rules = \"{}\"", p.display())).await;
    (a, p)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

const ERRS: &str =
    "cat >/dev/null\nfor i in 1 2 3 4 5; do echo \"ERROR db down $i\" >&2; done\necho '{}'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_lines_drive_alarm_webhook_once_per_transition_and_recover() {
    if !can_run() {
        return;
    }
    let (url, got) = webhook_receiver().await;
    let (a, _rules) = start_with_rules(&rules_toml(&url), &[func("errs", ERRS, "")]).await;
    // Errors until the alarm fires.
    let t0 = Instant::now();
    loop {
        let r = a.invoke("errs", "{}").await;
        assert_eq!(r.status, 200, "{}", r.body);
        if alert(&a, "errors").await["state"] == "ALARM" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no ALARM: {}",
            alert(&a, "errors").await
        );
    }
    // Errors stop: recovery to OK (2 quiet periods after the alarm).
    assert!(
        a.wait_for(Duration::from_secs(5), || async {
            alert(&a, "errors").await["state"] == "OK"
        })
        .await,
        "no recovery: {}",
        alert(&a, "errors").await
    );
    let rule = alert(&a, "errors").await;
    let transitions = rule["transitions"].as_array().unwrap().clone();
    assert!(transitions.iter().any(|t| t["to"] == "ALARM"), "{rule}");
    // Exactly one POST per transition, in order, with the right body.
    let n = transitions.len();
    assert!(
        a.wait_for(Duration::from_secs(5), || async {
            got.lock().unwrap().len() >= n
        })
        .await,
        "posts {:?} vs transitions {transitions:?}",
        got.lock().unwrap()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posts = got.lock().unwrap().clone();
    assert_eq!(posts.len(), n, "{posts:?} vs {transitions:?}");
    for (p, t) in posts.iter().zip(&transitions) {
        assert_eq!(p["rule"], "errors");
        assert_eq!(
            (&p["previous_state"], &p["state"]),
            (&t["from"], &t["to"]),
            "{p}"
        );
        assert_eq!(p["timestamp_ms"], t["at_ms"]);
    }
    let alarm = posts.iter().find(|p| p["state"] == "ALARM").unwrap();
    assert_eq!(alarm["function"], "errs", "{alarm}");
    assert!(
        alarm["sandbox"].as_str().unwrap().starts_with("errs"),
        "{alarm}"
    );
    assert!(alarm["value"].as_f64().unwrap() >= 3.0, "{alarm}");
    assert_eq!(alarm["threshold"], 3.0);
    assert_eq!(alarm["unit"], "Count");
    let samples = alarm["samples"].as_array().unwrap();
    assert!(!samples.is_empty() && samples[0].as_str().unwrap().starts_with("ERROR db down"));
    assert_eq!(posts.last().unwrap()["state"], "OK");
    let v = a.get("/v1/alerts").await;
    assert_eq!(v["counters"]["webhook_sent"], n as u64, "{v}");
    assert_eq!(v["counters"]["webhook_failures"], 0, "{v}");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_webhook_is_counted_and_bad_reload_keeps_old_rules() {
    if !can_run() {
        return;
    }
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let (a, rules) = start_with_rules(&rules_toml(&dead), &[func("errs", ERRS, "")]).await;
    let t0 = Instant::now();
    while alert(&a, "errors").await["state"] != "ALARM" {
        let r = a.invoke("errs", "{}").await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    // Failures are retried (retries = 1 → 2 attempts), counted, and never block invokes.
    assert!(
        a.wait_for(Duration::from_secs(5), || async {
            a.get("/v1/alerts").await["counters"]["webhook_gave_up"].as_u64() >= Some(1)
        })
        .await
    );
    let c = a.get("/v1/alerts").await["counters"].clone();
    assert!(c["webhook_failures"].as_u64().unwrap() >= 2, "{c}");
    assert_eq!(c["webhook_sent"], 0, "{c}");
    assert_eq!(a.invoke("errs", "{}").await.status, 200);

    // An invalid regex: reload is refused, the error names file, rule key and column.
    std::fs::write(&rules, "[[rules]]\nname = 'broken'\npattern = 'ERROR ('\n").unwrap();
    let r = a
        .http
        .post(format!("{}/v1/rules/reload", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(e.contains(&rules.display().to_string()), "{e}");
    assert!(
        e.contains("rules[0].pattern") && e.contains("column 7"),
        "{e}"
    );
    let feed = a.get("/v1/alerts").await;
    assert_eq!(feed["rules"][0]["name"], "errors", "{feed}");
    assert_eq!(feed["last_reload"]["ok"], false, "{feed}");
    // Unknown fields too.
    std::fs::write(
        &rules,
        "[[rules]]\nname = 'x'\npattern = 'x'\nsorce = 'stderr'\n",
    )
    .unwrap();
    let e = a.agent.alerts().reload().unwrap_err().to_string();
    assert!(e.contains("unknown field `sorce`"), "{e}");
    assert_eq!(alert(&a, "errors").await["name"], "errors");
    // A good file replaces the rules.
    std::fs::write(&rules, "[[rules]]\nname = 'fresh'\nterms = 'ERROR'\n").unwrap();
    let r = a
        .http
        .post(format!("{}/v1/rules/reload", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(alert(&a, "errors").await, Value::Null);
    a.invoke("errs", "{}").await;
    assert!(
        a.wait_for(Duration::from_secs(3), || async {
            alert(&a, "fresh").await["matches"].as_u64() >= Some(5)
        })
        .await
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_events_reach_the_bus_and_rules() {
    if !can_run() {
        return;
    }
    let rules = r#"
[[rules]]
name = "timeouts"
terms = '"Task timed out"'
source = "platform"
[rules.alarm]
threshold = 1
window_s = 0.2
[[rules]]
name = "cold"
pattern = '^COLDSTART function=(?P<f>\S+) sandbox=\S+ init_ms=(?P<ms>[\d.]+)$'
value = "ms"
unit = "Milliseconds"
source = "platform"
[[rules]]
name = "mem"
pattern = 'Memory Size: 128 MB\tMax Memory Used: (?P<mb>\d+) MB'
value = "mb"
source = "platform"
"#;
    let (a, _r) = start_with_rules(
        rules,
        &[
            func("slow", "sleep 5", "timeout_s = 0.3"),
            func("ok", "cat", ""),
        ],
    )
    .await;
    let mut logs = a.agent.subscribe_logs();
    let r = a.invoke("ok", "{}").await;
    assert!(r.cold);
    let mut seen = Vec::new();
    let t0 = Instant::now();
    while !seen.iter().any(|l: &String| l.starts_with("REPORT")) {
        assert!(t0.elapsed() < Duration::from_secs(5), "{seen:?}");
        let l = tokio::time::timeout(Duration::from_secs(5), logs.recv())
            .await
            .unwrap()
            .unwrap();
        if l.stream == "platform" {
            assert_eq!(&*l.function, "ok");
            assert_eq!(&*l.sandbox, r.sandbox);
            seen.push(l.line.clone());
        }
    }
    assert!(
        seen[0].starts_with("COLDSTART function=ok sandbox="),
        "{seen:?}"
    );
    let report = seen.last().unwrap();
    for part in [
        "REPORT RequestId: ",
        "\tDuration: ",
        "\tBilled Duration: ",
        "\tMemory Size: 128 MB",
        "\tMax Memory Used: ",
        "\tInit Duration: ",
    ] {
        assert!(report.contains(part), "{part} in {report}");
    }
    let t = a.invoke("slow", "{}").await;
    assert!(t.function_error.is_some());
    assert!(
        a.wait_for(Duration::from_secs(5), || async {
            alert(&a, "timeouts").await["state"] == "ALARM"
        })
        .await,
        "{}",
        alert(&a, "timeouts").await
    );
    assert!(alert(&a, "cold").await["matches"].as_u64() >= Some(2));
    assert!(alert(&a, "mem").await["matches"].as_u64() >= Some(1));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_flood_does_not_stall_invocations() {
    if !can_run() {
        return;
    }
    let mut rules = String::new();
    for i in 0..50 {
        rules.push_str(&format!(
            "[[rules]]\nname = 'r{i}'\npattern = 'ERROR code={i}\\b'\n[rules.alarm]\nthreshold = 1\nwindow_s = 0.1\n"
        ));
    }
    let (a, _r) = start_with_rules(
        &rules,
        &[
            func(
                "flood",
                "cat >/dev/null; yes 'ERROR code=7 flood line' | head -n 100000 >&2; echo '{}'",
                "timeout_s = 20",
            ),
            func("ok", "cat", ""),
        ],
    )
    .await;
    a.invoke("ok", "{}").await;
    let flood = {
        let (url, http) = (a.url.clone(), a.http.clone());
        tokio::spawn(async move {
            http.post(format!("{url}/2015-03-31/functions/flood/invocations"))
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(a.invoke("ok", "{}").await.status, 200);
        worst = worst.max(t.elapsed());
    }
    assert_eq!(flood.await.unwrap().as_u16(), 200);
    assert!(
        worst < Duration::from_secs(2),
        "an invocation took {worst:?} during the flood"
    );
    let c = a.get("/v1/alerts").await["counters"].clone();
    let seen = c["lines_seen"].as_u64().unwrap();
    assert!(seen > 0, "{c}");
    eprintln!("flood: {c} worst warm invoke {worst:?}");
    assert!(
        a.wait_for(Duration::from_secs(5), || async {
            alert(&a, "r7").await["matches"].as_u64() > Some(0)
        })
        .await
    );
    assert_eq!(alert(&a, "r8").await["matches"], 0);
    a.stop().await;
}
