//! Telemetry sinks. The agent hands them records off the invoke path; each sink batches
//! and writes in the background, counting what it has to drop.
//!
//! [`jsonl`]: Lambda Telemetry API-shaped platform events as JSON lines. [`otlp`]: metrics,
//! invocation traces and logs over OTLP (HTTP/protobuf or gRPC), with an optional spool.

#![warn(missing_docs)]

pub mod jsonl;
pub mod otlp;
