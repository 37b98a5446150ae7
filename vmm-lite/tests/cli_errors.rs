//! Clear errors: each failure names the problem, exits 1, and never panics.

mod common;

use std::process::Command;

use common::*;

fn vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(VMM)
        .args(args)
        .args(["--serial-out", "none"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "panic: {err}");
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn missing_kernel_is_named() {
    let (code, err) = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read kernel image /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn corrupt_kernel_is_named() {
    let d = scratch();
    let k = d.join("garbage");
    std::fs::write(&k, vec![0x42u8; 8192]).unwrap();
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("corrupt or not a supported format"), "{err}");

    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let (_, err) = vmm(&["--kernel", empty.to_str().unwrap()]);
    assert!(err.contains("the file is empty"), "{err}");
}

#[test]
fn truncated_images_are_corrupt() {
    let d = scratch();
    // An ELF cut in half, and a bzImage with only its setup header.
    let full = elf64(&d, &[]);
    let bytes = std::fs::read(&full).unwrap();
    let cut = d.join("cut.elf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, err) = vmm(&["--kernel", cut.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("corrupt"), "{err}");

    let bz = bzimage(&d);
    let bytes = std::fs::read(&bz).unwrap();
    let cut = d.join("cut.bz");
    std::fs::write(&cut, &bytes[..1024]).unwrap();
    let (code, err) = vmm(&["--kernel", cut.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bzImage is truncated"), "{err}");
    // Cut inside the protected-mode kernel: the header's syssize says how much is missing
    // (this booted into zeroed memory and ended with status 0 before).
    let cut = d.join("cut-payload.bz");
    std::fs::write(&cut, &bytes[..bytes.len() - 16]).unwrap();
    let (code, err) = vmm(&["--kernel", cut.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bzImage is truncated (the header promises"),
        "{err}"
    );
}

#[test]
fn initrd_errors_are_named() {
    let d = scratch();
    let k = bzimage(&d);
    let (code, err) = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/rd",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read initrd /nonexistent/rd"), "{err}");

    let empty = d.join("empty.rd");
    std::fs::write(&empty, b"").unwrap();
    let (_, err) = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        empty.to_str().unwrap(),
    ]);
    assert!(err.contains("is empty"), "{err}");
}

#[test]
fn memory_too_small_for_image() {
    let d = scratch();
    let k = bzimage(&d);
    let rd = d.join("big.rd");
    std::fs::write(&rd, vec![1u8; 3 << 20]).unwrap();
    let (code, err) = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        rd.to_str().unwrap(),
        "--mem-mib",
        "2",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("guest memory too small"), "{err}");
    assert!(err.contains("--mem-mib"), "{err}");
}

#[test]
fn invalid_options_are_named() {
    let (code, err) = vmm(&["--kernel", "k", "--vcpus", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("--vcpus 0"), "{err}");
    let (_, err) = vmm(&["--kernel", "k", "--vsock-cid", "2", "--vsock-uds", "/tmp/x"]);
    assert!(err.contains("--vsock-cid 2"), "{err}");
    let (_, err) = vmm(&["--kernel", "k", "--vsock-cid", "3"]);
    assert!(err.contains("must be given together"), "{err}");
}

#[test]
fn standard_linux_kernel_refused_under_pvm_unless_allowed() {
    if !kvm_available("pvm-refusal") {
        return;
    }
    if vmm_lite::host::kvm_kind() != vmm_lite::host::KvmKind::Pvm {
        eprintln!("SKIPPED: PVM refusal: KVM here is not kvm_pvm");
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["LINUX_BANNER"]);
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("standard guest kernels cannot boot under PVM; use a PVM guest kernel or another driver"),
        "{err}"
    );
    // With --allow-pvm the (tiny, fake-Linux) guest is started and runs.
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--allow-pvm"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn no_dev_kvm_and_no_permission_are_named() {
    // Hide /dev/kvm in a private mount namespace (needs root and unshare(1)).
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {VMM} --kernel /nonexistent --serial-out none"
        ))
        .output();
    match out {
        Ok(o) if o.status.code() == Some(1) => {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("/dev/kvm does not exist"), "{err}");
        }
        other => eprintln!("SKIPPED: no-/dev/kvm case: cannot unshare here: {other:?}"),
    }
    // As an unprivileged user (setpriv), opening /dev/kvm must fail with a permission error,
    // unless /dev/kvm is world-accessible on this host.
    let world = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o006 == 0o006)
        .unwrap_or(true);
    if world {
        eprintln!("SKIPPED: permission case: /dev/kvm is world-accessible or absent");
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            VMM,
            "--kernel",
            "/x",
        ])
        .args(["--serial-out", "none"])
        .output();
    match out {
        Ok(o) if o.status.code() == Some(1) => {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("/dev/kvm: permission denied"), "{err}");
        }
        other => eprintln!("SKIPPED: permission case: cannot setpriv here: {other:?}"),
    }
}
