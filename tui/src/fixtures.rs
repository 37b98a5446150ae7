//! Fixed states for snapshot tests and the render benchmark.

use crate::model::{Alerts, Dist, FunctionStats, Host, Probe, Rule, Sandbox, SandboxDetail};
use crate::model::{LogLine, Sandboxes, StateCounts, Stats, PHASES};
use crate::state::{ConnState, State};

const BOOT: &str = "054b8b40-23bb-4dc0-a232-e03bf5ebbd8e";
const MACHINE: &str = "3d1219c7c4c5404aaa1f6d2a48adfda4";

fn dist(count: u64, base: u64) -> Dist {
    if count == 0 {
        return Dist::default();
    }
    Dist {
        count,
        p50_us: base,
        p90_us: base * 3 / 2,
        p99_us: base * 3,
        p999_us: base * 5,
        max_us: base * 8,
        mean_us: base * 6 / 5,
    }
}

/// Log2 buckets `(upper bound µs, count)` holding `count` samples around `base`: a
/// deterministic hump with a short fast side and a longer slow tail.
fn buckets(count: u64, base: u64) -> Vec<(u64, u64)> {
    if count == 0 {
        return Vec::new();
    }
    let mode = base.max(4).next_power_of_two();
    // Relative weights from two buckets below the mode to four above it.
    const W: [u64; 7] = [2, 6, 10, 5, 3, 1, 1];
    let total: u64 = W.iter().sum();
    // One sample each, mode first and outwards, so small counts still spread; the rest
    // by weight; whatever the integer division left over goes to the mode.
    let mut n = [0u64; 7];
    let mut left = count;
    for i in [2, 3, 1, 4, 0, 5, 6] {
        if left > 0 {
            n[i] += 1;
            left -= 1;
        }
    }
    for (c, w) in n.iter_mut().zip(W) {
        *c += left * w / total;
    }
    n[2] += count - n.iter().sum::<u64>();
    let out: Vec<(u64, u64)> = n
        .iter()
        .enumerate()
        .map(|(i, c)| ((mode << i) >> 2, *c))
        .collect();
    let first = out.iter().position(|b| b.1 > 0).unwrap_or(0);
    let last = out.iter().rposition(|b| b.1 > 0).map_or(0, |i| i + 1);
    out[first..last].to_vec()
}

/// A function with `n` invocations of which `cold` were cold.
pub fn function(name: &str, n: u64, cold: u64, warm_us: u64) -> FunctionStats {
    let cold_us = warm_us * 4 + 20_000;
    let mut phases = std::collections::BTreeMap::new();
    let mut last = std::collections::BTreeMap::new();
    if cold > 0 {
        for (i, p) in PHASES.iter().enumerate() {
            if *p == "vmm_setup" || *p == "kernel" {
                continue;
            }
            let v = [12_000, 0, 0, 2_500, 900, warm_us][i];
            phases.insert(
                p.to_string(),
                dist(if *p == "invoke" { n } else { cold }, v),
            );
            last.insert(p.to_string(), v + v / 10);
        }
    }
    FunctionStats {
        name: name.into(),
        invocations: n,
        coldstarts: cold,
        errors: 0,
        timeouts: 0,
        warm: dist(n - cold, warm_us),
        cold: dist(cold, cold_us),
        warm_buckets: buckets(n - cold, warm_us),
        cold_buckets: buckets(cold, cold_us),
        init: dist(cold, cold_us - warm_us),
        phases,
        last_cold_start: last,
    }
}

