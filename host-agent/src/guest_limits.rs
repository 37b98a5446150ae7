//! The host's own enforcement of every limit a probe is meant to keep.
//!
//! The probe cuts log lines at [`wire::MAX_LOG_LINE`], keeps its report short and its
//! error texts sane, but the probe runs inside the sandbox, where the function's code
//! runs as root: nothing it sends can be trusted to respect those limits. Only the frame
//! size is enforced by the wire itself (1 MiB), so without these checks one probe could
//! make the agent keep a megabyte for every log line, field and marker, and serve it
//! back through the API. Every frame from a probe passes through here before the agent
//! keeps or forwards any of it: strings are cut (on a UTF-8 boundary, their memory given
//! back), lists capped, and each cut counted.

use crate::metrics::AgentMetrics;
use std::sync::atomic::Ordering;
use wire::frame::Body;

/// Longest identifier-like field kept (hostname, kernel release, ids, CPU model, marker
/// and error type names), in bytes.
pub const MAX_FIELD: usize = 256;

/// Longest free-text error kept (an invocation's or a runtime's error message, a shell
/// session's error), in bytes.
pub const MAX_ERROR_TEXT: usize = wire::MAX_LOG_LINE;

/// Most start-up markers kept from a Hello.
pub const MAX_MARKERS: usize = 64;

/// Cut `s` to `max` bytes; true if it was longer. The memory beyond is released (a cut
/// string must not keep a megabyte of capacity).
pub fn cut(s: &mut String, max: usize) -> bool {
    if !wire::truncate_line(s, max) {
        return false;
    }
    s.shrink_to_fit();
    true
}

/// Apply the limits to a Hello; returns how many fields were cut.
pub fn hello(h: &mut wire::Hello) -> u64 {
    let mut n = 0;
    let mut field = |s: &mut String| n += u64::from(cut(s, MAX_FIELD));
    field(&mut h.sandbox_id);
    field(&mut h.boot_id);
    field(&mut h.hostname);
    field(&mut h.machine_id);
    field(&mut h.kernel_release);
    field(&mut h.probe_version);
    field(&mut h.handler_kind);
    if let Some(c) = &mut h.cpu {
        field(&mut c.model);
        field(&mut c.vendor);
    }
    if let Some(v) = &mut h.host {
        field(&mut v.hypervisor);
        field(&mut v.cpu_model);
        field(&mut v.host_id_echo);
    }
    if h.markers.len() > MAX_MARKERS {
        h.markers.truncate(MAX_MARKERS);
        h.markers.shrink_to_fit();
        n += 1;
    }
    for m in &mut h.markers {
        n += u64::from(cut(&mut m.name, MAX_FIELD));
    }
    n
}

/// Apply the limits to a frame body from a probe; counts what was cut in `metrics`
/// (`log_lines_cut` for log lines, `guest_fields_cut` for everything else).
pub fn enforce(body: &mut Body, metrics: &AgentMetrics) {
    let mut fields = 0u64;
    match body {
        Body::Log(l) => {
            if cut(&mut l.line, wire::MAX_LOG_LINE) {
                l.truncated = true;
                metrics.log_lines_cut.fetch_add(1, Ordering::Relaxed);
            }
            fields += u64::from(cut(&mut l.invoke_id, MAX_FIELD));
        }
        Body::InvokeResult(r) => {
            fields += u64::from(cut(&mut r.invoke_id, MAX_FIELD));
            fields += u64::from(cut(&mut r.error_type, MAX_FIELD));
            fields += u64::from(cut(&mut r.error_message, MAX_ERROR_TEXT));
            if r.payload.len() > wire::MAX_PAYLOAD {
                // What the probe itself reports for a response over the limit.
                r.status = wire::InvokeStatus::ResponseTooLarge as i32;
                r.payload = Vec::new();
                r.error_message =
                    format!("the response exceeds the {}-byte limit", wire::MAX_PAYLOAD);
                fields += 1;
            }
        }
        Body::Ready(r) => fields += u64::from(cut(&mut r.error, MAX_ERROR_TEXT)),
        Body::ShellExit(e) => fields += u64::from(cut(&mut e.error, MAX_ERROR_TEXT)),
        Body::Hello(h) => fields += hello(h),
        // Numbers only, or bytes bounded by the frame and passed through as a stream.
        Body::Stats(_)
        | Body::Pong(_)
        | Body::Ping(_)
        | Body::ShellData(_)
        | Body::StatsRequest(_)
        | Body::Invoke(_)
        | Body::Shutdown(_)
        | Body::ShellOpen(_)
        | Body::ShellResize(_)
        | Body::ShellSignal(_) => {}
    }
    if fields > 0 {
        metrics
            .guest_fields_cut
            .fetch_add(fields, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_cut_flagged_counted_and_give_back_their_memory() {
        let m = AgentMetrics::default();
        let mut body = Body::Log(wire::Log {
            line: "é".repeat(600_000),
            invoke_id: "i".repeat(1000),
            ..Default::default()
        });
        enforce(&mut body, &m);
        let Body::Log(l) = body else { unreachable!() };
        assert!(l.line.len() <= wire::MAX_LOG_LINE && l.line.len() > wire::MAX_LOG_LINE - 2);
        assert!(l.line.capacity() < 2 * wire::MAX_LOG_LINE);
        assert!(l.truncated);
        assert_eq!(l.invoke_id.len(), MAX_FIELD);
        assert_eq!(m.log_lines_cut.load(Ordering::Relaxed), 1);
        assert_eq!(m.guest_fields_cut.load(Ordering::Relaxed), 1);

        let mut short = Body::Log(wire::Log {
            line: "fine".into(),
            ..Default::default()
        });
        enforce(&mut short, &m);
        assert_eq!(m.log_lines_cut.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn results_and_hellos_are_bounded() {
        let m = AgentMetrics::default();
        let mut body = Body::InvokeResult(wire::InvokeResult {
            error_type: "T".repeat(10_000),
            error_message: "E".repeat(900_000),
            payload: vec![b'x'; wire::MAX_PAYLOAD + 1],
            status: wire::InvokeStatus::Ok as i32,
            ..Default::default()
        });
        enforce(&mut body, &m);
        let Body::InvokeResult(r) = body else {
            unreachable!()
        };
        assert_eq!(r.error_type.len(), MAX_FIELD);
        assert!(r.error_message.len() <= MAX_ERROR_TEXT);
        assert_eq!(r.status(), wire::InvokeStatus::ResponseTooLarge);
        assert!(r.payload.is_empty());

        let mut h = wire::Hello {
            hostname: "h".repeat(300_000),
            markers: (0..1000)
                .map(|i| wire::Marker {
                    name: "m".repeat(1000),
                    since_init_ns: i,
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(hello(&mut h), 2 + MAX_MARKERS as u64);
        assert_eq!(h.hostname.len(), MAX_FIELD);
        assert_eq!(h.markers.len(), MAX_MARKERS);
        assert!(h.markers.iter().all(|m| m.name.len() == MAX_FIELD));
    }
}
