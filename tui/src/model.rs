//! The agent's JSON views as the TUI reads them.
//!
//! These mirror the agent's `/v1` bodies but are defined here, not imported from
//! host-agent (DESIGN: the TUI depends on the API, not the agent). Every struct is
//! `#[serde(default)]` so an older or newer agent with missing or extra fields still
//! renders.

use serde::Deserialize;
use std::collections::BTreeMap;

/// Cold-start phases in the order they happen.
pub const PHASES: [&str; 6] = [
    "spawn",
    "vmm_setup",
    "kernel",
    "probe_init",
    "runtime_init",
    "invoke",
];

/// A latency distribution (`/v1/stats`), microseconds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Dist {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// Mean.
    pub mean_us: u64,
}

impl Dist {
    /// The percentiles the view shows, labelled.
    pub fn percentiles(&self) -> [(&'static str, u64); 5] {
        [
            ("p50", self.p50_us),
            ("p90", self.p90_us),
            ("p99", self.p99_us),
            ("p99.9", self.p999_us),
            ("max", self.max_us),
        ]
    }
}

/// One function's statistics.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FunctionStats {
    /// Function name.
    pub name: String,
    /// Invocations.
    pub invocations: u64,
    /// Cold starts.
    pub coldstarts: u64,
    /// Errors.
    pub errors: u64,
    /// Timeouts.
    pub timeouts: u64,
    /// Warm invocation latency.
    pub warm: Dist,
    /// Cold invocation latency.
    pub cold: Dist,
    /// Warm latency histogram: `(upper bound µs, count)` per log2 bucket (bounds 1, 2,
    /// 4, ... µs), first to last non-empty bucket. Empty from agents that predate it.
    #[serde(default)]
    pub warm_buckets: Vec<(u64, u64)>,
    /// Cold latency histogram, as `warm_buckets`.
    #[serde(default)]
    pub cold_buckets: Vec<(u64, u64)>,
    /// Init (spawn to ready) latency.
    pub init: Dist,
    /// Per-phase latency.
    pub phases: BTreeMap<String, Dist>,
    /// The latest cold start's phases, microseconds.
    pub last_cold_start: BTreeMap<String, u64>,
}

impl FunctionStats {
    /// Cold starts per invocation, 0..1.
    pub fn cold_rate(&self) -> f64 {
        if self.invocations == 0 {
            0.0
        } else {
            self.coldstarts as f64 / self.invocations as f64
        }
    }
}

/// Telemetry losses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Telemetry {
    /// Dropped items by signal.
    pub dropped: BTreeMap<String, u64>,
}

/// `/v1/stats` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Per function.
    pub functions: Vec<FunctionStats>,
    /// Telemetry drops.
    pub telemetry: Telemetry,
    /// The agent's own counters.
    pub agent: BTreeMap<String, u64>,
}

/// Host-side resource usage of a sandbox.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// CPU time, microseconds.
    pub cpu_us: u64,
}

/// What the guest probe reported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Probe {
    /// Guest kernel boot_id.
    pub boot_id: String,
    /// Guest hostname.
    pub hostname: String,
    /// Guest machine-id.
    pub machine_id: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu_model: String,
    /// CPU cores seen.
    pub cpu_cores: u64,
    /// MemTotal, KiB.
    pub mem_total_kib: u64,
    /// MemAvailable, KiB.
    pub mem_available_kib: u64,
    /// Hypervisor signature.
    pub hypervisor: String,
    /// Host CPU model.
    pub host_cpu_model: String,
    /// Host id echoed back.
    pub host_id: String,
    /// Probe version.
    pub probe_version: String,
    /// Probe pid.
    pub probe_pid: u64,
}

