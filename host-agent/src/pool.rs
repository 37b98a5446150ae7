//! Sandboxes and the per-function warm pool.
//!
//! Capacity is a semaphore of `max_sandboxes` permits: an invocation holds one while it
//! runs, so busy + booting sandboxes never exceed the limit; with a permit it takes the
//! most recently used idle sandbox (warm) or starts one (cold). Invocations beyond
//! capacity wait in a bounded queue, then are throttled.

use crate::config::FunctionSpec;
use crate::drivers::SandboxHandle;
use crate::link::Link;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Lifecycle state shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Starting (not yet Ready).
    Booting,
    /// Warm, waiting for work.
    Idle,
    /// Running an invocation.
    Busy,
    /// Idle and frozen by the cgroup freezer.
    Frozen,
}

/// Host-measured durations of a sandbox's start.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BootTimes {
    /// Driver called → sandbox process running, µs.
    pub spawn_us: u64,
    /// Process running → Hello received, µs.
    pub probe_init_us: u64,
    /// Hello → Ready, µs.
    pub runtime_init_us: u64,
    /// VMM start → guest kernel running, µs (microVMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_setup_us: Option<u64>,
    /// Kernel → init, µs (microVMs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_us: Option<u64>,
    /// Where `kernel_us` came from (microVMs): `boot_timer`, `vmm_first_run` or
    /// `guest_uptime` (see `drivers::vm::waterfall`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_source: Option<crate::drivers::vm::KernelSource>,
}

#[derive(Debug)]
struct Live {
    state: SandboxState,
    last_used: Instant,
    invocations: u64,
}

/// One live sandbox.
pub struct Sandbox {
    /// Id (hostname inside).
    pub id: String,
    /// Serial number in this agent (1, 2, ...): how samples name it, allocation-free.
    pub serial: u32,
    /// Function served.
    pub function: Arc<FunctionSpec>,
    /// Function index in the registry.
    pub fn_index: u32,
    /// Driver name.
    pub driver: &'static str,
    /// Probe link.
    pub link: Arc<Link>,
    /// Driver control.
    pub handle: Box<dyn SandboxHandle>,
    /// The probe's report.
    pub hello: wire::Hello,
    /// Start timings.
    pub boot: BootTimes,
    /// Creation wall time.
    pub created: SystemTime,
    created_at: Instant,
    live: Mutex<Live>,
    /// Serialises freezing (background, after parking) with thawing (on acquire).
    pub freeze_lock: tokio::sync::Mutex<()>,
    /// Whether the cgroup is frozen right now.
    pub frozen: std::sync::atomic::AtomicBool,
    /// OOM kills already attributed to an invocation (a new cgroup starts at 0, so the
    /// counter is only read when an invocation fails).
    pub oom_seen: std::sync::atomic::AtomicU64,
    /// Open shell sessions; while any is open the sandbox is neither reaped nor frozen.
    shells: AtomicUsize,
    /// Its OTLP resource attributes, built on first use and shared by its spans.
    pub otel_resource: std::sync::OnceLock<Arc<exporters::otlp::attrs::Attrs>>,
    /// Set once the sandbox has been ended; whoever ends it first does the work, and
    /// everyone else who asks (the reaper finding it dead, shutdown) waits for that.
    pub ended: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("function", &self.function.name)
            .finish()
    }
}

impl Sandbox {
    /// Assemble a sandbox that has said Hello and Ready.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        serial: u32,
        function: Arc<FunctionSpec>,
        fn_index: u32,
        driver: &'static str,
        link: Arc<Link>,
        handle: Box<dyn SandboxHandle>,
        hello: wire::Hello,
        boot: BootTimes,
    ) -> Self {
        Self {
            id,
            serial,
            function,
            fn_index,
            driver,
            link,
            handle,
            hello,
            boot,
            created: SystemTime::now(),
            created_at: Instant::now(),
            live: Mutex::new(Live {
                state: SandboxState::Busy,
                last_used: Instant::now(),
                invocations: 0,
            }),
            freeze_lock: tokio::sync::Mutex::new(()),
            frozen: std::sync::atomic::AtomicBool::new(false),
            oom_seen: std::sync::atomic::AtomicU64::new(0),
            shells: AtomicUsize::new(0),
            otel_resource: std::sync::OnceLock::new(),
            ended: tokio::sync::OnceCell::new(),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current state.
    pub fn state(&self) -> SandboxState {
        self.live().state
    }

    /// Set the state; `Idle` also stamps last-used.
    pub fn set_state(&self, s: SandboxState) {
        let mut l = self.live();
        if s == SandboxState::Idle || l.state == SandboxState::Busy {
            l.last_used = Instant::now();
        }
        l.state = s;
    }

    /// Count an invocation.
    pub fn count_invocation(&self) {
        self.live().invocations += 1;
    }

    /// Invocations served.
    pub fn invocations(&self) -> u64 {
        self.live().invocations
    }

    /// Time since last use.
    pub fn idle_for(&self) -> Duration {
        self.live().last_used.elapsed()
    }

    /// Age.
    pub fn age(&self) -> Duration {
        self.created_at.elapsed()
    }

    /// A shell session opened on it.
    pub fn pin(&self) {
        self.shells.fetch_add(1, Ordering::AcqRel);
    }

    /// A shell session ended; keep-alive counts again from now.
    pub fn unpin(&self) {
        self.shells.fetch_sub(1, Ordering::AcqRel);
        self.live().last_used = Instant::now();
    }

    /// Open shell sessions.
    pub fn shells(&self) -> usize {
        self.shells.load(Ordering::Acquire)
    }

    /// Whether it can take work (link up, process alive).
    pub fn healthy(&self) -> bool {
        self.link.is_alive() && !self.handle.exited()
    }
}

/// Why a pool could not give out capacity.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Queue full or waited too long.
    #[error("throttled: {0}")]
    Throttled(String),
}

