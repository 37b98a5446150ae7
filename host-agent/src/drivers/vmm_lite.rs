//! The vmm-lite driver: each sandbox is one `vmm-lite` process (our KVM VMM) booting the
//! guest kernel with the function's initramfs, its virtio-vsock device forwarding the
//! probe's connection to `<uds>_52`. Needs hardware KVM.
//!
//! vmm-lite reports its phase timestamps (process start, first KVM_RUN, ...) on its control
//! socket; the driver reads them after Hello for the cold-start waterfall.

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

/// `phases.first_kvm_run_us` of vmm-lite's metrics JSON: VMM start → first KVM_RUN.
pub fn parse_vmm_setup_us(metrics_json: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(metrics_json.trim()).ok()?;
    let us = v.get("phases")?.get("first_kvm_run_us")?.as_f64()?;
    (us.is_finite() && us >= 0.0).then(|| us.round() as u64)
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
            self.images.kernel.bzimage.display()
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
            let cmdline = vm::guest_cmdline("k", &spec.id, &spec.host_id, &[]);
            let args = vmm_args(
                &self.images.kernel.bzimage,
                initrd,
                &cmdline,
                mem,
                vcpus,
                &files,
            );
            if let Err(e) = procs.spawn(
                "vmm-lite",
                tokio::process::Command::new(&self.vmm).args(&args),
                true,
            ) {
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
    fn metrics_parsing() {
        let j = r#"{"version":1,"phases":{"process_start_us":0.0,"memory_ready_us":310.2,
            "kernel_loaded_us":900.0,"first_kvm_run_us":1234.6,"boot_timer_us":null}}"#;
        assert_eq!(parse_vmm_setup_us(j), Some(1235));
        assert_eq!(
            parse_vmm_setup_us(r#"{"phases":{"first_kvm_run_us":null}}"#),
            None
        );
        assert_eq!(parse_vmm_setup_us("garbage"), None);
        assert_eq!(
            parse_vmm_setup_us(r#"{"phases":{"first_kvm_run_us":-5}}"#),
            None
        );
    }
}
