//! OTLP traces: one SERVER span per invocation with a child span per phase it went
//! through (queue, thaw, spawn, vmm_setup, kernel, probe_init, runtime_init, invoke), all
//! on the host's timeline. W3C `traceparent` parsing and formatting live here too: an
//! incoming one makes the invocation span a child of the caller's.

use super::attrs::{key_values, resource, Attrs};
use super::{Encode, Encoded, OtlpConfig, Signal};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prost::Message;
use std::sync::Arc;

/// A W3C trace context (`traceparent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// Trace id (not all zero).
    pub trace_id: [u8; 16],
    /// The parent span id (not all zero).
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl TraceContext {
    /// Parse a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`, lower case). Invalid
    /// values (wrong lengths, upper case, all-zero ids, version ff) give `None`: the
    /// invocation then starts a new trace, as the W3C spec asks.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let mut parts = s.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || hex_bytes::<1>(version).is_none() {
            return None;
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = hex_bytes::<16>(trace)?;
        let span_id = hex_bytes::<8>(span)?;
        let flags = hex_bytes::<1>(flags)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }

    /// Trace id as 32 hex digits.
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// Span kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The invocation (the agent serves it).
    Server,
    /// A phase inside it.
    Internal,
}

/// One span.
#[derive(Debug, Clone)]
pub struct SpanIn {
    /// Trace id.
    pub trace_id: [u8; 16],
    /// Span id.
    pub span_id: [u8; 8],
    /// Parent span, if any.
    pub parent_span_id: Option<[u8; 8]>,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: SpanKind,
    /// Start, ns since the Unix epoch.
    pub start_unix_nano: u64,
    /// End, ns since the Unix epoch.
    pub end_unix_nano: u64,
    /// Attributes.
    pub attributes: Attrs,
    /// Error description when the span failed.
    pub error: Option<String>,
}

/// One invocation's spans and the resource they belong to (its sandbox).
#[derive(Debug, Clone, Default)]
pub struct InvocationSpans {
    /// Resource attributes added to the agent's own (`faas.name`, `faas.instance`, ...),
    /// shared by every invocation of the sandbox: consecutive invocations with the same
    /// resource go out under one `ResourceSpans`.
    pub resource: Arc<Attrs>,
    /// The invocation span first, then its children.
    pub spans: Vec<SpanIn>,
}

/// Encodes [`InvocationSpans`] as `ExportTraceServiceRequest`s.
#[derive(Debug)]
pub struct TracesEncoder {
    base: Vec<(String, String)>,
    limit: Option<usize>,
}

impl TracesEncoder {
    /// An encoder with `cfg`'s resource and attribute limit.
    pub fn new(cfg: &OtlpConfig) -> Self {
        Self {
            base: cfg.resource.clone(),
            limit: cfg.max_attr_value_len,
        }
    }

    fn span(&self, s: SpanIn) -> Span {
        Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name,
            kind: match s.kind {
                SpanKind::Server => span::SpanKind::Server as i32,
                SpanKind::Internal => span::SpanKind::Internal as i32,
            },
            start_time_unix_nano: s.start_unix_nano,
            end_time_unix_nano: s.end_unix_nano.max(s.start_unix_nano),
            attributes: key_values(&s.attributes, self.limit),
            status: Some(match s.error {
                None => Status::default(),
                Some(message) => Status {
                    message,
                    code: status::StatusCode::Error as i32,
                },
            }),
            ..Default::default()
        }
    }
}

impl Encode for TracesEncoder {
    type Item = InvocationSpans;
    const SIGNAL: Signal = Signal::Traces;

    fn records(item: &InvocationSpans) -> u64 {
        item.spans.len() as u64
    }

    fn encode(&mut self, items: Vec<InvocationSpans>) -> Encoded {
        let records = items.iter().map(|i| i.spans.len() as u64).sum();
        let mut resource_spans: Vec<ResourceSpans> = Vec::new();
        let mut last: Option<Arc<Attrs>> = None;
        for inv in items {
            let spans = inv.spans.into_iter().map(|s| self.span(s));
            match (&last, resource_spans.last_mut()) {
                (Some(prev), Some(rs)) if Arc::ptr_eq(prev, &inv.resource) => {
                    rs.scope_spans[0].spans.extend(spans);
                }
                _ => {
                    resource_spans.push(ResourceSpans {
                        resource: Some(resource(&self.base, &inv.resource, self.limit)),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(super::attrs::scope()),
                            spans: spans.collect(),
                            schema_url: String::new(),
                        }],
                        schema_url: String::new(),
                    });
                    last = Some(inv.resource);
                }
            }
        }
        Encoded {
            body: ExportTraceServiceRequest { resource_spans }.encode_to_vec(),
            records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_invalid_ones_are_refused() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(h).unwrap();
        assert_eq!(c.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(c.flags, 1);
        assert_eq!(c.header(), h);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn spans_encode_with_parents_kinds_and_status() {
        let mut e = TracesEncoder::new(&OtlpConfig::new("http://h:1"));
        let root = SpanIn {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: Some([3; 8]),
            name: "hello".into(),
            kind: SpanKind::Server,
            start_unix_nano: 100,
            end_unix_nano: 200,
            attributes: vec![("faas.coldstart".into(), true.into())],
            error: Some("Sandbox.Timedout".into()),
        };
        let child = SpanIn {
            span_id: [4; 8],
            parent_span_id: Some([2; 8]),
            name: "spawn".into(),
            kind: SpanKind::Internal,
            end_unix_nano: 50,
            error: None,
            ..root.clone()
        };
        let sandbox = Arc::new(vec![("faas.instance".to_string(), "f-1".into())]);
        let other = Arc::new(vec![("faas.instance".to_string(), "f-2".into())]);
        let inv = |r: &Arc<Attrs>, spans: Vec<SpanIn>| InvocationSpans {
            resource: r.clone(),
            spans,
        };
        let enc = e.encode(vec![
            inv(&sandbox, vec![root.clone(), child]),
            inv(&sandbox, vec![root.clone()]),
            inv(&other, vec![root]),
        ]);
        assert_eq!(enc.records, 4);
        let req = ExportTraceServiceRequest::decode(&enc.body[..]).unwrap();
        assert_eq!(
            req.resource_spans.len(),
            2,
            "one ResourceSpans per run of a sandbox"
        );
        assert_eq!(req.resource_spans[0].scope_spans[0].spans.len(), 3);
        let spans = &req.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans[0].kind, span::SpanKind::Server as i32);
        assert_eq!(spans[0].parent_span_id, vec![3; 8]);
        assert_eq!(
            spans[0].status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
        assert_eq!(spans[1].parent_span_id, vec![2; 8]);
        assert_eq!(spans[1].kind, span::SpanKind::Internal as i32);
        assert_eq!(spans[1].end_time_unix_nano, 100, "end never before start");
    }
}
