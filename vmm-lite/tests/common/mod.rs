//! Shared test infrastructure: builds the tiny guests from tests/guests/ with gcc/ld and
//! runs the real `vmm-lite` binary against /dev/kvm.
#![allow(dead_code)]

pub mod linux;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm-lite");

pub fn guests_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests")
}

/// A per-process scratch directory under target/ (nextest runs each test in its own process).
pub fn scratch() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Guest image formats the suite builds.
#[derive(Clone, Copy)]
pub enum Kind {
    /// ELF linked at 1 MiB by elf.ld.
    Elf,
    /// Flat bzImage linked by bzimage.ld.
    BzImage,
}

/// Builds guest `src` (a .S or .c list in tests/guests) into `dir/name`.
pub fn build_guest(dir: &Path, name: &str, srcs: &[&str], defines: &[&str], kind: Kind) -> PathBuf {
    let g = guests_src();
    let mut objs = Vec::new();
    for (i, s) in srcs.iter().enumerate() {
        let obj = dir.join(format!("{name}.{i}.o"));
        let mut c = Command::new("gcc");
        c.args([
            "-c",
            "-m64",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-nostdlib",
        ])
        .args([
            "-Os",
            "-mgeneral-regs-only",
            "-mno-red-zone",
            "-fno-stack-protector",
        ])
        .args(["-fno-asynchronous-unwind-tables", "-mcmodel=small"])
        .arg("-I")
        .arg(&g);
        for d in defines {
            c.arg(format!("-D{d}"));
        }
        c.arg("-o").arg(&obj).arg(g.join(s));
        run_tool(&mut c);
        objs.push(obj);
    }
    let out = dir.join(name);
    let mut l = Command::new("ld");
    l.args([
        "--no-warn-rwx-segments",
        "-z",
        "noexecstack",
        "-nostdlib",
        "-static",
    ]);
    match kind {
        Kind::Elf => l.arg("-T").arg(g.join("elf.ld")),
        Kind::BzImage => l
            .arg("-T")
            .arg(g.join("bzimage.ld"))
            .arg("--oformat")
            .arg("binary"),
    };
    l.arg("-o").arg(&out).args(&objs);
    run_tool(&mut l);
    out
}

pub fn elf64(dir: &Path, defines: &[&str]) -> PathBuf {
    let name = format!("elf64{}", defines.join("_").replace('=', ""));
    build_guest(dir, &name, &["elf64.S"], defines, Kind::Elf)
}

pub fn pvh(dir: &Path) -> PathBuf {
    build_guest(dir, "pvh", &["pvh.S"], &[], Kind::Elf)
}

pub fn bzimage(dir: &Path) -> PathBuf {
    build_guest(dir, "bzImage", &["bzimage.S"], &[], Kind::BzImage)
}

/// True when /dev/kvm exists; otherwise prints the SKIPPED line.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("SKIPPED: {test}: /dev/kvm not available");
        false
    }
}

/// Output of a VMM run plus its serial and metrics files.
pub struct Run {
    pub out: Output,
    pub serial: String,
    pub metrics: Option<serde_json::Value>,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn metrics(&self) -> &serde_json::Value {
        self.metrics.as_ref().expect("metrics file written")
    }
}

/// Runs vmm-lite with `args` plus serial/metrics files in `dir`, with a timeout.
pub fn run_vmm(dir: &Path, args: &[&str]) -> Run {
    let serial = dir.join("serial.out");
    let metrics = dir.join("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let start = Instant::now();
    let mut child = Command::new(VMM)
        .args(args)
        .arg("--serial-out")
        .arg(&serial)
        .arg("--metrics")
        .arg(&metrics)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm-lite");
    let deadline = start + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmm-lite did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = start.elapsed();
    let out = child.wait_with_output().unwrap();
    Run {
        out,
        serial: std::fs::read_to_string(&serial).unwrap_or_default(),
        metrics: std::fs::read(&metrics)
            .ok()
            .map(|b| serde_json::from_slice(&b).expect("metrics JSON parses")),
        elapsed,
    }
}

/// The tiny guest with a virtio-mmio vsock driver (entry64.S + vsock_guest.c).
pub fn vsock_guest(dir: &Path) -> PathBuf {
    build_guest(
        dir,
        "vsock_guest",
        &["entry64.S", "vsock_guest.c"],
        &[],
        Kind::Elf,
    )
}

/// The guest that counts vCPUs in the MP table and exits with the count.
pub fn mpcount(dir: &Path) -> PathBuf {
    build_guest(dir, "mpcount", &["mpcount.S"], &[], Kind::Elf)
}

/// The guest that probes the i8042 like Linux (flush, then kb_wait) and resets through it.
pub fn i8042probe(dir: &Path) -> PathBuf {
    build_guest(dir, "i8042probe", &["i8042probe.S"], &[], Kind::Elf)
}

/// The guest that prints CPUID leaves to the serial port and checks the KVM signature.
pub fn cpuid_dump(dir: &Path) -> PathBuf {
    build_guest(dir, "cpuid", &["cpuid.S"], &[], Kind::Elf)
}

/// Runs every test of the calling test binary but `name` inside one nested L1 (real KVM)
/// and checks that some ran and all passed; nothing on a hardware-KVM host, where they
/// already ran directly.
pub fn suite_under_nested_kvm(name: &str) {
    let passed = nested_kvm::suite_in_l1(name, 1024, Duration::from_secs(600));
    if !nested_kvm::hardware_kvm() && nested_kvm::unavailable().is_none() {
        assert!(passed > 0, "no test ran inside L1");
    }
}
