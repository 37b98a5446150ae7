//! The qemu driver end to end: real Linux guests (QEMU microvm; TCG here, KVM on hardware
//! hosts) whose init is the guest probe, linked to the agent over virtio-vsock
//! (vhost-device-vsock). Needs what scripts/guest-deps installs and the kernel that
//! `sandscope image build` caches; scripts/test provides both. Without them the tests say
//! SKIPPED, except under CI (or SANDSCOPE_REQUIRE_VM=1), where that is a failure.

mod common;

use common::{func, TestAgent};
use host_agent::config::AgentConfig;
use host_agent::drivers::{self, qemu::QemuDriver};
use std::sync::Arc;
use std::time::Duration;

/// Whether microVM tests can run here; panics under CI if they cannot.
fn vm_ready() -> bool {
    if !common::can_run() {
        return false;
    }
    let mut missing = Vec::new();
    if drivers::find_binary(None, "qemu-system-x86_64", &[]).is_none() {
        missing.push("qemu-system-x86_64 (scripts/guest-deps)".to_string());
    }
    match guest_image::kernel::cached(&guest_image::cache_dir()) {
        Ok(Some(_)) => {}
        Ok(None) => missing.push("the guest kernel (sandscope image build)".into()),
        Err(e) => missing.push(format!("the guest kernel ({e})")),
    }
    if guest_image::find_busybox().is_none() {
        missing.push("busybox-static".into());
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("qemu driver tests need {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("SANDSCOPE_REQUIRE_VM").as_deref() == Ok("1")
    {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

fn qemu_driver(cfg: &AgentConfig) -> Arc<dyn drivers::Driver> {
    let d = QemuDriver::new(cfg, &drivers::detect_kvm())
        .unwrap_or_else(|e| panic!("{}", host_agent::agent::chain(&e)));
    Arc::new(d)
}

async fn start_vm(funcs: &[common::Func<'_>], agent_extra: &str) -> TestAgent {
    common::start_with(funcs, agent_extra, qemu_driver).await
}

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// Processes whose command line carries `sandscope.id=ID` (the sandbox's QEMU).
fn vm_processes(id: &str) -> Vec<u32> {
    let needle = format!("sandscope.id={id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

const HELLO: &str = r#"event=$(cat)
echo "stderr-marker from $(hostname)" >&2
printf '{"host":"%s","boot":"%s","code":"%s","event":%s}\n' "$(hostname)" \
  "$(cat /proc/sys/kernel/random/boot_id)" "$(cat /var/task/data.txt)" "${event:-null}""#;

const COUNTER: &str = r#"echo "counter starting" >&2
n=0
echo ready
while IFS= read -r ev; do n=$((n+1)); printf '{"n":%d}\n' "$n"; done"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guest_cold_then_warm_over_vsock_with_logs_and_reaping() {
    if !vm_ready() {
        return;
    }
    let a = start_vm(
        &[
            func(
                "hello",
                HELLO,
                "memory_mb = 96\ntimeout_s = 20\n[functions.pool]\nkeep_alive_s = 4",
            ),
            func(
                "counter",
                COUNTER,
                "kind = \"persistent\"\ntimeout_s = 20\n[functions.pool]\nkeep_alive_s = 60",
            ),
        ],
        "boot_timeout_s = 60",
    )
    .await;

    // Cold: a Linux guest boots and its probe says Hello over virtio-vsock.
    let r1 = a.invoke("hello", r#"{"n":1}"#).await;
    assert_eq!(r1.status, 200, "{r1:?}");
    assert!(r1.cold, "{r1:?}");
    let body = r1.json();
    assert_eq!(body["host"], r1.sandbox.as_str(), "{body}");
    assert_eq!(body["code"], "code-dir-marker", "{body}");
    assert_eq!(body["event"]["n"], 1, "{body}");
    let guest_boot = body["boot"].as_str().unwrap().to_string();
    assert_ne!(guest_boot, host_boot_id(), "the guest has its own kernel");

    let d = a.get(&format!("/v1/sandboxes/{}", r1.sandbox)).await;
    assert_eq!(d["driver"], "qemu", "{d}");
    let p = &d["probe"];
    assert_eq!(p["boot_id"], guest_boot.as_str(), "{d}");
    assert_eq!(p["hostname"], r1.sandbox.as_str(), "{d}");
    assert!(p["kernel"].as_str().unwrap().starts_with("6.1."), "{d}");
    assert_eq!(p["probe_pid"], 1, "the probe is the guest's init: {d}");
    let mem_kib = p["mem_total_kib"].as_u64().unwrap();
    assert!(
        (32 * 1024..96 * 1024).contains(&mem_kib),
        "guest MemTotal {mem_kib} KiB should be below its 96 MiB: {d}"
    );
    assert!(!p["cpu_model"].as_str().unwrap().is_empty(), "{d}");
    assert!(
        !p["hypervisor"].as_str().unwrap().is_empty(),
        "CPUID sees a hypervisor: {d}"
    );
    assert_eq!(d["guest"]["memory_bytes"], 96u64 << 20, "{d}");
    assert_eq!(d["guest"]["vcpus"], 1, "{d}");
    for phase in ["vmm_setup_us", "kernel_us"] {
        assert!(d["boot"][phase].as_u64().is_some(), "{phase} missing: {d}");
    }
    assert!(d["boot"]["kernel_us"].as_u64().unwrap() > 0, "{d}");
    assert!(
        d["usage"]["rss_bytes"].as_u64().unwrap() > 16 << 20,
        "QEMU's RSS is counted: {d}"
    );

    // The serial console is captured: the probe announces itself there.
    let console = d["console"].as_array().cloned().unwrap_or_default();
    assert!(
        console.iter().any(|l| l
            .as_str()
            .unwrap_or("")
            .contains("guest-probe: init of sandbox")),
        "console: {console:?}"
    );

    // Function logs arrive over the link.
    let id = r1.sandbox.clone();
    let logs_ok = a
        .wait_for(Duration::from_secs(5), || async {
            let d = a.get(&format!("/v1/sandboxes/{id}")).await;
            d["logs"].as_array().is_some_and(|l| {
                l.iter().any(|x| {
                    x["line"]
                        .as_str()
                        .unwrap_or("")
                        .contains("stderr-marker from")
                })
            })
        })
        .await;
    assert!(logs_ok, "function stderr did not arrive as logs");

    // Warm: the same VM answers.
    let r2 = a.invoke("hello", r#"{"n":2}"#).await;
    assert_eq!(r2.status, 200, "{r2:?}");
    assert!(!r2.cold, "{r2:?}");
    assert_eq!(r2.sandbox, r1.sandbox);
    assert_eq!(r2.json()["boot"], guest_boot.as_str());

    // A persistent runtime inside a VM keeps its state between invocations.
    let c1 = a.invoke("counter", "{}").await;
    let c2 = a.invoke("counter", "{}").await;
    assert_eq!((c1.status, c2.status), (200, 200), "{c1:?} {c2:?}");
    assert!(c1.cold && !c2.cold);
    assert_eq!(
        (c1.json()["n"].clone(), c2.json()["n"].clone()),
        (1.into(), 2.into())
    );

    // Host packing counts the VMs on this host, with guest memory as committed.
    let s = a.get("/v1/sandboxes").await;
    let local = s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["local"] == true)
        .cloned()
        .unwrap_or_else(|| panic!("no local host: {s}"));
    assert_eq!(local["microvms"], 2, "{s}");
    assert!(
        local["memory_committed_bytes"].as_u64().unwrap() >= (96 + 128) << 20,
        "{s}"
    );

    // Idle past keep-alive: the VM is reaped and its QEMU is gone.
    assert!(
        !vm_processes(&id).is_empty(),
        "QEMU of {id} should be running"
    );
    let reaped = a
        .wait_for(Duration::from_secs(20), || async {
            a.sandbox(&id).await.is_none() && vm_processes(&id).is_empty()
        })
        .await;
    assert!(
        reaped,
        "idle VM {id} was not reaped: {:?}",
        vm_processes(&id)
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_guests_fail_clearly_and_the_agent_keeps_serving() {
    if !vm_ready() {
        return;
    }
    let a = start_vm(
        &[
            func(
                "ok",
                "cat >/dev/null; echo '{\"ok\":true}'",
                "timeout_s = 20",
            ),
            func("broken", "cat", "timeout_s = 20"),
        ],
        "boot_timeout_s = 30",
    )
    .await;
    a.corrupt_initramfs("broken");

    let r = a.invoke("broken", "{}").await;
    assert!(r.status >= 500, "{r:?}");
    assert!(
        r.body.contains("exited before its probe connected"),
        "a guest without init ends, and the error says so: {}",
        r.body
    );
    // The agent keeps serving the other function.
    let ok = a.invoke("ok", "{}").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.json()["ok"], true);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_says_hello_hits_the_boot_timeout() {
    if !vm_ready() {
        return;
    }
    let a = start_vm(&[func("slow", "cat", "")], "boot_timeout_s = 0.3").await;
    let t0 = std::time::Instant::now();
    let r = a.invoke("slow", "{}").await;
    assert!(r.status >= 500, "{r:?}");
    assert!(
        r.body.contains("boot timeout") && r.body.contains("0.3 s"),
        "{}",
        r.body
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // Nothing of that VM is left running.
    let gone = a
        .wait_for(Duration::from_secs(5), || async {
            let mut any = false;
            for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
                let c = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let c = String::from_utf8_lossy(&c);
                any |= c.contains("sandscope.id=slow-")
                    && c.contains(a.agent.config().state_dir.to_str().unwrap());
            }
            !any
        })
        .await;
    assert!(gone, "the timed-out VM's QEMU is still running");
    a.stop().await;
}

#[test]
fn missing_pieces_are_named() {
    if !vm_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg_with = |extra: &str| {
        let p = common::write_config(dir.path(), &[func("f", "cat", "")], extra);
        AgentConfig::load(&p).unwrap()
    };
    let kvm = drivers::detect_kvm();
    let err = |cfg: &AgentConfig| match QemuDriver::new(cfg, &kvm) {
        Ok(_) => panic!("driver started"),
        Err(e) => host_agent::agent::chain(&e),
    };
    let e = err(&cfg_with("qemu = \"/nonexistent/qemu-system-x86_64\""));
    assert!(
        e.contains("/nonexistent/qemu-system-x86_64 not found") && e.contains("scripts/guest-deps"),
        "{e}"
    );
    let e = err(&cfg_with(
        "vhost_device_vsock = \"/nonexistent/vhost-device-vsock\"",
    ));
    assert!(
        e.contains("/nonexistent/vhost-device-vsock not found"),
        "{e}"
    );
    let e = err(&cfg_with("kernel = \"/nonexistent/bzImage\""));
    assert!(
        e.contains("/nonexistent/bzImage") && e.contains("cannot open"),
        "{e}"
    );
    let junk = dir.path().join("junk-kernel");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let e = err(&cfg_with(&format!("kernel = \"{}\"", junk.display())));
    assert!(e.contains("neither a bzImage"), "{e}");
    let e = err(&cfg_with("probe = \"/nonexistent/guest-probe\""));
    assert!(e.contains("guest-probe binary not found"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_into_a_microvm_reaches_the_guest_shell() {
    if !vm_ready() || !common::ssh::have_ssh() {
        return;
    }
    let a = start_vm(
        &[func("hello", HELLO, "memory_mb = 96\ntimeout_s = 20")],
        "boot_timeout_s = 60",
    )
    .await;
    let c = common::ssh::SshClient::serve(&a.agent).await;
    // By function name with no VM running: one boots for the session.
    let (code, out, err) = c
        .exec(
            "hello",
            "hostname; grep MemTotal /proc/meminfo; cat /proc/sys/kernel/random/boot_id; \
             echo guest-err >&2; exit 4",
        )
        .await;
    assert_eq!(code, 4, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    let sb = lines[0].to_string();
    assert!(sb.starts_with("hello-"), "{out}");
    assert!(
        err.contains(&format!(
            "attached to sandbox {sb} of function hello (started for this session)"
        )) && err.contains("guest-err"),
        "{err}"
    );
    // /proc/meminfo is the guest kernel's: 96 MiB of guest memory, not the host's.
    let mem_kib: u64 = lines[1].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(mem_kib < 96 * 1024, "guest MemTotal {mem_kib} KiB");
    assert_ne!(lines[2], host_boot_id(), "the guest has its own kernel");

    // An interactive busybox shell on the guest's PTY: state sticks, size follows.
    let mut cmd = c.cmd(&c.key, &sb);
    cmd.arg("-tt").env("TERM", "vt100");
    let p = common::ssh::PtyClient::spawn(cmd, 25, 90);
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.send("cd /var/task\n");
    p.send("echo cwd=$(pwd)\n");
    let at = p.expect(0, "cwd=/var/task").await;
    p.send("stty size\n");
    let at = p.expect(at, "25 90").await;
    p.resize(33, 111);
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.send("stty size\n");
    p.expect(at, "33 111").await;
    let d = a.get(&format!("/v1/sandboxes/{sb}")).await;
    assert_eq!(d["shells"], 1, "{d}");
    p.send("exit 6\n");
    assert_eq!(p.wait().await, 6);
    a.agent.shutdown().await;
}
