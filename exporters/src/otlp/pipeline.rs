//! The signal-agnostic export pipeline: a bounded queue in front of one background task
//! that batches, encodes (through the signal's [`Encode`]r), sends with retries, spools
//! what cannot be delivered and replays the spool when the backend answers again.
//!
//! Accounting, in records ([`Encode::records`]): every record handed to
//! [`Exporter::send`] is counted in `accepted` and ends in exactly one of `exported`,
//! `dropped` or `spooled` (queue full, refused by the backend, failed after its retries
//! without a spool, evicted from a full spool). Records found in the spool at start are
//! counted in `spooled` only.

use super::spool::{Pushed, Spool};
use super::transport::{Outcome, Transport};
use super::{OtlpConfig, OtlpError, Signal};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// One encoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The `Export*ServiceRequest`, protobuf, uncompressed.
    pub body: Vec<u8>,
    /// Records in it. Fewer than the batch's [`Encode::records`] means the encoder left
    /// some out: the difference is counted as dropped.
    pub records: u64,
}

/// How items of one signal become request bodies (an `Export*ServiceRequest`, protobuf).
pub trait Encode: Send + 'static {
    /// What the agent hands over.
    type Item: Send + 'static;
    /// The signal (URL path, gRPC service, spool directory).
    const SIGNAL: Signal;
    /// Records one item counts for (log records, spans, data points) in the drop/export
    /// counters.
    fn records(item: &Self::Item) -> u64;
    /// Encode a batch (non-empty) as one request body.
    fn encode(&mut self, items: Vec<Self::Item>) -> Encoded;
}

/// First backoff between attempts; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// While a batch fills, the task looks at the queue this often instead of waking for
/// every item: under load that is a hundred wake-ups a second rather than one per record
/// (cross-core wake-ups are the expensive part on small VMs). A full batch or a flush is
/// noticed within one tick.
pub const FILL_TICK: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Spooled requests sent per replay round before the queue gets a turn again.
const REPLAY_ROUND: usize = 16;
/// Shortest pause between replay rounds while the backend is down.
const MIN_REPLAY_PAUSE: Duration = Duration::from_secs(1);
/// How long [`Exporter::flush`] waits past its deadline for the task to confirm.
const FLUSH_GRACE: Duration = Duration::from_secs(2);
/// One warning per this interval at most (per exporter).
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    exported: AtomicU64,
    dropped: AtomicU64,
    failed_requests: AtomicU64,
    spooled: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Shared {
    c: Counters,
    /// Deadlines of the flushes under way.
    flushes: Mutex<Vec<Instant>>,
    /// The earliest of them: past it, the task stops trying and spools or drops.
    deadline: watch::Sender<Option<Instant>>,
}

impl Shared {
    fn update_flushes(&self, f: impl FnOnce(&mut Vec<Instant>)) {
        let mut v = self.flushes.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut v);
        self.deadline.send_replace(v.iter().min().copied());
    }
}

/// Removes its flush deadline when the flush ends, also when its future is dropped.
struct FlushGuard<'a> {
    shared: &'a Shared,
    at: Instant,
}

impl<'a> FlushGuard<'a> {
    fn new(shared: &'a Shared, at: Instant) -> Self {
        shared.update_flushes(|v| v.push(at));
        Self { shared, at }
    }
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        let at = self.at;
        self.shared.update_flushes(|v| {
            if let Some(i) = v.iter().position(|d| *d == at) {
                v.swap_remove(i);
            }
        });
    }
}

enum Msg<T> {
    Item(T),
    /// Everything before this in the queue has been handled: confirm.
    Flush(oneshot::Sender<()>),
}

/// Exports items of one signal. Cheap to clone; the background task ends when every
/// clone is dropped.
pub struct Exporter<E: Encode> {
    tx: mpsc::Sender<Msg<E::Item>>,
    shared: Arc<Shared>,
}

