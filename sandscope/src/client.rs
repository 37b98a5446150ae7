//! Talking to a running agent over its HTTP API.

use anyhow::{bail, Context, Result};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where `sandscope invoke/stats/sandboxes` look for an agent by default.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:9000";

/// One invocation's response as a client sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `X-Amz-Function-Error`, if set.
    pub function_error: Option<String>,
    /// Cold start?
    pub cold: bool,
    /// Sandbox id.
    pub sandbox: String,
    /// Body.
    pub body: String,
    /// Client-side latency.
    pub latency: Duration,
}

/// An HTTP client with sane timeouts.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(64)
        .build()
        .expect("building an HTTP client with static settings")
}

fn base(agent: &str) -> String {
    agent.trim_end_matches('/').to_string()
}

/// POST one invocation.
pub async fn invoke_once(
    c: &reqwest::Client,
    agent: &str,
    name: &str,
    payload: &str,
) -> Result<Reply> {
    let url = format!("{}/2015-03-31/functions/{name}/invocations", base(agent));
    let t0 = Instant::now();
    let r = c
        .post(&url)
        .body(payload.to_string())
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the agent at {agent} (is `sandscope agent` running?)")
        })?;
    let h = |k: &str| {
        r.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let status = r.status().as_u16();
    let function_error = h("x-amz-function-error");
    let cold = h("x-sandscope-coldstart").as_deref() == Some("true");
    let sandbox = h("x-sandscope-sandbox-id").unwrap_or_default();
    let body = r.text().await.context("reading the invocation response")?;
    Ok(Reply {
        status,
        function_error,
        cold,
        sandbox,
        body,
        latency: t0.elapsed(),
    })
}

/// `sandscope invoke`.
pub async fn invoke(
    agent: &str,
    name: &str,
    payload: &str,
    count: u64,
    conc: u64,
) -> Result<ExitCode> {
    if serde_json::from_str::<serde_json::Value>(payload).is_err() {
        bail!("--payload is not valid JSON: {payload}");
    }
    let c = http();
    if count == 1 {
        let r = invoke_once(&c, agent, name, payload).await?;
        eprintln!(
            "{} {} sandbox={} {:.2} ms",
            r.status,
            if r.cold { "cold" } else { "warm" },
            if r.sandbox.is_empty() {
                "-"
            } else {
                &r.sandbox
            },
            r.latency.as_secs_f64() * 1000.0
        );
        println!("{}", r.body.trim_end());
        return Ok(if r.status == 200 && r.function_error.is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let results = run_many(&c, agent, name, payload, count, conc, None).await;
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let (mut ok, mut ferr, mut other, mut cold) = (0, 0, 0, 0);
    let mut last_err = None;
    for r in &results {
        match r {
            Ok(r) => {
                h.saturating_record(r.latency.as_micros() as u64);
                cold += r.cold as u64;
                match (r.status, &r.function_error) {
                    (200, None) => ok += 1,
                    (200, Some(_)) => ferr += 1,
                    _ => {
                        other += 1;
                        last_err = Some(format!("HTTP {}: {}", r.status, r.body.trim()));
                    }
                }
            }
            Err(e) => {
                other += 1;
                last_err = Some(format!("{e:#}"));
            }
        }
    }
    println!(
        "{count} invocations of {name} at concurrency {conc}: {ok} ok, {ferr} function errors, {other} failed, {cold} cold"
    );
    println!(
        "client latency: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.9) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
    if let Some(e) = last_err {
        eprintln!("last failure: {e}");
    }
    Ok(if other == 0 && ferr == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Run `count` invocations with `conc` in flight; `tick` is called after each one.
pub async fn run_many(
    c: &reqwest::Client,
    agent: &str,
    name: &str,
    payload: &str,
    count: u64,
    conc: u64,
    tick: Option<Arc<dyn Fn() + Send + Sync>>,
) -> Vec<Result<Reply>> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc.min(count) {
        let (c, agent, name, payload, next, tick) = (
            c.clone(),
            agent.to_string(),
            name.to_string(),
            payload.to_string(),
            next.clone(),
            tick.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                out.push(invoke_once(&c, &agent, &name, &payload).await);
                if let Some(t) = &tick {
                    t();
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(v) => all.extend(v),
            Err(e) => all.push(Err(anyhow::anyhow!("invocation task failed: {e}"))),
        }
    }
    all
}

/// GET a JSON view.
pub async fn get_json(agent: &str, path: &str) -> Result<serde_json::Value> {
    let url = format!("{}{path}", base(agent));
    let r = http().get(&url).send().await.with_context(|| {
        format!("cannot reach the agent at {agent} (is `sandscope agent` running?)")
    })?;
    if !r.status().is_success() {
        bail!(
            "agent answered {} for {path}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    r.json()
        .await
        .with_context(|| format!("agent sent invalid JSON for {path}"))
}

/// `sandscope stats`.
pub async fn stats(agent: &str, json: bool) -> Result<ExitCode> {
    let v = get_json(agent, "/v1/stats").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", crate::render::stats(&v));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sandscope sandboxes`.
pub async fn sandboxes(agent: &str, json: bool) -> Result<ExitCode> {
    let v = get_json(agent, "/v1/sandboxes").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", crate::render::sandboxes(&v));
    }
    Ok(ExitCode::SUCCESS)
}
