//! `sandscope.toml`: raw serde types (unknown keys rejected) and the validated form the
//! rest of the agent uses. Every error names the file, the key and the reason.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown / mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file (or `<embedded>`).
        path: String,
        /// toml's message, which names the key, line and column.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {reason}")]
    Invalid {
        /// The file (or `<embedded>`).
        path: String,
        /// Dotted key, e.g. `functions[1].memory_mb`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Raw file shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[agent]` table.
    #[serde(default)]
    pub agent: RawAgent,
    /// `[[functions]]` tables.
    #[serde(default)]
    pub functions: Vec<RawFunction>,
    /// `[[rules]]` tables (alert rules; not reloadable, see `agent.rules`).
    #[serde(default)]
    pub rules: Vec<crate::alerts::rules::RawRule>,
    /// `[ssh]` table: present = the SSH endpoint is on.
    pub ssh: Option<RawSsh>,
    /// `[otlp]` table: present = export over OTLP.
    pub otlp: Option<RawOtlp>,
}

/// Raw `[otlp]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOtlp {
    /// `newrelic` or `grafana`: endpoint, auth header, compression and temporality that
    /// backend wants (explicit keys still win).
    pub preset: Option<String>,
    /// Base URL (`/v1/logs`, `/v1/traces`, `/v1/metrics` are appended for HTTP), e.g.
    /// `http://127.0.0.1:4318`; for gRPC `http://127.0.0.1:4317`.
    pub endpoint: Option<String>,
    /// `http` (HTTP/protobuf, default) or `grpc`.
    pub protocol: Option<String>,
    /// Extra request headers (gRPC metadata).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `gzip` or `none` (default; presets turn gzip on).
    pub compression: Option<String>,
    /// Request timeout, seconds (default 10).
    pub timeout_s: Option<f64>,
    /// Longest a log record or span waits for its batch, seconds (default 1).
    pub interval_s: Option<f64>,
    /// Metrics export interval, seconds (default 10).
    pub metrics_interval_s: Option<f64>,
    /// `cumulative` (default) or `delta` for counters and histograms.
    pub temporality: Option<String>,
    /// Keep batches the backend could not take in this directory (one subdirectory per
    /// signal) and send them when it is back, also after an agent restart.
    pub spool_dir: Option<PathBuf>,
    /// Spool size bound, MiB per signal (default 64); the oldest batches go first.
    pub spool_max_mb: Option<u64>,
    /// Extra CA certificates (PEM) to trust for an `https://` endpoint.
    pub ca_file: Option<PathBuf>,
    /// `[otlp.logs]`: per-signal overrides.
    pub logs: Option<RawOtlpSignal>,
    /// `[otlp.traces]`.
    pub traces: Option<RawOtlpSignal>,
    /// `[otlp.metrics]`.
    pub metrics: Option<RawOtlpSignal>,
}

/// Raw `[otlp.logs]` / `[otlp.traces]` / `[otlp.metrics]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOtlpSignal {
    /// Export this signal (default true).
    pub enabled: Option<bool>,
    /// Endpoint for this signal only (a VictoriaMetrics `.../opentelemetry` for metrics, say).
    pub endpoint: Option<String>,
    /// Protocol for this signal only.
    pub protocol: Option<String>,
}

/// Raw `[ssh]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsh {
    /// Listen address (default 127.0.0.1:2222).
    pub listen: Option<String>,
    /// OpenSSH authorized_keys file (default ~/.ssh/authorized_keys).
    pub authorized_keys: Option<PathBuf>,
    /// Host key (OpenSSH private key; generated on first start if missing).
    pub host_key: Option<PathBuf>,
    /// Longest a session may stay open, seconds (default 3600).
    pub max_session_s: Option<f64>,
}

/// Raw `[agent]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// HTTP listen address.
    pub http: Option<String>,
    /// Where sandboxes' runtime state lives.
    pub state_dir: Option<PathBuf>,
    /// Path of the guest-probe binary.
    pub probe: Option<PathBuf>,
    /// `auto`, `process`, `qemu`, `vmm-lite`.
    pub driver: Option<String>,
    /// Seconds a sandbox may take from spawn to Hello + Ready.
    pub boot_timeout_s: Option<f64>,
    /// Capacity of the recorder's sample queue.
    pub recorder_queue: Option<usize>,
    /// Write Telemetry API-shaped platform events as JSON lines here (`-` = stdout).
    pub jsonl: Option<String>,
    /// Alert rules file (reloaded on SIGHUP and `POST /v1/rules/reload`).
    pub rules: Option<PathBuf>,
    /// Guest kernel for the microVM drivers (default: the one `sandscope image build` cached).
    pub kernel: Option<PathBuf>,
    /// `qemu-system-x86_64` binary (default: found on PATH).
    pub qemu: Option<PathBuf>,
    /// `vhost-device-vsock` binary (default: PATH, then scripts/guest-deps' cache).
    pub vhost_device_vsock: Option<PathBuf>,
    /// `vmm-lite` binary (default: next to sandscope, then PATH).
    pub vmm_lite: Option<PathBuf>,
}

