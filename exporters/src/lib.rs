//! Telemetry sinks. The agent hands them records off the invoke path; each sink batches
//! and writes in the background, counting what it has to drop.
//!
//! Now: [`jsonl`], Lambda Telemetry API-shaped platform events as JSON lines, and
//! [`otlp`], function logs and platform events as OTLP log records over HTTP/protobuf.
//! OTLP metrics and traces come next, behind the same non-blocking hand-over.

#![warn(missing_docs)]

pub mod jsonl;
pub mod otlp;
