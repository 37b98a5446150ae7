//! Probes that misbehave — garbage bytes, an oversized length, an early close, silence,
//! garbage in the middle of an invocation — fail only their own sandbox, quickly and
//! with a clear error, while real sandboxes of another function keep serving.

mod common;

use common::{func, start_with};
use host_agent::drivers::{
    BoxFuture, Driver, DriverError, SandboxHandle, SandboxSpec, Spawned, Usage,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 1 MiB log lines the `bad-longlines` probe sends.
const LONG_LINES: u64 = 250;

/// Real process sandboxes for most functions; a misbehaving fake probe for `bad-*`.
struct Mixed {
    real: Arc<dyn Driver>,
}

struct FakeHandle {
    done: Arc<AtomicBool>,
}

impl SandboxHandle for FakeHandle {
    fn pid(&self) -> Option<u32> {
        None
    }
    fn can_freeze(&self) -> bool {
        false
    }
    fn freeze(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        Box::pin(async { Ok(Duration::ZERO) })
    }
    fn thaw(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        Box::pin(async { Ok(Duration::ZERO) })
    }
    fn usage(&self) -> Usage {
        Usage::default()
    }
    fn oom_kills(&self) -> u64 {
        0
    }
    fn exited(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
    fn diagnostics(&self) -> String {
        "fake probe".into()
    }
    fn destroy(&self) -> BoxFuture<'_, ()> {
        self.done.store(true, Ordering::Release);
        Box::pin(async {})
    }
}

fn frame(f: wire::Frame) -> Vec<u8> {
    wire::encode_frame(&f).unwrap()
}

async fn misbehave(mode: String, id: String, mut s: tokio::net::UnixStream, done: Arc<AtomicBool>) {
    let hello = frame(
        wire::Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            sandbox_id: id.clone(),
            ..Default::default()
        }
        .into(),
    );
    match mode.as_str() {
        "bad-garbage" => {
            let mut junk = 50u32.to_le_bytes().to_vec();
            junk.extend((0..50u8).map(|i| i.wrapping_mul(37) ^ 0xA5));
            let _ = s.write_all(&junk).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        "bad-oversized" => {
            let _ = s.write_all(&u32::MAX.to_le_bytes()).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        "bad-early-close" => {
            let _ = s.write_all(&hello[..hello.len() / 2]).await;
        }
        "bad-silent" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        "bad-midinvoke" => {
            let _ = s.write_all(&hello).await;
            let _ = s.write_all(&frame(wire::Ready::default().into())).await;
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await; // the Invoke
            let _ = s.write_all(&[0xff; 64]).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        "bad-longlines" => {
            // Everything at the frame limit, as if the probe kept none of its own limits:
            // a Hello with huge fields, 1 MiB log lines, a result with huge error texts.
            let hello = wire::Hello {
                protocol_version: wire::PROTOCOL_VERSION,
                sandbox_id: id,
                hostname: "h".repeat(300_000),
                kernel_release: "k".repeat(100_000),
                markers: (0..4000u64)
                    .map(|i| wire::Marker {
                        name: "m".repeat(100),
                        since_init_ns: i,
                    })
                    .collect(),
                ..Default::default()
            };
            let _ = s.write_all(&frame(hello.into())).await;
            let _ = s.write_all(&frame(wire::Ready::default().into())).await;
            let (r, mut w) = s.into_split();
            let mut r = wire::AsyncFrameReader::new(r);
            let Ok(Some(wire::Frame {
                body: Some(wire::frame::Body::Invoke(inv)),
            })) = r.next().await
            else {
                panic!("expected an Invoke");
            };
            let line = "L".repeat(wire::MAX_FRAME - 4096);
            for seq in 1..=LONG_LINES {
                let log = wire::Log {
                    seq,
                    stream: wire::LogStream::Stderr as i32,
                    line: line.clone(),
                    invoke_id: inv.invoke_id.clone(),
                    ..Default::default()
                };
                if w.write_all(&frame(log.into())).await.is_err() {
                    return;
                }
            }
            let result = wire::InvokeResult {
                invoke_id: inv.invoke_id,
                status: wire::InvokeStatus::FunctionError as i32,
                error_type: "T".repeat(10_000),
                error_message: "E".repeat(900_000),
                payload: b"{}".to_vec(),
                ..Default::default()
            };
            let _ = w.write_all(&frame(result.into())).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        "bad-pingflood" => {
            // Pings as fast as the socket takes them, never reading a byte: every Pong
            // the agent owes stays unread.
            let _ = s.write_all(&hello).await;
            let _ = s.write_all(&frame(wire::Ready::default().into())).await;
            let burst = frame(wire::Ping { nonce: 7 }.into()).repeat(4096);
            while s.write_all(&burst).await.is_ok() {}
        }
        other => panic!("unknown mode {other}"),
    }
    done.store(true, Ordering::Release);
}

impl Driver for Mixed {
    fn name(&self) -> &'static str {
        "mixed"
    }
    fn describe(&self) -> String {
        "process + fake".into()
    }
    fn spawn<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Spawned, DriverError>> {
        if !spec.function.name.starts_with("bad-") {
            return self.real.spawn(spec);
        }
        Box::pin(async move {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            let done = Arc::new(AtomicBool::new(false));
            tokio::spawn(misbehave(
                spec.function.name.clone(),
                spec.id.clone(),
                b,
                done.clone(),
            ));
            Ok(Spawned {
                link: host_agent::drivers::LinkSource::Connected(a),
                handle: Box::new(FakeHandle { done }),
                running_at: Instant::now(),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_probes_fail_alone_and_other_sandboxes_keep_serving() {
    if !common::can_run() {
        return;
    }
    let bad = [
        "bad-garbage",
        "bad-oversized",
        "bad-early-close",
        "bad-silent",
        "bad-midinvoke",
    ];
    let mut funcs = vec![func("good", "cat", "")];
    funcs.extend(bad.iter().map(|n| func(n, "cat", "timeout_s = 1")));
    let a = start_with(&funcs, "boot_timeout_s = 1", |cfg| {
        let real = host_agent::drivers::process::ProcessDriver::new(cfg).unwrap();
        Arc::new(Mixed {
            real: Arc::new(real),
        })
    })
    .await;
    let a = Arc::new(a);

    // The good function is invoked continuously while the bad ones fail.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Acquire) {
                let t0 = Instant::now();
                let r = a.invoke("good", "{\"n\":1}").await;
                worst = worst.max(t0.elapsed());
                assert_eq!(r.status, 200, "good function failed: {r:?}");
                assert_eq!(r.body, "{\"n\":1}");
                n += 1;
            }
            (n, worst)
        })
    };

    let mut outcomes = Vec::new();
    for name in bad {
        let t0 = Instant::now();
        let r = a.invoke(name, "{}").await;
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(5), "{name} took {took:?}");
        outcomes.push((name, r));
    }
    stop.store(true, Ordering::Release);
    let (n, worst) = good.await.unwrap();
    assert!(n >= 5, "good function served only {n} invocations");
    assert!(
        worst < Duration::from_secs(2),
        "good function stalled for {worst:?}"
    );

    for (name, r) in &outcomes {
        match *name {
            "bad-midinvoke" => {
                assert_eq!(
                    r.function_error.as_deref(),
                    Some("Unhandled"),
                    "{name}: {r:?}"
                );
                let msg = r.json()["errorMessage"].as_str().unwrap().to_string();
                assert!(msg.contains("protocol error"), "{name}: {msg}");
            }
            "bad-silent" => {
                assert_eq!(r.status, 502, "{name}: {r:?}");
                assert!(r.body.contains("did not say Hello"), "{name}: {}", r.body);
            }
            "bad-early-close" => {
                assert_eq!(r.status, 502, "{name}: {r:?}");
                assert!(
                    r.body.contains("stream ended inside a frame"),
                    "{name}: {}",
                    r.body
                );
            }
            "bad-oversized" => {
                assert_eq!(r.status, 502, "{name}: {r:?}");
                assert!(
                    r.body.contains("exceeds the 1048576-byte limit"),
                    "{name}: {}",
                    r.body
                );
            }
            _ => {
                assert_eq!(r.status, 502, "{name}: {r:?}");
                assert!(
                    r.body.contains("protocol error") || r.body.contains("malformed"),
                    "{name}: {}",
                    r.body
                );
            }
        }
    }
    let m = a.agent.metrics();
    assert!(
        m.link_errors.load(Ordering::Relaxed) >= 4,
        "{}",
        m.to_json()
    );
    let health = a.get("/v1/health").await;
    assert_eq!(health["status"], "ok");
    // The good sandbox is still there and warm.
    let r = a.invoke("good", "{}").await;
    assert!(!r.cold);
}

/// Peak resident memory of this process (which hosts the agent) while `work` runs.
async fn peak_rss_during<T>(work: impl std::future::Future<Output = T>) -> (T, u64) {
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(common::vm_rss_bytes()));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Acquire) {
                peak.fetch_max(common::vm_rss_bytes(), Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let out = work.await;
    sampling.store(false, Ordering::Release);
    sampler.await.unwrap();
    peak.fetch_max(common::vm_rss_bytes(), Ordering::AcqRel);
    (out, peak.load(Ordering::Acquire))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_loses_its_link_and_sandbox_with_agent_memory_bounded() {
    if !common::can_run() {
        return;
    }
    let funcs = [
        func("good", "cat", ""),
        func("bad-pingflood", "cat", "timeout_s = 1"),
    ];
    let a = start_with(&funcs, "boot_timeout_s = 1", |cfg| {
        let real = host_agent::drivers::process::ProcessDriver::new(cfg).unwrap();
        Arc::new(Mixed {
            real: Arc::new(real),
        })
    })
    .await;
    let warm = a.invoke("good", "{}").await;
    assert_eq!(warm.status, 200, "{warm:?}");

    let before = common::vm_rss_bytes();
    let ((r, took), peak) = peak_rss_during(async {
        let t0 = Instant::now();
        let r = a.invoke("bad-pingflood", "{}").await;
        (r, t0.elapsed())
    })
    .await;
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "agent memory grew by {} MiB under a ping flood",
        grew >> 20
    );
    // The invocation ends well within its timeout plus a second, saying why.
    assert!(took < Duration::from_secs(2), "took {took:?}: {r:?}");
    assert_eq!(r.function_error.as_deref(), Some("Unhandled"), "{r:?}");
    let msg = r.json()["errorMessage"].as_str().unwrap().to_string();
    assert!(msg.contains("flood"), "{msg}");

    // Counted; the sandbox is gone; the other function is still warm.
    let m = a.agent.metrics().to_json();
    assert_eq!(m["link_floods"], 1, "{m}");
    let ended = a
        .wait_for(Duration::from_secs(5), || async {
            let v = a.get("/v1/sandboxes").await;
            !v["sandboxes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["function"] == "bad-pingflood")
        })
        .await;
    assert!(ended, "the flooding sandbox is still listed");
    let r = a.invoke("good", "{}").await;
    assert_eq!((r.status, r.cold), (200, false), "{r:?}");
    let stats = a.get("/v1/stats").await;
    let bad = stats["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "bad-pingflood")
        .unwrap();
    assert_eq!(
        (bad["invocations"].as_u64(), bad["errors"].as_u64()),
        (Some(1), Some(1)),
        "{bad}"
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_limits_hold_on_the_host_when_the_probe_keeps_none() {
    if !common::can_run() {
        return;
    }
    let funcs = [
        func("good", "cat", ""),
        func("bad-longlines", "cat", "timeout_s = 5"),
    ];
    let a = start_with(&funcs, "boot_timeout_s = 2", |cfg| {
        let real = host_agent::drivers::process::ProcessDriver::new(cfg).unwrap();
        Arc::new(Mixed {
            real: Arc::new(real),
        })
    })
    .await;
    let warm = a.invoke("good", "{}").await;
    assert_eq!(warm.status, 200, "{warm:?}");

    let before = common::vm_rss_bytes();
    let ((r, took), peak) = peak_rss_during(async {
        let t0 = Instant::now();
        let r = a.invoke("bad-longlines", "{}").await;
        (r, t0.elapsed())
    })
    .await;
    assert!(took < Duration::from_secs(6), "took {took:?}: {r:?}");
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "agent memory grew by {} MiB holding 1 MiB log lines",
        grew >> 20
    );
    // The error texts reach the client cut to the host's limits.
    assert_eq!(
        r.function_error.as_deref(),
        Some("Unhandled"),
        "{}",
        r.status
    );
    let v = r.json();
    let (ty, msg) = (
        v["errorType"].as_str().unwrap(),
        v["errorMessage"].as_str().unwrap(),
    );
    assert!(
        ty.len() <= 256 && ty.starts_with("TTT"),
        "errorType of {} bytes",
        ty.len()
    );
    assert!(
        msg.len() <= wire::MAX_LOG_LINE && msg.starts_with("EEE"),
        "errorMessage of {} bytes",
        msg.len()
    );

    // What the API serves about the sandbox is bounded too.
    let list = a
        .http
        .get(format!("{}/v1/sandboxes", a.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        list.len() < 64 << 10,
        "/v1/sandboxes is {} bytes",
        list.len()
    );
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let sb = v["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["function"] == "bad-longlines")
        .expect("the sandbox is listed")
        .clone();
    assert!(
        sb["probe"]["hostname"].as_str().unwrap().len() <= 256,
        "hostname not cut"
    );
    let id = sb["id"].as_str().unwrap();
    let detail = a
        .http
        .get(format!("{}/v1/sandboxes/{id}", a.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        detail.len() < 4 << 20,
        "/v1/sandboxes/{id} is {} MiB",
        detail.len() >> 20
    );
    let d: serde_json::Value = serde_json::from_str(&detail).unwrap();
    let logs = d["logs"].as_array().unwrap();
    assert!(!logs.is_empty());
    for l in logs {
        assert!(l["line"].as_str().unwrap().len() <= wire::MAX_LOG_LINE);
        assert_eq!(l["truncated"], true);
    }
    assert!(
        d["markers"].as_array().unwrap().len() <= 64,
        "markers not capped"
    );

    // Counted; /v1/stats agrees with the client; the other function keeps serving.
    let m = a.agent.metrics().to_json();
    assert_eq!(m["log_lines_cut"], LONG_LINES, "{m}");
    assert!(m["guest_fields_cut"].as_u64().unwrap() >= 4, "{m}");
    let stats = a.get("/v1/stats").await;
    let bad = stats["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "bad-longlines")
        .unwrap();
    assert_eq!(
        (bad["invocations"].as_u64(), bad["errors"].as_u64()),
        (Some(1), Some(1)),
        "{bad}"
    );
    let r = a.invoke("good", "{}").await;
    assert_eq!((r.status, r.cold), (200, false), "{r:?}");
    a.stop().await;
}
