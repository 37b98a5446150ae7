//! The agent's alert engine: one task reads the log bus, feeds the [`Evaluator`], closes
//! periods on a 25 ms tick and hands transitions to actions. Nothing here can slow the
//! invoke path: the bus is a broadcast channel (lines the engine falls behind on are
//! counted, not waited for) and actions go through a bounded queue.

use super::eval::{Evaluator, Fired, RuleSet};
use super::rules::{load_rules, Action, Rule, RulesError};
use crate::link::LogLine;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, Semaphore};

/// Period-closing tick.
const TICK: Duration = Duration::from_millis(25);
/// Lines handled per lock of the evaluator.
const BATCH: usize = 1024;
/// Queued webhook deliveries before new ones are dropped.
const ACTION_QUEUE: usize = 256;
/// Webhook deliveries in flight at once.
const WEBHOOK_CONCURRENCY: usize = 8;
/// Per-attempt webhook timeout.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// First retry delay (doubles, capped at 2 s).
const WEBHOOK_BACKOFF: Duration = Duration::from_millis(100);

/// Counters describing the engine.
#[derive(Debug, Default)]
pub struct AlertCounters {
    /// Lines read from the log bus.
    pub lines_seen: AtomicU64,
    /// Lines that matched at least one rule.
    pub lines_matched: AtomicU64,
    /// Lines the engine fell behind on (log bus overflow), never evaluated.
    pub lines_dropped: AtomicU64,
    /// Alarm state transitions.
    pub transitions: AtomicU64,
    /// Log actions written.
    pub log_actions: AtomicU64,
    /// `otlp` actions handed to the OTLP log export.
    pub otlp_actions: AtomicU64,
    /// Webhook POSTs that got a 2xx.
    pub webhook_sent: AtomicU64,
    /// Webhook attempts that failed (each retry counts).
    pub webhook_failures: AtomicU64,
    /// Webhook deliveries abandoned after all retries.
    pub webhook_gave_up: AtomicU64,
    /// Actions dropped because the action queue was full.
    pub actions_dropped: AtomicU64,
    /// Rule reloads that succeeded.
    pub reloads: AtomicU64,
    /// Rule reloads rejected (old rules kept).
    pub reload_errors: AtomicU64,
}

impl AlertCounters {
    fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "lines_seen": g(&self.lines_seen),
            "lines_matched": g(&self.lines_matched),
            "lines_dropped": g(&self.lines_dropped),
            "transitions": g(&self.transitions),
            "log_actions": g(&self.log_actions),
            "otlp_actions": g(&self.otlp_actions),
            "webhook_sent": g(&self.webhook_sent),
            "webhook_failures": g(&self.webhook_failures),
            "webhook_gave_up": g(&self.webhook_gave_up),
            "actions_dropped": g(&self.actions_dropped),
            "reloads": g(&self.reloads),
            "reload_errors": g(&self.reload_errors),
        })
    }
}

