//! What the microVM drivers (qemu, vmm-lite) share: the guest images, the guest's
//! command line, the probe's vsock endpoint, supervision of the VMM's processes, and the
//! cold-start waterfall of a VM boot.
//!
//! The probe link: the guest probe connects to CID 2 port [`PROBE_PORT`]; the vsock
//! backend (vhost-device-vsock or vmm-lite's muxer) forwards that to the host Unix socket
//! `<uds>_52`, on which the driver listens before the VM starts.

use super::{BoxFuture, Configured, DriverError, SandboxHandle, Usage};
use crate::config::{AgentConfig, FunctionSpec};
use guest_image::kernel::Kernel;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// vsock port the probe connects to (DESIGN §4).
pub const PROBE_PORT: u32 = 52;
/// The guest's vsock context id (each VM has its own vsock device, so all use 3).
pub const GUEST_CID: u32 = 3;
/// Smallest guest memory we boot, MiB (kernel + initramfs + probe need ~40).
pub const MIN_GUEST_MEM_MIB: u64 = 64;
/// Console lines kept per VM.
const CONSOLE_LINES: usize = 200;

/// The kernel and one initramfs per function.
#[derive(Debug)]
pub struct Images {
    /// The guest kernel.
    pub kernel: Kernel,
    initrds: HashMap<String, PathBuf>,
}

impl Images {
    /// The kernel a VMM boots: the uncompressed vmlinux through its PVH entry when there is
    /// one, else the bzImage. PVH skips the bzImage's decompressor: ~0.7 s when the guest is
    /// emulated (QEMU/TCG, or nested KVM), tens of ms on hardware.
    pub fn boot_kernel(&self) -> &Path {
        self.kernel
            .vmlinux
            .as_deref()
            .unwrap_or(&self.kernel.bzimage)
    }

    /// Find the kernel (configured, else the cached build) and write each function's
    /// initramfs into `STATE_DIR/images` (content-addressed, so unchanged ones are reused).
    pub fn prepare(cfg: &AgentConfig, driver: &'static str) -> Result<Self, DriverError> {
        let unavailable = |reason: String| DriverError::Unavailable { driver, reason };
        let kernel = match &cfg.vm.kernel {
            Some(k) => guest_image::kernel::check_user_kernel(k)
                .map_err(|e| unavailable(wire::error_chain(&e)))?,
            None => {
                let cache = guest_image::cache_dir();
                match guest_image::kernel::cached(&cache) {
                    Ok(Some(k)) => k,
                    Ok(None) => {
                        return Err(unavailable(format!(
                            "no guest kernel: run `sandscope image build` once (builds the minimal kernel into {}), or give one with --kernel PATH",
                            cache.join("kernel").display()
                        )))
                    }
                    Err(e) => {
                        return Err(unavailable(format!(
                            "no guest kernel ({}); or give one with --kernel PATH",
                            wire::error_chain(&e)
                        )))
                    }
                }
            }
        };
        let probe = super::find_probe(cfg.probe.as_deref())?;
        let busybox = guest_image::find_busybox();
        let dir = cfg.state_dir.join("images");
        let mut initrds = HashMap::new();
        for f in &cfg.functions {
            let path = write_initramfs(f, &probe, busybox.as_deref(), &dir).map_err(|e| {
                unavailable(format!(
                    "initramfs for function {}: {}",
                    f.name,
                    wire::error_chain(&e)
                ))
            })?;
            initrds.insert(f.name.clone(), path);
        }
        Ok(Self { kernel, initrds })
    }

    /// The initramfs of a function.
    pub fn initrd(&self, function: &str) -> Result<&Path, DriverError> {
        self.initrds
            .get(function)
            .map(PathBuf::as_path)
            .ok_or_else(|| DriverError::Unavailable {
                driver: "vm",
                reason: format!("no initramfs for function {function} (added after start?)"),
            })
    }
}

/// Write (or find, it is content-addressed) the initramfs of function `f` in `dir`.
pub fn write_initramfs(
    f: &FunctionSpec,
    probe: &Path,
    busybox: Option<&Path>,
    dir: &Path,
) -> Result<PathBuf, guest_image::initramfs::InitramfsError> {
    let spec = guest_image::initramfs::Spec {
        probe: probe.to_path_buf(),
        busybox: busybox.map(Path::to_path_buf),
        code_dir: Some(f.code.clone()),
        probe_args: probe_args(f),
    };
    guest_image::initramfs::build_cached(&spec, dir, &f.name)
}

