//! Drawing: every view borrows [`State`] and renders into a frame. No I/O here.

use crate::model::{Dist, FunctionStats, PHASES};
use crate::state::{ConnState, SortKey, State, Tab};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, LineGauge, Paragraph, Row, Table, Tabs};
use ratatui::Frame;

const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);
const SEL: Style = Style::new().add_modifier(Modifier::REVERSED);
const DIM: Style = Style::new().fg(Color::DarkGray);

/// Latency formatted with a unit: `850µs`, `7.64ms`, `1.20s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// Bytes in binary units: `10.1M`, `1.5G`.
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", U[i])
    }
}

fn fmt_age(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0}s")
    } else if s < 3600.0 {
        format!("{:.0}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

fn short(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Bar length for `v` on a log scale from 10µs to `top`, over `width` cells.
fn log_bar(v: u64, top: u64, width: usize) -> usize {
    if v == 0 || width == 0 {
        return 0;
    }
    let lo = 10f64.ln();
    let hi = (top.max(100) as f64).ln();
    let x = ((v.max(10) as f64).ln() - lo) / (hi - lo);
    ((x * width as f64).round() as usize).clamp(1, width)
}

/// Draw the whole UI.
pub fn draw(f: &mut Frame, s: &State) {
    let area = f.area();
    let [top, status, body, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    let titles: Vec<Line> = Tab::ALL
        .iter()
        .enumerate()
        .map(|(i, t)| Line::from(format!("{} {}", i + 1, t.title())))
        .collect();
    let sel = Tab::ALL.iter().position(|t| *t == s.tab).unwrap_or(0);
    f.render_widget(
        Tabs::new(titles)
            .select(sel)
            .highlight_style(SEL)
            .divider("|")
            .padding("", ""),
        top,
    );
    f.render_widget(status_line(s), status);
    match s.tab {
        Tab::Latency => latency(f, body, s),
        Tab::Waterfall => waterfall(f, body, s),
        Tab::Hosts => hosts(f, body, s),
        Tab::Sandbox => sandbox(f, body, s),
        Tab::Alerts => alerts(f, body, s),
    }
    let hint = if s.editing_filter {
        format!("filter: {}▏ (Enter keep, Esc clear)", s.filter)
    } else {
        let f = if s.filter.is_empty() {
            String::new()
        } else {
            format!(" [filter: {}]", s.filter)
        };
        format!("q quit  ? help  Tab/1-5 view  j/k select  s sort  / filter{f}")
    };
    f.render_widget(Paragraph::new(hint).style(DIM), keys);
    if s.show_help {
        help(f, area);
    }
}

fn status_line(s: &State) -> Line<'static> {
    let mut spans = Vec::new();
    for a in &s.agents {
        let (dot, text, color) = match &a.conn {
            ConnState::Connecting => ("○", "connecting".to_string(), Color::Yellow),
            ConnState::Connected => ("●", "connected".to_string(), Color::Green),
            ConnState::Disconnected {
                error,
                attempt,
                retry_in,
            } => (
                "○",
                format!(
                    "disconnected (try {attempt}, retry in {:.1}s: {})",
                    retry_in.as_secs_f64(),
                    short(error, 60)
                ),
                Color::Red,
            ),
        };
        let addr = a
            .addr
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        spans.push(Span::styled(format!("{dot} "), Style::new().fg(color)));
        spans.push(Span::raw(format!("{addr} ")));
        spans.push(Span::styled(format!("{text}  "), Style::new().fg(color)));
    }
    Line::from(spans)
}

fn multi(s: &State) -> bool {
    s.agents.len() > 1
}

fn fn_label(s: &State, agent: usize, f: &FunctionStats) -> String {
    if multi(s) {
        format!("{}@{}", f.name, agent + 1)
    } else {
        f.name.clone()
    }
}

fn ratio(cold: u64, warm: u64) -> String {
    if warm == 0 || cold == 0 {
        "-".into()
    } else {
        format!("{:.1}x", cold as f64 / warm as f64)
    }
}

fn latency(f: &mut Frame, area: Rect, s: &State) {
    let fns = s.functions();
    if fns.is_empty() {
        f.render_widget(
            Paragraph::new("No functions yet (waiting for the agent, or none match the filter).")
                .block(Block::bordered().title("Functions")),
            area,
        );
        return;
    }
    let list_h = (fns.len() as u16 + 3).min(area.height / 2).max(4);
    let [list, detail] =
        Layout::vertical([Constraint::Length(list_h), Constraint::Min(0)]).areas(area);
    let header = Row::new([
        "function", "invokes", "cold", "cold%", "warm p50", "warm p99", "cold p50", "cold p99",
        "c/w p50",
    ])
    .style(BOLD);
    let rows: Vec<Row> = fns
        .iter()
        .enumerate()
        .map(|(i, (a, fs))| {
            let r = Row::new([
                fn_label(s, *a, fs),
                fs.invocations.to_string(),
                fs.coldstarts.to_string(),
                format!("{:.1}", fs.cold_rate() * 100.0),
                fmt_us(fs.warm.p50_us),
                fmt_us(fs.warm.p99_us),
                fmt_us(fs.cold.p50_us),
                fmt_us(fs.cold.p99_us),
                ratio(fs.cold.p50_us, fs.warm.p50_us),
            ]);
            if i == s.selected_fn {
                r.style(SEL)
            } else {
                r
            }
        })
        .collect();
    let widths = [
        Constraint::Min(10),
        Constraint::Length(7),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
    ];
    let mut ts = ratatui::widgets::TableState::default().with_selected(Some(s.selected_fn));
    f.render_stateful_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title(format!("Functions ({})", fns.len()))),
        list,
        &mut ts,
    );
    let Some((a, fs)) = s.selected_function() else {
        return;
    };
    let title = format!(
        "{}: cold/warm p50 {} p99 {}, cold-start rate {:.1}%, errors {}, timeouts {}",
        fn_label(s, a, fs),
        ratio(fs.cold.p50_us, fs.warm.p50_us),
        ratio(fs.cold.p99_us, fs.warm.p99_us),
        fs.cold_rate() * 100.0,
        fs.errors,
        fs.timeouts
    );
    let block = Block::bordered().title(title);
    let inner = block.inner(detail);
    f.render_widget(block, detail);
    let [w, c] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    let top = fs.warm.max_us.max(fs.cold.max_us);
    for (name, d, b, r) in [
        ("warm", &fs.warm, &fs.warm_buckets, w),
        ("cold", &fs.cold, &fs.cold_buckets, c),
    ] {
        let p = if b.is_empty() || d.count == 0 {
            // Agents that predate the buckets: percentile bars.
            dist_panel(name, d, top, r.width)
        } else {
            hist_panel(name, d, b, r.width, r.height)
        };
        f.render_widget(p, r);
    }
}

fn side_color(name: &str) -> Color {
    if name == "cold" {
        Color::Blue
    } else {
        Color::Green
    }
}

/// A log2 bucket's upper bound, short: `≤128µs`, `≤1.0ms`, `≤16ms`, `≤1.0s`.
fn fmt_bound(us: u64) -> String {
    let v = if us < 1_000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{:.0}ms", us as f64 / 1e3)
    } else if us < 10_000_000 {
        format!("{:.1}s", us as f64 / 1e6)
    } else {
        format!("{:.0}s", us as f64 / 1e6)
    };
    format!("≤{v}")
}

