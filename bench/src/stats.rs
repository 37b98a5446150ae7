//! Summaries and text tables.

use serde::Serialize;

/// Percentile summary of a set of measurements (same unit as the input).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Summary {
    /// Summarise `v` (nearest-rank percentiles).
    pub fn of(mut v: Vec<f64>) -> Summary {
        if v.is_empty() {
            return Summary {
                n: 0,
                min: f64::NAN,
                p50: f64::NAN,
                p90: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
                mean: f64::NAN,
            };
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let pct = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Summary {
            n,
            min: v[0],
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n as f64,
        }
    }
}

/// One printed table (also serialised with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// Title line.
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Cells.
    pub rows: Vec<Vec<String>>,
    /// Lines printed under the table.
    pub notes: Vec<String>,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>, header: &[&str]) -> Table {
        Table {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Add a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Add a row made of a label and a summary (min, p50, p90, p99, max), formatted with `f`.
    pub fn summary_row(&mut self, label: &str, s: &Summary, f: fn(f64) -> String) {
        self.rows.push(vec![
            label.to_string(),
            s.n.to_string(),
            f(s.p50),
            f(s.p90),
            f(s.p99),
            f(s.min),
            f(s.max),
        ]);
    }

    /// Add a note line.
    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Render as a Markdown-compatible text table.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut w: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, width) in w.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = width - c.chars().count();
                if i == 0 {
                    s.push_str(&format!(" {c}{} |", " ".repeat(pad)));
                } else {
                    s.push_str(&format!(" {}{c} |", " ".repeat(pad)));
                }
            }
            s
        };
        let mut out = format!("### {}\n\n", self.title);
        out.push_str(&line(&self.header));
        out.push('\n');
        let mut sep = String::from("|");
        for (i, width) in w.iter().enumerate() {
            if i == 0 {
                sep.push_str(&format!("{}|", "-".repeat(width + 2)));
            } else {
                sep.push_str(&format!("{}:|", "-".repeat(width + 1)));
            }
        }
        out.push_str(&sep);
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        for n in &self.notes {
            out.push_str(&format!("\n{n}"));
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out
    }
}

/// Summary-table header (label column named `what`).
pub const SUMMARY_HEADER: [&str; 7] = ["what", "n", "p50", "p90", "p99", "min", "max"];

/// Milliseconds with two decimals, from µs.
pub fn ms(us: f64) -> String {
    format!("{:.2} ms", us / 1000.0)
}

/// Microseconds with one decimal.
pub fn usf(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.0} µs", us)
    } else {
        format!("{:.1} µs", us)
    }
}

/// Nanoseconds with one decimal.
pub fn nsf(ns: f64) -> String {
    format!("{:.1} ns", ns)
}
