//! Real-Linux test support: the project's guest kernel (built by `sandscope image build`),
//! an initramfs whose `/init` is `tests/guests/linux_init.c` (static), and a VMM process
//! the test talks to while it runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{guests_src, Run, VMM};

/// The cached guest kernel; panics with what to run when it has not been built.
pub fn guest_kernel() -> guest_image::kernel::Kernel {
    let cache = guest_image::cache_dir();
    guest_image::kernel::cached(&cache)
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "no guest kernel in {}: run `cargo run -p sandscope -- image build` (scripts/test does)",
                cache.display()
            )
        })
}

/// Builds the static test init and an initramfs holding it as `/init`, with `/dev/console`
/// and `/dev/mem` nodes and a `/proc` mount point.
pub fn linux_initramfs(dir: &Path) -> PathBuf {
    let init = dir.join("linux_init");
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&init)
        .arg(guests_src().join("linux_init.c"))
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "gcc -static linux_init.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = std::fs::read(&init).unwrap();
    let mut w = guest_image::cpio::Writer::new(Vec::new());
    for d in ["dev", "proc"] {
        w.dir(d, 0o755).unwrap();
    }
    w.char_dev("dev/console", 0o600, 5, 1).unwrap();
    w.char_dev("dev/mem", 0o600, 1, 1).unwrap();
    w.file("init", 0o755, &bin).unwrap();
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, w.finish().unwrap()).unwrap();
    path
}

/// A running vmm-lite with its serial and metrics files in `dir`.
pub struct Vmm {
    pub child: Child,
    pub dir: PathBuf,
    pub start: Instant,
}

impl Vmm {
    /// Starts vmm-lite with `args` plus `--serial-out dir/serial.out --metrics dir/metrics.json`.
    pub fn spawn(dir: &Path, args: &[&str]) -> Vmm {
        let _ = std::fs::remove_file(dir.join("metrics.json"));
        let start = Instant::now();
        let mut cmd = Command::new(VMM);
        cmd.args(args)
            .arg("--serial-out")
            .arg(dir.join("serial.out"))
            .arg("--metrics")
            .arg(dir.join("metrics.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // As the agent launches it: a signal sent right after spawn is never lost.
        vmm_lite::signals::start_blocked(&mut cmd);
        let child = cmd.spawn().expect("spawn vmm-lite");
        Vmm {
            child,
            dir: dir.to_path_buf(),
            start,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The serial output so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join("serial.out")).unwrap_or_default()
    }

    /// Waits until the serial output contains `needle`; panics after `limit` or if the VMM
    /// exits first.
    pub fn wait_serial(&mut self, needle: &str, limit: Duration) {
        let end = Instant::now() + limit;
        loop {
            if self.serial().contains(needle) {
                return;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!(
                    "vmm-lite exited ({s}) before {needle:?}; serial:\n{}",
                    self.serial()
                );
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} on serial within {limit:?}; serial:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the VMM.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for exit (killing it after `limit`) and collects output, serial and metrics.
    pub fn finish(mut self, limit: Duration) -> Run {
        let end = self.start + limit;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > end {
                let _ = self.child.kill();
                let out = self.child.wait_with_output().unwrap();
                panic!(
                    "vmm-lite did not exit within {limit:?}; stderr: {}; serial:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(self.dir.join("serial.out")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let elapsed = self.start.elapsed();
        let serial = self.serial();
        let metrics = std::fs::read(self.dir.join("metrics.json"))
            .ok()
            .map(|b| serde_json::from_slice(&b).expect("metrics JSON parses"));
        let out = self.child.wait_with_output().unwrap();
        Run {
            out,
            serial,
            metrics,
            elapsed,
        }
    }
}
