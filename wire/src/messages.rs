//! Protocol messages. Hand-written `prost` derives, so no `protoc` is needed; the
//! equivalent `.proto` lives in `docs/wire.proto` for probes written in other languages
//! (kept in step by `tests/proto_doc.rs`).

/// Version carried in [`Hello::protocol_version`]. Bump on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// One frame on the link. Exactly one body per frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    /// The frame's content.
    #[prost(
        oneof = "frame::Body",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15"
    )]
    pub body: Option<frame::Body>,
}

/// The frame body variants. Tags 11..=15 are the Shell frames (remote shells into a live
/// sandbox); 16..=19 stay reserved for them.
pub mod frame {
    /// What a frame carries.
    // Hello is large but rare; boxing it would cost an allocation on every frame decode.
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// probe -> agent, first frame on a link.
        #[prost(message, tag = "1")]
        Hello(super::Hello),
        /// probe -> agent: the handler runtime is ready (or failed to start).
        #[prost(message, tag = "2")]
        Ready(super::Ready),
        /// agent -> probe: run the handler once.
        #[prost(message, tag = "3")]
        Invoke(super::Invoke),
        /// probe -> agent: the outcome of one [`super::Invoke`].
        #[prost(message, tag = "4")]
        InvokeResult(super::InvokeResult),
        /// probe -> agent: one line of function output or a platform event.
        #[prost(message, tag = "5")]
        Log(super::Log),
        /// probe -> agent: resource usage of the sandbox's processes.
        #[prost(message, tag = "6")]
        Stats(super::Stats),
        /// agent -> probe: ask for a [`super::Stats`] frame.
        #[prost(message, tag = "7")]
        StatsRequest(super::StatsRequest),
        /// either direction: link liveness and round-trip time.
        #[prost(message, tag = "8")]
        Ping(super::Ping),
        /// answer to a [`super::Ping`].
        #[prost(message, tag = "9")]
        Pong(super::Pong),
        /// agent -> probe: stop the handler and end the sandbox.
        #[prost(message, tag = "10")]
        Shutdown(super::Shutdown),
        /// agent -> probe: start a shell session (a PTY shell, or one command).
        #[prost(message, tag = "11")]
        ShellOpen(super::ShellOpen),
        /// either direction: bytes of a session (stdin to the probe, stdout/stderr back).
        #[prost(message, tag = "12")]
        ShellData(super::ShellData),
        /// agent -> probe: the terminal's new size.
        #[prost(message, tag = "13")]
        ShellResize(super::ShellResize),
        /// agent -> probe: deliver a signal to the session's process group.
        #[prost(message, tag = "14")]
        ShellSignal(super::ShellSignal),
        /// probe -> agent: the session ended (or could not start).
        #[prost(message, tag = "15")]
        ShellExit(super::ShellExit),
    }
}

/// A named point in the probe's life, as a guest-monotonic delta since the probe
/// (the sandbox's init) started.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Marker {
    /// Marker name, e.g. `init_start`, `mounts_done`, `procinfo_read`, `connected`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Nanoseconds since the probe started (guest CLOCK_MONOTONIC delta).
    #[prost(uint64, tag = "2")]
    pub since_init_ns: u64,
}

/// Summary of /proc/cpuinfo.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CpuInfo {
    /// `model name` of the first processor.
    #[prost(string, tag = "1")]
    pub model: String,
    /// `vendor_id` of the first processor.
    #[prost(string, tag = "2")]
    pub vendor: String,
    /// `cpu MHz` of the first processor (0 when absent).
    #[prost(double, tag = "3")]
    pub mhz: f64,
    /// Number of entries in the `flags` line.
    #[prost(uint32, tag = "4")]
    pub flags_count: u32,
    /// Number of `processor` entries (logical CPUs the sandbox sees).
    #[prost(uint32, tag = "5")]
    pub cores: u32,
    /// Whether the `hypervisor` flag is present.
    #[prost(bool, tag = "6")]
    pub hypervisor_flag: bool,
}

/// Summary of /proc/meminfo, in KiB as the kernel reports it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MemInfo {
    /// `MemTotal`.
    #[prost(uint64, tag = "1")]
    pub total_kib: u64,
    /// `MemFree`.
    #[prost(uint64, tag = "2")]
    pub free_kib: u64,
    /// `MemAvailable`.
    #[prost(uint64, tag = "3")]
    pub available_kib: u64,
}

/// The host as seen from inside the sandbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostView {
    /// CPUID leaf 0x40000000 signature (e.g. `KVMKVMKVM`), empty when none.
    #[prost(string, tag = "1")]
    pub hypervisor: String,
    /// CPU model from CPUID brand string (what the silicon says, whatever /proc says).
    #[prost(string, tag = "2")]
    pub cpu_model: String,
    /// The host id the agent handed over at spawn, echoed back.
    #[prost(string, tag = "3")]
    pub host_id_echo: String,
}