/// The probe's command line inside the guest (stored in the initramfs); the sandbox and
/// host ids come from the kernel command line.
pub fn probe_args(f: &FunctionSpec) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--connect".into(),
        format!("vsock:2:{PROBE_PORT}"),
        "--handler-kind".into(),
        f.kind.as_str().into(),
        "--handler".into(),
        f.handler.clone(),
    ];
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("SANDSCOPE_FUNCTION_NAME".into(), f.name.clone()),
        ("SANDSCOPE_MEMORY_MB".into(), f.memory_mb.to_string()),
    ];
    env.extend(f.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (k, v) in env {
        a.push("--env".into());
        a.push(format!("{k}={v}"));
    }
    a
}

/// The guest kernel command line: console, how to end (reset, which the VMM turns into
/// its exit), and who the guest is.
pub fn guest_cmdline(reboot: &str, sandbox_id: &str, host_id: &str, extra: &[String]) -> String {
    let mut c = format!("console=ttyS0 reboot={reboot} panic=-1 quiet sandscope.id={sandbox_id}");
    if !host_id.is_empty() && !host_id.contains(char::is_whitespace) {
        c.push_str(&format!(" sandscope.host={host_id}"));
    }
    for e in extra {
        c.push(' ');
        c.push_str(e);
    }
    c
}

/// Guest memory for a function, MiB.
pub fn guest_mem_mib(f: &FunctionSpec) -> u64 {
    f.memory_mb.max(MIN_GUEST_MEM_MIB)
}

/// vCPUs for a function: its CPU quota rounded up, at least 1.
pub fn guest_vcpus(f: &FunctionSpec) -> u32 {
    (f.cpus.ceil() as u32).max(1)
}

/// The per-sandbox directory and the listener for the probe's connection.
pub struct VmDir {
    /// The directory (removed on destroy).
    pub dir: PathBuf,
    /// The vsock Unix socket path given to the backend.
    pub uds: PathBuf,
    /// Listening at `<uds>_52`.
    pub listener: tokio::net::UnixListener,
}

impl VmDir {
    /// Create `STATE/sandboxes/ID` and listen for the probe.
    pub fn create(state_dir: &Path, id: &str) -> Result<Self, DriverError> {
        let dir = state_dir.join("sandboxes").join(id);
        let se = |source| DriverError::StateDir {
            path: dir.clone(),
            source,
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(se)?;
        let uds = dir.join("v.sock");
        let port_path = PathBuf::from(format!("{}_{PROBE_PORT}", uds.display()));
        let listener = tokio::net::UnixListener::bind(&port_path).map_err(|source| {
            // Still empty: rmdir needs no open file (bind may have failed for want of one).
            let _ = std::fs::remove_dir(&dir);
            DriverError::Spawn {
                what: format!("listening for the guest probe at {}", port_path.display()),
                source,
            }
        })?;
        Ok(Self { dir, uds, listener })
    }
}

/// Everything a VM driver prepares before starting its processes.
pub struct VmPlan<'a> {
    /// The function's initramfs.
    pub initrd: &'a Path,
    /// Directory, vsock socket path and the probe listener.
    pub dir: VmDir,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Supervision of the processes about to start.
    pub procs: VmProcs,
}

impl<'a> VmPlan<'a> {
    /// Resolve the initramfs, create the directory and listener, size the guest.
    pub fn new(
        images: &'a Images,
        state_dir: &Path,
        spec: &super::SandboxSpec,
    ) -> Result<Self, DriverError> {
        let f = &spec.function;
        let initrd = images.initrd(&f.name)?;
        let dir = VmDir::create(state_dir, &spec.id)?;
        let (mem_mib, vcpus) = (guest_mem_mib(f), guest_vcpus(f));
        let procs = VmProcs::new(
            &spec.id,
            dir.dir.clone(),
            Configured {
                memory_bytes: mem_mib << 20,
                vcpus,
            },
        );
        Ok(Self {
            initrd,
            dir,
            mem_mib,
            vcpus,
            procs,
        })
    }
}