/// `/v1/sandboxes` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Sandbox {
    /// Id.
    pub id: String,
    /// Function.
    pub function: String,
    /// Driver.
    pub driver: String,
    /// booting / idle / busy / frozen.
    pub state: String,
    /// Invocations served.
    pub invocations: u64,
    /// Age, s.
    pub age_s: f64,
    /// Idle for, s.
    pub idle_s: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Usage.
    pub usage: Usage,
    /// Memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// CPU limit, cores.
    pub cpus: f64,
    /// Open shell sessions (SSH); the sandbox is pinned while any is open.
    pub shells: u64,
    /// Probe report.
    pub probe: Probe,
}

/// Sandboxes by state.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StateCounts {
    /// Booting.
    pub booting: u64,
    /// Idle.
    pub idle: u64,
    /// Busy.
    pub busy: u64,
    /// Frozen.
    pub frozen: u64,
}

/// Packing of one host.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Host {
    /// boot_id of the host kernel.
    pub boot_id: String,
    /// machine-id.
    pub machine_id: String,
    /// Whether it is the agent's own kernel.
    pub local: bool,
    /// Sandboxes by state.
    pub sandboxes: StateCounts,
    /// Sum of memory limits.
    pub memory_committed_bytes: u64,
    /// Sum of resident memory.
    pub memory_resident_bytes: u64,
    /// Host MemTotal.
    pub host_memory_total_bytes: u64,
    /// Host cores.
    pub host_cores: u64,
    /// Sum of CPU limits.
    pub vcpus_configured: f64,
    /// vcpus_configured / host cores.
    pub vcpu_oversubscription: f64,
}

/// `/v1/sandboxes` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Sandboxes {
    /// Live sandboxes.
    pub sandboxes: Vec<Sandbox>,
    /// Packing per host.
    pub hosts: Vec<Host>,
}

/// One log line of a sandbox.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LogLine {
    /// stdout / stderr / platform.
    pub stream: String,
    /// The text.
    pub line: String,
}

/// `/v1/sandboxes/{id}` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SandboxDetail {
    /// The sandbox.
    #[serde(flatten)]
    pub sandbox: Sandbox,
    /// Probe markers, ns since init.
    pub markers: Vec<(String, u64)>,
    /// Recent log lines.
    pub logs: Vec<LogLine>,
}

/// One alert rule's state.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Rule {
    /// Rule name.
    pub name: String,
    /// Alarm state (null when the rule has no alarm).
    pub state: Option<String>,
    /// Last extracted value.
    pub value: Option<f64>,
    /// Matching lines.
    pub matches: u64,
}

/// `/v1/alerts` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Alerts {
    /// Rules.
    pub rules: Vec<Rule>,
    /// Rules in alarm.
    pub firing: u64,
    /// Engine counters (lines_dropped, actions_dropped, ...).
    pub counters: BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_unknown_fields_are_tolerated() {
        let s: Stats =
            serde_json::from_str(r#"{"functions":[{"name":"f","warm":{"p50_us":3},"new":1}]}"#)
                .unwrap();
        assert_eq!(s.functions[0].warm.p50_us, 3);
        assert_eq!(s.functions[0].cold, Dist::default());
        assert!(
            s.functions[0].warm_buckets.is_empty(),
            "older agents send no buckets"
        );
        let s: Stats = serde_json::from_str(
            r#"{"functions":[{"name":"f","warm_buckets":[[128,28],[256,71]]}]}"#,
        )
        .unwrap();
        assert_eq!(s.functions[0].warm_buckets, vec![(128, 28), (256, 71)]);
        assert!(s.functions[0].cold_buckets.is_empty());
        let d: SandboxDetail = serde_json::from_str(
            r#"{"id":"a-1","probe":{"boot_id":"b"},"markers":[["init_start",0]],"logs":[]}"#,
        )
        .unwrap();
        assert_eq!(d.sandbox.id, "a-1");
        assert_eq!(d.sandbox.probe.boot_id, "b");
        let a: Alerts =
            serde_json::from_str(r#"{"rules":[{"name":"r","state":null,"value":null}]}"#).unwrap();
        assert_eq!(a.rules[0].state, None);
    }
}
