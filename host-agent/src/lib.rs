//! sandscope's host agent: runs sandboxes through drivers, keeps warm pools, routes
//! invocations, records per-invoke metrics, and serves the HTTP API.
//!
//! Layout: [`config`] (validated `sandscope.toml`), [`drivers`] (how sandboxes start and
//! end), [`link`] (the agent's end of a probe link), [`pool`] (sandboxes and warm
//! pools), [`agent`] (the invoke path), [`recorder`] (samples → histograms, off the
//! invoke path), [`series`] (per-sandbox series for metric export), [`telemetry`] (OTLP
//! wiring: log forwarding, the metrics task, invocation spans), [`api`] (HTTP), plus host
//! views from [`procfs`] and [`cgroup`].

#![warn(missing_docs)]

pub mod agent;
pub mod alerts;
pub mod api;
pub mod cgroup;
pub mod config;
pub mod drivers;
pub mod fds;
pub mod guest_limits;
pub mod leftovers;
pub mod link;
pub mod metrics;
pub mod pool;
pub mod procfs;
pub mod recorder;
pub mod series;
pub mod shell;
pub mod ssh;
pub mod telemetry;
pub mod util;

pub use agent::{Agent, Invocation, InvokeError, InvokeOptions, Status};
pub use config::AgentConfig;
