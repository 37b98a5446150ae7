//! KVM integration test: a tiny guest with its own virtio-mmio vsock driver talks to host
//! Unix sockets through vmm-lite's muxer, in both directions (Firecracker hybrid vsock).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn connect_retry(path: &std::path::Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

#[test]
fn tiny_guest_vsock_driver_connects_out_and_accepts_host_connect() {
    if !kvm_available("vsock") {
        return;
    }
    let d = scratch();
    let k = vsock_guest(&d);
    let uds = d.join("v.sock");
    // A stale socket from an earlier run must not block the start.
    drop(UnixListener::bind(&uds).unwrap());
    let l = UnixListener::bind(format!("{}_5200", uds.display())).unwrap();
    let metrics = d.join("m.json");
    let serial = d.join("serial.out");
    let mut child = Command::new(VMM)
        .args([
            "--kernel",
            k.to_str().unwrap(),
            "--vsock-cid",
            "3",
            "--vsock-uds",
        ])
        .arg(&uds)
        .arg("--metrics")
        .arg(&metrics)
        .arg("--serial-out")
        .arg(&serial)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // (a) guest -> host: the guest connects to CID 2 port 5200 and says hello.
    l.set_nonblocking(false).unwrap();
    let (mut c, _) = l.accept().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "hello from guest\n");
    c.write_all(b"ping 1234\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "ping 1234\n", "guest echoes");
    drop(r);
    drop(c);

    // (b) host -> guest: CONNECT 6000, get OK <port>, exchange bytes.
    let mut s = connect_retry(&uds);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"CONNECT 6000\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    line.clear();
    r.read_line(&mut line).unwrap();
    let port: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad reply {line:?}"));
    assert!(port >= 1 << 30);
    s.write_all(b"data from host\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "data from host\n");
    drop(r);
    drop(s);

    let st = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let out = std::fs::read_to_string(&serial).unwrap();
    assert_eq!(st.code(), Some(0), "serial: {out}\nstderr: {err}");
    assert!(out.contains("vsock guest: done"), "{out}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    let v = &m["vsock"];
    assert!(v["conns_opened"].as_u64().unwrap() >= 2, "{m}");
    assert_eq!(v["malformed"], 0, "{m}");
    assert!(v["tx_bytes"].as_u64().unwrap() >= 17 + 10 + 15, "{m}");
    assert!(v["rx_bytes"].as_u64().unwrap() >= 10 + 15, "{m}");
    assert!(!uds.exists(), "vsock socket removed on exit");
}

/// Every other test in this file, once more inside an L1 VM whose KVM is real (nested):
/// what passes under PVM must pass under hardware virtualization too.
#[test]
fn the_suite_passes_under_nested_kvm() {
    common::suite_under_nested_kvm("the_suite_passes_under_nested_kvm");
}
