//! What the UI knows: per-agent snapshots and connection state, plus the user's
//! selection. Events (poll results, keys) change it; views only borrow it.

use crate::model::{Alerts, FunctionStats, Host, Sandbox, SandboxDetail, Sandboxes, Stats};
use std::time::Duration;

/// The tabs, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    /// Warm vs cold distributions per function.
    Latency,
    /// Cold-start phases of the selected function.
    Waterfall,
    /// Host packing and the sandbox table.
    Hosts,
    /// One sandbox: probe report and logs.
    Sandbox,
    /// Alert rules and drop counters.
    Alerts,
}

impl Tab {
    /// All tabs in display order.
    pub const ALL: [Tab; 5] = [
        Tab::Latency,
        Tab::Waterfall,
        Tab::Hosts,
        Tab::Sandbox,
        Tab::Alerts,
    ];

    /// Title shown in the tab bar.
    pub fn title(self) -> &'static str {
        match self {
            Tab::Latency => "Latency",
            Tab::Waterfall => "Waterfall",
            Tab::Hosts => "Hosts",
            Tab::Sandbox => "Sandbox",
            Tab::Alerts => "Alerts",
        }
    }

    fn index(self) -> usize {
        Tab::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }

    /// The next tab (wrapping); `back` goes the other way.
    pub fn step(self, back: bool) -> Tab {
        let n = Tab::ALL.len();
        let i = self.index();
        Tab::ALL[if back { (i + n - 1) % n } else { (i + 1) % n }]
    }
}

/// Connection to one agent.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnState {
    /// Not yet answered.
    Connecting,
    /// The last poll succeeded.
    Connected,
    /// The last poll failed; retrying after a backoff.
    Disconnected {
        /// Why the last poll failed.
        error: String,
        /// Consecutive failures.
        attempt: u32,
        /// Backoff before the next try.
        retry_in: Duration,
    },
}

/// Everything known about one agent.
#[derive(Debug, Clone)]
pub struct AgentState {
    /// Base URL.
    pub addr: String,
    /// Connection.
    pub conn: ConnState,
    /// Last `/v1/stats`.
    pub stats: Stats,
    /// Last `/v1/sandboxes`.
    pub sandboxes: Sandboxes,
    /// Last `/v1/alerts` (absent on agents without the endpoint).
    pub alerts: Option<Alerts>,
    /// Last detail of the selected sandbox.
    pub detail: Option<SandboxDetail>,
}

impl AgentState {
    /// A new, not yet connected agent.
    pub fn new(addr: impl Into<String>) -> Self {
        AgentState {
            addr: addr.into(),
            conn: ConnState::Connecting,
            stats: Stats::default(),
            sandboxes: Sandboxes::default(),
            alerts: None,
            detail: None,
        }
    }
}

/// Sandbox table columns (sortable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Sandbox id.
    Id,
    /// Function.
    Function,
    /// Driver.
    Driver,
    /// State.
    State,
    /// Age.
    Age,
    /// Invocations.
    Invokes,
    /// Resident memory.
    Rss,
    /// CPU time.
    Cpu,
    /// Guest boot_id.
    BootId,
}

impl SortKey {
    /// All keys in column order.
    pub const ALL: [SortKey; 9] = [
        SortKey::Id,
        SortKey::Function,
        SortKey::Driver,
        SortKey::State,
        SortKey::Age,
        SortKey::Invokes,
        SortKey::Rss,
        SortKey::Cpu,
        SortKey::BootId,
    ];

    /// Next column.
    pub fn next(self) -> SortKey {
        let i = SortKey::ALL.iter().position(|k| *k == self).unwrap_or(0);
        SortKey::ALL[(i + 1) % SortKey::ALL.len()]
    }
}

/// A data update from a poller.
// A few updates per second per agent: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Update {
    /// The connection changed.
    Conn {
        /// Agent index.
        agent: usize,
        /// New state.
        state: ConnState,
    },
    /// Fresh data.
    Data {
        /// Agent index.
        agent: usize,
        /// `/v1/stats`.
        stats: Stats,
        /// `/v1/sandboxes`.
        sandboxes: Sandboxes,
        /// `/v1/alerts`, if served.
        alerts: Option<Alerts>,
        /// `/v1/sandboxes/{id}` of the selected sandbox, if any.
        detail: Option<SandboxDetail>,
    },
}

/// The whole UI state.
#[derive(Debug, Clone)]
pub struct State {
    /// One entry per `--agent`.
    pub agents: Vec<AgentState>,
    /// Current tab.
    pub tab: Tab,
    /// Selected row of the function list.
    pub selected_fn: usize,
    /// Selected row of the sandbox table.
    pub selected_sb: usize,
    /// Sandbox table sort column.
    pub sort: SortKey,
    /// Descending sort.
    pub sort_desc: bool,
    /// Function-name filter (substring).
    pub filter: String,
    /// Whether the filter is being typed.
    pub editing_filter: bool,
    /// Help overlay shown.
    pub show_help: bool,
    /// Quit requested.
    pub quit: bool,
}

