//! The agent: function registry, pools, the invoke path, the reaper, and the views the
//! API serves. One instance per host.

use crate::config::{AgentConfig, FunctionSpec};
use crate::drivers::{self, Driver, DriverError, LinkSource, SandboxSpec};
use crate::link::{Link, LinkError, LogLine};
use crate::metrics::AgentMetrics;
use crate::pool::{BootTimes, Pool, Sandbox, SandboxState};
use crate::recorder::{
    Aggregator, Outcome, Phase, Recorder, Sample, SnapshotHandle, StatsSnapshot,
};
use crate::util::us;
use exporters::jsonl::{EventStatus, InvokeRecord, JsonlSink};
use exporters::otlp::traces::TraceContext;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No driver could be set up.
    #[error("no sandbox driver available")]
    Driver(#[from] DriverError),
    /// The JSON-lines output could not be opened.
    #[error("telemetry output")]
    Jsonl(#[from] exporters::jsonl::JsonlError),
    /// The alert rules file is invalid.
    #[error("alert rules")]
    Rules(#[from] crate::alerts::RulesError),
    /// The OTLP exporter could not start.
    #[error("OTLP export")]
    Otlp(#[from] exporters::otlp::OtlpError),
}

/// Why an invocation did not reach the function.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No such function.
    #[error("function not found: {0}")]
    NotFound(String),
    /// No capacity.
    #[error("{0}")]
    Throttled(String),
    /// Request payload over the limit.
    #[error("request payload of {size} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// The platform failed (driver could not start a sandbox, ...).
    #[error("sandbox could not be started: {0}")]
    Platform(String),
}

/// Function-visible outcome kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Handler succeeded.
    Ok,
    /// Handler failed.
    FunctionError,
    /// Deadline passed; sandbox replaced.
    Timeout,
    /// Killed at the memory limit.
    OutOfMemory,
}

/// The result of an invocation that reached a sandbox.
#[derive(Debug, Clone, Serialize)]
pub struct Invocation {
    /// Request id.
    pub invoke_id: String,
    /// Function.
    pub function: String,
    /// Sandbox that ran it.
    pub sandbox_id: String,
    /// A new sandbox was started for it.
    pub cold: bool,
    /// Outcome.
    pub status: Status,
    /// Response payload (or the handler's output on error).
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Error class (Lambda style), empty on success.
    pub error_type: String,
    /// Error message, empty on success.
    pub error_message: String,
    /// Request → response, µs.
    pub total_us: u64,
    /// Init duration for cold starts, µs.
    pub init_us: Option<u64>,
    /// Phases that occurred, µs.
    pub phases: BTreeMap<&'static str, u64>,
    /// Handler peak RSS, KiB.
    pub max_rss_kib: u64,
    /// Handler CPU, µs.
    pub cpu_us: u64,
    /// The invocation's log (START, function lines, END, REPORT), last
    /// [`LOG_TAIL_BYTES`] bytes; only when [`InvokeOptions::log_tail`] asked for it.
    #[serde(skip)]
    pub log_tail: Option<String>,
}

/// How long past its timeout an invocation may take before the agent gives up on the
/// sandbox (the probe enforces the timeout itself and answers within a few ms of it; a
/// sandbox that neither takes its event nor answers is ended at this deadline).
pub const INVOKE_GRACE: Duration = Duration::from_millis(750);

/// Size of the log tail returned for `X-Amz-Log-Type: Tail`, as Lambda's.
pub const LOG_TAIL_BYTES: usize = 4096;

/// Options of one invocation.
#[derive(Debug, Default, Clone)]
pub struct InvokeOptions {
    /// W3C traceparent to pass to the sandbox.
    pub traceparent: String,
    /// Collect the invocation's log tail ([`Invocation::log_tail`]).
    pub log_tail: bool,
}

/// See the module docs.
pub struct Agent {
    cfg: AgentConfig,
    driver: Arc<dyn Driver>,
    driver_reason: String,
    pools: Vec<Arc<Pool>>,
    by_name: HashMap<String, usize>,
    sandboxes: Mutex<BTreeMap<String, Arc<Sandbox>>>,
    recorder: Arc<Recorder>,
    snapshots: SnapshotHandle,
    metrics: Arc<AgentMetrics>,
    logs: broadcast::Sender<LogLine>,
    host_id: String,
    ids: AtomicU64,
    jsonl: Option<JsonlSink>,
    otlp: Option<crate::telemetry::Otlp>,
    serials: AtomicU32,
    started_unix_nano: u64,
    alerts: Arc<crate::alerts::Engine>,
    sessions: Arc<crate::shell::Sessions>,
    ssh: std::sync::OnceLock<crate::ssh::SshInfo>,
    /// Held for the agent's life: tells a later agent whether this one is still alive.
    _state_lock: Option<crate::leftovers::StateLock>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("driver", &self.driver.name())
            .finish()
    }
}

/// Why a sandbox failed to start.
enum BootFailure {
    /// The platform failed.
    Platform(String),
    /// The function's runtime failed to initialise.
    Init(String),
}

impl Agent {
    /// Pick a driver, build pools, start the aggregator, reaper and pre-warming.
    pub async fn start(cfg: AgentConfig) -> Result<Arc<Agent>, StartError> {
        let (driver, driver_reason) = drivers::select(&cfg)?;
        Self::with_driver(cfg, driver, driver_reason)
    }

