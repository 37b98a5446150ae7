//! Real KVM by nesting, for tests (see shared/FIELD-NOTES.md "Real KVM by nesting").
//!
//! This project's machines have `kvm_pvm`, under which standard Linux guests cannot run. But
//! QEMU's software emulation (TCG, `-cpu max`) implements AMD SVM with nested paging, so an
//! emulated L1 Linux loads `kvm_amd` and gets a real, hardware-virtualization `/dev/kvm`.
//! This crate boots such an L1 and runs a command in it:
//!
//! - [`l1kernel`] fetches Debian's `linux-image-6.1.0-*-amd64` with `apt-get download` and
//!   keeps its vmlinuz and the modules we load in `~/.cache/sandscope/l1/PACKAGE`;
//! - [`initramfs`] writes L1's initramfs (static busybox, the modules, an `/init` that loads
//!   them, mounts the host's `/` read-only over 9p and chroots into it);
//! - [`run`] boots QEMU with one command, streams the console, returns the exit status, and
//!   on a timeout or crash fails with the last console lines;
//! - [`test_here_or_in_l1`] lets a `#[test]` that needs hardware KVM run its own body inside
//!   L1 (the same test binary, over 9p) when the host cannot.
//!
//! Host files are seen in L1 at the same paths, read-only; a run names the directories it
//! needs writable and gets a fresh tmpfs over each (`/run` and `/tmp` always are).

pub mod initramfs;
pub mod l1kernel;
pub mod run;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use l1kernel::L1Kernel;
pub use run::{Outcome, Run};

/// Errors of the nested harness; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// A tool is missing on the host.
    #[error("{tool} not found: {hint}")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// How to get it.
        hint: &'static str,
    },
    /// Fetching or unpacking the L1 kernel failed.
    #[error("L1 kernel: {0}")]
    Kernel(String),
    /// File I/O.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The L1 run did not report an exit status.
    #[error("{reason}; last console lines:\n{tail}")]
    Run {
        /// Why (timeout, QEMU exited, ...).
        reason: String,
        /// The last lines L1 printed.
        tail: String,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NestedError {
    let what = what.into();
    move |source| NestedError::Io { what, source }
}

/// The QEMU binary used for L1.
pub const QEMU: &str = "qemu-system-x86_64";

/// Finds `prog` on PATH.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// True when this host's `/dev/kvm` is hardware virtualization (kvm_intel / kvm_amd loaded),
/// as in L1; false for `kvm_pvm` or no KVM.
pub fn hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && (Path::new("/sys/module/kvm_amd").exists()
            || Path::new("/sys/module/kvm_intel").exists())
}

/// Set in L1's environment by [`test_here_or_in_l1`].
pub const IN_L1_ENV: &str = "SANDSCOPE_IN_L1";

/// Whether this process runs inside an L1 started by this crate.
pub fn in_l1() -> bool {
    std::env::var_os(IN_L1_ENV).is_some()
}