/// Merges ascending log2 buckets into buckets `2^f` wide (upper bounds `2^(f·j)`) with the
/// smallest `f` that leaves at most `rows` of them. Returns the buckets and `f`.
fn coarsen(b: &[(u64, u64)], rows: usize) -> (Vec<(u64, u64)>, u32) {
    let mut f = 1u32;
    loop {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(up, n) in b {
            // ceil(log2(up)), so bounds that are not powers of two round up.
            let k = 64 - up.saturating_sub(1).leading_zeros();
            let g = k.div_ceil(f) * f;
            let top = if g >= 64 { u64::MAX } else { 1u64 << g };
            match out.last_mut() {
                Some(l) if l.0 == top => l.1 += n,
                _ => out.push((top, n)),
            }
        }
        if out.len() <= rows.max(1) || f >= 64 {
            return (out, f);
        }
        f += 1;
    }
}

/// A bar of `n / max` of `width` cells, in eighths; at least a sliver when `n > 0`.
fn frac_bar(n: u64, max: u64, width: usize) -> String {
    const PART: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    if n == 0 || max == 0 || width == 0 {
        return String::new();
    }
    let eighths =
        ((n as f64 / max as f64 * width as f64 * 8.0).round() as usize).clamp(1, width * 8);
    format!("{}{}", "█".repeat(eighths / 8), PART[eighths % 8])
}

