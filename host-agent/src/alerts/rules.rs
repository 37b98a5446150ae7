//! Rule configuration: raw `[[rules]]` tables (unknown keys rejected) and the validated,
//! compiled [`Rule`]. Every error names the file, the key (`rules[2].pattern`) and why.

use super::alarm::{AlarmSpec, Comparison, Statistic};
use super::matcher::Matcher;
use serde::Deserialize;
use std::path::Path;

/// Why rules could not be loaded: the same errors as the agent config (file, key, reason),
/// since rules live in sandscope.toml or a file of the same format.
pub type RulesError = crate::config::ConfigError;

/// A rules file: only `[[rules]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRulesFile {
    /// The rules.
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// Raw `[[rules]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Rule name (unique).
    pub name: String,
    /// Rust regex.
    pub pattern: Option<String>,
    /// CloudWatch-style terms.
    pub terms: Option<String>,
    /// `stdout`, `stderr`, `platform` or `all`.
    pub source: Option<String>,
    /// Function names in scope (default: all).
    pub functions: Option<Vec<String>>,
    /// Named capture giving the metric value.
    pub value: Option<String>,
    /// Metric unit.
    pub unit: Option<String>,
    /// Datapoint for a period without matches.
    pub default_value: Option<f64>,
    /// Alarm on the metric.
    pub alarm: Option<RawAlarm>,
    /// Actions on alarm state changes.
    #[serde(default)]
    pub actions: Vec<RawAction>,
}

/// Raw `[rules.alarm]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlarm {
    /// Threshold.
    pub threshold: f64,
    /// `>`, `>=` (default), `<`, `<=`.
    pub comparison: Option<String>,
    /// Period length, seconds (default 60).
    pub window_s: Option<f64>,
    /// N breaching datapoints (default 1).
    pub datapoints: Option<usize>,
    /// Out of the last M periods (default N).
    pub of: Option<usize>,
    /// `sum` (default for counts), `max` (default for values), `min`, `avg`, `count`.
    pub statistic: Option<String>,
}

/// Raw `[[rules.actions]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    /// `log`, `webhook`, `otlp` (an OTLP log record through the agent's log export).
    pub kind: String,
    /// Webhook URL.
    pub url: Option<String>,
    /// Webhook retries after the first attempt (default 3).
    pub retries: Option<u32>,
}

/// Which log streams a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources {
    /// Function stdout.
    pub stdout: bool,
    /// Function stderr.
    pub stderr: bool,
    /// Agent platform events.
    pub platform: bool,
}

impl Sources {
    /// Does the rule read `stream`?
    pub fn reads(&self, stream: &str) -> bool {
        match stream {
            "stdout" => self.stdout,
            "stderr" => self.stderr,
            "platform" => self.platform,
            _ => false,
        }
    }

    /// Config spelling.
    pub fn as_str(&self) -> &'static str {
        match (self.stdout, self.stderr, self.platform) {
            (true, false, false) => "stdout",
            (false, true, false) => "stderr",
            (false, false, true) => "platform",
            _ => "all",
        }
    }
}

/// A validated action.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A log line from the agent.
    Log,
    /// An HTTP POST with a JSON body.
    Webhook {
        /// `http://...` or `https://...` URL.
        url: String,
        /// Retries after the first attempt.
        retries: u32,
    },
    /// An OTLP log record (WARN on ALARM, INFO otherwise) through the agent's OTLP log
    /// export, so the backend sees the transition next to the lines that caused it.
    Otlp,
}

/// Units accepted (CloudWatch's names).
pub const UNITS: &[&str] = &[
    "None",
    "Count",
    "Count/Second",
    "Percent",
    "Seconds",
    "Milliseconds",
    "Microseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Bytes/Second",
];

/// A validated, compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Name.
    pub name: String,
    /// Pattern source as written (regex, or terms).
    pub pattern_text: String,
    /// The matcher.
    pub matcher: Matcher,
    /// Streams read.
    pub sources: Sources,
    /// Function scope (None = all).
    pub functions: Option<Vec<String>>,
    /// Named capture giving the value.
    pub value: Option<String>,
    /// Unit.
    pub unit: String,
    /// Datapoint for quiet periods.
    pub default_value: Option<f64>,
    /// Alarm.
    pub alarm: Option<AlarmSpec>,
    /// Actions.
    pub actions: Vec<Action>,
    /// Identity of the definition: state survives a reload only if it is unchanged.
    pub fingerprint: String,
    /// Where it was defined (`file: rules[i]`).
    pub origin: String,
}