/// One supervised process of a VM (the VMM, a vsock backend).
struct Proc {
    name: &'static str,
    pid: Option<u32>,
    exited: Arc<AtomicBool>,
}

/// The processes of one VM, their console output, and teardown.
pub struct VmProcs {
    procs: Mutex<Vec<Proc>>,
    console: Arc<super::console::Console>,
    main_exited: Arc<AtomicBool>,
    exit_notify: Arc<tokio::sync::Notify>,
    destroyed: AtomicBool,
    dir: PathBuf,
    configured: Configured,
    id: String,
}

impl VmProcs {
    /// Supervision for the VM of sandbox `id`, whose files live in `dir`.
    pub fn new(id: &str, dir: PathBuf, configured: Configured) -> Self {
        Self {
            procs: Mutex::new(Vec::new()),
            console: Arc::new(super::console::Console::new(CONSOLE_LINES)),
            main_exited: Arc::default(),
            exit_notify: Arc::default(),
            destroyed: AtomicBool::new(false),
            dir,
            configured,
            id: id.to_string(),
        }
    }

    /// Start a process; its stdout and stderr lines go to the console ring (prefixed with
    /// `name` unless it is the main process, whose exit ends the VM).
    pub fn spawn(
        &self,
        name: &'static str,
        cmd: &mut tokio::process::Command,
        main: bool,
    ) -> Result<u32, DriverError> {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| DriverError::Spawn {
            what: format!("{name} ({:?})", cmd.as_std().get_program()),
            source,
        })?;
        let pid = child.id();
        let prefix = if main {
            String::new()
        } else {
            format!("[{name}] ")
        };
        super::keep_output(&mut child, &self.console, &self.id, &prefix);
        let exited = Arc::new(AtomicBool::new(false));
        let (ex, main_ex, notify) = (
            exited.clone(),
            self.main_exited.clone(),
            self.exit_notify.clone(),
        );
        tokio::spawn(async move {
            let _ = child.wait().await;
            ex.store(true, Ordering::Release);
            // Only the main process's exit ends the VM (and wakes `wait_exited`).
            if main {
                main_ex.store(true, Ordering::Release);
                notify.notify_waiters();
            }
        });
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Proc { name, pid, exited });
        Ok(pid.unwrap_or(0))
    }

    /// Whether a helper process (not the main one) has exited, and its name.
    pub fn helper_exited(&self) -> Option<&'static str> {
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|p| p.exited.load(Ordering::Acquire))
            .map(|p| p.name)
    }

    /// Pid of the main process.
    pub fn main_pid(&self) -> Option<u32> {
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .and_then(|p| p.pid)
    }

    /// Whether the VM (its main process) has exited.
    pub fn exited(&self) -> bool {
        self.main_exited.load(Ordering::Acquire)
    }

    /// Wait for the main process to exit, at most `limit`; once it has, also for what it
    /// wrote to reach the console (bounded), so a VMM that died at once is explained by
    /// its own last words rather than by an empty console.
    pub fn wait_exited(&self, limit: Duration) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let exited = super::wait_flag(&self.main_exited, &self.exit_notify, limit).await;
            if exited {
                self.console.drained(Duration::from_millis(500)).await;
            }
            exited
        })
    }

    /// The console ring as text.
    pub fn console(&self) -> String {
        self.console.text()
    }

    /// RSS and CPU of all the VM's processes (VMM + helpers), from procfs.
    pub fn usage(&self) -> Usage {
        let procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        let mut u = Usage::default();
        for p in procs.iter().filter(|p| !p.exited.load(Ordering::Acquire)) {
            if let Some(pid) = p.pid {
                u.rss_bytes += crate::procfs::rss_bytes(pid);
                u.cpu_us += crate::procfs::cpu_us_with_children(pid);
                u.processes += 1;
            }
        }
        u
    }

    /// What the guest was given.
    pub fn configured(&self) -> Configured {
        self.configured
    }

    /// End the VM: give it `grace` to stop by itself (the probe resets the guest after a
    /// Shutdown frame), then SIGKILL every process and remove the directory. Idempotent.
    pub async fn destroy(&self, grace: Duration) {
        if self.destroyed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.wait_exited(grace).await;
        let pids: Vec<(u32, Arc<AtomicBool>)> = self
            .procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|p| p.pid.map(|pid| (pid, p.exited.clone())))
            .collect();
        for (pid, exited) in &pids {
            if !exited.load(Ordering::Acquire) {
                // SAFETY: kill(2) on a child we spawned whose wait task has not reaped it
                // yet (exited is false), so the pid is still ours.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        for _ in 0..500 {
            if pids.iter().all(|(_, e)| e.load(Ordering::Acquire)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        super::remove_state_dir(&self.dir).await;
    }
}

/// The handle of a running microVM (both VM drivers).
pub struct VmSandbox {
    /// Its processes.
    pub procs: VmProcs,
    /// Driver name, for errors.
    pub driver: &'static str,
    /// vmm-lite's control socket, which reports the VMM's phases.
    pub vmm_control: Option<PathBuf>,
}

impl SandboxHandle for VmSandbox {
    fn pid(&self) -> Option<u32> {
        self.procs.main_pid()
    }

    fn can_freeze(&self) -> bool {
        false
    }

    fn freeze(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        Box::pin(async move {
            Err(DriverError::Unavailable {
                driver: self.driver,
                reason: "freezing microVM guests is not supported".into(),
            })
        })
    }

    fn thaw(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        Box::pin(async { Ok(Duration::ZERO) })
    }

    fn usage(&self) -> Usage {
        self.procs.usage()
    }

    fn oom_kills(&self) -> u64 {
        0
    }

    fn exited(&self) -> bool {
        self.procs.exited()
    }

    fn wait_exited(&self, limit: Duration) -> BoxFuture<'_, bool> {
        self.procs.wait_exited(limit)
    }

    fn diagnostics(&self) -> String {
        self.procs.console()
    }

    fn vmm_times(&self) -> BoxFuture<'_, Option<VmmTimes>> {
        Box::pin(async move {
            let line = super::vmm_lite::query_metrics(self.vmm_control.as_deref()?).await?;
            super::vmm_lite::parse_vmm_times(&line)
        })
    }

    fn configured(&self) -> Option<Configured> {
        Some(self.procs.configured())
    }

    fn destroy(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.procs.destroy(Duration::from_millis(500)))
    }
}