/// A histogram over log2 latency buckets: one row per bucket, bar length proportional to
/// the count (scaled to this side's largest bucket). Coarser buckets when short of rows.
fn hist_panel(
    name: &str,
    d: &Dist,
    buckets: &[(u64, u64)],
    width: u16,
    height: u16,
) -> Paragraph<'static> {
    let mut head = format!("{name} n={} mean {}", d.count, fmt_us(d.mean_us));
    let p99 = format!(" p99 {}", fmt_us(d.p99_us));
    // Keep a blank column before the other side.
    if head.chars().count() + p99.chars().count() < width as usize {
        head.push_str(&p99);
    }
    let mut lines = vec![Line::styled(head, BOLD)];
    let rows = (height as usize).saturating_sub(1);
    let (b, f) = coarsen(buckets, rows);
    let max = b.iter().map(|x| x.1).max().unwrap_or(0);
    let cw = max.to_string().len();
    // label (6) + space + count + space, and one cell of margin.
    let bar_w = (width as usize).saturating_sub(6 + 1 + cw + 1 + 1);
    let color = Style::new().fg(side_color(name));
    for &(up, n) in b.iter().take(rows) {
        let label = Span::styled(
            format!("{:>6} {n:>cw$} ", fmt_bound(up)),
            if n == 0 { DIM } else { Style::new() },
        );
        lines.push(Line::from(vec![
            label,
            Span::styled(frac_bar(n, max, bar_w), color),
        ]));
    }
    if b.len() < rows {
        let scale = if f == 1 {
            "log2".to_string()
        } else {
            format!("x{}", 1u128 << f)
        };
        let text = format!("count per {scale} bucket");
        // Under the bars when that fits, else from the left edge.
        let indent = if 8 + cw + text.len() < width as usize {
            8 + cw
        } else {
            0
        };
        lines.push(Line::styled(format!("{:indent$}{text}", ""), DIM));
    }
    Paragraph::new(lines)
}

/// Percentile bars on a shared log scale (10µs .. the larger max).
fn dist_panel(name: &str, d: &Dist, top: u64, width: u16) -> Paragraph<'static> {
    let mut lines = vec![Line::styled(
        format!("{name} n={} mean {}", d.count, fmt_us(d.mean_us)),
        BOLD,
    )];
    if d.count == 0 {
        lines.push(Line::styled("no samples", DIM));
        return Paragraph::new(lines);
    }
    let bar_w = (width as usize).saturating_sub(15);
    let color = side_color(name);
    for (label, v) in d.percentiles() {
        let n = log_bar(v, top, bar_w);
        lines.push(Line::from(vec![
            Span::raw(format!("{label:<5} {:>7} ", fmt_us(v))),
            Span::styled("█".repeat(n), Style::new().fg(color)),
        ]));
    }
    lines.push(Line::styled(
        format!("{:<14}log scale 10µs..{}", "", fmt_us(top.max(100))),
        DIM,
    ));
    Paragraph::new(lines)
}

