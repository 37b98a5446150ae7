//! Rate-limited logging for events a guest can trigger at will.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Messages allowed per window before suppression.
const BURST: u64 = 10;
/// Window length in milliseconds.
const WINDOW_MS: u64 = 1000;

static EPOCH: OnceLock<Instant> = OnceLock::new();
static WINDOW_START: AtomicU64 = AtomicU64::new(0);
static IN_WINDOW: AtomicU64 = AtomicU64::new(0);
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Returns true when a guest-triggered message may be logged now.
///
/// At most [`BURST`] messages are let through per second; the rest are counted and the
/// count is reported with the next message that passes.
pub fn allow() -> (bool, u64) {
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64;
    let start = WINDOW_START.load(Ordering::Relaxed);
    if now.saturating_sub(start) >= WINDOW_MS {
        WINDOW_START.store(now, Ordering::Relaxed);
        IN_WINDOW.store(0, Ordering::Relaxed);
    }
    if IN_WINDOW.fetch_add(1, Ordering::Relaxed) < BURST {
        (true, SUPPRESSED.swap(0, Ordering::Relaxed))
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        (false, 0)
    }
}

/// Logs a guest-triggered warning to stderr, rate limited.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        let (ok, suppressed) = $crate::ratelimit::allow();
        if ok {
            if suppressed > 0 {
                eprintln!("vmm-lite: warning: ({} similar messages suppressed)", suppressed);
            }
            eprintln!("vmm-lite: warning: {}", format_args!($($arg)*));
        }
    }};
}
