//! The vmm-lite driver: each sandbox is one `vmm-lite` process (our KVM VMM) booting the
//! guest kernel with the function's initramfs, its virtio-vsock device forwarding the
//! probe's connection to `<uds>_52`. Needs hardware KVM.
//!
//! vmm-lite reports its phase timestamps (process start, first KVM_RUN, the guest's
//! boot-timer write, ...) on its control socket; the driver reads them after Hello for the
//! cold-start waterfall. The guest learns where the boot-timer device is from
//! `sandscope.boot_timer=0xd0000000` on its kernel command line (QEMU has no such device
//! and passes no such argument).

use super::vm::{self, Images, VmDir, VmPlan};
use super::{BoxFuture, Driver, DriverError, LinkSource, SandboxSpec, Spawned};
use crate::config::AgentConfig;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// See the module docs.
pub struct VmmLiteDriver {
    vmm: PathBuf,
    images: Images,
    state_dir: PathBuf,
}

impl VmmLiteDriver {
    /// Find vmm-lite, the kernel and the probe; write the initramfs images.
    pub fn new(cfg: &AgentConfig) -> Result<Self, DriverError> {
        let exe_dir: Vec<PathBuf> = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("vmm-lite")))
            .into_iter()
            .chain(["release", "debug"].iter().map(|p| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target")
                    .join(p)
                    .join("vmm-lite")
            }))
            .collect();
        let vmm = super::find_binary(cfg.vm.vmm_lite.as_deref(), "vmm-lite", &exe_dir).ok_or_else(
            || DriverError::Unavailable {
                driver: "vmm-lite",
                reason: "vmm-lite binary not found (cargo build -p vmm-lite --release, or set agent.vmm_lite)".into(),
            },
        )?;
        Ok(Self {
            vmm,
            images: Images::prepare(cfg, "vmm-lite")?,
            state_dir: cfg.state_dir.clone(),
        })
    }
}

/// The files of one VM that vmm-lite is told about.
#[derive(Debug, Clone)]
pub struct VmmFiles {
    /// vsock Unix socket (`<uds>_PORT` for guest connections).
    pub uds: PathBuf,
    /// Control socket (`metrics` / `stop`).
    pub control: PathBuf,
    /// Metrics JSON written on exit.
    pub metrics: PathBuf,
}

/// vmm-lite's command line for one guest.
pub fn vmm_args(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    mem_mib: u64,
    vcpus: u32,
    files: &VmmFiles,
) -> Vec<OsString> {
    vec![
        "--kernel".into(),
        kernel.into(),
        "--initrd".into(),
        initrd.into(),
        "--cmdline".into(),
        cmdline.into(),
        "--mem-mib".into(),
        mem_mib.to_string().into(),
        "--vcpus".into(),
        vcpus.to_string().into(),
        "--vsock-cid".into(),
        vm::GUEST_CID.to_string().into(),
        "--vsock-uds".into(),
        files.uds.clone().into(),
        "--serial-out".into(),
        "stdout".into(),
        "--control-sock".into(),
        files.control.clone().into(),
        "--metrics".into(),
        files.metrics.clone().into(),
        "--quiet".into(),
    ]
}

/// Guest-physical address of vmm-lite's boot-timer device (`vmm-lite/src/devices/
/// boot_timer.rs`, Firecracker's layout), handed to the guest probe on the kernel command
/// line as `sandscope.boot_timer=`.
pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;

/// The kernel command-line argument naming the boot-timer device to the probe.
pub fn boot_timer_arg() -> String {
    format!("sandscope.boot_timer={BOOT_TIMER_ADDR:#x}")
}

/// The guest's kernel command line under vmm-lite: `reboot=k` (vmm-lite exits on the
/// i8042 reset) and the boot-timer device's address, where the probe (init) writes its
/// marker so that the kernel phase ends on vmm-lite's clock.
pub fn guest_cmdline(id: &str, host_id: &str) -> String {
    vm::guest_cmdline("k", id, host_id, &[boot_timer_arg()])
}