/// Raw `[[functions]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFunction {
    /// Function name.
    pub name: String,
    /// Shell command run by the probe (exec: per invoke; persistent: once).
    pub handler: String,
    /// `exec` (default) or `persistent`.
    pub kind: Option<String>,
    /// Directory mounted read-only at /var/task.
    pub code: PathBuf,
    /// Memory limit in MiB.
    pub memory_mb: Option<u64>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// Invoke timeout in seconds.
    pub timeout_s: Option<f64>,
    /// Environment for the handler.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Pool settings.
    #[serde(default)]
    pub pool: RawPool,
}

/// Raw `[functions.pool]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Most sandboxes alive at once for this function.
    pub max_sandboxes: Option<usize>,
    /// Sandboxes started ahead of demand and kept warm.
    pub prewarm: Option<usize>,
    /// Seconds an idle sandbox is kept before it is reaped.
    pub keep_alive_s: Option<f64>,
    /// Invocations that may wait for capacity before new ones are throttled.
    pub queue: Option<usize>,
    /// Seconds a queued invocation waits before it is throttled.
    pub queue_timeout_s: Option<f64>,
    /// Freeze idle sandboxes (cgroup freezer) and thaw them on invoke.
    pub freeze_idle: Option<bool>,
}

pub use wire::HandlerKind;

/// Which sandbox driver to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverChoice {
    /// Pick the best available, and say why.
    Auto,
    /// Namespaces + cgroups.
    Process,
    /// QEMU microvm.
    Qemu,
    /// vmm-lite microVM.
    VmmLite,
}

impl std::str::FromStr for DriverChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "process" => Ok(Self::Process),
            "qemu" => Ok(Self::Qemu),
            "vmm-lite" => Ok(Self::VmmLite),
            other => Err(format!(
                "unknown driver `{other}` (expected auto, process, qemu or vmm-lite)"
            )),
        }
    }
}

/// Validated pool settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolConfig {
    /// Most sandboxes alive at once.
    pub max_sandboxes: usize,
    /// Sandboxes kept warm ahead of demand.
    pub prewarm: usize,
    /// Idle time before reaping.
    #[serde(serialize_with = "ser_secs")]
    pub keep_alive: Duration,
    /// Queue length before throttling.
    pub queue: usize,
    /// Longest wait in the queue.
    #[serde(serialize_with = "ser_secs")]
    pub queue_timeout: Duration,
    /// Freeze idle sandboxes.
    pub freeze_idle: bool,
}

/// A validated function.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FunctionSpec {
    /// Name (also the Invoke API path segment).
    pub name: String,
    /// Handler command.
    pub handler: String,
    /// Handler kind.
    #[serde(serialize_with = "ser_kind")]
    pub kind: HandlerKind,
    /// Absolute code directory.
    pub code: PathBuf,
    /// Memory limit in MiB.
    pub memory_mb: u64,
    /// CPU limit in cores.
    pub cpus: f64,
    /// Invoke timeout.
    #[serde(serialize_with = "ser_secs")]
    pub timeout: Duration,
    /// Handler environment.
    pub env: BTreeMap<String, String>,
    /// Pool settings.
    pub pool: PoolConfig,
}

impl FunctionSpec {
    /// Memory limit in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mb * 1024 * 1024
    }
}

fn ser_kind<S: serde::Serializer>(k: &HandlerKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// HTTP API listen address.
    pub http: SocketAddr,
    /// Runtime state directory.
    pub state_dir: PathBuf,
    /// Explicit probe binary, if configured.
    pub probe: Option<PathBuf>,
    /// Driver choice.
    pub driver: DriverChoice,
    /// Spawn → Ready deadline.
    pub boot_timeout: Duration,
    /// Recorder queue capacity.
    pub recorder_queue: usize,
    /// JSON-lines platform events output, if any.
    pub jsonl: Option<exporters::jsonl::Target>,
    /// Functions served.
    pub functions: Vec<FunctionSpec>,
    /// Alert rules from `[[rules]]` in this file.
    pub rules: Vec<crate::alerts::Rule>,
    /// The reloadable alert rules file (relative paths resolved against this file).
    pub rules_file: Option<PathBuf>,
    /// Binaries and kernel for the microVM drivers.
    pub vm: VmConfig,
    /// The SSH endpoint, if on.
    pub ssh: Option<SshConfig>,
    /// OTLP export, if on.
    pub otlp: Option<OtlpSettings>,
}

/// OTLP export as configured: one exporter config per enabled signal.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// Function logs, platform events, shell audits.
    pub logs: Option<exporters::otlp::OtlpConfig>,
    /// Invocation spans.
    pub traces: Option<exporters::otlp::OtlpConfig>,
    /// Metrics.
    pub metrics: Option<exporters::otlp::OtlpConfig>,
    /// Metrics export interval.
    pub metrics_interval: Duration,
    /// The preset in force.
    pub preset: Option<&'static str>,
    /// What it was made from (command-line flags are applied to this and validated again).
    pub raw: RawOtlp,
}