    /// Build an agent around a given driver (tests, embedding).
    pub fn with_driver(
        cfg: AgentConfig,
        driver: Arc<dyn Driver>,
        driver_reason: String,
    ) -> Result<Arc<Agent>, StartError> {
        match crate::fds::raise_nofile() {
            Ok((before, now)) if now > before => tracing::info!(
                from = before,
                to = now,
                "raised the open-file limit to the hard limit (about {} sandboxes)",
                now / crate::fds::FDS_PER_SANDBOX
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
        }
        let recorder = Arc::new(Recorder::new(cfg.recorder_queue));
        let names = cfg.functions.iter().map(|f| f.name.clone()).collect();
        let metrics = Arc::new(AgentMetrics::default());
        let jsonl = cfg
            .jsonl
            .as_ref()
            .map(|t| JsonlSink::open(t, 8192))
            .transpose()?;
        let host_id = {
            let m = crate::procfs::machine_id();
            if m.is_empty() {
                crate::procfs::hostname()
            } else {
                m
            }
        };
        let otlp = match &cfg.otlp {
            Some(o) => Some(crate::telemetry::Otlp::start(
                o,
                &[
                    ("service.name".into(), "sandscope-agent".into()),
                    ("service.version".into(), env!("CARGO_PKG_VERSION").into()),
                    ("host.id".into(), host_id.clone()),
                    ("host.name".into(), crate::procfs::hostname()),
                    ("host.arch".into(), std::env::consts::ARCH.into()),
                    ("host.cpu.model.name".into(), crate::procfs::cpu_model()),
                    ("sandscope.driver".into(), driver.name().into()),
                ],
            )?),
            None => None,
        };
        let per_sandbox = otlp.as_ref().is_some_and(|o| o.metrics.is_some());
        let (m2, j2, o2) = (metrics.clone(), jsonl.clone(), otlp.clone());
        let snapshots =
            Aggregator::new(recorder.clone(), names, per_sandbox).spawn(Arc::new(move || {
                let mut d = vec![("log_lines", m2.log_lines_lost.load(Ordering::Relaxed))];
                if let Some(j) = &j2 {
                    d.push(("jsonl", j.dropped()));
                }
                if let Some(o) = &o2 {
                    d.extend(o.dropped());
                }
                d
            }));
        let pools: Vec<Arc<Pool>> = cfg
            .functions
            .iter()
            .enumerate()
            .map(|(i, f)| Arc::new(Pool::new(Arc::new(f.clone()), i as u32)))
            .collect();
        let by_name = cfg
            .functions
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ ((std::process::id() as u64) << 32);
        let (logs, _) = broadcast::channel(4096);
        if let Some(e) = otlp.as_ref().and_then(|o| o.logs.clone()) {
            crate::telemetry::spawn_logs(e, logs.subscribe());
        }
        let alerts = crate::alerts::Engine::start(
            cfg.rules.clone(),
            cfg.rules_file.clone(),
            logs.subscribe(),
            otlp.as_ref().and_then(|o| o.logs.clone()),
        )?;
        // Before any sandbox of ours exists: what is under the state dir now is a dead
        // agent's.
        let state_lock = crate::leftovers::lock_and_sweep(&cfg.state_dir, metrics.clone());
        let agent = Arc::new(Agent {
            cfg,
            driver,
            driver_reason,
            pools,
            by_name,
            sandboxes: Mutex::new(BTreeMap::new()),
            recorder,
            snapshots,
            metrics,
            logs,
            host_id,
            ids: AtomicU64::new(seed | 1),
            jsonl,
            otlp,
            serials: AtomicU32::new(1),
            started_unix_nano: crate::telemetry::unix_nanos(),
            alerts,
            sessions: Arc::default(),
            ssh: std::sync::OnceLock::new(),
            _state_lock: state_lock,
        });
        agent.clone().spawn_reaper();
        if let Some(o) = &agent.otlp {
            if let Some(e) = o.metrics.clone() {
                crate::telemetry::spawn_metrics(Arc::downgrade(&agent), e, o.metrics_interval);
            }
        }
        for p in &agent.pools {
            for _ in 0..p.spec.pool.prewarm {
                let a = agent.clone();
                let p = p.clone();
                tokio::spawn(async move { a.prewarm_one(&p).await });
            }
        }
        Ok(agent)
    }

    /// The configuration in force.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The driver in use and why it was chosen.
    pub fn driver(&self) -> (&'static str, &str) {
        (self.driver.name(), &self.driver_reason)
    }

    /// How many sandboxes the open-file limit allows.
    pub fn fd_budget(&self) -> crate::fds::FdBudget {
        let live = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        crate::fds::FdBudget::now(live as u64)
    }

    /// Agent self-metrics.
    pub fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.metrics
    }

    /// Subscribe to every function log line.
    pub fn subscribe_logs(&self) -> broadcast::Receiver<LogLine> {
        self.logs.subscribe()
    }

    /// The alert engine (rules, alarms, the `/v1/alerts` feed, reload).
    pub fn alerts(&self) -> &Arc<crate::alerts::Engine> {
        &self.alerts
    }