/// Wait until `path` exists (a helper creating its socket), the helper dies, or `limit`.
pub async fn wait_for_path(path: &Path, procs: &VmProcs, limit: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    while !path.exists() {
        if let Some(name) = procs.helper_exited() {
            return Err(format!("{name} exited before creating {}", path.display()));
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "{} did not appear within {:.1} s",
                path.display(),
                limit.as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// What a VMM reports of one boot (vmm-lite's metrics document; QEMU reports nothing).
/// Phase times are µs since the VMM's `main` started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmTimes {
    /// The VMM's `main` on CLOCK_MONOTONIC, ns (places the phases on the host's clock).
    pub start_monotonic_ns: Option<u64>,
    /// VMM start → first KVM_RUN.
    pub first_kvm_run_us: Option<u64>,
    /// VMM start → the guest's boot-timer write (its init has started).
    pub boot_timer_us: Option<u64>,
}

/// What the guest probe reports of its start, from Hello (guest clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestTimes {
    /// The guest's boot clock when the probe started (the kernel's time to reach init).
    pub uptime_at_init_us: u64,
    /// Probe start → Hello sent.
    pub init_to_hello_us: u64,
    /// Probe start → just before its boot-timer write (the `boot_timer` marker).
    pub boot_timer_marker_us: Option<u64>,
}

impl GuestTimes {
    /// The times in a Hello (the marker is the probe's `boot_timer::MARKER`).
    pub fn of_hello(h: &wire::Hello) -> Self {
        Self {
            uptime_at_init_us: h.uptime_at_init_us,
            init_to_hello_us: h.sent_since_init_ns / 1000,
            boot_timer_marker_us: h
                .markers
                .iter()
                .find(|m| m.name == "boot_timer")
                .map(|m| m.since_init_ns / 1000),
        }
    }
}

/// Where a VM's `kernel` phase came from (the boot report's `kernel_source`), best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// The guest's boot-timer write on the VMM's clock: first KVM_RUN → init start.
    BootTimer,
    /// The VMM's first KVM_RUN, the kernel being what the guest's clock leaves over.
    VmmFirstRun,
    /// The guest's boot clock at init (no VMM report: QEMU).
    GuestUptime,
}

