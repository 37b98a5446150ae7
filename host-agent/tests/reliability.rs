//! Every fault bounded, nothing leaked (issue 16). Each test provokes one fault against a
//! real agent with process sandboxes and checks that the faulty invocation ends in time
//! with a clear error, other functions keep serving, nothing (sandbox, process, cgroup,
//! state dir) is left once the fault is over or the agent has stopped, and `/v1/stats`
//! agrees with what the clients saw.

mod common;

use common::{func, leftover_cgroups, start_with, TestAgent};
use host_agent::drivers::{BoxFuture, Driver, DriverError, SandboxHandle, SandboxSpec, Spawned};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The process driver with every spawn held back by `delay` after the sandbox process
/// is running: a window in which a cold start can be abandoned.
struct SlowSpawn {
    real: Arc<dyn Driver>,
    delay: Duration,
}

impl Driver for SlowSpawn {
    fn name(&self) -> &'static str {
        "process"
    }
    fn describe(&self) -> String {
        format!("process driver, spawns held back {:?}", self.delay)
    }
    fn spawn<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Spawned, DriverError>> {
        Box::pin(async move {
            let s = self.real.spawn(spec).await?;
            tokio::time::sleep(self.delay).await;
            Ok(s)
        })
    }
}

/// The process driver with a slow teardown, as a VM's is (a guest given time to reset
/// itself): noticing the sandbox's exit takes the full wait, and ending it 300 ms more.
/// Like every driver's, its destroy is idempotent: a second call returns at once.
struct SlowTeardown {
    real: Arc<dyn Driver>,
}

struct SlowHandle {
    inner: Box<dyn SandboxHandle>,
    destroyed: AtomicBool,
}

impl SandboxHandle for SlowHandle {
    fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }
    fn can_freeze(&self) -> bool {
        false
    }
    fn freeze(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        self.inner.freeze()
    }
    fn thaw(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        self.inner.thaw()
    }
    fn usage(&self) -> host_agent::drivers::Usage {
        self.inner.usage()
    }
    fn oom_kills(&self) -> u64 {
        self.inner.oom_kills()
    }
    fn exited(&self) -> bool {
        self.inner.exited()
    }
    fn wait_exited(&self, limit: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            tokio::time::sleep(limit).await;
            self.inner.exited()
        })
    }
    fn diagnostics(&self) -> String {
        self.inner.diagnostics()
    }
    fn destroy(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.destroyed.swap(true, Ordering::AcqRel) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.inner.destroy().await;
        })
    }
}

impl Driver for SlowTeardown {
    fn name(&self) -> &'static str {
        "process"
    }
    fn describe(&self) -> String {
        "process driver, slow teardown".into()
    }
    fn spawn<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Spawned, DriverError>> {
        Box::pin(async move {
            let mut s = self.real.spawn(spec).await?;
            s.handle = Box::new(SlowHandle {
                inner: s.handle,
                destroyed: AtomicBool::new(false),
            });
            Ok(s)
        })
    }
}

fn process_driver(cfg: &host_agent::config::AgentConfig) -> Arc<dyn Driver> {
    let d = host_agent::drivers::process::ProcessDriver::new(cfg)
        .unwrap_or_else(|e| panic!("{}", host_agent::agent::chain(&e)));
    Arc::new(d)
}

fn invoke_url(a: &TestAgent, name: &str) -> String {
    format!("{}/2015-03-31/functions/{name}/invocations", a.url)
}

/// Send `n` invocations of `name` at once from clients that give up after `patience`;
/// every one must give up.
async fn disconnecting_clients(a: &TestAgent, name: &str, n: usize, patience: Duration) {
    let impatient = reqwest::Client::builder()
        .timeout(patience)
        .build()
        .unwrap();
    let mut reqs = tokio::task::JoinSet::new();
    for _ in 0..n {
        let req = impatient.post(invoke_url(a, name)).body("{}").send();
        reqs.spawn(req);
    }
    while let Some(r) = reqs.join_next().await {
        match r.unwrap() {
            Err(e) if e.is_timeout() => {}
            other => panic!("the client was meant to give up first: {other:?}"),
        }
    }
}

