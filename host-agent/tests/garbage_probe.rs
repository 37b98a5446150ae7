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
            sandbox_id: id,
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