impl OtlpSettings {
    /// `(signal, endpoint URL, protocol)` of each enabled signal, for banners.
    pub fn describe(&self) -> Vec<(&'static str, String, &'static str)> {
        use exporters::otlp::{Protocol, Signal};
        [
            (Signal::Logs, &self.logs),
            (Signal::Traces, &self.traces),
            (Signal::Metrics, &self.metrics),
        ]
        .into_iter()
        .filter_map(|(s, c)| {
            c.as_ref().map(|c| {
                let p = match c.protocol {
                    Protocol::Http => "HTTP/protobuf",
                    Protocol::Grpc => "gRPC",
                };
                (s.name(), c.url(s), p)
            })
        })
        .collect()
    }
}

/// New Relic's US OTLP endpoint (EU accounts: `https://otlp.eu01.nr-data.net`).
pub const NEWRELIC_ENDPOINT: &str = "https://otlp.nr-data.net";
/// Environment variable the `newrelic` preset reads the license (ingest) key from.
pub const NEWRELIC_KEY_ENV: &str = "NEW_RELIC_LICENSE_KEY";
/// New Relic's limit on attribute value length (bytes).
pub const NEWRELIC_MAX_ATTR_VALUE: usize = 4095;
/// Environment variables the `grafana` preset builds basic auth from.
pub const GRAFANA_USER_ENV: &str = "GRAFANA_OTLP_USER";
/// See [`GRAFANA_USER_ENV`].
pub const GRAFANA_TOKEN_ENV: &str = "GRAFANA_OTLP_TOKEN";

fn protocol(v: Option<&str>, key: &str) -> Result<exporters::otlp::Protocol, (String, String)> {
    use exporters::otlp::Protocol;
    match v {
        None | Some("http") | Some("http/protobuf") => Ok(Protocol::Http),
        Some("grpc") => Ok(Protocol::Grpc),
        Some(o) => Err((
            key.to_string(),
            format!("unknown protocol `{o}` (http or grpc)"),
        )),
    }
}

