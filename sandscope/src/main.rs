//! `sandscope`: the one user-facing binary.

mod client;
mod demo;
mod embedded;
mod image;
mod render;
mod rules;
mod ssh;
mod top;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use host_agent::config::{AgentConfig, DriverChoice};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Observability for function sandboxes: why was that invocation cold, where did the
/// time go, and what is on this host right now.
#[derive(Parser, Debug)]
#[command(name = "sandscope", version, about, long_about = None)]
#[command(
    after_help = "First run: `sandscope demo` (as root) starts an agent with example \
functions, drives cold and warm invocations and prints what it saw."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run an agent with example functions, drive a workload, print a report, exit.
    Demo(DemoArgs),
    /// Run the agent: sandboxes, pools, the Invoke API and /v1 JSON views.
    Agent(AgentArgs),
    /// Invoke a function through an agent (Lambda Invoke API).
    Invoke(InvokeArgs),
    /// Per-function invocation statistics: warm vs cold percentiles and phases.
    Stats(ViewArgs),
    /// Live sandboxes with the probe's report, and host packing.
    Sandboxes(ViewArgs),
    /// Terminal UI: warm/cold distributions, cold-start waterfall, host packing.
    Top(top::TopArgs),
    /// Alert rules: try them offline against a log.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Guest images for the microVM drivers (qemu, vmm-lite).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Open a shell (or run one command) inside a live sandbox, over the agent's SSH
    /// endpoint, with the system `ssh` client.
    Ssh(ssh::SshArgs),
    /// Shell sessions into sandboxes: open now and recently ended (the audit trail).
    Sessions(ViewArgs),
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Build (or find in the cache) the guest kernel, and write each function's initramfs.
    Build(image::BuildArgs),
}