/// The boot's timestamps in vmm-lite's metrics JSON (`start_monotonic_ns`, and
/// Starts vmm-lite with SIGUSR1, SIGTERM and SIGINT blocked. The mask survives `exec`, and
/// vmm-lite reads these from a signalfd, so one sent while its dynamic loader still runs
/// (milliseconds, tens of them on a slow disk) is handled instead of killing it without
/// metrics (vmm-lite/README.md, "Signals").
fn start_with_control_signals_blocked(cmd: &mut tokio::process::Command) {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; these calls only modify it.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: runs in the child between fork and exec; pthread_sigmask is async-signal-safe
    // and `set` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                rc => Err(std::io::Error::from_raw_os_error(rc)),
            }
        });
    }
}

/// `phases.first_kvm_run_us` / `phases.boot_timer_us`, µs since its `main`; null until
/// they happen). `None` if the document is not one; each field is `None` if absent, null,
/// negative or not a number.
pub fn parse_vmm_times(metrics_json: &str) -> Option<vm::VmmTimes> {
    let v: serde_json::Value = serde_json::from_str(metrics_json.trim()).ok()?;
    let phases = v.get("phases")?;
    let us = |name: &str| {
        let us = phases.get(name)?.as_f64()?;
        (us.is_finite() && us >= 0.0).then(|| us.round() as u64)
    };
    Some(vm::VmmTimes {
        start_monotonic_ns: v.get("start_monotonic_ns").and_then(|n| n.as_u64()),
        first_kvm_run_us: us("first_kvm_run_us"),
        boot_timer_us: us("boot_timer_us"),
    })
}

/// Ask vmm-lite's control socket for its metrics line.
pub async fn query_metrics(control: &Path) -> Option<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(control).await.ok()?;
        s.write_all(b"metrics\n").await.ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await.ok()?;
        Some(line)
    };
    tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .ok()
        .flatten()
}

