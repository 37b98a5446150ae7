//! The SSH endpoint end to end with the real OpenSSH client (Debian openssh-client):
//! a real agent on the process driver, real namespace sandboxes, `ssh` as users run it.

mod common;

use common::ssh::{fingerprint, have_ssh, keygen, PtyClient, SshClient};
use common::{func, start_more, TestAgent};
use std::process::Stdio;
use std::time::{Duration, Instant};

const SLEEPER: &str = "cat >/dev/null; echo '{}'";

struct Ssh {
    a: TestAgent,
    c: SshClient,
}

impl std::ops::Deref for Ssh {
    type Target = SshClient;
    fn deref(&self) -> &SshClient {
        &self.c
    }
}

/// An agent (process driver, one function) with the SSH endpoint served.
async fn agent_with_ssh(max_session_s: u32) -> Ssh {
    let a = start_more(
        &[func(
            "hello",
            SLEEPER,
            "[functions.pool]\nkeep_alive_s = 1.5",
        )],
        "",
        &format!("\n[ssh]\nmax_session_s = {max_session_s}\n"),
    )
    .await;
    let c = SshClient::serve(&a.agent).await;
    Ssh { a, c }
}

impl Ssh {
    async fn live_sandbox(&self) -> String {
        let r = self.a.invoke("hello", "{}").await;
        assert_eq!(r.status, 200, "{r:?}");
        r.sandbox
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_returns_stdout_stderr_and_exit_status_and_sees_the_sandbox() {
    if !common::can_run() || !have_ssh() {
        return;
    }
    let s = agent_with_ssh(3600).await;
    let mut logs = s.a.agent.subscribe_logs();
    let sb = s.live_sandbox().await;

    let (code, out, err) = s.exec(&sb, "echo to-out; echo to-err >&2; exit 3").await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (3, "to-out\n", "to-err\n")
    );

    // Inside is the sandbox: its hostname, the probe as PID 1 of its own pid namespace,
    // its code at /var/task, its own boot-time view of /proc.
    let (code, out, err) = s
        .exec(
            &sb,
            "hostname; tr '\\0' ' ' </proc/1/cmdline; echo; cat /var/task/data.txt; \
             grep -c . /proc/meminfo; ls /proc | grep -cE '^[0-9]+$'",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], sb, "hostname inside must be the sandbox id");
    assert!(lines[1].contains("guest-probe"), "{out}");
    assert_eq!(lines[2], "code-dir-marker");
    assert!(lines[3].parse::<u32>().unwrap() > 10, "{out}");
    let procs: u32 = lines[4].parse().unwrap();
    assert!(
        procs < 20,
        "only the sandbox's processes are visible, got {procs}"
    );