#[derive(Subcommand, Debug)]
enum RulesCmd {
    /// Replay a log through rules: matches, extracted values, alarm transitions.
    Test(rules::TestArgs),
    /// Time the matcher (lines/s with N rules).
    #[command(hide = true)]
    Bench(rules::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Sandbox driver: auto picks the best this host can run and says why.
    #[arg(long, default_value = "auto", value_parser = parse_driver)]
    driver: DriverChoice,
    /// Print one JSON document instead of the text report.
    #[arg(long)]
    json: bool,
    /// Warm invocations per function in the steady phase.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    warm: u32,
    /// Concurrency of the burst phase (forces extra cold starts).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    burst: u32,
    /// Use this config instead of the embedded example functions.
    #[arg(long)]
    config: Option<PathBuf>,
    /// guest-probe binary (default: found next to sandscope or in target/).
    #[arg(long, env = "SANDSCOPE_PROBE")]
    probe: Option<PathBuf>,
    /// Guest kernel for the microVM drivers (default: the one `sandscope image build` cached).
    #[arg(long)]
    kernel: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Configuration file (default: the embedded example functions).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// HTTP listen address (overrides the config).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Sandbox driver (overrides the config).
    #[arg(long, value_parser = parse_driver)]
    driver: Option<DriverChoice>,
    /// guest-probe binary.
    #[arg(long, env = "SANDSCOPE_PROBE")]
    probe: Option<PathBuf>,
    /// Directory for sandbox runtime state.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Write Lambda Telemetry API-shaped platform events (platform.start, .report, ...) as
    /// JSON lines to this file (`-` = stdout).
    #[arg(long)]
    jsonl: Option<String>,
    /// Alert rules file, reloaded on SIGHUP and `POST /v1/rules/reload` (overrides
    /// `[agent] rules`).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Guest kernel for the microVM drivers (overrides `[agent] kernel`; default: the one
    /// `sandscope image build` cached).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Serve SSH into live sandboxes on this address (default 127.0.0.1:2222 when given
    /// without a value; overrides `[ssh] listen`). Public keys only, from
    /// --ssh-authorized-keys.
    #[arg(long, num_args = 0..=1, default_missing_value = host_agent::config::DEFAULT_SSH)]
    ssh: Option<SocketAddr>,
    /// OpenSSH authorized_keys file for the SSH endpoint (default ~/.ssh/authorized_keys;
    /// re-read at every login).
    #[arg(long, alias = "authorized-keys")]
    ssh_authorized_keys: Option<PathBuf>,
    /// Export metrics, invocation traces and logs over OTLP to this collector: base URL,
    /// e.g. http://127.0.0.1:4318 (HTTP/protobuf) or http://127.0.0.1:4317 (gRPC).
    /// Overrides `[otlp] endpoint`; `[otlp]` in the config has the other knobs.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// OTLP protocol: `http` (HTTP/protobuf, default) or `grpc`.
    #[arg(long, value_name = "PROTOCOL")]
    otlp_protocol: Option<String>,
    /// Backend preset: `newrelic` (New Relic's OTLP endpoint, api-key from
    /// $NEW_RELIC_LICENSE_KEY, gzip, delta temporality, its attribute limits) or `grafana`
    /// (Alloy/collector on 127.0.0.1:4318 unless --otlp-endpoint; basic auth from
    /// $GRAFANA_OTLP_USER and $GRAFANA_OTLP_TOKEN).
    #[arg(long, value_name = "PRESET")]
    otlp_preset: Option<String>,
    /// Keep OTLP batches the backend cannot take in this directory and send them when it
    /// is back, also after a restart (`[otlp] spool_dir`; size: `spool_max_mb`).
    #[arg(long, value_name = "DIR")]
    otlp_spool: Option<PathBuf>,
    /// SSH host key file (created on first start; default
    /// /var/lib/sandscope/ssh_host_ed25519_key for root, else under ~/.local/share).
    #[arg(long)]
    ssh_host_key: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct InvokeArgs {
    /// Function name.
    name: String,
    /// Event payload (JSON).
    #[arg(long, default_value = "{}")]
    payload: String,
    /// Number of invocations.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Invocations in flight at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
    /// Agent URL.
    #[arg(long, env = "SANDSCOPE_AGENT", default_value = client::DEFAULT_AGENT)]
    agent: String,
}

#[derive(clap::Args, Debug)]
struct ViewArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Agent URL.
    #[arg(long, env = "SANDSCOPE_AGENT", default_value = client::DEFAULT_AGENT)]
    agent: String,
}

fn parse_driver(s: &str) -> Result<DriverChoice, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDSCOPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(top::log_writer(match &cli.cmd {
            Cmd::Top(a) => Some(a),
            _ => None,
        }))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandscope: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandscope: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Agent(a) => run_agent(a).await,
        Cmd::Invoke(a) => {
            client::invoke(&a.agent, &a.name, &a.payload, a.count, a.concurrency).await
        }
        Cmd::Stats(a) => client::stats(&a.agent, a.json).await,
        Cmd::Sandboxes(a) => client::sandboxes(&a.agent, a.json).await,
        Cmd::Rules(RulesCmd::Test(a)) => rules::test(a),
        Cmd::Rules(RulesCmd::Bench(a)) => rules::bench(a),
        Cmd::Top(a) => top::run(a).await,
        Cmd::Image(ImageCmd::Build(a)) => image::build(a).await,
        Cmd::Ssh(a) => ssh::run(a).await,
        Cmd::Sessions(a) => ssh::sessions(&a.agent, a.json).await,
    }
}

/// Load the config (or the embedded defaults) and apply command-line overrides.
fn load_config(
    config: Option<&PathBuf>,
    state_dir: Option<PathBuf>,
    probe: Option<PathBuf>,
    driver: Option<DriverChoice>,
    http: Option<SocketAddr>,
) -> Result<AgentConfig> {
    let mut cfg = match config {
        Some(p) => AgentConfig::load(p)?,
        None => {
            let state = state_dir
                .clone()
                .unwrap_or_else(host_agent::config::default_state_dir);
            embedded::config(&state).context("preparing the embedded example functions")?
        }
    };
    if let Some(s) = state_dir {
        cfg.state_dir = s;
    }
    if probe.is_some() {
        cfg.probe = probe;
    }
    if let Some(d) = driver {
        cfg.driver = d;
    }
    if let Some(h) = http {
        cfg.http = h;
    }
    Ok(cfg)
}

