//! vmm-lite boots real Linux: the project's guest kernel (bzImage and PVH vmlinux) with a
//! static test init (tests/guests/linux_init.c), under real hardware-virtualization KVM.
//!
//! This project's machines have only PVM, under which standard kernels cannot boot, so each
//! test re-runs itself inside an L1 VM with nested KVM (the nested-kvm crate: QEMU/TCG with
//! emulated AMD SVM). On a host with hardware KVM the tests run directly. They are the
//! regression tests for what real Linux showed: the i8042 probe, stop racing guest memory,
//! early signals, and CPUID (TSC deadline, hypervisor leaves).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::linux::{guest_kernel, linux_initramfs, Vmm};
use common::*;

/// L1 memory for these tests (a 128 MiB guest inside).
const L1_MEM: u32 = 1024;
/// Bound on one test's whole L1 run.
const L1_LIMIT: Duration = Duration::from_secs(300);
/// Bound on one guest run inside L1 (a boot to init takes ~3 s there).
const GUEST_LIMIT: Duration = Duration::from_secs(90);

fn phase(m: &serde_json::Value, name: &str) -> f64 {
    m["phases"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("phase {name} missing in {m}"))
}

/// What every real-Linux run must not show.
fn assert_no_vmm_errors(r: &Run) {
    let err = r.stderr();
    assert!(!err.contains("KVM_RUN failed"), "stderr: {err}");
    assert!(!err.contains("vCPU"), "a vCPU reported a problem: {err}");
    assert!(
        !r.serial.contains("i8042: Can't read CTR"),
        "Linux polled the i8042: {}",
        r.serial
    );
    assert!(
        !r.serial.contains("APIC timer disabled"),
        "Linux could not use the LAPIC timer: {}",
        r.serial
    );
}

/// Accepts one connection on `l` within `limit`.
fn accept_within(l: &UnixListener, limit: Duration) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let end = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(limit)).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < end, "no guest connection within {limit:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
fn bzimage_boots_linux_to_init_with_boot_timer_and_vsock_both_ways() {
    if !nested_kvm::test_here_or_in_l1(
        "bzimage_boots_linux_to_init_with_boot_timer_and_vsock_both_ways",
        L1_MEM,
        L1_LIMIT,
    ) {
        return;
    }
    let d = scratch();
    let kernel = guest_kernel();
    let initrd = linux_initramfs(&d);
    let uds = d.join("v.sock");
    let l = UnixListener::bind(format!("{}_5200", uds.display())).unwrap();
    let mut vm = Vmm::spawn(
        &d,
        &[
            "--kernel",
            kernel.bzimage.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem-mib",
            "128",
            "--vsock-cid",
            "3",
            "--vsock-uds",
            uds.to_str().unwrap(),
            "--cmdline",
            "quiet linit_boot_timer=1 linit_mode=vsock",
        ],
    );
    // Guest -> host: the guest's connect to CID 2 port 5200 arrives at <uds>_5200.
    let mut s = accept_within(&l, GUEST_LIMIT);
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ping from guest\n");
    s.write_all(b"pong from host\n").unwrap();
    drop(s);
    vm.wait_serial("linit: host replied: pong from host", GUEST_LIMIT);
    vm.wait_serial("linit: listening on 6000", GUEST_LIMIT);
    // Host -> guest: CONNECT on the main socket, then bytes both ways.
    let mut c = UnixStream::connect(&uds).unwrap();
    c.set_read_timeout(Some(GUEST_LIMIT)).unwrap();
    c.write_all(b"CONNECT 6000\nhello guest\n").unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "CONNECT answer: {ok:?}");
    let mut echo = String::new();
    r.read_line(&mut echo).unwrap();
    assert_eq!(echo, "echo: hello guest\n");
    drop((r, c));

    let r = vm.finish(GUEST_LIMIT);
    assert_eq!(r.code(), 0, "stderr: {}\nserial: {}", r.stderr(), r.serial);
    assert_no_vmm_errors(&r);
    assert!(
        r.serial.contains("linit: boot-timer written"),
        "{}",
        r.serial
    );
    assert!(r.serial.contains("linit: echoed to host"), "{}", r.serial);
    let m = r.metrics();
    assert_eq!(m["exit"]["reason"], "i8042-reset", "{m}");
    let (run, timer, stop) = (
        phase(m, "first_kvm_run_us"),
        phase(m, "boot_timer_us"),
        phase(m, "guest_stop_us"),
    );
    assert!(run < timer && timer < stop, "phases out of order: {m}");
    assert!(m["vsock"]["conns_opened"].as_u64().unwrap() >= 2, "{m}");
    // Linux decides at once that there is no keyboard controller: a handful of port reads,
    // not the 10,000 polls of the status port seen before the controller was modelled.
    let io_in = m["vcpu_exits"]["io_in"].as_u64().unwrap();
    assert!(io_in < 2_000, "{io_in} port reads during boot: {m}");
    eprintln!(
        "bzImage: first KVM_RUN {:.1} ms, init (boot-timer) {:.1} ms, reboot {:.1} ms, {io_in} port reads",
        run / 1e3,
        timer / 1e3,
        stop / 1e3
    );
}