/// Offset bars: each phase starts where the previous one ended.
fn waterfall_lines(phases: &[(&str, u64, Option<u64>)], width: usize) -> Vec<Line<'static>> {
    let total: u64 = phases.iter().map(|p| p.1).sum::<u64>().max(1);
    let bar_w = width.saturating_sub(32);
    let mut cum = 0u64;
    let mut out = Vec::new();
    for (name, v, p99) in phases {
        let start = (cum as f64 / total as f64 * bar_w as f64).round() as usize;
        let len = ((*v as f64 / total as f64 * bar_w as f64).round() as usize)
            .max(usize::from(*v > 0))
            .min(bar_w.saturating_sub(start));
        let ext = p99
            .map(|p| ((p.saturating_sub(*v)) as f64 / total as f64 * bar_w as f64).round() as usize)
            .unwrap_or(0)
            .min(bar_w.saturating_sub(start + len));
        cum += v;
        let p99s = p99.map(fmt_us).unwrap_or_default();
        out.push(Line::from(vec![
            Span::raw(format!("{name:<13}{:>8} {p99s:>8} ", fmt_us(*v))),
            Span::raw(" ".repeat(start)),
            Span::styled("█".repeat(len), Style::new().fg(Color::Cyan)),
            Span::styled("░".repeat(ext), Style::new().fg(Color::Cyan)),
        ]));
    }
    out.push(Line::styled(
        format!("{:<13}{:>8}", "total", fmt_us(cum)),
        BOLD,
    ));
    out
}

fn waterfall(f: &mut Frame, area: Rect, s: &State) {
    let Some((a, fs)) = s.selected_function() else {
        f.render_widget(
            Paragraph::new("No function selected.").block(Block::bordered().title("Waterfall")),
            area,
        );
        return;
    };
    let [avg, last] =
        Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(area);
    let phases: Vec<(&str, u64, Option<u64>)> = PHASES
        .iter()
        .filter_map(|p| fs.phases.get(*p).map(|d| (*p, d.mean_us, Some(d.p99_us))))
        .collect();
    let mut lines = vec![Line::styled(
        format!(
            "{:<13}{:>8} {:>8}  █ mean  ░ to p99",
            "phase", "mean", "p99"
        ),
        DIM,
    )];
    if phases.is_empty() {
        lines.push(Line::raw("no cold starts recorded"));
    } else {
        lines.extend(waterfall_lines(
            &phases,
            (avg.width as usize).saturating_sub(2),
        ));
    }
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(format!(
            "Cold-start phases: {} ({} cold starts, j/k: function)",
            fn_label(s, a, fs),
            fs.coldstarts
        ))),
        avg,
    );
    let last_phases: Vec<(&str, u64, Option<u64>)> = PHASES
        .iter()
        .filter_map(|p| fs.last_cold_start.get(*p).map(|v| (*p, *v, None)))
        .collect();
    let lines = if last_phases.is_empty() {
        vec![Line::raw("no cold start yet")]
    } else {
        waterfall_lines(&last_phases, (last.width as usize).saturating_sub(2))
    };
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("Latest cold start")),
        last,
    );
}

fn gauge(label: String, num: u64, den: u64) -> LineGauge<'static> {
    let r = if den == 0 {
        0.0
    } else {
        (num as f64 / den as f64).clamp(0.0, 1.0)
    };
    LineGauge::default()
        .ratio(r)
        .label(format!("{label} {:>5.1}%", r * 100.0))
        .filled_style(Style::new().fg(Color::Magenta))
}

