//! Line matchers: a Rust regex (with size limits) or a CloudWatch-style term pattern
//! (`"ERROR" -"retry"`), both compiled to one [`Matcher`] type. Each matcher also gives a
//! prefilter regex so a rule set can reject a line with one `RegexSet` search.

use regex::{Regex, RegexBuilder};

/// Longest pattern source accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 4096;
/// Compiled-program size limit per regex (bytes), as ripgrep's `--regex-size-limit`.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Lazy-DFA cache limit per regex (bytes).
pub const DFA_SIZE_LIMIT: usize = 2 << 20;
/// Only this many leading bytes of a line are matched (bounds per-line cost).
pub const MAX_MATCH_BYTES: usize = 8192;

/// A compiled pattern.
#[derive(Debug, Clone)]
pub enum Pattern {
    /// A Rust regex.
    Regex(Regex),
    /// CloudWatch-style terms: every `include` present, no `exclude` present.
    Terms {
        /// Required substrings.
        include: Vec<String>,
        /// Excluded substrings.
        exclude: Vec<String>,
    },
}

/// What matching one line produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hit {
    /// Matched; the metric counts 1.
    Count,
    /// Matched and the named capture parsed to this value.
    Value(f64),
    /// Matched, but the named capture was absent or not a number.
    BadValue,
}

/// A compiled line matcher.
#[derive(Debug, Clone)]
pub struct Matcher {
    pattern: Pattern,
    value: Option<String>,
    prefilter: String,
}

/// Build a size-limited regex.
pub fn build_regex(src: &str) -> Result<Regex, String> {
    if src.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "pattern is {} bytes, over the {MAX_PATTERN_LEN}-byte limit",
            src.len()
        ));
    }
    RegexBuilder::new(src)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(DFA_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|e| describe_regex_error(&e))
}

/// Turn regex's multi-line diagram into one line naming the column.
fn describe_regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::CompiledTooBig(limit) => format!(
            "regex is over the size limit (compiles to more than {limit} bytes); simplify it"
        ),
        regex::Error::Syntax(s) => {
            let lines: Vec<&str> = s.lines().collect();
            let what = lines
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or(s.as_str());
            // regex prints the pattern indented by 4, then a caret line under the error.
            let col = lines
                .iter()
                .find(|l| l.trim_start().starts_with('^'))
                .and_then(|l| l.find('^'))
                .map(|c| c.saturating_sub(4) + 1);
            match col {
                Some(c) => format!("invalid regex at column {c}: {what}"),
                None => format!("invalid regex: {what}"),
            }
        }
        other => format!("invalid regex: {other}"),
    }
}

/// Parse `"ERROR" -"retry" timeout` into (include, exclude).
pub fn parse_terms(src: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let mut include = Vec::new();
    let mut exclude = Vec::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let neg = b[i] == b'-';
        if neg {
            i += 1;
        }
        if i < b.len() && b[i] == b'?' {
            return Err(format!(
                "column {}: `?` (any-of) terms are not supported; use a regex alternation",
                i + 1
            ));
        }
        let term = if i < b.len() && b[i] == b'"' {
            let close = src[i + 1..]
                .find('"')
                .ok_or_else(|| format!("column {}: unterminated quote", i + 1))?;
            let t = &src[i + 1..i + 1 + close];
            i += close + 2;
            t.to_string()
        } else {
            let end = src[i..]
                .find(|c: char| c.is_ascii_whitespace())
                .map_or(src.len(), |e| i + e);
            let t = &src[i..end];
            i = end;
            t.to_string()
        };
        if term.is_empty() {
            return Err(format!("column {}: empty term", start + 1));
        }
        if neg {
            exclude.push(term);
        } else {
            include.push(term);
        }
    }
    if include.is_empty() && exclude.is_empty() {
        return Err("no terms".into());
    }
    Ok((include, exclude))
}