/// The boot phases of a VM, all on the host's timeline, summing to `total_us` (VMM
/// process running → Hello received). `o` is the VMM's `main` relative to "process
/// running" (from `start_monotonic_ns`; 0 when unknown).
///
/// - Boot-timer (vmm-lite with a probe that wrote it): `vmm_setup` = o + first KVM_RUN;
///   `kernel` = first KVM_RUN → init start, where init start = the boot-timer write less
///   the probe's own time before it (its `boot_timer` marker); `probe_init` = init start →
///   Hello received, on the host's clock (so it includes the link's latency).
/// - VMM first run only (vmm-lite, no boot-timer): `probe_init` = init → Hello sent on the
///   guest's clock; `vmm_setup` = o + first KVM_RUN; `kernel` = the rest.
/// - Neither (QEMU): `probe_init` as above; `kernel` = the guest's boot clock at init;
///   `vmm_setup` = the rest (QEMU start-up and loading).
///
/// Each phase is clamped to what the earlier ones leave, so none is negative and the sum
/// is exactly `total_us`, whatever the clocks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmPhases {
    /// VMM start → guest kernel running, µs.
    pub vmm_setup_us: u64,
    /// Kernel → init, µs.
    pub kernel_us: u64,
    /// Init → Hello, µs.
    pub probe_init_us: u64,
    /// Where `kernel_us` came from.
    pub kernel_source: KernelSource,
}

/// Assemble [`VmPhases`]; see there. `vmm_main_us` is "process running" → the VMM's
/// `main` on the host's clock, if known.
pub fn waterfall(
    total_us: u64,
    guest: GuestTimes,
    vmm: VmmTimes,
    vmm_main_us: Option<u64>,
) -> VmPhases {
    let o = vmm_main_us.unwrap_or(0);
    match (vmm.first_kvm_run_us, vmm.boot_timer_us) {
        (Some(run), Some(bt)) if bt >= run => {
            // The probe's time before its write, but init cannot start before the kernel.
            let before_write = guest.boot_timer_marker_us.unwrap_or(0).min(bt - run);
            let vmm_setup_us = o.saturating_add(run).min(total_us);
            let kernel_us = (bt - before_write - run).min(total_us - vmm_setup_us);
            VmPhases {
                vmm_setup_us,
                kernel_us,
                probe_init_us: total_us - vmm_setup_us - kernel_us,
                kernel_source: KernelSource::BootTimer,
            }
        }
        (Some(run), _) => {
            let probe_init_us = guest.init_to_hello_us.min(total_us);
            let rest = total_us - probe_init_us;
            let vmm_setup_us = o.saturating_add(run).min(rest);
            VmPhases {
                vmm_setup_us,
                kernel_us: rest - vmm_setup_us,
                probe_init_us,
                kernel_source: KernelSource::VmmFirstRun,
            }
        }
        (None, _) => {
            let probe_init_us = guest.init_to_hello_us.min(total_us);
            let rest = total_us - probe_init_us;
            let kernel_us = guest.uptime_at_init_us.min(rest);
            VmPhases {
                vmm_setup_us: rest - kernel_us,
                kernel_us,
                probe_init_us,
                kernel_source: KernelSource::GuestUptime,
            }
        }
    }
}

/// "Process running" → the VMM's `main`, µs on the host's clock: `running_at` against the
/// VMM's `start_monotonic_ns` (both CLOCK_MONOTONIC; std's `Instant` is that clock on
/// Linux). `None` if the VMM did not say, 0 if its `main` seems to precede `running_at`.
pub fn vmm_main_after(running_at: Instant, vmm: &VmmTimes) -> Option<u64> {
    let start = vmm.start_monotonic_ns?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return None;
    }
    let now_ns = (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64);
    let running_ns = now_ns.saturating_sub(running_at.elapsed().as_nanos() as u64);
    Some(start.saturating_sub(running_ns) / 1000)
}