/// Validate `[otlp]` (also used for the `--otlp-*` flags). `env` looks up environment
/// variables (the presets' keys).
pub fn otlp_settings(
    raw: RawOtlp,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<OtlpSettings, (String, String)> {
    use exporters::otlp::{Compression, OtlpConfig, SpoolConfig, Temporality};
    let orig = raw.clone();
    let mut headers: Vec<(String, String)> = raw.headers.into_iter().collect();
    let has_header =
        |h: &[(String, String)], k: &str| h.iter().any(|(n, _)| n.eq_ignore_ascii_case(k));
    let mut endpoint = raw.endpoint;
    let mut compression = Compression::None;
    let mut temporality = Temporality::Cumulative;
    let mut max_attr_value_len = None;
    let preset = match raw.preset.as_deref() {
        None => None,
        Some("newrelic") => {
            endpoint.get_or_insert_with(|| NEWRELIC_ENDPOINT.to_string());
            if !has_header(&headers, "api-key") {
                let key = env(NEWRELIC_KEY_ENV).filter(|k| !k.trim().is_empty()).ok_or_else(|| {
                    (
                        "otlp.preset".to_string(),
                        format!(
                            "preset `newrelic` needs your New Relic license key: set {NEWRELIC_KEY_ENV} \
                             (or [otlp] headers = {{ api-key = \"...\" }})"
                        ),
                    )
                })?;
                headers.push(("api-key".into(), key.trim().to_string()));
            }
            compression = Compression::Gzip;
            temporality = Temporality::Delta;
            max_attr_value_len = Some(NEWRELIC_MAX_ATTR_VALUE);
            Some("newrelic")
        }
        Some("grafana") => {
            // Grafana Alloy / an OpenTelemetry Collector on this host by default; a Grafana
            // Cloud OTLP gateway (https://otlp-gateway-<zone>.grafana.net/otlp) when set.
            endpoint.get_or_insert_with(|| "http://127.0.0.1:4318".to_string());
            if !has_header(&headers, "authorization") {
                match (env(GRAFANA_USER_ENV), env(GRAFANA_TOKEN_ENV)) {
                    (Some(u), Some(t)) => headers.push((
                        "authorization".into(),
                        format!("Basic {}", crate::util::base64(format!("{}:{}", u.trim(), t.trim()).as_bytes())),
                    )),
                    (None, None) => {}
                    _ => {
                        return Err((
                            "otlp.preset".into(),
                            format!(
                                "preset `grafana`: set both {GRAFANA_USER_ENV} (instance id) and \
                                 {GRAFANA_TOKEN_ENV} (access policy token) for basic auth, or neither"
                            ),
                        ))
                    }
                }
            }
            compression = Compression::Gzip;
            Some("grafana")
        }
        Some(o) => {
            return Err((
                "otlp.preset".into(),
                format!("unknown preset `{o}` (newrelic or grafana)"),
            ))
        }
    };
    match raw.compression.as_deref() {
        None => {}
        Some("gzip") => compression = Compression::Gzip,
        Some("none") => compression = Compression::None,
        Some(o) => {
            return Err((
                "otlp.compression".into(),
                format!("unknown compression `{o}` (gzip or none)"),
            ))
        }
    }
    match raw.temporality.as_deref() {
        None => {}
        Some("cumulative") => temporality = Temporality::Cumulative,
        Some("delta") => temporality = Temporality::Delta,
        Some(o) => {
            return Err((
                "otlp.temporality".into(),
                format!("unknown temporality `{o}` (cumulative or delta)"),
            ))
        }
    }
    let base_protocol = protocol(raw.protocol.as_deref(), "otlp.protocol")?;
    let timeout =
        secs(raw.timeout_s, 10.0, 0.1, 300.0).map_err(|r| ("otlp.timeout_s".to_string(), r))?;
    let interval =
        secs(raw.interval_s, 1.0, 0.01, 60.0).map_err(|r| ("otlp.interval_s".to_string(), r))?;
    let metrics_interval = secs(raw.metrics_interval_s, 10.0, 0.05, 3600.0)
        .map_err(|r| ("otlp.metrics_interval_s".to_string(), r))?;
    let spool_max = match raw.spool_max_mb {
        Some(0) => return Err(("otlp.spool_max_mb".into(), "must be at least 1".into())),
        Some(m) => m,
        None => 64,
    };
    let make =
        |name: &str, sig: Option<RawOtlpSignal>| -> Result<Option<OtlpConfig>, (String, String)> {
            let sig = sig.unwrap_or_default();
            if sig.enabled == Some(false) {
                return Ok(None);
            }
            let key = |k: &str| {
                if sig.endpoint.is_some() && k == "endpoint"
                    || sig.protocol.is_some() && k == "protocol"
                {
                    format!("otlp.{name}.{k}")
                } else {
                    format!("otlp.{k}")
                }
            };
            let endpoint = sig
                .endpoint
                .clone()
                .or_else(|| endpoint.clone())
                .ok_or_else(|| {
                    (
                        "otlp.endpoint".to_string(),
                        "missing (e.g. http://127.0.0.1:4318, or a preset)".to_string(),
                    )
                })?;
            let mut c = OtlpConfig::new(&endpoint);
            c.protocol = match &sig.protocol {
                Some(p) => protocol(Some(p), &key("protocol"))?,
                None => base_protocol,
            };
            c.headers = headers.clone();
            c.timeout = timeout;
            c.interval = interval;
            c.compression = compression;
            c.temporality = temporality;
            c.max_attr_value_len = max_attr_value_len;
            c.ca_file = raw.ca_file.clone();
            c.spool = raw.spool_dir.as_ref().map(|d| SpoolConfig {
                dir: d.clone(),
                max_bytes: spool_max.saturating_mul(1 << 20),
            });
            c.validate().map_err(|e| {
                let k = match e {
                    exporters::otlp::OtlpError::Header(_) => "otlp.headers".to_string(),
                    exporters::otlp::OtlpError::Ca(..) => "otlp.ca_file".to_string(),
                    _ => key("endpoint"),
                };
                (k, e.to_string())
            })?;
            Ok(Some(c))
        };
    let logs = make("logs", raw.logs)?;
    let traces = make("traces", raw.traces)?;
    let metrics = make("metrics", raw.metrics)?;
    if logs.is_none() && traces.is_none() && metrics.is_none() {
        return Err((
            "otlp".into(),
            "every signal is disabled; remove the [otlp] table to turn export off".into(),
        ));
    }
    Ok(OtlpSettings {
        logs,
        traces,
        metrics,
        metrics_interval,
        preset,
        raw: orig,
    })
}

/// The SSH endpoint into live sandboxes.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Keys allowed in (OpenSSH authorized_keys format; re-read at every login).
    pub authorized_keys: PathBuf,
    /// Host key file.
    pub host_key: PathBuf,
    /// Longest a session may stay open.
    pub max_session: Duration,
}

/// Default SSH address.
pub const DEFAULT_SSH: &str = "127.0.0.1:2222";

impl SshConfig {
    /// Defaults for everything: loopback, the user's authorized_keys, a host key in the
    /// data dir, one hour.
    pub fn with_defaults() -> Self {
        Self {
            listen: DEFAULT_SSH.parse().expect("valid default address"),
            authorized_keys: home().join(".ssh/authorized_keys"),
            host_key: default_data_dir().join("ssh_host_ed25519_key"),
            max_session: Duration::from_secs(3600),
        }
    }

