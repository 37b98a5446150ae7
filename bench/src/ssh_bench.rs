//! SSH into a live sandbox vs a local OpenSSH sshd, both driven by the same OpenSSH
//! client in the same run: `ssh HOST true` round trip, `ssh -tt` start → first byte of
//! the prompt, and keystroke echo round trip (client → server → PTY → back).

use crate::stats::{ms, Summary, Table, SUMMARY_HEADER};
use anyhow::{bail, Context};
use host_agent::config::{AgentConfig, SshConfig};
use host_agent::{Agent, InvokeOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where to log in.
struct Target {
    name: String,
    port: u16,
    user: String,
    known: PathBuf,
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{:?} failed: {st}", cmd.get_program());
    }
    Ok(())
}

fn ssh_cmd(t: &Target, key: &Path) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-p"])
        .arg(t.port.to_string())
        .arg("-i")
        .arg(key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", t.known.display()))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])
        .arg(format!("{}@127.0.0.1", t.user));
    c
}

/// `ssh` on a new pseudo-terminal (as an interactive user runs it); returns the master.
fn spawn_on_pty(mut cmd: Command) -> anyhow::Result<(OwnedFd, Child)> {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two fds into the out-pointers; the rest may be null.
    if unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    } != 0
    {
        bail!("openpty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just returned by openpty and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().context("spawning ssh")?;
    Ok((master, child))
}

/// Read from `fd` until `done(buffer)` or `limit` passes.
fn read_until(fd: &OwnedFd, limit: Duration, done: impl Fn(&[u8]) -> bool) -> anyhow::Result<()> {
    let mut f = std::fs::File::from(fd.try_clone()?);
    let mut buf = Vec::new();
    let t0 = Instant::now();
    let mut chunk = [0u8; 4096];
    while !done(&buf) {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            bail!(
                "timed out; got {:?}",
                String::from_utf8_lossy(&buf[buf.len().saturating_sub(200)..])
            );
        }
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) } <= 0 {
            continue;
        }
        let n = f.read(&mut chunk)?;
        if n == 0 {
            bail!("session closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

fn end_session(master: &OwnedFd, mut child: Child) {
    let mut f = std::fs::File::from(master.try_clone().expect("dup master"));
    let _ = f.write_all(b"\x15exit\n");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct Figures {
    exec: Vec<f64>,
    first_byte: Vec<f64>,
    echo: Vec<f64>,
}

fn measure(t: &Target, key: &Path, runs: usize, keystrokes: usize) -> anyhow::Result<Figures> {
    let mut f = Figures {
        exec: Vec::new(),
        first_byte: Vec::new(),
        echo: Vec::new(),
    };
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = ssh_cmd(t, key).arg("true").stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "{}: ssh true: {}",
                t.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        f.exec.push(t0.elapsed().as_nanos() as f64 / 1000.0);
    }
    for _ in 0..runs {
        let mut c = ssh_cmd(t, key);
        c.arg("-tt").env("TERM", "vt100");
        let t0 = Instant::now();
        let (master, child) = spawn_on_pty(c)?;
        read_until(&master, Duration::from_secs(10), |b| !b.is_empty())
            .with_context(|| format!("{}: first byte", t.name))?;
        f.first_byte.push(t0.elapsed().as_nanos() as f64 / 1000.0);
        end_session(&master, child);
    }
    // One interactive session; each keystroke waits for its echo.
    let mut c = ssh_cmd(t, key);
    c.arg("-tt").env("TERM", "vt100");
    let (master, child) = spawn_on_pty(c)?;
    read_until(&master, Duration::from_secs(10), |b| {
        b.ends_with(b"# ") || b.ends_with(b"$ ")
    })
    .with_context(|| format!("{}: prompt", t.name))?;
    let mut w = std::fs::File::from(master.try_clone()?);
    for i in 0..keystrokes {
        let ch = b'a' + (i % 26) as u8;
        let t0 = Instant::now();
        w.write_all(&[ch])?;
        read_until(&master, Duration::from_secs(5), |b| b.contains(&ch))
            .with_context(|| format!("{}: echo", t.name))?;
        f.echo.push(t0.elapsed().as_nanos() as f64 / 1000.0);
        if i % 60 == 59 {
            // Clear the line (Ctrl-U) so it does not wrap.
            w.write_all(b"\x15")?;
            std::thread::sleep(Duration::from_millis(20));
            let mut junk = [0u8; 4096];
            let mut p = libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            while unsafe { libc::poll(&mut p, 1, 20) } > 0 {
                let mut r = std::fs::File::from(master.try_clone()?);
                if r.read(&mut junk)? == 0 {
                    break;
                }
            }
        }
    }
    end_session(&master, child);
    Ok(f)
}

/// Start a local sshd (OpenSSH) on an ephemeral port, for the same client and key.
fn start_sshd(dir: &Path, pubkey: &Path) -> anyhow::Result<(Child, Target)> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        bail!("/usr/sbin/sshd is missing (apt-get install openssh-server)");
    }
    std::fs::create_dir_all("/run/sshd")?;
    let hostkey = dir.join("sshd_host_key");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&hostkey),
    )?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f", "/dev/null", "-p"])
        .arg(port.to_string())
        .arg("-h")
        .arg(&hostkey)
        .arg("-o")
        .arg(format!("AuthorizedKeysFile={}", pubkey.display()))
        .args([
            "-o",
            "ListenAddress=127.0.0.1",
            "-o",
            "StrictModes=no",
            "-o",
            "UsePAM=no",
            "-o",
            "PidFile=none",
            "-o",
            "PermitRootLogin=prohibit-password",
            "-o",
            "PrintMotd=no",
            "-o",
            "PrintLastLog=no",
            // The same shell the sandbox runs (/bin/sh), not root's bash.
            "-o",
            "ForceCommand=exec /bin/sh -l",
        ])
        .stderr(Stdio::null())
        .spawn()
        .context("starting sshd")?;
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("sshd did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pubhost = std::fs::read_to_string(hostkey.with_extension("pub"))?;
    let known = dir.join("known_sshd");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {pubhost}"))?;
    Ok((
        child,
        Target {
            name: "local sshd".into(),
            port,
            user: "root".into(),
            known,
        },
    ))
}

