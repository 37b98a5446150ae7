//! The `sandscope` binary end to end: the demo, an agent driven by the client
//! subcommands, and clear errors for bad input.

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

#[test]
fn demo_json_reports_cold_and_warm_and_the_probe_view() {
    if !root() {
        return;
    }
    let out = bin()
        .args(["demo", "--json", "--warm", "20", "--burst", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["driver"], "process");
    assert!(
        v["driver_reason"]
            .as_str()
            .unwrap()
            .contains("process driver"),
        "{v}"
    );
    let probe = &v["probe"];
    assert_eq!(
        probe["probe"]["hostname"], probe["id"],
        "hostname inside = sandbox id"
    );
    assert_eq!(probe["probe"]["probe_pid"], 1);
    assert!(probe["probe"]["mem_total_kib"].as_u64().unwrap() > 0);
    let fns = v["functions"].as_array().unwrap();
    assert_eq!(fns.len(), 2);
    for f in fns {
        assert!(f["coldstarts"].as_u64().unwrap() >= 1, "{f}");
        assert!(f["warm"]["count"].as_u64().unwrap() >= 20, "{f}");
        assert_eq!(f["errors"], 0, "{f}");
        assert!(f["phases"]["spawn"]["count"].as_u64().unwrap() >= 1, "{f}");
    }
    assert!(
        v["workload"]["failures"].as_array().unwrap().is_empty(),
        "{v}"
    );
    assert!(v["workload"]["first_invocations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["cold"] == true));
    let hosts = v["packing"].as_array().unwrap();
    assert_eq!(hosts.len(), 1, "one host kernel for namespace sandboxes");
    assert!(
        hosts[0]["memory_committed_bytes"].as_u64().unwrap()
            > hosts[0]["memory_resident_bytes"].as_u64().unwrap()
    );
}

/// The demo's example functions in Linux microVMs under vmm-lite, which `auto` picks where
/// KVM is hardware virtualization: here, inside a nested L1 (crate nested-kvm).
#[test]
fn the_demo_runs_the_example_functions_on_vmm_lite_under_nested_kvm() {
    if !root()
        || !nested_kvm::test_here_or_in_l1(
            "the_demo_runs_the_example_functions_on_vmm_lite_under_nested_kvm",
            2048,
            std::time::Duration::from_secs(480),
        )
    {
        return;
    }
    // The example config, with room for boots that take 10-20 s in an emulated L1.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let cfg = std::fs::read_to_string(examples.join("sandscope.toml"))
        .unwrap()
        .replace("boot_timeout_s = 10", "boot_timeout_s = 180")
        .replace("\ntimeout_s = 3", "\ntimeout_s = 60")
        .replace("code = \"", &format!("code = \"{}/", examples.display()));
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("sandscope.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = bin()
        .args(["demo", "--json", "--warm", "10", "--burst", "2", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["driver"], "vmm-lite", "{}", v["driver_reason"]);
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let probe = &v["probe"]["probe"];
    assert_ne!(
        probe["boot_id"],
        host_boot.trim(),
        "a guest kernel of its own: {v}"
    );
    assert_eq!(probe["probe_pid"], 1, "{v}");
    assert_eq!(probe["hypervisor"], "KVMKVMKVM", "{v}");
    let fns = v["functions"].as_array().unwrap();
    assert_eq!(fns.len(), 2, "{v}");
    for f in fns {
        assert!(f["coldstarts"].as_u64().unwrap() >= 1, "{f}");
        assert!(f["warm"]["count"].as_u64().unwrap() >= 10, "{f}");
        assert_eq!(f["errors"], 0, "{f}");
        for phase in ["spawn", "vmm_setup", "kernel", "probe_init"] {
            assert!(
                f["phases"][phase]["count"].as_u64().unwrap_or(0) >= 1,
                "{phase}: {f}"
            );
        }
    }
    assert!(
        v["workload"]["failures"].as_array().unwrap().is_empty(),
        "{v}"
    );
}

#[test]
fn demo_text_report_names_driver_phases_and_packing() {
    if !root() {
        return;
    }
    let out = bin()
        .args(["demo", "--warm", "5", "--burst", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "driver: process",
        "What the probe reports from inside",
        "boot_id",
        "Cold-start phases",
        "probe_init",
        "Host packing",
        "warm",
        "cold",
    ] {
        assert!(s.contains(needle), "missing `{needle}` in:\n{s}");
    }
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn agent_serves_invoke_stats_and_sandboxes_subcommands() {
    if !root() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let (agent, url, banner) = spawn_agent(&[], state.path());
    assert!(banner.contains("driver process"), "{banner}");
    assert!(banner.contains("function hello"), "{banner}");

    let out = bin()
        .args([
            "invoke",
            "hello",
            "--payload",
            r#"{"who":"cli"}"#,
            "--agent",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["event"]["who"], "cli");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cold"));

    let out = bin()
        .args([
            "invoke",
            "echo",
            "--count",
            "30",
            "--concurrency",
            "3",
            "--agent",
            &url,
        ])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains("30 ok, 0 function errors, 0 failed"), "{s}");

    let out = bin()
        .args(["stats", "--json", "--agent", &url])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let echo = v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "echo")
        .unwrap()
        .clone();
    assert_eq!(echo["invocations"], 30);
    assert!(echo["coldstarts"].as_u64().unwrap() >= 1);
    let out = bin().args(["stats", "--agent", &url]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("p99.9"));

    let out = bin().args(["sandboxes", "--agent", &url]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("hello-") && s.contains("echo-") && s.contains("Host packing"),
        "{s}"
    );
    // No --ssh: `sandscope ssh` says how to turn it on.
    let out = bin()
        .args(["ssh", "--agent", &url, "hello", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SSH endpoint is off") && err.contains("--ssh"),
        "{err}"
    );
    drop(agent);
}

/// `sandscope agent` on free ports; returns it once its banner is complete.
fn spawn_agent(extra: &[&str], state: &std::path::Path) -> (AgentProc, String, String) {
    let port = free_port();
    let mut child = bin()
        .args([
            "agent",
            "--http",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
        ])
        .arg(state)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let agent = AgentProc(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut banner = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        banner.push_str(&l);
        banner.push('\n');
        if l.contains("listening on") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (agent, format!("http://127.0.0.1:{port}"), banner)
}

#[test]
fn sandscope_ssh_runs_a_command_in_a_live_sandbox_and_sessions_lists_it() {
    if !root() {
        return;
    }
    if Command::new("ssh").arg("-V").output().is_err() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI installs openssh-client"
        );
        eprintln!("SKIPPED: needs the OpenSSH client");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let ssh_port = free_port();
    let (agent, url, banner) = spawn_agent(
        &[
            "--ssh",
            &format!("127.0.0.1:{ssh_port}"),
            "--ssh-authorized-keys",
            &format!("{}.pub", key.display()),
            "--ssh-host-key",
            &format!("{}", dir.path().join("host_key").display()),
        ],
        &dir.path().join("state"),
    );
    assert!(
        banner.contains(&format!("ssh: 127.0.0.1:{ssh_port}")),
        "{banner}"
    );
    let out = bin()
        .args(["ssh", "--agent", &url, "-i"])
        .arg(&key)
        .args(["hello", "hostname; echo oops >&2; exit 9"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(9), "{stdout}{stderr}");
    assert!(stdout.starts_with("hello-"), "{stdout}");
    assert!(
        stderr.contains(&format!("attached to sandbox {}", stdout.trim()))
            && stderr.contains("oops"),
        "{stderr}"
    );
    let out = bin().args(["sessions", "--agent", &url]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("Recently ended: 1") && s.contains("exit 9"),
        "{s}"
    );
    let out = bin()
        .args(["ssh", "--agent", &url, "--print", "hello"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.starts_with("ssh -p ")
            && s.contains("StrictHostKeyChecking=yes")
            && s.contains("hello@127.0.0.1"),
        "{s}"
    );
    drop(agent);
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[functions]]\nname = \"f\"\nhandler = \"x\"\ncode = \".\"\nmemroy_mb = 5\n",
    )
    .unwrap();
    let out = bin()
        .args(["agent", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("bad.toml") && e.contains("memroy_mb"), "{e}");

    let out = bin()
        .args([
            "invoke",
            "f",
            "--payload",
            "{not json",
            "--agent",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    let out = bin()
        .args(["stats", "--agent", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = bin().args(["demo", "--driver", "docker"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown driver"));

    let out = bin().args(["--help"]).output().unwrap();
    let h = String::from_utf8_lossy(&out.stdout);
    for sub in ["demo", "agent", "invoke", "stats", "sandboxes"] {
        assert!(h.contains(sub), "{h}");
    }
}

#[test]
fn forcing_an_unavailable_vm_driver_says_why() {
    if !root() {
        return;
    }
    let out = bin()
        .args(["demo", "--driver", "vmm-lite"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("vmm-lite") && e.contains("unavailable"), "{e}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(e.contains("PVM") && e.contains("--driver qemu"), "{e}");
    }
}

#[test]
fn bad_otlp_settings_get_clear_errors_and_good_ones_are_announced() {
    let dir = tempfile::tempdir().unwrap();
    let agent_err = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = bin();
        c.args(["agent", "--http", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path())
            .args(args)
            .env_remove("NEW_RELIC_LICENSE_KEY")
            .env_remove("GRAFANA_OTLP_USER")
            .env_remove("GRAFANA_OTLP_TOKEN");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for (args, env, want) in [
        (
            &["--otlp-endpoint", "localhost:4318"][..],
            &[][..],
            "--otlp-endpoint: OTLP endpoint `localhost:4318`: must start with http:// or https://",
        ),
        (
            &["--otlp-preset", "datadog"][..],
            &[][..],
            "--otlp-preset: unknown preset `datadog` (newrelic or grafana)",
        ),
        (
            &["--otlp-preset", "newrelic"][..],
            &[][..],
            "set NEW_RELIC_LICENSE_KEY",
        ),
        (
            &["--otlp-preset", "grafana"][..],
            &[("GRAFANA_OTLP_USER", "123")][..],
            "GRAFANA_OTLP_TOKEN",
        ),
        (
            &[
                "--otlp-endpoint",
                "https://otlp.nr-data.net:4317",
                "--otlp-protocol",
                "grpc",
            ][..],
            &[][..],
            "gRPC over TLS is not built",
        ),
        (
            &[
                "--otlp-endpoint",
                "http://127.0.0.1:4318",
                "--otlp-protocol",
                "udp",
            ][..],
            &[][..],
            "--otlp-protocol: unknown protocol `udp` (http or grpc)",
        ),
    ] {
        let (code, e) = agent_err(args, env);
        assert_eq!(code, Some(1), "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: want {want:?} in {e}");
    }
    // The same checks on a config file name the file and the key.
    let cfg = dir.path().join("otlp.toml");
    std::fs::write(
        &cfg,
        "[otlp]\nendpoint = \"http://h:1\"\ncompression = \"zstd\"\n",
    )
    .unwrap();
    let (code, e) = agent_err(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1));
    assert!(
        e.contains("otlp.toml") && e.contains("otlp.compression"),
        "{e}"
    );

    // A good preset: the banner says where each signal goes. (A dead loopback port stands
    // in for New Relic: tests never talk to the internet.)
    if !root() {
        return;
    }
    let dead = format!("http://127.0.0.1:{}", free_port());
    std::env::set_var("NEW_RELIC_LICENSE_KEY", "test-key");
    let (agent, _, banner) = spawn_agent(
        &["--otlp-preset", "newrelic", "--otlp-endpoint", &dead],
        dir.path(),
    );
    std::env::remove_var("NEW_RELIC_LICENSE_KEY");
    for want in [
        format!("otlp: logs    -> {dead}/v1/logs (HTTP/protobuf)"),
        format!("otlp: traces  -> {dead}/v1/traces (HTTP/protobuf)"),
        format!("otlp: metrics -> {dead}/v1/metrics (HTTP/protobuf)"),
        "otlp: preset newrelic".to_string(),
    ] {
        assert!(banner.contains(&want), "{want:?} in {banner}");
    }
    drop(agent);
}
