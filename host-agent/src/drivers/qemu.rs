//! The qemu driver: each sandbox is `qemu-system-x86_64 -M microvm` booting the guest
//! kernel with the function's initramfs (the probe is init), plus a `vhost-device-vsock`
//! process as its virtio-vsock backend.
//!
//! QEMU uses KVM where the host has hardware virtualization and TCG (emulation) elsewhere;
//! under TCG the guest cannot calibrate its TSC against microvm's timers, so the command
//! line carries `tsc_early_khz=` with the host's frequency. The guest ends itself with a
//! reset (`reboot=t` + `-no-reboot` makes QEMU exit).

use super::vm::{self, Images, VmDir, VmPlan};
use super::{BoxFuture, Driver, DriverError, KvmKind, LinkSource, SandboxSpec, Spawned};
use crate::config::AgentConfig;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// See the module docs.
pub struct QemuDriver {
    qemu: PathBuf,
    vhost: PathBuf,
    images: Images,
    state_dir: PathBuf,
    accel: Accel,
    tsc_khz: Option<u64>,
}

/// Where scripts/guest-deps installs vhost-device-vsock.
fn vhost_candidates() -> Vec<PathBuf> {
    let tools = guest_image::cache_dir().join("tools");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&tools)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vhost-device-vsock"))
                })
                .map(|p| p.join("bin").join("vhost-device-vsock"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.reverse();
    v
}

impl QemuDriver {
    /// Find QEMU, vhost-device-vsock, the kernel and the probe; write the initramfs images.
    pub fn new(cfg: &AgentConfig, kvm: &KvmKind) -> Result<Self, DriverError> {
        let unavailable = |reason: String| DriverError::Unavailable {
            driver: "qemu",
            reason,
        };
        let qemu = super::find_binary(cfg.vm.qemu.as_deref(), "qemu-system-x86_64", &[])
            .ok_or_else(|| {
                unavailable(format!(
                    "{} not found; install QEMU (Debian qemu-system-x86) with scripts/guest-deps",
                    cfg.vm
                        .qemu
                        .as_deref()
                        .map_or("qemu-system-x86_64".into(), |p| p.display().to_string())
                ))
            })?;
        let vhost = super::find_binary(
            cfg.vm.vhost_device_vsock.as_deref(),
            "vhost-device-vsock",
            &vhost_candidates(),
        )
        .ok_or_else(|| {
            unavailable(format!(
                "{} not found; scripts/guest-deps builds it (cargo install vhost-device-vsock)",
                cfg.vm
                    .vhost_device_vsock
                    .as_deref()
                    .map_or("vhost-device-vsock".into(), |p| p.display().to_string())
            ))
        })?;
        let images = Images::prepare(cfg, "qemu")?;
        let accel = if *kvm == KvmKind::Hardware {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        Ok(Self {
            qemu,
            vhost,
            images,
            state_dir: cfg.state_dir.clone(),
            accel,
            tsc_khz: vm::host_tsc_khz(),
        })
    }
}

/// QEMU's command line for one guest.
#[allow(clippy::too_many_arguments)]
pub fn qemu_args(
    accel: Accel,
    mem_mib: u64,
    vcpus: u32,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    vhost_sock: &Path,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    let accel_s = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    push("-M");
    push(&format!(
        "microvm,accel={accel_s},acpi=off,pit=on,pic=on,rtc=on,isa-serial=on,memory-backend=mem"
    ));
    push("-cpu");
    push(if accel == Accel::Kvm { "host" } else { "max" });
    push("-m");
    push(&format!("{mem_mib}M"));
    push("-smp");
    push(&vcpus.to_string());
    push("-object");
    push(&format!(
        "memory-backend-memfd,id=mem,size={mem_mib}M,share=on"
    ));
    for f in ["-nodefaults", "-no-user-config", "-no-reboot"] {
        push(f);
    }
    push("-display");
    push("none");
    push("-serial");
    push("stdio");
    push("-chardev");
    a.push(OsString::from(format!(
        "socket,id=vsock0,path={}",
        vhost_sock.display()
    )));
    a.push("-device".into());
    a.push("vhost-user-vsock-device,chardev=vsock0".into());
    a.push("-kernel".into());
    a.push(kernel.into());
    a.push("-initrd".into());
    a.push(initrd.into());
    a.push("-append".into());
    a.push(cmdline.into());
    a
}

/// The guest's kernel command line under QEMU: `tsc_early_khz=` when emulated (TCG cannot
/// calibrate the TSC against microvm's timers). No `sandscope.boot_timer=`: QEMU's microvm
/// has no boot-timer device, so the kernel phase comes from the guest's own clock.
pub fn guest_cmdline(accel: Accel, tsc_khz: Option<u64>, id: &str, host_id: &str) -> String {
    let extra: Vec<String> = match (accel, tsc_khz) {
        (Accel::Tcg, Some(k)) => vec![format!("tsc_early_khz={k}")],
        _ => vec![],
    };
    vm::guest_cmdline("t", id, host_id, &extra)
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn describe(&self) -> String {
        format!(
            "QEMU microvm ({}) + vhost-device-vsock, kernel {}",
            match self.accel {
                Accel::Kvm => "KVM",
                Accel::Tcg => "TCG emulation: no hardware KVM here",
            },
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
            let vhost_sock = dir.join("vhost.sock");
            let started = async {
                procs.spawn(
                    "vhost-device-vsock",
                    tokio::process::Command::new(&self.vhost)
                        .arg("--guest-cid")
                        .arg(vm::GUEST_CID.to_string())
                        .arg("--socket")
                        .arg(&vhost_sock)
                        .arg("--uds-path")
                        .arg(&uds),
                    false,
                )?;
                vm::wait_for_path(&vhost_sock, &procs, Duration::from_secs(5))
                    .await
                    .map_err(|reason| DriverError::Unavailable {
                        driver: "qemu",
                        reason: format!("vsock backend: {reason}; output: {}", procs.console()),
                    })?;
                let cmdline = guest_cmdline(self.accel, self.tsc_khz, &spec.id, &spec.host_id);
                let args = qemu_args(
                    self.accel,
                    mem,
                    vcpus,
                    self.images.boot_kernel(),
                    initrd,
                    &cmdline,
                    &vhost_sock,
                );
                procs.spawn(
                    "qemu",
                    tokio::process::Command::new(&self.qemu).args(&args),
                    true,
                )?;
                Ok::<_, DriverError>(())
            };
            if let Err(e) = started.await {
                procs.destroy(Duration::ZERO).await;
                return Err(e);
            }
            Ok(Spawned {
                link: LinkSource::Listening(listener),
                running_at: Instant::now(),
                handle: Box::new(vm::VmSandbox {
                    procs,
                    driver: "qemu",
                    vmm_control: None,
                }),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cmdline_names_no_boot_timer() {
        // QEMU's microvm has no boot-timer device: the probe must not be told of one.
        let c = guest_cmdline(Accel::Tcg, Some(2_000_000), "sb-1", "h1");
        assert_eq!(
            c,
            "console=ttyS0 reboot=t panic=-1 quiet sandscope.id=sb-1 sandscope.host=h1 tsc_early_khz=2000000"
        );
        let c = guest_cmdline(Accel::Kvm, Some(2_000_000), "sb-1", "");
        assert_eq!(c, "console=ttyS0 reboot=t panic=-1 quiet sandscope.id=sb-1");
        assert!(!c.contains("boot_timer"));
    }

    #[test]
    fn command_line() {
        let a = qemu_args(
            Accel::Tcg,
            128,
            1,
            Path::new("/k/bzImage"),
            Path::new("/i.cpio"),
            "console=ttyS0",
            Path::new("/s/vhost.sock"),
        );
        let s: Vec<String> = a.iter().map(|x| x.to_string_lossy().into_owned()).collect();
        let j = s.join(" ");
        assert!(j.starts_with("-M microvm,accel=tcg,"), "{j}");
        assert!(j.contains("-cpu max"), "{j}");
        assert!(
            j.contains("memory-backend-memfd,id=mem,size=128M,share=on"),
            "{j}"
        );
        assert!(j.contains("-no-reboot"), "{j}");
        assert!(
            j.contains("-chardev socket,id=vsock0,path=/s/vhost.sock"),
            "{j}"
        );
        assert!(
            j.contains("-device vhost-user-vsock-device,chardev=vsock0"),
            "{j}"
        );
        assert!(
            j.ends_with("-kernel /k/bzImage -initrd /i.cpio -append console=ttyS0"),
            "{j}"
        );
        let k = qemu_args(
            Accel::Kvm,
            64,
            2,
            Path::new("/k"),
            Path::new("/i"),
            "",
            Path::new("/v"),
        );
        let j = k
            .iter()
            .map(|x| x.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            j.contains("accel=kvm") && j.contains("-cpu host") && j.contains("-smp 2"),
            "{j}"
        );
    }
}
