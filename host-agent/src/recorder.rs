//! Per-invoke samples → histograms, off the invoke path.
//!
//! The invoke path calls [`Recorder::record`]: one push onto a fixed-capacity lock-free
//! queue, no lock, no allocation; a full queue counts a drop instead of waiting. One
//! aggregator task owns every hdrhistogram, drains the queue on a short tick, and builds
//! [`StatsSnapshot`]s on request (draining first, so a snapshot taken after an invoke
//! returned includes it).

use crossbeam_queue::ArrayQueue;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Cold-start and invoke phases, in timeline order (DESIGN §3).
pub const PHASES: [&str; 8] = [
    "queue",
    "thaw",
    "spawn",
    "vmm_setup",
    "kernel",
    "probe_init",
    "runtime_init",
    "invoke",
];

/// Index of a phase in [`PHASES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Phase {
    /// Waiting for capacity.
    Queue = 0,
    /// Thawing a frozen sandbox.
    Thaw = 1,
    /// Driver called → sandbox process running.
    Spawn = 2,
    /// VMM start → first KVM_RUN (VM drivers).
    VmmSetup = 3,
    /// First KVM_RUN → guest init (VM drivers).
    Kernel = 4,
    /// Init start → Hello.
    ProbeInit = 5,
    /// Hello → runtime ready.
    RuntimeInit = 6,
    /// Invoke sent → result received.
    Invoke = 7,
}

/// Marks a phase that did not happen in this invocation.
pub const NO_PHASE: u64 = u64::MAX;

/// How an invocation ended, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Success.
    Ok,
    /// The function failed.
    FunctionError,
    /// Deadline exceeded.
    Timeout,
    /// Killed by the OOM killer at the memory limit.
    OutOfMemory,
    /// The sandbox could not be started or the link broke.
    PlatformError,
    /// Rejected for lack of capacity.
    Throttled,
}

/// One invocation's figures. `Copy`, fixed size: recording it allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Function index in the agent's registry.
    pub function: u32,
    /// The sandbox's serial number ([`crate::pool::Sandbox::serial`]); 0 when the
    /// invocation reached none (throttled, the sandbox failed to start).
    pub sandbox: u32,
    /// A new sandbox was started for this invocation.
    pub cold: bool,
    /// Outcome.
    pub outcome: Outcome,
    /// Request received → response ready, µs.
    pub total_us: u64,
    /// Per-phase µs, [`NO_PHASE`] when not applicable.
    pub phases_us: [u64; PHASES.len()],
    /// Handler peak RSS, KiB.
    pub max_rss_kib: u64,
    /// Handler CPU, µs.
    pub cpu_us: u64,
}

impl Sample {
    /// A sample with no phases set.
    pub fn new(function: u32, cold: bool, outcome: Outcome) -> Self {
        Self {
            function,
            sandbox: 0,
            cold,
            outcome,
            total_us: 0,
            phases_us: [NO_PHASE; PHASES.len()],
            max_rss_kib: 0,
            cpu_us: 0,
        }
    }

    /// Set a phase duration.
    pub fn set(&mut self, p: Phase, d: Duration) {
        self.phases_us[p as usize] = crate::util::us(d);
    }

    /// Init duration (spawn through runtime_init), µs, when cold.
    pub fn init_us(&self) -> Option<u64> {
        if !self.cold {
            return None;
        }
        let s: u64 = [
            Phase::Spawn,
            Phase::VmmSetup,
            Phase::Kernel,
            Phase::ProbeInit,
            Phase::RuntimeInit,
        ]
        .iter()
        .map(|p| self.phases_us[*p as usize])
        .filter(|v| *v != NO_PHASE)
        .sum();
        Some(s)
    }
}

/// The invoke-path side: a bounded lock-free queue and a drop counter.
#[derive(Debug)]
pub struct Recorder {
    queue: ArrayQueue<Sample>,
    dropped: AtomicU64,
    recorded: AtomicU64,
}

