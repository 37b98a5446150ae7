//! Stopping vmm-lite at any moment: signals from the first instruction of `main`, the
//! control socket's `stop`, and vCPU threads that must be out of KVM_RUN before guest memory
//! is unmapped. Tiny guests under the real /dev/kvm.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Starts the spinning guest (no vsock: guest memory has no other owner than `run`).
fn spawn_spinner(kernel: &Path, metrics: &Path, extra: &[&str]) -> Child {
    let _ = std::fs::remove_file(metrics);
    Command::new(VMM)
        .arg("--kernel")
        .arg(kernel)
        .args(["--serial-out", "none", "--quiet", "--metrics"])
        .arg(metrics)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm-lite")
}

/// Waits until the child is past the kernel's exec and the dynamic loader, i.e. running
/// vmm-lite's own code: the Rust runtime then sets SIGPIPE to ignored (visible in
/// /proc/PID/status), just before `main`. A signal that arrives earlier takes its default
/// action in any program; from here on vmm-lite must survive every control signal.
fn wait_until_past_loader(child: &Child) {
    const SIGPIPE_BIT: u64 = 1 << (libc::SIGPIPE - 1);
    let status = format!("/proc/{}/status", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ignored = std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("SigIgn:"))?;
                u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok()
            })
            .unwrap_or(0);
        if ignored & SIGPIPE_BIT != 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vmm-lite never reached its runtime"
        );
        std::hint::spin_loop();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own, not yet reaped child by pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Waits for the child (60 s at most) and returns (exit code, stderr).
fn finish(child: Child) -> (Option<i32>, String) {
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmm-lite {pid} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read_json(p: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Polls the metrics file until `pred` holds (10 s at most) while the child runs.
fn wait_for_metrics(
    child: &mut Child,
    p: &Path,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("vmm-lite ended early: {st}");
        }
        if let Some(v) = read_json(p) {
            if pred(&v) {
                return v;
            }
        }
        assert!(Instant::now() < deadline, "metrics never matched in {p:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// vmm-lite printed `KVM_RUN failed: Bad address` on SIGTERM: guest memory was unmapped
/// under a vCPU still in KVM_RUN. A SIGTERM at any moment (while parsing its command line,
/// during VM setup, while the guest runs) must end it with 128+15, metrics and no vCPU error.
#[test]
fn sigterm_at_any_moment_exits_143_with_metrics_and_no_vcpu_error() {
    if !kvm_available("sigterm-any-moment") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["SPIN"]);
    let m = d.join("m.json");
    for delay_us in [
        0, 0, 300, 1000, 2000, 3000, 5000, 8000, 12000, 20000, 50000, 100000,
    ] {
        let child = spawn_spinner(&k, &m, &[]);
        wait_until_past_loader(&child);
        std::thread::sleep(Duration::from_micros(delay_us));
        signal(&child, libc::SIGTERM);
        let (code, stderr) = finish(child);
        assert_eq!(
            code,
            Some(128 + libc::SIGTERM),
            "delay {delay_us} us: {stderr}"
        );
        assert!(
            !stderr.contains("KVM_RUN failed"),
            "delay {delay_us} us: {stderr}"
        );
        let doc = read_json(&m).unwrap_or_else(|| panic!("delay {delay_us} us: no metrics"));
        assert_eq!(
            doc["exit"]["reason"], "signal",
            "delay {delay_us} us: {doc}"
        );
        assert_eq!(doc["vcpu_exits"]["error"], 0, "delay {delay_us} us: {doc}");
    }
}

/// SIGUSR1 about 10 ms after spawn ended vmm-lite (exit 138, no metrics): signals were only
/// blocked once `run` created its signalfd. SIGUSR1s from the moment vmm-lite's own code runs
/// (0-10 ms later) must not kill it and are answered with a dump once the event loop runs;
/// the VMM then stops normally on SIGTERM.
#[test]
fn early_sigusr1_does_not_kill_and_is_answered_with_a_dump() {
    if !kvm_available("early-sigusr1") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["SPIN"]);
    let m = d.join("m.json");
    for delay_us in [0, 0, 0, 300, 1000, 2000, 4000, 7000, 10000] {
        let mut child = spawn_spinner(&k, &m, &[]);
        wait_until_past_loader(&child);
        std::thread::sleep(Duration::from_micros(delay_us));
        for _ in 0..3 {
            signal(&child, libc::SIGUSR1);
            std::thread::sleep(Duration::from_micros(300));
        }
        // The pending SIGUSR1 is read from the signalfd: a live dump (no exit yet) appears.
        let live = wait_for_metrics(&mut child, &m, |v| v["version"] == 1);
        assert!(live["exit"].is_null(), "delay {delay_us} us: {live}");
        signal(&child, libc::SIGTERM);
        let (code, stderr) = finish(child);
        assert_eq!(
            code,
            Some(128 + libc::SIGTERM),
            "delay {delay_us} us: {stderr}"
        );
        let fin = read_json(&m).unwrap();
        assert_eq!(
            fin["exit"]["reason"], "signal",
            "delay {delay_us} us: {fin}"
        );
    }
}
