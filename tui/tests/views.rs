//! Every view rendered from fixed state into ratatui's TestBackend, snapshot-tested.

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::time::Duration;
use tui::fixtures;
use tui::state::{ConnState, SortKey, State, Tab};

fn render(s: &State, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| tui::view::draw(f, s)).unwrap();
    t.backend().to_string()
}

fn tab(mut s: State, t: Tab) -> State {
    s.tab = t;
    s
}

#[test]
fn empty_connecting() {
    let s = State::new(["http://127.0.0.1:9000"]);
    insta::assert_snapshot!(render(&s, 80, 24));
}

#[test]
fn empty_every_tab() {
    for t in Tab::ALL {
        let mut s = State::new(["http://127.0.0.1:9000"]);
        s.agents[0].conn = ConnState::Connected;
        insta::assert_snapshot!(format!("empty_{}", t.title()), render(&tab(s, t), 80, 24));
    }
}

#[test]
fn disconnected_status() {
    let mut s = fixtures::many(1, 1);
    s.agents[0].conn = ConnState::Disconnected {
        error: "GET /v1/stats: connection refused".into(),
        attempt: 3,
        retry_in: Duration::from_secs(1),
    };
    insta::assert_snapshot!(render(&s, 80, 24));
}

#[test]
fn one_function_every_tab_80x24() {
    for t in Tab::ALL {
        let s = tab(fixtures::many(1, 2), t);
        insta::assert_snapshot!(format!("one_{}", t.title()), render(&s, 80, 24));
    }
}

#[test]
fn many_functions_every_tab_120x40() {
    for t in Tab::ALL {
        let mut s = tab(fixtures::many(30, 60), t);
        s.selected_fn = 3;
        s.selected_sb = 2;
        insta::assert_snapshot!(format!("many_{}", t.title()), render(&s, 120, 40));
    }
}

#[test]
fn narrow_every_tab_60x16() {
    for t in Tab::ALL {
        let s = tab(fixtures::many(8, 10), t);
        insta::assert_snapshot!(format!("narrow_{}", t.title()), render(&s, 60, 16));
    }
}

#[test]
fn tiny_terminal_does_not_panic() {
    for (w, h) in [(1, 1), (10, 3), (20, 5), (40, 8)] {
        for t in Tab::ALL {
            let mut s = tab(fixtures::many(8, 10), t);
            s.show_help = true;
            render(&s, w, h);
        }
    }
}

#[test]
fn sorted_filtered_hosts_and_help() {
    let mut s = tab(fixtures::many(6, 12), Tab::Hosts);
    s.sort = SortKey::Rss;
    s.sort_desc = true;
    s.filter = "fn-00".into();
    insta::assert_snapshot!("hosts_sorted_by_rss_desc", render(&s, 80, 24));
    s.show_help = true;
    insta::assert_snapshot!("help_overlay", render(&s, 80, 24));
}

#[test]
fn two_agents_merge_hosts_and_label_functions() {
    let mut s = fixtures::many(2, 2);
    let mut b = fixtures::many(1, 1).agents.remove(0);
    b.addr = "http://10.0.0.2:9000".into();
    s.agents.push(b);
    insta::assert_snapshot!(render(&s, 80, 24));
    let hosts = s.hosts();
    assert_eq!(hosts.len(), 1, "same boot_id + machine-id is one host");
    assert_eq!(hosts[0].sandboxes.idle + hosts[0].sandboxes.busy, 3);
}

#[test]
fn render_is_fast_enough_for_100_functions_1000_sandboxes() {
    // Debug build: a loose bound; `sandscope top --bench-render` reports the real figure.
    let d = tui::bench_render(100, 1000, 200, 60, 20);
    assert!(d < Duration::from_millis(200), "{d:?} per frame");
}

#[test]
fn latency_without_buckets_falls_back_to_percentile_bars() {
    let mut s = fixtures::many(1, 2);
    let out = render(&s, 80, 24);
    assert!(
        out.contains("count per log2 bucket") && !out.contains("p99.9"),
        "{out}"
    );
    // An agent that predates the buckets.
    for fs in &mut s.agents[0].stats.functions {
        fs.warm_buckets.clear();
        fs.cold_buckets.clear();
    }
    let out = render(&s, 80, 24);
    assert!(
        out.contains("p99.9") && out.contains("log scale 10µs.."),
        "{out}"
    );
    assert!(!out.contains("log2 bucket"), "{out}");
}

#[test]
fn sandboxes_with_open_shells_are_marked_in_hosts_and_detail() {
    let mut s = fixtures::many(1, 2);
    s.agents[0].sandboxes.sandboxes[0].shells = 2;
    let id = s.agents[0].sandboxes.sandboxes[0].id.clone();
    let hosts = render(&tab(s.clone(), Tab::Hosts), 120, 40);
    assert!(hosts.contains("+sh"), "{hosts}");
    s.selected_sb = s
        .sandboxes()
        .iter()
        .position(|(_, sb)| sb.id == id)
        .unwrap();
    let detail = render(&tab(s, Tab::Sandbox), 120, 40);
    assert!(detail.contains("2 open (pinned"), "{detail}");
}