impl Recorder {
    /// A recorder holding at most `capacity` undrained samples.
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: ArrayQueue::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
        }
    }

    /// Record a sample; never blocks, never allocates. A full queue counts a drop.
    #[inline]
    pub fn record(&self, s: Sample) {
        if self.queue.push(s).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.recorded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Samples dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Take one queued sample (aggregator side).
    pub fn pop(&self) -> Option<Sample> {
        self.queue.pop()
    }
}

/// Percentile summary of one distribution, µs.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
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
    /// Largest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: u64,
}

fn dist(h: &Histogram<u64>) -> Dist {
    if h.is_empty() {
        return Dist::default();
    }
    Dist {
        count: h.len(),
        p50_us: h.value_at_quantile(0.50),
        p90_us: h.value_at_quantile(0.90),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        mean_us: h.mean() as u64,
    }
}

/// Log2 buckets of `h`: `(upper bound µs, count)` with upper bounds 1, 2, 4, ... µs; a
/// bucket counts the values below its bound and at or above the previous one. Only the
/// buckets from the first to the last non-empty one; empty when there are no samples.
fn log2_buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let all: Vec<(u64, u64)> = h
        .iter_log(1, 2.0)
        .map(|v| {
            (
                v.value_iterated_to().saturating_add(1),
                v.count_since_last_iteration(),
            )
        })
        .collect();
    let first = all.iter().position(|b| b.1 > 0).unwrap_or(0);
    let last = all.iter().rposition(|b| b.1 > 0).map_or(0, |i| i + 1);
    all.get(first..last).map(<[_]>::to_vec).unwrap_or_default()
}

/// One function's figures in a snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStats {
    /// Function name.
    pub name: String,
    /// Invocations (all outcomes but throttles).
    pub invocations: u64,
    /// Cold starts.
    pub coldstarts: u64,
    /// Function errors (incl. timeouts and OOM kills).
    pub errors: u64,
    /// Timeouts.
    pub timeouts: u64,
    /// OOM kills.
    pub oom_kills: u64,
    /// Platform errors (sandbox failed to start, link broke).
    pub platform_errors: u64,
    /// Throttled requests.
    pub throttles: u64,
    /// Warm invocation latency.
    pub warm: Dist,
    /// Cold invocation latency.
    pub cold: Dist,
    /// Warm invocation latency histogram: `(upper bound µs, count)` per log2 bucket
    /// (bounds 1, 2, 4, ... µs; each counts values below its bound), first to last
    /// non-empty bucket.
    pub warm_buckets: Vec<(u64, u64)>,
    /// Cold invocation latency histogram, as `warm_buckets`.
    pub cold_buckets: Vec<(u64, u64)>,
    /// Init duration of cold starts.
    pub init: Dist,
    /// Per-phase distributions (only phases that occurred).
    pub phases: BTreeMap<&'static str, Dist>,
    /// Handler peak RSS per invocation, KiB (as `*_us` fields).
    pub max_rss_kib: Dist,
    /// The latest cold start's phases, µs.
    pub last_cold_start: BTreeMap<&'static str, u64>,
}

/// What `/v1/stats` returns.
#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    /// Per function.
    pub functions: Vec<FunctionStats>,
    /// Telemetry losses.
    pub telemetry: Telemetry,
}

/// Telemetry losses.
#[derive(Debug, Clone, Serialize)]
pub struct Telemetry {
    /// Dropped items by signal.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Records waiting in the OTLP spool, by signal (empty without a spool).
    pub spooled: BTreeMap<&'static str, u64>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// Invocation counts by outcome: the per-function aggregate's and each sandbox series'.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// Invocations (all outcomes but throttles).
    pub invocations: u64,
    /// Cold starts.
    pub coldstarts: u64,
    /// Function errors, timeouts and OOM kills.
    pub errors: u64,
    /// Timeouts.
    pub timeouts: u64,
    /// OOM kills.
    pub oom: u64,
    /// The sandbox could not be started or the link broke.
    pub platform: u64,
    /// Rejected for lack of capacity.
    pub throttles: u64,
}

