//! Log-filter alert rules: patterns on function logs and platform events become metrics,
//! metrics drive alarms, alarm state changes run actions. Evaluated in the agent, so
//! alerts fire even when the telemetry backend is down.
//!
//! Layout: [`rules`] (raw TOML shape → validated [`rules::Rule`]), [`matcher`] (regex or
//! CloudWatch-style terms, one [`matcher::Matcher`] type), [`alarm`] (N-of-M periods with
//! hysteresis), [`eval`] (a pure, clock-free evaluator shared by the agent and
//! `sandscope rules test`), [`engine`] (the agent task: log bus → evaluator → actions,
//! hot reload, the `/v1/alerts` feed).
//!
//! Bounds: lines are matched on at most [`matcher::MAX_MATCH_BYTES`] bytes; regexes have
//! compiled-size limits; the engine reads the log bus (a broadcast channel) and counts
//! the lines it fell behind on instead of slowing anyone down; actions go through a
//! bounded queue and are dropped (and counted) when it is full.

pub mod alarm;
pub mod engine;
pub mod eval;
pub mod matcher;
pub mod rules;

pub use alarm::{AlarmState, Comparison};

pub use engine::Engine;
pub use eval::Evaluator;
pub use rules::{Rule, RulesError};