impl Rule {
    /// Does the rule apply to this function?
    pub fn scopes(&self, function: &str) -> bool {
        self.functions
            .as_ref()
            .is_none_or(|f| f.iter().any(|n| n == function))
    }

    /// Validate and compile one raw rule; `path` and `index` name it in errors.
    pub fn from_raw(raw: RawRule, path: &str, index: usize) -> Result<Rule, RulesError> {
        let fingerprint = format!("{raw:?}");
        let invalid = |k: &str, reason: String| RulesError::Invalid {
            path: path.to_string(),
            key: format!("rules[{index}].{k}"),
            reason,
        };
        if raw.name.is_empty()
            || raw.name.len() > 64
            || !raw
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid(
                "name",
                format!(
                    "`{}` is not a valid rule name (1-64 chars of a-z, A-Z, 0-9, -, _ and .)",
                    raw.name
                ),
            ));
        }
        let (matcher, pattern_text) = match (&raw.pattern, &raw.terms) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "terms",
                    "give either `pattern` (regex) or `terms`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "pattern",
                    "missing: give `pattern` (a Rust regex) or `terms` (CloudWatch-style)".into(),
                ))
            }
            (Some(p), None) => (
                Matcher::regex(p, raw.value.as_deref())
                    .map_err(|(k, e)| invalid(k, format!("{e} (in `{p}`)")))?,
                p.clone(),
            ),
            (None, Some(t)) => {
                if raw.value.is_some() {
                    return Err(invalid(
                        "value",
                        "needs a regex `pattern` with a named capture group; terms only count"
                            .into(),
                    ));
                }
                (
                    Matcher::terms(t).map_err(|e| invalid("terms", format!("{e} (in `{t}`)")))?,
                    t.clone(),
                )
            }
        };
        let sources = match raw.source.as_deref().unwrap_or("all") {
            "stdout" => Sources {
                stdout: true,
                stderr: false,
                platform: false,
            },
            "stderr" => Sources {
                stdout: false,
                stderr: true,
                platform: false,
            },
            "platform" => Sources {
                stdout: false,
                stderr: false,
                platform: true,
            },
            "all" => Sources {
                stdout: true,
                stderr: true,
                platform: true,
            },
            other => {
                return Err(invalid(
                    "source",
                    format!("unknown source `{other}` (expected stdout, stderr, platform or all)"),
                ))
            }
        };
        if let Some(fs) = &raw.functions {
            if fs.is_empty() {
                return Err(invalid(
                    "functions",
                    "empty list (omit it for all functions)".into(),
                ));
            }
            for (j, f) in fs.iter().enumerate() {
                if !crate::config::valid_name(f) {
                    return Err(invalid(
                        &format!("functions[{j}]"),
                        format!("`{f}` is not a valid function name"),
                    ));
                }
            }
        }
        let unit = raw
            .unit
            .clone()
            .unwrap_or_else(|| if raw.value.is_some() { "None" } else { "Count" }.to_string());
        if !UNITS.contains(&unit.as_str()) {
            return Err(invalid(
                "unit",
                format!(
                    "unknown unit `{unit}` (expected one of {})",
                    UNITS.join(", ")
                ),
            ));
        }
        if let Some(d) = raw.default_value {
            if !d.is_finite() {
                return Err(invalid("default_value", "must be a finite number".into()));
            }
        }
        let alarm = match &raw.alarm {
            None => None,
            Some(a) => {
                let k = |s: &str| format!("alarm.{s}");
                if !a.threshold.is_finite() {
                    return Err(invalid(&k("threshold"), "must be a finite number".into()));
                }
                let comparison = match a.comparison.as_deref() {
                    None => Comparison::Ge,
                    Some(c) => Comparison::parse(c).ok_or_else(|| {
                        invalid(
                            &k("comparison"),
                            format!("unknown comparison `{c}` (expected >, >=, < or <=)"),
                        )
                    })?,
                };
                let w = a.window_s.unwrap_or(60.0);
                if !(w.is_finite() && (0.05..=86_400.0).contains(&w)) {
                    return Err(invalid(
                        &k("window_s"),
                        format!("must be between 0.05 and 86400 seconds (got {w})"),
                    ));
                }
                let n = a.datapoints.unwrap_or(1);
                let m = a.of.unwrap_or(n);
                if !(1..=100).contains(&m) {
                    return Err(invalid(
                        &k("of"),
                        format!("must be between 1 and 100 (got {m})"),
                    ));
                }
                if n == 0 || n > m {
                    return Err(invalid(
                        &k("datapoints"),
                        format!("must be between 1 and `of` ({m}) (got {n})"),
                    ));
                }
                let statistic = match a.statistic.as_deref() {
                    None if raw.value.is_some() => Statistic::Maximum,
                    None => Statistic::Sum,
                    Some(s) => Statistic::parse(s).ok_or_else(|| {
                        invalid(
                            &k("statistic"),
                            format!(
                                "unknown statistic `{s}` (expected sum, max, min, avg or count)"
                            ),
                        )
                    })?,
                };
                Some(AlarmSpec {
                    threshold: a.threshold,
                    comparison,
                    period_ms: ((w * 1000.0).round() as u64).max(1),
                    datapoints: n,
                    of: m,
                    statistic,
                })
            }
        };
        let mut actions = Vec::new();
        for (j, a) in raw.actions.iter().enumerate() {
            let k = |s: &str| format!("actions[{j}].{s}");
            if alarm.is_none() {
                return Err(invalid(
                    &k("kind"),
                    "actions run on alarm state changes: add a [rules.alarm] table".into(),
                ));
            }
            let act = match a.kind.as_str() {
                "log" => {
                    if a.url.is_some() {
                        return Err(invalid(&k("url"), "only webhook actions take a url".into()));
                    }
                    Action::Log
                }
                "webhook" => {
                    let url = a.url.clone().ok_or_else(|| {
                        invalid(&k("url"), "missing: webhook actions need a url".into())
                    })?;
                    let rest = url
                        .strip_prefix("http://")
                        .or_else(|| url.strip_prefix("https://"))
                        .ok_or_else(|| {
                            invalid(
                                &k("url"),
                                format!("`{url}` is not an http:// or https:// URL"),
                            )
                        })?;
                    if rest.is_empty() || rest.starts_with('/') || url.contains(char::is_whitespace)
                    {
                        return Err(invalid(&k("url"), format!("`{url}` has no host")));
                    }
                    let retries = a.retries.unwrap_or(3);
                    if retries > 10 {
                        return Err(invalid(
                            &k("retries"),
                            format!("at most 10 (got {retries})"),
                        ));
                    }
                    Action::Webhook { url, retries }
                }
                "otlp" => {
                    if a.url.is_some() {
                        return Err(invalid(
                            &k("url"),
                            "otlp actions use the agent's [otlp] log export; remove url".into(),
                        ));
                    }
                    Action::Otlp
                }
                other => {
                    return Err(invalid(
                        &k("kind"),
                        format!("unknown action kind `{other}` (expected log, webhook or otlp)"),
                    ))
                }
            };
            if a.retries.is_some() && !matches!(act, Action::Webhook { .. }) {
                return Err(invalid(&k("retries"), "only webhook actions retry".into()));
            }
            actions.push(act);
        }
        Ok(Rule {
            name: raw.name,
            pattern_text,
            matcher,
            sources,
            functions: raw.functions,
            value: raw.value,
            unit,
            default_value: raw.default_value,
            alarm,
            actions,
            fingerprint,
            origin: format!("{path}: rules[{index}]"),
        })
    }
}

