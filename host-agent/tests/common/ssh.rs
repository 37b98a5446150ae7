//! SSH test helpers: serve the agent's SSH endpoint on an ephemeral port and drive it
//! with the real OpenSSH client, scripted or on a pseudo-terminal.

use host_agent::Agent;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `ssh` and `ssh-keygen` are needed; under CI they must be there.
pub fn have_ssh() -> bool {
    let ok = ["ssh", "ssh-keygen"].iter().all(|b| {
        Command::new(b)
            .arg("-V")
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok()
    });
    if !ok {
        let strict = std::env::var("CI").as_deref() == Ok("true")
            || std::env::var("SANDSCOPE_REQUIRE_SSH").is_ok();
        assert!(
            !strict,
            "openssh-client is required under CI (scripts/test installs it)"
        );
        eprintln!(
            "SKIPPED: the SSH tests need the OpenSSH client (apt-get install openssh-client)"
        );
    }
    ok
}

/// A client key pair in `dir`.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let k = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&k)
        .status()
        .unwrap();
    assert!(st.success());
    k
}

pub fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.with_extension("pub"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// An SSH endpoint served for a test agent, and a client key it accepts.
pub struct SshClient {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub port: u16,
    pub known: PathBuf,
}

impl SshClient {
    /// Serve SSH for `agent` on an ephemeral loopback port, with a fresh host key and one
    /// authorized client key (the agent's `[ssh]` settings otherwise apply).
    pub async fn serve(agent: &Arc<Agent>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = keygen(dir.path(), "id_ok");
        let mut cfg = agent
            .config()
            .ssh
            .clone()
            .unwrap_or_else(host_agent::config::SshConfig::with_defaults);
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.authorized_keys = dir.path().join("authorized_keys");
        cfg.host_key = dir.path().join("host_key");
        std::fs::write(
            &cfg.authorized_keys,
            std::fs::read(key.with_extension("pub")).unwrap(),
        )
        .unwrap();
        let info = host_agent::ssh::start(agent.clone(), &cfg).await.unwrap();
        let known = dir.path().join("known_hosts");
        std::fs::write(
            &known,
            format!("[127.0.0.1]:{} {}\n", info.listen.port(), info.host_key),
        )
        .unwrap();
        Self {
            port: info.listen.port(),
            dir,
            key,
            known,
        }
    }

    /// `ssh` with the options a scripted client needs, logging in as `user` with `key`.
    pub fn cmd(&self, key: &Path, user: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-p"])
            .arg(self.port.to_string())
            .arg("-i")
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])
            .arg(format!("{user}@127.0.0.1"));
        c
    }

    /// Run `ssh USER@agent COMMAND` to completion: (exit code, stdout, stderr).
    pub async fn exec(&self, user: &str, command: &str) -> (i32, String, String) {
        let mut c = self.cmd(&self.key, user);
        c.arg(command).stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || c.output().unwrap())
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A process on a pseudo-terminal we hold the master of, as a user's terminal would be.
pub struct PtyClient {
    master: OwnedFd,
    out: Arc<Mutex<Vec<u8>>>,
    child: std::process::Child,
}

pub fn set_winsize(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

impl PtyClient {
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Self {
        let (mut m, mut s) = (0, 0);
        // SAFETY: openpty writes two fds into the out-pointers; the rest may be null.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just returned by openpty and are owned here.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        set_winsize(slave.as_raw_fd(), rows, cols);
        let sfd = slave.as_raw_fd();
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                let _ = sfd;
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd);
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut reader = std::fs::File::from(master.try_clone().unwrap());
        let o2 = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self { master, out, child }
    }

    pub fn send(&self, s: &str) {
        let mut f = std::fs::File::from(self.master.try_clone().unwrap());
        f.write_all(s.as_bytes()).unwrap();
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Wait until the output (after `from` bytes) contains `pat`; returns the new offset.
    pub async fn expect(&self, from: usize, pat: &str) -> usize {
        let t0 = Instant::now();
        loop {
            let t = self.text();
            if let Some(i) = t.get(from..).and_then(|r| r.find(pat)) {
                return from + i + pat.len();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no `{pat}` in the session output after byte {from}:\n{t}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) {
        // The kernel sends SIGWINCH to the terminal's foreground group (ssh).
        set_winsize(self.master.as_raw_fd(), rows, cols);
    }

    pub async fn wait(mut self) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "ssh did not exit:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
