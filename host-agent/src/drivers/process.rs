//! The process driver: each sandbox is the guest probe started in new pid, mount, uts,
//! ipc and net namespaces, inside its own cgroups (memory, cpu, freezer, pids).
//!
//! Sequence: create cgroups → socketpair → fork; in the child (before exec) join the
//! cgroups by writing `0` to each `cgroup.procs`, `unshare` the namespaces, put the
//! probe's end of the link on fd 3 → exec the probe with `--fork-init`. The probe forks
//! once more so the sandbox's init is PID 1 of the new pid namespace, builds the
//! sandbox filesystem (code read-only at /var/task, private /tmp) and pivots into it.

use super::{BoxFuture, Driver, DriverError, SandboxHandle, SandboxSpec, Spawned, Usage};
use crate::cgroup::{Cgroups, Limits, SandboxCgroup};
use crate::config::AgentConfig;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Namespaces every sandbox gets.
const NS_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID;

/// Lines of the probe's own output kept (diagnostics for failed starts).
const DIAG_LINES: usize = 20;

/// Most processes in one sandbox.
const PIDS_MAX: u64 = 1024;

/// See the module docs.
pub struct ProcessDriver {
    probe: PathBuf,
    cgroups: Cgroups,
    state_dir: PathBuf,
}

impl ProcessDriver {
    /// Check the host can run namespace sandboxes and find the probe.
    pub fn new(cfg: &AgentConfig) -> Result<Self, DriverError> {
        if !crate::util::is_root() {
            return Err(DriverError::Unavailable {
                driver: "process",
                reason: "namespace sandboxes with cgroup limits need root (run the agent as root)"
                    .into(),
            });
        }
        let cgroups = Cgroups::detect("sandscope")?;
        let probe = super::find_probe(cfg.probe.as_deref())?;
        let state_dir = cfg.state_dir.join("sandboxes");
        std::fs::create_dir_all(&state_dir).map_err(|source| DriverError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        Ok(Self {
            probe,
            cgroups,
            state_dir,
        })
    }

    /// The probe binary in use.
    pub fn probe(&self) -> &std::path::Path {
        &self.probe
    }
}

impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn describe(&self) -> String {
        format!(
            "pid/mount/uts/ipc/net namespaces, {}, probe {}",
            self.cgroups.describe(),
            self.probe.display()
        )
    }

    fn spawn<'a>(&'a self, spec: &'a SandboxSpec) -> BoxFuture<'a, Result<Spawned, DriverError>> {
        Box::pin(async move {
            let dir = self.state_dir.join(&spec.id);
            let mut cg = None;
            let r = self.spawn_inner(spec, &dir, &mut cg);
            if r.is_err() {
                // Whatever step failed (often for want of an open file), nothing of the
                // start stays: a probe already spawned was killed when its Child dropped,
                // so its cgroup empties.
                if let Some(cg) = cg {
                    cg.remove().await;
                }
                super::remove_state_dir(&dir).await;
            }
            r
        })
    }
}

impl ProcessDriver {
    /// Start the sandbox; its cgroup goes into `cg_slot` as soon as it exists, so the
    /// caller can remove it and `dir` if this fails.
    fn spawn_inner(
        &self,
        spec: &SandboxSpec,
        dir: &std::path::Path,
        cg_slot: &mut Option<SandboxCgroup>,
    ) -> Result<Spawned, DriverError> {
        let f = &spec.function;
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(|source| DriverError::StateDir {
            path: root.clone(),
            source,
        })?;
        let cg = cg_slot.insert(self.cgroups.create(
            &spec.id,
            Limits {
                memory_bytes: f.memory_bytes(),
                cpus: f.cpus,
                pids: PIDS_MAX,
            },
        )?);
        let procs: Vec<std::fs::File> = cg
            .procs_files()
            .iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(p))
            .collect::<Result<_, _>>()
            .map_err(|source| DriverError::Spawn {
                what: "opening cgroup.procs".into(),
                source,
            })?;
        let (agent_end, probe_end) =
            std::os::unix::net::UnixStream::pair().map_err(|source| DriverError::Spawn {
                what: "socketpair".into(),
                source,
            })?;