    /// The recorder (for benchmarks).
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    fn next_rand(&self) -> u64 {
        // xorshift64*, shared: ids only need to be unique and unguessable-ish, not secret.
        let mut x = self.ids.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .ids
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y.wrapping_mul(0x2545F4914F6CDD1D),
                Err(cur) => x = cur,
            }
        }
    }

    fn new_invoke_id(&self) -> String {
        let (a, b) = (self.next_rand(), self.next_rand());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    fn new_sandbox_id(&self, function: &str) -> String {
        loop {
            let id = format!("{function}-{:08x}", self.next_rand() as u32);
            if !self
                .sandboxes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id)
            {
                return id;
            }
        }
    }

    /// Start a sandbox for `pool` and wait until it is Ready.
    ///
    /// Cancellation-safe: if the caller drops this future, the `booting` count is given
    /// back and a sandbox already started is ended (see [`Starting`]).
    async fn boot(&self, pool: &Pool) -> Result<Arc<Sandbox>, BootFailure> {
        let counted = Booting::count(&pool.booting);
        let r = self.boot_inner(pool).await;
        drop(counted);
        match &r {
            Ok(_) => self
                .metrics
                .sandboxes_started
                .fetch_add(1, Ordering::Relaxed),
            Err(_) => self.metrics.spawn_failures.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    async fn boot_inner(&self, pool: &Pool) -> Result<Arc<Sandbox>, BootFailure> {
        let spec = SandboxSpec {
            id: self.new_sandbox_id(&pool.spec.name),
            function: pool.spec.clone(),
            host_id: self.host_id.clone(),
        };
        let t0 = Instant::now();
        let deadline = t0 + self.cfg.boot_timeout;
        let spawned = self
            .driver
            .spawn(&spec)
            .await
            .map_err(|e| BootFailure::Platform(chain(&e)))?;
        let running_at = spawned.running_at;
        let handle = Starting(Some(spawned.handle));
        let stream = match spawned.link {
            LinkSource::Connected(s) => s,
            LinkSource::Listening(l) => match accept_probe(&l, &*handle, deadline).await {
                Ok(s) => s,
                Err(why) => return Err(boot_failed(&*handle, &spec.id, why).await),
            },
        };
        let hs = match Link::handshake(
            stream,
            &spec.id,
            &pool.spec.name,
            deadline.saturating_duration_since(Instant::now()),
            self.metrics.clone(),
            self.logs.clone(),
        )
        .await
        {
            Ok(hs) => hs,
            Err(e) => return Err(boot_failed(&*handle, &spec.id, chain(&e)).await),
        };
        let ready = match tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            hs.ready,
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                let reason = hs.link.closed_reason().unwrap_or_default();
                handle.destroy().await;
                return Err(BootFailure::Platform(format!(
                    "sandbox {}: link closed before Ready: {reason}",
                    spec.id
                )));
            }
            Err(_) => {
                handle.destroy().await;
                return Err(BootFailure::Init(format!(
                    "runtime of sandbox {} not ready within {:.1} s",
                    spec.id,
                    self.cfg.boot_timeout.as_secs_f64()
                )));
            }
        };
        if !ready.error.is_empty() {
            hs.link
                .shutdown("runtime init failed", Duration::ZERO)
                .await;
            handle.destroy().await;
            return Err(BootFailure::Init(ready.error));
        }
        let now = Instant::now();
        let to_hello = us(hs.hello_at.saturating_duration_since(running_at));
        let mut boot = BootTimes {
            spawn_us: us(running_at.saturating_duration_since(t0)),
            probe_init_us: to_hello,
            runtime_init_us: us(now.saturating_duration_since(hs.hello_at)),
            vmm_setup_us: None,
            kernel_us: None,
            kernel_source: None,
        };
        if handle.configured().is_some() {
            use crate::drivers::vm;
            let vmm = handle.vmm_times().await.unwrap_or_default();
            let w = vm::waterfall(
                to_hello,
                vm::GuestTimes::of_hello(&hs.hello),
                vmm,
                vm::vmm_main_after(running_at, &vmm),
            );
            boot.vmm_setup_us = Some(w.vmm_setup_us);
            boot.kernel_us = Some(w.kernel_us);
            boot.probe_init_us = w.probe_init_us;
            boot.kernel_source = Some(w.kernel_source);
        }
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let sb = Arc::new(Sandbox::new(
            spec.id.clone(),
            serial,
            pool.spec.clone(),
            pool.index,
            self.driver.name(),
            hs.link,
            handle.handed_over(),
            hs.hello,
            boot,
        ));
        if self.metrics_on() {
            self.snapshots
                .register(serial, Arc::new(crate::series::SandboxMeta::of(&sb)))
                .await;
        }
        // Listed last, with no await after it: a listed sandbox always reaches the caller.
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id, sb.clone());
        Ok(sb)
    }

    async fn prewarm_one(self: &Arc<Self>, pool: &Arc<Pool>) {
        let Some(_permit) = pool.try_acquire() else {
            return;
        };
        match self.boot(pool).await {
            Ok(sb) => self.park(pool, sb),
            Err(BootFailure::Platform(e) | BootFailure::Init(e)) => {
                tracing::warn!(function = %pool.spec.name, "pre-warm failed: {e}");
            }
        }
    }

    /// Put a sandbox back in its pool at once; if configured, freeze it in the background
    /// (an invocation that takes it meanwhile waits on `freeze_lock` and thaws it).
    fn park(self: &Arc<Self>, pool: &Pool, sb: Arc<Sandbox>) {
        sb.set_state(SandboxState::Idle);
        pool.put_idle(sb.clone());
        if !(pool.spec.pool.freeze_idle && sb.handle.can_freeze()) {
            return;
        }
        tokio::spawn(async move {
            let _g = sb.freeze_lock.lock().await;
            // An open shell keeps it running.
            if sb.state() != SandboxState::Idle || sb.shells() > 0 {
                return;
            }
            match sb.handle.freeze().await {
                Ok(_) => {
                    sb.frozen.store(true, Ordering::Release);
                    sb.mark_frozen_if_idle();
                }
                Err(e) => {
                    tracing::warn!(sandbox = %sb.id, "freeze failed, keeping it thawed: {}", chain(&e));
                }
            }
        });
    }

    /// Thaw a sandbox just taken from the pool, if a background freeze got to it.
    async fn thaw_if_frozen(&self, sb: &Sandbox) -> Option<Duration> {
        let _g = sb.freeze_lock.lock().await;
        if !sb.frozen.load(Ordering::Acquire) {
            return None;
        }
        match sb.handle.thaw().await {
            Ok(d) => {
                sb.frozen.store(false, Ordering::Release);
                Some(d)
            }
            Err(e) => {
                tracing::warn!(sandbox = %sb.id, "thaw failed: {}", chain(&e));
                None
            }
        }
    }

    /// End a sandbox and forget it. Once per sandbox: a second caller (the reaper finding
    /// a sandbox dead that shutdown is already ending, say) waits until the first has
    /// finished, so "ended" always means gone, and it is counted once.
    pub async fn destroy(&self, sb: &Arc<Sandbox>, reason: &str) {
        sb.ended.get_or_init(|| self.end(sb, reason)).await;
    }

    async fn end(&self, sb: &Arc<Sandbox>, reason: &str) {
        tracing::debug!(sandbox = %sb.id, "ending sandbox: {reason}");
        if !sb.frozen.load(Ordering::Acquire) && sb.link.is_alive() {
            sb.link.shutdown(reason, Duration::from_millis(100)).await;
            sb.handle.wait_exited(Duration::from_millis(100)).await;
        }
        sb.handle.destroy().await;
        self.metrics.sandboxes_ended.fetch_add(1, Ordering::Relaxed);
        if self.metrics_on() {
            self.snapshots.ended(sb.serial).await;
        }
        // Listed until it is gone: shutdown, finding it, waits for this end (a sandbox
        // that died while idle is ended in the background, and was missed).
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sb.id);
    }

    fn spawn_destroy(self: &Arc<Self>, sb: Arc<Sandbox>, reason: &'static str) {
        let a = self.clone();
        tokio::spawn(async move { a.destroy(&sb, reason).await });
    }

    fn spawn_reaper(self: Arc<Self>) {
        let min_keep = self
            .pools
            .iter()
            .map(|p| p.spec.pool.keep_alive)
            .min()
            .unwrap_or(Duration::from_secs(1));
        let period = (min_keep / 4).clamp(Duration::from_millis(25), Duration::from_secs(1));
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(agent) = weak.upgrade() else { break };
                for p in &agent.pools {
                    for sb in p.take_expired() {
                        let reason = if sb.healthy() {
                            "idle past keep-alive"
                        } else {
                            "sandbox died"
                        };
                        // Each ended on its own task: no one sandbox holds up the reaper.
                        agent.spawn_destroy(sb, reason);
                    }
                }
            }
        });
    }

    /// Run one invocation of `name` with `payload`.
    ///
    /// Cancellation-safe: the invocation runs in a task of its own and this future only
    /// waits for it. A caller that goes away (axum drops the handler when the HTTP client
    /// disconnects) abandons the wait, not the invocation: it still finishes, is recorded,
    /// and its sandbox goes back to the pool or is ended, so capacity and limits hold.
    pub async fn invoke(
        self: &Arc<Self>,
        name: &str,
        payload: Vec<u8>,
        opts: InvokeOptions,
    ) -> Result<Invocation, InvokeError> {
        let agent = self.clone();
        let name = name.to_string();
        let run = tokio::spawn(async move { agent.run_invocation(&name, payload, opts).await });
        match run.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(InvokeError::Platform(format!(
                "the invocation was cut short: {e}"
            ))),
        }
    }

    async fn run_invocation(
        self: &Arc<Self>,
        name: &str,
        payload: Vec<u8>,
        mut opts: InvokeOptions,
    ) -> Result<Invocation, InvokeError> {
        let t0 = Instant::now();
        let started_unix_nano = crate::telemetry::unix_nanos();
        let started_unix_ms = started_unix_nano / 1_000_000;
        let pool = self
            .by_name
            .get(name)
            .map(|i| self.pools[*i].clone())
            .ok_or_else(|| InvokeError::NotFound(name.to_string()))?;
        if payload.len() > wire::MAX_PAYLOAD {
            return Err(InvokeError::PayloadTooLarge {
                size: payload.len(),
                max: wire::MAX_PAYLOAD,
            });
        }
        // With trace export on, the invocation gets its own span (a child of the caller's
        // when a valid `traceparent` came in) and the sandbox is handed that span as parent.
        // A caller that did not sample its trace (flags bit 0 clear) is passed through as is.
        let incoming = TraceContext::parse(&opts.traceparent);
        let sampled = incoming.is_none_or(|c| c.flags & 1 == 1);
        let traces_on = self.otlp.as_ref().is_some_and(|o| o.traces.is_some());
        let span = (traces_on && sampled).then(|| {
            let ctx = TraceContext {
                trace_id: incoming.map_or_else(|| self.rand16(), |c| c.trace_id),
                span_id: self.rand8(),
                flags: incoming.map_or(1, |c| c.flags),
            };
            (ctx, incoming.map(|c| c.span_id))
        });
        let traceparent = match &span {
            Some((ctx, _)) => ctx.header(),
            None => std::mem::take(&mut opts.traceparent),
        };
        let trace_ids = span
            .as_ref()
            .map(|(c, _)| c)
            .or(incoming.as_ref())
            .map(|c| (c.trace_id, c.span_id));
        let permit = match pool.acquire().await {
            Ok(p) => p,
            Err(e) => {
                self.recorder
                    .record(Sample::new(pool.index, false, Outcome::Throttled));
                return Err(InvokeError::Throttled(e.to_string()));
            }
        };
        let mut sample = Sample::new(pool.index, false, Outcome::Ok);
        let queued = t0.elapsed();
        if queued > Duration::from_micros(50) {
            sample.set(Phase::Queue, queued);
        }
        let (idle, dead) = pool.take_idle();
        for sb in dead {
            self.spawn_destroy(sb, "sandbox died while idle");
        }
        let mut boot_offset_us = 0;
        let sb = match idle {
            Some(sb) => {
                if let Some(d) = self.thaw_if_frozen(&sb).await {
                    sample.set(Phase::Thaw, d);
                }
                sb
            }
            None => {
                boot_offset_us = us(t0.elapsed());
                let booted = self.boot(&pool).await;
                match booted {
                    Ok(sb) => {
                        sample.cold = true;
                        sample.phases_us[Phase::Spawn as usize] = sb.boot.spawn_us;
                        sample.phases_us[Phase::ProbeInit as usize] = sb.boot.probe_init_us;
                        if let Some(v) = sb.boot.vmm_setup_us {
                            sample.phases_us[Phase::VmmSetup as usize] = v;
                        }
                        if let Some(k) = sb.boot.kernel_us {
                            sample.phases_us[Phase::Kernel as usize] = k;
                        }
                        sample.phases_us[Phase::RuntimeInit as usize] = sb.boot.runtime_init_us;
                        sb
                    }
                    Err(BootFailure::Platform(msg)) => {
                        sample.outcome = Outcome::PlatformError;
                        sample.total_us = us(t0.elapsed());
                        self.recorder.record(sample);
                        self.send_spans(
                            &span,
                            &pool.spec.name,
                            "",
                            &sample,
                            (started_unix_nano, boot_offset_us, 0),
                            Some("Sandbox.StartFailed"),
                            None,
                        );
                        drop(permit);
                        return Err(InvokeError::Platform(msg));
                    }
                    Err(BootFailure::Init(msg)) => {
                        let log_tail = opts
                            .log_tail
                            .then(|| tail_of(format!("INIT_REPORT Status: error\t{msg}\n")));
                        sample.cold = true;
                        sample.outcome = Outcome::FunctionError;
                        sample.total_us = us(t0.elapsed());
                        self.recorder.record(sample);
                        drop(permit);
                        let invoke_id = self.new_invoke_id();
                        self.send_spans(
                            &span,
                            &pool.spec.name,
                            &invoke_id,
                            &sample,
                            (started_unix_nano, boot_offset_us, 0),
                            Some("Runtime.InitError"),
                            None,
                        );
                        return Ok(Invocation {
                            invoke_id,
                            function: pool.spec.name.clone(),
                            sandbox_id: String::new(),
                            cold: true,
                            status: Status::FunctionError,
                            payload: Vec::new(),
                            error_type: "Runtime.InitError".into(),
                            error_message: msg,
                            total_us: sample.total_us,
                            init_us: None,
                            phases: BTreeMap::new(),
                            max_rss_kib: 0,
                            cpu_us: 0,
                            log_tail,
                        });
                    }
                }
            }
        };
        sb.count_invocation();
        sample.sandbox = sb.serial;
        let invoke_id = self.new_invoke_id();
        let timeout = pool.spec.timeout;
        let want_tail = opts.log_tail;
        let t_send = Instant::now();
        let res = sb
            .link
            .invoke(
                wire::Invoke {
                    invoke_id: invoke_id.clone(),
                    payload,
                    timeout_ms: timeout.as_millis() as u64,
                    traceparent,
                },
                // The probe enforces the deadline; this is the backstop if it cannot (the
                // sandbox stopped reading or answering): writing the event included.
                timeout + INVOKE_GRACE,
            )
            .await;
        sample.set(Phase::Invoke, t_send.elapsed());
        let send_offset_us = us(t_send.saturating_duration_since(t0));
        let (status, payload, error_type, error_message, keep) = match res {
            Ok(r) => {
                sample.max_rss_kib = r.max_rss_kib;
                sample.cpu_us = r.cpu_user_us + r.cpu_system_us;
                let status = r.status();
                let oom = status != wire::InvokeStatus::Ok && {
                    let n = sb.handle.oom_kills();
                    n > sb.oom_seen.swap(n, Ordering::AcqRel)
                };
                match status {
                    // The OOM killer may hit the handler or one of its children; either way the
                    // cgroup's counter moved during this invocation.
                    _ if oom => (
                        Status::OutOfMemory,
                        r.payload,
                        "Runtime.OutOfMemory".into(),
                        format!(
                            "Runtime exited with error: signal: killed (out of memory at the {} MiB limit)",
                            pool.spec.memory_mb
                        ),
                        false,
                    ),
                    wire::InvokeStatus::Ok => (Status::Ok, r.payload, String::new(), String::new(), true),
                    wire::InvokeStatus::FunctionError => {
                        (Status::FunctionError, r.payload, r.error_type, r.error_message, true)
                    }
                    wire::InvokeStatus::Timeout => {
                        (Status::Timeout, r.payload, "Sandbox.Timedout".into(), timeout_message(timeout), false)
                    }
                    wire::InvokeStatus::Killed => {
                        (Status::FunctionError, r.payload, r.error_type, r.error_message, false)
                    }
                    wire::InvokeStatus::ResponseTooLarge => (
                        Status::FunctionError,
                        Vec::new(),
                        "Function.ResponseSizeTooLarge".into(),
                        r.error_message,
                        true,
                    ),
                    wire::InvokeStatus::RuntimeError | wire::InvokeStatus::Unspecified => (
                        Status::FunctionError,
                        r.payload,
                        if r.error_type.is_empty() { "Runtime.Unknown".into() } else { r.error_type },
                        r.error_message,
                        false,
                    ),
                }
            }
            Err(LinkError::Timeout { .. } | LinkError::WriteTimeout { .. }) => (
                Status::Timeout,
                Vec::new(),
                "Sandbox.Timedout".into(),
                timeout_message(timeout),
                false,
            ),
            Err(e) => (
                Status::FunctionError,
                Vec::new(),
                "Runtime.ExitError".into(),
                format!("sandbox {} ended during the invocation: {e}", sb.id),
                false,
            ),
        };
        sample.outcome = match status {
            Status::Ok => Outcome::Ok,
            Status::FunctionError => Outcome::FunctionError,
            Status::Timeout => Outcome::Timeout,
            Status::OutOfMemory => Outcome::OutOfMemory,
        };
        sample.total_us = us(t0.elapsed());
        self.recorder.record(sample);
        self.send_spans(
            &span,
            &pool.spec.name,
            &invoke_id,
            &sample,
            (started_unix_nano, boot_offset_us, send_offset_us),
            (status != Status::Ok).then_some(error_type.as_str()),
            Some(&sb),
        );
        self.emit_platform(
            &pool.spec,
            &sb.id,
            &invoke_id,
            status,
            &sample,
            &error_message,
            trace_ids,
        );
        if let Some(j) = &self.jsonl {
            j.send(InvokeRecord {
                function: pool.spec.name.clone(),
                sandbox: sb.id.clone(),
                request_id: invoke_id.clone(),
                cold: sample.cold,
                status: match status {
                    Status::Ok => EventStatus::Success,
                    Status::FunctionError => EventStatus::Error,
                    Status::Timeout => EventStatus::Timeout,
                    Status::OutOfMemory => EventStatus::Failure,
                },
                error_type: error_type.clone(),
                start_unix_ms: started_unix_ms,
                duration_ms: sample.phases_us[Phase::Invoke as usize] as f64 / 1000.0,
                init_duration_ms: sample.init_us().map(|v| v as f64 / 1000.0),
                memory_size_mb: pool.spec.memory_mb,
                max_memory_used_mb: sample.max_rss_kib.div_ceil(1024),
            });
        }
        let log_tail = want_tail.then(|| {
            let mut t = format!("START RequestId: {} Version: $LATEST\n", invoke_id);
            for l in sb.link.recent_logs() {
                if l.invoke_id == invoke_id {
                    t.push_str(&l.line);
                    t.push('\n');
                }
            }
            t.push_str(&format!("END RequestId: {invoke_id}\n"));
            t.push_str(&report_line(&pool.spec, &invoke_id, &sample));
            t.push('\n');
            tail_of(t)
        });
        let inv = Invocation {
            invoke_id,
            function: pool.spec.name.clone(),
            sandbox_id: sb.id.clone(),
            cold: sample.cold,
            status,
            payload,
            error_type,
            error_message,
            total_us: sample.total_us,
            init_us: sample.init_us(),
            phases: crate::recorder::PHASES
                .iter()
                .zip(sample.phases_us)
                .filter(|(_, v)| *v != crate::recorder::NO_PHASE)
                .map(|(n, v)| (*n, v))
                .collect(),
            max_rss_kib: sample.max_rss_kib,
            cpu_us: sample.cpu_us,
            log_tail,
        };
        if keep && sb.healthy() {
            // Back in the pool before the response goes out, so a back-to-back request is warm.
            self.park(&pool, sb);
            drop(permit);
        } else {
            // Replace off the response path; the permit is held until the old one is gone.
            let agent = self.clone();
            tokio::spawn(async move {
                agent
                    .destroy(&sb, "replaced after a failed invocation")
                    .await;
                drop(permit);
            });
        }
        Ok(inv)
    }

    /// A fresh stats snapshot.
    pub async fn stats(&self) -> StatsSnapshot {
        let mut s = self
            .snapshots
            .snapshot()
            .await
            .expect("aggregator task lives as long as the agent");
        if let Some(o) = &self.otlp {
            s.telemetry.spooled.extend(o.spooled());
        }
        s
    }

    fn metrics_on(&self) -> bool {
        self.otlp.as_ref().is_some_and(|o| o.metrics.is_some())
    }

    fn rand8(&self) -> [u8; 8] {
        self.next_rand().to_le_bytes()
    }

    fn rand16(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.rand8());
        b[8..].copy_from_slice(&self.rand8());
        b
    }

    /// Hand one invocation's spans to the trace exporter (when `span` is set, i.e.
    /// traces are on). `at` = (start ns since the epoch, sandbox-start offset µs,
    /// invoke-send offset µs).
    #[allow(clippy::too_many_arguments)]
    fn send_spans(
        &self,
        span: &Option<(TraceContext, Option<[u8; 8]>)>,
        function: &str,
        invoke_id: &str,
        sample: &Sample,
        at: (u64, u64, u64),
        error: Option<&str>,
        sb: Option<&Sandbox>,
    ) {
        let (Some((ctx, parent)), Some(e)) =
            (span, self.otlp.as_ref().and_then(|o| o.traces.as_ref()))
        else {
            return;
        };
        let resource = match sb {
            Some(sb) => sb
                .otel_resource
                .get_or_init(|| Arc::new(crate::series::SandboxMeta::of(sb).resource()))
                .clone(),
            None => Arc::new(vec![("faas.name".into(), function.into())]),
        };
        let t = crate::telemetry::InvocationTiming {
            ids: (ctx.trace_id, ctx.span_id),
            parent: *parent,
            function,
            invoke_id,
            cold: sample.cold,
            start_unix_nano: at.0,
            total_us: sample.total_us,
            phases_us: sample.phases_us,
            boot_offset_us: at.1,
            send_offset_us: at.2,
            error: error.map(str::to_string),
        };
        e.send(crate::telemetry::invocation_spans(&t, resource, || {
            self.rand8()
        }));
    }

    /// This moment's figures for the metrics exporter: every sandbox's series and the
    /// host's.
    pub async fn metrics_batch(&self) -> exporters::otlp::metrics::MetricsBatch {
        let mut resources = self.snapshots.series().await;
        let mut dropped = vec![
            ("samples", self.recorder.dropped()),
            (
                "log_lines",
                self.metrics.log_lines_lost.load(Ordering::Relaxed),
            ),
        ];
        if let Some(j) = &self.jsonl {
            dropped.push(("jsonl", j.dropped()));
        }
        if let Some(o) = &self.otlp {
            dropped.extend(o.dropped());
        }
        resources.push(crate::telemetry::host_resource(
            &self.functions_view(),
            &self.sandboxes_view().hosts,
            &dropped,
            self.alerts.firing(),
        ));
        exporters::otlp::metrics::MetricsBatch {
            start_unix_nano: self.started_unix_nano,
            time_unix_nano: crate::telemetry::unix_nanos(),
            resources,
        }
    }

    /// The OTLP exporters, if export is on.
    pub fn otlp(&self) -> Option<&crate::telemetry::Otlp> {
        self.otlp.as_ref()
    }

    /// Functions and their pool state.
    pub fn functions_view(&self) -> Vec<FunctionView> {
        self.pools
            .iter()
            .map(|p| {
                let mut counts = StateCounts {
                    booting: p.booting.load(Ordering::Acquire),
                    ..Default::default()
                };
                for sb in self
                    .sandboxes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                {
                    if sb.fn_index == p.index {
                        counts.add(sb.state());
                    }
                }
                FunctionView {
                    spec: (*p.spec).clone(),
                    sandboxes: counts,
                    queued: p.waiting(),
                }
            })
            .collect()
    }

    fn live_sandboxes(&self) -> Vec<Arc<Sandbox>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Sandboxes with their probe reports, and host packing.
    pub fn sandboxes_view(&self) -> SandboxesView {
        let sbs = self.live_sandboxes();
        let views: Vec<SandboxView> = sbs.iter().map(|sb| sandbox_view(sb)).collect();
        let mut hosts: BTreeMap<(String, String), HostView> = BTreeMap::new();
        let host_mem = crate::procfs::host_mem();
        let local_boot = crate::procfs::boot_id();
        let local_machine = crate::procfs::machine_id();
        for v in &views {
            // A microVM has its own kernel (boot_id) but runs on this host: its VMM's
            // memory and vCPUs are packed here.
            let (boot_id, machine_id) = if v.guest.is_some() {
                (local_boot.clone(), local_machine.clone())
            } else {
                (v.probe.boot_id.clone(), v.probe.machine_id.clone())
            };
            let key = (boot_id.clone(), machine_id.clone());
            let h = hosts.entry(key).or_insert_with(|| HostView {
                local: boot_id == local_boot,
                boot_id,
                machine_id,
                ..Default::default()
            });
            if v.guest.is_some() {
                h.microvms += 1;
            }
            h.sandboxes.add(v.state);
            h.memory_committed_bytes += v.memory_limit_bytes;
            h.memory_resident_bytes += v.usage.rss_bytes;
            h.vcpus_configured += v.cpus;
        }
        let cores = crate::procfs::cores();
        let load1 = crate::procfs::load1();
        let hosts = hosts
            .into_values()
            .map(|mut h| {
                if h.local {
                    h.host_memory_total_bytes = host_mem.total_bytes;
                    h.host_memory_available_bytes = host_mem.available_bytes;
                    h.host_cores = cores;
                    h.load1 = load1;
                    h.vcpu_oversubscription = h.vcpus_configured / cores as f64;
                }
                h
            })
            .collect();
        SandboxesView {
            sandboxes: views,
            hosts,
        }
    }

    /// One sandbox with its recent logs.
    pub fn sandbox_detail(&self, id: &str) -> Option<SandboxDetail> {
        let sb = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()?;
        Some(SandboxDetail {
            sandbox: sandbox_view(&sb),
            markers: sb
                .hello
                .markers
                .iter()
                .map(|m| (m.name.clone(), m.since_init_ns))
                .collect(),
            logs: sb.link.recent_logs(),
            console: if sb.handle.configured().is_some() {
                sb.handle.diagnostics().lines().map(String::from).collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Put Lambda-style platform lines for one invocation on the log bus (stream
    /// `platform`): `COLDSTART ...` when cold, `Task timed out ...` / `Runtime.OutOfMemory
    /// ...` on those outcomes, then `REPORT ...`. Broadcast sends never block.
    #[allow(clippy::too_many_arguments)]
    fn emit_platform(
        &self,
        spec: &FunctionSpec,
        sandbox: &str,
        invoke_id: &str,
        status: Status,
        sample: &Sample,
        error_message: &str,
        trace: Option<crate::link::TraceIds>,
    ) {
        if self.logs.receiver_count() == 0 {
            return;
        }
        let (function, sandbox): (Arc<str>, Arc<str>) = (spec.name.as_str().into(), sandbox.into());
        let ts_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let send = |line: String| {
            let _ = self.logs.send(LogLine {
                sandbox: sandbox.clone(),
                function: function.clone(),
                seq: 0,
                stream: "platform",
                invoke_id: invoke_id.to_string(),
                line,
                ts_ms,
                truncated: false,
                trace,
            });
        };
        let init_ms = sample.init_us().map(|v| v as f64 / 1000.0);
        if let (true, Some(init)) = (sample.cold, init_ms) {
            send(format!(
                "COLDSTART function={} sandbox={sandbox} init_ms={init:.3}",
                spec.name
            ));
        }
        match status {
            Status::Timeout => send(timeout_message(spec.timeout)),
            Status::OutOfMemory => send(format!("Runtime.OutOfMemory: {error_message}")),
            Status::Ok | Status::FunctionError => {}
        }
        send(report_line(spec, invoke_id, sample));
    }

    /// Open a shell session on `target`: a live sandbox's id, or a function name (a live
    /// sandbox of it, idle ones first, else one started for the session). The sandbox is
    /// thawed if frozen and pinned while the session is open.
    pub async fn open_shell(
        self: &Arc<Self>,
        target: &str,
        req: crate::shell::ShellRequest,
    ) -> Result<crate::shell::ShellSession, crate::shell::ShellError> {
        use crate::shell::{Picked, ShellError};
        let named = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(target)
            .cloned();
        let (sb, picked) = if let Some(sb) = named {
            sb.pin();
            (sb, Picked::Named)
        } else if let Some(&i) = self.by_name.get(target) {
            let pool = self.pools[i].clone();
            let rank = |s: SandboxState| match s {
                SandboxState::Idle => 0,
                SandboxState::Frozen => 1,
                SandboxState::Busy => 2,
                SandboxState::Booting => 3,
            };
            let live = self
                .live_sandboxes()
                .into_iter()
                .filter(|sb| sb.fn_index == pool.index && sb.healthy())
                .min_by_key(|sb| (rank(sb.state()), sb.idle_for()));
            match live {
                Some(sb) => {
                    sb.pin();
                    (sb, Picked::Live)
                }
                None => (self.start_for_shell(&pool).await?, Picked::Started),
            }
        } else {
            let mut known: Vec<String> =
                self.live_sandboxes().iter().map(|s| s.id.clone()).collect();
            known.truncate(8);
            let functions: Vec<&str> = self.pools.iter().map(|p| p.spec.name.as_str()).collect();
            return Err(ShellError::Unknown {
                target: target.to_string(),
                known: format!(
                    "functions: {}; live sandboxes: {}",
                    if functions.is_empty() {
                        "none".into()
                    } else {
                        functions.join(", ")
                    },
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            });
        };
        if self.thaw_if_frozen(&sb).await.is_some() {
            sb.mark_thawed();
        }
        let logs = self.logs.clone();
        let audit: crate::shell::AuditFn = Arc::new(move |v| audit_session(&logs, v));
        let lifetime = self
            .cfg
            .ssh
            .as_ref()
            .map_or(Duration::from_secs(3600), |s| s.max_session);
        let s = crate::shell::ShellSession::open(
            sb,
            &req,
            picked,
            self.sessions.clone(),
            audit,
            lifetime,
        )
        .await?;
        tracing::info!(session = s.id(), sandbox = %s.sandbox_id(), who = %req.who,
            "shell session opened");
        Ok(s)
    }

    /// Start a sandbox of `pool` for a shell (pinned before it is parked, so it is
    /// neither frozen nor reaped under the session).
    async fn start_for_shell(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
    ) -> Result<Arc<Sandbox>, crate::shell::ShellError> {
        let err = |reason: String| crate::shell::ShellError::Start {
            function: pool.spec.name.clone(),
            reason,
        };
        let permit = pool.acquire().await.map_err(|e| err(e.to_string()))?;
        let sb = match self.boot(pool).await {
            Ok(sb) => sb,
            Err(BootFailure::Platform(e) | BootFailure::Init(e)) => return Err(err(e)),
        };
        sb.pin();
        self.park(pool, sb.clone());
        drop(permit);
        Ok(sb)
    }

    /// Open and recently ended shell sessions.
    pub fn sessions_view(&self) -> crate::shell::SessionsView {
        self.sessions.view()
    }

    /// Record where the SSH endpoint listens (shown by `/v1/ssh`).
    pub fn set_ssh_info(&self, info: crate::ssh::SshInfo) {
        let _ = self.ssh.set(info);
    }

    /// The SSH endpoint, if it runs.
    pub fn ssh_info(&self) -> Option<&crate::ssh::SshInfo> {
        self.ssh.get()
    }

    /// End every sandbox (agent shutdown).
    pub async fn shutdown(self: &Arc<Self>) {
        self.alerts.stop();
        // All at once: each end is bounded, and one slow sandbox does not hold up the rest.
        let mut ending = tokio::task::JoinSet::new();
        for sb in self.live_sandboxes() {
            let a = self.clone();
            ending.spawn(async move { a.destroy(&sb, "agent shutting down").await });
        }
        while ending.join_next().await.is_some() {}
        if let Some(o) = &self.otlp {
            // The last figures, then whatever is queued: to the backend, else the spool.
            if let Some(m) = &o.metrics {
                m.send(self.metrics_batch().await);
            }
            o.flush(Duration::from_secs(2)).await;
        }
    }
}

/// The audit record of a shell session, as a platform line on the log bus (alert rules,
/// log streams and the log exporters see it) and in the agent's log.
fn audit_session(logs: &broadcast::Sender<LogLine>, v: &crate::shell::SessionView) {
    let end = v.end.clone().unwrap_or_default();
    let mut line = format!(
        "SHELL_SESSION id={} sandbox={} function={} kind={} pty={} who={} peer={} \
         picked={} duration_ms={:.0} exit={} signal={} bytes_in={} bytes_out={}",
        v.id,
        v.sandbox,
        v.function,
        v.kind,
        v.pty,
        v.who,
        v.peer,
        v.picked.as_str(),
        v.duration_s * 1000.0,
        end.code,
        end.signal,
        v.bytes_in,
        v.bytes_out,
    );
    if !v.command.is_empty() {
        line.push_str(&format!(" command={:?}", v.command));
    }
    if !end.error.is_empty() {
        line.push_str(&format!(" error={:?}", end.error));
    }
    tracing::info!("{line}");
    let _ = logs.send(LogLine {
        sandbox: v.sandbox.as_str().into(),
        function: v.function.as_str().into(),
        seq: 0,
        stream: "platform",
        invoke_id: String::new(),
        line,
        ts_ms: v.started_unix_ms + (v.duration_s * 1000.0) as u64,
        truncated: false,
        trace: None,
    });
}

/// Lambda's `REPORT RequestId: ...` line for one invocation.
fn report_line(spec: &FunctionSpec, invoke_id: &str, sample: &Sample) -> String {
    let dur_ms = sample.phases_us[Phase::Invoke as usize] as f64 / 1000.0;
    let mut report = format!(
        "REPORT RequestId: {invoke_id}\tDuration: {dur_ms:.2} ms\tBilled Duration: {} ms\t\
         Memory Size: {} MB\tMax Memory Used: {} MB",
        dur_ms.ceil().max(1.0) as u64,
        spec.memory_mb,
        sample.max_rss_kib.div_ceil(1024),
    );
    if let (true, Some(init)) = (sample.cold, sample.init_us().map(|v| v as f64 / 1000.0)) {
        report.push_str(&format!("\tInit Duration: {init:.2} ms"));
    }
    report
}

/// The last [`LOG_TAIL_BYTES`] bytes of `log`, cut at a line start when possible.
fn tail_of(log: String) -> String {
    if log.len() <= LOG_TAIL_BYTES {
        return log;
    }
    let mut cut = log.len() - LOG_TAIL_BYTES;
    while !log.is_char_boundary(cut) {
        cut += 1;
    }
    log[cut..].to_string()
}

fn timeout_message(t: Duration) -> String {
    format!("Task timed out after {:.2} seconds", t.as_secs_f64())
}

pub use wire::error_chain as chain;

/// Sandboxes per state.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StateCounts {
    /// Starting.
    pub booting: usize,
    /// Idle.
    pub idle: usize,
    /// Busy.
    pub busy: usize,
    /// Frozen.
    pub frozen: usize,
}

impl StateCounts {
    fn add(&mut self, s: SandboxState) {
        match s {
            SandboxState::Booting => self.booting += 1,
            SandboxState::Idle => self.idle += 1,
            SandboxState::Busy => self.busy += 1,
            SandboxState::Frozen => self.frozen += 1,
        }
    }
}

/// `/v1/functions` entry.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionView {
    /// Config.
    #[serde(flatten)]
    pub spec: FunctionSpec,
    /// Sandboxes by state.
    pub sandboxes: StateCounts,
    /// Invocations waiting for capacity.
    pub queued: usize,
}

/// The probe's report, as the API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProbeView {
    /// Guest boot id.
    pub boot_id: String,
    /// Hostname inside.
    pub hostname: String,
    /// machine-id inside.
    pub machine_id: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model (/proc/cpuinfo).
    pub cpu_model: String,
    /// Logical CPUs visible.
    pub cpu_cores: u32,
    /// MemTotal, KiB.
    pub mem_total_kib: u64,
    /// MemAvailable, KiB.
    pub mem_available_kib: u64,
    /// Uptime when the probe started, s.
    pub uptime_at_init_s: f64,
    /// CPUID hypervisor signature.
    pub hypervisor: String,
    /// CPUID brand string.
    pub host_cpu_model: String,
    /// Host id handed in and echoed back.
    pub host_id: String,
    /// Probe version.
    pub probe_version: String,
    /// Probe pid (1 = it is the sandbox's init).
    pub probe_pid: u32,
}

/// `/v1/sandboxes` entry.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxView {
    /// Id.
    pub id: String,
    /// Function.
    pub function: String,
    /// Driver.
    pub driver: &'static str,
    /// State.
    pub state: SandboxState,
    /// Invocations served.
    pub invocations: u64,
    /// Age, s.
    pub age_s: f64,
    /// Time since last use, s.
    pub idle_s: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Host-side usage.
    pub usage: drivers::Usage,
    /// Memory limit, bytes (a microVM's guest memory).
    pub memory_limit_bytes: u64,
    /// CPU limit, cores (a microVM's vCPUs).
    pub cpus: f64,
    /// What a microVM guest was given (None for process sandboxes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<drivers::Configured>,
    /// Start timings.
    pub boot: BootTimes,
    /// Open shell sessions (a sandbox with one is not reaped or frozen).
    pub shells: usize,
    /// Probe report.
    pub probe: ProbeView,
}

fn sandbox_view(sb: &Sandbox) -> SandboxView {
    let h = &sb.hello;
    let usage = sb.handle.usage();
    let cpu = h.cpu.clone().unwrap_or_default();
    let mem = h.mem.clone().unwrap_or_default();
    let host = h.host.clone().unwrap_or_default();
    let guest = sb.handle.configured();
    SandboxView {
        id: sb.id.clone(),
        function: sb.function.name.clone(),
        driver: sb.driver,
        state: sb.state(),
        invocations: sb.invocations(),
        age_s: sb.age().as_secs_f64(),
        idle_s: sb.idle_for().as_secs_f64(),
        rss_bytes: usage.rss_bytes,
        usage,
        memory_limit_bytes: guest.map_or(sb.function.memory_bytes(), |g| g.memory_bytes),
        cpus: guest.map_or(sb.function.cpus, |g| g.vcpus as f64),
        guest,
        boot: sb.boot,
        shells: sb.shells(),
        probe: ProbeView {
            boot_id: h.boot_id.clone(),
            hostname: h.hostname.clone(),
            machine_id: h.machine_id.clone(),
            kernel: h.kernel_release.clone(),
            cpu_model: cpu.model,
            cpu_cores: cpu.cores,
            mem_total_kib: mem.total_kib,
            mem_available_kib: mem.available_kib,
            uptime_at_init_s: h.uptime_at_init_us as f64 / 1e6,
            hypervisor: host.hypervisor,
            host_cpu_model: host.cpu_model,
            host_id: host.host_id_echo,
            probe_version: h.probe_version.clone(),
            probe_pid: h.probe_pid,
        },
    }
}

/// Packing of one host (sandboxes grouped by guest boot_id + machine-id).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostView {
    /// boot_id the sandboxes report.
    pub boot_id: String,
    /// machine-id they report.
    pub machine_id: String,
    /// Whether this is the agent's own kernel.
    pub local: bool,
    /// Sandboxes by state.
    pub sandboxes: StateCounts,
    /// How many of them are microVMs.
    pub microvms: u32,
    /// Sum of memory limits (microVMs: guest memory), bytes.
    pub memory_committed_bytes: u64,
    /// Sum of resident memory, bytes.
    pub memory_resident_bytes: u64,
    /// Host MemTotal, bytes (local host only).
    pub host_memory_total_bytes: u64,
    /// Host MemAvailable, bytes (local host only).
    pub host_memory_available_bytes: u64,
    /// Host cores (local host only).
    pub host_cores: usize,
    /// 1-minute load (local host only).
    pub load1: f64,
    /// Sum of CPU limits.
    pub vcpus_configured: f64,
    /// vcpus_configured / host cores.
    pub vcpu_oversubscription: f64,
}