/// probe -> agent, the first frame on every link.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the probe.
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// Sandbox id given at spawn.
    #[prost(string, tag = "2")]
    pub sandbox_id: String,
    /// /proc/sys/kernel/random/boot_id.
    #[prost(string, tag = "3")]
    pub boot_id: String,
    /// The sandbox's hostname.
    #[prost(string, tag = "4")]
    pub hostname: String,
    /// /etc/machine-id, empty when absent.
    #[prost(string, tag = "5")]
    pub machine_id: String,
    /// Kernel release (uname -r).
    #[prost(string, tag = "6")]
    pub kernel_release: String,
    /// CPU summary.
    #[prost(message, optional, tag = "7")]
    pub cpu: Option<CpuInfo>,
    /// Memory summary.
    #[prost(message, optional, tag = "8")]
    pub mem: Option<MemInfo>,
    /// /proc/uptime when the probe started, in microseconds.
    #[prost(uint64, tag = "9")]
    pub uptime_at_init_us: u64,
    /// Markers recorded so far.
    #[prost(message, repeated, tag = "10")]
    pub markers: Vec<Marker>,
    /// The host as seen from inside.
    #[prost(message, optional, tag = "11")]
    pub host: Option<HostView>,
    /// Probe version string.
    #[prost(string, tag = "12")]
    pub probe_version: String,
    /// Guest-monotonic ns since init when this Hello was sent.
    #[prost(uint64, tag = "13")]
    pub sent_since_init_ns: u64,
    /// The probe's own pid (1 when it is the sandbox's init).
    #[prost(uint32, tag = "14")]
    pub probe_pid: u32,
    /// Kind of handler configured (`exec` or `persistent`).
    #[prost(string, tag = "15")]
    pub handler_kind: String,
}

/// probe -> agent: the handler runtime finished initialising (runtime_init phase).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ready {
    /// Time from Hello to runtime ready, measured in the guest.
    #[prost(uint64, tag = "1")]
    pub runtime_init_us: u64,
    /// Empty on success; otherwise why the runtime could not start.
    #[prost(string, tag = "2")]
    pub error: String,
}

/// agent -> probe: run the handler for one event.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Invoke {
    /// Request id (Lambda's request id).
    #[prost(string, tag = "1")]
    pub invoke_id: String,
    /// Event payload (JSON).
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    /// Deadline relative to receipt, in milliseconds.
    #[prost(uint64, tag = "3")]
    pub timeout_ms: u64,
    /// W3C traceparent of the invocation, empty when none.
    #[prost(string, tag = "4")]
    pub traceparent: String,
}

/// How an invocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum InvokeStatus {
    /// Not set (a protocol error if seen).
    Unspecified = 0,
    /// The handler returned a response.
    Ok = 1,
    /// The handler failed (non-zero exit, or an error it reported).
    FunctionError = 2,
    /// The deadline passed; the handler was killed.
    Timeout = 3,
    /// The handler was killed by a signal it did not ask for (OOM killer, ...).
    Killed = 4,
    /// The probe could not run the handler at all.
    RuntimeError = 5,
    /// The response exceeded [`crate::MAX_PAYLOAD`].
    ResponseTooLarge = 6,
}

/// probe -> agent: result of one [`Invoke`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct InvokeResult {
    /// The [`Invoke::invoke_id`] this answers.
    #[prost(string, tag = "1")]
    pub invoke_id: String,
    /// Outcome.
    #[prost(enumeration = "InvokeStatus", tag = "2")]
    pub status: i32,
    /// Response payload (handler stdout in exec mode).
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    /// Exit code of the handler process, -1 when it did not exit normally.
    #[prost(sint32, tag = "4")]
    pub exit_code: i32,
    /// Signal that killed the handler, 0 when none.
    #[prost(int32, tag = "5")]
    pub signal: i32,
    /// Short error class (e.g. `Runtime.ExitError`), empty on success.
    #[prost(string, tag = "6")]
    pub error_type: String,
    /// Human-readable error, empty on success.
    #[prost(string, tag = "7")]
    pub error_message: String,
    /// Handler run time as measured by the probe, microseconds.
    #[prost(uint64, tag = "8")]
    pub duration_us: u64,
    /// Peak resident set of the handler during this invoke, KiB.
    #[prost(uint64, tag = "9")]
    pub max_rss_kib: u64,
    /// User CPU time of the handler for this invoke, microseconds.
    #[prost(uint64, tag = "10")]
    pub cpu_user_us: u64,
    /// System CPU time of the handler for this invoke, microseconds.
    #[prost(uint64, tag = "11")]
    pub cpu_system_us: u64,
    /// Sequence number of the last [`Log`] frame sent for this invoke (0 if none), so the
    /// agent can tell whether it received every line.
    #[prost(uint64, tag = "12")]
    pub last_log_seq: u64,
}