/// Why nested KVM cannot be used here, if it cannot: QEMU missing, or no L1 kernel cached
/// and none fetchable.
pub fn unavailable() -> Option<String> {
    if which(QEMU).is_none() {
        return Some(format!(
            "{QEMU} not found (scripts/guest-deps installs qemu-system-x86)"
        ));
    }
    if guest_image::find_busybox().is_none() {
        return Some("busybox not found (apt-get install busybox-static)".into());
    }
    match l1kernel::prepare() {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Where a test that needs hardware KVM runs its body.
///
/// Call first thing in such a test, with the test's own name (as libtest prints it, e.g.
/// `boots_bzimage` or `module::boots_bzimage`). Returns `true` when the body should run in
/// this process: the host (or this L1) has hardware KVM. Otherwise it re-runs this same
/// test binary, filtered to exactly this test, inside an L1 VM, streams its output,
/// asserts that exactly one test ran there and passed, and returns `false` (the caller
/// returns). Inside L1 without working KVM it panics. Where nesting is impossible it prints
/// a loud `SKIPPED` line and returns `false`, except under CI (`CI=true`), where it panics:
/// CI prepares nesting (scripts/test), so a skip there would hide a broken setup.
///
/// `mem_mib` sizes L1 (its guests come out of it); `timeout` bounds the whole L1 run.
pub fn test_here_or_in_l1(name: &str, mem_mib: u32, timeout: Duration) -> bool {
    if hardware_kvm() {
        return true;
    }
    let Some(run) = this_binary_in_l1(name, mem_mib, timeout) else {
        return false;
    };
    let out = run
        .args([
            name,
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
            "--color",
            "never",
        ])
        .run()
        .unwrap_or_else(|e| panic!("{name}: the L1 run failed: {e}"));
    assert_eq!(
        out.status,
        0,
        "{name}: failed inside L1 (exit {}); last lines:\n{}",
        out.status,
        out.tail(60)
    );
    assert!(
        out.console.contains("test result: ok. 1 passed"),
        "{name}: L1 did not report exactly one passing test:\n{}",
        out.tail(60)
    );
    false
}

/// Runs every other test of this test binary inside one L1 VM (real KVM), for suites whose
/// tests also run on the host's own KVM (tiny guests under PVM) and must pass on real KVM
/// too. `name` is the calling test, which is skipped in L1. On a host with hardware KVM the
/// suite already runs there, so this does nothing. Returns how many tests passed in L1.
pub fn suite_in_l1(name: &str, mem_mib: u32, timeout: Duration) -> usize {
    if hardware_kvm() {
        eprintln!("{name}: hardware KVM here: the suite runs directly, not nested");
        return 0;
    }
    let Some(run) = this_binary_in_l1(name, mem_mib, timeout) else {
        return 0;
    };
    let out = run
        .args(["--skip", name, "--test-threads", "1", "--color", "never"])
        .run()
        .unwrap_or_else(|e| panic!("{name}: the L1 run failed: {e}"));
    let passed = out
        .console
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. "))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok());
    assert!(
        out.status == 0 && passed.is_some(),
        "{name}: the suite failed inside L1 (exit {}); last lines:\n{}",
        out.status,
        out.tail(80)
    );
    passed.unwrap_or(0)
}

/// A [`Run`] of this test binary in L1 with the test environment passed on, or `None`
/// (after a SKIPPED line) where nesting is impossible outside CI.
fn this_binary_in_l1(name: &str, mem_mib: u32, timeout: Duration) -> Option<Run> {
    if in_l1() {
        panic!(
            "inside L1 but /dev/kvm is not hardware KVM (kvm_amd did not load?): {}",
            std::fs::read_to_string("/proc/modules").unwrap_or_default()
        );
    }
    if let Some(why) = unavailable() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("nested KVM is required under CI but unavailable: {why}");
        }
        eprintln!("SKIPPED: {name}: no hardware KVM here and nested KVM unavailable: {why}");
        return None;
    }
    let exe = std::env::current_exe().expect("current test executable");
    let cwd = std::env::current_dir().expect("current directory");
    let mut run = Run::new(&exe)
        .cwd(&cwd)
        .env(IN_L1_ENV, "1")
        .mem_mib(mem_mib)
        .timeout(timeout);
    // Pass on what tests read from the environment (paths of prepared artifacts, CI).
    for (k, v) in std::env::vars() {
        if k.starts_with("SANDSCOPE_")
            || k.starts_with("VMM_LITE_")
            || k.starts_with("CARGO")
            || k.starts_with("NEXTEST")
            || matches!(
                k.as_str(),
                "HOME" | "PATH" | "CI" | "RUST_BACKTRACE" | "RUST_LOG"
            )
        {
            run = run.env(&k, &v);
        }
    }
    // Scratch space tests create under target/ must be writable in L1.
    if let Some(t) = target_tmpdir() {
        run = run.writable(t);
    }
    eprintln!("== {name}: no hardware KVM here; running inside an L1 VM (nested KVM)");
    Some(run)
}

/// `CARGO_TARGET_TMPDIR` of the running test, derived from its executable's location
/// (`target/<profile>/deps/x` -> `target/tmp`), since this crate is not the test's crate.
fn target_tmpdir() -> Option<PathBuf> {
    if let Some(t) = std::env::var_os("CARGO_TARGET_TMPDIR") {
        return Some(PathBuf::from(t));
    }
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?.parent()?;
    let tmp = target.join("tmp");
    tmp.is_dir().then_some(tmp)
}

/// Single-quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_a_shell() {
        for s in ["plain", "", "a b", "it's", "$(x) `y` \"z\"", "a\nb"] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(s)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }
}