fn hosts(f: &mut Frame, area: Rect, s: &State) {
    let hosts = s.hosts();
    let per = 4u16;
    let hosts_h = ((hosts.len() as u16).max(1) * per + 2).min(area.height / 2);
    let [hs, table] =
        Layout::vertical([Constraint::Length(hosts_h), Constraint::Min(0)]).areas(area);
    let block = Block::bordered().title(format!("Hosts ({})", hosts.len()));
    let inner = block.inner(hs);
    f.render_widget(block, hs);
    if hosts.is_empty() {
        f.render_widget(Paragraph::new("No sandboxes running."), inner);
    }
    for (i, h) in hosts.iter().enumerate() {
        let y = inner.y + i as u16 * per;
        if y + per > inner.y + inner.height {
            break;
        }
        let row = |k: u16| Rect::new(inner.x, y + k, inner.width, 1);
        let c = &h.sandboxes;
        f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(
                    format!(
                        "boot {} machine {}{} ",
                        short(&h.boot_id, 8),
                        short(&h.machine_id, 8),
                        if h.local { " (local)" } else { "" }
                    ),
                    BOLD,
                ),
                Span::raw(format!(
                    "booting {} idle {} busy {} frozen {}",
                    c.booting, c.idle, c.busy, c.frozen
                )),
            ])),
            row(0),
        );
        let total = h.host_memory_total_bytes;
        f.render_widget(
            gauge(
                format!(
                    "committed {:>7} / {:>7}",
                    fmt_bytes(h.memory_committed_bytes),
                    fmt_bytes(total)
                ),
                h.memory_committed_bytes,
                total,
            ),
            row(1),
        );
        f.render_widget(
            gauge(
                format!(
                    "resident  {:>7} / {:>7}",
                    fmt_bytes(h.memory_resident_bytes),
                    fmt_bytes(total)
                ),
                h.memory_resident_bytes,
                total,
            ),
            row(2),
        );
        let over = h.vcpu_oversubscription;
        f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::raw(format!(
                    "vCPU {:.1} configured on {} cores = ",
                    h.vcpus_configured, h.host_cores
                )),
                Span::styled(
                    format!("{over:.2}x oversubscribed"),
                    if over > 1.0 {
                        Style::new().fg(Color::Red)
                    } else {
                        Style::new()
                    },
                ),
            ])),
            row(3),
        );
    }
    sandbox_table(f, table, s);
}

fn sandbox_table(f: &mut Frame, area: Rect, s: &State) {
    let sbs = s.sandboxes();
    let names = [
        "id", "function", "driver", "state", "age", "inv", "rss", "cpu", "boot_id",
    ];
    let header = Row::new(SortKey::ALL.iter().zip(names).map(|(k, n)| {
        if *k == s.sort {
            Cell::from(format!("{n}{}", if s.sort_desc { "▼" } else { "▲" }))
        } else {
            Cell::from(n)
        }
    }))
    .style(BOLD);
    let rows: Vec<Row> = sbs
        .iter()
        .map(|(_, sb)| {
            Row::new([
                sb.id.clone(),
                sb.function.clone(),
                sb.driver.clone(),
                if sb.shells > 0 {
                    format!("{}+sh", sb.state)
                } else {
                    sb.state.clone()
                },
                fmt_age(sb.age_s),
                sb.invocations.to_string(),
                fmt_bytes(sb.rss_bytes),
                fmt_us(sb.usage.cpu_us),
                short(&sb.probe.boot_id, 8),
            ])
        })
        .collect();
    let widths = [
        Constraint::Min(15),
        Constraint::Max(10),
        Constraint::Max(7),
        Constraint::Length(7),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(8),
    ];
    let mut ts = ratatui::widgets::TableState::default().with_selected(Some(s.selected_sb));
    f.render_stateful_widget(
        Table::new(rows, widths)
            .header(header)
            .row_highlight_style(SEL)
            .column_spacing(1)
            .block(Block::bordered().title(format!(
                "Sandboxes ({}) s: sort column, S: reverse, Enter: detail",
                sbs.len()
            ))),
        area,
        &mut ts,
    );
}