    // By function name: attaches to the live sandbox and says which on stderr.
    let (code, out, err) = s.exec("hello", "hostname").await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), sb);
    assert!(
        err.contains(&format!(
            "attached to sandbox {sb} of function hello (live)"
        )),
        "{err}"
    );

    // The audit trail: each session with who, where, how it ended and bytes.
    let v = s.a.get("/v1/sessions").await;
    let recent = v["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 3, "{v}");
    let first = &recent[0];
    assert_eq!(first["sandbox"], sb.as_str());
    assert_eq!(first["function"], "hello");
    assert_eq!(first["kind"], "exec");
    assert_eq!(first["who"], fingerprint(&s.key).as_str());
    assert_eq!(first["end"]["code"], 3);
    assert_eq!(first["bytes_out"], 14, "`to-out\\n` + `to-err\\n`: {first}");
    assert_eq!(first["picked"], "named");
    assert_eq!(recent[2]["picked"], "live");
    assert!(v["open"].as_array().unwrap().is_empty());
    let mut audit = Vec::new();
    while let Ok(l) = logs.try_recv() {
        if l.line.starts_with("SHELL_SESSION ") {
            audit.push(l);
        }
    }
    assert_eq!(audit.len(), 3, "one platform audit line per session");
    assert_eq!(audit[0].stream, "platform");
    assert!(
        audit[0].line.contains(&format!("sandbox={sb}"))
            && audit[0].line.contains("exit=3")
            && audit[0]
                .line
                .contains(&format!("who={}", fingerprint(&s.key))),
        "{}",
        audit[0].line
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_shell_keeps_state_follows_window_changes_and_ctrl_c_interrupts() {
    if !common::can_run() || !have_ssh() {
        return;
    }
    let s = agent_with_ssh(3600).await;
    let sb = s.live_sandbox().await;
    let mut cmd = s.cmd(&s.key, &sb);
    cmd.arg("-tt").env("TERM", "xterm-256color");
    let c = PtyClient::spawn(cmd, 30, 100);
    // A login shell's prompt, then commands whose state persists.
    let mut at = c.expect(0, "# ").await;
    c.send("cd /tmp\n");
    at = c.expect(at, "# ").await;
    c.send("echo cwd=$(pwd) term=$TERM tty=$(tty)\n");
    at = c
        .expect(at, "cwd=/tmp term=xterm-256color tty=/dev/pts/")
        .await;
    c.send("stty size\n");
    at = c.expect(at, "30 100").await;
    c.resize(40, 120);
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send("stty size\n");
    at = c.expect(at, "40 120").await;

    // While the shell is open the sandbox is pinned: not reaped past its keep-alive.
    let v = s.a.get("/v1/sessions").await;
    assert_eq!(v["open"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["open"][0]["pty"], true);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let live = s.a.sandbox(&sb).await.expect("pinned sandbox was reaped");
    assert_eq!(live["shells"], 1);

    // Ctrl-C reaches the foreground job through the remote terminal.
    c.send("sleep 30; echo not-interrupted\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    c.send("\x03");
    at = c.expect(at, "^C").await;
    c.send("echo back-$((20+22))\n");
    at = c.expect(at, "back-42").await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(!c.text().contains("\nnot-interrupted"), "{}", c.text());
    let _ = at;
    c.send("exit 5\n");
    assert_eq!(c.wait().await, 5);

    // Closed: audited, unpinned, and reaped after its keep-alive.
    let v = s.a.get("/v1/sessions").await;
    assert!(v["open"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["recent"][0]["kind"], "shell");
    assert_eq!(v["recent"][0]["end"]["code"], 5);
    let t0 = Instant::now();
    while s.a.sandbox(&sb).await.is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "unpinned sandbox should be reaped after keep-alive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_and_unknown_targets_are_refused_clearly() {
    if !common::can_run() || !have_ssh() {
        return;
    }
    let s = agent_with_ssh(3600).await;
    let stranger = keygen(s.dir.path(), "id_stranger");
    let mut c = s.cmd(&stranger, "hello");
    c.arg("true").stdin(Stdio::null());
    let out = c.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(255),
        "a key not in authorized_keys must be refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied (publickey)"), "{err}");

    let (code, _, err) = s.exec("no-such-thing", "true").await;
    assert_eq!(code, 255);
    assert!(
        err.contains("no live sandbox or function named `no-such-thing`")
            && err.contains("functions: hello"),
        "{err}"
    );

    // By function name with nothing live: a sandbox is started for the session.
    let (code, out, err) = s.exec("hello", "hostname").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("hello-"), "{out}");
    assert!(err.contains("(started for this session)"), "{err}");

    // The authorized_keys file is re-read at each login: removing it locks everyone out,
    // and the agent keeps serving invocations.
    std::fs::remove_file(s.dir.path().join("authorized_keys")).unwrap();
    let mut c = s.cmd(&s.key, "hello");
    c.arg("true").stdin(Stdio::null());
    assert_eq!(c.output().unwrap().status.code(), Some(255));
    assert_eq!(s.a.invoke("hello", "{}").await.status, 200);
}

/// The host pid of a sandbox's probe (the init of its pid namespace).
fn probe_pid(sandbox: &str) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("guest-probe") && cmd.contains(sandbox) {
            return pid;
        }
    }
    panic!("no probe process for {sandbox}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_dying_mid_session_ends_it_with_a_message_and_the_agent_keeps_serving() {
    if !common::can_run() || !have_ssh() {
        return;
    }
    let s = agent_with_ssh(3600).await;
    let sb = s.live_sandbox().await;
    let mut c = s.cmd(&s.key, &sb);
    c.arg("echo started; sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let t0 = Instant::now();
    while s.a.get("/v1/sessions").await["open"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: kill(2) on a pid we just found; no memory involved.
    unsafe { libc::kill(probe_pid(&sb), libc::SIGKILL) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
    assert!(err.contains(&format!("sandbox {sb} ended")), "{err}");
    let v = s.a.get("/v1/sessions").await;
    assert!(v["recent"][0]["end"]["error"]
        .as_str()
        .unwrap()
        .contains("ended"));
    // Everything else keeps working: a new invocation starts a new sandbox.
    let r = s.a.invoke("hello", "{}").await;
    assert_eq!(r.status, 200);
    assert_ne!(r.sandbox, sb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_at_the_max_lifetime() {
    if !common::can_run() || !have_ssh() {
        return;
    }
    let s = agent_with_ssh(1).await;
    let sb = s.live_sandbox().await;
    let t0 = Instant::now();
    let (code, out, err) = s.exec(&sb, "echo up; sleep 30").await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(code, 255);
    assert_eq!(out, "up\n");
    assert!(err.contains("max shell lifetime of 1 s"), "{err}");
    // The sandbox keeps serving shells and invocations.
    let (code, out, _) = s.exec(&sb, "echo again").await;
    assert_eq!((code, out.as_str()), (0, "again\n"));
    assert_eq!(s.a.invoke("hello", "{}").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_sandbox_is_thawed_for_a_shell_and_stays_thawed_while_it_is_open() {
    if !common::can_run() || !have_ssh() {
        return;
    }
    let a = start_more(
        &[func(
            "cool",
            SLEEPER,
            "[functions.pool]\nfreeze_idle = true\nkeep_alive_s = 60",
        )],
        "",
        "",
    )
    .await;
    let c = SshClient::serve(&a.agent).await;
    let state = |v: Option<serde_json::Value>| v.map(|v| v["state"].as_str().unwrap().to_string());
    let sb = a.invoke("cool", "{}").await.sandbox;
    let t0 = Instant::now();
    while state(a.sandbox(&sb).await).as_deref() != Some("frozen") {
        assert!(t0.elapsed() < Duration::from_secs(10), "never frozen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cmd = c.cmd(&c.key, &sb);
    cmd.arg("echo in; sleep 1.5; echo out")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let child = cmd.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = a.sandbox(&sb).await.unwrap();
    assert_eq!(during["state"], "idle", "{during}");
    assert_eq!(during["shells"], 1, "{during}");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in\nout\n");
    // Once the shell is gone the sandbox freezes again after its next invocation.
    assert_eq!(a.invoke("cool", "{}").await.sandbox, sb);
    let t0 = Instant::now();
    while state(a.sandbox(&sb).await).as_deref() != Some("frozen") {
        assert!(t0.elapsed() < Duration::from_secs(10), "not frozen again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