/// The warm pool of one function.
pub struct Pool {
    /// Function.
    pub spec: Arc<FunctionSpec>,
    /// Index in the registry.
    pub index: u32,
    idle: Mutex<Vec<Arc<Sandbox>>>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// Sandboxes currently starting.
    pub booting: AtomicUsize,
}

impl Pool {
    /// An empty pool.
    pub fn new(spec: Arc<FunctionSpec>, index: u32) -> Self {
        let permits = Arc::new(Semaphore::new(spec.pool.max_sandboxes));
        Self {
            spec,
            index,
            idle: Mutex::new(Vec::new()),
            permits,
            waiting: AtomicUsize::new(0),
            booting: AtomicUsize::new(0),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Sandbox>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Get capacity for one invocation, queueing (bounded) when none is free.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Ok(p);
        }
        let limit = self.spec.pool.queue;
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= limit {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(AcquireError::Throttled(format!(
                "function `{}` is at its limit of {} sandboxes and {} queued invocations",
                self.spec.name, self.spec.pool.max_sandboxes, limit
            )));
        }
        let r = tokio::time::timeout(
            self.spec.pool.queue_timeout,
            self.permits.clone().acquire_owned(),
        )
        .await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match r {
            Ok(Ok(p)) => Ok(p),
            _ => Err(AcquireError::Throttled(format!(
                "function `{}` had no free sandbox within {:.1} s",
                self.spec.name,
                self.spec.pool.queue_timeout.as_secs_f64()
            ))),
        }
    }

    /// Capacity for a pre-warm start, without queueing.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Most recently used healthy idle sandbox; unhealthy ones found on the way are returned
    /// for destruction.
    pub fn take_idle(&self) -> (Option<Arc<Sandbox>>, Vec<Arc<Sandbox>>) {
        let mut dead = Vec::new();
        let mut idle = self.idle();
        while let Some(sb) = idle.pop() {
            if sb.healthy() {
                // Busy under the idle lock: a pending background freeze sees it is taken.
                sb.set_state(SandboxState::Busy);
                return (Some(sb), dead);
            }
            dead.push(sb);
        }
        (None, dead)
    }

    /// Return a sandbox to the idle list.
    pub fn put_idle(&self, sb: Arc<Sandbox>) {
        self.idle().push(sb);
    }

    /// Idle sandboxes past keep-alive (keeping the `prewarm` most recent) or unhealthy.
    pub fn take_expired(&self) -> Vec<Arc<Sandbox>> {
        let mut idle = self.idle();
        let keep_alive = self.spec.pool.keep_alive;
        let min_keep = self.spec.pool.prewarm;
        let mut out = Vec::new();
        // idle is ordered oldest-first (pushes at the end, pops from the end).
        let mut i = 0;
        while i < idle.len() {
            let remaining_after = idle.len() - 1;
            let sb = &idle[i];
            // An open shell pins a sandbox until the shell closes (or its lifetime ends).
            let expired =
                sb.idle_for() >= keep_alive && remaining_after >= min_keep && sb.shells() == 0;
            if !sb.healthy() || expired {
                out.push(idle.remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Number of idle sandboxes.
    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }

    /// Invocations waiting for capacity.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

impl Sandbox {
    /// After a thaw outside the invoke path: show `idle` again.
    pub fn mark_thawed(&self) {
        let mut l = self.live();
        if l.state == SandboxState::Frozen {
            l.state = SandboxState::Idle;
        }
    }

    /// After a background freeze: show `frozen` unless an invocation took it meanwhile.
    pub fn mark_frozen_if_idle(&self) {
        let mut l = self.live();
        if l.state == SandboxState::Idle {
            l.state = SandboxState::Frozen;
        }
    }
}
