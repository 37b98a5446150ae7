//! Benchmarks that run the agent in-process: cold start (with the peer runtimes side by
//! side), warm invoke round trips (agent-side and over HTTP), throughput.

use crate::floor::{self, Placement};
use crate::stats::{ms, usf, Summary, Table, SUMMARY_HEADER};
use crate::sys;
use crate::work::Work;
use anyhow::{bail, Context};
use host_agent::{Agent, InvokeOptions};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Same runtime shape as `sandscope agent`: multi-thread, one worker per CPU.
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn us_of(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Wall time of one spawn → exit of `cmd`, which must succeed.
fn time_cmd(cmd: &mut Command) -> anyhow::Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let o = cmd.output()?;
    let d = t.elapsed();
    if !o.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(d)
}

/// What one try of a peer runtime said.
fn try_once(cmd: &mut Command) -> Result<(), String> {
    let o = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        let mut msg = String::from_utf8_lossy(&o.stderr).trim().to_string();
        if msg.is_empty() {
            msg = String::from_utf8_lossy(&o.stdout).trim().to_string();
        }
        Err(format!("{} — {msg}", o.status))
    }
}

async fn wait_idle(agent: &Arc<Agent>, want: &[(&str, usize)]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = agent.functions_view();
        let ok = want.iter().all(|(name, n)| {
            v.iter()
                .find(|f| f.spec.name == *name)
                .is_some_and(|f| f.sandboxes.idle + f.sandboxes.frozen >= *n)
        });
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pre-warmed sandboxes not idle within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Default)]
struct ColdSeries {
    init: Vec<f64>,
    spawn: Vec<f64>,
    probe_init: Vec<f64>,
    runtime_init: Vec<f64>,
    invoke: Vec<f64>,
    total: Vec<f64>,
    client: Vec<f64>,
    teardown: Vec<f64>,
    lifecycle: Vec<f64>,
}

async fn cold_once(agent: &Arc<Agent>, f: &str, s: &mut ColdSeries) -> anyhow::Result<()> {
    let t = Instant::now();
    let inv = agent
        .invoke(f, b"{}".to_vec(), InvokeOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("cold invoke of {f}: {e}"))?;
    let client = t.elapsed();
    if !inv.cold {
        bail!("invoke of {f} was not cold");
    }
    if inv.status != host_agent::Status::Ok {
        bail!("cold invoke of {f}: {:?} {}", inv.status, inv.error_message);
    }
    let ph = |k: &str| inv.phases.get(k).copied().unwrap_or(0) as f64;
    s.init.push(inv.init_us.unwrap_or(0) as f64);
    s.spawn.push(ph("spawn"));
    s.probe_init.push(ph("probe_init"));
    s.runtime_init.push(ph("runtime_init"));
    s.invoke.push(ph("invoke"));
    s.total.push(inv.total_us as f64);
    s.client.push(us_of(client));
    // Let the agent hand the sandbox back to the pool, then end it (and every other).
    tokio::time::sleep(Duration::from_millis(2)).await;
    let t = Instant::now();
    agent.shutdown().await;
    let td = t.elapsed();
    s.teardown.push(us_of(td));
    s.lifecycle.push(us_of(client + td));
    Ok(())
}

