//! OTLP export wiring: the agent's side of the exporters. Nothing here runs on the invoke
//! path except [`Otlp::send_spans`] (one non-blocking queue push per invocation, built
//! only when traces are on); log records come off the log bus in their own task and
//! metrics are read from the aggregator on an interval.

use crate::config::OtlpSettings;
use crate::link::{LogLine, TraceIds};
use crate::recorder::{NO_PHASE, PHASES};
use crate::series::SandboxMeta;
use exporters::otlp::attrs::{AttrValue, Attrs};
use exporters::otlp::metrics::{MetricIn, MetricsEncoder, Point, Points, ResourceIn};
use exporters::otlp::traces::{InvocationSpans, SpanIn, SpanKind, TracesEncoder};
use exporters::otlp::{Exporter, LogRecordIn, LogsEncoder, OtlpConfig, OtlpError, Severity};
use std::sync::Weak;
use std::time::Duration;
use tokio::sync::broadcast;

/// The running exporters, one per enabled signal.
#[derive(Clone)]
pub struct Otlp {
    /// Log records.
    pub logs: Option<Exporter<LogsEncoder>>,
    /// Spans.
    pub traces: Option<Exporter<TracesEncoder>>,
    /// Metrics.
    pub metrics: Option<Exporter<MetricsEncoder>>,
    /// Metrics export interval.
    pub metrics_interval: Duration,
}

impl std::fmt::Debug for Otlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otlp")
            .field("logs", &self.logs.is_some())
            .field("traces", &self.traces.is_some())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

fn with_resource(c: &Option<OtlpConfig>, resource: &[(String, String)]) -> Option<OtlpConfig> {
    c.clone().map(|mut c| {
        c.resource = resource.to_vec();
        c
    })
}

impl Otlp {
    /// Start the exporters `s` enables, each with `resource` (the agent's attributes).
    pub fn start(s: &OtlpSettings, resource: &[(String, String)]) -> Result<Self, OtlpError> {
        let logs = with_resource(&s.logs, resource)
            .map(|c| Exporter::start(&c, LogsEncoder::new(&c)))
            .transpose()?;
        let traces = with_resource(&s.traces, resource)
            .map(|c| Exporter::start(&c, TracesEncoder::new(&c)))
            .transpose()?;
        let metrics = with_resource(&s.metrics, resource)
            .map(|c| Exporter::start(&c, MetricsEncoder::new(&c)))
            .transpose()?;
        Ok(Self {
            logs,
            traces,
            metrics,
            metrics_interval: s.metrics_interval,
        })
    }

    /// `(signal, dropped, spooled)` per running exporter.
    fn counts(&self) -> Vec<(&'static str, u64, u64)> {
        let mut c = Vec::new();
        if let Some(e) = &self.logs {
            c.push(("otlp_logs", e.dropped(), e.spooled()));
        }
        if let Some(e) = &self.traces {
            c.push(("otlp_traces", e.dropped(), e.spooled()));
        }
        if let Some(e) = &self.metrics {
            c.push(("otlp_metrics", e.dropped(), e.spooled()));
        }
        c
    }

    /// `(signal, dropped)` per running exporter, for `/v1/stats` and the telemetry metric.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.counts().into_iter().map(|(s, d, _)| (s, d)).collect()
    }

    /// `(signal, records waiting in the spool)` per running exporter.
    pub fn spooled(&self) -> Vec<(&'static str, u64)> {
        self.counts().into_iter().map(|(s, _, n)| (s, n)).collect()
    }

    /// Send what is queued (to the backend, else to the spool), within `within` each.
    pub async fn flush(&self, within: Duration) {
        if let Some(e) = &self.logs {
            e.flush(within).await;
        }
        if let Some(e) = &self.traces {
            e.flush(within).await;
        }
        if let Some(e) = &self.metrics {
            e.flush(within).await;
        }
    }
}