fn sandbox(f: &mut Frame, area: Rect, s: &State) {
    let Some((a, sb)) = s.selected_sandbox() else {
        f.render_widget(
            Paragraph::new("No sandbox selected (pick one in Hosts).")
                .block(Block::bordered().title("Sandbox")),
            area,
        );
        return;
    };
    let detail = s.agents[a]
        .detail
        .as_ref()
        .filter(|d| d.sandbox.id == sb.id);
    let p = &sb.probe;
    let kv =
        |k: &str, v: String| Line::from(vec![Span::styled(format!("{k:<12}"), BOLD), Span::raw(v)]);
    let mut lines = vec![
        kv(
            "function",
            format!("{} ({}), {}", sb.function, sb.driver, sb.state),
        ),
        kv("boot_id", p.boot_id.clone()),
        kv("machine-id", p.machine_id.clone()),
        kv("hostname", p.hostname.clone()),
        kv("kernel", p.kernel.clone()),
        kv("cpu", format!("{} ({} cores)", p.cpu_model, p.cpu_cores)),
        kv(
            "meminfo",
            format!(
                "total {} available {}",
                fmt_bytes(p.mem_total_kib * 1024),
                fmt_bytes(p.mem_available_kib * 1024)
            ),
        ),
        kv(
            "host",
            format!(
                "{} {} id {}",
                p.hypervisor,
                p.host_cpu_model,
                short(&p.host_id, 12)
            ),
        ),
        kv(
            "usage",
            format!(
                "rss {} / {} cpu {} invokes {}",
                fmt_bytes(sb.rss_bytes),
                fmt_bytes(sb.memory_limit_bytes),
                fmt_us(sb.usage.cpu_us),
                sb.invocations
            ),
        ),
    ];
    if sb.shells > 0 {
        lines.push(kv(
            "shells",
            format!(
                "{} open (pinned: not reaped or frozen until they close)",
                sb.shells
            ),
        ));
    }
    if let Some(d) = detail {
        let m: Vec<String> = d
            .markers
            .iter()
            .map(|(n, ns)| format!("{n} {}", fmt_us(ns / 1000)))
            .collect();
        lines.push(kv("markers", m.join(", ")));
    }
    let h = lines.len() as u16 + 2;
    let [info, logs] = Layout::vertical([Constraint::Length(h), Constraint::Min(0)]).areas(area);
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(format!("Sandbox {}", sb.id))),
        info,
    );
    let log_lines: Vec<Line> = match detail {
        None => vec![Line::styled("loading...", DIM)],
        Some(d) if d.logs.is_empty() => vec![Line::styled("no log lines", DIM)],
        Some(d) => {
            let keep = logs.height.saturating_sub(2) as usize;
            d.logs
                .iter()
                .skip(d.logs.len().saturating_sub(keep))
                .map(|l| Line::raw(format!("{:<6} {}", l.stream, l.line)))
                .collect()
        }
    };
    f.render_widget(
        Paragraph::new(log_lines).block(Block::bordered().title("Recent logs")),
        logs,
    );
}

fn alerts(f: &mut Frame, area: Rect, s: &State) {
    let rules: Vec<(usize, &crate::model::Rule)> = s
        .agents
        .iter()
        .enumerate()
        .flat_map(|(i, a)| {
            a.alerts
                .iter()
                .flat_map(move |al| al.rules.iter().map(move |r| (i, r)))
        })
        .collect();
    let firing: u64 = s
        .agents
        .iter()
        .filter_map(|a| a.alerts.as_ref())
        .map(|a| a.firing)
        .sum();
    let mut counters: std::collections::BTreeMap<String, u64> = Default::default();
    for a in &s.agents {
        for (k, v) in &a.stats.telemetry.dropped {
            *counters
                .entry(format!("telemetry {k} dropped"))
                .or_default() += v;
        }
        for (k, v) in a
            .stats
            .agent
            .iter()
            .filter(|(k, _)| k.contains("lost") || k.contains("error") || k.contains("failure"))
        {
            *counters.entry(format!("agent {k}")).or_default() += v;
        }
        if let Some(al) = &a.alerts {
            for (k, v) in al.counters.iter().filter(|(k, _)| {
                k.contains("dropped")
                    || k.contains("fail")
                    || k.contains("gave_up")
                    || k.contains("errors")
            }) {
                *counters.entry(format!("alerts {k}")).or_default() += v;
            }
        }
    }
    let ch = (counters.len() as u16 + 2).max(3);
    let [rs, cs] = Layout::vertical([Constraint::Min(3), Constraint::Length(ch)]).areas(area);
    let rows: Vec<Row> = rules
        .iter()
        .map(|(_, r)| {
            let state = r.state.clone().unwrap_or_else(|| "-".into());
            let style = if state.eq_ignore_ascii_case("alarm") {
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
            } else {
                Style::new()
            };
            Row::new([
                r.name.clone(),
                state,
                r.value
                    .map(|v| format!("{v}"))
                    .unwrap_or_else(|| "-".into()),
                r.matches.to_string(),
            ])
            .style(style)
        })
        .collect();
    let body: Table = if rows.is_empty() {
        Table::new([Row::new(["no alert rules loaded"])], [Constraint::Min(10)])
    } else {
        Table::new(
            rows,
            [
                Constraint::Min(16),
                Constraint::Length(18),
                Constraint::Length(12),
                Constraint::Length(8),
            ],
        )
        .header(Row::new(["rule", "state", "value", "matches"]).style(BOLD))
    };
    f.render_widget(
        body.block(Block::bordered().title(format!("Alert rules ({} firing)", firing))),
        rs,
    );
    let lines: Vec<Line> = counters
        .iter()
        .map(|(k, v)| {
            let style = if *v > 0 {
                Style::new().fg(Color::Red)
            } else {
                Style::new()
            };
            Line::styled(format!("{k:<36}{v:>10}"), style)
        })
        .collect();
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("Drops and errors")),
        cs,
    );
}