    fn validate(raw: RawSsh, base: &Path) -> Result<Self, (String, String)> {
        let mut c = Self::with_defaults();
        if let Some(l) = raw.listen {
            c.listen = l.parse().map_err(|_| {
                (
                    "ssh.listen".to_string(),
                    format!("`{l}` is not an address like {DEFAULT_SSH}"),
                )
            })?;
        }
        let anchor = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        if let Some(p) = raw.authorized_keys {
            c.authorized_keys = anchor(p);
        }
        if let Some(p) = raw.host_key {
            c.host_key = anchor(p);
        }
        c.max_session = secs(raw.max_session_s, 3600.0, 1.0, 7.0 * 86_400.0)
            .map_err(|r| ("ssh.max_session_s".to_string(), r))?;
        Ok(c)
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Where the agent keeps what must survive restarts (the SSH host key):
/// `/var/lib/sandscope` for root, else `$XDG_DATA_HOME/sandscope` or
/// `~/.local/share/sandscope`.
pub fn default_data_dir() -> PathBuf {
    if crate::util::is_root() && Path::new("/var/lib").is_dir() {
        return PathBuf::from("/var/lib/sandscope");
    }
    match std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p).join("sandscope"),
        None => home().join(".local/share/sandscope"),
    }
}

/// What the microVM drivers use; `None` means "find it" (see the driver docs).
#[derive(Debug, Clone, Default)]
pub struct VmConfig {
    /// Guest kernel (bzImage or vmlinux).
    pub kernel: Option<PathBuf>,
    /// QEMU binary.
    pub qemu: Option<PathBuf>,
    /// vhost-device-vsock binary.
    pub vhost_device_vsock: Option<PathBuf>,
    /// vmm-lite binary.
    pub vmm_lite: Option<PathBuf>,
}

/// Default HTTP address.
pub const DEFAULT_HTTP: &str = "127.0.0.1:9000";