/// `/v1/sandboxes` body.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxesView {
    /// Live sandboxes.
    pub sandboxes: Vec<SandboxView>,
    /// Packing per host.
    pub hosts: Vec<HostView>,
}

/// `/v1/sandboxes/{id}` body.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxDetail {
    /// The sandbox.
    #[serde(flatten)]
    pub sandbox: SandboxView,
    /// Probe markers, ns since init.
    pub markers: Vec<(String, u64)>,
    /// Recent log lines.
    pub logs: Vec<LogLine>,
    /// A microVM's serial console, last lines (kernel messages, the probe's stderr).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub console: Vec<String>,
}

/// One sandbox counted in a pool's `booting` figure, for as long as this lives (also when
/// the start is abandoned midway).
struct Booting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Booting<'a> {
    fn count(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for Booting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A sandbox started by the driver but not yet handed over as a [`Sandbox`]. If its start
/// is abandoned (the future dropped), it is ended in the background rather than left
/// running unlisted with its cgroup and state directory.
struct Starting(Option<Box<dyn crate::drivers::SandboxHandle>>);

impl Starting {
    fn handed_over(mut self) -> Box<dyn crate::drivers::SandboxHandle> {
        self.0.take().expect("handed over once")
    }
}

impl std::ops::Deref for Starting {
    type Target = dyn crate::drivers::SandboxHandle;
    fn deref(&self) -> &Self::Target {
        self.0.as_deref().expect("not handed over yet")
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        // Ending a sandbox is idempotent: after a failed start has destroyed it, this is a
        // no-op; after an abandoned one, it is the only cleanup.
        if let (Some(h), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move { h.destroy().await });
        }
    }
}