/// Validate a list of raw rules from one file.
pub fn validate_all(raw: Vec<RawRule>, path: &str) -> Result<Vec<Rule>, RulesError> {
    let mut out: Vec<Rule> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let rule = Rule::from_raw(r, path, i)?;
        if out.iter().any(|o| o.name == rule.name) {
            return Err(RulesError::Invalid {
                path: path.to_string(),
                key: format!("rules[{i}].name"),
                reason: format!("duplicate rule `{}`", rule.name),
            });
        }
        out.push(rule);
    }
    Ok(out)
}

/// Parse a rules file's text.
pub fn parse_rules(text: &str, path: &str) -> Result<Vec<Rule>, RulesError> {
    let raw: RawRulesFile = toml::from_str(text).map_err(|e| RulesError::Parse {
        path: path.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    validate_all(raw.rules, path)
}

/// Load a rules file.
pub fn load_rules(path: &Path) -> Result<Vec<Rule>, RulesError> {
    let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_rules(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(t: &str) -> String {
        parse_rules(t, "r.toml").unwrap_err().to_string()
    }

    #[test]
    fn full_rule_parses() {
        let r = parse_rules(
            r#"
            [[rules]]
            name = "errors"
            pattern = 'ERROR (?P<code>\d+)'
            source = "stderr"
            functions = ["hello"]
            value = "code"
            unit = "Count"
            default_value = 0
            [rules.alarm]
            threshold = 3
            comparison = ">="
            window_s = 0.2
            datapoints = 2
            of = 3
            [[rules.actions]]
            kind = "webhook"
            url = "http://127.0.0.1:8080/hook"
            [[rules.actions]]
            kind = "log"
            "#,
            "r.toml",
        )
        .unwrap();
        let r = &r[0];
        assert_eq!(r.sources.as_str(), "stderr");
        assert!(r.scopes("hello") && !r.scopes("other"));
        let a = r.alarm.as_ref().unwrap();
        assert_eq!((a.period_ms, a.datapoints, a.of), (200, 2, 3));
        assert_eq!(a.statistic, Statistic::Maximum);
        assert_eq!(r.actions.len(), 2);
    }

    #[test]
    fn bad_rules_name_file_key_and_reason() {
        let base = "[[rules]]\nname = 'r'\n";
        let cases = [
            ("pattern = 'ERROR ('", "rules[0].pattern", "column 7"),
            ("pattern = '\\w{1000}\\w{1000}\\w{1000}'", "rules[0].pattern", "size limit"),
            ("", "rules[0].pattern", "missing"),
            ("pattern = 'a'\nterms = 'b'", "rules[0].terms", "not both"),
            ("terms = '\"a'", "rules[0].terms", "unterminated"),
            ("pattern = 'a'\nsource = 'stdin'", "rules[0].source", "unknown source"),
            ("pattern = 'a'\nunit = 'Parsecs'", "rules[0].unit", "unknown unit"),
            ("pattern = 'a(?P<v>x)'\nvalue = 'w'", "rules[0].value", "no named capture"),
            ("pattern = 'a'\nfunctions = ['a b']", "rules[0].functions[0]", "valid function"),
            (
                "pattern = 'a'\n[rules.alarm]\nthreshold = 1\ncomparison = '=='",
                "rules[0].alarm.comparison",
                "unknown comparison",
            ),
            (
                "pattern = 'a'\n[rules.alarm]\nthreshold = 1\ndatapoints = 4\nof = 3",
                "rules[0].alarm.datapoints",
                "between 1 and `of`",
            ),
            (
                "pattern = 'a'\n[rules.alarm]\nthreshold = 1\nwindow_s = 0.001",
                "rules[0].alarm.window_s",
                "between",
            ),
            (
                "pattern = 'a'\n[rules.alarm]\nthreshold = 1\n[[rules.actions]]\nkind = 'otlp'\nurl = 'http://x'",
                "rules[0].actions[0].url",
                "remove url",
            ),
            (
                "pattern = 'a'\n[rules.alarm]\nthreshold = 1\n[[rules.actions]]\nkind = 'webhook'",
                "rules[0].actions[0].url",
                "missing",
            ),
            (
                "pattern = 'a'\n[rules.alarm]\nthreshold = 1\n[[rules.actions]]\nkind = 'webhook'\nurl = 'ftp://x'",
                "rules[0].actions[0].url",
                "not an http:// or https:// URL",
            ),
            ("pattern = 'a'\n[[rules.actions]]\nkind = 'log'", "rules[0].actions[0].kind", "alarm"),
        ];
        for (extra, key, reason) in cases {
            let e = err(&format!("{base}{extra}\n"));
            assert!(e.starts_with("r.toml: "), "{e}");
            assert!(e.contains(key) && e.contains(reason), "{extra}: {e}");
        }
        let e = err("[[rules]]\nname='a b'\npattern='x'\n");
        assert!(e.contains("rules[0].name"), "{e}");
        let e = err("[[rules]]\nname='a'\npattern='x'\n[[rules]]\nname='a'\npattern='y'\n");
        assert!(
            e.contains("rules[1].name") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected_with_line() {
        let e = err("[[rules]]\nname='a'\npattern='x'\nthreshhold=3\n");
        assert!(
            e.contains("unknown field `threshhold`") && e.contains("line 4"),
            "{e}"
        );
        let e = err("[[rules]]\nname='a'\npattern='x'\n[rules.alarm]\nthreshold=1\nwindow=3\n");
        assert!(e.contains("unknown field `window`"), "{e}");
        let e = err("[agent]\nhttp='x'\n");
        assert!(e.contains("unknown field `agent`"), "{e}");
    }

    #[test]
    fn example_rules_are_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rules.toml");
        let r = load_rules(&p).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.len() >= 5);
    }
}
