//! The probe as the agent's process driver runs it: namespaces unshared before exec,
//! `--fork-init --root-dir DIR --code-dir CODE`. Needs root.

mod common;

use common::{spawn, status};
use std::time::Duration;
use wire::InvokeStatus;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

const NS: i32 = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID;

#[test]
fn fork_init_builds_the_sandbox_root() {
    if !is_root() {
        eprintln!("SKIPPED: fork_init_builds_the_sandbox_root needs root (namespaces, mounts)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let code = tempfile::tempdir().unwrap();
    std::fs::write(code.path().join("hello.txt"), "hello from code").unwrap();
    let marker = format!("sandscope-probe-test-{}", std::process::id());
    let handler = format!(
        "cat /var/task/hello.txt; echo; \
         (echo x > /var/task/w) 2>/dev/null && echo task:rw || echo task:ro; \
         echo hi > /tmp/{marker} && echo tmp:ok; ls -A /tmp | tr '\\n' ' '; echo; \
         tr '\\0' ' ' < /proc/1/cmdline; echo; \
         echo pid:$$; pwd; cat /proc/sys/kernel/hostname; \
         ls /dev/null /dev/urandom >/dev/null && echo dev:ok; \
         ls /proc | grep -c '^[0-9]'"
    );
    let args = [
        "--fork-init",
        "--root-dir",
        root.path().to_str().unwrap(),
        "--code-dir",
        code.path().to_str().unwrap(),
        "--handler",
        &handler,
    ];
    let mut p = spawn(&args, NS);
    let h = p.handshake();
    assert_eq!(h.hostname, "sb-test");
    assert_eq!(h.probe_pid, 1);
    let names: Vec<&str> = h.markers.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["init_start", "mounts_done", "procinfo_read", "connected"]
    );
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(h.boot_id, boot_id.trim());

    let (logs, r) = p.invoke("ns", b"", 10_000);
    assert_eq!(status(&r), InvokeStatus::Ok, "{r:?} logs {logs:?}");
    let out = String::from_utf8(r.payload).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello from code", "{out}");
    assert_eq!(lines[1], "task:ro", "{out}");
    assert_eq!(lines[2], "tmp:ok", "{out}");
    assert_eq!(lines[3].trim(), marker, "/tmp is not private: {out}");
    assert!(
        lines[4].contains("guest-probe"),
        "pid 1 is not the probe: {out}"
    );
    let pid: u32 = lines[5].strip_prefix("pid:").unwrap().parse().unwrap();
    assert!(
        pid < 100,
        "handler pid {pid} is not in a fresh pid namespace: {out}"
    );
    assert_eq!(lines[6], "/var/task", "{out}");
    assert_eq!(lines[7], "sb-test", "{out}");
    assert_eq!(lines[8], "dev:ok", "{out}");
    let nprocs: u32 = lines[9].parse().unwrap();
    assert!(nprocs < 10, "{nprocs} processes visible: {out}");
    assert!(
        !std::path::Path::new("/tmp").join(&marker).exists(),
        "sandbox /tmp leaked"
    );
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "root dir leaked"
    );

    // The watcher (our child) exits with the probe.
    p.send(wire::Shutdown {
        reason: "test".into(),
        grace_ms: 100,
    });
    let st = p.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(0));
}

#[test]
fn fork_init_watcher_reports_probe_failure() {
    if !is_root() {
        eprintln!("SKIPPED: fork_init_watcher_reports_probe_failure needs root");
        return;
    }
    let code = tempfile::tempdir().unwrap();
    let args = [
        "--fork-init",
        "--root-dir",
        "/nonexistent/sandscope-root",
        "--code-dir",
        code.path().to_str().unwrap(),
        "--handler",
        "cat",
    ];
    let mut p = spawn(&args, NS);
    let st = p.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(1));
}
