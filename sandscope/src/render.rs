//! Plain-text rendering of the agent's JSON views (shared by `stats`, `sandboxes` and
//! `demo`, so what the demo prints is what an operator sees from a live agent).

use serde_json::Value;
use std::fmt::Write;

fn ms(us: &Value) -> String {
    match us.as_u64() {
        Some(v) => format!("{:.2}", v as f64 / 1000.0),
        None => "-".into(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Latency table per function, then the cold-start phases.
pub fn stats(v: &Value) -> String {
    let mut o = String::new();
    let fns = v["functions"].as_array().cloned().unwrap_or_default();
    if fns.is_empty() {
        return "no functions\n".into();
    }
    let _ = writeln!(
        o,
        "Latency (ms, agent-side, request received -> response ready)"
    );
    let _ = writeln!(
        o,
        "  {:<14} {:<5} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "function", "kind", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for f in &fns {
        for kind in ["warm", "cold"] {
            let d = &f[kind];
            let _ = writeln!(
                o,
                "  {:<14} {:<5} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
                s(f, "name"),
                kind,
                n(d, "count"),
                ms(&d["p50_us"]),
                ms(&d["p90_us"]),
                ms(&d["p99_us"]),
                ms(&d["p999_us"]),
                ms(&d["max_us"])
            );
        }
        let _ = writeln!(
            o,
            "  {:<14} invocations {}  cold starts {}  errors {}  timeouts {}  oom kills {}  throttled {}",
            "",
            n(f, "invocations"),
            n(f, "coldstarts"),
            n(f, "errors"),
            n(f, "timeouts"),
            n(f, "oom_kills"),
            n(f, "throttles")
        );
    }
    let _ = writeln!(o, "\nCold-start phases (ms; one host timeline: spawn -> probe_init -> runtime_init -> invoke)");
    let _ = writeln!(
        o,
        "  {:<14} {:<13} {:>7} {:>9} {:>9} {:>9}  ",
        "function", "phase", "count", "p50", "p99", "max"
    );
    for f in &fns {
        let phases = f["phases"].as_object().cloned().unwrap_or_default();
        let order = host_agent::recorder::PHASES;
        let widest = order
            .iter()
            .filter_map(|p| phases.get(*p))
            .map(|d| n(d, "p50_us"))
            .max()
            .unwrap_or(1)
            .max(1);
        for p in order {
            let Some(d) = phases.get(p) else { continue };
            let bar = "#".repeat(((n(d, "p50_us") * 30) / widest).max(1) as usize);
            let _ = writeln!(
                o,
                "  {:<14} {:<13} {:>7} {:>9} {:>9} {:>9}  {bar}",
                s(f, "name"),
                p,
                n(d, "count"),
                ms(&d["p50_us"]),
                ms(&d["p99_us"]),
                ms(&d["max_us"])
            );
        }
        let init = &f["init"];
        if n(init, "count") > 0 {
            let _ = writeln!(
                o,
                "  {:<14} {:<13} {:>7} {:>9} {:>9} {:>9}",
                s(f, "name"),
                "= init total",
                n(init, "count"),
                ms(&init["p50_us"]),
                ms(&init["p99_us"]),
                ms(&init["max_us"])
            );
        }
    }
    let counts = |key: &str| {
        v["telemetry"][key].as_object().map(|d| {
            d.iter()
                .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        })
    };
    if let Some(d) = counts("dropped") {
        let _ = writeln!(o, "\nTelemetry dropped: {d}");
    }
    if let Some(d) = counts("spooled").filter(|d| !d.is_empty()) {
        let _ = writeln!(o, "Telemetry spooled (waiting for the backend): {d}");
    }
    o
}

/// The probe's view of one sandbox.
pub fn probe(sb: &Value) -> String {
    let p = &sb["probe"];
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Sandbox {} ({}, driver {})",
        s(sb, "id"),
        s(sb, "function"),
        s(sb, "driver")
    );
    let rows = [
        ("hostname", s(p, "hostname").to_string()),
        ("boot_id", s(p, "boot_id").to_string()),
        ("kernel", s(p, "kernel").to_string()),
        (
            "cpu",
            format!(
                "{} ({} logical CPUs visible)",
                s(p, "cpu_model"),
                n(p, "cpu_cores")
            ),
        ),
        (
            "memory",
            format!(
                "MemTotal {}  MemAvailable {}  (sandbox limit {})",
                mib(n(p, "mem_total_kib") * 1024),
                mib(n(p, "mem_available_kib") * 1024),
                mib(n(sb, "memory_limit_bytes"))
            ),
        ),
        (
            "uptime at init",
            format!("{:.2} s", p["uptime_at_init_s"].as_f64().unwrap_or(0.0)),
        ),
        (
            "probe pid",
            format!(
                "{} (1 = the probe is the sandbox's init)",
                n(p, "probe_pid")
            ),
        ),
        (
            "host (CPUID)",
            format!(
                "{}; hypervisor: {}",
                s(p, "host_cpu_model"),
                if s(p, "hypervisor").is_empty() {
                    "none"
                } else {
                    s(p, "hypervisor")
                }
            ),
        ),
        (
            "host id",
            format!(
                "{} (machine-id handed in, echoed back; inside: {})",
                s(p, "host_id"),
                {
                    let m = s(p, "machine_id");
                    if m.is_empty() {
                        "no /etc/machine-id"
                    } else {
                        m
                    }
                }
            ),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(o, "  {k:<15} {v}");
    }
    o
}

/// Sandbox table and packing.
pub fn sandboxes(v: &Value) -> String {
    let mut o = String::new();
    let sbs = v["sandboxes"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        o,
        "{:<22} {:<10} {:<8} {:<7} {:>7} {:>8} {:>10} {:<36}",
        "sandbox", "function", "driver", "state", "invokes", "age s", "rss", "guest boot_id"
    );
    for sb in &sbs {
        let _ = writeln!(
            o,
            "{:<22} {:<10} {:<8} {:<7} {:>7} {:>8.1} {:>10} {:<36}",
            s(sb, "id"),
            s(sb, "function"),
            s(sb, "driver"),
            // `+sh`: a shell session is open (the sandbox is pinned).
            if n(sb, "shells") > 0 {
                format!("{}+sh", s(sb, "state"))
            } else {
                s(sb, "state").to_string()
            },
            n(sb, "invocations"),
            sb["age_s"].as_f64().unwrap_or(0.0),
            mib(n(sb, "rss_bytes")),
            s(&sb["probe"], "boot_id")
        );
    }
    if sbs.is_empty() {
        let _ = writeln!(o, "(no live sandboxes)");
    }
    o.push('\n');
    o.push_str(&packing(&v["hosts"]));
    o
}

/// Host packing lines.
pub fn packing(hosts: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Host packing (sandboxes grouped by guest boot_id + machine-id)"
    );
    for h in hosts.as_array().cloned().unwrap_or_default() {
        let sb = &h["sandboxes"];
        let _ = writeln!(
            o,
            "  host boot_id {}{}",
            s(&h, "boot_id"),
            if h["local"].as_bool() == Some(true) {
                " (this host's kernel)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "    sandboxes: {} idle, {} busy, {} frozen, {} booting{}",
            n(sb, "idle"),
            n(sb, "busy"),
            n(sb, "frozen"),
            n(sb, "booting"),
            match n(&h, "microvms") {
                0 => String::new(),
                v => format!(" ({v} microVMs: committed = guest memory, resident = VMM RSS)"),
            }
        );
        let total = n(&h, "host_memory_total_bytes");
        let _ = writeln!(
            o,
            "    memory: committed {} (sum of limits) vs resident {} of host {} ({} available)",
            mib(n(&h, "memory_committed_bytes")),
            mib(n(&h, "memory_resident_bytes")),
            if total > 0 { mib(total) } else { "?".into() },
            mib(n(&h, "host_memory_available_bytes"))
        );
        let _ = writeln!(
            o,
            "    cpu: {:.2} cores configured on {} host cores (oversubscription {:.2}x), load1 {:.2}",
            h["vcpus_configured"].as_f64().unwrap_or(0.0),
            n(&h, "host_cores"),
            h["vcpu_oversubscription"].as_f64().unwrap_or(0.0),
            h["load1"].as_f64().unwrap_or(0.0)
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_empty_and_partial_documents_without_panicking() {
        assert_eq!(stats(&serde_json::json!({})), "no functions\n");
        let partial =
            serde_json::json!({"functions":[{"name":"f","warm":{"count":3,"p50_us":1500}}]});
        let out = stats(&partial);
        assert!(out.contains("1.50"), "{out}");
        assert!(sandboxes(&serde_json::json!({})).contains("no live sandboxes"));
        assert!(probe(&serde_json::json!({"id":"x"})).contains("Sandbox x"));
    }
}
