//! microVM cold start under the qemu driver: launch → probe Hello of a Linux guest, with
//! the phase breakdown (spawn, vmm_setup, kernel, probe_init), and the first invoke.

use crate::stats::{ms, Summary, Table, SUMMARY_HEADER};
use anyhow::{bail, Context};
use host_agent::config::{AgentConfig, DriverChoice};
use host_agent::{Agent, InvokeOptions};
use std::time::Instant;

/// `runs` cold starts of an exec function in a fresh QEMU microVM each.
pub fn vmboot(runs: usize) -> anyhow::Result<Vec<Table>> {
    let dir = tempfile::Builder::new()
        .prefix("sandscope-vmbench-")
        .tempdir()?;
    let code = dir.path().join("code");
    std::fs::create_dir_all(&code)?;
    let h = code.join("handler.sh");
    std::fs::write(&h, "#!/bin/sh\ncat >/dev/null\necho '{}'\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o755))?;
    let toml = format!(
        "[agent]\nstate_dir = \"{}\"\ndriver = \"qemu\"\nboot_timeout_s = 60\n\n\
         [[functions]]\nname = \"noop\"\nhandler = \"./handler.sh\"\ncode = \"code\"\n\
         memory_mb = 128\ntimeout_s = 30\n",
        dir.path().join("state").display()
    );
    let cfg_path = dir.path().join("sandscope.toml");
    std::fs::write(&cfg_path, toml)?;
    let mut cfg = AgentConfig::load(&cfg_path)?;
    cfg.driver = DriverChoice::Qemu;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = Agent::start(cfg).await.context(
            "starting an agent with the qemu driver (scripts/guest-deps, sandscope image build)",
        )?;
        let (_, why) = agent.driver();
        // The cold-start phases, in timeline order (no queue or thaw in this bench).
        let names = &host_agent::recorder::PHASES[2..];
        let mut series: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
        let (mut hello, mut total, mut client) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            let inv = agent
                .invoke("noop", b"{}".to_vec(), InvokeOptions::default())
                .await
                .map_err(|e| anyhow::anyhow!("cold invoke: {e}"))?;
            let c = t.elapsed();
            if !inv.cold || inv.status != host_agent::Status::Ok {
                bail!(
                    "expected a cold success: {:?} {}",
                    inv.status,
                    inv.error_message
                );
            }
            let ph = |k: &str| inv.phases.get(k).copied().unwrap_or(0) as f64;
            for (i, n) in names.iter().enumerate() {
                series[i].push(ph(n));
            }
            hello.push(ph("spawn") + ph("vmm_setup") + ph("kernel") + ph("probe_init"));
            total.push(inv.total_us as f64);
            client.push(c.as_nanos() as f64 / 1000.0);
            agent.shutdown().await;
        }
        let mut t = Table::new(
            format!("microVM cold start, qemu driver ({runs} runs, one VM at a time)"),
            &SUMMARY_HEADER,
        );
        t.summary_row("launch → probe Hello", &Summary::of(hello), ms);
        for (i, n) in names.iter().enumerate() {
            t.summary_row(&format!("  {n}"), &Summary::of(series[i].clone()), ms);
        }
        t.summary_row("agent: request → response (cold)", &Summary::of(total), ms);
        t.summary_row("caller: invoke → response", &Summary::of(client), ms);
        t.note(format!("driver: {why}"));
        t.note(
            "launch → Hello = spawn + vmm_setup + kernel + probe_init; under QEMU, kernel is the \
             guest's boot clock at init and vmm_setup the rest (QEMU start-up, loading)",
        );
        Ok(vec![t])
    })
}
