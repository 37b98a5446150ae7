//! Booting L1 with one command and collecting what it printed and its exit status.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::initramfs::{self, EXIT_MARKER, ROOT_TAG};
use crate::{io_err, l1kernel, shell_quote, NestedError, QEMU};

/// Most console bytes kept for [`Outcome::console`]; older output is dropped from the front.
const MAX_CONSOLE: usize = 16 << 20;

/// One command to run inside L1 (builder).
#[derive(Debug, Clone)]
pub struct Run {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    writable: Vec<PathBuf>,
    mem_mib: u32,
    cpus: u32,
    timeout: Duration,
    echo: bool,
}

/// What an L1 run printed and how it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The command's exit status inside L1 (125: the harness itself failed in L1).
    pub status: i32,
    /// Everything L1's console printed (the command's stdout and stderr, kernel warnings).
    pub console: String,
    /// QEMU start to QEMU exit.
    pub elapsed: Duration,
}

impl Outcome {
    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.console, n)
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Run {
    /// Runs `program` (a host path, seen at the same path in L1).
    pub fn new(program: impl AsRef<Path>) -> Self {
        Run {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            writable: Vec::new(),
            mem_mib: 2048,
            cpus: 1,
            timeout: Duration::from_secs(300),
            echo: true,
        }
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Sets an environment variable for the command (the environment is otherwise empty
    /// but for a default PATH).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(x, _)| x != k);
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Working directory (default `/`).
    pub fn cwd(mut self, d: impl AsRef<Path>) -> Self {
        self.cwd = Some(d.as_ref().to_path_buf());
        self
    }

    /// Mounts a fresh tmpfs over `dir` in L1 (created on the host if missing, so that it
    /// exists in the read-only share). `/run` is always writable, and so is `/tmp` or,
    /// when the run needs the host's `/tmp` (a checkout there), `$TMPDIR`.
    pub fn writable(mut self, dir: impl AsRef<Path>) -> Self {
        self.writable.push(dir.as_ref().to_path_buf());
        self
    }

    /// L1 memory, MiB (default 2048).
    pub fn mem_mib(mut self, m: u32) -> Self {
        self.mem_mib = m;
        self
    }

    /// L1 vCPUs (default 1; each is a host thread under TCG).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n.max(1);
        self
    }

    /// Bound on the whole run, boot included (default 300 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Whether console lines are copied to this process's stderr as they come (default on).
    pub fn echo(mut self, on: bool) -> Self {
        self.echo = on;
        self
    }

    /// The shell script L1 runs chrooted into the host's root.
    pub fn script(&self) -> String {
        let mut s = String::from("#!/bin/sh\n# written by nested-kvm\n");
        // A fresh /tmp, unless something this run needs lives under the host's /tmp (a
        // checkout there, say): then /tmp stays the host's, read-only, and TMPDIR points
        // to a tmpfs instead.
        if self.needs_host_tmp() {
            s.push_str(
                "mkdir -p /run/l1/tmp && chmod 1777 /run/l1/tmp && export TMPDIR=/run/l1/tmp\n",
            );
        } else {
            s.push_str("mount -t tmpfs -o mode=1777 tmpfs /tmp || { echo \"nested-kvm: cannot mount tmpfs on /tmp\"; exit 125; }\n");
        }
        for d in &self.writable {
            let q = shell_quote(&d.to_string_lossy());
            s.push_str(&format!(
                "mount -t tmpfs -o mode=1777 tmpfs {q} || {{ echo \"nested-kvm: cannot mount tmpfs on {q}\"; exit 125; }}\n"
            ));
        }
        if !self.env.iter().any(|(k, _)| k == "PATH") {
            s.push_str(
                "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
            );
        }
        for (k, v) in &self.env {
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                s.push_str(&format!("export {k}={}\n", shell_quote(v)));
            }
        }
        let cwd = self
            .cwd
            .as_deref()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        let q = shell_quote(&cwd);
        s.push_str(&format!(
            "cd {q} || {{ echo \"nested-kvm: no directory {q}\"; exit 125; }}\n"
        ));
        s.push_str("exec");
        s.push(' ');
        s.push_str(&shell_quote(&self.program.to_string_lossy()));
        for a in &self.args {
            s.push(' ');
            s.push_str(&shell_quote(a));
        }
        s.push('\n');
        s
    }

    /// Whether the program, the working directory, a writable directory or a path in the
    /// environment lies under `/tmp`.
    fn needs_host_tmp(&self) -> bool {
        let under = |p: &str| p == "/tmp" || p.starts_with("/tmp/");
        under(&self.program.to_string_lossy())
            || self
                .cwd
                .as_deref()
                .is_some_and(|c| under(&c.to_string_lossy()))
            || self.writable.iter().any(|w| under(&w.to_string_lossy()))
            || self.env.iter().any(|(_, v)| v.split(':').any(under))
    }

    /// Boots L1, runs the command and waits for it. An `Err` means no exit status came
    /// back (timeout, QEMU failure, L1 crash); it carries the last console lines.
    pub fn run(&self) -> Result<Outcome, NestedError> {
        let qemu = crate::which(QEMU).ok_or(NestedError::MissingTool {
            tool: QEMU,
            hint: "scripts/guest-deps installs qemu-system-x86",
        })?;
        let kernel = l1kernel::prepare()?;
        let base = initramfs::base(&kernel)?;
        for d in &self.writable {
            std::fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let work = std::env::temp_dir().join(format!(
            "sandscope-l1-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&work).map_err(io_err(format!("create {}", work.display())))?;
        let initrd = work.join("initrd.cpio");
        initramfs::with_script(&base, &self.script(), &initrd)?;
        let r = self.boot(&qemu, &kernel.vmlinuz, &initrd);
        let _ = std::fs::remove_dir_all(&work);
        r
    }

    fn boot(&self, qemu: &Path, vmlinuz: &Path, initrd: &Path) -> Result<Outcome, NestedError> {
        let start = Instant::now();
        let mut child = Command::new(qemu)
            .args(["-accel", "tcg", "-cpu", "max", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .arg("-smp")
            .arg(self.cpus.to_string())
            .arg("-m")
            .arg(self.mem_mib.to_string())
            .arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg("console=ttyS0 panic=-1 quiet loglevel=3")
            .arg("-virtfs")
            .arg(format!(
                "local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("cannot start {}", qemu.display())))?;
        let console = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let reader = {
            let console = console.clone();
            let echo = self.echo;
            std::thread::spawn(move || collect(stdout, &console, echo, ""))
        };
        let err_reader = {
            let console = console.clone();
            std::thread::spawn(move || collect(stderr, &console, true, "qemu: "))
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if start.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(io_err("waiting for QEMU")(e)),
            }
        };
        let _ = reader.join();
        let _ = err_reader.join();
        let console = std::mem::take(&mut *console.lock().unwrap_or_else(|e| e.into_inner()));
        let elapsed = start.elapsed();
        let Some(qemu_status) = status else {
            return Err(NestedError::Run {
                reason: format!("L1 timed out after {:.0} s", self.timeout.as_secs_f64()),
                tail: tail(&console, 40),
            });
        };
        match exit_status(&console) {
            Some(status) => Ok(Outcome {
                status,
                console,
                elapsed,
            }),
            None => Err(NestedError::Run {
                reason: format!("L1 ended without reporting an exit status (QEMU {qemu_status})"),
                tail: tail(&console, 40),
            }),
        }
    }
}

/// The status in the last exit marker of `console`.
pub fn exit_status(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .find_map(|l| l.split(EXIT_MARKER).nth(1))
        .and_then(|r| r.trim().parse().ok())
}

fn collect(r: impl std::io::Read, console: &Mutex<String>, echo: bool, prefix: &str) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        if echo {
            let mut e = std::io::stderr().lock();
            let _ = writeln!(e, "{prefix}{line}");
        }
        let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
        c.push_str(prefix);
        c.push_str(line);
        c.push('\n');
        if c.len() > MAX_CONSOLE {
            let cut = c.len() - MAX_CONSOLE / 2;
            let cut = (cut..c.len()).find(|&i| c.is_char_boundary(i)).unwrap_or(0);
            c.drain(..cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_marker_is_read_from_the_last_report() {
        assert_eq!(exit_status("x\nsandscope-l1: exit=3\n"), Some(3));
        assert_eq!(
            exit_status("no newline beforesandscope-l1: exit=0\r\n"),
            Some(0)
        );
        assert_eq!(
            exit_status("sandscope-l1: exit=1\nsandscope-l1: exit=7\n"),
            Some(7)
        );
        assert_eq!(exit_status("Kernel panic\n"), None);
        assert_eq!(exit_status("sandscope-l1: exit=x\n"), None);
    }

    #[test]
    fn script_mounts_exports_and_execs_quoted() {
        let s = Run::new("/t/bin")
            .args(["a b", "it's"])
            .env("SANDSCOPE_X", "1 2")
            .env("bad name", "x")
            .cwd("/w d")
            .writable("/target/tmp")
            .script();
        assert!(
            s.contains("mount -t tmpfs -o mode=1777 tmpfs /target/tmp ||"),
            "{s}"
        );
        assert!(s.contains("export SANDSCOPE_X='1 2'\n"), "{s}");
        assert!(!s.contains("bad name"), "{s}");
        assert!(s.contains("export PATH="), "{s}");
        assert!(s.contains("cd '/w d' ||"), "{s}");
        assert!(s.ends_with("exec /t/bin 'a b' 'it'\\''s'\n"), "{s}");
        assert!(s.contains("tmpfs /tmp ||"), "{s}");
        assert!(!s.contains("TMPDIR"), "{s}");
    }

    #[test]
    fn a_run_from_under_tmp_keeps_the_hosts_tmp_and_gets_a_tmpdir() {
        for r in [
            Run::new("/tmp/ci/target/debug/deps/t"),
            Run::new("/t").cwd("/tmp/ci"),
            Run::new("/t").writable("/tmp/ci/target/tmp"),
            Run::new("/t").env("SANDSCOPE_PROBE", "/tmp/ci/target/probe"),
        ] {
            let s = r.script();
            assert!(!s.contains("tmpfs /tmp ||"), "{s}");
            assert!(s.contains("export TMPDIR=/run/l1/tmp"), "{s}");
        }
        assert!(!Run::new("/t").env("X", "/tmpfoo").needs_host_tmp());
    }
}
