//! Sandbox drivers: how a sandbox is started, frozen, measured and ended. The pool and
//! the invoke path only see [`Driver`] and [`SandboxHandle`].

pub mod console;
pub mod process;
pub mod qemu;
pub mod vm;
pub mod vmm_lite;

use crate::config::{AgentConfig, DriverChoice, FunctionSpec};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A boxed, sendable future (drivers are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a driver could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The driver cannot work on this host at all.
    #[error("driver `{driver}` is unavailable: {reason}")]
    Unavailable {
        /// Driver name.
        driver: &'static str,
        /// Why.
        reason: String,
    },
    /// The guest-probe binary is missing.
    #[error("guest-probe binary not found (looked in: {looked}); build it with scripts/build-probe or set SANDSCOPE_PROBE")]
    ProbeMissing {
        /// Paths tried.
        looked: String,
    },
    /// Preparing the sandbox's directories failed.
    #[error("preparing sandbox directory {path}")]
    StateDir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// cgroup setup or control failed.
    #[error("cgroup operation failed")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// Starting the sandbox process failed.
    #[error("starting {what}")]
    Spawn {
        /// What was started.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Resource usage of a sandbox as the host sees it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Usage {
    /// Resident memory of all its processes, bytes.
    pub rss_bytes: u64,
    /// CPU time of all its processes (incl. reaped children), µs.
    pub cpu_us: u64,
    /// Processes.
    pub processes: u32,
}

/// What a driver needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Sandbox id (also its hostname).
    pub id: String,
    /// The function it serves.
    pub function: Arc<FunctionSpec>,
    /// Host identity handed to the probe (echoed back in Hello).
    pub host_id: String,
}

/// How the agent gets its end of the probe link.
pub enum LinkSource {
    /// Already connected (a socketpair with a process sandbox).
    Connected(tokio::net::UnixStream),
    /// The guest will connect here (a microVM's vsock forwarded to `<uds>_PORT`).
    Listening(tokio::net::UnixListener),
}

/// A started sandbox: the agent's end of the probe link plus a control handle.
pub struct Spawned {
    /// The probe link, or where it will arrive.
    pub link: LinkSource,
    /// Control handle.
    pub handle: Box<dyn SandboxHandle>,
    /// When the sandbox process was running (end of the spawn phase).
    pub running_at: Instant,
}

/// Control over one live sandbox.
pub trait SandboxHandle: Send + Sync {
    /// Host pid of the sandbox's top process, if it has one.
    fn pid(&self) -> Option<u32>;
    /// Whether freeze/thaw is supported.
    fn can_freeze(&self) -> bool;
    /// Freeze all its processes; returns the time taken.
    fn freeze(&self) -> BoxFuture<'_, Result<Duration, DriverError>>;
    /// Thaw; returns the time taken.
    fn thaw(&self) -> BoxFuture<'_, Result<Duration, DriverError>>;
    /// Current usage.
    fn usage(&self) -> Usage;
    /// OOM kills so far.
    fn oom_kills(&self) -> u64;
    /// Whether the sandbox process has exited.
    fn exited(&self) -> bool;
    /// Wait until the sandbox process has exited, at most `limit`; true if it has.
    /// Drivers with an exit notification override the polling default.
    fn wait_exited(&self, limit: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let t0 = Instant::now();
            while !self.exited() {
                if t0.elapsed() >= limit {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            true
        })
    }
    /// Last lines the sandbox process itself wrote (diagnostics for failed starts; a VM's
    /// serial console).
    fn diagnostics(&self) -> String;
    /// The VMM's own record of the boot (start on CLOCK_MONOTONIC, first KVM_RUN, the
    /// guest's boot-timer write), asked for once after Hello, if the VMM reports one
    /// (vmm-lite). Feeds [`vm::waterfall`].
    fn vmm_times(&self) -> BoxFuture<'_, Option<vm::VmmTimes>> {
        Box::pin(async { None })
    }
    /// Resources configured for the guest: committed memory and vCPUs. `Some` marks a
    /// microVM (its boot has vmm_setup and kernel phases, its output is a console).
    fn configured(&self) -> Option<Configured> {
        None
    }
    /// Kill everything and release resources. Idempotent.
    fn destroy(&self) -> BoxFuture<'_, ()>;
}

/// What a VM was given, as opposed to what it uses.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Configured {
    /// Guest memory, bytes (committed to the guest).
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// A way to run sandboxes.
pub trait Driver: Send + Sync {
    /// Driver name (`process`, `qemu`, `vmm-lite`).
    fn name(&self) -> &'static str;
    /// One line describing the isolation in use.
    fn describe(&self) -> String;
    /// Start a sandbox.
    fn spawn<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Spawned, DriverError>>;
}

/// What the host offers for virtualization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// No /dev/kvm.
    None,
    /// /dev/kvm is PVM (kvm_pvm): standard guest kernels cannot boot.
    Pvm,
    /// Hardware virtualization (VT-x / AMD-V).
    Hardware,
}