/// No sandbox of `function` listed, booting, busy or queued, and none of its cgroups or
/// state dirs on disk.
async fn nothing_left_of(a: &TestAgent, function: &str) -> Result<(), String> {
    let listed: Vec<String> = a
        .live_ids()
        .await
        .into_iter()
        .filter(|id| id.starts_with(&format!("{function}-")))
        .collect();
    let view = a.fn_view(function).await;
    let dirs: Vec<String> = a
        .leftover_state_dirs()
        .into_iter()
        .filter(|d| d.starts_with(&format!("{function}-")))
        .collect();
    let cgroups = leftover_cgroups(function);
    if listed.is_empty()
        && view["sandboxes"]["booting"] == 0
        && view["sandboxes"]["busy"] == 0
        && view["queued"] == 0
        && dirs.is_empty()
        && cgroups.is_empty()
    {
        Ok(())
    } else {
        Err(format!(
            "listed {listed:?}, view {view}, state dirs {dirs:?}, cgroups {cgroups:?}"
        ))
    }
}

async fn wait_nothing_left_of(a: &TestAgent, function: &str, limit: Duration) {
    until(limit, &format!("nothing left of {function}"), || {
        nothing_left_of(a, function)
    })
    .await;
}

/// Poll `check` until it passes; fail with its last complaint after `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let t0 = Instant::now();
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if t0.elapsed() >= limit => panic!("{what}: not within {limit:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnects_mid_invocation_and_mid_cold_start_leak_no_sandbox() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-discon";
    const OK: &str = "rel-ok1";
    common::clear_stale_cgroups(F);
    common::clear_stale_cgroups(OK);
    let a = start_with(
        &[
            func(
                F,
                "cat >/dev/null; sleep 0.6; echo '{\"done\":true}'",
                "timeout_s = 5\n[functions.pool]\nmax_sandboxes = 4\nkeep_alive_s = 1",
            ),
            func(OK, "cat", ""),
        ],
        "",
        |cfg| {
            Arc::new(SlowSpawn {
                real: process_driver(cfg),
                delay: Duration::from_millis(300),
            })
        },
    )
    .await;
    let a = Arc::new(a);

    // Sandboxes of F, listed or starting, never exceed its limit of 4.
    let watching = Arc::new(AtomicBool::new(true));
    let most = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (a, watching, most) = (a.clone(), watching.clone(), most.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Acquire) {
                let v = a.fn_view(F).await;
                let s = &v["sandboxes"];
                let n = ["booting", "idle", "busy", "frozen"]
                    .iter()
                    .map(|k| s[k].as_u64().unwrap() as usize)
                    .sum::<usize>();
                most.fetch_max(n, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Round 1: every client leaves during its cold start (spawns take 300 ms), two of
    // them while still queued for capacity.
    disconnecting_clients(&a, F, 6, Duration::from_millis(150)).await;
    let ok = a.invoke(OK, "{\"n\":1}").await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "{\"n\":1}"), "{ok:?}");
    let ar = &*a;
    until(Duration::from_secs(10), "round 1 recorded", || async move {
        let s = ar.fn_stats(F).await;
        let v = ar.fn_view(F).await;
        if s["invocations"] == 6 && v["sandboxes"]["busy"] == 0 && v["queued"] == 0 {
            Ok(())
        } else {
            Err(format!(
                "abandoned invocations not finished and recorded: {s} {v}"
            ))
        }
    })
    .await;

    // Round 2: the clients leave mid-invocation (warm sandboxes, handler sleeping).
    disconnecting_clients(&a, F, 6, Duration::from_millis(150)).await;
    let ok = a.invoke(OK, "{\"n\":2}").await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "{\"n\":2}"), "{ok:?}");
    until(Duration::from_secs(10), "round 2 recorded", || async move {
        let s = ar.fn_stats(F).await;
        if s["invocations"] == 12 {
            Ok(())
        } else {
            Err(format!(
                "abandoned invocations not finished and recorded: {s}"
            ))
        }
    })
    .await;

    // Once idle past keep-alive, every sandbox of F is reaped: nothing stays busy,
    // booting or unlisted.
    wait_nothing_left_of(&a, F, Duration::from_secs(10)).await;
    watching.store(false, Ordering::Release);
    watcher.await.unwrap();
    let most = most.load(Ordering::Acquire);
    assert!(most <= 4, "{most} sandboxes of {F} against a limit of 4");

    // The clients saw nothing; the agent ran and recorded all twelve.
    let s = a.fn_stats(F).await;
    assert_eq!(s["invocations"], 12, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["timeouts"], 0, "{s}");
    let s = a.fn_stats(OK).await;
    assert_eq!(s["invocations"], 2, "{s}");

    let mut a = Arc::try_unwrap(a)
        .ok()
        .expect("no other users of the agent");
    halt_leaving_nothing(&mut a, &[F, OK]).await;
}

