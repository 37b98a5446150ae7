//! The probe's clock: guest CLOCK_MONOTONIC, as nanoseconds since the probe started, and
//! the cold-start markers recorded against it.

/// Raw CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The instant the probe started; every guest timestamp is a delta from it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start_ns: u64,
}

impl Clock {
    /// Capture the start now (call first thing in main).
    pub fn start() -> Self {
        Clock {
            start_ns: monotonic_ns(),
        }
    }

    /// Nanoseconds since the start.
    pub fn since_init_ns(&self) -> u64 {
        self.since_init_at(monotonic_ns())
    }

    /// Nanoseconds from the start to `monotonic_ns` (a [`monotonic_ns`] reading taken
    /// earlier; 0 if it precedes the start).
    pub fn since_init_at(&self, monotonic_ns: u64) -> u64 {
        monotonic_ns.saturating_sub(self.start_ns)
    }
}

/// The markers recorded so far, in order.
#[derive(Debug, Clone, Default)]
pub struct Markers {
    list: Vec<wire::Marker>,
}

impl Markers {
    /// A list holding `init_start` at 0.
    pub fn new() -> Self {
        Markers {
            list: vec![wire::Marker {
                name: "init_start".into(),
                since_init_ns: 0,
            }],
        }
    }

    /// Record `name` now.
    pub fn mark(&mut self, clock: &Clock, name: &str) {
        self.list.push(wire::Marker {
            name: name.to_string(),
            since_init_ns: clock.since_init_ns(),
        });
    }

    /// Record `name` at `since_init_ns` (a time taken earlier with [`Clock::since_init_at`]).
    pub fn mark_at(&mut self, name: &str, since_init_ns: u64) {
        self.list.push(wire::Marker {
            name: name.to_string(),
            since_init_ns,
        });
    }

    /// The markers, in recording order.
    pub fn list(&self) -> &[wire::Marker] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_monotonic() {
        let c = Clock::start();
        let mut m = Markers::new();
        m.mark(&c, "a");
        m.mark(&c, "b");
        let l = m.list();
        assert_eq!(l[0].name, "init_start");
        assert_eq!(l[0].since_init_ns, 0);
        assert!(l[1].since_init_ns <= l[2].since_init_ns);
    }
}
