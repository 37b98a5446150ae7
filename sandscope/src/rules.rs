//! `sandscope rules test FILE --log SAMPLE.log`: try alert rules offline against a log,
//! replaying it through the same evaluator the agent runs. `rules bench` (hidden) times
//! the matcher.

use anyhow::Result;
use host_agent::alerts::eval::{Evaluator, Fired, RuleSet};
use host_agent::alerts::matcher::{bounded, Hit};
use host_agent::alerts::rules::load_rules;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Arguments of `rules test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Rules file (`[[rules]]` tables).
    pub file: PathBuf,
    /// Sample log. A line may start with `stdout: `, `stderr: ` or `platform: ` to set its
    /// stream; other lines use --stream.
    #[arg(long)]
    pub log: PathBuf,
    /// Replay rate: lines per second of simulated time (periods close as time passes).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Stream of lines without a prefix.
    #[arg(long, default_value = "stdout", value_parser = ["stdout", "stderr", "platform"])]
    pub stream: String,
    /// Function name the lines are attributed to.
    #[arg(long, default_value = "function")]
    pub function: String,
}

/// Arguments of `rules bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Rules in the set.
    #[arg(long, default_value_t = 50)]
    pub rules: usize,
    /// Lines to match.
    #[arg(long, default_value_t = 2_000_000)]
    pub lines: usize,
}

/// `rules test`.
pub fn test(a: TestArgs) -> Result<ExitCode> {
    let rules = match load_rules(&a.file) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sandscope: {}", host_agent::agent::chain(&e));
            return Ok(ExitCode::FAILURE);
        }
    };
    let set = match RuleSet::new(rules) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sandscope: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if !(a.rate.is_finite() && a.rate > 0.0) {
        anyhow::bail!("--rate must be a positive number");
    }
    let text = std::fs::read_to_string(&a.log)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.log.display()))?;
    let mut ev = Evaluator::new(set, 0);
    let n_rules = ev.rules().len();
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); n_rules];
    let mut fired: Vec<(usize, Fired)> = Vec::new();
    let mut out = Vec::new();
    let mut lines = 0usize;
    for (i, raw) in text.lines().enumerate() {
        lines += 1;
        let t_ms = (i as f64 * 1000.0 / a.rate) as u64;
        ev.advance(t_ms, &mut out);
        fired.extend(out.drain(..).map(|f| (i + 1, f)));
        let (stream, line) = ["stdout", "stderr", "platform"]
            .iter()
            .find_map(|s| raw.strip_prefix(&format!("{s}: ")).map(|l| (*s, l)))
            .unwrap_or((a.stream.as_str(), raw));
        let before: Vec<u64> = ev.states().iter().map(|s| s.matches).collect();
        ev.observe(stream, &a.function, "replay", line);
        for (k, r) in ev.rules().iter().enumerate() {
            if ev.states()[k].matches > before[k] && r.value.is_some() {
                if let Some(Hit::Value(v)) = r.matcher.eval(bounded(line)) {
                    values[k].push(v);
                }
            }
        }
    }
    // Close the period the last line fell in.
    let end = (lines as f64 * 1000.0 / a.rate) as u64;
    let max_period = ev
        .rules()
        .iter()
        .filter_map(|r| r.alarm.as_ref().map(|a| a.period_ms))
        .max()
        .unwrap_or(0);
    ev.advance(end + max_period, &mut out);
    fired.extend(out.drain(..).map(|f| (lines, f)));
    println!(
        "{} rules, {lines} lines replayed at {} lines/s\n",
        n_rules, a.rate
    );
    for (k, (r, st)) in ev.rules().iter().zip(ev.states()).enumerate() {
        println!(
            "rule {} ({}, source {}): {} matches",
            r.name,
            r.pattern_text,
            r.sources.as_str(),
            st.matches
        );
        if r.value.is_some() {
            let v = &values[k];
            let shown: Vec<String> = v.iter().take(10).map(|x| x.to_string()).collect();
            println!(
                "  values ({}): {}{}{}",
                r.unit,
                shown.join(", "),
                if v.len() > 10 { ", ..." } else { "" },
                if st.bad_values > 0 {
                    format!(" ({} not numeric)", st.bad_values)
                } else {
                    String::new()
                }
            );
        }
        match st.state() {
            None => println!("  no alarm"),
            Some(s) => {
                for (line, f) in fired.iter().filter(|(_, f)| f.index == k) {
                    println!(
                        "  line {line} (t={:.1}s): {} -> {}: {}",
                        f.transition.at_ms as f64 / 1000.0,
                        f.transition.from,
                        f.transition.to,
                        f.transition.reason
                    );
                }
                println!("  final state: {s}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `rules bench`: lines/s through a set of `rules` literal-prefixed regexes.
pub fn bench(a: BenchArgs) -> Result<ExitCode> {
    let mut toml = String::new();
    for i in 0..a.rules {
        toml.push_str(&format!(
            "[[rules]]\nname = 'r{i}'\npattern = 'ERR{i:03} code=(?P<c>\\d+)'\nvalue = 'c'\n"
        ));
    }
    let rules = host_agent::alerts::rules::parse_rules(&toml, "<bench>")?;
    let mut ev = Evaluator::new(RuleSet::new(rules)?, 0);
    let miss = "2024-05-01T12:00:00Z INFO request handled path=/api/v1/items status=200 took=3ms";
    let hit = "2024-05-01T12:00:00Z ERR007 code=42 request failed path=/api/v1/items";
    for (name, line) in [("no match", miss), ("1 in 100 match", hit)] {
        let t = Instant::now();
        for i in 0..a.lines {
            let l = if line == hit && i % 100 != 0 {
                miss
            } else {
                line
            };
            ev.observe("stderr", "f", "s", l);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{name}: {} rules, {} lines in {:.3}s: {:.2} M lines/s, {:.0} ns/line",
            a.rules,
            a.lines,
            s,
            a.lines as f64 / s / 1e6,
            s * 1e9 / a.lines as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}
