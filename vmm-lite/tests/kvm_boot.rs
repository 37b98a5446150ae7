//! KVM integration tests with tiny guests built from tests/guests/ (real /dev/kvm, no mocks).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn phase(m: &serde_json::Value, name: &str) -> f64 {
    m["phases"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("phase {name} missing in {m}"))
}

fn check_clean_boot(r: &Run, banner: &str) {
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr());
    assert!(r.serial.contains(banner), "serial: {:?}", r.serial);
    assert!(
        r.serial.contains("console=ttyS0"),
        "cmdline not passed: {:?}",
        r.serial
    );
    assert!(
        r.serial.contains("sandscope.test=1"),
        "user cmdline missing: {:?}",
        r.serial
    );
    let m = r.metrics();
    assert_eq!(m["exit"]["reason"], "i8042-reset");
    assert_eq!(m["exit"]["code"], 0);
    let (mem, kern, run, timer) = (
        phase(m, "memory_ready_us"),
        phase(m, "kernel_loaded_us"),
        phase(m, "first_kvm_run_us"),
        phase(m, "boot_timer_us"),
    );
    assert!(
        mem <= kern && kern <= run && run <= timer,
        "phases out of order: {m}"
    );
    assert!(m["vcpu_exits"]["io_out"].as_u64().unwrap() >= r.serial.len() as u64);
    assert!(m["vcpu_exits"]["mmio_write"].as_u64().unwrap() >= 1);
    assert_eq!(
        m["serial"]["tx_bytes"].as_u64().unwrap(),
        r.serial.len() as u64
    );
}

#[test]
fn elf64_boot_protocol_prints_cmdline_and_hits_boot_timer() {
    if !kvm_available("elf64") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &[]);
    let r = run_vmm(
        &d,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "sandscope.test=1",
        ],
    );
    check_clean_boot(&r, "elf64 guest: cmdline=");
    assert!(r.stderr().contains("boot-timer"), "{}", r.stderr());
}

#[test]
fn pvh_elf_note_entry_boots() {
    if !kvm_available("pvh") {
        return;
    }
    let d = scratch();
    let k = pvh(&d);
    let r = run_vmm(
        &d,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "sandscope.test=1",
        ],
    );
    check_clean_boot(&r, "pvh guest: cmdline=");
}

#[test]
fn bzimage_boot_protocol_boots() {
    if !kvm_available("bzimage") {
        return;
    }
    let d = scratch();
    let k = bzimage(&d);
    let r = run_vmm(
        &d,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "sandscope.test=1",
        ],
    );
    check_clean_boot(&r, "bzimage guest: cmdline=");
}

#[test]
fn initrd_is_placed_and_boot_still_works() {
    if !kvm_available("initrd") {
        return;
    }
    let d = scratch();
    let k = bzimage(&d);
    let rd = d.join("initrd.img");
    std::fs::write(&rd, vec![0x5a; 300 * 1024]).unwrap();
    let r = run_vmm(
        &d,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            rd.to_str().unwrap(),
            "--mem-mib",
            "8",
            "--cmdline",
            "sandscope.test=1",
        ],
    );
    check_clean_boot(&r, "bzimage guest");
}

#[test]
fn guest_exit_port_sets_vmm_exit_status() {
    if !kvm_available("exit-port") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["EXIT_STATUS=42"]);
    let r = run_vmm(&d, &["--kernel", k.to_str().unwrap()]);
    assert_eq!(r.code(), 42, "stderr: {}", r.stderr());
    assert_eq!(r.metrics()["exit"]["reason"], "exit-port");
}

#[test]
fn guest_triple_fault_ends_vmm_cleanly() {
    if !kvm_available("triple-fault") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["TRIPLE_FAULT"]);
    let r = run_vmm(&d, &["--kernel", k.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr());
    assert_eq!(r.metrics()["exit"]["reason"], "shutdown");
    assert_eq!(r.metrics()["vcpu_exits"]["shutdown"], 1);
}

#[test]
fn bad_guest_mmio_and_ports_are_contained_and_counted() {
    if !kvm_available("bad-mmio") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["BAD_MMIO"]);
    let r = run_vmm(&d, &["--kernel", k.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr());
    assert!(
        r.metrics()["guest_errors"]["bad_io"].as_u64().unwrap() >= 4,
        "{}",
        r.metrics()
    );
}

#[test]
fn two_vcpus_boot() {
    if !kvm_available("vcpus") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &[]);
    let r = run_vmm(
        &d,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--vcpus",
            "2",
            "--mem-mib",
            "64",
        ],
    );
    assert_eq!(r.code(), 0, "stderr: {}", r.stderr());
    assert!(r.serial.contains("elf64 guest"));
}

