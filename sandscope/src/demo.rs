//! `sandscope demo`: start an agent in-process with the example functions, drive a
//! workload through its real HTTP API (cold starts, a burst, warm invocations), and
//! print what an operator would want to see.

use crate::client::{self, Reply};
use crate::{load_config, render, DemoArgs};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::process::ExitCode;
use std::sync::Arc;

/// Run the demo.
pub async fn run(a: DemoArgs) -> Result<ExitCode> {
    let state_dir =
        host_agent::config::default_state_dir().join(format!("demo-{}", std::process::id()));
    let mut cfg = load_config(
        a.config.as_ref(),
        Some(state_dir.clone()),
        a.probe.clone(),
        Some(a.driver),
        Some("127.0.0.1:0".parse().expect("static address")),
    )?;
    if a.kernel.is_some() {
        cfg.vm.kernel = a.kernel.clone();
    }
    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .context("binding the demo agent")?;
    let addr = listener.local_addr()?;
    let agent = match host_agent::Agent::start(cfg).await {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&state_dir);
            return Err(e).context("the demo could not start an agent");
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(host_agent::api::serve(agent.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{addr}");
    let result = drive(&a, &agent, &url).await;
    let _ = stop_tx.send(());
    let _ = server.await;
    agent.shutdown().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    result
}

async fn drive(a: &DemoArgs, agent: &Arc<host_agent::Agent>, url: &str) -> Result<ExitCode> {
    let (driver, why) = agent.driver();
    let functions: Vec<String> = agent
        .functions_view()
        .into_iter()
        .map(|f| f.spec.name)
        .collect();
    if functions.is_empty() {
        anyhow::bail!("the configuration has no functions to demo");
    }
    if !a.json {
        println!("sandscope demo");
        println!("  driver: {driver}");
        println!("  why:    {why}");
        println!("  agent:  {url} (in-process, real HTTP API)");
        println!("  functions: {}\n", functions.join(", "));
    }
    let burst_fn = functions[0].clone();
    let burst_count = u64::from(a.burst) * 2;
    let total = functions.len() as u64 + burst_count + u64::from(a.warm) * functions.len() as u64;
    let pb = ProgressBar::with_draw_target(
        Some(total),
        if a.json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:<34} [{bar:30}] {pos}/{len} ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let tick: Arc<dyn Fn() + Send + Sync> = {
        let pb = pb.clone();
        Arc::new(move || pb.inc(1))
    };
    let c = client::http();
    let mut replies: Vec<(String, &'static str, Result<Reply>)> = Vec::new();

    for f in &functions {
        pb.set_message(format!("cold start: {f}"));
        let r = client::invoke_once(&c, url, f, r#"{"phase":"cold"}"#).await;
        pb.inc(1);
        replies.push((f.clone(), "cold", r));
    }
    pb.set_message(format!("burst: {burst_fn} x{burst_count} @ {}", a.burst));
    for r in client::run_many(
        &c,
        url,
        &burst_fn,
        r#"{"phase":"burst"}"#,
        burst_count,
        a.burst.into(),
        Some(tick.clone()),
    )
    .await
    {
        replies.push((burst_fn.clone(), "burst", r));
    }
    for f in &functions {
        pb.set_message(format!("warm: {f} x{}", a.warm));
        for r in client::run_many(
            &c,
            url,
            f,
            r#"{"phase":"warm"}"#,
            a.warm.into(),
            1,
            Some(tick.clone()),
        )
        .await
        {
            replies.push((f.clone(), "warm", r));
        }
    }
    pb.finish_and_clear();

    let failures: Vec<String> = replies
        .iter()
        .filter_map(|(f, phase, r)| match r {
            Ok(r) if r.status == 200 && r.function_error.is_none() => None,
            Ok(r) => Some(format!(
                "{f} ({phase}): HTTP {} {}: {}",
                r.status,
                r.function_error.clone().unwrap_or_default(),
                r.body.trim()
            )),
            Err(e) => Some(format!("{f} ({phase}): {e:#}")),
        })
        .collect();
    let first_cold: Vec<(String, bool, String)> = replies
        .iter()
        .filter(|(_, p, _)| *p == "cold")
        .filter_map(|(f, _, r)| {
            r.as_ref()
                .ok()
                .map(|r| (f.clone(), r.cold, r.sandbox.clone()))
        })
        .collect();

    let stats = client::get_json(url, "/v1/stats").await?;
    let sandboxes = client::get_json(url, "/v1/sandboxes").await?;
    let first_sb = sandboxes["sandboxes"]
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .unwrap_or(Value::Null);
    let detail = match first_sb.get("id").and_then(Value::as_str) {
        Some(id) => client::get_json(url, &format!("/v1/sandboxes/{id}"))
            .await
            .ok(),
        None => None,
    };

    if a.json {
        let doc = serde_json::json!({
            "driver": driver,
            "driver_reason": why,
            "probe": first_sb,
            "functions": stats["functions"],
            "telemetry": stats["telemetry"],
            "packing": sandboxes["hosts"],
            "sandboxes": sandboxes["sandboxes"],
            "workload": {
                "invocations": replies.len(),
                "failures": failures,
                "first_invocations": first_cold.iter().map(|(f, c, s)| serde_json::json!({"function": f, "cold": c, "sandbox": s})).collect::<Vec<_>>(),
            },
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("Workload: {} invocations ({} cold-start probes, a burst of {burst_count} on {burst_fn} at concurrency {}, {} warm per function)", replies.len(), functions.len(), a.burst, a.warm);
        for (f, cold, sb) in &first_cold {
            println!(
                "  first {f} invocation: {} in sandbox {sb}",
                if *cold { "cold" } else { "warm" }
            );
        }
        println!();
        if !first_sb.is_null() {
            println!("What the probe reports from inside:");
            print!("{}", render::probe(&first_sb));
            println!();
        }
        print!("{}", render::stats(&stats));
        println!();
        print!("{}", render::sandboxes(&sandboxes));
        if let Some(d) = detail {
            let logs = d["logs"].as_array().cloned().unwrap_or_default();
            if !logs.is_empty() {
                println!(
                    "\nRecent function logs from {}:",
                    d["id"].as_str().unwrap_or("")
                );
                for l in logs.iter().rev().take(3).rev() {
                    println!(
                        "  [{}] {}",
                        l["stream"].as_str().unwrap_or(""),
                        l["line"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    if failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("\n{} invocation(s) failed:", failures.len());
        for f in failures.iter().take(10) {
            eprintln!("  {f}");
        }
        Ok(ExitCode::FAILURE)
    }
}