/// Host CPU frequency in kHz (`cpu MHz` in /proc/cpuinfo), for `tsc_early_khz=` when the
/// guest is emulated and cannot calibrate its TSC.
pub fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_khz(&text)
}

/// The first `cpu MHz` of cpuinfo text, in kHz.
pub fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != "cpu MHz" {
            return None;
        }
        let mhz: f64 = v.trim().parse().ok()?;
        (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(uptime: u64, to_hello: u64, marker: Option<u64>) -> GuestTimes {
        GuestTimes {
            uptime_at_init_us: uptime,
            init_to_hello_us: to_hello,
            boot_timer_marker_us: marker,
        }
    }

    fn vmm(run: Option<u64>, bt: Option<u64>) -> VmmTimes {
        VmmTimes {
            start_monotonic_ns: Some(1),
            first_kvm_run_us: run,
            boot_timer_us: bt,
        }
    }

    fn sum(w: &VmPhases) -> u64 {
        w.vmm_setup_us + w.kernel_us + w.probe_init_us
    }

    #[test]
    fn waterfall_from_the_boot_timer() {
        // vmm-lite: main 800 µs after "process running", first KVM_RUN 2 ms into main, the
        // boot-timer write 60 ms into main, 150 µs after the probe started; Hello read
        // 100 ms after "process running". The guest's clocks are not used for the split.
        let w = waterfall(
            100_000,
            guest(55_000, 10_000, Some(150)),
            vmm(Some(2_000), Some(60_000)),
            Some(800),
        );
        assert_eq!(
            w,
            VmPhases {
                vmm_setup_us: 2_800,
                kernel_us: 57_850,
                probe_init_us: 39_350,
                kernel_source: KernelSource::BootTimer,
            }
        );
        // Without the probe's marker or the VMM's anchor: the write itself is init start,
        // main is "process running".
        let w = waterfall(
            100_000,
            guest(55_000, 10_000, None),
            vmm(Some(2_000), Some(60_000)),
            None,
        );
        assert_eq!(
            (w.vmm_setup_us, w.kernel_us, w.probe_init_us),
            (2_000, 58_000, 40_000)
        );
        // The probe's time before the write cannot push init start before the kernel ran.
        let w = waterfall(
            100_000,
            guest(0, 0, Some(1_000_000)),
            vmm(Some(2_000), Some(3_000)),
            None,
        );
        assert_eq!((w.vmm_setup_us, w.kernel_us), (2_000, 0));
        assert_eq!(w.kernel_source, KernelSource::BootTimer);
    }

    #[test]
    fn waterfall_fallbacks() {
        // QEMU: no VMM report; the guest says the kernel took 600 ms to reach init,
        // init → Hello 50 ms.
        let w = waterfall(
            900_000,
            guest(600_000, 50_000, None),
            VmmTimes::default(),
            None,
        );
        assert_eq!(
            w,
            VmPhases {
                vmm_setup_us: 250_000,
                kernel_us: 600_000,
                probe_init_us: 50_000,
                kernel_source: KernelSource::GuestUptime,
            }
        );
        // vmm-lite without a boot-timer write (older kernel, the write failed): first
        // KVM_RUN 2 ms after main, main 500 µs after "process running"; the kernel is the rest.
        let w = waterfall(
            100_000,
            guest(80_000, 10_000, None),
            vmm(Some(2_000), None),
            Some(500),
        );
        assert_eq!(
            w,
            VmPhases {
                vmm_setup_us: 2_500,
                kernel_us: 87_500,
                probe_init_us: 10_000,
                kernel_source: KernelSource::VmmFirstRun,
            }
        );
        // A boot-timer before the first KVM_RUN is not believed.
        let w = waterfall(
            100_000,
            guest(80_000, 10_000, Some(5)),
            vmm(Some(2_000), Some(1_000)),
            None,
        );
        assert_eq!(w.kernel_source, KernelSource::VmmFirstRun);
        assert_eq!(
            (w.vmm_setup_us, w.kernel_us, w.probe_init_us),
            (2_000, 88_000, 10_000)
        );
        // A boot-timer without a first KVM_RUN cannot be placed either.
        let w = waterfall(
            100_000,
            guest(80_000, 10_000, None),
            vmm(None, Some(50_000)),
            None,
        );
        assert_eq!(w.kernel_source, KernelSource::GuestUptime);
    }

    #[test]
    fn waterfall_clamps_and_always_sums_to_total() {
        // Clock disagreement never produces a negative or overflowing phase.
        let many = [0, 1, 5, 10, 50, 100, 1_000_000, u64::MAX];
        let opts = [None, Some(0), Some(5), Some(100), Some(u64::MAX)];
        for total in [0, 10, 100_000] {
            for &uptime in &many {
                for &to_hello in &many {
                    for marker in opts {
                        for run in opts {
                            for bt in opts {
                                for main in opts {
                                    let w = waterfall(
                                        total,
                                        guest(uptime, to_hello, marker),
                                        vmm(run, bt),
                                        main,
                                    );
                                    assert_eq!(sum(&w), total, "{w:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
        // Examples of each clamp: the VMM's phases beyond the total.
        let w = waterfall(10, guest(0, 0, None), vmm(Some(100), Some(200)), Some(5));
        assert_eq!((w.vmm_setup_us, w.kernel_us, w.probe_init_us), (10, 0, 0));
        let w = waterfall(10, guest(0, 0, None), vmm(Some(4), Some(200)), None);
        assert_eq!((w.vmm_setup_us, w.kernel_us, w.probe_init_us), (4, 6, 0));
        // The guest's init → Hello beyond the total.
        let w = waterfall(10, guest(1_000_000, 50, None), vmm(Some(5), None), None);
        assert_eq!((w.vmm_setup_us, w.kernel_us, w.probe_init_us), (0, 0, 10));
        let w = waterfall(10, guest(1_000_000, 5, None), VmmTimes::default(), None);
        assert_eq!((w.vmm_setup_us, w.kernel_us, w.probe_init_us), (0, 5, 5));
    }

    #[test]
    fn guest_times_from_hello() {
        let h = wire::Hello {
            uptime_at_init_us: 61_000,
            sent_since_init_ns: 9_000_500,
            markers: vec![
                wire::Marker {
                    name: "init_start".into(),
                    since_init_ns: 0,
                },
                wire::Marker {
                    name: "boot_timer".into(),
                    since_init_ns: 152_999,
                },
                wire::Marker {
                    name: "mounts_done".into(),
                    since_init_ns: 400_000,
                },
            ],
            ..Default::default()
        };
        assert_eq!(GuestTimes::of_hello(&h), guest(61_000, 9_000, Some(152)));
        // A probe whose write failed (or that was not asked) has no such marker.
        let h = wire::Hello {
            markers: vec![wire::Marker {
                name: "boot_timer_failed".into(),
                since_init_ns: 5_000,
            }],
            ..Default::default()
        };
        assert_eq!(GuestTimes::of_hello(&h).boot_timer_marker_us, None);
    }

    #[test]
    fn vmm_main_on_the_host_clock() {
        let running_at = Instant::now();
        let mut t = VmmTimes::default();
        assert_eq!(vmm_main_after(running_at, &t), None);
        // A main that "started" before the process was running counts as 0.
        t.start_monotonic_ns = Some(1);
        assert_eq!(vmm_main_after(running_at, &t), Some(0));
        // A main 3 ms after `running_at` (std's Instant is CLOCK_MONOTONIC on Linux).
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let running_ns = now_ns - running_at.elapsed().as_nanos() as u64;
        t.start_monotonic_ns = Some(running_ns + 3_000_000);
        let got = vmm_main_after(running_at, &t).unwrap();
        assert!((2_990..=3_010).contains(&got), "{got}");
    }

    #[test]
    fn cmdline_and_args() {
        let c = guest_cmdline("t", "hello-1", "abc123", &["tsc_early_khz=2000".into()]);
        assert_eq!(
            c,
            "console=ttyS0 reboot=t panic=-1 quiet sandscope.id=hello-1 sandscope.host=abc123 tsc_early_khz=2000"
        );
        // A host id with spaces cannot go on the command line.
        assert!(!guest_cmdline("k", "x", "a b", &[]).contains("sandscope.host"));
        assert_eq!(
            parse_cpu_khz("processor: 0\ncpu MHz\t\t: 2399.998\n"),
            Some(2_399_998)
        );
        assert_eq!(parse_cpu_khz("nothing"), None);
    }
}