impl Driver for VmmLiteDriver {
    fn name(&self) -> &'static str {
        "vmm-lite"
    }

    fn describe(&self) -> String {
        format!(
            "vmm-lite KVM microVM ({}), kernel {}",
            self.vmm.display(),
            self.images.boot_kernel().display()
        )
    }

    fn spawn<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Spawned, DriverError>> {
        Box::pin(async move {
            let VmPlan {
                initrd,
                dir: VmDir { dir, uds, listener },
                mem_mib: mem,
                vcpus,
                procs,
            } = VmPlan::new(&self.images, &self.state_dir, spec)?;
            let files = VmmFiles {
                uds,
                control: dir.join("control.sock"),
                metrics: dir.join("metrics.json"),
            };
            let cmdline = guest_cmdline(&spec.id, &spec.host_id);
            let args = vmm_args(
                self.images.boot_kernel(),
                initrd,
                &cmdline,
                mem,
                vcpus,
                &files,
            );
            let mut cmd = tokio::process::Command::new(&self.vmm);
            cmd.args(&args);
            start_with_control_signals_blocked(&mut cmd);
            if let Err(e) = procs.spawn("vmm-lite", &mut cmd, true) {
                procs.destroy(Duration::ZERO).await;
                return Err(e);
            }
            Ok(Spawned {
                link: LinkSource::Listening(listener),
                running_at: Instant::now(),
                handle: Box::new(vm::VmSandbox {
                    procs,
                    driver: "vmm-lite",
                    vmm_control: Some(files.control),
                }),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_names_every_file() {
        let files = VmmFiles {
            uds: "/s/v.sock".into(),
            control: "/s/control.sock".into(),
            metrics: "/s/metrics.json".into(),
        };
        let a = vmm_args(
            Path::new("/k"),
            Path::new("/i"),
            "quiet sandscope.id=x",
            128,
            2,
            &files,
        );
        let j = a
            .iter()
            .map(|x| x.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            j,
            "--kernel /k --initrd /i --cmdline quiet sandscope.id=x --mem-mib 128 --vcpus 2 \
             --vsock-cid 3 --vsock-uds /s/v.sock --serial-out stdout \
             --control-sock /s/control.sock --metrics /s/metrics.json --quiet"
        );
        // The arguments parse with vmm-lite's own CLI: `--cmdline` takes one value.
        let i = a.iter().position(|x| x == "--cmdline").unwrap();
        assert_eq!(a[i + 1], "quiet sandscope.id=x");
    }

    #[test]
    fn guest_cmdline_names_the_boot_timer() {
        let c = guest_cmdline("sb-1", "h1");
        assert_eq!(
            c,
            "console=ttyS0 reboot=k panic=-1 quiet sandscope.id=sb-1 sandscope.host=h1 \
             sandscope.boot_timer=0xd0000000"
        );
        // The probe reads the address back exactly.
        let v = c
            .split_whitespace()
            .find_map(|w| w.strip_prefix("sandscope.boot_timer="))
            .unwrap();
        assert_eq!(
            u64::from_str_radix(v.trim_start_matches("0x"), 16),
            Ok(BOOT_TIMER_ADDR)
        );
    }

    /// A live `metrics` answer as vmm-lite writes it (vmm-lite/README.md "Metrics"; no
    /// `memory`, `exit` null), the guest past its boot-timer write.
    const LIVE: &str = r#"{"version":1,"start_monotonic_ns":834550203400,"uptime_us":48211.5,"phases":{"process_start_us":0.0,"memory_ready_us":727.1,"kernel_loaded_us":781.0,"first_kvm_run_us":1475.2,"boot_timer_us":31719.4,"guest_stop_us":null},"exit":null,"vcpu_exits":{"io_in":12,"io_out":940,"mmio_read":31,"mmio_write":58,"hlt":3,"shutdown":0,"error":0,"intr":7,"other":0},"serial":{"tx_bytes":930,"rx_bytes":0},"vsock":{"tx_packets":3,"tx_bytes":612,"rx_packets":2,"rx_bytes":40,"conns_opened":1,"conns_closed":0,"rst_sent":0,"malformed":0,"host_errors":0},"guest_errors":{"bad_io":0,"bad_mmio_reg":0}}"#;

    #[test]
    fn metrics_parsing() {
        assert_eq!(
            parse_vmm_times(&format!("{LIVE}\n")),
            Some(vm::VmmTimes {
                start_monotonic_ns: Some(834_550_203_400),
                first_kvm_run_us: Some(1475),
                boot_timer_us: Some(31_719),
            })
        );
        // A guest that never wrote the marker (older kernel, no /dev/mem, QEMU-style image).
        let no_bt = LIVE.replace(r#""boot_timer_us":31719.4"#, r#""boot_timer_us":null"#);
        let t = parse_vmm_times(&no_bt).unwrap();
        assert_eq!((t.first_kvm_run_us, t.boot_timer_us), (Some(1475), None));
        // An older vmm-lite without the field at all, or without start_monotonic_ns.
        let t = parse_vmm_times(
            r#"{"version":1,"phases":{"process_start_us":0.0,"first_kvm_run_us":1234.6}}"#,
        )
        .unwrap();
        assert_eq!(
            t,
            vm::VmmTimes {
                start_monotonic_ns: None,
                first_kvm_run_us: Some(1235),
                boot_timer_us: None,
            }
        );
        // Before the first KVM_RUN everything is null.
        assert_eq!(
            parse_vmm_times(r#"{"phases":{"first_kvm_run_us":null,"boot_timer_us":null}}"#),
            Some(vm::VmmTimes::default())
        );
        // Nonsense values are dropped field by field; a non-document is None.
        let t = parse_vmm_times(
            r#"{"start_monotonic_ns":-1,"phases":{"first_kvm_run_us":-5,"boot_timer_us":"12"}}"#,
        )
        .unwrap();
        assert_eq!(t, vm::VmmTimes::default());
        assert_eq!(parse_vmm_times("garbage"), None);
        assert_eq!(parse_vmm_times(""), None);
        assert_eq!(parse_vmm_times(r#"{"version":1}"#), None);
        assert_eq!(
            parse_vmm_times(r#"{"phases":1}"#).map(|t| t.first_kvm_run_us),
            Some(None)
        );
    }
}
