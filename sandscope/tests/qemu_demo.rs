//! `sandscope demo --driver qemu`: the demo on real Linux microVMs (TCG here). Needs
//! scripts/guest-deps and `sandscope image build` (scripts/test runs both); without them it
//! says SKIPPED, except under CI (or SANDSCOPE_REQUIRE_VM=1), where that is a failure.

use std::process::Command;

fn ready() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: sandbox tests need root");
        return false;
    }
    let kernel = guest_image::kernel::cached(&guest_image::cache_dir())
        .ok()
        .flatten()
        .is_some();
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if kernel && qemu {
        return true;
    }
    let why =
        format!("demo --driver qemu needs QEMU ({qemu}) and the cached guest kernel ({kernel})");
    if std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("SANDSCOPE_REQUIRE_VM").as_deref() == Ok("1")
    {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

#[test]
fn demo_runs_on_qemu_microvms() {
    if !ready() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sandscope"))
        .args([
            "demo", "--driver", "qemu", "--json", "--warm", "10", "--burst", "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["driver"], "qemu", "{v}");
    assert!(
        v["driver_reason"]
            .as_str()
            .unwrap()
            .contains("QEMU microvm"),
        "{v}"
    );
    let p = &v["probe"]["probe"];
    assert_eq!(p["hostname"], v["probe"]["id"], "{v}");
    assert_eq!(p["probe_pid"], 1, "{v}");
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(
        p["boot_id"],
        host_boot.trim(),
        "a guest kernel of its own: {v}"
    );
    for f in v["functions"].as_array().unwrap() {
        assert_eq!(f["errors"], 0, "{f}");
        for phase in ["spawn", "vmm_setup", "kernel", "probe_init"] {
            assert!(
                f["phases"][phase]["count"].as_u64().unwrap() >= 1,
                "{phase} missing: {f}"
            );
        }
    }
    assert!(
        v["workload"]["failures"].as_array().unwrap().is_empty(),
        "{v}"
    );
}

#[test]
fn image_build_reuses_the_cached_kernel_and_writes_each_initramfs() {
    if !ready() {
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandscope"))
        .args(["image", "build", "--json", "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kernel"]["cached"], true, "{v}");
    assert!(std::path::Path::new(v["kernel"]["bzimage"].as_str().unwrap()).is_file());
    let images = v["initramfs"].as_array().unwrap();
    let names: Vec<&str> = images
        .iter()
        .map(|i| i["function"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "echo"], "{v}");
    for i in images {
        let p = std::path::Path::new(i["path"].as_str().unwrap());
        assert!(p.starts_with(out_dir.path()), "{v}");
        let bytes = std::fs::read(p).unwrap();
        assert_eq!(bytes.len() as u64, i["bytes"].as_u64().unwrap());
        let entries = guest_image::cpio::read(&bytes).unwrap();
        assert!(entries.iter().any(|e| e.name == "init"), "no /init");
        assert!(
            entries.iter().any(|e| e.name == "var/task/handler.sh"),
            "no code"
        );
    }
    // A junk kernel is refused with the reason.
    let junk = out_dir.path().join("junk");
    std::fs::write(&junk, "junk").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandscope"))
        .args(["image", "build", "--kernel"])
        .arg(&junk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("neither a bzImage"), "{e}");
}