#[test]
fn pvh_vmlinux_boots_linux_on_two_vcpus_with_kvm_cpuid() {
    if !nested_kvm::test_here_or_in_l1(
        "pvh_vmlinux_boots_linux_on_two_vcpus_with_kvm_cpuid",
        L1_MEM,
        L1_LIMIT,
    ) {
        return;
    }
    let d = scratch();
    let kernel = guest_kernel();
    let vmlinux = kernel
        .vmlinux
        .expect("the kernel build keeps vmlinux (PVH)");
    let initrd = linux_initramfs(&d);
    let vm = Vmm::spawn(
        &d,
        &[
            "--kernel",
            vmlinux.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--mem-mib",
            "256",
            "--vcpus",
            "2",
            "--cmdline",
            "quiet linit_mode=info",
        ],
    );
    let r = vm.finish(GUEST_LIMIT);
    assert_eq!(r.code(), 0, "stderr: {}\nserial: {}", r.stderr(), r.serial);
    assert_no_vmm_errors(&r);
    assert!(r.serial.contains("linit: cpus=2"), "{}", r.serial);
    // CPUID as a production VMM builds it: the hypervisor bit and the TSC-deadline timer
    // (which KVM's in-kernel LAPIC always offers) reach Linux.
    assert!(
        r.serial.contains("hypervisor=1 tsc_deadline_timer=1"),
        "{}",
        r.serial
    );
    assert_eq!(r.metrics()["exit"]["reason"], "i8042-reset");
}

/// Starts the waiting guest (no vsock device: guest memory has no other owner).
fn waiting_guest(d: &std::path::Path, extra: &[&str]) -> Vmm {
    let kernel = guest_kernel();
    let initrd = d.join("initramfs.cpio");
    let mut args = vec![
        "--kernel",
        kernel.bzimage.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem-mib",
        "128",
        "--cmdline",
        "quiet linit_mode=wait",
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Vmm::spawn(d, &args)
}

#[test]
fn stop_at_any_moment_ends_cleanly_with_metrics() {
    if !nested_kvm::test_here_or_in_l1(
        "stop_at_any_moment_ends_cleanly_with_metrics",
        L1_MEM,
        L1_LIMIT,
    ) {
        return;
    }
    let d = scratch();
    linux_initramfs(&d);
    // SIGTERM at several moments: before the VM exists, while the kernel boots, once init
    // runs. Each must end with 128+15, metrics written, and no vCPU error.
    for delay in [Some(0u64), Some(30), Some(400), None] {
        let mut vm = waiting_guest(&d, &[]);
        match delay {
            Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
            None => vm.wait_serial("linit: waiting", GUEST_LIMIT),
        }
        vm.signal(libc::SIGTERM);
        let r = vm.finish(GUEST_LIMIT);
        assert_eq!(
            r.code(),
            128 + libc::SIGTERM,
            "delay {delay:?}: {}",
            r.stderr()
        );
        assert_no_vmm_errors(&r);
        assert_eq!(r.metrics()["exit"]["reason"], "signal", "delay {delay:?}");
    }
    // SIGUSR1 right after spawn must not kill the VMM: it keeps booting to init.
    let mut vm = waiting_guest(&d, &[]);
    std::thread::sleep(Duration::from_millis(10));
    vm.signal(libc::SIGUSR1);
    vm.wait_serial("linit: waiting", GUEST_LIMIT);
    vm.signal(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(200));
    vm.signal(libc::SIGTERM);
    let r = vm.finish(GUEST_LIMIT);
    assert_eq!(r.code(), 128 + libc::SIGTERM, "{}", r.stderr());
    assert_no_vmm_errors(&r);
    // A control-socket stop of a VM without a vsock device, once init runs.
    let ctl = d.join("control.sock");
    let mut vm = waiting_guest(&d, &["--control-sock", ctl.to_str().unwrap()]);
    vm.wait_serial("linit: waiting", GUEST_LIMIT);
    let mut c = UnixStream::connect(&ctl).unwrap();
    c.write_all(b"stop\n").unwrap();
    let mut ans = String::new();
    c.read_to_string(&mut ans).unwrap();
    assert_eq!(ans, "ok\n");
    let r = vm.finish(GUEST_LIMIT);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_no_vmm_errors(&r);
    assert_eq!(r.metrics()["exit"]["reason"], "control-stop");
}

#[test]
fn a_standard_kernel_is_refused_clearly_under_pvm() {
    // Where KVM is PVM, vmm-lite refuses a standard kernel with the reason instead of dying
    // in emulation. (Under hardware KVM the tests above boot it.)
    if vmm_lite::host::kvm_kind() != vmm_lite::host::KvmKind::Pvm {
        eprintln!("not PVM here: the refusal does not apply");
        return;
    }
    let kernel = guest_kernel();
    let out = std::process::Command::new(VMM)
        .arg("--kernel")
        .arg(&kernel.bzimage)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("standard guest kernels cannot boot under PVM"),
        "{err}"
    );
}