impl Counts {
    /// Count `s`; false when it was throttled (not an invocation: nothing else to record).
    pub fn add(&mut self, s: &Sample) -> bool {
        if s.outcome == Outcome::Throttled {
            self.throttles += 1;
            return false;
        }
        self.invocations += 1;
        self.coldstarts += u64::from(s.cold);
        match s.outcome {
            Outcome::FunctionError => self.errors += 1,
            Outcome::Timeout => {
                self.errors += 1;
                self.timeouts += 1
            }
            Outcome::OutOfMemory => {
                self.errors += 1;
                self.oom += 1
            }
            Outcome::PlatformError => self.platform += 1,
            Outcome::Ok | Outcome::Throttled => {}
        }
        true
    }
}

struct FnAgg {
    name: String,
    counts: Counts,
    warm: Histogram<u64>,
    cold: Histogram<u64>,
    init: Histogram<u64>,
    phases: Vec<Histogram<u64>>,
    rss: Histogram<u64>,
    last_cold: Option<[u64; PHASES.len()]>,
}

impl FnAgg {
    fn new(name: String) -> Self {
        Self {
            name,
            counts: Counts::default(),
            warm: hist(),
            cold: hist(),
            init: hist(),
            phases: (0..PHASES.len()).map(|_| hist()).collect(),
            rss: hist(),
            last_cold: None,
        }
    }

    fn add(&mut self, s: &Sample) {
        if !self.counts.add(s) {
            return;
        }
        let total = s.total_us.max(1);
        if s.cold {
            self.cold.saturating_record(total);
            if let Some(i) = s.init_us() {
                self.init.saturating_record(i.max(1));
            }
            self.last_cold = Some(s.phases_us);
        } else {
            self.warm.saturating_record(total);
        }
        for (i, v) in s.phases_us.iter().enumerate() {
            if *v != NO_PHASE {
                self.phases[i].saturating_record((*v).max(1));
            }
        }
        if s.max_rss_kib > 0 {
            self.rss.saturating_record(s.max_rss_kib);
        }
    }

    fn stats(&self) -> FunctionStats {
        FunctionStats {
            name: self.name.clone(),
            invocations: self.counts.invocations,
            coldstarts: self.counts.coldstarts,
            errors: self.counts.errors,
            timeouts: self.counts.timeouts,
            oom_kills: self.counts.oom,
            platform_errors: self.counts.platform,
            throttles: self.counts.throttles,
            warm: dist(&self.warm),
            cold: dist(&self.cold),
            warm_buckets: log2_buckets(&self.warm),
            cold_buckets: log2_buckets(&self.cold),
            init: dist(&self.init),
            phases: PHASES
                .iter()
                .zip(&self.phases)
                .filter(|(_, h)| !h.is_empty())
                .map(|(n, h)| (*n, dist(h)))
                .collect(),
            max_rss_kib: dist(&self.rss),
            last_cold_start: self
                .last_cold
                .map(|p| {
                    PHASES
                        .iter()
                        .zip(p)
                        .filter(|(_, v)| *v != NO_PHASE)
                        .map(|(n, v)| (*n, v))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Owns the histograms. Run it with [`Aggregator::spawn`] in one task.
pub struct Aggregator {
    recorder: Arc<Recorder>,
    fns: Vec<FnAgg>,
    /// Per-sandbox series for metric export (only when it is on).
    series: Option<crate::series::AllSeries>,
}

/// Extra drop counters merged into snapshots (e.g. log lines lost on links).
pub type DropSource = Arc<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

enum Request {
    Stats(oneshot::Sender<StatsSnapshot>),
    Series(oneshot::Sender<Vec<exporters::otlp::metrics::ResourceIn>>),
    Register(u32, Arc<crate::series::SandboxMeta>),
    Ended(u32),
}

/// Talks to the aggregator task: snapshots, and the sandboxes' comings and goings.
#[derive(Clone, Debug)]
pub struct SnapshotHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Stats(_) => "Stats",
            Request::Series(_) => "Series",
            Request::Register(..) => "Register",
            Request::Ended(_) => "Ended",
        })
    }
}

impl SnapshotHandle {
    /// A snapshot including every sample recorded before this call.
    pub async fn snapshot(&self) -> Option<StatsSnapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Request::Stats(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Per-sandbox series for metric export (empty when the aggregator keeps none),
    /// including every sample recorded before this call. Ended sandboxes appear one last
    /// time.
    pub async fn series(&self) -> Vec<exporters::otlp::metrics::ResourceIn> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Series(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// A sandbox started (its serial appears in samples from now on).
    pub async fn register(&self, serial: u32, meta: Arc<crate::series::SandboxMeta>) {
        let _ = self.tx.send(Request::Register(serial, meta)).await;
    }

    /// A sandbox ended.
    pub async fn ended(&self, serial: u32) {
        let _ = self.tx.send(Request::Ended(serial)).await;
    }
}

impl Aggregator {
    /// An aggregator for functions named `names` (indexes are sample function ids);
    /// `per_sandbox` keeps the series metric export needs.
    pub fn new(recorder: Arc<Recorder>, names: Vec<String>, per_sandbox: bool) -> Self {
        Self {
            recorder,
            series: per_sandbox.then(|| crate::series::AllSeries::new(names.clone())),
            fns: names.into_iter().map(FnAgg::new).collect(),
        }
    }

    /// Drain the queue into the histograms.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(s) = self.recorder.pop() {
            if let Some(f) = self.fns.get_mut(s.function as usize) {
                f.add(&s);
            }
            if let Some(series) = &mut self.series {
                series.add(&s);
            }
            n += 1;
        }
        n
    }

