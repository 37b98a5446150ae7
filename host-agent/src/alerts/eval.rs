//! The clock-free evaluator: lines in, periods closed on demand, transitions out. The
//! agent's engine drives it with wall-clock time; `sandscope rules test` with replay time.

use super::alarm::{Alarm, AlarmState, Statistic, Transition};
use super::matcher::{bounded, Hit};
use super::rules::{Rule, RulesError};
use regex::RegexSet;
use serde::Serialize;
use std::collections::VecDeque;

/// Sample lines kept per period (sent with webhooks).
pub const SAMPLES: usize = 3;
/// Transitions kept per rule for the feed.
pub const RECENT_TRANSITIONS: usize = 20;

/// Compiled rules plus one `RegexSet` prefilter over all of them.
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<Rule>,
    set: RegexSet,
}

impl RuleSet {
    /// Build a set; names must be unique across all sources.
    pub fn new(rules: Vec<Rule>) -> Result<Self, RulesError> {
        for (i, r) in rules.iter().enumerate() {
            if let Some(o) = rules[..i].iter().find(|o| o.name == r.name) {
                return Err(RulesError::Invalid {
                    path: r.origin.split(": ").next().unwrap_or("").to_string(),
                    key: format!("{}.name", r.origin.rsplit(": ").next().unwrap_or("rules")),
                    reason: format!("duplicate rule `{}` (also in {})", r.name, o.origin),
                });
            }
        }
        let set = regex::RegexSetBuilder::new(rules.iter().map(|r| r.matcher.prefilter()))
            .size_limit(super::matcher::REGEX_SIZE_LIMIT * 16)
            .dfa_size_limit(super::matcher::DFA_SIZE_LIMIT * 4)
            .build()
            .map_err(|e| RulesError::Invalid {
                path: "<rules>".into(),
                key: "rules".into(),
                reason: format!("the combined rule set is too large: {e}"),
            })?;
        Ok(Self { rules, set })
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Call `f(index, hit)` for every rule that matches.
    pub fn matches(&self, stream: &str, function: &str, line: &str, mut f: impl FnMut(usize, Hit)) {
        let line = bounded(line);
        if self.rules.is_empty() || !self.set.is_match(line) {
            return;
        }
        for i in self.set.matches(line).iter() {
            let r = &self.rules[i];
            if !r.sources.reads(stream) || !r.scopes(function) {
                continue;
            }
            if let Some(hit) = r.matcher.eval(line) {
                f(i, hit);
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Period {
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Period {
    fn add(&mut self, v: f64) {
        if self.n == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.n += 1;
        self.sum += v;
    }

    fn datapoint(&self, stat: Statistic, default: Option<f64>) -> Option<f64> {
        if self.n == 0 {
            return default;
        }
        Some(match stat {
            Statistic::Sum => self.sum,
            Statistic::Maximum => self.max,
            Statistic::Minimum => self.min,
            Statistic::Average => self.sum / self.n as f64,
            Statistic::SampleCount => self.n as f64,
        })
    }
}

/// Per-rule evaluation state.
#[derive(Debug, Clone)]
pub struct RuleState {
    period: Period,
    period_start_ms: u64,
    alarm: Option<Alarm>,
    /// Datapoint of the last closed period.
    pub last_value: Option<f64>,
    /// Matches since the rule was loaded.
    pub matches: u64,
    /// Matches whose capture was not a number.
    pub bad_values: u64,
    samples: VecDeque<String>,
    last_function: String,
    last_sandbox: String,
    /// Recent transitions, oldest first.
    pub transitions: VecDeque<Transition>,
}

impl RuleState {
    fn new(rule: &Rule, now_ms: u64) -> Self {
        Self {
            period: Period::default(),
            period_start_ms: now_ms,
            alarm: rule.alarm.clone().map(Alarm::new),
            last_value: None,
            matches: 0,
            bad_values: 0,
            samples: VecDeque::new(),
            last_function: String::new(),
            last_sandbox: String::new(),
            transitions: VecDeque::new(),
        }
    }

    /// Alarm state (None for rules without an alarm).
    pub fn state(&self) -> Option<AlarmState> {
        self.alarm.as_ref().map(Alarm::state)
    }
}

/// A transition with the context actions need.
#[derive(Debug, Clone, Serialize)]
pub struct Fired {
    /// Rule name.
    pub rule: String,
    /// Function of the last matching line (may be empty).
    pub function: String,
    /// Sandbox of the last matching line (may be empty).
    pub sandbox: String,
    /// Up to [`SAMPLES`] lines from the period.
    pub samples: Vec<String>,
    /// Unit of the value.
    pub unit: String,
    /// Alarm threshold.
    pub threshold: f64,
    /// Alarm comparison.
    pub comparison: &'static str,
    /// The transition.
    #[serde(flatten)]
    pub transition: Transition,
    /// Index of the rule in the set (not serialised).
    #[serde(skip)]
    pub index: usize,
}

/// Rules and their state.
#[derive(Debug, Clone)]
pub struct Evaluator {
    set: RuleSet,
    states: Vec<RuleState>,
}

impl Evaluator {
    /// Start evaluating `set` at `now_ms`.
    pub fn new(set: RuleSet, now_ms: u64) -> Self {
        let states = set
            .rules
            .iter()
            .map(|r| RuleState::new(r, now_ms))
            .collect();
        Self { set, states }
    }

    /// Swap in a new set; rules with an unchanged definition keep their state.
    pub fn replace(&mut self, set: RuleSet, now_ms: u64) {
        let mut states = Vec::with_capacity(set.rules.len());
        for r in &set.rules {
            let old = self
                .set
                .rules
                .iter()
                .position(|o| o.name == r.name && o.fingerprint == r.fingerprint);
            states.push(match old {
                Some(i) => self.states[i].clone(),
                None => RuleState::new(r, now_ms),
            });
        }
        self.set = set;
        self.states = states;
    }

    /// Rules.
    pub fn rules(&self) -> &[Rule] {
        &self.set.rules
    }

    /// Rule states, parallel to [`Self::rules`].
    pub fn states(&self) -> &[RuleState] {
        &self.states
    }

    /// Feed one line. Returns how many rules matched it.
    pub fn observe(&mut self, stream: &str, function: &str, sandbox: &str, line: &str) -> usize {
        let mut n = 0;
        let states = &mut self.states;
        self.set.matches(stream, function, line, |i, hit| {
            n += 1;
            let st = &mut states[i];
            st.matches += 1;
            match hit {
                Hit::Count => st.period.add(1.0),
                Hit::Value(v) => st.period.add(v),
                Hit::BadValue => st.bad_values += 1,
            }
            if st.samples.len() < SAMPLES {
                st.samples.push_back(line.chars().take(1024).collect());
            }
            if st.last_function != function {
                st.last_function = function.to_string();
            }
            if st.last_sandbox != sandbox {
                st.last_sandbox = sandbox.to_string();
            }
        });
        n
    }

    /// Close every period that ended at or before `now_ms`; return the transitions.
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<Fired>) {
        for (i, (rule, st)) in self.set.rules.iter().zip(&mut self.states).enumerate() {
            let Some(spec) = rule.alarm.as_ref() else {
                continue;
            };
            let p = spec.period_ms;
            let mut closed = 0;
            while now_ms >= st.period_start_ms + p {
                let end = st.period_start_ms + p;
                // After a long gap, only the last `of` empty periods matter.
                if closed > spec.of + 1 {
                    let skip = (now_ms - end) / p;
                    st.period_start_ms = end + skip * p;
                    continue;
                }
                closed += 1;
                let dp = st.period.datapoint(spec.statistic, rule.default_value);
                st.last_value = dp;
                let alarm = st.alarm.as_mut().expect("alarm state exists with spec");
                if let Some(t) = alarm.push(dp, end) {
                    if st.transitions.len() == RECENT_TRANSITIONS {
                        st.transitions.pop_front();
                    }
                    st.transitions.push_back(t.clone());
                    out.push(Fired {
                        rule: rule.name.clone(),
                        function: st.last_function.clone(),
                        sandbox: st.last_sandbox.clone(),
                        samples: st.samples.iter().cloned().collect(),
                        unit: rule.unit.clone(),
                        threshold: spec.threshold,
                        comparison: spec.comparison.as_str(),
                        transition: t,
                        index: i,
                    });
                }
                st.period = Period::default();
                st.samples.clear();
                st.period_start_ms = end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::rules::parse_rules;

    fn eval(toml: &str) -> Evaluator {
        Evaluator::new(
            RuleSet::new(parse_rules(toml, "t.toml").unwrap()).unwrap(),
            0,
        )
    }

    const ERRORS: &str = r#"
        [[rules]]
        name = "errors"
        terms = '"ERROR" -"retry"'
        source = "stderr"
        default_value = 0
        [rules.alarm]
        threshold = 3
        window_s = 1
        datapoints = 2
        of = 3
    "#;

    #[test]
    fn source_and_scope_filter() {
        let mut e = eval(
            r#"
            [[rules]]
            name = "a"
            pattern = "boom"
            source = "stderr"
            functions = ["f"]
            "#,
        );
        assert_eq!(e.observe("stderr", "f", "s", "boom"), 1);
        assert_eq!(e.observe("stdout", "f", "s", "boom"), 0);
        assert_eq!(e.observe("stderr", "g", "s", "boom"), 0);
        assert_eq!(e.observe("stderr", "f", "s", "bam"), 0);
        assert_eq!(e.states()[0].matches, 1);
    }

    #[test]
    fn error_spike_alarms_and_recovers() {
        let mut e = eval(ERRORS);
        let mut fired = Vec::new();
        let mut t = 0;
        let mut period = |e: &mut Evaluator, errors: usize, fired: &mut Vec<Fired>| {
            for _ in 0..errors {
                e.observe("stderr", "f", "sb1", "ERROR db down");
                e.observe("stderr", "f", "sb1", "ERROR db down, retry");
            }
            t += 1000;
            e.advance(t, fired);
            e.states()[0].state().unwrap()
        };
        use AlarmState::*;
        let states: Vec<_> = [0, 5, 5, 0, 4, 0, 0, 0]
            .iter()
            .map(|n| period(&mut e, *n, &mut fired))
            .collect();
        assert_eq!(states, [Ok, Ok, Alarm, Alarm, Alarm, Ok, Ok, Ok]);
        let tos: Vec<_> = fired.iter().map(|f| f.transition.to).collect();
        assert_eq!(tos, [Ok, Alarm, Ok]);
        let alarm = &fired[1];
        assert_eq!(alarm.transition.value, Some(5.0));
        assert_eq!(
            (alarm.function.as_str(), alarm.sandbox.as_str()),
            ("f", "sb1")
        );
        assert_eq!(alarm.samples, ["ERROR db down"; 3]);
    }

    #[test]
    fn without_default_quiet_periods_are_insufficient_data() {
        let mut e = eval(&ERRORS.replace("default_value = 0", ""));
        let mut fired = Vec::new();
        e.advance(5000, &mut fired);
        assert!(fired.is_empty());
        assert_eq!(e.states()[0].state(), Some(AlarmState::InsufficientData));
        for _ in 0..3 {
            e.observe("stderr", "f", "s", "ERROR x");
        }
        e.advance(6000, &mut fired);
        e.observe("stderr", "f", "s", "ERROR x");
        e.observe("stderr", "f", "s", "ERROR x");
        e.observe("stderr", "f", "s", "ERROR x");
        e.advance(7000, &mut fired);
        assert_eq!(e.states()[0].state(), Some(AlarmState::Alarm));
        // Errors stop; after M empty periods, the alarm has no data.
        e.advance(10_000, &mut fired);
        assert_eq!(e.states()[0].state(), Some(AlarmState::InsufficientData));
    }

    #[test]
    fn value_statistics_and_units() {
        let mut e = eval(
            r#"
            [[rules]]
            name = "mem"
            pattern = 'Max Memory Used: (?P<mb>\d+) MB'
            value = "mb"
            unit = "Megabytes"
            [rules.alarm]
            threshold = 100
            comparison = ">"
            window_s = 1
            "#,
        );
        assert_eq!(e.rules()[0].unit, "Megabytes");
        let mut fired = Vec::new();
        for v in [10, 120, 30] {
            e.observe(
                "platform",
                "f",
                "s",
                &format!("REPORT Max Memory Used: {v} MB"),
            );
        }
        e.advance(1000, &mut fired);
        assert_eq!(e.states()[0].last_value, Some(120.0));
        assert_eq!(e.states()[0].state(), Some(AlarmState::Alarm));
        assert_eq!(fired[0].unit, "Megabytes");
    }

    #[test]
    fn reload_keeps_state_of_unchanged_rules() {
        let mut e = eval(ERRORS);
        let mut fired = Vec::new();
        for _ in 0..2 {
            for _ in 0..4 {
                e.observe("stderr", "f", "s", "ERROR");
            }
            e.advance(e.states()[0].period_start_ms + 1000, &mut fired);
        }
        assert_eq!(e.states()[0].state(), Some(AlarmState::Alarm));
        let both = format!("{ERRORS}\n[[rules]]\nname = 'other'\npattern = 'x'\n");
        e.replace(
            RuleSet::new(parse_rules(&both, "t.toml").unwrap()).unwrap(),
            2000,
        );
        assert_eq!(e.states()[0].state(), Some(AlarmState::Alarm));
        let changed = ERRORS.replace("threshold = 3", "threshold = 30");
        e.replace(
            RuleSet::new(parse_rules(&changed, "t.toml").unwrap()).unwrap(),
            2000,
        );
        assert_eq!(e.states()[0].state(), Some(AlarmState::InsufficientData));
    }
}
