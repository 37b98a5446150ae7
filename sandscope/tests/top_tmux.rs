//! `sandscope top` end to end in tmux against a real agent with real sandboxes:
//! the function, cold/warm counts and sandbox ids show; keys switch views; killing the
//! agent shows "disconnected" and a new agent on the same port is picked up; `q` exits
//! with the terminal restored.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sandscope"))
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let r = unsafe { libc::geteuid() } == 0;
    if !r {
        eprintln!("SKIPPED: sandbox tests need root");
    }
    r
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SIGTERM by pid (never by name) so the agent ends its sandboxes.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(port: u16, state: &std::path::Path) -> AgentProc {
    let mut child = bin()
        .args([
            "agent",
            "--http",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
        ])
        .arg(state)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let agent = AgentProc(child);
    let mut lines = BufReader::new(stderr).lines();
    for l in lines.by_ref() {
        if l.unwrap().contains("listening on") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    agent
}

/// A private tmux server, killed (on its own socket only) on drop.
struct Tmux(String);

impl Tmux {
    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn capture(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "top"])
    }
    fn keys(&self, k: &str) {
        self.cmd(&["send-keys", "-t", "top", k]);
    }
    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.capture();
            if f(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .status();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn top_in_tmux_shows_live_agent_survives_restart_and_quits_cleanly() {
    if !root() {
        return;
    }
    assert!(
        Command::new("tmux").arg("-V").output().is_ok(),
        "tmux is missing (scripts/test installs it)"
    );
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let agent = start_agent(port, state.path());
    for _ in 0..3 {
        let ok = bin()
            .args(["invoke", "hello", "--agent", &url])
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
    }
    let out = bin()
        .args(["sandboxes", "--json", "--agent", &url])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<String> = v["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.is_empty());

    let tmux = Tmux(format!("sandscope-top-{}", std::process::id()));
    let log = state.path().join("top.log");
    let cmd = format!(
        "{} top --agent {url} --log-file {}; echo TOP-EXITED $?; \
         stty -a | tr ' ;' '\\n\\n' | grep -x -- '-\\?icanon'; sleep 60",
        env!("CARGO_BIN_EXE_sandscope"),
        log.display()
    );
    tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "80",
        "-y",
        "24",
        "sh",
        "-c",
        &cmd,
    ]);

    // Latency view: hello with 3 invocations, 1 cold, warm and cold columns.
    let s = tmux.wait_for("hello with 3 invocations", |s| {
        s.lines().any(|l| {
            let w: Vec<&str> = l.trim_matches('│').split_whitespace().collect();
            w.len() >= 3 && w[0] == "hello" && w[1] == "3" && w[2] == "1"
        })
    });
    assert!(s.contains("connected"), "{s}");
    assert!(s.contains("warm n=2") && s.contains("cold n=1"), "{s}");

    // Waterfall.
    tmux.keys("2");
    tmux.wait_for("waterfall", |s| {
        s.contains("Cold-start phases: hello") && s.contains("spawn")
    });
    // Hosts: the sandbox ids we created.
    tmux.keys("3");
    let s = tmux.wait_for("sandbox table", |s| s.contains("Sandboxes ("));
    for id in &ids {
        assert!(s.contains(id.as_str()), "{id} missing:\n{s}");
    }
    assert!(s.contains("(local)"), "{s}");
    // Sandbox detail with the probe's report.
    tmux.keys("Enter");
    tmux.wait_for("sandbox detail", |s| {
        s.contains("boot_id") && s.contains("kernel")
    });
    // Help.
    tmux.keys("?");
    tmux.wait_for("help", |s| s.contains("toggle this help"));
    tmux.keys("Escape");
    tmux.keys("1");

    // Agent killed: disconnected; a new agent on the same port: connected again.
    drop(agent);
    tmux.wait_for("disconnected", |s| s.contains("disconnected"));
    let _agent2 = start_agent(port, state.path());
    tmux.wait_for("reconnected", |s| {
        s.contains(" connected") && !s.contains("disconnected")
    });

    tmux.keys("q");
    // Wait for the shell's `stty` report too, not just the exit line (it prints after).
    let s = tmux.wait_for("exit and stty report", |s| {
        s.contains("TOP-EXITED") && s.lines().any(|l| matches!(l.trim(), "icanon" | "-icanon"))
    });
    assert!(s.contains("TOP-EXITED 0"), "{s}");
    assert!(!s.contains("1 Latency"), "alternate screen not left:\n{s}");
    assert!(
        s.lines().any(|l| l.trim() == "icanon"),
        "terminal left in raw mode:\n{s}"
    );
}
