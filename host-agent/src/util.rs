//! Small OS helpers shared by the agent's modules.

use std::time::Duration;

/// Effective uid.
pub fn uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether the agent runs as root.
pub fn is_root() -> bool {
    uid() == 0
}

/// Microseconds in a duration, saturating.
pub fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// Clock ticks per second for /proc/<pid>/stat times.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

/// Rate-limits a log site: `allow()` is true at most `per_window` times per window.
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    per_window: u32,
    state: std::sync::Mutex<(std::time::Instant, u32, u64)>,
}

impl RateLimit {
    /// At most `per_window` events each `window`.
    pub fn new(window: Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            state: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }

    /// Whether to log this event; the second value is how many were suppressed since the
    /// last allowed one.
    pub fn allow(&self) -> (bool, u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if now.duration_since(s.0) >= self.window {
            *s = (now, 0, s.2);
        }
        if s.1 < self.per_window {
            s.1 += 1;
            let suppressed = std::mem::take(&mut s.2);
            (true, suppressed)
        } else {
            s.2 += 1;
            (false, 0)
        }
    }
}

/// Standard base64 with padding (RFC 4648): `X-Amz-Log-Result`, HTTP basic auth.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }
}