    /// Build a snapshot of what has been drained.
    pub fn snapshot(&self, extra_drops: &[(&'static str, u64)]) -> StatsSnapshot {
        let mut dropped = BTreeMap::new();
        dropped.insert("samples", self.recorder.dropped());
        for (k, v) in extra_drops {
            dropped.insert(*k, *v);
        }
        StatsSnapshot {
            functions: self.fns.iter().map(FnAgg::stats).collect(),
            telemetry: Telemetry {
                dropped,
                spooled: BTreeMap::new(),
            },
        }
    }

    fn handle(&mut self, req: Request, drops: &DropSource) {
        match req {
            Request::Stats(reply) => {
                self.drain();
                let _ = reply.send(self.snapshot(&drops()));
            }
            Request::Series(reply) => {
                self.drain();
                let _ = reply.send(
                    self.series
                        .as_mut()
                        .map(crate::series::AllSeries::export)
                        .unwrap_or_default(),
                );
            }
            Request::Register(serial, meta) => {
                if let Some(s) = &mut self.series {
                    s.register(serial, meta);
                }
            }
            Request::Ended(serial) => {
                // Samples of its last invocations are counted before it is marked.
                self.drain();
                if let Some(s) = &mut self.series {
                    s.ended(serial);
                }
            }
        }
    }

    /// Spawn the aggregator task; returns the handle used to request snapshots.
    pub fn spawn(mut self, drops: DropSource) -> SnapshotHandle {
        let (tx, mut rx) = mpsc::channel::<Request>(256);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { self.drain(); }
                    req = rx.recv() => match req {
                        Some(req) => self.handle(req, &drops),
                        None => break,
                    }
                }
            }
        });
        SnapshotHandle { tx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(f: u32, cold: bool, outcome: Outcome, total: u64) -> Sample {
        let mut s = Sample::new(f, cold, outcome);
        s.total_us = total;
        s.phases_us[Phase::Invoke as usize] = total / 2;
        if cold {
            s.phases_us[Phase::Spawn as usize] = 100;
            s.phases_us[Phase::ProbeInit as usize] = 200;
            s.phases_us[Phase::RuntimeInit as usize] = 50;
        }
        s
    }

    #[test]
    fn counts_and_splits_warm_cold() {
        let r = Arc::new(Recorder::new(1024));
        let mut a = Aggregator::new(r.clone(), vec!["a".into(), "b".into()], false);
        r.record(sample(0, true, Outcome::Ok, 5000));
        for i in 0..99 {
            r.record(sample(0, false, Outcome::Ok, 100 + i));
        }
        r.record(sample(0, false, Outcome::Timeout, 3_000_000));
        r.record(sample(0, false, Outcome::OutOfMemory, 1000));
        r.record(sample(1, false, Outcome::Throttled, 1));
        r.record(sample(7, false, Outcome::Ok, 1)); // unknown function: ignored
        assert_eq!(a.drain(), 104);
        let s = a.snapshot(&[("log_lines", 3)]);
        let f = &s.functions[0];
        assert_eq!(f.invocations, 102);
        assert_eq!(f.coldstarts, 1);
        assert_eq!(f.errors, 2);
        assert_eq!(f.timeouts, 1);
        assert_eq!(f.oom_kills, 1);
        assert_eq!(f.warm.count, 101);
        assert_eq!(f.cold.count, 1);
        assert_eq!(f.init.count, 1);
        assert!((349..=351).contains(&f.init.p50_us), "{}", f.init.p50_us);
        assert!((140..=152).contains(&f.warm.p50_us), "{}", f.warm.p50_us);
        assert!(f.warm.max_us >= 2_990_000);
        let warm_total: u64 = f.warm_buckets.iter().map(|b| b.1).sum();
        assert_eq!(warm_total, f.warm.count);
        assert!(f.warm_buckets.iter().all(|b| b.0.is_power_of_two()));
        let bucket = |up: u64| f.warm_buckets.iter().find(|b| b.0 == up).map(|b| b.1);
        // 100..=198µs: 100..=127 below 128, 128..=198 below 256.
        assert_eq!(bucket(128), Some(28));
        assert_eq!(bucket(256), Some(71));
        assert_eq!(
            f.warm_buckets.first().map(|b| b.0),
            Some(128),
            "{:?}",
            f.warm_buckets
        );
        assert_eq!(
            f.warm_buckets.last().map(|b| b.1),
            Some(1),
            "the 3s timeout"
        );
        assert_eq!(f.cold_buckets, vec![(8192, 1)], "one 5ms cold start");
        assert!(s.functions[1].warm_buckets.is_empty());
        assert_eq!(f.last_cold_start.get("spawn"), Some(&100));
        assert!(!f.phases.contains_key("thaw"));
        assert_eq!(s.functions[1].throttles, 1);
        assert_eq!(s.functions[1].invocations, 0);
        assert_eq!(s.telemetry.dropped["log_lines"], 3);
        assert_eq!(s.telemetry.dropped["samples"], 0);
    }

    #[test]
    fn full_queue_counts_drops_instead_of_blocking() {
        let r = Recorder::new(4);
        for _ in 0..10 {
            r.record(sample(0, false, Outcome::Ok, 1));
        }
        assert_eq!(r.dropped(), 6);
    }

    #[tokio::test]
    async fn snapshot_includes_samples_recorded_before_the_request() {
        let r = Arc::new(Recorder::new(1024));
        let h = Aggregator::new(r.clone(), vec!["f".into()], true).spawn(Arc::new(Vec::new));
        r.record(sample(0, false, Outcome::Ok, 10));
        let s = h.snapshot().await.unwrap();
        assert_eq!(s.functions[0].invocations, 1);
        // Per-sandbox series follow registrations; an ended sandbox shows once more.
        h.register(
            3,
            Arc::new(crate::series::SandboxMeta {
                fn_index: 0,
                id: "f-3".into(),
                function: "f".into(),
                max_memory_bytes: 1 << 27,
                driver: "process",
                boot_id: "b".into(),
            }),
        )
        .await;
        let mut warm = sample(0, false, Outcome::Ok, 10);
        warm.sandbox = 3;
        r.record(warm);
        h.ended(3).await;
        assert_eq!(h.series().await.len(), 2, "f-3 and the no-sandbox series");
        assert_eq!(h.series().await.len(), 1);
    }
}
