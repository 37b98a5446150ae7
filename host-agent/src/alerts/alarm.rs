//! Alarms: one datapoint per period, N of the last M periods, three states.
//!
//! The exact rule, evaluated when a period closes (missing datapoints are periods with no
//! match and no `default_value`):
//! - **→ ALARM** when at least N of the last M datapoints breach the threshold.
//! - **ALARM → OK** only when at least N of the last M datapoints *that arrived since the
//!   alarm was entered* are present and do not breach, and fewer than N breach
//!   (hysteresis: with N=2, M=3 one quiet period never clears an alarm, quiet periods from
//!   before the alarm do not count, and a single breaching period among quiet ones does
//!   not re-enter it).
//! - **ALARM → INSUFFICIENT_DATA** only when all M periods are missing.
//! - **OK / INSUFFICIENT_DATA**: OK when any of the last M datapoints is present (and the
//!   ALARM condition does not hold), INSUFFICIENT_DATA when none is.
//!
//! Alarms start in INSUFFICIENT_DATA.

use serde::Serialize;
use std::collections::VecDeque;

/// Alarm state, named as in CloudWatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AlarmState {
    /// Not breaching.
    #[serde(rename = "OK")]
    Ok,
    /// Breaching.
    #[serde(rename = "ALARM")]
    Alarm,
    /// Not enough data to decide.
    #[serde(rename = "INSUFFICIENT_DATA")]
    InsufficientData,
}

impl AlarmState {
    /// The CloudWatch name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Alarm => "ALARM",
            Self::InsufficientData => "INSUFFICIENT_DATA",
        }
    }
}

impl std::fmt::Display for AlarmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Threshold comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
}

impl Comparison {
    /// Parse `>`, `>=`, `<`, `<=`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            ">" => Self::Gt,
            ">=" => Self::Ge,
            "<" => Self::Lt,
            "<=" => Self::Le,
            _ => return None,
        })
    }

    /// The operator text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gt => ">",
            Self::Ge => ">=",
            Self::Lt => "<",
            Self::Le => "<=",
        }
    }

    /// `value <op> threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::Gt => value > threshold,
            Self::Ge => value >= threshold,
            Self::Lt => value < threshold,
            Self::Le => value <= threshold,
        }
    }
}

/// How a period's matches become one datapoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistic {
    /// Sum of values (count rules: the number of matches).
    Sum,
    /// Largest value.
    Maximum,
    /// Smallest value.
    Minimum,
    /// Mean value.
    Average,
    /// Number of matches.
    SampleCount,
}

impl Statistic {
    /// Parse `sum`, `max`, `min`, `avg`, `count`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sum" => Self::Sum,
            "max" => Self::Maximum,
            "min" => Self::Minimum,
            "avg" => Self::Average,
            "count" => Self::SampleCount,
            _ => return None,
        })
    }
}

/// Validated alarm settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmSpec {
    /// Threshold.
    pub threshold: f64,
    /// Comparison against the threshold.
    pub comparison: Comparison,
    /// Period length, ms.
    pub period_ms: u64,
    /// N: breaching datapoints needed.
    pub datapoints: usize,
    /// M: periods considered.
    pub of: usize,
    /// Datapoint statistic.
    pub statistic: Statistic,
}

/// One state change.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    /// Previous state.
    pub from: AlarmState,
    /// New state.
    pub to: AlarmState,
    /// When, ms since the epoch (or since the start of a replay).
    pub at_ms: u64,
    /// The datapoint that closed the period.
    pub value: Option<f64>,
    /// Why, in words.
    pub reason: String,
}

/// An alarm's evaluation state.
#[derive(Debug, Clone)]
pub struct Alarm {
    spec: AlarmSpec,
    history: VecDeque<Option<f64>>,
    state: AlarmState,
    /// Periods pushed since the alarm entered ALARM.
    in_alarm: usize,
}

impl Alarm {
    /// A new alarm in INSUFFICIENT_DATA.
    pub fn new(spec: AlarmSpec) -> Self {
        Self {
            history: VecDeque::with_capacity(spec.of),
            spec,
            state: AlarmState::InsufficientData,
            in_alarm: 0,
        }
    }

    /// Current state.
    pub fn state(&self) -> AlarmState {
        self.state
    }

    /// Settings.
    pub fn spec(&self) -> &AlarmSpec {
        &self.spec
    }