/// Which stream a [`Log`] line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LogStream {
    /// Not set.
    Unspecified = 0,
    /// Handler stdout (persistent handlers' non-protocol output).
    Stdout = 1,
    /// Handler stderr.
    Stderr = 2,
    /// An event the probe itself reports (runtime start/exit, kills, ...).
    Platform = 3,
}

/// probe -> agent: one log line. `seq` increases by one per Log frame on a link,
/// starting at 1, so gaps are detectable.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Log {
    /// Sequence number, 1-based, per link.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Source stream.
    #[prost(enumeration = "LogStream", tag = "2")]
    pub stream: i32,
    /// Guest-monotonic ns since init.
    #[prost(uint64, tag = "3")]
    pub since_init_ns: u64,
    /// The line, without its newline; at most [`crate::MAX_LOG_LINE`] bytes.
    #[prost(string, tag = "4")]
    pub line: String,
    /// Invoke that was running when the line was written, empty if none.
    #[prost(string, tag = "5")]
    pub invoke_id: String,
    /// The line was cut at [`crate::MAX_LOG_LINE`].
    #[prost(bool, tag = "6")]
    pub truncated: bool,
    /// On the Platform line that reports them: log lines the probe dropped under its rate
    /// limit since its previous such report. 0 on every other line.
    #[prost(uint64, tag = "7")]
    pub dropped: u64,
}

/// probe -> agent: resource usage of everything in the sandbox the probe started.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stats {
    /// Resident set of the handler processes, KiB.
    #[prost(uint64, tag = "1")]
    pub rss_kib: u64,
    /// Cumulative user CPU of handlers, microseconds.
    #[prost(uint64, tag = "2")]
    pub cpu_user_us: u64,
    /// Cumulative system CPU of handlers, microseconds.
    #[prost(uint64, tag = "3")]
    pub cpu_system_us: u64,
    /// Live handler processes.
    #[prost(uint32, tag = "4")]
    pub processes: u32,
    /// Guest-monotonic ns since init when sampled.
    #[prost(uint64, tag = "5")]
    pub since_init_ns: u64,
}

/// agent -> probe: ask for [`Stats`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatsRequest {}

/// Liveness / RTT probe.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    /// Echoed in the [`Pong`].
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

/// Answer to [`Ping`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    /// The [`Ping::nonce`].
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
    /// Responder's monotonic ns since init (probe) or 0 (agent).
    #[prost(uint64, tag = "2")]
    pub since_init_ns: u64,
}

/// agent -> probe: end the sandbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Shutdown {
    /// Why (logged by the probe).
    #[prost(string, tag = "1")]
    pub reason: String,
    /// How long handlers get after SIGTERM before SIGKILL.
    #[prost(uint32, tag = "2")]
    pub grace_ms: u32,
}

/// agent -> probe: open a shell session.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShellOpen {
    /// Session id, chosen by the agent, unique on the link.
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// Command for `sh -c`; empty = an interactive login shell.
    #[prost(string, tag = "2")]
    pub command: String,
    /// Run on a pseudo-terminal (stdout and stderr merged), with this TERM and size.
    #[prost(bool, tag = "3")]
    pub pty: bool,
    /// TERM for the PTY.
    #[prost(string, tag = "4")]
    pub term: String,
    /// Columns.
    #[prost(uint32, tag = "5")]
    pub cols: u32,
    /// Rows.
    #[prost(uint32, tag = "6")]
    pub rows: u32,
    /// Extra environment, `KEY=VALUE`.
    #[prost(string, repeated, tag = "7")]
    pub env: Vec<String>,
}

/// Which stream a [`ShellData`] belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ShellStream {
    /// Input to the session (agent -> probe). Empty data = end of input.
    Stdin = 0,
    /// Output (with a PTY: everything the terminal shows).
    Stdout = 1,
    /// Error output (without a PTY).
    Stderr = 2,
}

/// Bytes of one session.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShellData {
    /// Session id.
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// Stream.
    #[prost(enumeration = "ShellStream", tag = "2")]
    pub stream: i32,
    /// The bytes (empty stdin = EOF).
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// agent -> probe: window change.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShellResize {
    /// Session id.
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// Columns.
    #[prost(uint32, tag = "2")]
    pub cols: u32,
    /// Rows.
    #[prost(uint32, tag = "3")]
    pub rows: u32,
}

/// agent -> probe: signal the session's process group.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShellSignal {
    /// Session id.
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// Signal number (Linux).
    #[prost(int32, tag = "2")]
    pub signal: i32,
}

/// probe -> agent: the session is over.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShellExit {
    /// Session id.
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// Exit code (when it exited).
    #[prost(int32, tag = "2")]
    pub code: i32,
    /// Signal that killed it (0 = none).
    #[prost(int32, tag = "3")]
    pub signal: i32,
    /// Why it could not start or was cut off (empty when it ran and ended).
    #[prost(string, tag = "4")]
    pub error: String,
}