/// Cold start: sandscope vs direct exec, bwrap, runc (and crun where it runs).
pub fn coldstart(work: &Work, runs: usize) -> anyhow::Result<Vec<Table>> {
    let bin = work.true_bin.clone();
    let mut refusals = Vec::new();
    // The peers.
    let mut peers: Vec<(String, Box<dyn Fn() -> Command>)> = Vec::new();
    {
        let b = bin.clone();
        peers.push((
            "direct exec, no sandbox".into(),
            Box::new(move || Command::new(&b)),
        ));
    }
    {
        let b = bin.clone();
        let mk = move || {
            let mut c = Command::new("bwrap");
            c.args([
                "--ro-bind",
                "/",
                "/",
                "--unshare-all",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
            ])
            .arg(&b);
            c
        };
        match try_once(&mut mk()) {
            Ok(()) => peers.push(("bwrap (--unshare-all)".into(), Box::new(mk))),
            Err(e) => refusals.push(format!("bwrap: {e}")),
        }
    }
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for rt in ["crun", "runc"] {
        let bundle = match work.oci_bundle(rt) {
            Ok(b) => b,
            Err(e) => {
                refusals.push(format!("{rt}: {e:#}"));
                continue;
            }
        };
        let version = Command::new(rt)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let pid = std::process::id();
        let variants: Vec<(&str, Vec<&str>)> = if rt == "crun" {
            vec![
                ("", vec![]),
                (
                    " --cgroup-manager=disabled",
                    vec!["--cgroup-manager=disabled"],
                ),
            ]
        } else {
            vec![("", vec![])]
        };
        let mut chosen = None;
        for (label, global) in variants {
            let (b, s, g, r) = (bundle.clone(), seq.clone(), global.clone(), rt);
            let mk = move || {
                let n = s.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut c = Command::new(r);
                c.args(&g)
                    .arg("run")
                    .arg("--bundle")
                    .arg(&b)
                    .arg(format!("ssbench-{pid}-{n}"));
                c
            };
            match try_once(&mut mk()) {
                Ok(()) => {
                    chosen = Some((format!("{rt}{label} ({version})"), mk));
                    break;
                }
                Err(e) => refusals.push(format!("`{rt}{label} run` ({version}): {e}")),
            }
        }
        if let Some((name, mk)) = chosen {
            peers.push((name, Box::new(mk)));
        }
    }

    let rt = runtime()?;
    let mut peer_times: Vec<Vec<f64>> = vec![Vec::new(); peers.len()];
    let mut cat = ColdSeries::default();
    let mut noop = ColdSeries::default();
    let load0 = sys::loadavg();
    rt.block_on(async {
        let agent = Agent::start(work.agent_config("cold", 4, 0, 0)?)
            .await
            .context("starting the agent")?;
        // One untimed round of everything to warm page caches.
        for (_, mk) in &peers {
            time_cmd(&mut mk())?;
        }
        cold_once(&agent, "cat", &mut ColdSeries::default()).await?;
        cold_once(&agent, "noop", &mut ColdSeries::default()).await?;
        // Interleaved, so load changes hit every contender alike.
        for _ in 0..runs {
            for (i, (_, mk)) in peers.iter().enumerate() {
                peer_times[i].push(us_of(time_cmd(&mut mk())?));
            }
            cold_once(&agent, "cat", &mut cat).await?;
            cold_once(&agent, "noop", &mut noop).await?;
        }
        agent.shutdown().await;
        anyhow::Ok(())
    })?;
    drop(rt);
    let load1 = sys::loadavg();

    let mut t = Table::new(
        format!("Cold start, {runs} interleaved runs each (wall time)"),
        &SUMMARY_HEADER,
    );
    let peer_sums: Vec<(String, Summary)> = peers
        .iter()
        .zip(peer_times)
        .map(|((n, _), v)| (n.clone(), Summary::of(v)))
        .collect();
    for (n, s) in &peer_sums {
        t.summary_row(&format!("{n}: spawn → exit"), s, ms);
    }
    let rows: [(&str, &ColdSeries); 2] = [("cat (exec)", &cat), ("noop (persistent)", &noop)];
    for (f, s) in rows {
        t.summary_row(
            &format!("sandscope {f}: spawn → Hello + Ready"),
            &Summary::of(s.init.clone()),
            ms,
        );
    }
    for (f, s) in rows {
        t.summary_row(
            &format!("sandscope {f}: cold invoke (caller)"),
            &Summary::of(s.client.clone()),
            ms,
        );
    }
    for (f, s) in rows {
        t.summary_row(
            &format!("sandscope {f}: cold invoke + teardown"),
            &Summary::of(s.lifecycle.clone()),
            ms,
        );
    }
    t.note(format!("Load average before/after: {load0} / {load1}."));
    t.note(
        "Peers: spawn of the runtime → its exit after running a static `exit 0` binary \
         (includes namespace/container setup and teardown)."
            .to_string(),
    );
    t.note(
        "sandscope spawn → Hello + Ready = the cold invoke's init phases (spawn + probe_init + \
         runtime_init): the probe is PID 1 of new pid/mount/uts/ipc/net namespaces in its own \
         cgroups, has built and pivoted into its root, connected, and the handler runtime is \
         ready. No exit included. Cold invoke (caller) = Agent::invoke measured by the caller: \
         boot + the first invocation. + teardown = plus Agent::shutdown (Shutdown frame, wait \
         for exit, cgroup removal), the closest like-for-like with the peers' spawn → exit."
            .to_string(),
    );
    if !refusals.is_empty() {
        for r in &refusals {
            t.note(format!("Refused: {r}"));
        }
    }

    let mut p = Table::new(
        "sandscope cold-start phases (median / p90, µs)",
        &[
            "function",
            "spawn",
            "probe_init",
            "runtime_init",
            "first invoke",
            "agent total",
            "teardown",
        ],
    );
    for (f, s) in rows {
        let c = |v: &Vec<f64>| {
            let s = Summary::of(v.clone());
            format!("{:.0} / {:.0}", s.p50, s.p90)
        };
        p.row(vec![
            f.to_string(),
            c(&s.spawn),
            c(&s.probe_init),
            c(&s.runtime_init),
            c(&s.invoke),
            c(&s.total),
            c(&s.teardown),
        ]);
    }
    p.note(
        "spawn = driver called → fork/exec of the probe returned (cgroups created and joined, \
         namespaces unshared); probe_init = → Hello received (fork-init, root build + pivot, \
         procinfo, connect); runtime_init = Hello → Ready (persistent: runtime printed `ready`)."
            .to_string(),
    );

    let mut g = Table::new(
        "Cold-start goals (medians)",
        &["comparison", "sandscope", "peer", "ratio", "goal", "met"],
    );
    let init_cat = Summary::of(cat.init.clone()).p50;
    let life_cat = Summary::of(cat.lifecycle.clone()).p50;
    for (n, s) in &peer_sums {
        let (goal, lim) = if n.starts_with("runc") || n.starts_with("crun") {
            ("≤ 0.5x", 0.5)
        } else if n.starts_with("bwrap") {
            ("≤ 1x", 1.0)
        } else {
            continue;
        };
        for (what, v) in [
            ("spawn → Ready", init_cat),
            ("cold invoke + teardown", life_cat),
        ] {
            let r = v / s.p50;
            g.row(vec![
                format!("cat {what} vs {n}"),
                ms(v),
                ms(s.p50),
                format!("{r:.2}x"),
                goal.to_string(),
                if r <= lim { "yes" } else { "no" }.to_string(),
            ]);
        }
    }
    Ok(vec![t, p, g])
}

