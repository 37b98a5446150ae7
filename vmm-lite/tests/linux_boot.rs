//! Gated: boots a real Linux kernel, which needs hardware KVM (VT-x / AMD-V).
//!
//! Under PVM (this project's build machines) standard kernels die in emulation before init,
//! so the test prints a SKIPPED line and passes; CI runs it with `--no-capture` so the line
//! is visible. With hardware KVM it needs `VMM_LITE_LINUX_KERNEL` (a bzImage or vmlinux with
//! CONFIG_SERIAL_8250_CONSOLE) and checks the kernel banner on serial. Under PVM, if
//! `VMM_LITE_LINUX_KERNEL` is set, it checks that the real kernel is refused with the PVM
//! error before printing the SKIPPED line.

mod common;

use common::*;
use vmm_lite::host::{kvm_kind, KvmKind};

#[test]
fn boots_real_linux_kernel_on_hardware_kvm() {
    let kind = kvm_kind();
    if kind != KvmKind::Hardware {
        if let (KvmKind::Pvm, Some(k)) = (kind, std::env::var_os("VMM_LITE_LINUX_KERNEL")) {
            // What we can check here: the real kernel is recognised and refused clearly.
            let out = std::process::Command::new(VMM)
                .arg("--kernel")
                .arg(&k)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(
                err.contains("standard guest kernels cannot boot under PVM"),
                "{err}"
            );
        }
        eprintln!("SKIPPED: hardware KVM not available ({})", kind.name());
        return;
    }
    let Some(kernel) = std::env::var_os("VMM_LITE_LINUX_KERNEL") else {
        eprintln!("SKIPPED: hardware KVM present but VMM_LITE_LINUX_KERNEL is not set");
        return;
    };
    let d = scratch();
    let k = kernel.to_str().expect("utf-8 kernel path");
    // No init: the kernel panics after mounting nothing, and panic=1 + reboot=k brings it
    // back through the i8042 reset, which ends the VMM with status 0.
    let r = run_vmm(
        &d,
        &["--kernel", k, "--mem-mib", "256", "--cmdline", "panic=1"],
    );
    assert!(r.serial.contains("Linux version"), "serial: {}", r.serial);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr());
    assert!(r.metrics()["phases"]["first_kvm_run_us"].is_f64());
}