/// Forward every line on the log bus (function output, platform events, shell audits)
/// to the OTLP log exporter, with the trace and span of the invocation it belongs to.
/// Lines this task falls behind on are counted as dropped.
/// Lines are taken in bursts: after each wake-up the task drains what is there, then
/// rests one [`exporters::otlp::FILL_TICK`] (the bus holds 4096 lines), so a busy agent
/// pays a wake-up per tick, not per line.
pub fn spawn_logs(e: Exporter<LogsEncoder>, mut rx: broadcast::Receiver<LogLine>) {
    use broadcast::error::{RecvError, TryRecvError};
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(l) => e.send(log_record(l)),
                Err(RecvError::Lagged(n)) => e.count_dropped(n),
                Err(RecvError::Closed) => break,
            }
            loop {
                match rx.try_recv() {
                    Ok(l) => e.send(log_record(l)),
                    Err(TryRecvError::Lagged(n)) => e.count_dropped(n),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return,
                }
            }
            tokio::time::sleep(exporters::otlp::FILL_TICK).await;
        }
    });
}

fn log_record(l: LogLine) -> LogRecordIn {
    let severity = match l.stream {
        "stderr" => Severity::Error,
        "platform"
            if l.line.starts_with("Task timed out")
                || l.line.starts_with("Runtime.OutOfMemory") =>
        {
            Severity::Error
        }
        _ => Severity::Info,
    };
    let mut attributes = vec![
        ("faas.name", l.function.to_string()),
        ("faas.instance", l.sandbox.to_string()),
        ("sandscope.log.stream", l.stream.to_string()),
    ];
    if matches!(l.stream, "stdout" | "stderr") {
        attributes.push(("log.iostream", l.stream.to_string()));
    }
    if !l.invoke_id.is_empty() {
        attributes.push(("faas.invocation_id", l.invoke_id));
    }
    if l.truncated {
        attributes.push(("sandscope.log.truncated", "true".into()));
    }
    LogRecordIn {
        time_unix_nano: l.ts_ms.saturating_mul(1_000_000),
        severity,
        body: l.line,
        attributes,
        trace_id: l.trace.map(|t| t.0),
        span_id: l.trace.map(|t| t.1),
    }
}

/// Every `interval`, read the agent's figures and hand them to the metrics exporter.
/// Ends with the agent.
pub fn spawn_metrics(agent: Weak<crate::Agent>, e: Exporter<MetricsEncoder>, interval: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(a) = agent.upgrade() else { break };
            let batch = a.metrics_batch().await;
            drop(a);
            e.send(batch);
        }
    });
}

/// ns since the Unix epoch.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn level(
    name: &'static str,
    description: &'static str,
    unit: &'static str,
    points: Vec<Point<i64>>,
) -> MetricIn {
    MetricIn {
        name,
        description,
        unit,
        points: Points::UpDown(points),
    }
}