impl<E: Encode> Clone for Exporter<E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<E: Encode> std::fmt::Debug for Exporter<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("signal", &E::SIGNAL)
            .field("counters", &self.shared.c)
            .finish()
    }
}

impl<E: Encode> Exporter<E> {
    /// Validate `cfg`, open the spool (counting what a previous run left in it) and start
    /// the export task on the current tokio runtime.
    pub fn start(cfg: &OtlpConfig, enc: E) -> Result<Self, OtlpError> {
        cfg.validate()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| OtlpError::NoRuntime)?;
        let transport = Transport::new(cfg, E::SIGNAL)?;
        let spool = match &cfg.spool {
            Some(s) => Some(Spool::open(&s.dir, E::SIGNAL, s.max_bytes)?),
            None => None,
        };
        let (deadline, deadline_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            c: Counters::default(),
            flushes: Mutex::new(Vec::new()),
            deadline,
        });
        if let Some(s) = &spool {
            shared.c.spooled.store(s.records(), Ordering::Relaxed);
        }
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let task = Task {
            max_batch: cfg.max_batch.max(1),
            interval: cfg.interval,
            attempts: cfg.retries.saturating_add(1),
            replay_pause: cfg.interval.max(MIN_REPLAY_PAUSE),
            enc,
            rx,
            transport,
            spool,
            shared: shared.clone(),
            deadline: deadline_rx,
            next_replay: Instant::now(),
            warn: Warn::default(),
        };
        rt.spawn(task.run());
        Ok(Self { tx, shared })
    }

    /// Queue an item; never waits (a full queue drops it, counted).
    pub fn send(&self, item: E::Item) {
        let n = E::records(&item);
        Counters::add(&self.shared.c.accepted, n);
        if self.tx.try_send(Msg::Item(item)).is_err() {
            Counters::add(&self.shared.c.dropped, n);
        }
    }

    /// Count records lost before they reached the exporter (e.g. a lagging subscriber).
    pub fn count_dropped(&self, n: u64) {
        Counters::add(&self.shared.c.dropped, n);
    }

    /// Records dropped (queue full, refused, failed without a spool, evicted from the
    /// spool, lost upstream).
    pub fn dropped(&self) -> u64 {
        self.shared.c.dropped.load(Ordering::Relaxed)
    }

    /// Records the backend accepted (including replayed ones).
    pub fn exported(&self) -> u64 {
        self.shared.c.exported.load(Ordering::Relaxed)
    }

    /// Records handed to [`send`](Self::send) so far (queued or dropped at once).
    pub fn accepted(&self) -> u64 {
        self.shared.c.accepted.load(Ordering::Relaxed)
    }

    /// Requests that failed (each attempt counts, replays too).
    pub fn failed_requests(&self) -> u64 {
        self.shared.c.failed_requests.load(Ordering::Relaxed)
    }

    /// Records currently waiting in the spool (0 without a spool).
    pub fn spooled(&self) -> u64 {
        self.shared.c.spooled.load(Ordering::Relaxed)
    }

    /// Export everything queued before this call; what cannot be sent within `within`
    /// goes to the spool (if configured) or is counted dropped. Used on agent shutdown and
    /// in tests.
    pub async fn flush(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let _guard = FlushGuard::new(&self.shared, deadline);
        let hard = deadline + FLUSH_GRACE;
        let (ack, done) = oneshot::channel();
        if !matches!(
            tokio::time::timeout_at(hard, self.tx.send(Msg::Flush(ack))).await,
            Ok(Ok(()))
        ) {
            return;
        }
        let _ = tokio::time::timeout_at(hard, done).await;
    }
}

/// Rate-limited warnings on stderr.
#[derive(Debug, Default)]
struct Warn {
    last: Option<Instant>,
    suppressed: u64,
}

impl Warn {
    fn warn(&mut self, signal: Signal, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < WARN_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        let more = match std::mem::take(&mut self.suppressed) {
            0 => String::new(),
            n => format!(" ({n} similar messages suppressed)"),
        };
        eprintln!("sandscope: OTLP {}: {}{more}", signal.name(), msg());
        self.last = Some(now);
    }
}