impl State {
    /// State for these agent URLs.
    pub fn new<S: Into<String>>(addrs: impl IntoIterator<Item = S>) -> Self {
        State {
            agents: addrs.into_iter().map(AgentState::new).collect(),
            tab: Tab::Latency,
            selected_fn: 0,
            selected_sb: 0,
            sort: SortKey::Id,
            sort_desc: false,
            filter: String::new(),
            editing_filter: false,
            show_help: false,
            quit: false,
        }
    }

    /// Apply a poller update.
    pub fn apply(&mut self, u: Update) {
        match u {
            Update::Conn { agent, state } => {
                if let Some(a) = self.agents.get_mut(agent) {
                    a.conn = state;
                }
            }
            Update::Data {
                agent,
                stats,
                sandboxes,
                alerts,
                detail,
            } => {
                if let Some(a) = self.agents.get_mut(agent) {
                    a.conn = ConnState::Connected;
                    a.stats = stats;
                    a.sandboxes = sandboxes;
                    a.alerts = alerts;
                    a.detail = detail;
                }
            }
        }
        self.clamp();
    }

    fn matches(&self, function: &str) -> bool {
        self.filter.is_empty() || function.contains(self.filter.as_str())
    }

    /// Functions across agents (filtered), with the agent index.
    pub fn functions(&self) -> Vec<(usize, &FunctionStats)> {
        self.agents
            .iter()
            .enumerate()
            .flat_map(|(i, a)| a.stats.functions.iter().map(move |f| (i, f)))
            .filter(|(_, f)| self.matches(&f.name))
            .collect()
    }

    /// The selected function, if any.
    pub fn selected_function(&self) -> Option<(usize, &FunctionStats)> {
        self.functions().get(self.selected_fn).copied()
    }

    /// Sandboxes across agents (filtered), sorted by the current column.
    pub fn sandboxes(&self) -> Vec<(usize, &Sandbox)> {
        let mut v: Vec<(usize, &Sandbox)> = self
            .agents
            .iter()
            .enumerate()
            .flat_map(|(i, a)| a.sandboxes.sandboxes.iter().map(move |s| (i, s)))
            .filter(|(_, s)| self.matches(&s.function))
            .collect();
        let key = self.sort;
        v.sort_by(|(_, a), (_, b)| {
            let o = match key {
                SortKey::Id => a.id.cmp(&b.id),
                SortKey::Function => a.function.cmp(&b.function),
                SortKey::Driver => a.driver.cmp(&b.driver),
                SortKey::State => a.state.cmp(&b.state),
                SortKey::Age => a.age_s.total_cmp(&b.age_s),
                SortKey::Invokes => a.invocations.cmp(&b.invocations),
                SortKey::Rss => a.rss_bytes.cmp(&b.rss_bytes),
                SortKey::Cpu => a.usage.cpu_us.cmp(&b.usage.cpu_us),
                SortKey::BootId => a.probe.boot_id.cmp(&b.probe.boot_id),
            };
            o.then_with(|| a.id.cmp(&b.id))
        });
        if self.sort_desc {
            v.reverse();
        }
        v
    }

    /// The selected sandbox, if any.
    pub fn selected_sandbox(&self) -> Option<(usize, &Sandbox)> {
        self.sandboxes().get(self.selected_sb).copied()
    }

    /// Hosts across agents, merged by (boot_id, machine-id).
    pub fn hosts(&self) -> Vec<Host> {
        let mut out: Vec<Host> = Vec::new();
        for h in self.agents.iter().flat_map(|a| a.sandboxes.hosts.iter()) {
            match out
                .iter_mut()
                .find(|o| o.boot_id == h.boot_id && o.machine_id == h.machine_id)
            {
                Some(o) => {
                    o.local |= h.local;
                    o.sandboxes.booting += h.sandboxes.booting;
                    o.sandboxes.idle += h.sandboxes.idle;
                    o.sandboxes.busy += h.sandboxes.busy;
                    o.sandboxes.frozen += h.sandboxes.frozen;
                    o.memory_committed_bytes += h.memory_committed_bytes;
                    o.memory_resident_bytes += h.memory_resident_bytes;
                    o.host_memory_total_bytes =
                        o.host_memory_total_bytes.max(h.host_memory_total_bytes);
                    o.host_cores = o.host_cores.max(h.host_cores);
                    o.vcpus_configured += h.vcpus_configured;
                    o.vcpu_oversubscription = if o.host_cores > 0 {
                        o.vcpus_configured / o.host_cores as f64
                    } else {
                        0.0
                    };
                }
                None => out.push(h.clone()),
            }
        }
        out
    }

    /// Keep selections inside the lists after data or filter changes.
    pub fn clamp(&mut self) {
        let nf = self.functions().len();
        self.selected_fn = self.selected_fn.min(nf.saturating_sub(1));
        let ns = self.sandboxes().len();
        self.selected_sb = self.selected_sb.min(ns.saturating_sub(1));
    }

    /// The (agent, sandbox id) whose detail the pollers should fetch.
    pub fn detail_target(&self) -> Option<(usize, String)> {
        self.selected_sandbox().map(|(i, s)| (i, s.id.clone()))
    }
}