/// Shut the agent down (bounded) and check nothing of `functions` is left on disk.
async fn halt_leaving_nothing(a: &mut TestAgent, functions: &[&str]) {
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), a.halt())
        .await
        .expect("agent shutdown hung");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    let dirs = a.leftover_state_dirs();
    let cgroups: Vec<String> = functions.iter().flat_map(|f| leftover_cgroups(f)).collect();
    assert!(
        dirs.is_empty() && cgroups.is_empty(),
        "left after shutdown: state dirs {dirs:?}, cgroups {cgroups:?}"
    );
}

/// An event of nearly the largest size: far more than a socket buffer holds, so writing
/// it to a sandbox that does not read blocks.
fn big_event() -> String {
    format!("\"{}\"", "x".repeat(wire::MAX_PAYLOAD - 64))
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> (u16, String, Duration) {
    let t0 = Instant::now();
    let r = client.post(url).body(body).send().await;
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            (status, body, t0.elapsed())
        }
        Err(e) => (0, format!("{e}"), t0.elapsed()),
    }
}

async fn gone(a: &TestAgent, id: &str) -> Result<(), String> {
    let listed = a.live_ids().await.iter().any(|l| l == id);
    let dir = a.leftover_state_dirs().iter().any(|d| d == id);
    let cgroups = leftover_cgroups(id);
    if !listed && !dir && cgroups.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{id}: listed {listed}, state dir {dir}, cgroups {cgroups:?}"
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_sandbox_cannot_hang_its_invocation_the_reaper_or_shutdown() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-stop";
    const IDLE: &str = "rel-stopidle";
    const OK: &str = "rel-ok2";
    for f in [F, IDLE, OK] {
        common::clear_stale_cgroups(f);
    }
    let mut a = start_with(
        &[
            func(F, "cat >/dev/null; echo '{}'", "timeout_s = 1"),
            func(IDLE, "cat", "[functions.pool]\nkeep_alive_s = 0.3"),
            func(OK, "cat", ""),
        ],
        "",
        process_driver,
    )
    .await;
    let patient = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = invoke_url(&a, F);

    // A warm sandbox whose processes are then stopped: it reads nothing any more.
    let warm = a.invoke(F, "{}").await;
    assert_eq!(warm.status, 200, "{warm:?}");
    let ok = a.invoke(OK, "{}").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(common::stop_sandbox(&warm.sandbox) >= 2);

    // A 1 MB event cannot be written to it. The invocation ends by its timeout plus a
    // second with a timeout error, while another function keeps serving.
    let big = tokio::spawn({
        let (client, url) = (patient.clone(), url.clone());
        async move { post(&client, &url, big_event()).await }
    });
    for i in 0..5 {
        let t0 = Instant::now();
        let r = a.invoke(OK, &format!("{{\"i\":{i}}}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{OK} stalled");
    }
    let (status, body, took) = big.await.unwrap();
    assert!(
        took < Duration::from_secs(2),
        "the invocation took {took:?} (timeout 1 s): {status} {body}"
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["errorType"], "Sandbox.Timedout", "{v}");
    assert!(
        v["errorMessage"].as_str().unwrap().contains("1.00 seconds"),
        "{v}"
    );
    // The stopped sandbox is ended and nothing of it is left.
    let ar = &a;
    let id = warm.sandbox.clone();
    until(Duration::from_secs(5), "stopped sandbox ended", || {
        let id = id.clone();
        async move { gone(ar, &id).await }
    })
    .await;

    // A stopped idle sandbox is reaped like any other.
    let idle = a.invoke(IDLE, "{}").await;
    assert_eq!(idle.status, 200, "{idle:?}");
    assert!(common::stop_sandbox(&idle.sandbox) >= 2);
    wait_nothing_left_of(&a, IDLE, Duration::from_secs(5)).await;
    let r = a.invoke(OK, "{}").await;
    assert_eq!((r.status, r.cold), (200, false), "{r:?}");

    let s = a.fn_stats(F).await;
    assert_eq!(
        (s["invocations"].as_u64(), s["timeouts"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    let s = a.fn_stats(OK).await;
    assert_eq!(s["invocations"], 7, "{s}");

    // Shutdown while an invocation is stuck writing to a stopped sandbox: it completes
    // promptly, the invocation ends with an error, nothing is left.
    let warm = a.invoke(F, "{}").await;
    assert_eq!(warm.status, 200, "{warm:?}");
    assert!(common::stop_sandbox(&warm.sandbox) >= 2);
    let stuck = tokio::spawn({
        let (client, url) = (patient.clone(), url.clone());
        async move { post(&client, &url, big_event()).await }
    });
    let ar = &a;
    until(
        Duration::from_secs(5),
        "invocation in flight",
        || async move {
            let v = ar.fn_view(F).await;
            if v["sandboxes"]["busy"] == 1 {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await;
    halt_leaving_nothing(&mut a, &[F, IDLE, OK]).await;
    let (status, body, took) = stuck.await.unwrap();
    assert!(
        took < Duration::from_secs(2),
        "the stuck invocation took {took:?}: {status} {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_flood_from_a_handler_keeps_agent_memory_bounded() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-console";
    const OK: &str = "rel-ok4";
    for f in [F, OK] {
        common::clear_stale_cgroups(f);
    }
    // Handlers run as root in the sandbox: they can write to the probe's own stderr,
    // which the agent reads. 128 MiB without a newline, then many long lines.
    let flood = "cat >/dev/null\n\
                 head -c 134217728 /dev/zero | tr '\\0' x > /proc/1/fd/2\n\
                 head -c 16777216 /dev/zero | tr '\\0' y | fold -w 65536 > /proc/1/fd/2\n\
                 echo '{\"flooded\":true}'";
    let mut a = start_with(
        &[func(F, flood, "timeout_s = 20"), func(OK, "cat", "")],
        "",
        process_driver,
    )
    .await;
    let ok = a.invoke(OK, "{}").await;
    assert_eq!(ok.status, 200, "{ok:?}");

    let before = common::vm_rss_bytes();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(before));
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
    let r = a.invoke(F, "{}").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "{\"flooded\":true}\n"),
        "{r:?}"
    );
    // Each write returned once the agent had read all but a pipe buffer of it.
    sampling.store(false, Ordering::Release);
    sampler.await.unwrap();
    let grew = peak.load(Ordering::Acquire).saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "agent memory grew by {} MiB reading a console flood",
        grew >> 20
    );
    // The cut lines are counted once the agent has read to their ends.
    let ar = &a;
    until(
        Duration::from_secs(10),
        "cut console lines counted",
        || async move {
            let m = ar.agent.metrics().to_json();
            match m["console_lines_cut"].as_u64() {
                Some(n) if n >= 2 => Ok(()),
                _ => Err(format!("{m}")),
            }
        },
    )
    .await;
    let ok = a.invoke(OK, "{}").await;
    assert_eq!((ok.status, ok.cold), (200, false), "{ok:?}");
    let s = a.fn_stats(F).await;
    assert_eq!(
        (s["invocations"].as_u64(), s["errors"].as_u64()),
        (Some(1), Some(0)),
        "{s}"
    );
    halt_leaving_nothing(&mut a, &[F, OK]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_sandbox_the_reaper_is_already_ending() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-twice";
    const TICK: &str = "rel-tick";
    for f in [F, TICK] {
        common::clear_stale_cgroups(f);
    }
    // TICK is never invoked: its short keep-alive makes the reaper run every 25 ms.
    let mut a = start_with(
        &[
            func(F, "cat", ""),
            func(TICK, "cat", "[functions.pool]\nkeep_alive_s = 0.1"),
        ],
        "",
        |cfg| {
            Arc::new(SlowTeardown {
                real: process_driver(cfg),
            })
        },
    )
    .await;
    let r = a.invoke(F, "{}").await;
    assert_eq!(r.status, 200, "{r:?}");
    // Shutdown asks the probe to end; its link closes; the reaper finds the idle sandbox
    // dead and ends it too. Whoever ends it, shutdown returns only once it is gone, and
    // it is ended (and counted) once.
    halt_leaving_nothing(&mut a, &[F, TICK]).await;
    let m = a.agent.metrics().to_json();
    assert_eq!(m["sandboxes_ended"], 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_that_exits_while_idle_is_not_handed_the_next_invocation() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-idle-exit";
    common::clear_stale_cgroups(F);
    // A persistent runtime that answers once, then exits 1 while its sandbox is idle.
    let mut a = common::start(
        &[func(
            F,
            "echo ready; read l; echo '{\"once\":true}'; exit 1",
            "kind = \"persistent\"",
        )],
        "",
    )
    .await;
    let first = a.invoke(F, "{}").await;
    assert_eq!(
        (first.status, first.body.as_str()),
        (200, "{\"once\":true}")
    );
    // The pool notices the exit by itself: the dead sandbox leaves the list.
    let gone = first.sandbox.clone();
    let ar = &a;
    until(
        Duration::from_secs(5),
        "the dead runtime's sandbox leaves the pool",
        || {
            let gone = gone.clone();
            async move {
                let ids = ar.live_ids().await;
                if ids.contains(&gone) {
                    Err(format!("still listed: {ids:?}"))
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
    // The next invocation gets a healthy sandbox, not "runtime exited before this invoke".
    let next = a.invoke(F, "{}").await;
    assert_eq!(
        (
            next.status,
            next.function_error.as_deref(),
            next.body.as_str()
        ),
        (200, None, "{\"once\":true}"),
        "{next:?}"
    );
    assert!(next.cold && next.sandbox != gone, "{next:?}");
    halt_leaving_nothing(&mut a, &[F]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_killed_agent_are_swept_when_the_next_one_starts() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-swept";
    common::clear_stale_cgroups(F);
    let ids = [format!("{F}-dead0001"), format!("{F}-dead0002")];
    let orphan = Arc::new(std::sync::Mutex::new(None::<std::process::Child>));
    // What `kill -9` of an agent leaves on its state dir: two sandbox dirs, the cgroup of
    // one with a process still in it, and the lock file (the lock itself died with it).
    let a = start_with(&[func(F, "cat", "")], "", |cfg| {
        for id in &ids {
            std::fs::create_dir_all(cfg.state_dir.join("sandboxes").join(id).join("root")).unwrap();
        }
        std::fs::write(cfg.state_dir.join("agent.lock"), "4194303\n").unwrap();
        let cg = host_agent::cgroup::Cgroups::detect("sandscope")
            .unwrap()
            .create(
                &ids[0],
                host_agent::cgroup::Limits {
                    memory_bytes: 64 << 20,
                    cpus: 1.0,
                    pids: 16,
                },
            )
            .unwrap();
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        for p in cg.procs_files() {
            std::fs::write(p, child.id().to_string()).unwrap();
        }
        *orphan.lock().unwrap() = Some(child);
        process_driver(cfg)
    })
    .await;
    let ar = &a;
    until(
        Duration::from_secs(5),
        "the leftovers swept",
        || async move {
            let m = ar.get("/v1/stats").await["agent"].clone();
            let (dirs, cgroups) = (ar.leftover_state_dirs(), leftover_cgroups(F));
            if m["leftover_sweep_done"] == 1 && dirs.is_empty() && cgroups.is_empty() {
                Ok(())
            } else {
                Err(format!("stats {m}, dirs {dirs:?}, cgroups {cgroups:?}"))
            }
        },
    )
    .await;
    assert_eq!(a.get("/v1/stats").await["agent"]["leftovers_swept"], 2);
    let mut child = orphan.lock().unwrap().take().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the orphan was killed: {status:?}");
    // The new agent serves as usual, and its own sandbox is not taken for a leftover.
    let r = a.invoke(F, "{}").await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut a = a;
    halt_leaving_nothing(&mut a, &[F]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_the_probe_drops_under_its_rate_limit_are_counted_in_stats() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-log-flood";
    const LINES: u64 = 30_000;
    common::clear_stale_cgroups(F);
    // Three times the probe's 10 000 lines/s, written in far less than a second.
    let mut a = common::start(
        &[func(
            F,
            "cat >/dev/null; yes x | head -n 30000 >&2; echo '{}'",
            "",
        )],
        "",
    )
    .await;
    let r = a.invoke(F, "{}").await;
    assert_eq!(r.status, 200, "{r:?}");
    let ar = &a;
    until(
        Duration::from_secs(5),
        "dropped lines counted",
        || async move {
            let m = ar.get("/v1/stats").await["agent"].clone();
            let (got, dropped) = (
                m["log_lines"].as_u64().unwrap(),
                m["log_lines_dropped"].as_u64().unwrap_or(0),
            );
            // Every line either arrived or was counted as dropped.
            if dropped > 0 && got + dropped >= LINES {
                Ok(())
            } else {
                Err(format!("{m}"))
            }
        },
    )
    .await;
    halt_leaving_nothing(&mut a, &[F]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trickling_its_headers_is_cut_off() {
    if !common::can_run() {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const F: &str = "rel-slowloris";
    let mut a = common::start(&[func(F, "cat", "")], "").await;
    let addr = a.url.trim_start_matches("http://").to_string();
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // One header byte every 200 ms, never the blank line that ends them.
    let t0 = Instant::now();
    let limit = host_agent::api::HEADER_READ_TIMEOUT + Duration::from_secs(3);
    let mut buf = [0u8; 512];
    let closed = loop {
        if t0.elapsed() > limit {
            break false;
        }
        if c.write_all(b"X").await.is_err() {
            break true;
        }
        // A 408 before the close is fine; a read that times out means still open.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await
        {
            break true;
        }
    };
    assert!(closed, "still connected after {:?}", t0.elapsed());
    // Others are served meanwhile and after.
    let r = a.invoke(F, "{}").await;
    assert_eq!(r.status, 200, "{r:?}");
    halt_leaving_nothing(&mut a, &[F]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_killed_after_a_timeout_is_not_a_protocol_error() {
    if !common::can_run() {
        return;
    }
    const F: &str = "rel-killed-no-error";
    common::clear_stale_cgroups(F);
    let mut a = common::start(&[func(F, "cat", "timeout_s = 1")], "").await;
    let warm = a.invoke(F, "{}").await;
    assert_eq!(warm.status, 200, "{warm:?}");
    // Stopped, it never reads the next invoke: that ends by the agent's deadline, and the
    // agent kills the sandbox with the invoke still unread in its socket.
    assert!(common::stop_sandbox(&warm.sandbox) >= 2);
    let r = a.invoke(F, "{}").await;
    assert!(r.body.contains("Sandbox.Timedout"), "{r:?}");
    wait_nothing_left_of(&a, F, Duration::from_secs(10)).await;
    let m = a.get("/v1/stats").await["agent"].clone();
    assert_eq!(
        (m["sandboxes_ended"].as_u64(), m["link_errors"].as_u64()),
        (Some(1), Some(0)),
        "{m}"
    );
    halt_leaving_nothing(&mut a, &[F]).await;
}