/// Run `fut`, unless a flush deadline passes first (`None`).
async fn bounded<F: Future>(
    dl: &mut watch::Receiver<Option<Instant>>,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        let d = *dl.borrow_and_update();
        match d {
            None => {
                tokio::select! {
                    biased;
                    r = &mut fut => return Some(r),
                    ch = dl.changed() => if ch.is_err() { return Some(fut.await) },
                }
            }
            Some(d) => {
                if Instant::now() >= d {
                    return None;
                }
                tokio::select! {
                    biased;
                    r = &mut fut => return Some(r),
                    _ = tokio::time::sleep_until(d) => return None,
                    ch = dl.changed() => if ch.is_err() { return Some(fut.await) },
                }
            }
        }
    }
}

/// How a request ended after its attempts.
enum Delivery {
    Delivered,
    /// Refused by the backend: drop.
    Rejected,
    /// Still failing after the last attempt (or out of flush time): spool or drop.
    Failed,
}

struct Task<E: Encode> {
    max_batch: usize,
    interval: Duration,
    attempts: u32,
    replay_pause: Duration,
    enc: E,
    rx: mpsc::Receiver<Msg<E::Item>>,
    transport: Transport,
    spool: Option<Spool>,
    shared: Arc<Shared>,
    deadline: watch::Receiver<Option<Instant>>,
    next_replay: Instant,
    warn: Warn,
}

impl<E: Encode> Task<E> {
    fn spool_waiting(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
    }

    fn sync_spooled(&self) {
        let n = self.spool.as_ref().map(Spool::records).unwrap_or(0);
        self.shared.c.spooled.store(n, Ordering::Relaxed);
    }

    fn flush_expired(&self) -> bool {
        matches!(*self.deadline.borrow(), Some(d) if Instant::now() >= d)
    }

