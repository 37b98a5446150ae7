//! vmm-lite benchmarks: cold start to the boot-timer marker, memory overhead, creation rate,
//! vsock device-model throughput (no KVM) and end-to-end vsock bytes/s with the tiny guest.
//!
//! Run: `cargo bench --manifest-path vmm-lite/Cargo.toml --bench vmm_bench`
//! Set `VMM_LITE_BIN` to measure another build of the binary (e.g. the static dist build).
//! `VMM_LITE_BENCH_RUNS` sets the cold-start sample count (default 100);
//! `VMM_LITE_BENCH_ONLY_DEVICE=1` runs only the no-KVM device-model part.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_lite::boot::create_memory;
use vmm_lite::devices::virtio::mmio::MmioTransport;
use vmm_lite::devices::virtio::test_driver::TestDriver;
use vmm_lite::devices::vsock::muxer::VsockMuxer;
use vmm_lite::devices::vsock::packet::{op, VsockHeader, VsockPacket, HDR_SIZE, TYPE_STREAM};
use vmm_lite::devices::vsock::{VsockBackend, VsockDevice, RXQ, TXQ};
use vmm_lite::devices::IrqLine;
use vmm_lite::metrics::Metrics;

fn vmm_bin() -> PathBuf {
    std::env::var_os("VMM_LITE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(common::VMM))
}

struct Stats {
    median: f64,
    p10: f64,
    p90: f64,
    min: f64,
    max: f64,
}

fn stats(v: &mut [f64]) -> Stats {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Stats {
        median: at(0.5),
        p10: at(0.1),
        p90: at(0.9),
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn show(name: &str, unit: &str, v: &mut [f64]) {
    let s = stats(v);
    println!(
        "{name:<40} median {:>9.3} {unit}  p10 {:>9.3}  p90 {:>9.3}  min {:>9.3}  max {:>9.3}  (n={})",
        s.median,
        s.p10,
        s.p90,
        s.min,
        s.max,
        v.len()
    );
}

fn children_cpu_s() -> f64 {
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid and writable.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn cold_start(dir: &Path, kernel: &Path, runs: usize) {
    println!(
        "\n== cold start: tiny 64-bit ELF guest, 1 vCPU, 128 MiB ({}) ==",
        vmm_bin().display()
    );
    let metrics = dir.join("m.json");
    let (mut marker, mut first_run, mut mem_ready, mut wall) = (vec![], vec![], vec![], vec![]);
    let (mut rss, mut overhead, mut anon_over) = (vec![], vec![], vec![]);
    let mut spawn_marker = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        let t_mono = vmm_lite::metrics::monotonic_ns();
        let st = Command::new(vmm_bin())
            .args([
                "--kernel",
                kernel.to_str().unwrap(),
                "--serial-out",
                "none",
                "--quiet",
            ])
            .arg("--metrics")
            .arg(&metrics)
            .status()
            .unwrap();
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(st.code(), Some(0));
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
        let p = &m["phases"];
        marker.push(p["boot_timer_us"].as_f64().unwrap() / 1e3);
        let start_ns = m["start_monotonic_ns"].as_f64().unwrap();
        let marker_ns = start_ns + p["boot_timer_us"].as_f64().unwrap() * 1e3;
        spawn_marker.push((marker_ns - t_mono as f64) / 1e6);
        first_run.push(p["first_kvm_run_us"].as_f64().unwrap() / 1e3);
        mem_ready.push(p["memory_ready_us"].as_f64().unwrap() / 1e3);
        let mm = &m["memory"];
        rss.push(mm["rss_bytes"].as_f64().unwrap() / 1048576.0);
        overhead.push(mm["overhead_bytes"].as_f64().unwrap() / 1048576.0);
        anon_over.push(mm["anon_overhead_bytes"].as_f64().unwrap_or(0.0) / 1048576.0);
    }
    show("VMM start -> memory ready", "ms", &mut mem_ready);
    show("VMM start -> first KVM_RUN", "ms", &mut first_run);
    show("VMM start -> boot-timer marker", "ms", &mut marker);
    show(
        "spawn (parent clock) -> boot-timer marker",
        "ms",
        &mut spawn_marker,
    );
    show("spawn -> exit (wall, incl. teardown)", "ms", &mut wall);
    println!("\n== memory (at exit, after the guest ran) ==");
    show("RSS", "MiB", &mut rss);
    show("RSS - guest pages touched", "MiB", &mut overhead);
    show("anonymous RSS - guest pages touched", "MiB", &mut anon_over);
}

fn creation_rate(kernel: &Path, runs: usize) {
    for (label, extra) in [
        ("default (teardown in detached helper)", None),
        ("--sync-teardown", Some("--sync-teardown")),
    ] {
        println!("\n== creation rate: start + guest shutdown, sequential, {label} ==");
        let cpu0 = children_cpu_s();
        let t = Instant::now();
        for _ in 0..runs {
            let st = Command::new(vmm_bin())
                .args([
                    "--kernel",
                    kernel.to_str().unwrap(),
                    "--serial-out",
                    "none",
                    "--quiet",
                ])
                .args(extra)
                .status()
                .unwrap();
            assert_eq!(st.code(), Some(0));
        }
        let wall = t.elapsed().as_secs_f64();
        let cpu = children_cpu_s() - cpu0;
        println!(
            "{runs} microVMs in {wall:.3} s wall: {:.1} VMs/s wall; {cpu:.3} CPU-s: {:.1} VMs/s per core",
            runs as f64 / wall,
            runs as f64 / cpu
        );
    }
}

/// A backend that swallows TX and produces RX packets of a fixed size on demand.
struct Sink {
    rx_left: usize,
    rx_size: usize,
}

impl VsockBackend for Sink {
    fn send_pkt(&mut self, pkt: &VsockPacket) {
        std::hint::black_box(pkt.data.len());
    }
    fn recv_pkt(&mut self, pkt: &mut VsockPacket, max_data: usize) -> bool {
        if self.rx_left == 0 {
            return false;
        }
        self.rx_left -= 1;
        pkt.hdr = VsockHeader {
            op: op::RW,
            type_: TYPE_STREAM,
            src_port: 52,
            dst_port: 1024,
            ..Default::default()
        };
        pkt.data.resize(self.rx_size.min(max_data), 0xab);
        true
    }
    fn has_pending_rx(&self) -> bool {
        self.rx_left > 0
    }
    fn as_raw_fd(&self) -> i32 {
        -1
    }
    fn process_events(&mut self) {}
}

fn guest_hdr(op: u16, len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: 3,
        dst_cid: 2,
        src_port: 1024,
        dst_port: 52,
        len,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 1 << 30,
        ..Default::default()
    }
}

/// TX: the guest queues `batch` packets of `size` bytes, the device drains them.
fn device_tx<B: VsockBackend>(
    t: &mut MmioTransport<VsockDevice<B>>,
    drv: &mut TestDriver,
    size: usize,
    iters: usize,
) -> (f64, f64) {
    let batch = 128usize;
    let buf = 0x20_0000u64;
    drv.mem
        .write_slice(
            &guest_hdr(op::RW, size as u32).to_bytes(),
            GuestAddress(buf),
        )
        .unwrap();
    drv.mem
        .write_slice(&vec![0x11u8; size], GuestAddress(buf + 44))
        .unwrap();
    let t0 = Instant::now();
    let mut n = 0usize;
    while n < iters {
        for _ in 0..batch {
            if size == 0 {
                drv.add_chain(TXQ, &[(buf, HDR_SIZE as u32, false)]);
            } else {
                drv.add_chain(
                    TXQ,
                    &[
                        (buf, HDR_SIZE as u32, false),
                        (buf + 44, size as u32, false),
                    ],
                );
            }
        }
        t.device_mut().process_queue_event(TXQ);
        drv.take_used(TXQ);
        n += batch;
    }
    let s = t0.elapsed().as_secs_f64();
    (s * 1e9 / n as f64, (n * size) as f64 / s / 1048576.0)
}

fn device_model() {
    println!("\n== vsock device model (no KVM, plain guest memory) ==");
    for &size in &[0usize, 4096, 65536] {
        let mem = create_memory(64).unwrap();
        let m = Arc::new(Metrics::default());
        let dev = VsockDevice::new(
            3,
            mem.clone(),
            Sink {
                rx_left: 0,
                rx_size: 0,
            },
            m.clone(),
        )
        .unwrap();
        let mut t = MmioTransport::new(dev, IrqLine::new().unwrap(), m).unwrap();
        let mut drv = TestDriver::new(mem, 3, 256);
        drv.init(&mut t);
        let iters = if size >= 65536 { 20_000 } else { 200_000 };
        let (ns, mibs) = device_tx(&mut t, &mut drv, size, iters);
        println!("TX guest->backend {size:>6} B payload: {ns:>9.0} ns/packet  {mibs:>9.1} MiB/s");
    }
    for &size in &[0usize, 4096, 65536 - 44] {
        let mem = create_memory(64).unwrap();
        let m = Arc::new(Metrics::default());
        let iters = if size >= 60000 { 20_000 } else { 200_000 };
        let sink = Sink {
            rx_left: iters,
            rx_size: size,
        };
        let dev = VsockDevice::new(3, mem.clone(), sink, m.clone()).unwrap();
        let mut t = MmioTransport::new(dev, IrqLine::new().unwrap(), m).unwrap();
        let mut drv = TestDriver::new(mem, 3, 256);
        drv.init(&mut t);
        let blen = (HDR_SIZE + size) as u32;
        let t0 = Instant::now();
        let mut done = 0;
        while done < iters {
            for i in 0..128u64 {
                drv.add_chain(RXQ, &[(0x20_0000 + i * 0x10000, blen, true)]);
            }
            t.device_mut().process_queue_event(RXQ);
            done += drv.take_used(RXQ).len();
        }
        let s = t0.elapsed().as_secs_f64();
        println!(
            "RX backend->guest {size:>6} B payload: {:>9.0} ns/packet  {:>9.1} MiB/s",
            s * 1e9 / done as f64,
            (done * size) as f64 / s / 1048576.0
        );
    }
    // Through the Unix muxer into a real socket, guest -> host.
    let dir = common::scratch();
    let uds = dir.join("b.sock");
    let l = UnixListener::bind(format!("{}_52", uds.display())).unwrap();
    let mem = create_memory(64).unwrap();
    let m = Arc::new(Metrics::default());
    let mux = VsockMuxer::new(3, &uds, m.clone()).unwrap();
    let dev = VsockDevice::new(3, mem.clone(), mux, m.clone()).unwrap();
    let mut t = MmioTransport::new(dev, IrqLine::new().unwrap(), m).unwrap();
    let mut drv = TestDriver::new(mem, 3, 256);
    drv.init(&mut t);
    let buf = 0x20_0000u64;
    drv.mem
        .write_slice(&guest_hdr(op::REQUEST, 0).to_bytes(), GuestAddress(buf))
        .unwrap();
    drv.add_chain(TXQ, &[(buf, 44, false)]);
    for i in 0..64u64 {
        drv.add_chain(RXQ, &[(0x40_0000 + i * 0x11000, 0x11000, true)]);
    }
    t.device_mut().process_queue_event(TXQ);
    let (mut host, _) = l.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    // Single-threaded: the host end is drained in the same loop, so the figure is the cost
    // of the device + muxer + socket syscalls, not of cross-core wake-ups.
    let total = 256usize << 20;
    let size = 65536usize;
    let mut sink = vec![0u8; 1 << 20];
    let mut received = 0usize;
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut fwd = 0u32;
    while received < total {
        if sent < total && (sent as u32).wrapping_sub(fwd) as usize + size <= 192 * 1024 {
            let h = guest_hdr(op::RW, size as u32);
            drv.mem
                .write_slice(&h.to_bytes(), GuestAddress(buf))
                .unwrap();
            drv.add_chain(TXQ, &[(buf, 44, false), (buf + 44, size as u32, false)]);
            t.device_mut().process_queue_event(TXQ);
            drv.take_used(TXQ);
            sent += size;
        }
        loop {
            match host.read(&mut sink) {
                Ok(n) if n > 0 => received += n,
                _ => break,
            }
        }
        t.device_mut().process_backend_event();
        let mut starved = (sent as u32).wrapping_sub(fwd) as usize + size > 192 * 1024;
        for (id, _) in drv.take_used(RXQ) {
            let a = 0x40_0000 + u64::from(id) * 0x11000;
            let mut hb = [0u8; 44];
            drv.mem.read_slice(&mut hb, GuestAddress(a)).unwrap();
            fwd = fwd.max(VsockHeader::from_bytes(&hb).fwd_cnt);
            drv.add_chain(RXQ, &[(a, 0x11000, true)]);
            starved = false;
        }
        if starved && sent < total {
            let h = guest_hdr(op::CREDIT_REQUEST, 0);
            drv.mem
                .write_slice(&h.to_bytes(), GuestAddress(0x30_0000))
                .unwrap();
            drv.add_chain(TXQ, &[(0x30_0000, 44, false)]);
            t.device_mut().process_queue_event(TXQ);
            drv.take_used(TXQ);
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "TX guest->muxer->Unix socket, 64 KiB packets: {:>9.1} MiB/s",
        total as f64 / s / 1048576.0
    );
}

fn end_to_end(dir: &Path) {
    println!("\n== end to end: tiny guest (emulated under PVM) echoing over vsock ==");
    let k = common::vsock_guest(dir);
    let uds = dir.join("e.sock");
    let l = UnixListener::bind(format!("{}_5200", uds.display())).unwrap();
    let mut child = Command::new(vmm_bin())
        .args([
            "--kernel",
            k.to_str().unwrap(),
            "--vsock-cid",
            "3",
            "--serial-out",
            "none",
        ])
        .args(["--quiet", "--vsock-uds"])
        .arg(&uds)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t_spawn = Instant::now();
    let (mut c, _) = l.accept().unwrap();
    let connect_ms = t_spawn.elapsed().as_secs_f64() * 1e3;
    let mut hello = [0u8; 17];
    c.read_exact(&mut hello).unwrap();
    // Round trip latency of small messages.
    let mut rtts = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Streaming echo.
    let total = 128 * 1024;
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&vec![0x5au8; total]).unwrap();
    });
    let t = Instant::now();
    let mut got = 0;
    let mut b = vec![0u8; 65536];
    while got < total {
        got += c.read(&mut b).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    writer.join().unwrap();
    drop(c);
    let mut s2 = loop {
        match UnixStream::connect(&uds) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    s2.write_all(b"CONNECT 6000\n").unwrap();
    let mut ok = [0u8; 14];
    s2.read_exact(&mut ok).unwrap();
    drop(s2);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    println!("spawn -> guest connection accepted on host: {connect_ms:.2} ms");
    show("1-byte echo round trip", "us", &mut rtts);
    println!(
        "echo throughput (host -> guest -> host), {} KiB: {:.1} KiB/s",
        total / 1024,
        total as f64 / s / 1024.0
    );
}

fn main() {
    if std::env::var_os("VMM_LITE_BENCH_ONLY_DEVICE").is_some() {
        device_model();
        return;
    }
    // `cargo bench` passes --bench; ignore arguments.
    let runs: usize = std::env::var("VMM_LITE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    println!(
        "vmm-lite benchmarks (host KVM: {})",
        vmm_lite::host::kvm_kind().name()
    );
    let dir = common::scratch();
    let elf = common::elf64(&dir, &[]);
    if Path::new("/dev/kvm").exists() {
        cold_start(&dir, &elf, runs);
        creation_rate(&elf, runs);
    } else {
        println!("SKIPPED: KVM benchmarks: /dev/kvm not available");
    }
    device_model();
    if Path::new("/dev/kvm").exists() {
        end_to_end(&dir);
    }
}