fn help(f: &mut Frame, area: Rect) {
    let text = [
        "q / Ctrl-C    quit (restores the terminal)",
        "Tab, S-Tab    next / previous view",
        "1..5          jump to a view",
        "j/k, ↓/↑      select function or sandbox",
        "g / G         first / last",
        "s / S         sort column / reverse (Hosts)",
        "Enter         sandbox detail (Hosts)",
        "/             filter by function (Esc clears)",
        "?             toggle this help",
    ];
    let w = 52.min(area.width);
    let h = (text.len() as u16 + 2).min(area.height);
    let r = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    );
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(text.iter().map(|t| Line::raw(*t)).collect::<Vec<_>>())
            .block(Block::default().borders(Borders::ALL).title("Help")),
        r,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(7640), "7.64ms");
        assert_eq!(fmt_us(31887), "31.9ms");
        assert_eq!(fmt_us(1_200_000), "1.20s");
        assert_eq!(fmt_bytes(10_559_488), "10.1M");
        assert_eq!(fmt_bytes(12), "12B");
    }

    #[test]
    fn log_bars_grow_with_latency_and_fit() {
        assert_eq!(log_bar(0, 1000, 20), 0);
        assert!(log_bar(100, 100_000, 20) < log_bar(10_000, 100_000, 20));
        assert_eq!(log_bar(100_000, 100_000, 20), 20);
        assert_eq!(log_bar(u64::MAX, 100_000, 20), 20);
        assert_eq!(log_bar(5, 100_000, 20), 1);
    }

    #[test]
    fn bucket_labels_bars_and_coarsening() {
        assert_eq!(fmt_bound(128), "≤128µs");
        assert_eq!(fmt_bound(1024), "≤1.0ms");
        assert_eq!(fmt_bound(16_384), "≤16ms");
        assert_eq!(fmt_bound(1 << 20), "≤1.0s");
        assert_eq!(frac_bar(0, 10, 8), "");
        assert_eq!(frac_bar(10, 10, 8), "████████");
        assert_eq!(frac_bar(1, 1000, 8), "▏");
        assert_eq!(frac_bar(5, 10, 3), "█▌");
        let b: Vec<(u64, u64)> = (3..=10).map(|k| (1u64 << k, k)).collect();
        assert_eq!(coarsen(&b, 8), (b.clone(), 1));
        let (c, f) = coarsen(&b, 5);
        assert_eq!(f, 2);
        assert_eq!(
            c,
            vec![(16, 3 + 4), (64, 5 + 6), (256, 7 + 8), (1024, 9 + 10)]
        );
        assert_eq!(
            c.iter().map(|x| x.1).sum::<u64>(),
            b.iter().map(|x| x.1).sum::<u64>()
        );
        let (c, _) = coarsen(&b, 1);
        assert_eq!(c.len(), 1);
    }
}