    /// Add one closed period's datapoint; returns the transition it caused, if any.
    pub fn push(&mut self, dp: Option<f64>, at_ms: u64) -> Option<Transition> {
        if self.history.len() == self.spec.of {
            self.history.pop_front();
        }
        self.history.push_back(dp);
        let s = &self.spec;
        let present = self.history.iter().flatten().count();
        let breaching = self
            .history
            .iter()
            .flatten()
            .filter(|v| s.comparison.holds(**v, s.threshold))
            .count();
        self.in_alarm += 1;
        let recent = self.in_alarm.min(self.history.len());
        let quiet = self
            .history
            .iter()
            .skip(self.history.len() - recent)
            .flatten()
            .filter(|v| !s.comparison.holds(**v, s.threshold))
            .count();
        let next = if breaching >= s.datapoints {
            AlarmState::Alarm
        } else if self.state == AlarmState::Alarm {
            if quiet >= s.datapoints {
                AlarmState::Ok
            } else if present == 0 && self.history.len() == s.of {
                AlarmState::InsufficientData
            } else {
                AlarmState::Alarm
            }
        } else if present > 0 {
            AlarmState::Ok
        } else {
            AlarmState::InsufficientData
        };
        if next == self.state {
            return None;
        }
        let (n, m) = (s.datapoints, self.history.len());
        let op = s.comparison.as_str();
        let reason = match next {
            AlarmState::Alarm => {
                format!(
                    "{breaching} of the last {m} datapoints {op} {}",
                    s.threshold
                )
            }
            AlarmState::Ok => format!(
                "{quiet} of the last {m} datapoints not {op} {} (need {n} to leave ALARM)",
                s.threshold
            ),
            AlarmState::InsufficientData => format!("no datapoints in the last {m} periods"),
        };
        let t = Transition {
            from: self.state,
            to: next,
            at_ms,
            value: dp,
            reason,
        };
        self.state = next;
        if next == AlarmState::Alarm {
            self.in_alarm = 0;
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::AlarmState::{self, *};
    use super::{Alarm as Al, AlarmSpec, Comparison, Statistic};

    fn alarm(n: usize, m: usize) -> Al {
        Al::new(AlarmSpec {
            threshold: 3.0,
            comparison: Comparison::Ge,
            period_ms: 1000,
            datapoints: n,
            of: m,
            statistic: Statistic::Sum,
        })
    }

    fn run(a: &mut Al, dps: &[Option<f64>]) -> Vec<AlarmState> {
        dps.iter()
            .enumerate()
            .map(|(i, d)| {
                a.push(*d, i as u64);
                a.state()
            })
            .collect()
    }

    #[test]
    fn comparisons() {
        assert!(Comparison::Gt.holds(4.0, 3.0) && !Comparison::Gt.holds(3.0, 3.0));
        assert!(Comparison::Ge.holds(3.0, 3.0) && !Comparison::Ge.holds(2.9, 3.0));
        assert!(Comparison::Lt.holds(2.0, 3.0) && !Comparison::Lt.holds(3.0, 3.0));
        assert!(Comparison::Le.holds(3.0, 3.0) && !Comparison::Le.holds(3.1, 3.0));
        assert_eq!(Comparison::parse("=="), None);
    }

    #[test]
    fn starts_insufficient_and_stays_without_data() {
        let mut a = alarm(2, 3);
        assert_eq!(a.state(), InsufficientData);
        assert_eq!(run(&mut a, &[None, None, None]), [InsufficientData; 3]);
    }

    #[test]
    fn n_of_m_enters_alarm_and_hysteresis_on_recovery() {
        let mut a = alarm(2, 3);
        let s = run(
            &mut a,
            &[
                Some(0.0), // OK: data, no breach
                Some(5.0), // 1 of 3 breaching: still OK
                Some(1.0), // still 1 of 3
                Some(4.0), // 2 of 3 → ALARM
                Some(0.0), // 1 quiet since ALARM (the older 1.0 does not count): ALARM
                Some(9.0), // 2 breaching: ALARM
                Some(0.0), // 1 breaching (9), 2 quiet since ALARM → OK
                Some(0.0), // OK
                Some(7.0), // 1 breaching of 3: OK (no flap)
                Some(8.0), // 2 of 3 → ALARM
                Some(0.0), // first quiet period: still ALARM
                Some(0.0), // second → OK
            ],
        );
        assert_eq!(
            s,
            [Ok, Ok, Ok, Alarm, Alarm, Alarm, Ok, Ok, Ok, Alarm, Alarm, Ok]
        );
    }

    #[test]
    fn missing_data_from_alarm_needs_all_m_missing() {
        let mut a = alarm(2, 3);
        run(&mut a, &[Some(3.0), Some(3.0)]);
        assert_eq!(a.state(), Alarm);
        let s = run(&mut a, &[None, None, None]);
        // One breaching datapoint remains for two periods: ALARM held, then all missing.
        assert_eq!(s, [Alarm, Alarm, InsufficientData]);
        let t = a.push(Some(0.0), 9).unwrap();
        assert_eq!((t.from, t.to), (InsufficientData, Ok));
    }

    #[test]
    fn one_of_one_follows_each_period() {
        let mut a = alarm(1, 1);
        let s = run(&mut a, &[Some(3.0), Some(0.0), None, Some(10.0)]);
        assert_eq!(s, [Alarm, Ok, InsufficientData, Alarm]);
    }

    #[test]
    fn transitions_carry_reason_and_value() {
        let mut a = alarm(1, 1);
        let t = a.push(Some(4.0), 42).unwrap();
        assert_eq!(t.from, InsufficientData);
        assert_eq!(t.to, Alarm);
        assert_eq!(t.at_ms, 42);
        assert_eq!(t.value, Some(4.0));
        assert!(t.reason.contains(">= 3"), "{}", t.reason);
        assert!(a.push(Some(5.0), 43).is_none());
    }
}