/// Look at /dev/kvm and the CPU flags.
pub fn detect_kvm() -> KvmKind {
    if !Path::new("/dev/kvm").exists() {
        return KvmKind::None;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return KvmKind::Pvm;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw {
        KvmKind::Hardware
    } else {
        KvmKind::Pvm
    }
}

/// Pick the driver as DESIGN §5 describes; the string says which and why.
///
/// `auto` uses vmm-lite on hardware KVM (then qemu with KVM), and the process driver
/// elsewhere: under PVM or without KVM, QEMU would emulate the guest (TCG, ~1 s boots),
/// which `--driver qemu` asks for explicitly.
pub fn select(cfg: &AgentConfig) -> Result<(Arc<dyn Driver>, String), DriverError> {
    let kvm = detect_kvm();
    let vm_reason = match kvm {
        KvmKind::None => "no /dev/kvm on this host".to_string(),
        KvmKind::Pvm => {
            "KVM here is PVM (kvm_pvm): standard guest kernels cannot boot under it".into()
        }
        KvmKind::Hardware => "hardware KVM is present".into(),
    };
    let forced = |d: Arc<dyn Driver>| {
        let why = format!(
            "{} driver (forced by --driver {}): {}",
            d.name(),
            d.name(),
            d.describe()
        );
        Ok((d, why))
    };
    match cfg.driver {
        DriverChoice::VmmLite => {
            if kvm != KvmKind::Hardware {
                return Err(DriverError::Unavailable {
                    driver: "vmm-lite",
                    reason: format!("{vm_reason}; use --driver qemu or --driver process"),
                });
            }
            forced(Arc::new(vmm_lite::VmmLiteDriver::new(cfg)?))
        }
        DriverChoice::Qemu => forced(Arc::new(qemu::QemuDriver::new(cfg, &kvm)?)),
        DriverChoice::Process => forced(Arc::new(process::ProcessDriver::new(cfg)?)),
        DriverChoice::Auto => {
            let mut skipped = Vec::new();
            if kvm == KvmKind::Hardware {
                match vmm_lite::VmmLiteDriver::new(cfg) {
                    Ok(d) => {
                        let why = format!("vmm-lite driver (auto: {vm_reason}): {}", d.describe());
                        return Ok((Arc::new(d), why));
                    }
                    Err(e) => skipped.push(format!("vmm-lite: {e}")),
                }
                match qemu::QemuDriver::new(cfg, &kvm) {
                    Ok(d) => {
                        let why = format!(
                            "qemu driver (auto: {vm_reason}; {}): {}",
                            skipped.join("; "),
                            d.describe()
                        );
                        return Ok((Arc::new(d), why));
                    }
                    Err(e) => skipped.push(format!("qemu: {e}")),
                }
            } else {
                skipped.push(format!(
                    "{vm_reason}; --driver qemu runs microVMs under emulation (TCG)"
                ));
            }
            let d = process::ProcessDriver::new(cfg)?;
            let why = format!(
                "process driver (auto: microVMs not used because {}): {}",
                skipped.join("; "),
                d.describe()
            );
            Ok((Arc::new(d), why))
        }
    }
}

/// Wait until `exited` is set, at most `limit`; true if it is. `notify` must be notified
/// exactly when the flag is set (after setting it).
pub async fn wait_flag(
    exited: &std::sync::atomic::AtomicBool,
    notify: &tokio::sync::Notify,
    limit: Duration,
) -> bool {
    use std::sync::atomic::Ordering;
    let notified = notify.notified();
    tokio::pin!(notified);
    // Register before checking the flag, so a change in between is not missed.
    notified.as_mut().enable();
    if exited.load(Ordering::Acquire) {
        return true;
    }
    let _ = tokio::time::timeout(limit, notified).await;
    exited.load(Ordering::Acquire)
}

/// Remove a sandbox's state directory. Removing a tree needs open files, and an agent
/// short of them (the very reason a start may have failed) gets EMFILE: such errors are
/// retried for a few seconds, with a back-off, while sandboxes ending free theirs.
pub async fn remove_state_dir(dir: &Path) {
    let mut pause = Duration::from_millis(1);
    let t0 = Instant::now();
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if t0.elapsed() >= Duration::from_secs(5) => {
                tracing::warn!(dir = %dir.display(), error = %e, "sandbox state dir left behind");
                return;
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// Read a child's stdout and stderr into `console` (bounded: see [`console`]), each
/// line prefixed with `prefix`, and log them at debug level for sandbox `id`.
pub fn keep_output(
    child: &mut tokio::process::Child,
    console: &Arc<console::Console>,
    id: &str,
    prefix: &str,
) {
    let outs = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child.stderr.take().map(|e| Box::new(e) as _),
    ];
    for out in outs.into_iter().flatten() {
        console::keep_lines(out, console.clone(), id.to_string(), prefix.to_string());
    }
}

/// Find an executable: the configured path, else `name` on PATH, else the first of
/// `extra` that exists.
pub fn find_binary(configured: Option<&Path>, name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(p) = configured {
        if p.components().count() > 1 {
            return is_exec(p).then(|| p.to_path_buf());
        }
        return find_binary(None, &p.to_string_lossy(), extra);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .chain(extra.iter().cloned())
        .find(|p| is_exec(p))
}

/// Where to find the static guest-probe: config, `SANDSCOPE_PROBE`, then next to the
/// running binary and in the workspace's target directories.
pub fn find_probe(configured: Option<&Path>) -> Result<PathBuf, DriverError> {
    let mut looked = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = configured {
        candidates.push(p.to_path_buf());
    } else {
        if let Some(p) = std::env::var_os("SANDSCOPE_PROBE") {
            candidates.push(PathBuf::from(p));
        }
        // The static build (scripts/build-probe) first, then a sibling of the running binary.
        let exe = std::env::current_exe().ok();
        let mut dirs: Vec<PathBuf> = exe
            .iter()
            .flat_map(|e| e.ancestors().skip(1).take(4))
            .map(Path::to_path_buf)
            .collect();
        dirs.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target"),
        );
        for dir in &dirs {
            for profile in ["release", "debug"] {
                candidates.push(
                    dir.join("x86_64-unknown-linux-gnu")
                        .join(profile)
                        .join("guest-probe"),
                );
            }
        }
        for dir in &dirs {
            candidates.push(dir.join("guest-probe"));
        }
    }
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        looked.push(c.display().to_string());
    }
    Err(DriverError::ProbeMissing {
        looked: looked.join(", "),
    })
}