/// A sandbox of `function` with a deterministic id.
pub fn sandbox(function: &str, i: usize) -> Sandbox {
    Sandbox {
        id: format!(
            "{function}-{:08x}",
            0x1000_0000u32.wrapping_add(i as u32 * 7919)
        ),
        function: function.into(),
        driver: "process".into(),
        state: ["idle", "busy", "booting", "frozen"][i % 4].into(),
        invocations: (i * 3 % 17) as u64,
        age_s: 5.0 + i as f64 * 1.5,
        idle_s: 1.0,
        rss_bytes: 7_000_000 + i as u64 * 131_072,
        usage: crate::model::Usage {
            cpu_us: i as u64 * 1_000,
        },
        memory_limit_bytes: 128 << 20,
        cpus: 1.0,
        shells: 0,
        probe: Probe {
            boot_id: BOOT.into(),
            hostname: format!("{function}-{i}"),
            machine_id: MACHINE.into(),
            kernel: "6.18.44-fc-v657".into(),
            cpu_model: "AMD EPYC".into(),
            cpu_cores: 2,
            mem_total_kib: 24_684_092,
            mem_available_kib: 24_192_564,
            hypervisor: "KVMKVMKVM".into(),
            host_cpu_model: "AMD EPYC".into(),
            host_id: MACHINE.into(),
            probe_version: "0.1.0".into(),
            probe_pid: 1,
        },
    }
}

/// One connected agent with `functions` functions and `sandboxes` sandboxes spread
/// over them.
pub fn many(functions: usize, sandboxes: usize) -> State {
    let mut s = State::new(["http://127.0.0.1:9000"]);
    let a = &mut s.agents[0];
    a.conn = ConnState::Connected;
    a.stats = Stats {
        functions: (0..functions)
            .map(|i| {
                let n = 10 + i as u64 * 37 % 1000;
                function(
                    &format!("fn-{i:03}"),
                    n,
                    1 + i as u64 % 5,
                    800 + i as u64 * 113,
                )
            })
            .collect(),
        ..Stats::default()
    };
    a.stats.telemetry.dropped = [("log_lines".to_string(), 0), ("samples".to_string(), 2)]
        .into_iter()
        .collect();
    let sbs: Vec<Sandbox> = (0..sandboxes)
        .map(|i| sandbox(&format!("fn-{:03}", i % functions.max(1)), i))
        .collect();
    let mut counts = StateCounts::default();
    for sb in &sbs {
        match sb.state.as_str() {
            "idle" => counts.idle += 1,
            "busy" => counts.busy += 1,
            "booting" => counts.booting += 1,
            _ => counts.frozen += 1,
        }
    }
    let hosts = if sbs.is_empty() {
        vec![]
    } else {
        vec![Host {
            boot_id: BOOT.into(),
            machine_id: MACHINE.into(),
            local: true,
            sandboxes: counts,
            memory_committed_bytes: sbs.iter().map(|s| s.memory_limit_bytes).sum(),
            memory_resident_bytes: sbs.iter().map(|s| s.rss_bytes).sum(),
            host_memory_total_bytes: 25_276_510_208,
            host_cores: 2,
            vcpus_configured: sbs.len() as f64,
            vcpu_oversubscription: sbs.len() as f64 / 2.0,
        }]
    };
    a.sandboxes = Sandboxes {
        sandboxes: sbs,
        hosts,
    };
    a.alerts = Some(Alerts {
        rules: vec![
            Rule {
                name: "oom-in-logs".into(),
                state: Some("ALARM".into()),
                value: Some(3.0),
                matches: 3,
            },
            Rule {
                name: "slow-init".into(),
                state: Some("OK".into()),
                value: None,
                matches: 0,
            },
        ],
        firing: 1,
        counters: [
            ("lines_dropped".to_string(), 0),
            ("webhook_failures".to_string(), 1),
        ]
        .into_iter()
        .collect(),
    });
    if let Some(sb) = a.sandboxes.sandboxes.first().cloned() {
        a.detail = Some(SandboxDetail {
            sandbox: sb,
            markers: vec![
                ("init_start".into(), 0),
                ("mounts_done".into(), 1_826_254),
                ("connected".into(), 2_630_283),
            ],
            logs: vec![
                LogLine {
                    stream: "stderr".into(),
                    line: "hello: got an event of 2 bytes".into(),
                },
                LogLine {
                    stream: "stdout".into(),
                    line: "{\"ok\":true}".into(),
                },
            ],
        });
    }
    s
}