#[test]
fn sigusr1_dumps_metrics_and_sigterm_stops() {
    if !kvm_available("signals") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["SPIN"]);
    let metrics = d.join("m.json");
    let mut cmd = Command::new(VMM);
    cmd.args([
        "--kernel",
        k.to_str().unwrap(),
        "--serial-out",
        "none",
        "--quiet",
        "--metrics",
    ])
    .arg(&metrics)
    .stderr(Stdio::piped());
    // As the agent does: started with its control signals blocked, vmm-lite takes a SIGUSR1
    // sent at once, before its own code runs (which in a nested L1 can be 50 ms away).
    vmm_lite::signals::start_blocked(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    // Wait for the guest to reach the marker, polling with SIGUSR1 dumps.
    let mut doc = serde_json::Value::Null;
    for _ in 0..500 {
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(5));
        if let Ok(b) = std::fs::read(&metrics) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                if v["phases"]["boot_timer_us"].is_f64() {
                    doc = v;
                    break;
                }
            }
        }
    }
    assert!(doc["exit"].is_null(), "live dump has no exit: {doc}");
    assert!(doc["phases"]["boot_timer_us"].is_f64(), "{doc}");
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGTERM));
    let fin: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert_eq!(fin["exit"]["reason"], "signal");
}

#[test]
fn detached_teardown_helper_exits_and_holds_no_host_fds() {
    if !kvm_available("teardown") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &[]);
    let kp = k.to_str().unwrap().to_string();
    // stdout/stderr are pipes: reading them to EOF returns once the VMM exits, because the
    // helper closed its copies.
    let out = Command::new(VMM)
        .args(["--kernel", &kp, "--serial-out", "-", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("elf64 guest"));
    // The helper (same command line) is gone shortly after.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let alive = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| String::from_utf8_lossy(&c).contains(&kp));
        if !alive {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "teardown helper still alive"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serial_input_from_unix_socket_reaches_the_uart() {
    if !kvm_available("serial-in") {
        return;
    }
    let d = scratch();
    let k = elf64(&d, &["SPIN"]);
    let sock = d.join("serial.sock");
    let metrics = d.join("m.json");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            k.to_str().unwrap(),
            "--serial-out",
            "none",
            "--quiet",
        ])
        .arg("--serial-in")
        .arg(format!("unix:{}", sock.display()))
        .arg("--metrics")
        .arg(&metrics)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    std::io::Write::write_all(&mut s, b"abc").unwrap();
    let mut rx = 0;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(5));
        if let Ok(b) = std::fs::read(&metrics) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                rx = v["serial"]["rx_bytes"].as_u64().unwrap_or(0);
                if rx == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(rx, 3, "bytes from the socket are fed to the UART");
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(128 + libc::SIGTERM));
    assert!(!sock.exists(), "serial socket removed on exit");
}

#[test]
fn mp_table_lists_every_vcpu() {
    if !kvm_available("mptable") {
        return;
    }
    let d = scratch();
    let k = mpcount(&d);
    for n in ["1", "4", "32"] {
        let r = run_vmm(&d, &["--kernel", k.to_str().unwrap(), "--vcpus", n]);
        assert_eq!(r.code().to_string(), n, "stderr: {}", r.stderr());
        assert_eq!(r.metrics()["exit"]["reason"], "exit-port");
    }
}

#[test]
fn control_socket_serves_metrics_and_stop() {
    if !kvm_available("control") {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let d = scratch();
    let k = elf64(&d, &["SPIN"]);
    let sock = d.join("ctl.sock");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            k.to_str().unwrap(),
            "--serial-out",
            "none",
            "--quiet",
        ])
        .arg("--control-sock")
        .arg(&sock)
        .spawn()
        .unwrap();
    let ask = |cmd: &str| -> String {
        let mut s = loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(cmd.as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    let mut doc = serde_json::Value::Null;
    for _ in 0..500 {
        doc = serde_json::from_str(&ask("metrics\n")).expect("one JSON line");
        if doc["phases"]["boot_timer_us"].is_f64() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(doc["phases"]["boot_timer_us"].is_f64(), "{doc}");
    assert!(doc["exit"].is_null());
    assert!(ask("bogus\n").starts_with("error: unknown command"));
    assert_eq!(ask("stop\n"), "ok\n");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(!sock.exists(), "control socket removed on exit");
}

/// Linux polled a controller that answered 0 on both ports (10,004 status reads, "Can't read
/// CTR while initializing", 1-2 s of boot). The guest runs Linux's flush loop and the reboot
/// path's kb_wait loop and must decide "no controller" and "ready for the reset" at once.
#[test]
fn i8042_looks_absent_to_linux_at_once_and_reset_is_fast() {
    if !kvm_available("i8042") {
        return;
    }
    let d = scratch();
    let k = i8042probe(&d);
    let r = run_vmm(&d, &["--kernel", k.to_str().unwrap()]);
    assert_eq!(
        r.code(),
        0,
        "10+N: flush saw an empty controller after N data reads, 50: IBF stuck; stderr: {}",
        r.stderr()
    );
    let m = r.metrics();
    assert_eq!(m["exit"]["reason"], "i8042-reset");
    // flush: 17 status + 16 data reads; kb_wait: 1 status read.
    assert_eq!(m["vcpu_exits"]["io_in"], 34, "{m}");
    assert_eq!(m["guest_errors"]["bad_io"], 0, "{m}");
}

/// One line of the cpuid guest's output: (leaf, subleaf) -> [eax, ebx, ecx, edx].
fn parse_cpuid_dump(serial: &str) -> std::collections::HashMap<(u32, u32), [u32; 4]> {
    let hex = |s: &str| u32::from_str_radix(s, 16).unwrap_or_else(|_| panic!("hex {s:?}"));
    serial
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split([' ', '.']).collect();
            assert_eq!(f.len(), 6, "line {l:?}");
            (
                (hex(f[0]), hex(f[1])),
                [hex(f[2]), hex(f[3]), hex(f[4]), hex(f[5])],
            )
        })
        .collect()
}