/// `sandscope-bench ssh`.
pub fn ssh(runs: usize, keystrokes: usize) -> anyhow::Result<Vec<Table>> {
    if !host_agent::util::is_root() {
        bail!("the SSH benchmark needs root (namespace sandboxes, sshd)");
    }
    let dir = tempfile::Builder::new()
        .prefix("sandscope-sshbench-")
        .tempdir()?;
    let key = dir.path().join("id");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key),
    )
    .context("ssh-keygen (apt-get install openssh-client)")?;
    let code = dir.path().join("code");
    std::fs::create_dir_all(&code)?;
    let h = code.join("handler.sh");
    std::fs::write(&h, "#!/bin/sh\ncat >/dev/null\necho '{}'\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o755))?;
    let toml = format!(
        "[agent]\nstate_dir = \"{}\"\ndriver = \"process\"\n\n\
         [[functions]]\nname = \"noop\"\nhandler = \"./handler.sh\"\ncode = \"code\"\n\
         [functions.pool]\nkeep_alive_s = 3600\n",
        dir.path().join("state").display()
    );
    let cfg_path = dir.path().join("sandscope.toml");
    std::fs::write(&cfg_path, toml)?;
    let cfg = AgentConfig::load(&cfg_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (agent, target) = rt.block_on(async {
        let agent = Agent::start(cfg).await?;
        let ssh_cfg = SshConfig {
            listen: "127.0.0.1:0".parse()?,
            authorized_keys: key.with_extension("pub"),
            host_key: dir.path().join("agent_host_key"),
            ..SshConfig::with_defaults()
        };
        let info = host_agent::ssh::start(agent.clone(), &ssh_cfg).await?;
        let inv = agent
            .invoke("noop", b"{}".to_vec(), InvokeOptions::default())
            .await
            .map_err(|e| anyhow::anyhow!("invoke: {e}"))?;
        let known = dir.path().join("known_agent");
        std::fs::write(
            &known,
            format!("[127.0.0.1]:{} {}\n", info.listen.port(), info.host_key),
        )?;
        anyhow::Ok((
            agent,
            Target {
                name: "sandscope → process sandbox".into(),
                port: info.listen.port(),
                user: inv.sandbox_id,
                known,
            },
        ))
    })?;
    let ours = measure(&target, &key, runs, keystrokes)?;
    let (peer, peer_note) = match start_sshd(dir.path(), &key.with_extension("pub")) {
        Ok((mut child, t)) => {
            let r = measure(&t, &key, runs, keystrokes);
            let _ = child.kill();
            let _ = child.wait();
            (Some(r?), None)
        }
        Err(e) => (None, Some(format!("local sshd baseline skipped: {e:#}"))),
    };
    rt.block_on(agent.shutdown());

    let mut t = Table::new(
        format!(
            "SSH into a live sandbox vs local sshd (same OpenSSH client; {runs} runs, \
             {keystrokes} keystrokes)"
        ),
        &SUMMARY_HEADER,
    );
    let mut rows = |who: &str, f: &Figures| {
        t.summary_row(
            &format!("{who}: ssh HOST true"),
            &Summary::of(f.exec.clone()),
            ms,
        );
        t.summary_row(
            &format!("{who}: ssh -tt start → first prompt byte"),
            &Summary::of(f.first_byte.clone()),
            ms,
        );
        t.summary_row(
            &format!("{who}: keystroke echo round trip"),
            &Summary::of(f.echo.clone()),
            ms,
        );
    };
    rows(&target.name, &ours);
    if let Some(p) = &peer {
        rows("local sshd", p);
    }
    t.note(
        "sandscope path: ssh client → agent (russh) → probe link (Unix socket) → PTY in the \
         sandbox → back; sshd path: ssh client → sshd → PTY. Both run /bin/sh; Ed25519 keys; \
         loopback TCP",
    );
    if let Some(n) = peer_note {
        t.note(n);
    }
    Ok(vec![t])
}
