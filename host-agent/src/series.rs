//! Per-sandbox figures for metric export, kept by the aggregator next to its
//! per-function histograms (only when OTLP metrics are on).
//!
//! OpenTelemetry puts `faas.instance` (the sandbox), `faas.max_memory` and the guest's
//! boot id on the *resource*, so each sandbox is its own resource with its own
//! invocation counters and duration histograms. Each series is a small auto-sizing
//! hdrhistogram (2 significant digits, ~1% error) read out into the explicit buckets of
//! the export ([`DURATION_BOUNDS_S`]). A sandbox that ended is exported one last time,
//! then forgotten. Invocations that reached no sandbox (throttled, failed to start) go to
//! one series per function without `faas.instance`, so sums over series stay exact.

use crate::recorder::{Counts, Sample, NO_PHASE, PHASES};
use exporters::otlp::attrs::{AttrValue, Attrs};
use exporters::otlp::metrics::{
    bucketize, HistPoint, MetricIn, Point, Points, ResourceIn, DURATION_BOUNDS_S, MEMORY_BOUNDS_BY,
};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the resource of a sandbox's series says about it.
#[derive(Debug, Clone)]
pub struct SandboxMeta {
    /// Function index.
    pub fn_index: u32,
    /// Sandbox id (`faas.instance`).
    pub id: String,
    /// Function name.
    pub function: String,
    /// Memory limit, bytes (`faas.max_memory`).
    pub max_memory_bytes: u64,
    /// Driver.
    pub driver: &'static str,
    /// The guest's boot id as its probe reported it.
    pub boot_id: String,
}

impl SandboxMeta {
    /// What a live sandbox's resource says.
    pub fn of(sb: &crate::pool::Sandbox) -> Self {
        Self {
            fn_index: sb.fn_index,
            id: sb.id.clone(),
            function: sb.function.name.clone(),
            max_memory_bytes: sb.function.memory_mb << 20,
            driver: sb.driver,
            boot_id: sb.hello.boot_id.clone(),
        }
    }
}

/// One distribution: an hdrhistogram plus the exact sum, min and max.
struct Hist {
    h: Histogram<u64>,
    sum: u64,
    min: u64,
    max: u64,
}