/// Linux disabled the APIC timer ("verification failure") because the TSC-deadline bit was
/// missing although KVM supports it; the topology leaves showed the host's values. The guest
/// prints the leaves it sees; checked here against the host's KVM.
#[test]
fn guest_cpuid_has_kvm_signature_tsc_deadline_and_our_topology() {
    if !kvm_available("cpuid") {
        return;
    }
    use kvm_ioctls::{Cap, Kvm};
    let kvm = Kvm::new().unwrap();
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let d = scratch();
    let k = cpuid_dump(&d);
    for n in [1u32, 4] {
        let r = run_vmm(
            &d,
            &["--kernel", k.to_str().unwrap(), "--vcpus", &n.to_string()],
        );
        assert_eq!(r.code(), 0, "3: no KVM signature; stderr: {}", r.stderr());
        let c = parse_cpuid_dump(&r.serial);
        let leaf = |l: u32, s: u32| c[&(l, s)];
        let [max_basic, vb, vc, vd] = leaf(0, 0);
        let amd = [vb, vd, vc] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]; // AuthenticAMD
        let [_, ebx1, ecx1, edx1] = leaf(1, 0);
        assert_ne!(ecx1 & (1 << 31), 0, "hypervisor bit");
        assert_eq!(
            ecx1 & (1 << 24) != 0,
            tsc_deadline,
            "TSC-deadline bit vs KVM cap"
        );
        assert_eq!(ecx1 & (1 << 3), 0, "MONITOR/MWAIT not offered");
        assert_eq!(ebx1 >> 24, 0, "vCPU 0 has APIC id 0");
        assert_eq!((ebx1 >> 16) & 0xff, n, "logical processor count");
        assert_eq!((ebx1 >> 8) & 0xff, 8, "CLFLUSH line size 64 bytes");
        if n > 1 {
            // (With one vCPU the bit is cleared, but PVM reports the host's HTT in leaf 1.)
            assert_ne!(edx1 & (1 << 28), 0, "HTT with more than one logical CPU");
        }
        let [hv_max, ..] = leaf(0x4000_0000, 0);
        assert!(hv_max >= 0x4000_0001, "max hypervisor leaf {hv_max:#x}");
        assert_ne!(leaf(0x4000_0001, 0)[0], 0, "KVM features");
        if max_basic >= 0xb {
            let width = 32 - (n - 1).leading_zeros();
            assert_eq!(leaf(0xb, 0), [0, 1, 0x100, 0], "SMT level");
            assert_eq!(leaf(0xb, 1), [width, n, 0x201, 0], "core level");
            assert_eq!(leaf(0xb, 2)[2] & 0xff00, 0, "no third level");
        }
        if amd {
            let [max_ext, ..] = leaf(0x8000_0000, 0);
            let cmp_legacy = leaf(0x8000_0001, 0)[2] & 2 != 0;
            assert_eq!(cmp_legacy, n > 1, "CmpLegacy iff more than one core");
            if max_ext >= 0x8000_0008 {
                assert_eq!(leaf(0x8000_0008, 0)[2] & 0xff, n - 1, "NC");
            }
            if max_ext >= 0x8000_001e {
                let [eax, ebx, ecx, _] = leaf(0x8000_001e, 0);
                assert_eq!((eax, ebx & 0xffff, ecx & 0x7ff), (0, 0, 0), "0x8000001e");
            }
        } else {
            let [eax4, ..] = leaf(4, 0);
            if eax4 & 0x1f != 0 {
                assert_eq!(eax4 >> 26, n - 1, "cores per package - 1");
            }
        }
    }
}

/// Every other test in this file, once more inside an L1 VM whose KVM is real (nested):
/// what passes under PVM must pass under hardware virtualization too.
#[test]
fn the_suite_passes_under_nested_kvm() {
    common::suite_under_nested_kvm("the_suite_passes_under_nested_kvm");
}