/// Cut `line` to [`MAX_MATCH_BYTES`] at a char boundary.
pub fn bounded(line: &str) -> &str {
    if line.len() <= MAX_MATCH_BYTES {
        return line;
    }
    let mut end = MAX_MATCH_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

impl Matcher {
    /// A regex matcher; `value` names a capture group that must exist.
    pub fn regex(src: &str, value: Option<&str>) -> Result<Self, (&'static str, String)> {
        let re = build_regex(src).map_err(|e| ("pattern", e))?;
        if let Some(v) = value {
            if !re.capture_names().any(|n| n == Some(v)) {
                return Err((
                    "value",
                    format!("pattern has no named capture group `{v}` (write (?P<{v}>...))"),
                ));
            }
        }
        Ok(Self {
            prefilter: src.to_string(),
            pattern: Pattern::Regex(re),
            value: value.map(str::to_string),
        })
    }

    /// A terms matcher (counts only).
    pub fn terms(src: &str) -> Result<Self, String> {
        if src.len() > MAX_PATTERN_LEN {
            return Err(format!("terms are over the {MAX_PATTERN_LEN}-byte limit"));
        }
        let (include, exclude) = parse_terms(src)?;
        // The first required term (or anything, if there is none) rejects most lines early.
        let prefilter = include
            .first()
            .map(|t| regex::escape(t))
            .unwrap_or_default();
        Ok(Self {
            pattern: Pattern::Terms { include, exclude },
            value: None,
            prefilter,
        })
    }

    /// The regex a rule set uses to find candidate rules for a line.
    pub fn prefilter(&self) -> &str {
        &self.prefilter
    }

    /// The compiled pattern.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// Match one line (already [`bounded`]).
    pub fn eval(&self, line: &str) -> Option<Hit> {
        match &self.pattern {
            Pattern::Terms { include, exclude } => {
                let ok = include.iter().all(|t| line.contains(t.as_str()))
                    && !exclude.iter().any(|t| line.contains(t.as_str()));
                ok.then_some(Hit::Count)
            }
            Pattern::Regex(re) => match &self.value {
                None => re.is_match(line).then_some(Hit::Count),
                Some(name) => {
                    let caps = re.captures(line)?;
                    Some(
                        caps.name(name)
                            .and_then(|m| m.as_str().trim().parse::<f64>().ok())
                            .filter(|v| v.is_finite())
                            .map_or(Hit::BadValue, Hit::Value),
                    )
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_and_terms_match_table() {
        let cases: &[(&str, bool, &str, bool)] = &[
            // (pattern, is_regex, line, expected)
            (
                "Task timed out",
                true,
                "2024 Task timed out after 3.00 seconds",
                true,
            ),
            ("Task timed out", true, "task timed out", false),
            (r"^ERROR \d+", true, "ERROR 42 boom", true),
            (r"^ERROR \d+", true, "an ERROR 42", false),
            ("(?i)error", true, "Error: x", true),
            (r#""ERROR" -"retry""#, false, "ERROR db down", true),
            (
                r#""ERROR" -"retry""#,
                false,
                "ERROR db down, will retry",
                false,
            ),
            (r#""ERROR" -"retry""#, false, "WARN db slow", false),
            (
                r#""Max Memory" "REPORT""#,
                false,
                "REPORT x Max Memory Used: 5 MB",
                true,
            ),
            (r#""Max Memory" "REPORT""#, false, "REPORT x", false),
            ("COLD=true", false, "init COLD=true", true),
            ("COLD=true", false, "init COLD=false", false),
            (r#"-"DEBUG""#, false, "INFO hi", true),
            (r#"-"DEBUG""#, false, "DEBUG hi", false),
            (r#""two words" x"#, false, "has two words and x", true),
            (r#""two words" x"#, false, "two  words x", false),
        ];
        for (pat, is_re, line, want) in cases {
            let m = if *is_re {
                Matcher::regex(pat, None).unwrap()
            } else {
                Matcher::terms(pat).unwrap()
            };
            assert_eq!(m.eval(line).is_some(), *want, "{pat} on {line:?}");
            // The prefilter never rejects a line the matcher accepts.
            if *want {
                assert!(Regex::new(m.prefilter()).unwrap().is_match(line), "{pat}");
            }
        }
    }

    #[test]
    fn capture_extraction() {
        let m = Matcher::regex(r"Max Memory Used: (?P<mb>\d+) MB", Some("mb")).unwrap();
        assert_eq!(
            m.eval("REPORT\tMax Memory Used: 120 MB"),
            Some(Hit::Value(120.0))
        );
        assert_eq!(m.eval("nothing"), None);
        let m = Matcher::regex(r"took (?P<ms>\S+)ms", Some("ms")).unwrap();
        assert_eq!(m.eval("took 12.5ms"), Some(Hit::Value(12.5)));
        assert_eq!(m.eval("took abcms"), Some(Hit::BadValue));
        let m = Matcher::regex(r"v=(?P<v>\d+)?;", Some("v")).unwrap();
        assert_eq!(m.eval("v=;"), Some(Hit::BadValue));
        let (k, e) = Matcher::regex(r"(?P<a>\d+)", Some("b")).unwrap_err();
        assert_eq!(k, "value");
        assert!(e.contains("no named capture group `b`"), "{e}");
    }

    #[test]
    fn bad_patterns_say_where() {
        let (k, e) = Matcher::regex("ERROR (", None).unwrap_err();
        assert_eq!(k, "pattern");
        assert!(
            e.contains("column 7") && e.contains("unclosed group"),
            "{e}"
        );
        let (_, e) = Matcher::regex(r"\w{1000}\w{1000}\w{1000}", None).unwrap_err();
        assert!(e.contains("size limit"), "{e}");
        let (_, e) = Matcher::regex(&"a".repeat(MAX_PATTERN_LEN + 1), None).unwrap_err();
        assert!(e.contains("byte limit"), "{e}");
        assert!(Matcher::terms(r#""ERROR"#)
            .unwrap_err()
            .contains("unterminated"));
        assert!(Matcher::terms(r#"?"a" ?"b""#)
            .unwrap_err()
            .contains("not supported"));
        assert!(Matcher::terms("   ").unwrap_err().contains("no terms"));
    }

    #[test]
    fn bounded_cuts_at_char_boundary() {
        let s = "é".repeat(MAX_MATCH_BYTES);
        let b = bounded(&s);
        assert!(b.len() <= MAX_MATCH_BYTES && b.len() >= MAX_MATCH_BYTES - 1);
        assert_eq!(bounded("short"), "short");
    }
}