    async fn run(mut self) {
        loop {
            // Wait for a first item (or a replay round, when the spool holds requests).
            let first = if self.spool_waiting() {
                tokio::select! {
                    biased;
                    m = self.rx.recv() => m,
                    _ = tokio::time::sleep_until(self.next_replay) => {
                        self.replay().await;
                        continue;
                    }
                }
            } else {
                self.rx.recv().await
            };
            let mut batch = Vec::new();
            match first {
                None => break,
                Some(Msg::Flush(ack)) => {
                    let _ = ack.send(());
                    continue;
                }
                Some(Msg::Item(i)) => batch.push(i),
            }
            // Fill the batch until it is full or the interval passes, draining the queue
            // every FILL_TICK.
            let end = Instant::now() + self.interval;
            let mut ack = None;
            let mut closed = false;
            'fill: loop {
                while batch.len() < self.max_batch {
                    match self.rx.try_recv() {
                        Ok(Msg::Item(i)) => batch.push(i),
                        Ok(Msg::Flush(a)) => {
                            ack = Some(a);
                            break 'fill;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break 'fill;
                        }
                    }
                }
                let now = Instant::now();
                if batch.len() >= self.max_batch || now >= end {
                    break;
                }
                tokio::time::sleep_until(end.min(now + FILL_TICK)).await;
            }
            self.export_batch(batch).await;
            if let Some(a) = ack {
                let _ = a.send(());
            }
            if closed {
                break;
            }
        }
    }

    async fn export_batch(&mut self, batch: Vec<E::Item>) {
        let c = &self.shared.c;
        let n: u64 = batch.iter().map(E::records).sum();
        let enc = self.enc.encode(batch);
        let r = enc.records.min(n);
        Counters::add(&c.dropped, n - r);
        if r == 0 {
            return;
        }
        match self.deliver(&enc.body, self.attempts).await {
            Delivery::Delivered => {
                Counters::add(&self.shared.c.exported, r);
                if self.spool_waiting() {
                    self.replay().await;
                }
            }
            Delivery::Rejected => Counters::add(&self.shared.c.dropped, r),
            Delivery::Failed => self.spool_or_drop(&enc.body, r),
        }
    }

    /// Up to `attempts` attempts with backoff, cut short by a flush deadline.
    async fn deliver(&mut self, body: &[u8], attempts: u32) -> Delivery {
        let signal = E::SIGNAL;
        let mut delay = FIRST_BACKOFF;
        for attempt in 0..attempts {
            if self.flush_expired() {
                return Delivery::Failed;
            }
            let out = bounded(&mut self.deadline, self.transport.export(body)).await;
            let failed = &self.shared.c.failed_requests;
            match out {
                Some(Outcome::Delivered) => return Delivery::Delivered,
                Some(Outcome::Reject(why)) => {
                    Counters::add(failed, 1);
                    self.warn
                        .warn(signal, || format!("backend refused a request: {why}"));
                    return Delivery::Rejected;
                }
                Some(Outcome::Retry(why)) => {
                    Counters::add(failed, 1);
                    self.warn.warn(signal, || format!("request failed: {why}"));
                }
                None => {
                    Counters::add(failed, 1);
                    return Delivery::Failed;
                }
            }
            if attempt + 1 < attempts {
                if bounded(&mut self.deadline, tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return Delivery::Failed;
                }
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
        Delivery::Failed
    }

    fn spool_or_drop(&mut self, body: &[u8], records: u64) {
        let signal = E::SIGNAL;
        let dropped = &self.shared.c.dropped;
        let Some(spool) = self.spool.as_mut() else {
            Counters::add(dropped, records);
            return;
        };
        match spool.push(body, records) {
            Pushed::Stored { evicted } => Counters::add(dropped, evicted),
            Pushed::TooLarge => {
                Counters::add(dropped, records);
                self.warn.warn(signal, || {
                    format!("a {} byte request does not fit the spool", body.len())
                });
            }
            Pushed::Failed { evicted, err } => {
                Counters::add(dropped, evicted + records);
                self.warn
                    .warn(signal, || format!("{err}: {}", source(&err)));
            }
        }
        self.next_replay = Instant::now() + self.replay_pause;
        self.sync_spooled();
    }

    /// Send spooled requests oldest first, one attempt each, until one fails retryably,
    /// the spool is empty, or a round is done.
    async fn replay(&mut self) {
        let signal = E::SIGNAL;
        for _ in 0..REPLAY_ROUND {
            let Some(spool) = self.spool.as_mut() else {
                return;
            };
            let body = match spool.read_oldest() {
                Some(Ok(b)) => b,
                Some(Err(e)) => {
                    self.warn.warn(signal, || format!("{e}: {}", source(&e)));
                    self.pop_oldest(Disposition::Dropped);
                    continue;
                }
                None => return,
            };
            match self.deliver(&body, 1).await {
                Delivery::Delivered => self.pop_oldest(Disposition::Exported),
                Delivery::Rejected => self.pop_oldest(Disposition::Dropped),
                Delivery::Failed => {
                    self.next_replay = Instant::now() + self.replay_pause;
                    return;
                }
            }
        }
        // A full round went through: carry on soon, after the queue had its turn.
        self.next_replay = Instant::now();
    }

    fn pop_oldest(&mut self, d: Disposition) {
        let Some((records, res)) = self.spool.as_mut().and_then(Spool::pop_oldest) else {
            return;
        };
        let c = &self.shared.c;
        match d {
            Disposition::Exported => Counters::add(&c.exported, records),
            Disposition::Dropped => Counters::add(&c.dropped, records),
        }
        self.sync_spooled();
        if let Err(e) = res {
            self.warn.warn(E::SIGNAL, || format!("{e}: {}", source(&e)));
        }
    }
}

#[derive(Clone, Copy)]
enum Disposition {
    Exported,
    Dropped,
}

fn source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::super::test_http::{rec, Backend};
    use super::super::{LogsEncoder, SpoolConfig};
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use prost::Message;

    fn times(body: &[u8]) -> Vec<u64> {
        ExportLogsServiceRequest::decode(body)
            .unwrap()
            .resource_logs[0]
            .scope_logs[0]
            .log_records
            .iter()
            .map(|r| r.time_unix_nano)
            .collect()
    }

    fn cfg(b: &Backend, spool: Option<&std::path::Path>) -> OtlpConfig {
        let mut c = OtlpConfig::new(&b.url());
        c.interval = Duration::from_millis(20);
        c.max_batch = 3;
        c.retries = 1;
        c.spool = spool.map(|d| SpoolConfig {
            dir: d.to_path_buf(),
            max_bytes: 1 << 20,
        });
        c
    }

    fn start(c: &OtlpConfig) -> Exporter<LogsEncoder> {
        Exporter::start(c, LogsEncoder::new(c)).unwrap()
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_requests_are_dropped_at_once_and_never_spooled() {
        let b = Backend::start(400).await;
        let d = tempfile::tempdir().unwrap();
        let e = start(&cfg(&b, Some(d.path())));
        for i in 0..7 {
            e.send(rec(i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!(e.accepted(), 7);
        assert_eq!(e.dropped(), 7);
        assert_eq!((e.exported(), e.spooled()), (0, 0));
        assert_eq!(b.got().len(), 3, "3 + 3 + 1, one attempt each");
        assert_eq!(e.failed_requests(), 3);
        assert_eq!(std::fs::read_dir(d.path().join("logs")).unwrap().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overload_is_retried_then_spooled_then_replayed_oldest_first() {
        let b = Backend::start(503).await;
        let d = tempfile::tempdir().unwrap();
        let e = start(&cfg(&b, Some(d.path())));
        for i in 0..7 {
            e.send(rec(i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!(e.spooled(), 7);
        assert_eq!((e.exported(), e.dropped()), (0, 0));
        // Replays may already have started failing too; every batch had its 2 attempts.
        let attempts = b.got().len() as u64;
        assert!(attempts >= 6, "{attempts}");
        assert_eq!(e.failed_requests(), attempts);
        b.status.store(200, std::sync::atomic::Ordering::SeqCst);
        until("spool drained", || e.spooled() == 0).await;
        assert_eq!((e.exported(), e.dropped(), e.accepted()), (7, 0, 7));
        let delivered: Vec<Vec<u64>> = b
            .got()
            .iter()
            .filter(|g| g.status == 200)
            .map(|g| times(&g.body))
            .collect();
        assert_eq!(delivered, [vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert_eq!(std::fs::read_dir(d.path().join("logs")).unwrap().count(), 0);
        // New traffic flows normally after the replay.
        e.send(rec(7));
        e.flush(Duration::from_secs(10)).await;
        assert_eq!(e.exported(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_spool_a_failing_backend_drops_exactly_what_it_could_not_take() {
        let b = Backend::start(503).await;
        let e = start(&cfg(&b, None));
        for i in 0..4 {
            e.send(rec(i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!((e.dropped(), e.exported(), e.spooled()), (4, 0, 0));
        assert_eq!(e.failed_requests(), 4, "2 requests, 2 attempts each");
        b.status.store(200, std::sync::atomic::Ordering::SeqCst);
        for i in 4..6 {
            e.send(rec(i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!((e.dropped(), e.exported(), e.accepted()), (4, 2, 6));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_is_bounded_even_when_the_backend_hangs() {
        let b = Backend::start(200).await;
        b.hang.store(true, std::sync::atomic::Ordering::SeqCst);
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(&b, Some(d.path()));
        c.timeout = Duration::from_secs(30);
        c.retries = 5;
        let e = start(&c);
        for i in 0..9 {
            e.send(rec(i));
        }
        let t0 = Instant::now();
        e.flush(Duration::from_millis(300)).await;
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!((e.spooled(), e.dropped(), e.exported()), (9, 0, 0));
        // After the flush the exporter keeps its normal patience (30 s per attempt): a
        // new record is neither exported nor given up on within a second.
        e.send(rec(9));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!((e.spooled(), e.dropped(), e.exported()), (9, 0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_spooled_by_a_previous_run_are_counted_and_replayed() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(d.path(), Signal::Logs, 1 << 20).unwrap();
            let mut enc = LogsEncoder::new(&OtlpConfig::new("http://h:1"));
            for chunk in [vec![rec(0), rec(1)], vec![rec(2)]] {
                let e = enc.encode(chunk);
                assert!(matches!(s.push(&e.body, e.records), Pushed::Stored { .. }));
            }
        }
        let b = Backend::start(503).await;
        let e = start(&cfg(&b, Some(d.path())));
        assert_eq!((e.spooled(), e.accepted()), (3, 0));
        // The first replay fails (503) and leaves the files; the next one delivers.
        until("a replay attempt", || !b.got().is_empty()).await;
        assert_eq!(e.spooled(), 3);
        b.status.store(200, std::sync::atomic::Ordering::SeqCst);
        until("spool drained", || e.spooled() == 0).await;
        assert_eq!((e.exported(), e.dropped()), (3, 0));
        let delivered: Vec<Vec<u64>> = b
            .got()
            .iter()
            .filter(|g| g.status == 200)
            .map(|g| times(&g.body))
            .collect();
        assert_eq!(delivered, [vec![0, 1], vec![2]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_spool_drops_its_oldest_and_counts_them() {
        let b = Backend::start(503).await;
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(&b, Some(d.path()));
        c.retries = 0;
        c.max_batch = 1;
        // Every one-record request is the same size: room for exactly two.
        // (rec(0) would be smaller: protobuf leaves out a zero timestamp.)
        let one = LogsEncoder::new(&c).encode(vec![rec(1)]).body.len() as u64;
        c.spool.as_mut().unwrap().max_bytes = 2 * one + 1;
        let e = start(&c);
        for i in 1..=5 {
            e.send(rec(i));
        }
        e.flush(Duration::from_secs(10)).await;
        assert_eq!((e.spooled(), e.dropped(), e.exported()), (2, 3, 0));
        b.status.store(200, std::sync::atomic::Ordering::SeqCst);
        until("spool drained", || e.spooled() == 0).await;
        assert_eq!((e.exported(), e.dropped(), e.accepted()), (2, 3, 5));
        let delivered: Vec<Vec<u64>> = b
            .got()
            .iter()
            .filter(|g| g.status == 200)
            .map(|g| times(&g.body))
            .collect();
        assert_eq!(delivered, [vec![4], vec![5]], "the newest two survive");
    }

    struct Lossy;
    impl Encode for Lossy {
        type Item = u64;
        const SIGNAL: Signal = Signal::Metrics;
        fn records(item: &u64) -> u64 {
            *item
        }
        fn encode(&mut self, items: Vec<u64>) -> Encoded {
            // Claims more than it got for the first item, and leaves out everything else.
            Encoded {
                body: vec![1, 2, 3],
                records: if items.len() == 1 { items[0] + 10 } else { 1 },
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_are_counted_per_item_and_encoder_losses_count_as_dropped() {
        let b = Backend::start(200).await;
        let mut c = cfg(&b, None);
        c.max_batch = 10;
        let e = Exporter::start(&c, Lossy).unwrap();
        e.send(4);
        e.flush(Duration::from_secs(10)).await;
        assert_eq!((e.accepted(), e.exported(), e.dropped()), (4, 4, 0));
        e.send(2);
        e.send(3);
        e.flush(Duration::from_secs(10)).await;
        assert_eq!((e.accepted(), e.exported(), e.dropped()), (9, 5, 4));
        assert!(b.got()[0].head.starts_with("post /v1/metrics "));
    }
}
