//! The agent's own counters: what it saw go wrong and what it had to drop.

use crate::util::RateLimit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters describing the agent itself (exported next to function metrics).
#[derive(Debug)]
pub struct AgentMetrics {
    /// Probe links closed for a protocol error.
    pub link_errors: AtomicU64,
    /// Probe links closed because the probe made the agent owe it more work than it read
    /// (a ping flood).
    pub link_floods: AtomicU64,
    /// Frames that arrived where they make no sense (ignored).
    pub unexpected_frames: AtomicU64,
    /// Log lines received.
    pub log_lines: AtomicU64,
    /// Log lines longer than the limit that the agent had to cut itself (a probe keeps the
    /// limit; one that does not is cut on arrival).
    pub log_lines_cut: AtomicU64,
    /// Other fields from probes (report fields, markers, error texts, ids) cut or capped
    /// on arrival at the host's limits (`guest_limits`).
    pub guest_fields_cut: AtomicU64,
    /// Log lines the probe numbered but that never arrived (sequence gaps).
    pub log_lines_lost: AtomicU64,
    /// Log lines the probes dropped under their rate limit (as they reported).
    pub log_lines_dropped: AtomicU64,
    /// Sandboxes that failed to start.
    pub spawn_failures: AtomicU64,
    /// Sandboxes started.
    pub sandboxes_started: AtomicU64,
    /// Sandboxes ended (reaped, replaced, died).
    pub sandboxes_ended: AtomicU64,
    /// Sandboxes an earlier agent on this state directory left when it died, swept at
    /// start (`leftovers`).
    pub leftovers_swept: AtomicU64,
    /// 1 once that sweep has finished.
    pub leftover_sweep_done: AtomicU64,
    /// Rate limit for link error logging.
    pub link_error_log: RateLimit,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            link_errors: AtomicU64::new(0),
            link_floods: AtomicU64::new(0),
            unexpected_frames: AtomicU64::new(0),
            log_lines: AtomicU64::new(0),
            log_lines_lost: AtomicU64::new(0),
            log_lines_cut: AtomicU64::new(0),
            guest_fields_cut: AtomicU64::new(0),
            log_lines_dropped: AtomicU64::new(0),
            spawn_failures: AtomicU64::new(0),
            sandboxes_started: AtomicU64::new(0),
            sandboxes_ended: AtomicU64::new(0),
            leftovers_swept: AtomicU64::new(0),
            leftover_sweep_done: AtomicU64::new(0),
            link_error_log: RateLimit::new(Duration::from_secs(10), 5),
        }
    }
}

impl AgentMetrics {
    /// A JSON view.
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "link_errors": g(&self.link_errors),
            "link_floods": g(&self.link_floods),
            "unexpected_frames": g(&self.unexpected_frames),
            "log_lines": g(&self.log_lines),
            "log_lines_lost": g(&self.log_lines_lost),
            "log_lines_cut": g(&self.log_lines_cut),
            "guest_fields_cut": g(&self.guest_fields_cut),
            "log_lines_dropped": g(&self.log_lines_dropped),
            "spawn_failures": g(&self.spawn_failures),
            "sandboxes_started": g(&self.sandboxes_started),
            "sandboxes_ended": g(&self.sandboxes_ended),
            "leftovers_swept": g(&self.leftovers_swept),
            "leftover_sweep_done": g(&self.leftover_sweep_done),
            "console_lines_cut": g(&crate::drivers::console::LINES_CUT),
            "console_bytes_cut": g(&crate::drivers::console::BYTES_CUT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_block_is_counters_only() {
        // Readers (the TUI) take `/v1/stats` `agent` as a map of unsigned counters; one
        // boolean made every stats request fail to decode there.
        let m = AgentMetrics::default();
        m.leftover_sweep_done.store(1, Ordering::Relaxed);
        let v = m.to_json();
        for (k, x) in v.as_object().unwrap() {
            assert!(x.is_u64(), "{k} = {x} is not a counter");
        }
        assert_eq!(v["leftover_sweep_done"], 1);
    }
}