struct WarmResult {
    placement: &'static str,
    tables_rows: Vec<(String, Summary)>,
    floor: Summary,
    noop_p50: f64,
    http_p50: Option<f64>,
}

async fn warm_series(
    agent: &Arc<Agent>,
    f: &str,
    n: usize,
) -> anyhow::Result<(Summary, Summary, Summary)> {
    let warm = (n / 20).max(10);
    let mut client = Vec::with_capacity(n);
    let mut total = Vec::with_capacity(n);
    let mut link = Vec::with_capacity(n);
    for i in 0..n + warm {
        let t = Instant::now();
        let inv = agent
            .invoke(f, b"{}".to_vec(), InvokeOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("invoke {f}: {e}"))?;
        let d = t.elapsed();
        if inv.status != host_agent::Status::Ok {
            bail!("invoke {f}: {:?} {}", inv.status, inv.error_message);
        }
        if i >= warm {
            if inv.cold {
                bail!("warm series of {f} hit a cold start");
            }
            client.push(us_of(d));
            total.push(inv.total_us as f64);
            link.push(inv.phases.get("invoke").copied().unwrap_or(0) as f64);
        }
    }
    Ok((Summary::of(client), Summary::of(total), Summary::of(link)))
}

async fn http_series(agent: &Arc<Agent>, n: usize) -> anyhow::Result<Summary> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(host_agent::api::serve(
        agent.clone(),
        listener,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;
    let url = format!("http://{addr}/2015-03-31/functions/noop/invocations");
    let warm = (n / 20).max(10);
    let mut v = Vec::with_capacity(n);
    for i in 0..n + warm {
        let t = Instant::now();
        let r = client.post(&url).body("{}").send().await?;
        let cold = r.headers().get("x-sandscope-coldstart").cloned();
        let status = r.status();
        let _ = r.bytes().await?;
        let d = t.elapsed();
        if !status.is_success() {
            bail!("HTTP invoke: {status}");
        }
        if i >= warm {
            if cold.as_ref().is_some_and(|c| c == "true") {
                bail!("HTTP warm series hit a cold start");
            }
            v.push(us_of(d));
        }
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(Summary::of(v))
}

/// Warm invoke round trips for one placement, with the floor measured right after.
fn warm_one(
    work: &Work,
    pinned: bool,
    invokes: usize,
    http_invokes: usize,
    exec_invokes: usize,
    rounds: usize,
) -> anyhow::Result<WarmResult> {
    let before = sys::affinity();
    if pinned {
        // Threads and processes created from here on (runtime workers, sandboxes) inherit it.
        sys::set_affinity(&[0])?;
    }
    let rt = runtime()?;
    let mut rows = Vec::new();
    let res = rt.block_on(async {
        let agent =
            Agent::start(work.agent_config(if pinned { "warm-pin" } else { "warm" }, 1, 1, 1)?)
                .await
                .context("starting the agent")?;
        wait_idle(&agent, &[("cat", 1), ("noop", 1)]).await?;
        let (c, t, l) = warm_series(&agent, "noop", invokes).await?;
        let noop_p50 = c.p50;
        rows.push(("noop (persistent), Agent::invoke, caller".to_string(), c));
        rows.push(("noop (persistent), agent total_us".to_string(), t));
        rows.push(("noop (persistent), link invoke phase".to_string(), l));
        let mut http_p50 = None;
        if http_invokes > 0 {
            let h = http_series(&agent, http_invokes).await?;
            http_p50 = Some(h.p50);
            rows.push((
                "noop (persistent), HTTP POST via reqwest, loopback".to_string(),
                h,
            ));
        }
        if exec_invokes > 0 {
            let (c, _, l) = warm_series(&agent, "cat", exec_invokes).await?;
            rows.push(("cat (exec), Agent::invoke, caller".to_string(), c));
            rows.push(("cat (exec), link invoke phase".to_string(), l));
        }
        agent.shutdown().await;
        anyhow::Ok((noop_p50, http_p50))
    });
    drop(rt);
    sys::set_affinity(&before)?;
    let (noop_p50, http_p50) = res?;
    let floor = floor::pingpong(
        rounds,
        if pinned {
            Placement::SameCore
        } else {
            Placement::Unpinned
        },
    )?;
    Ok(WarmResult {
        placement: if pinned {
            "agent + sandbox pinned to CPU 0"
        } else {
            "unpinned"
        },
        tables_rows: rows,
        floor,
        noop_p50,
        http_p50,
    })
}

/// Warm invoke benchmarks for the requested placements.
pub fn warm(
    work: &Work,
    placements: &[bool],
    invokes: usize,
    http_invokes: usize,
    exec_invokes: usize,
    rounds: usize,
) -> anyhow::Result<Vec<Table>> {
    let mut out = Vec::new();
    let mut goals = Table::new(
        "Warm persistent invoke vs the floor (same placement, medians)",
        &[
            "placement",
            "floor p50",
            "Agent::invoke p50",
            "ratio",
            "HTTP p50",
            "HTTP ratio",
            "goal ≤ 2x met",
        ],
    );
    for &pinned in placements {
        let load0 = sys::loadavg();
        let r = warm_one(work, pinned, invokes, http_invokes, exec_invokes, rounds)?;
        let parts = decompose(work, invokes.min(20_000), pinned)?;
        let load1 = sys::loadavg();
        let mut t = Table::new(
            format!("Warm invoke round trip — {}", r.placement),
            &SUMMARY_HEADER,
        );
        for (label, s) in &r.tables_rows {
            t.summary_row(label, s, usf);
        }
        t.summary_row(
            &format!("floor: Unix-socket ping-pong, {rounds} round trips"),
            &r.floor,
            usf,
        );
        t.note(format!("Load average before/after: {load0} / {load1}."));
        out.push(t);
        out.push(parts);
        let ratio = r.noop_p50 / r.floor.p50;
        goals.row(vec![
            r.placement.to_string(),
            usf(r.floor.p50),
            usf(r.noop_p50),
            format!("{ratio:.2}x"),
            r.http_p50.map(usf).unwrap_or_else(|| "-".into()),
            r.http_p50
                .map(|h| format!("{:.2}x", h / r.floor.p50))
                .unwrap_or_else(|| "-".into()),
            if ratio <= 2.0 { "yes" } else { "no" }.to_string(),
        ]);
    }
    goals.note(
        "Agent::invoke caller = in-process call to reply, sequential (one in flight), payload `{}`. \
         agent total_us = the agent's own request → response figure; link invoke phase = Invoke \
         frame sent → InvokeResult received. Path per invoke: agent → (Unix socket) probe → \
         (pipe) handler → (pipe) probe → (Unix socket) agent: 4 wake-ups vs 2 for the floor."
            .to_string(),
    );
    out.push(goals);
    Ok(out)
}

/// Throughput of warm noop invokes from concurrent callers, telemetry on.
pub fn throughput(
    work: &Work,
    sandboxes: &[usize],
    per_sandbox: usize,
    secs: f64,
) -> anyhow::Result<Vec<Table>> {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut t = Table::new(
        format!("Throughput: warm noop (persistent) invokes, Agent::invoke, {secs:.0} s per row"),
        &[
            "max_sandboxes",
            "callers",
            "invokes",
            "invokes/s",
            "p50",
            "p99",
            "errors",
            "recorded (aggregator)",
            "samples dropped",
            "CPU busy (cores)",
            "agent CPU/invoke",
            "sandboxes CPU/invoke",
        ],
    );
    let load0 = sys::loadavg();
    for &m in sandboxes {
        let rt = runtime()?;
        let row = rt.block_on(async {
            let agent = Agent::start(work.agent_config(&format!("tp{m}"), m, 0, m)?)
                .await
                .context("starting the agent")?;
            wait_idle(&agent, &[("noop", m)]).await?;
            let callers = m * per_sandbox;
            let run = |dur: Duration| {
                let deadline = Instant::now() + dur;
                let tasks: Vec<_> = (0..callers)
                    .map(|_| {
                        let a = agent.clone();
                        tokio::spawn(async move {
                            let mut lat = Vec::new();
                            let mut errs = 0u64;
                            while Instant::now() < deadline {
                                let t = Instant::now();
                                match a
                                    .invoke("noop", b"{}".to_vec(), InvokeOptions::default())
                                    .await
                                {
                                    Ok(i) if i.status == host_agent::Status::Ok => {
                                        lat.push(us_of(t.elapsed()))
                                    }
                                    _ => errs += 1,
                                }
                            }
                            (lat, errs)
                        })
                    })
                    .collect::<Vec<_>>();
                async move {
                    let mut lat = Vec::new();
                    let mut errs = 0;
                    for h in tasks {
                        let (l, e) = h.await.unwrap_or_default();
                        lat.extend(l);
                        errs += e;
                    }
                    (lat, errs)
                }
            };
            run(Duration::from_millis(500)).await;
            let before = agent
                .stats()
                .await
                .functions
                .iter()
                .find(|f| f.name == "noop")
                .map(|f| f.invocations)
                .unwrap_or(0);
            let sb_cpu = |a: &Arc<Agent>| -> u64 {
                a.sandboxes_view()
                    .sandboxes
                    .iter()
                    .map(|s| s.usage.cpu_us)
                    .sum()
            };
            let (s0, a0) = (sb_cpu(&agent), sys::self_cpu_us());
            let j0 = sys::cpu_jiffies();
            let t0 = Instant::now();
            let (lat, errs) = run(Duration::from_secs_f64(secs)).await;
            let el = t0.elapsed();
            let j1 = sys::cpu_jiffies();
            let (s1, a1) = (sb_cpu(&agent), sys::self_cpu_us());
            let snap = agent.stats().await;
            let recorded = snap
                .functions
                .iter()
                .find(|f| f.name == "noop")
                .map(|f| f.invocations)
                .unwrap_or(0)
                - before;
            let dropped = snap.telemetry.dropped.get("samples").copied().unwrap_or(0);
            agent.shutdown().await;
            let s = Summary::of(lat);
            let per = |d: u64| usf(d as f64 / s.n.max(1) as f64);
            anyhow::Ok(vec![
                m.to_string(),
                callers.to_string(),
                s.n.to_string(),
                format!("{:.0}", s.n as f64 / el.as_secs_f64()),
                usf(s.p50),
                usf(s.p99),
                errs.to_string(),
                recorded.to_string(),
                dropped.to_string(),
                format!("{:.2}", sys::busy_cores(j0, j1, nproc)),
                per(a1.saturating_sub(a0)),
                per(s1.saturating_sub(s0)),
            ])
        })?;
        t.row(row);
    }
    t.note(format!(
        "Load average before/after: {load0} / {}.",
        sys::loadavg()
    ));
    t.note(
        "Telemetry on: every invoke records a Sample; the aggregator task drains into \
         hdrhistograms every 20 ms. `recorded` = invocations counted by the aggregator in the \
         timed window (equals `invokes` + errors when nothing is lost). CPU busy = whole machine \
         (/proc/stat), including the other engineer's work. agent CPU = this process \
         (agent + callers + aggregator, getrusage); sandboxes CPU = probe + runtime processes \
         (the agent's per-sandbox usage from procfs), both per invoke."
            .to_string(),
    );
    Ok(vec![t])
}

/// Parts of the warm path measured without the agent and probe: the handler hop alone (a
/// pipe round trip to the noop runtime), and the probe's per-invoke procfs work on it.
pub fn decompose(work: &Work, n: usize, pinned: bool) -> anyhow::Result<Table> {
    use std::io::{BufRead, BufReader, Read, Write};
    let before = sys::affinity();
    if pinned {
        sys::set_affinity(&[0])?;
    }
    let res = (|| {
        let mut child = Command::new(work.code.join("noop"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let mut stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line != "ready\n" {
            bail!("noop said {line:?}");
        }
        let mut hop = Vec::with_capacity(n);
        for i in 0..n + n / 20 {
            line.clear();
            let t = Instant::now();
            stdin.write_all(b"{}\n")?;
            stdout.read_line(&mut line)?;
            if i >= n / 20 {
                hop.push(us_of(t.elapsed()));
            }
        }
        let mut procfs = Vec::with_capacity(n);
        let (clear, stat, status) = (
            format!("/proc/{pid}/clear_refs"),
            format!("/proc/{pid}/stat"),
            format!("/proc/{pid}/status"),
        );
        let mut buf = String::new();
        for _ in 0..n {
            let t = Instant::now();
            std::fs::write(&clear, "5")?;
            for p in [&stat, &stat, &status] {
                buf.clear();
                std::fs::File::open(p)?.read_to_string(&mut buf)?;
            }
            procfs.push(us_of(t.elapsed()));
        }
        drop(stdin);
        let _ = child.wait();
        // The agent reads the sandbox's OOM counter before every invoke (cgroup v1
        // memory.oom_control, v2 memory.events); time the same read on a memory cgroup here.
        let oom_file = [
            "/sys/fs/cgroup/memory/sandscope/memory.oom_control",
            "/sys/fs/cgroup/memory/memory.oom_control",
            "/sys/fs/cgroup/memory.events",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
        let mut oom = Vec::new();
        if let Some(f) = oom_file {
            for _ in 0..n {
                let t = Instant::now();
                let txt = std::fs::read_to_string(f)?;
                std::hint::black_box(txt.lines().find(|l| l.starts_with("oom_kill ")));
                oom.push(us_of(t.elapsed()));
            }
        }
        anyhow::Ok((
            Summary::of(hop),
            Summary::of(procfs),
            Summary::of(oom),
            oom_file,
        ))
    })();
    sys::set_affinity(&before)?;
    let (hop, procfs, oom, oom_file) = res?;
    let mut t = Table::new(
        format!(
            "Warm-path parts without agent or probe — {}",
            if pinned {
                "pinned to CPU 0"
            } else {
                "unpinned"
            }
        ),
        &SUMMARY_HEADER,
    );
    t.summary_row(
        "handler hop: pipe round trip to the noop runtime",
        &hop,
        usf,
    );
    t.summary_row(
        "probe's per-invoke procfs work (clear_refs + 2x stat + status)",
        &procfs,
        usf,
    );
    if let Some(f) = oom_file {
        t.summary_row(
            "agent's per-invoke OOM-counter read (cgroup file)",
            &oom,
            usf,
        );
        t.note(format!("OOM-counter file timed: {f}."));
    }
    Ok(t)
}