impl AgentConfig {
    /// Load and validate a file. Relative code paths resolve against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        Self::parse(&text, &path.display().to_string(), &base)
    }

    /// Parse and validate TOML text; `origin` names it in errors, `base` anchors relative paths.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        Self::validate(raw, origin, base)
    }

    /// Turn raw values into a validated config.
    pub fn validate(raw: RawConfig, origin: &str, base: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            path: origin.to_string(),
            key,
            reason,
        };
        let http_s = raw.agent.http.as_deref().unwrap_or(DEFAULT_HTTP);
        let http: SocketAddr = http_s.parse().map_err(|_| {
            invalid(
                "agent.http".into(),
                format!("`{http_s}` is not an address like 127.0.0.1:9000"),
            )
        })?;
        let driver = match raw.agent.driver.as_deref() {
            None => DriverChoice::Auto,
            Some(s) => s.parse().map_err(|e| invalid("agent.driver".into(), e))?,
        };
        let boot_timeout = secs(raw.agent.boot_timeout_s, 10.0, 0.1, 600.0)
            .map_err(|r| invalid("agent.boot_timeout_s".into(), r))?;
        let recorder_queue = raw.agent.recorder_queue.unwrap_or(65_536);
        if !(16..=16 << 20).contains(&recorder_queue) {
            return Err(invalid(
                "agent.recorder_queue".into(),
                format!("must be between 16 and {} (got {recorder_queue})", 16 << 20),
            ));
        }
        let state_dir = raw.agent.state_dir.unwrap_or_else(default_state_dir);
        let mut functions = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, f) in raw.functions.into_iter().enumerate() {
            let key = |k: &str| format!("functions[{i}].{k}");
            if !valid_name(&f.name) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "`{}` is not a valid function name (1-48 chars of a-z, A-Z, 0-9, - and _)",
                        f.name
                    ),
                ));
            }
            if !seen.insert(f.name.clone()) {
                return Err(invalid(
                    key("name"),
                    format!("duplicate function `{}`", f.name),
                ));
            }
            if f.handler.trim().is_empty() {
                return Err(invalid(key("handler"), "must not be empty".into()));
            }
            let kind = match f.kind.as_deref() {
                None => HandlerKind::Exec,
                Some(k) => HandlerKind::parse(k).ok_or_else(|| {
                    invalid(
                        key("kind"),
                        format!("unknown kind `{k}` (expected exec, persistent or lambda)"),
                    )
                })?,
            };
            let code = if f.code.is_absolute() {
                f.code.clone()
            } else {
                base.join(&f.code)
            };
            let code = code.canonicalize().map_err(|e| {
                invalid(
                    key("code"),
                    format!("directory {} is not usable: {e}", code.display()),
                )
            })?;
            if !code.is_dir() {
                return Err(invalid(
                    key("code"),
                    format!("{} is not a directory", code.display()),
                ));
            }
            let memory_mb = f.memory_mb.unwrap_or(128);
            if !(16..=65_536).contains(&memory_mb) {
                return Err(invalid(
                    key("memory_mb"),
                    format!("must be between 16 and 65536 (got {memory_mb})"),
                ));
            }
            let cpus = f.cpus.unwrap_or(1.0);
            if !(cpus.is_finite() && (0.01..=256.0).contains(&cpus)) {
                return Err(invalid(
                    key("cpus"),
                    format!("must be between 0.01 and 256 (got {cpus})"),
                ));
            }
            let timeout =
                secs(f.timeout_s, 3.0, 0.001, 900.0).map_err(|r| invalid(key("timeout_s"), r))?;
            for k in f.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(invalid(key("env"), format!("invalid variable name `{k}`")));
                }
            }
            let p = &f.pool;
            let max_sandboxes = p.max_sandboxes.unwrap_or(8);
            if !(1..=4096).contains(&max_sandboxes) {
                return Err(invalid(
                    key("pool.max_sandboxes"),
                    format!("must be between 1 and 4096 (got {max_sandboxes})"),
                ));
            }
            let prewarm = p.prewarm.unwrap_or(0);
            if prewarm > max_sandboxes {
                return Err(invalid(
                    key("pool.prewarm"),
                    format!("{prewarm} exceeds pool.max_sandboxes ({max_sandboxes})"),
                ));
            }
            let keep_alive = secs(p.keep_alive_s, 300.0, 0.05, 86_400.0)
                .map_err(|r| invalid(key("pool.keep_alive_s"), r))?;
            let queue = p.queue.unwrap_or(64);
            if queue > 1_000_000 {
                return Err(invalid(
                    key("pool.queue"),
                    format!("at most 1000000 (got {queue})"),
                ));
            }
            let queue_timeout = secs(
                p.queue_timeout_s,
                timeout.as_secs_f64().max(1.0),
                0.0,
                900.0,
            )
            .map_err(|r| invalid(key("pool.queue_timeout_s"), r))?;
            functions.push(FunctionSpec {
                name: f.name,
                handler: f.handler,
                kind,
                code,
                memory_mb,
                cpus,
                timeout,
                env: f.env,
                pool: PoolConfig {
                    max_sandboxes,
                    prewarm,
                    keep_alive,
                    queue,
                    queue_timeout,
                    freeze_idle: p.freeze_idle.unwrap_or(false),
                },
            });
        }
        let rules = crate::alerts::rules::validate_all(raw.rules, origin)?;
        let rules_file = match raw.agent.rules {
            None => None,
            Some(p) if p.as_os_str().is_empty() => {
                return Err(invalid("agent.rules".into(), "must not be empty".into()))
            }
            Some(p) if p.is_absolute() => Some(p),
            Some(p) => Some(base.join(p)),
        };
        let resolve = |p: Option<PathBuf>| match p {
            Some(p) if p.is_relative() && p.components().count() > 1 => Some(base.join(p)),
            other => other,
        };
        let vm = VmConfig {
            kernel: raw
                .agent
                .kernel
                .map(|k| if k.is_relative() { base.join(k) } else { k }),
            qemu: resolve(raw.agent.qemu),
            vhost_device_vsock: resolve(raw.agent.vhost_device_vsock),
            vmm_lite: resolve(raw.agent.vmm_lite),
        };
        let ssh = raw
            .ssh
            .map(|r| SshConfig::validate(r, base))
            .transpose()
            .map_err(|(k, r)| invalid(k, r))?;
        let otlp = raw
            .otlp
            .map(|r| otlp_settings(r, &|k| std::env::var(k).ok()))
            .transpose()
            .map_err(|(k, r)| invalid(k, r))?;
        Ok(AgentConfig {
            otlp,
            ssh,
            vm,
            rules,
            rules_file,
            http,
            state_dir,
            probe: raw.agent.probe,
            driver,
            boot_timeout,
            recorder_queue,
            jsonl: match raw.agent.jsonl.as_deref() {
                None => None,
                Some("") => return Err(invalid("agent.jsonl".into(), "must not be empty".into())),
                Some(p) => Some(exporters::jsonl::Target::parse(p)),
            },
            functions,
        })
    }
}