        let mut cmd = tokio::process::Command::new(&self.probe);
        cmd.arg("--sandbox-id")
            .arg(&spec.id)
            .args([
                "--fd",
                "3",
                "--fork-init",
                "--handler-kind",
                f.kind.as_str(),
            ])
            .arg("--handler")
            .arg(&f.handler)
            .arg("--root-dir")
            .arg(&root)
            .arg("--code-dir")
            .arg(&f.code)
            .arg("--host-id")
            .arg(&spec.host_id)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/tmp")
            .env("LANG", "C.UTF-8")
            .env("SANDSCOPE_FUNCTION_NAME", &f.name)
            .env("SANDSCOPE_MEMORY_MB", f.memory_mb.to_string())
            .envs(&f.env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let procs_fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let link_fd = probe_end.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe syscalls (write, unshare, dup2, fcntl) on fds that stay open in
        // the parent until spawn returns; it allocates nothing (procs_fds was built before).
        unsafe {
            cmd.pre_exec(move || {
                for fd in &procs_fds {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::unshare(NS_FLAGS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if link_fd == 3 {
                    let fl = libc::fcntl(3, libc::F_GETFD);
                    if fl < 0 || libc::fcntl(3, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(link_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| DriverError::Spawn {
            what: format!("sandbox probe {}", self.probe.display()),
            source,
        })?;
        let running_at = Instant::now();
        drop(probe_end);
        drop(procs);

        agent_end
            .set_nonblocking(true)
            .map_err(|source| DriverError::Spawn {
                what: "link setup".into(),
                source,
            })?;
        let stream =
            tokio::net::UnixStream::from_std(agent_end).map_err(|source| DriverError::Spawn {
                what: "link setup".into(),
                source,
            })?;

        let state = Arc::new(ProcState {
            diag: Arc::new(super::console::Console::new(DIAG_LINES)),
            exited: AtomicBool::new(false),
            exit_notify: tokio::sync::Notify::new(),
        });
        super::keep_output(&mut child, &state.diag, &spec.id, "");
        let pid = child.id();
        let st = state.clone();
        tokio::spawn(async move {
            let _ = child.wait().await;
            st.exited.store(true, Ordering::Release);
            st.exit_notify.notify_waiters();
        });
        Ok(Spawned {
            link: super::LinkSource::Connected(stream),
            running_at,
            handle: Box::new(ProcSandbox {
                pid,
                cg: cg_slot.take().expect("created above"),
                dir: dir.to_path_buf(),
                state,
                destroyed: AtomicBool::new(false),
            }),
        })
    }
}

struct ProcState {
    diag: Arc<super::console::Console>,
    exited: AtomicBool,
    exit_notify: tokio::sync::Notify,
}

struct ProcSandbox {
    pid: Option<u32>,
    cg: SandboxCgroup,
    dir: PathBuf,
    state: Arc<ProcState>,
    destroyed: AtomicBool,
}

impl SandboxHandle for ProcSandbox {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn can_freeze(&self) -> bool {
        true
    }

    fn freeze(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        Box::pin(async move { Ok(self.cg.freeze().await?) })
    }

    fn thaw(&self) -> BoxFuture<'_, Result<Duration, DriverError>> {
        Box::pin(async move { Ok(self.cg.thaw().await?) })
    }

    fn usage(&self) -> Usage {
        let pids = self.cg.pids();
        let mut u = Usage {
            processes: pids.len() as u32,
            ..Default::default()
        };
        for p in pids {
            u.rss_bytes += crate::procfs::rss_bytes(p);
            u.cpu_us += crate::procfs::cpu_us_with_children(p);
        }
        u
    }

    fn oom_kills(&self) -> u64 {
        self.cg.oom_kills()
    }

    fn exited(&self) -> bool {
        self.state.exited.load(Ordering::Acquire)
    }

    fn wait_exited(&self, limit: Duration) -> BoxFuture<'_, bool> {
        Box::pin(super::wait_flag(
            &self.state.exited,
            &self.state.exit_notify,
            limit,
        ))
    }

    fn diagnostics(&self) -> String {
        self.state.diag.text()
    }

    fn destroy(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.destroyed.swap(true, Ordering::AcqRel) {
                return;
            }
            self.cg.kill_all();
            if let Some(pid) = self.pid {
                if !self.exited() {
                    // SAFETY: kill(2) on the watcher process we spawned and have not reaped
                    // (the wait task reaps it), so the pid cannot have been reused.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                }
            }
            self.wait_exited(Duration::from_secs(5)).await;
            self.cg.remove().await;
            super::remove_state_dir(&self.dir).await;
        })
    }
}
