//! microVM cold start under the qemu driver: launch → probe Hello of a Linux guest, with
//! the phase breakdown (spawn, vmm_setup, kernel, probe_init), and the first invoke.

use crate::stats::{ms, Summary, Table, SUMMARY_HEADER};
use anyhow::{bail, Context};
use host_agent::config::{AgentConfig, DriverChoice};
use host_agent::{Agent, InvokeOptions};
use std::time::Instant;

/// `runs` cold starts of an exec function in a fresh QEMU microVM each.
pub fn vmboot(runs: usize) -> anyhow::Result<Vec<Table>> {
    let rows = cold_starts(runs, &[DriverChoice::Qemu])?;
    Ok(rows.into_iter().map(|r| r.table(runs)).collect())
}

/// vmm-lite against QEMU `-M microvm` with KVM, interleaved run by run, on the same kernel,
/// initramfs, memory, vCPUs and command line: launch → probe Hello and each VMM's resident
/// memory beyond guest pages. Needs hardware KVM (in this project's CI, inside a nested L1:
/// see [`vmm_vs_qemu_nested`]).
pub fn vmm_vs_qemu(runs: usize) -> anyhow::Result<Vec<Table>> {
    let rows = cold_starts(runs, &[DriverChoice::VmmLite, DriverChoice::Qemu])?;
    let mut out: Vec<Table> = rows.iter().map(|r| r.table(runs)).collect();
    let (v, q) = (&rows[0], &rows[1]);
    let mut t = Table::new(
        format!("vmm-lite vs QEMU microvm (KVM), same guest, interleaved, {runs} runs each"),
        &["what", "vmm-lite", "qemu", "vmm-lite / qemu"],
    );
    let hello = |r: &DriverRuns, p: f64| percentile(&r.hello, p);
    for (label, p) in [("launch → Hello p50", 0.5), ("launch → Hello p90", 0.9)] {
        let (a, b) = (hello(v, p), hello(q, p));
        t.row(vec![label.into(), ms(a), ms(b), format!("{:.2}", a / b)]);
    }
    let mib = |x: f64| format!("{:.2} MiB", x / (1 << 20) as f64);
    let (a, b) = (percentile(&v.overhead, 0.5), percentile(&q.overhead, 0.5));
    t.row(vec![
        "VMM RSS beyond guest pages, p50".into(),
        mib(a),
        mib(b),
        format!("{:.2}", a / b),
    ]);
    let qv = percentile(&q.overhead_with_backend, 0.5);
    t.row(vec![
        "  with QEMU's vsock backend (vhost-device-vsock)".into(),
        mib(a),
        mib(qv),
        format!("{:.2}", a / qv),
    ]);
    t.note(format!("vmm-lite: {}", v.why));
    t.note(format!("qemu: {}", q.why));
    t.note(
        "RSS beyond guest pages: the VMM process's Rss (smaps) minus the Rss of its guest-RAM \
         mapping, read while the sandbox is idle after its first invocation",
    );
    if !nested_kvm::in_l1() {
        t.note("measured directly on this host's hardware KVM");
    } else {
        t.note("measured inside a nested L1 (QEMU/TCG with emulated SVM): compare ratios, not absolute times");
    }
    out.push(t);
    Ok(out)
}

/// Runs [`vmm_vs_qemu`] here when this host has hardware KVM, else inside an L1 VM with
/// nested KVM (this same binary over 9p), printing what it prints.
pub fn vmm_vs_qemu_nested(runs: usize, json: bool) -> anyhow::Result<Option<Vec<Table>>> {
    if nested_kvm::hardware_kvm() {
        return vmm_vs_qemu(runs).map(Some);
    }
    if let Some(why) = nested_kvm::unavailable() {
        bail!("no hardware KVM here and nested KVM is unavailable: {why}");
    }
    eprintln!(
        "sandscope-bench: no hardware KVM here; running inside a nested L1 (QEMU/TCG, minutes)"
    );
    let exe = std::env::current_exe()?;
    let mut run = nested_kvm::Run::new(&exe)
        .args(["vmm-vs-qemu", "--runs", &runs.to_string()])
        .env(nested_kvm::IN_L1_ENV, "1")
        .mem_mib(2048)
        .timeout(std::time::Duration::from_secs(300 + 60 * runs as u64));
    if json {
        run = run.args(["--json"]);
    }
    for (k, v) in std::env::vars() {
        if k.starts_with("SANDSCOPE_") || matches!(k.as_str(), "HOME" | "PATH") {
            run = run.env(&k, &v);
        }
    }
    let out = run.run()?;
    if out.status != 0 {
        bail!(
            "the benchmark failed inside L1 (exit {}):\n{}",
            out.status,
            out.tail(40)
        );
    }
    Ok(None)
}

/// One driver's cold starts.
struct DriverRuns {
    driver: DriverChoice,
    why: String,
    phases: Vec<Vec<f64>>,
    hello: Vec<f64>,
    total: Vec<f64>,
    client: Vec<f64>,
    overhead: Vec<f64>,
    overhead_with_backend: Vec<f64>,
}

/// The cold-start phases in timeline order (no queue or thaw in these benches).
fn phase_names() -> &'static [&'static str] {
    &host_agent::recorder::PHASES[2..]
}