async fn run_agent(a: AgentArgs) -> Result<ExitCode> {
    let mut cfg = load_config(a.config.as_ref(), a.state_dir, a.probe, a.driver, a.http)?;
    if let Some(j) = a.jsonl.as_deref() {
        cfg.jsonl = Some(exporters::jsonl::Target::parse(j));
    }
    if a.rules.is_some() {
        cfg.rules_file = a.rules;
    }
    if a.kernel.is_some() {
        cfg.vm.kernel = a.kernel;
    }
    if a.ssh.is_some() || a.ssh_authorized_keys.is_some() || a.ssh_host_key.is_some() {
        let s = cfg
            .ssh
            .get_or_insert_with(host_agent::config::SshConfig::with_defaults);
        if let Some(l) = a.ssh {
            s.listen = l;
        }
        if let Some(k) = a.ssh_authorized_keys {
            s.authorized_keys = k;
        }
        if let Some(k) = a.ssh_host_key {
            s.host_key = k;
        }
    }
    if a.otlp_endpoint.is_some()
        || a.otlp_protocol.is_some()
        || a.otlp_preset.is_some()
        || a.otlp_spool.is_some()
    {
        // Flags override the config's `[otlp]` keys, then everything is validated again.
        let mut raw = cfg.otlp.take().map(|o| o.raw).unwrap_or_default();
        if a.otlp_endpoint.is_some() {
            raw.endpoint = a.otlp_endpoint;
        }
        if a.otlp_protocol.is_some() {
            raw.protocol = a.otlp_protocol;
        }
        if a.otlp_preset.is_some() {
            raw.preset = a.otlp_preset;
        }
        if a.otlp_spool.is_some() {
            raw.spool_dir = a.otlp_spool;
        }
        cfg.otlp = Some(
            host_agent::config::otlp_settings(raw, &|k| std::env::var(k).ok()).map_err(
                |(k, r)| {
                    let flag = match k.as_str() {
                        "otlp.endpoint" => "--otlp-endpoint".to_string(),
                        "otlp.protocol" => "--otlp-protocol".to_string(),
                        "otlp.preset" => "--otlp-preset".to_string(),
                        other => other.to_string(),
                    };
                    anyhow::anyhow!("{flag}: {r}")
                },
            )?,
        );
    }
    let addr = cfg.http;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let agent = host_agent::Agent::start(cfg).await?;
    let (driver, why) = agent.driver();
    eprintln!("sandscope agent: driver {driver}: {why}");
    for f in agent.functions_view() {
        eprintln!(
            "  function {:<16} {:<10} {} MiB, timeout {:.1}s, up to {} sandboxes",
            f.spec.name,
            f.spec.kind.as_str(),
            f.spec.memory_mb,
            f.spec.timeout.as_secs_f64(),
            f.spec.pool.max_sandboxes
        );
    }
    let n_rules = agent.alerts().view()["rules"]
        .as_array()
        .map_or(0, Vec::len);
    if n_rules > 0 {
        eprintln!("  alert rules: {n_rules} (reload: SIGHUP or POST /v1/rules/reload)");
    }
    if let Some(o) = &agent.config().otlp {
        for (signal, url, protocol) in o.describe() {
            eprintln!("  otlp: {signal:<7} -> {url} ({protocol})");
        }
        if let Some(p) = o.preset {
            eprintln!("  otlp: preset {p}");
        }
    }
    if let Some(s) = agent.config().ssh.clone() {
        let info = host_agent::ssh::start(agent.clone(), &s).await?;
        eprintln!(
            "  ssh: {} (host key {}; keys from {}; `sandscope ssh SANDBOX_OR_FUNCTION`)",
            info.listen,
            info.host_key_fingerprint,
            info.authorized_keys.display()
        );
    }
    {
        let a = agent.clone();
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing a SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match a.alerts().reload() {
                    Ok(n) => eprintln!("sandscope agent: SIGHUP: alert rules reloaded ({n} rules)"),
                    Err(e) => eprintln!(
                        "sandscope agent: SIGHUP: alert rules NOT reloaded, old rules kept: {}",
                        host_agent::agent::chain(&e)
                    ),
                }
            }
        });
    }
    // Last line of the banner: scripts wait for it.
    eprintln!(
        "sandscope agent: listening on http://{}",
        listener.local_addr()?
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    host_agent::api::serve(agent.clone(), listener, shutdown).await?;
    eprintln!("sandscope agent: shutting down, ending sandboxes");
    agent.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