/// Wait for a microVM's probe to connect: until the deadline, or until the VM exits.
async fn accept_probe(
    l: &tokio::net::UnixListener,
    handle: &dyn crate::drivers::SandboxHandle,
    deadline: Instant,
) -> Result<tokio::net::UnixStream, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::select! {
        r = l.accept() => r
            .map(|(s, _)| s)
            .map_err(|e| format!("accepting the guest probe's connection: {e}")),
        exited = handle.wait_exited(left) => Err(if exited {
            "the VM exited before its probe connected".to_string()
        } else {
            format!(
                "boot timeout: the guest's probe did not connect (no Hello) within {:.1} s",
                left.as_secs_f64()
            )
        }),
    }
}

/// End a sandbox that failed to start, and say why with the last lines it wrote (a
/// process sandbox's probe output, a VM's serial console).
async fn boot_failed(
    handle: &dyn crate::drivers::SandboxHandle,
    id: &str,
    why: String,
) -> BootFailure {
    // Give the process a moment to finish writing why it died.
    handle.wait_exited(Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let diag = handle.diagnostics();
    handle.destroy().await;
    let mut msg = format!("sandbox {id}: {why}");
    if !diag.is_empty() {
        msg.push_str(&format!("; output: {}", tail_lines(&diag, 12)));
    }
    BootFailure::Platform(msg)
}

/// The last `n` lines of `text`, joined with ` | `.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
