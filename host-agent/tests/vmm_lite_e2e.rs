//! The vmm-lite driver end to end: Linux guests under our own VMM, the probe's Hello over
//! vmm-lite's virtio-vsock, the cold-start waterfall from vmm-lite's phase report and the
//! boot-timer the probe writes, shells, and teardown.
//!
//! vmm-lite needs hardware KVM. This project's machines have PVM, so each test re-runs
//! itself inside an L1 VM with real nested KVM (crate nested-kvm: QEMU/TCG with emulated
//! AMD SVM); on a host with hardware KVM it runs directly. Inside L1, driver `auto` must
//! pick vmm-lite.

mod common;

use common::{func, TestAgent};
use host_agent::drivers;
use std::time::{Duration, Instant};

/// L1 memory: the agent, its VMs (96-128 MiB each) and tmpfs scratch.
const L1_MEM: u32 = 2048;
const L1_LIMIT: Duration = Duration::from_secs(420);

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// Live vmm-lite processes whose command line names sandbox `id` (any, if empty).
fn vmm_processes(id: &str) -> Vec<u32> {
    let needle = format!("sandscope.id={id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let c = String::from_utf8_lossy(&c);
            c.contains("vmm-lite") && c.contains(&needle)
        })
        .collect()
}

/// An agent whose driver is what `auto` selects; asserts it is vmm-lite.
async fn start_auto(funcs: &[common::Func<'_>], agent_extra: &str) -> TestAgent {
    start_auto_more(funcs, agent_extra, "").await
}

/// [`start_auto`] with `more` appended to the config.
async fn start_auto_more(funcs: &[common::Func<'_>], agent_extra: &str, more: &str) -> TestAgent {
    common::start_with_more(funcs, agent_extra, more, |cfg| {
        let (d, why) = drivers::select(cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.name(), "vmm-lite", "auto picked {}: {why}", d.name());
        d
    })
    .await
}

const HELLO: &str = r#"event=$(cat)
echo "stderr-marker from $(hostname)" >&2
printf '{"host":"%s","boot":"%s","event":%s}\n' "$(hostname)" \
  "$(cat /proc/sys/kernel/random/boot_id)" "${event:-null}""#;

const COUNTER: &str = r#"n=0
echo ready
while IFS= read -r ev; do n=$((n+1)); printf '{"n":%d}\n' "$n"; done"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_vmm_lite_cold_then_warm_with_waterfall_shell_and_clean_teardown() {
    if !nested_kvm::test_here_or_in_l1(
        "auto_picks_vmm_lite_cold_then_warm_with_waterfall_shell_and_clean_teardown",
        L1_MEM,
        L1_LIMIT,
    ) || !common::can_run()
    {
        return;
    }
    // A real collector receives the cold start's span (rotel; under CI it must be there).
    let rotel = common::rotel().map(|bin| common::otlp::start_rotel(&bin));
    let otlp = rotel.as_ref().map_or(String::new(), |r| {
        format!(
            "\n[otlp]\nendpoint = \"http://127.0.0.1:{}\"\ninterval_s = 0.05\n[otlp.metrics]\nenabled = false\n",
            r.http
        )
    });
    let a = start_auto_more(
        &[
            func("hello", HELLO, "memory_mb = 96\ntimeout_s = 30"),
            func(
                "counter",
                COUNTER,
                "kind = \"persistent\"\ntimeout_s = 30\nmemory_mb = 96",
            ),
        ],
        "boot_timeout_s = 90",
        &otlp,
    )
    .await;
    let state_dir = a.agent.config().state_dir.clone();

    // Cold: Linux boots under vmm-lite and the probe says Hello over its vsock.
    let t0 = Instant::now();
    let r1 = a.invoke("hello", r#"{"n":1}"#).await;
    let cold_wall_us = t0.elapsed().as_micros() as u64;
    assert_eq!(r1.status, 200, "{r1:?}");
    assert!(r1.cold, "{r1:?}");
    let body = r1.json();
    assert_eq!(body["host"], r1.sandbox.as_str(), "{body}");
    assert_eq!(body["event"]["n"], 1, "{body}");
    let guest_boot = body["boot"].as_str().unwrap().to_string();
    assert_ne!(guest_boot, boot_id(), "the guest has its own kernel");

    let d = a.get(&format!("/v1/sandboxes/{}", r1.sandbox)).await;
    assert_eq!(d["driver"], "vmm-lite", "{d}");
    assert_eq!(d["probe"]["boot_id"], guest_boot.as_str(), "{d}");
    assert_eq!(d["probe"]["probe_pid"], 1, "{d}");
    assert_eq!(d["probe"]["hypervisor"], "KVMKVMKVM", "{d}");
    // The waterfall: every phase measured, the kernel phase from the boot-timer marker the
    // probe wrote, and the phases within the cold request's wall time.
    let b = &d["boot"];
    let us = |k: &str| {
        b[k].as_u64()
            .unwrap_or_else(|| panic!("boot.{k} missing: {d}"))
    };
    let (spawn, vmm, kernel, probe, runtime) = (
        us("spawn_us"),
        us("vmm_setup_us"),
        us("kernel_us"),
        us("probe_init_us"),
        us("runtime_init_us"),
    );
    assert!(vmm > 0 && kernel > 0 && probe > 0, "{d}");
    assert_eq!(b["kernel_source"], "boot_timer", "{d}");
    let sum = spawn + vmm + kernel + probe + runtime;
    assert!(
        sum <= cold_wall_us,
        "phases {sum} us exceed the cold request's {cold_wall_us} us: {d}"
    );
    assert!(
        sum * 2 >= cold_wall_us,
        "phases {sum} us explain less than half of {cold_wall_us} us: {d}"
    );
    eprintln!(
        "cold start in L1: spawn {spawn} us, vmm_setup {vmm} us, kernel {kernel} us, probe_init {probe} us, runtime_init {runtime} us; request {cold_wall_us} us"
    );

    // The cold start's span: the invocation with one child per phase, on one timeline.
    if let Some(r) = &rotel {
        let id = r1.request_id.clone();
        let spans = common::otlp::until(&r.spans, "the cold start's spans", |v| {
            v.iter()
                .any(|s| s["attributes"]["faas.invocation_id"] == id.as_str())
                && v.iter().filter(|s| s["name"] == "kernel").count() >= 1
        })
        .await;
        let root = spans
            .iter()
            .find(|s| s["attributes"]["faas.invocation_id"] == id.as_str())
            .unwrap();
        assert_eq!(root["attributes"]["faas.coldstart"], true, "{root}");
        assert_eq!(root["resource"]["sandscope.driver"], "vmm-lite", "{root}");
        assert_eq!(
            root["resource"]["faas.instance"],
            r1.sandbox.as_str(),
            "{root}"
        );
        let kids: Vec<&str> = spans
            .iter()
            .filter(|s| s["parent_span_id"] == root["span_id"])
            .filter_map(|s| s["name"].as_str())
            .collect();
        for want in [
            "spawn",
            "vmm_setup",
            "kernel",
            "probe_init",
            "runtime_init",
            "invoke",
        ] {
            assert!(kids.contains(&want), "{want} missing from {kids:?}");
        }
    }

    // Warm: the same VM answers; a persistent runtime keeps its state.
    let r2 = a.invoke("hello", r#"{"n":2}"#).await;
    assert_eq!(r2.status, 200, "{r2:?}");
    assert!(!r2.cold && r2.sandbox == r1.sandbox, "{r2:?}");
    assert_eq!(r2.json()["boot"], guest_boot.as_str());
    let c1 = a.invoke("counter", "{}").await;
    let c2 = a.invoke("counter", "{}").await;
    assert_eq!((c1.status, c2.status), (200, 200), "{c1:?} {c2:?}");
    assert!(c1.cold && !c2.cold);
    assert_eq!(c2.json()["n"], 2);

    // A shell into the microVM over SSH sees the guest's kernel.
    if common::ssh::have_ssh() {
        let c = common::ssh::SshClient::serve(&a.agent).await;
        let (code, out, err) = c
            .exec(&r1.sandbox, "hostname; cat /proc/sys/kernel/random/boot_id")
            .await;
        assert_eq!(code, 0, "{out}{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines, [r1.sandbox.as_str(), guest_boot.as_str()], "{err}");
    }

    // Teardown leaves no VMM process and no socket behind.
    assert_eq!(vmm_processes(&r1.sandbox).len(), 1);
    a.stop().await;
    let left = vmm_processes("");
    assert!(left.is_empty(), "vmm-lite processes left: {left:?}");
    let sockets: Vec<_> = walk(&state_dir)
        .into_iter()
        .filter(|p| {
            p.to_string_lossy().ends_with(".sock") || p.to_string_lossy().contains(".sock_")
        })
        .collect();
    assert!(sockets.is_empty(), "sockets left: {sockets:?}");
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(d) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_silent_guests_fail_within_the_boot_timeout_and_the_agent_keeps_serving() {
    if !nested_kvm::test_here_or_in_l1(
        "broken_and_silent_guests_fail_within_the_boot_timeout_and_the_agent_keeps_serving",
        L1_MEM,
        L1_LIMIT,
    ) || !common::can_run()
    {
        return;
    }
    let a = start_auto(
        &[
            func(
                "ok",
                "cat >/dev/null; echo '{\"ok\":true}'",
                "timeout_s = 30",
            ),
            func("broken", "cat", "timeout_s = 30"),
        ],
        "boot_timeout_s = 60",
    )
    .await;
    // A guest without an init: corrupt the function's initramfs after the agent wrote it.
    // Linux panics, the VMM exits, and the error carries the console's last lines.
    a.corrupt_initramfs("broken");
    let t0 = Instant::now();
    let r = a.invoke("broken", "{}").await;
    assert!(r.status >= 500, "{r:?}");
    assert!(
        r.body.contains("exited before its probe connected"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("Kernel panic") || r.body.contains("VFS"),
        "the error shows the guest console: {}",
        r.body
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let ok = a.invoke("ok", "{}").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    a.stop().await;

    // A kernel vmm-lite cannot boot (a bzImage cut short after its header, which the agent's
    // own check accepts): vmm-lite refuses it, and the sandbox fails at once with its words.
    let tmp = tempfile::tempdir().unwrap();
    let bz = guest_image::kernel::cached(&guest_image::cache_dir())
        .unwrap()
        .expect("guest kernel")
        .bzimage;
    let cut = tmp.path().join("bzImage-cut");
    std::fs::write(&cut, &std::fs::read(&bz).unwrap()[..64 << 10]).unwrap();
    let a = start_auto(
        &[func("ok", "cat >/dev/null; echo '{}'", "")],
        &format!("boot_timeout_s = 60\nkernel = \"{}\"", cut.display()),
    )
    .await;
    let t0 = Instant::now();
    let r = a.invoke("ok", "{}").await;
    assert!(r.status >= 500, "{r:?}");
    assert!(
        r.body.contains("exited before its probe connected") && r.body.contains("truncated"),
        "{}",
        r.body
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    a.stop().await;

    // A guest whose probe never connects in time: the boot timeout ends it, no VMM is left.
    let a = start_auto(&[func("slow", "cat", "")], "boot_timeout_s = 0.5").await;
    let t0 = Instant::now();
    let r = a.invoke("slow", "{}").await;
    assert!(r.status >= 500, "{r:?}");
    assert!(
        r.body.contains("boot timeout") && r.body.contains("0.5 s"),
        "{}",
        r.body
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let gone = a
        .wait_for(Duration::from_secs(5), || async {
            vmm_processes("slow-").is_empty()
        })
        .await;
    assert!(gone, "the timed-out VM's vmm-lite is still running");
    a.stop().await;
}