impl DriverRuns {
    fn table(&self, runs: usize) -> Table {
        let name = driver_name(self.driver);
        let mut t = Table::new(
            format!("microVM cold start, {name} driver ({runs} runs, one VM at a time)"),
            &SUMMARY_HEADER,
        );
        t.summary_row("launch → probe Hello", &Summary::of(self.hello.clone()), ms);
        for (i, n) in phase_names().iter().enumerate() {
            t.summary_row(&format!("  {n}"), &Summary::of(self.phases[i].clone()), ms);
        }
        t.summary_row(
            "agent: request → response (cold)",
            &Summary::of(self.total.clone()),
            ms,
        );
        t.summary_row(
            "caller: invoke → response",
            &Summary::of(self.client.clone()),
            ms,
        );
        t.note(format!("driver: {}", self.why));
        t.note(
            "launch → Hello = spawn + vmm_setup + kernel + probe_init; under vmm-lite, kernel \
             ends at the boot-timer marker the probe writes; under QEMU it is the guest's boot \
             clock at init and vmm_setup the rest (QEMU start-up, loading)",
        );
        t
    }
}

fn driver_name(d: DriverChoice) -> &'static str {
    match d {
        DriverChoice::VmmLite => "vmm-lite",
        DriverChoice::Qemu => "qemu",
        DriverChoice::Process => "process",
        DriverChoice::Auto => "auto",
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let s = Summary::of(v.to_vec());
    if p >= 0.9 {
        s.p90
    } else {
        s.p50
    }
}

/// `runs` rounds; in each, one cold start per driver in `drivers` order, each in a fresh
/// agent (so every start is a new VM and nothing is cached in a pool).
fn cold_starts(runs: usize, drivers: &[DriverChoice]) -> anyhow::Result<Vec<DriverRuns>> {
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
        "[agent]\nstate_dir = \"{}\"\nboot_timeout_s = 120\n\n\
         [[functions]]\nname = \"noop\"\nhandler = \"./handler.sh\"\ncode = \"code\"\n\
         memory_mb = 128\ntimeout_s = 60\n",
        dir.path().join("state").display()
    );
    let cfg_path = dir.path().join("sandscope.toml");
    std::fs::write(&cfg_path, toml)?;
    let base = AgentConfig::load(&cfg_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut out: Vec<DriverRuns> = drivers
        .iter()
        .map(|&driver| DriverRuns {
            driver,
            why: String::new(),
            phases: vec![Vec::new(); phase_names().len()],
            hello: Vec::new(),
            total: Vec::new(),
            client: Vec::new(),
            overhead: Vec::new(),
            overhead_with_backend: Vec::new(),
        })
        .collect();
    rt.block_on(async {
        for round in 0..runs {
            for r in out.iter_mut() {
                let mut cfg = base.clone();
                cfg.driver = r.driver;
                let agent = Agent::start(cfg).await.with_context(|| {
                    format!(
                        "starting an agent with the {} driver (scripts/guest-deps, sandscope image build)",
                        driver_name(r.driver)
                    )
                })?;
                r.why = agent.driver().1.to_string();
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
                for (i, n) in phase_names().iter().enumerate() {
                    r.phases[i].push(ph(n));
                }
                r.hello
                    .push(ph("spawn") + ph("vmm_setup") + ph("kernel") + ph("probe_init"));
                r.total.push(inv.total_us as f64);
                r.client.push(c.as_nanos() as f64 / 1000.0);
                if let Some((vmm, backend)) = vmm_overhead(&inv.sandbox_id, 128 << 20) {
                    r.overhead.push(vmm);
                    r.overhead_with_backend.push(vmm + backend);
                }
                agent.shutdown().await;
                eprintln!(
                    "  round {}/{runs} {}: launch → Hello {:.1} ms",
                    round + 1,
                    driver_name(r.driver),
                    r.hello.last().copied().unwrap_or_default() / 1e3
                );
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(out)
}

/// (VMM, vsock backend) resident bytes beyond guest RAM for sandbox `id`: the VMM is the
/// process whose command line names `sandscope.id=ID`; a backend is another process whose
/// command line names the sandbox's directory (QEMU's vhost-device-vsock).
fn vmm_overhead(id: &str, guest_bytes: u64) -> Option<(f64, f64)> {
    let needle = format!("sandscope.id={id}");
    let mut vmm = None;
    let mut backend = 0.0;
    for pid in std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
    {
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let c = String::from_utf8_lossy(&c);
        if c.contains(&needle) {
            vmm = rss_beyond_guest(pid, guest_bytes);
        } else if c.contains("vhost-device-vsock") && c.contains(id) {
            backend += rss_beyond_guest(pid, guest_bytes).unwrap_or(0.0);
        }
    }
    vmm.map(|v| (v, backend))
}

/// A process's Rss minus the Rss of mappings at least as large as guest RAM.
fn rss_beyond_guest(pid: u32, guest_bytes: u64) -> Option<f64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut big = false;
    for l in smaps.lines() {
        let mut f = l.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                big = b.saturating_sub(a) >= guest_bytes;
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib * 1024;
            if big {
                guest += kib * 1024;
            }
        }
    }
    Some(total.saturating_sub(guest) as f64)
}