fn secs(v: Option<f64>, default: f64, min: f64, max: f64) -> Result<Duration, String> {
    let v = v.unwrap_or(default);
    if !(v.is_finite() && v >= min && v <= max) {
        return Err(format!("must be between {min} and {max} seconds (got {v})"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Function names are path segments, cgroup names and hostnames: keep them simple.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `/run/sandscope` when writable (root), else a per-user temp dir.
pub fn default_state_dir() -> PathBuf {
    if Path::new("/run").is_dir() && crate::util::is_root() {
        PathBuf::from("/run/sandscope")
    } else {
        std::env::temp_dir().join(format!("sandscope-{}", crate::util::uid()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(t, "test.toml", Path::new("/"))
    }

    #[test]
    fn otlp_table_is_validated() {
        assert!(parse("").unwrap().otlp.is_none());
        let c =
            parse("[otlp]\nendpoint = \"http://127.0.0.1:4318\"\nheaders = { api-key = \"k\" }\n")
                .unwrap()
                .otlp
                .unwrap();
        let logs = c.logs.as_ref().unwrap();
        assert_eq!(logs.endpoint, "http://127.0.0.1:4318");
        assert_eq!(logs.headers, vec![("api-key".to_string(), "k".to_string())]);
        assert!(
            c.traces.is_some() && c.metrics.is_some(),
            "all signals by default"
        );
        assert_eq!(c.metrics_interval, Duration::from_secs(10));
        let c = parse(
            "[otlp]\nendpoint = \"http://127.0.0.1:4317\"\nprotocol = \"grpc\"\ncompression = \"gzip\"\n\
             spool_dir = \"/var/spool/ss\"\nspool_max_mb = 2\n\
             [otlp.metrics]\nendpoint = \"http://127.0.0.1:8428/opentelemetry\"\nprotocol = \"http\"\n\
             [otlp.logs]\nenabled = false\n",
        )
        .unwrap()
        .otlp
        .unwrap();
        assert!(c.logs.is_none());
        let (t, m) = (c.traces.unwrap(), c.metrics.unwrap());
        assert_eq!(t.protocol, exporters::otlp::Protocol::Grpc);
        assert_eq!(t.compression, exporters::otlp::Compression::Gzip);
        assert_eq!(m.protocol, exporters::otlp::Protocol::Http);
        assert_eq!(
            m.url(exporters::otlp::Signal::Metrics),
            "http://127.0.0.1:8428/opentelemetry/v1/metrics"
        );
        let spool = m.spool.unwrap();
        assert_eq!(
            (spool.dir.to_str(), spool.max_bytes),
            (Some("/var/spool/ss"), 2 << 20)
        );
        for (t, want) in [
            ("[otlp]\n", "otlp.endpoint: missing"),
            (
                "[otlp]\nendpoint = \"localhost:4318\"\n",
                "must start with http:// or https://",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\nprotocol = \"udp\"\n",
                "otlp.protocol: unknown protocol `udp`",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\nheaders = { \"a b\" = \"x\" }\n",
                "otlp.headers",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\npreset = \"datadog\"\n",
                "otlp.preset: unknown preset `datadog` (newrelic or grafana)",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\ncompression = \"zstd\"\n",
                "otlp.compression: unknown compression `zstd`",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\ntemporality = \"both\"\n",
                "otlp.temporality",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\n[otlp.traces]\nendpoint = \"h:2\"\n",
                "otlp.traces.endpoint",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\n[otlp.logs]\nenabled = false\n\
                 [otlp.traces]\nenabled = false\n[otlp.metrics]\nenabled = false\n",
                "every signal is disabled",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\nspool_max_mb = 0\n",
                "otlp.spool_max_mb",
            ),
            (
                "[otlp]\nendpoint = \"http://h:1\"\n[otlp.logs]\nlevel = 3\n",
                "unknown field `level`",
            ),
        ] {
            let e = parse(t).unwrap_err().to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    #[test]
    fn otlp_presets_fill_in_what_the_backend_wants() {
        let raw = |preset: &str| RawOtlp {
            preset: Some(preset.into()),
            ..Default::default()
        };
        let nr = otlp_settings(raw("newrelic"), &|k| {
            (k == NEWRELIC_KEY_ENV).then(|| "nr-key ".to_string())
        })
        .unwrap();
        assert_eq!(nr.preset, Some("newrelic"));
        let m = nr.metrics.unwrap();
        assert_eq!(m.endpoint, NEWRELIC_ENDPOINT);
        assert_eq!(
            m.headers,
            vec![("api-key".to_string(), "nr-key".to_string())]
        );
        assert_eq!(m.temporality, exporters::otlp::Temporality::Delta);
        assert_eq!(m.compression, exporters::otlp::Compression::Gzip);
        assert_eq!(m.max_attr_value_len, Some(NEWRELIC_MAX_ATTR_VALUE));
        let e = otlp_settings(raw("newrelic"), &|_| None).unwrap_err();
        assert_eq!(e.0, "otlp.preset");
        assert!(e.1.contains(NEWRELIC_KEY_ENV), "{}", e.1);
        // An explicit header wins over the environment.
        let mut r = raw("newrelic");
        r.headers.insert("api-key".into(), "from-config".into());
        let nr = otlp_settings(r, &|_| None).unwrap();
        assert_eq!(nr.logs.unwrap().headers[0].1, "from-config");

        let g = otlp_settings(raw("grafana"), &|k| match k {
            GRAFANA_USER_ENV => Some("123456".into()),
            GRAFANA_TOKEN_ENV => Some("glc_tok".into()),
            _ => None,
        })
        .unwrap();
        let t = g.traces.unwrap();
        assert_eq!(t.endpoint, "http://127.0.0.1:4318");
        assert_eq!(
            t.headers,
            vec![(
                "authorization".to_string(),
                format!("Basic {}", crate::util::base64(b"123456:glc_tok"))
            )]
        );
        assert_eq!(t.temporality, exporters::otlp::Temporality::Cumulative);
        let e = otlp_settings(raw("grafana"), &|k| {
            (k == GRAFANA_USER_ENV).then(|| "1".into())
        })
        .unwrap_err();
        assert!(e.1.contains(GRAFANA_TOKEN_ENV), "{}", e.1);
        assert!(otlp_settings(raw("grafana"), &|_| None)
            .unwrap()
            .logs
            .unwrap()
            .headers
            .is_empty());
    }

    #[test]
    fn ssh_table_turns_the_endpoint_on_with_defaults_and_checks_values() {
        let off = parse("").unwrap();
        assert!(off.ssh.is_none());
        let on = parse("[ssh]\n").unwrap().ssh.unwrap();
        assert_eq!(on.listen.to_string(), DEFAULT_SSH);
        assert!(on.authorized_keys.ends_with(".ssh/authorized_keys"));
        assert_eq!(on.max_session, Duration::from_secs(3600));
        let c = parse(
            "[ssh]\nlisten = \"0.0.0.0:22022\"\nauthorized_keys = \"keys\"\nmax_session_s = 60\n",
        )
        .unwrap()
        .ssh
        .unwrap();
        assert_eq!(c.listen.port(), 22022);
        assert_eq!(c.authorized_keys, Path::new("/keys"));
        assert_eq!(c.max_session, Duration::from_secs(60));
        let e = parse("[ssh]\nlisten = \"nope\"\n").unwrap_err().to_string();
        assert!(e.contains("ssh.listen") && e.contains("`nope`"), "{e}");
        let e = parse("[ssh]\nmax_session_s = 0\n").unwrap_err().to_string();
        assert!(e.contains("ssh.max_session_s"), "{e}");
        let e = parse("[ssh]\npassword = true\n").unwrap_err().to_string();
        assert!(e.contains("password"), "{e}");
    }

    #[test]
    fn minimal_function_gets_defaults() {
        let c = parse(
            r#"
            [[functions]]
            name = "hello"
            handler = "./h.sh"
            code = "/tmp"
            "#,
        )
        .unwrap();
        let f = &c.functions[0];
        assert_eq!(f.memory_mb, 128);
        assert_eq!(f.kind, HandlerKind::Exec);
        assert_eq!(f.timeout, Duration::from_secs(3));
        assert_eq!(f.pool.max_sandboxes, 8);
        assert_eq!(c.http.to_string(), DEFAULT_HTTP);
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse("[agent]\nhttpp = \"x\"\n").unwrap_err().to_string();
        assert!(e.starts_with("test.toml:"), "{e}");
        assert!(e.contains("httpp"), "{e}");
        let e =
            parse("[[functions]]\nname='a'\nhandler='x'\ncode='/tmp'\n[functions.pool]\nmax=3\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("unknown field `max`"), "{e}");
        assert!(e.contains("line 6"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_reason() {
        let cases = [
            ("memory_mb = 4", "functions[0].memory_mb", "between 16"),
            ("kind = 'wasm'", "functions[0].kind", "unknown kind"),
            ("timeout_s = -1.0", "functions[0].timeout_s", "between"),
            ("cpus = 0.0", "functions[0].cpus", "between"),
        ];
        for (extra, key, reason) in cases {
            let t = format!("[[functions]]\nname='a'\nhandler='x'\ncode='/tmp'\n{extra}\n");
            let e = parse(&t).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(reason), "{extra}: {e}");
            assert!(e.starts_with("test.toml: "), "{e}");
        }
        let e = parse("[agent]\nhttp='nope'\n").unwrap_err().to_string();
        assert!(e.contains("agent.http"), "{e}");
        let e = parse("[[functions]]\nname='a b'\nhandler='x'\ncode='/tmp'\n").unwrap_err();
        assert!(e.to_string().contains("functions[0].name"));
        let e = parse("[[functions]]\nname='a'\nhandler='x'\ncode='/definitely/missing'\n")
            .unwrap_err();
        assert!(e.to_string().contains("functions[0].code"), "{e}");
        let dup = "[[functions]]\nname='a'\nhandler='x'\ncode='/tmp'\n".repeat(2);
        assert!(parse(&dup)
            .unwrap_err()
            .to_string()
            .contains("duplicate function"));
        let e = parse("[agent]\ndriver='docker'\n").unwrap_err().to_string();
        assert!(
            e.contains("agent.driver") && e.contains("unknown driver"),
            "{e}"
        );
        let e = parse("[[functions]]\nname='a'\nhandler='x'\ncode='/tmp'\n[functions.pool]\nprewarm=9\nmax_sandboxes=2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool.prewarm"), "{e}");
    }

    #[test]
    fn inline_rules_and_rules_file() {
        let c = parse("[agent]\nrules = 'r.toml'\n[[rules]]\nname='e'\npattern='ERROR'\n").unwrap();
        assert_eq!(c.rules.len(), 1);
        assert_eq!(c.rules_file.as_deref(), Some(Path::new("/r.toml")));
        let e = parse("[[rules]]\nname='e'\npattern='('\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test.toml: rules[0].pattern: "), "{e}");
        let e = parse("[[rules]]\nname='e'\npattern='x'\nbogus=1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn example_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sandscope.toml");
        let c = AgentConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.functions.len() >= 2);
    }
}