/// Host-level figures (the resource without `faas.*`): sandboxes by function and state,
/// memory committed and resident, vCPU oversubscription, telemetry drops, alerts firing.
pub fn host_resource(
    functions: &[crate::agent::FunctionView],
    hosts: &[crate::agent::HostView],
    dropped: &[(&'static str, u64)],
    firing: usize,
) -> ResourceIn {
    let mut sandboxes = Vec::new();
    for f in functions {
        let c = f.sandboxes;
        for (state, n) in [
            ("booting", c.booting),
            ("idle", c.idle),
            ("busy", c.busy),
            ("frozen", c.frozen),
        ] {
            sandboxes.push(Point {
                attributes: vec![
                    ("faas.name".into(), f.spec.name.as_str().into()),
                    ("state".into(), state.into()),
                ],
                value: n as i64,
            });
        }
    }
    let local = hosts.iter().filter(|h| h.local);
    let committed: u64 = local.clone().map(|h| h.memory_committed_bytes).sum();
    let resident: u64 = local.clone().map(|h| h.memory_resident_bytes).sum();
    let oversub: f64 = local.map(|h| h.vcpu_oversubscription).sum();
    let one = |v: u64| {
        vec![Point {
            attributes: Vec::new(),
            value: v.min(i64::MAX as u64) as i64,
        }]
    };
    ResourceIn {
        attributes: Vec::new(),
        metrics: vec![
            level(
                "sandscope.sandboxes",
                "Sandboxes by function and state",
                "{sandbox}",
                sandboxes,
            ),
            level(
                "sandscope.host.memory.committed",
                "Memory limits of the live sandboxes on this host",
                "By",
                one(committed),
            ),
            level(
                "sandscope.host.memory.resident",
                "Resident memory of the live sandboxes on this host",
                "By",
                one(resident),
            ),
            MetricIn {
                name: "sandscope.host.vcpu.oversubscription",
                description: "Sandbox CPUs configured per host core",
                unit: "1",
                points: Points::Gauge(vec![Point {
                    attributes: Vec::new(),
                    value: oversub,
                }]),
            },
            MetricIn {
                name: "sandscope.telemetry.dropped",
                description: "Telemetry the agent had to drop, by signal",
                unit: "{record}",
                points: Points::Counter(
                    dropped
                        .iter()
                        .map(|(k, v)| Point {
                            attributes: vec![("signal".into(), (*k).into())],
                            value: *v,
                        })
                        .collect(),
                ),
            },
            level(
                "sandscope.alerts.firing",
                "Alert rules in alarm",
                "{alert}",
                vec![Point {
                    attributes: Vec::new(),
                    value: firing as i64,
                }],
            ),
        ],
    }
}

/// Everything the spans of one invocation are made of.
#[derive(Debug)]
pub struct InvocationTiming<'a> {
    /// The trace and the invocation span's own id.
    pub ids: TraceIds,
    /// The caller's span (from `traceparent`), if any.
    pub parent: Option<[u8; 8]>,
    /// Function.
    pub function: &'a str,
    /// Request id.
    pub invoke_id: &'a str,
    /// Cold start.
    pub cold: bool,
    /// Request received, ns since the Unix epoch.
    pub start_unix_nano: u64,
    /// Request received → response ready, µs.
    pub total_us: u64,
    /// Per-phase µs ([`NO_PHASE`] when it did not happen).
    pub phases_us: [u64; PHASES.len()],
    /// Offset of the sandbox start from the request, µs (cold starts).
    pub boot_offset_us: u64,
    /// Offset of the invoke request to the sandbox, µs.
    pub send_offset_us: u64,
    /// Error type when it failed.
    pub error: Option<String>,
}

/// The invocation span (SERVER, named after the function) and one INTERNAL child per
/// phase, on one timeline: queue and thaw from the request, the start-up phases one
/// after another from the moment the sandbox was asked for, invoke from when the request
/// went to the sandbox. `next_id` supplies span ids.
pub fn invocation_spans(
    t: &InvocationTiming<'_>,
    resource: std::sync::Arc<Attrs>,
    mut next_id: impl FnMut() -> [u8; 8],
) -> InvocationSpans {
    let at = |us: u64| t.start_unix_nano + us * 1000;
    let (trace_id, root_id) = t.ids;
    let mut spans = vec![SpanIn {
        trace_id,
        span_id: root_id,
        parent_span_id: t.parent,
        name: t.function.to_string(),
        kind: SpanKind::Server,
        start_unix_nano: at(0),
        end_unix_nano: at(t.total_us),
        attributes: vec![
            ("faas.trigger".into(), "http".into()),
            ("faas.invocation_id".into(), t.invoke_id.into()),
            ("faas.coldstart".into(), AttrValue::Bool(t.cold)),
        ],
        error: t.error.clone(),
    }];
    let mut child = |name: &'static str, from: u64, us: u64| SpanIn {
        trace_id,
        span_id: next_id(),
        parent_span_id: Some(root_id),
        name: name.to_string(),
        kind: SpanKind::Internal,
        start_unix_nano: at(from),
        end_unix_nano: at(from + us),
        attributes: vec![("sandscope.phase".into(), name.into())],
        error: None,
    };
    let mut cursor = 0;
    let mut boot_cursor = t.boot_offset_us;
    for (i, (name, us)) in PHASES.iter().zip(t.phases_us).enumerate() {
        if us == NO_PHASE {
            continue;
        }
        let start = match i {
            // queue, thaw: from the request, one after the other.
            0 | 1 => {
                let s = cursor;
                cursor += us;
                s
            }
            // invoke: when the request went to the sandbox.
            7 => t.send_offset_us,
            // spawn ... runtime_init: one after another from the sandbox start.
            _ => {
                let s = boot_cursor;
                boot_cursor += us;
                s
            }
        };
        spans.push(child(name, start, us));
    }
    InvocationSpans { resource, spans }
}