#[derive(Debug)]
struct Delivery {
    url: String,
    retries: u32,
    body: serde_json::Value,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct ReloadStatus {
    at_ms: u64,
    ok: bool,
    error: Option<String>,
    rules: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct Engine {
    eval: Mutex<Evaluator>,
    inline: Vec<Rule>,
    rules_file: Option<PathBuf>,
    counters: Arc<AlertCounters>,
    last_reload: Mutex<Option<ReloadStatus>>,
    actions: mpsc::Sender<Delivery>,
    /// Where `otlp` actions go (the agent's OTLP log export), if it is on.
    otlp: Option<exporters::otlp::Exporter<exporters::otlp::LogsEncoder>>,
    stopped: AtomicBool,
}

/// `otlp` actions need the agent's OTLP log export: say so at load instead of dropping
/// every transition later.
fn check_otlp_actions(set: &RuleSet, have_otlp: bool) -> Result<(), RulesError> {
    if have_otlp {
        return Ok(());
    }
    match set
        .rules()
        .iter()
        .find(|r| r.actions.contains(&Action::Otlp))
    {
        None => Ok(()),
        Some(r) => Err(RulesError::Invalid {
            path: r.origin.clone(),
            key: "actions".into(),
            reason: format!(
                "rule `{}` has an `otlp` action but OTLP log export is off; add an [otlp] \
                 table (logs enabled) or --otlp-endpoint",
                r.name
            ),
        }),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Engine {
    /// Load the rules file (if any), merge with `inline` rules and start the engine task
    /// and the webhook worker. Must run inside a tokio runtime.
    pub fn start(
        inline: Vec<Rule>,
        rules_file: Option<PathBuf>,
        logs: broadcast::Receiver<LogLine>,
        otlp: Option<exporters::otlp::Exporter<exporters::otlp::LogsEncoder>>,
    ) -> Result<Arc<Engine>, RulesError> {
        let mut rules = inline.clone();
        if let Some(p) = &rules_file {
            rules.extend(load_rules(p)?);
        }
        let set = RuleSet::new(rules)?;
        check_otlp_actions(&set, otlp.is_some())?;
        let (tx, rx) = mpsc::channel(ACTION_QUEUE);
        let counters = Arc::new(AlertCounters::default());
        let engine = Arc::new(Engine {
            eval: Mutex::new(Evaluator::new(set, now_ms())),
            inline,
            rules_file,
            counters: counters.clone(),
            last_reload: Mutex::new(None),
            actions: tx,
            otlp,
            stopped: AtomicBool::new(false),
        });
        tokio::spawn(run(Arc::downgrade(&engine), logs));
        tokio::spawn(deliver(rx, counters));
        Ok(engine)
    }

    /// Counters.
    pub fn counters(&self) -> &AlertCounters {
        &self.counters
    }

    /// Stop the engine task (the agent is shutting down).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Re-read the rules file. On error the old rules stay active; the error is returned,
    /// logged and shown in the feed.
    pub fn reload(&self) -> Result<usize, RulesError> {
        let res = (|| -> Result<RuleSet, RulesError> {
            let mut rules = self.inline.clone();
            if let Some(p) = &self.rules_file {
                rules.extend(load_rules(p)?);
            }
            let set = RuleSet::new(rules)?;
            check_otlp_actions(&set, self.otlp.is_some())?;
            Ok(set)
        })();
        let at_ms = now_ms();
        let status = match res {
            Ok(set) => {
                let n = set.rules().len();
                self.lock().replace(set, at_ms);
                self.counters.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!("alert rules reloaded: {n} rules");
                *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(ReloadStatus {
                    at_ms,
                    ok: true,
                    error: None,
                    rules: n,
                });
                return Ok(n);
            }
            Err(e) => e,
        };
        self.counters.reload_errors.fetch_add(1, Ordering::Relaxed);
        let n = self.lock().rules().len();
        tracing::warn!("alert rules not reloaded, keeping the {n} active rules: {status}");
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(ReloadStatus {
            at_ms,
            ok: false,
            error: Some(status.to_string()),
            rules: n,
        });
        Err(status)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Evaluator> {
        self.eval.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rules in alarm now.
    pub fn firing(&self) -> usize {
        self.lock()
            .states()
            .iter()
            .filter(|s| s.state() == Some(super::AlarmState::Alarm))
            .count()
    }

    /// The `/v1/alerts` feed.
    pub fn view(&self) -> serde_json::Value {
        let ev = self.lock();
        let rules: Vec<_> = ev
            .rules()
            .iter()
            .zip(ev.states())
            .map(|(r, s)| {
                serde_json::json!({
                    "name": r.name,
                    "pattern": r.pattern_text,
                    "source": r.sources.as_str(),
                    "functions": r.functions,
                    "unit": r.unit,
                    "origin": r.origin,
                    "state": s.state(),
                    "value": s.last_value,
                    "matches": s.matches,
                    "bad_values": s.bad_values,
                    "alarm": r.alarm.as_ref().map(|a| serde_json::json!({
                        "threshold": a.threshold,
                        "comparison": a.comparison.as_str(),
                        "window_s": a.period_ms as f64 / 1000.0,
                        "datapoints": a.datapoints,
                        "of": a.of,
                    })),
                    "last_transition": s.transitions.back(),
                    "transitions": s.transitions,
                })
            })
            .collect();
        drop(ev);
        let firing = self.firing();
        serde_json::json!({
            "rules": rules,
            "firing": firing,
            "rules_file": self.rules_file,
            "last_reload": *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()),
            "counters": self.counters.to_json(),
        })
    }

    fn dispatch(&self, fired: &mut Vec<Fired>) {
        if fired.is_empty() {
            return;
        }
        let ev = self.lock();
        let rules = ev.rules();
        for f in fired.drain(..) {
            self.counters.transitions.fetch_add(1, Ordering::Relaxed);
            let Some(rule) = rules.get(f.index) else {
                continue;
            };
            for a in &rule.actions {
                match a {
                    Action::Log => {
                        self.counters.log_actions.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            target: "sandscope::alerts",
                            "alarm {}: {} -> {} (value {}, {}; function {}, sandbox {})",
                            f.rule,
                            f.transition.from,
                            f.transition.to,
                            f.transition.value.map_or("none".into(), |v| v.to_string()),
                            f.transition.reason,
                            f.function,
                            f.sandbox,
                        );
                    }
                    Action::Otlp => match &self.otlp {
                        Some(e) => {
                            self.counters.otlp_actions.fetch_add(1, Ordering::Relaxed);
                            e.send(otlp_record(&f));
                        }
                        None => {
                            self.counters
                                .actions_dropped
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Action::Webhook { url, retries } => {
                        let d = Delivery {
                            url: url.clone(),
                            retries: *retries,
                            body: webhook_body(&f),
                        };
                        if self.actions.try_send(d).is_err() {
                            self.counters
                                .actions_dropped
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// The JSON a webhook receives.
/// The OTLP log record of one alarm transition: WARN when it enters ALARM, INFO otherwise;
/// the rule, states, value and the function/sandbox of the last matching line as
/// attributes.
pub fn otlp_record(f: &Fired) -> exporters::otlp::LogRecordIn {
    let t = &f.transition;
    let value = t.value.map_or("none".into(), |v| v.to_string());
    let mut attributes = vec![
        ("sandscope.alert.rule", f.rule.clone()),
        ("sandscope.alert.state", t.to.to_string()),
        ("sandscope.alert.previous_state", t.from.to_string()),
        ("sandscope.alert.value", value.clone()),
        ("sandscope.log.stream", "alert".to_string()),
    ];
    if !f.function.is_empty() {
        attributes.push(("faas.name", f.function.clone()));
    }
    if !f.sandbox.is_empty() {
        attributes.push(("faas.instance", f.sandbox.clone()));
    }
    exporters::otlp::LogRecordIn {
        time_unix_nano: t.at_ms.saturating_mul(1_000_000),
        severity: if t.to == super::AlarmState::Alarm {
            exporters::otlp::Severity::Warn
        } else {
            exporters::otlp::Severity::Info
        },
        body: format!(
            "ALARM {}: {} -> {} (value {value} {}, threshold {} {}; {})",
            f.rule, t.from, t.to, f.unit, f.comparison, f.threshold, t.reason
        ),
        attributes,
        trace_id: None,
        span_id: None,
    }
}

/// The JSON a webhook action posts.
pub fn webhook_body(f: &Fired) -> serde_json::Value {
    serde_json::json!({
        "rule": f.rule,
        "state": f.transition.to,
        "previous_state": f.transition.from,
        "reason": f.transition.reason,
        "value": f.transition.value,
        "unit": f.unit,
        "threshold": f.threshold,
        "comparison": f.comparison,
        "function": f.function,
        "sandbox": f.sandbox,
        "samples": f.samples,
        "timestamp_ms": f.transition.at_ms,
    })
}

async fn run(engine: Weak<Engine>, mut rx: broadcast::Receiver<LogLine>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut fired = Vec::new();
    loop {
        tokio::select! {
            r = rx.recv() => {
                let Some(e) = engine.upgrade() else { return };
                let first = match r {
                    Ok(l) => l,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        e.counters.lines_dropped.fetch_add(n, Ordering::Relaxed);
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let (mut seen, mut matched) = (0u64, 0u64);
                let mut ev = e.lock();
                let mut line = Some(first);
                while let Some(l) = line.take() {
                    seen += 1;
                    if ev.observe(l.stream, &l.function, &l.sandbox, &l.line) > 0 {
                        matched += 1;
                    }
                    if seen as usize >= BATCH {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(l) => line = Some(l),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            e.counters.lines_dropped.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
                drop(ev);
                e.counters.lines_seen.fetch_add(seen, Ordering::Relaxed);
                e.counters.lines_matched.fetch_add(matched, Ordering::Relaxed);
            }
            _ = tick.tick() => {
                let Some(e) = engine.upgrade() else { return };
                if e.stopped.load(Ordering::Relaxed) {
                    return;
                }
                e.lock().advance(now_ms(), &mut fired);
                e.dispatch(&mut fired);
            }
        }
    }
}

async fn deliver(mut rx: mpsc::Receiver<Delivery>, counters: Arc<AlertCounters>) {
    let client = match reqwest::Client::builder()
        .timeout(WEBHOOK_TIMEOUT)
        .connect_timeout(WEBHOOK_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("webhook actions disabled: cannot build an HTTP client: {e}");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(WEBHOOK_CONCURRENCY));
    while let Some(d) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, counters) = (client.clone(), counters.clone());
        tokio::spawn(async move {
            let mut delay = WEBHOOK_BACKOFF;
            for attempt in 0..=d.retries {
                let res = client.post(&d.url).json(&d.body).send().await;
                match res {
                    Ok(r) if r.status().is_success() => {
                        counters.webhook_sent.fetch_add(1, Ordering::Relaxed);
                        drop(permit);
                        return;
                    }
                    Ok(r) => {
                        counters.webhook_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("webhook {} answered {}", d.url, r.status());
                    }
                    Err(e) => {
                        counters.webhook_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("webhook {} failed: {e}", d.url);
                    }
                }
                if attempt < d.retries {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
            counters.webhook_gave_up.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "webhook {} for rule {} failed after {} attempts",
                d.url,
                d.body["rule"],
                d.retries + 1
            );
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OTLP_RULE: &str = "[[rules]]\nname = 'oops'\npattern = 'oops'\n[rules.alarm]\n\
                             threshold = 1\n[[rules.actions]]\nkind = 'otlp'\n";

    #[tokio::test]
    async fn otlp_actions_without_otlp_log_export_are_refused_at_load_and_reload() {
        let rules = super::super::rules::parse_rules(OTLP_RULE, "r.toml").unwrap();
        let (tx, _) = broadcast::channel(4);
        let e = Engine::start(rules.clone(), None, tx.subscribe(), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("r.toml") && msg.contains("`oops`") && msg.contains("[otlp]"),
            "{msg}"
        );
        // A rules file gaining an otlp action is refused at reload; the old rules stay.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rules.toml");
        std::fs::write(&file, "[[rules]]\nname = 'fine'\npattern = 'x'\n").unwrap();
        let engine = Engine::start(Vec::new(), Some(file.clone()), tx.subscribe(), None).unwrap();
        std::fs::write(&file, OTLP_RULE).unwrap();
        assert!(engine
            .reload()
            .unwrap_err()
            .to_string()
            .contains("OTLP log export is off"));
        assert_eq!(engine.lock().rules()[0].name, "fine");
        engine.stop();
    }

    #[test]
    fn an_alarm_transition_becomes_a_warn_record_naming_rule_states_and_sandbox() {
        let f = Fired {
            rule: "oops".into(),
            function: "hello".into(),
            sandbox: "hello-1".into(),
            samples: vec![],
            unit: "Count".into(),
            threshold: 1.0,
            comparison: ">=",
            transition: super::super::alarm::Transition {
                from: super::super::AlarmState::Ok,
                to: super::super::AlarmState::Alarm,
                at_ms: 5,
                value: Some(3.0),
                reason: "1 of 1 periods breached".into(),
            },
            index: 0,
        };
        let r = otlp_record(&f);
        assert_eq!(r.severity, exporters::otlp::Severity::Warn);
        assert_eq!(r.time_unix_nano, 5_000_000);
        assert!(
            r.body.starts_with("ALARM oops: OK -> ALARM (value 3"),
            "{}",
            r.body
        );
        assert!(r.attributes.contains(&("faas.instance", "hello-1".into())));
        assert!(r
            .attributes
            .contains(&("sandscope.alert.state", "ALARM".into())));
    }
}