impl Hist {
    fn new() -> Self {
        Self {
            h: Histogram::new(2).expect("2 significant digits is a valid precision"),
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn record(&mut self, v: u64) {
        // An auto-resizing histogram only fails for values it cannot represent at all.
        if self.h.record(v).is_ok() {
            self.sum = self.sum.saturating_add(v);
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }

    /// The export form, values multiplied by `scale` (µs → s, KiB → bytes).
    fn point(&self, attributes: Attrs, bounds: &[f64], scale: f64) -> HistPoint {
        let runs = self.h.iter_recorded().map(|v| {
            (
                self.h.median_equivalent(v.value_iterated_to()) as f64 * scale,
                v.count_at_value(),
            )
        });
        HistPoint {
            attributes,
            bounds: bounds.to_vec(),
            bucket_counts: bucketize(bounds, runs),
            count: self.h.len(),
            sum: self.sum as f64 * scale,
            min: self.min as f64 * scale,
            max: self.max as f64 * scale,
        }
    }
}

fn record(slot: &mut Option<Hist>, v: u64) {
    slot.get_or_insert_with(Hist::new).record(v);
}

#[derive(Default)]
struct Series {
    meta: Option<Arc<SandboxMeta>>,
    ended: bool,
    counts: Counts,
    /// Warm, cold.
    invoke: [Option<Hist>; 2],
    init: Option<Hist>,
    phases: [Option<Hist>; PHASES.len()],
    mem: Option<Hist>,
    cpu: Option<Hist>,
}

impl Series {
    fn add(&mut self, s: &Sample) {
        if !self.counts.add(s) {
            return;
        }
        if let Some(i) = s.init_us() {
            record(&mut self.init, i.max(1));
        }
        record(&mut self.invoke[usize::from(s.cold)], s.total_us.max(1));
        for (slot, v) in self.phases.iter_mut().zip(s.phases_us) {
            if v != NO_PHASE {
                record(slot, v.max(1));
            }
        }
        if s.max_rss_kib > 0 {
            record(&mut self.mem, s.max_rss_kib);
        }
        if s.cpu_us > 0 {
            record(&mut self.cpu, s.cpu_us);
        }
    }

    fn export(&self, function: &str) -> ResourceIn {
        let attributes: Attrs = match &self.meta {
            Some(m) => m.resource(),
            None => vec![
                ("faas.name".into(), function.into()),
                ("faas.version".into(), "$LATEST".into()),
            ],
        };
        let counter = |name, description, unit, value| MetricIn {
            name,
            description,
            unit,
            points: Points::Counter(vec![Point {
                attributes: Vec::new(),
                value,
            }]),
        };
        let mut metrics = vec![
            counter(
                "faas.invocations",
                "Invocations (all outcomes but throttles)",
                "{invocation}",
                self.counts.invocations,
            ),
            counter(
                "faas.coldstarts",
                "Invocations that started a sandbox",
                "{coldstart}",
                self.counts.coldstarts,
            ),
            counter(
                "faas.errors",
                "Failed invocations (function errors, timeouts, OOM kills)",
                "{error}",
                self.counts.errors,
            ),
            counter(
                "faas.timeouts",
                "Invocations that hit their timeout",
                "{timeout}",
                self.counts.timeouts,
            ),
        ];
        if self.meta.is_none() {
            metrics.push(counter(
                "sandscope.platform_errors",
                "Invocations whose sandbox could not be started",
                "{error}",
                self.counts.platform,
            ));
            metrics.push(counter(
                "sandscope.throttles",
                "Requests rejected for lack of capacity",
                "{request}",
                self.counts.throttles,
            ));
        }
        let hist = |name, description, unit, points: Vec<HistPoint>| MetricIn {
            name,
            description,
            unit,
            points: Points::Histogram(points),
        };
        let invoke: Vec<HistPoint> = self
            .invoke
            .iter()
            .enumerate()
            .filter_map(|(cold, h)| {
                h.as_ref().map(|h| {
                    h.point(
                        vec![
                            ("faas.coldstart".into(), AttrValue::Bool(cold == 1)),
                            ("faas.trigger".into(), "http".into()),
                        ],
                        &DURATION_BOUNDS_S,
                        1e-6,
                    )
                })
            })
            .collect();
        if !invoke.is_empty() {
            metrics.push(hist(
                "faas.invoke_duration",
                "Request received to response ready, agent side",
                "s",
                invoke,
            ));
        }
        if let Some(h) = &self.init {
            metrics.push(hist(
                "faas.init_duration",
                "Cold-start init: spawn through runtime ready",
                "s",
                vec![h.point(Vec::new(), &DURATION_BOUNDS_S, 1e-6)],
            ));
        }
        let phases: Vec<HistPoint> = PHASES
            .iter()
            .zip(&self.phases)
            .filter_map(|(name, h)| {
                h.as_ref().map(|h| {
                    h.point(
                        vec![("phase".into(), (*name).into())],
                        &DURATION_BOUNDS_S,
                        1e-6,
                    )
                })
            })
            .collect();
        if !phases.is_empty() {
            metrics.push(hist(
                "sandscope.coldstart.phase.duration",
                "Time in each phase of an invocation (queue, thaw, spawn, ..., invoke)",
                "s",
                phases,
            ));
        }
        if let Some(h) = &self.mem {
            metrics.push(hist(
                "faas.mem_usage",
                "Peak resident memory of the handler per invocation",
                "By",
                vec![h.point(Vec::new(), &MEMORY_BOUNDS_BY, 1024.0)],
            ));
        }
        if let Some(h) = &self.cpu {
            metrics.push(hist(
                "faas.cpu_usage",
                "CPU time of the handler per invocation",
                "s",
                vec![h.point(Vec::new(), &DURATION_BOUNDS_S, 1e-6)],
            ));
        }
        ResourceIn {
            attributes,
            metrics,
        }
    }
}

/// Every series, keyed by (function index, sandbox serial; 0 = no sandbox).
pub struct AllSeries {
    names: Vec<String>,
    map: BTreeMap<(u32, u32), Series>,
}

impl AllSeries {
    /// Series for functions named `names` (indexes are sample function ids).
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names,
            map: BTreeMap::new(),
        }
    }

    /// Count one sample.
    pub fn add(&mut self, s: &Sample) {
        if (s.function as usize) < self.names.len() {
            self.map.entry((s.function, s.sandbox)).or_default().add(s);
        }
    }

    /// A sandbox started: what its resource says.
    pub fn register(&mut self, serial: u32, meta: Arc<SandboxMeta>) {
        self.map.entry((meta.fn_index, serial)).or_default().meta = Some(meta.clone());
    }

    /// A sandbox ended: export it once more, then forget it.
    pub fn ended(&mut self, serial: u32) {
        for ((_, s), v) in self.map.iter_mut() {
            if *s == serial {
                v.ended = true;
            }
        }
    }

    /// Series currently kept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no series is kept.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every series' cumulative figures; ended sandboxes are dropped afterwards.
    pub fn export(&mut self) -> Vec<ResourceIn> {
        let out = self
            .map
            .iter()
            .map(|((f, _), s)| s.export(&self.names[*f as usize]))
            .collect();
        self.map.retain(|_, s| !s.ended);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::{Outcome, Phase};

    fn meta(serial: u32) -> Arc<SandboxMeta> {
        Arc::new(SandboxMeta {
            fn_index: 0,
            id: format!("f-{serial}"),
            function: "f".into(),
            max_memory_bytes: 128 << 20,
            driver: "process",
            boot_id: "b".into(),
        })
    }

    fn counter(r: &ResourceIn, name: &str) -> u64 {
        r.metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| match &m.points {
                Points::Counter(p) => Some(p[0].value),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    fn hists<'a>(r: &'a ResourceIn, name: &str) -> &'a [HistPoint] {
        r.metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| match &m.points {
                Points::Histogram(p) => Some(&p[..]),
                _ => None,
            })
            .unwrap_or(&[])
    }

    #[test]
    fn each_sandbox_is_a_resource_with_its_own_warm_and_cold_histograms() {
        let mut all = AllSeries::new(vec!["f".into()]);
        all.register(1, meta(1));
        let mut cold = Sample::new(0, true, Outcome::Ok);
        cold.sandbox = 1;
        cold.total_us = 20_000;
        cold.set(Phase::Spawn, std::time::Duration::from_micros(4_000));
        cold.max_rss_kib = 2048;
        all.add(&cold);
        for i in 0..10 {
            let mut w = Sample::new(0, false, Outcome::Ok);
            w.sandbox = 1;
            w.total_us = 300 + i;
            all.add(&w);
        }
        let mut to = Sample::new(0, false, Outcome::Timeout);
        to.sandbox = 1;
        to.total_us = 3_000_000;
        all.add(&to);
        all.add(&Sample::new(0, false, Outcome::Throttled));
        let out = all.export();
        assert_eq!(
            out.len(),
            2,
            "the sandbox and the function's no-sandbox series"
        );
        let sb = out
            .iter()
            .find(|r| r.attributes.iter().any(|(k, _)| k == "faas.instance"))
            .unwrap();
        assert!(sb
            .attributes
            .contains(&("faas.max_memory".into(), AttrValue::Int(128 << 20))));
        assert_eq!(counter(sb, "faas.invocations"), 12);
        assert_eq!(counter(sb, "faas.coldstarts"), 1);
        assert_eq!(
            (counter(sb, "faas.errors"), counter(sb, "faas.timeouts")),
            (1, 1)
        );
        let inv = hists(sb, "faas.invoke_duration");
        assert_eq!(inv.len(), 2);
        let warm = inv
            .iter()
            .find(|p| {
                p.attributes
                    .contains(&("faas.coldstart".into(), AttrValue::Bool(false)))
            })
            .unwrap();
        assert_eq!(warm.count, 11);
        assert_eq!(warm.bucket_counts.iter().sum::<u64>(), 11);
        // 300..309 µs fall in (0.25 ms, 0.5 ms]; the 3 s timeout in (2.5 s, 5 s].
        let at = |bound: f64| DURATION_BOUNDS_S.iter().position(|b| *b == bound).unwrap();
        assert_eq!(warm.bucket_counts[at(0.0005)], 10);
        assert_eq!(warm.bucket_counts[at(5.0)], 1);
        assert!((warm.sum - (3045e-6 + 3.0)).abs() < 1e-9, "{}", warm.sum);
        assert_eq!(warm.min, 300e-6);
        let phase = &hists(sb, "sandscope.coldstart.phase.duration")[0];
        assert_eq!(phase.attributes, vec![("phase".into(), "spawn".into())]);
        assert_eq!(hists(sb, "faas.mem_usage")[0].sum, 2048.0 * 1024.0);
        let none = out.iter().find(|r| r.attributes.len() == 2).unwrap();
        assert_eq!(counter(none, "sandscope.throttles"), 1);
        assert_eq!(counter(none, "faas.invocations"), 0);
        // An ended sandbox is exported once more, then forgotten.
        all.ended(1);
        assert_eq!(all.export().len(), 2);
        assert_eq!(all.export().len(), 1);
    }
}