impl SandboxMeta {
    /// The sandbox's resource attributes (added to the agent's).
    pub fn resource(&self) -> Attrs {
        vec![
            ("faas.name".into(), self.function.as_str().into()),
            ("faas.version".into(), "$LATEST".into()),
            ("faas.instance".into(), self.id.as_str().into()),
            (
                "faas.max_memory".into(),
                AttrValue::Int(self.max_memory_bytes.min(i64::MAX as u64) as i64),
            ),
            ("sandscope.driver".into(), self.driver.into()),
            (
                "sandscope.guest.boot_id".into(),
                self.boot_id.as_str().into(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::Phase;

    #[test]
    fn cold_start_spans_sit_on_one_timeline_under_the_invocation() {
        let mut phases = [NO_PHASE; PHASES.len()];
        phases[Phase::Spawn as usize] = 3_000;
        phases[Phase::ProbeInit as usize] = 2_000;
        phases[Phase::RuntimeInit as usize] = 500;
        phases[Phase::Invoke as usize] = 1_000;
        let t = InvocationTiming {
            ids: ([1; 16], [2; 8]),
            parent: Some([9; 8]),
            function: "hello",
            invoke_id: "inv-1",
            cold: true,
            start_unix_nano: 1_000_000_000,
            total_us: 7_000,
            phases_us: phases,
            boot_offset_us: 100,
            send_offset_us: 5_800,
            error: None,
        };
        let mut n = 10u8;
        let s = invocation_spans(&t, Default::default(), || {
            n += 1;
            [n; 8]
        });
        let names: Vec<&str> = s.spans.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["hello", "spawn", "probe_init", "runtime_init", "invoke"]
        );
        let root = &s.spans[0];
        assert_eq!(root.parent_span_id, Some([9; 8]));
        assert_eq!(root.end_unix_nano - root.start_unix_nano, 7_000_000);
        for c in &s.spans[1..] {
            assert_eq!(c.parent_span_id, Some([2; 8]));
            assert_eq!(c.trace_id, [1; 16]);
            assert!(
                c.start_unix_nano >= root.start_unix_nano && c.end_unix_nano <= root.end_unix_nano
            );
        }
        let span = |n: &str| s.spans.iter().find(|s| s.name == n).unwrap();
        assert_eq!(span("spawn").start_unix_nano, 1_000_100_000);
        assert_eq!(
            span("probe_init").start_unix_nano,
            span("spawn").end_unix_nano
        );
        assert_eq!(
            span("runtime_init").start_unix_nano,
            span("probe_init").end_unix_nano
        );
        assert_eq!(span("invoke").start_unix_nano, 1_005_800_000);
        let ids: std::collections::HashSet<[u8; 8]> = s.spans.iter().map(|s| s.span_id).collect();
        assert_eq!(ids.len(), s.spans.len(), "span ids are distinct");
    }
}
