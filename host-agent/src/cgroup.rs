//! Per-sandbox cgroups: memory and CPU limits, a freezer, OOM-kill counts, on both the
//! v1 hierarchy (one mount per controller, as on our machines) and unified v2.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No hierarchy with the controllers we need.
    #[error("no usable cgroup hierarchy: {0}")]
    Detect(String),
    /// Creating a sandbox's cgroup directory failed.
    #[error("creating cgroup {path}")]
    Create {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a control file failed.
    #[error("writing `{value}` to {path}")]
    Write {
        /// Control file.
        path: PathBuf,
        /// Value written.
        value: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The freezer did not reach the requested state in time.
    #[error("freezer at {path} did not reach {want} within {waited:?}")]
    FreezeTimeout {
        /// The cgroup.
        path: PathBuf,
        /// Target state.
        want: &'static str,
        /// How long we waited.
        waited: Duration,
    },
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// Controllers on separate v1 mounts.
    V1 {
        /// memory controller mount.
        memory: PathBuf,
        /// cpu controller mount.
        cpu: PathBuf,
        /// freezer controller mount.
        freezer: PathBuf,
        /// pids controller mount, if any.
        pids: Option<PathBuf>,
    },
    /// Unified hierarchy.
    V2 {
        /// Mount point.
        root: PathBuf,
    },
}

/// The agent's cgroup manager.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hier: Hierarchy,
    group: String,
}

/// Limits applied to a sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU limit in cores.
    pub cpus: f64,
    /// Most processes.
    pub pids: u64,
}

const CFS_PERIOD_US: u64 = 100_000;

impl Cgroups {
    /// Find the hierarchy from /proc/self/mounts. `group` is the parent directory name
    /// under each controller (`sandscope`).
    pub fn detect(group: &str) -> Result<Self, CgroupError> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| CgroupError::Detect(format!("reading /proc/self/mounts: {e}")))?;
        let hier = parse_mounts(&mounts)?;
        Ok(Self {
            hier,
            group: group.to_string(),
        })
    }

    /// The detected layout.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hier
    }

    /// Short description for logs and reports.
    pub fn describe(&self) -> String {
        match &self.hier {
            Hierarchy::V1 { .. } => "cgroup v1 (memory, cpu, freezer controllers)".into(),
            Hierarchy::V2 { root } => format!("cgroup v2 at {}", root.display()),
        }
    }

    /// The cgroup(s) of sandbox `id` that exist now (left by an agent that died), if any.
    pub fn existing(&self, id: &str) -> Option<SandboxCgroup> {
        let at = |mount: &Path| mount.join(&self.group).join(id);
        let cg = match &self.hier {
            Hierarchy::V1 {
                memory,
                cpu,
                freezer,
                pids,
            } => {
                let pids = pids.as_deref().map(at);
                let mut dirs = vec![at(memory), at(cpu), at(freezer)];
                dirs.extend(pids.clone());
                SandboxCgroup {
                    v2: false,
                    memory: at(memory),
                    cpu: at(cpu),
                    freezer: at(freezer),
                    pids,
                    dirs,
                }
            }
            Hierarchy::V2 { root } => {
                let dir = at(root);
                SandboxCgroup {
                    v2: true,
                    dirs: vec![dir.clone()],
                    memory: dir.clone(),
                    cpu: dir.clone(),
                    freezer: dir.clone(),
                    pids: Some(dir),
                }
            }
        };
        cg.dirs.iter().any(|d| d.is_dir()).then_some(cg)
    }

    /// Create the cgroup(s) for sandbox `id` with `limits`. On failure, none of them is
    /// left behind.
    pub fn create(&self, id: &str, limits: Limits) -> Result<SandboxCgroup, CgroupError> {
        let mut made = Vec::new();
        let r = self.create_in(id, limits, &mut made);
        if r.is_err() {
            // Fresh and never joined: empty, so rmdir (which needs no open file, unlike the
            // write that may just have failed for want of one) removes them at once.
            for d in made.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
        r
    }

    fn create_in(
        &self,
        id: &str,
        limits: Limits,
        made: &mut Vec<PathBuf>,
    ) -> Result<SandboxCgroup, CgroupError> {
        let cg = match &self.hier {
            Hierarchy::V1 {
                memory,
                cpu,
                freezer,
                pids,
            } => {
                let mem = mkdirs(memory, &self.group, id, made)?;
                let cpu = mkdirs(cpu, &self.group, id, made)?;
                let frz = mkdirs(freezer, &self.group, id, made)?;
                let pids = pids
                    .as_ref()
                    .map(|p| mkdirs(p, &self.group, id, &mut *made))
                    .transpose()?;
                let mut dirs = vec![mem.clone(), cpu.clone(), frz.clone()];
                dirs.extend(pids.clone());
                let cg = SandboxCgroup {
                    v2: false,
                    dirs,
                    memory: mem,
                    cpu,
                    freezer: frz,
                    pids,
                };
                cg.write(
                    &cg.memory,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?;
                if cg.memory.join("memory.memsw.limit_in_bytes").exists() {
                    // No swap for sandboxes: memory+swap equals the memory limit.
                    cg.write(
                        &cg.memory,
                        "memory.memsw.limit_in_bytes",
                        &limits.memory_bytes.to_string(),
                    )?;
                }
                cg.write(&cg.cpu, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())?;
                cg.write(
                    &cg.cpu,
                    "cpu.cfs_quota_us",
                    &cpu_quota(limits.cpus).to_string(),
                )?;
                if let Some(p) = &cg.pids {
                    cg.write(p, "pids.max", &limits.pids.to_string())?;
                }
                cg
            }
            Hierarchy::V2 { root } => {
                // Enable controllers for our subtree (errors for absent ones are ignored: the
                // limit writes below report what is really missing).
                for c in ["+memory", "+cpu", "+pids"] {
                    let _ = write_file(&root.join("cgroup.subtree_control"), c);
                }
                let parent = root.join(&self.group);
                std::fs::create_dir_all(&parent).map_err(|source| CgroupError::Create {
                    path: parent.clone(),
                    source,
                })?;
                for c in ["+memory", "+cpu", "+pids"] {
                    let _ = write_file(&parent.join("cgroup.subtree_control"), c);
                }
                let dir = mkdirs(root, &self.group, id, made)?;
                let cg = SandboxCgroup {
                    v2: true,
                    dirs: vec![dir.clone()],
                    memory: dir.clone(),
                    cpu: dir.clone(),
                    freezer: dir.clone(),
                    pids: Some(dir.clone()),
                };
                cg.write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                if dir.join("memory.swap.max").exists() {
                    cg.write(&dir, "memory.swap.max", "0")?;
                }
                cg.write(
                    &dir,
                    "cpu.max",
                    &format!("{} {CFS_PERIOD_US}", cpu_quota(limits.cpus)),
                )?;
                if dir.join("pids.max").exists() {
                    cg.write(&dir, "pids.max", &limits.pids.to_string())?;
                }
                cg
            }
        };
        Ok(cg)
    }
}

fn cpu_quota(cpus: f64) -> u64 {
    ((cpus * CFS_PERIOD_US as f64).round() as u64).max(1000)
}

/// Make `<mount>/<group>/<id>`, noting it in `made` (the group dir is shared and stays).
fn mkdirs(
    mount: &Path,
    group: &str,
    id: &str,
    made: &mut Vec<PathBuf>,
) -> Result<PathBuf, CgroupError> {
    let dir = mount.join(group).join(id);
    std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Create {
        path: dir.clone(),
        source,
    })?;
    made.push(dir.clone());
    Ok(dir)
}

fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// Pick the hierarchy out of /proc/self/mounts text.
pub fn parse_mounts(mounts: &str) -> Result<Hierarchy, CgroupError> {
    let (mut memory, mut cpu, mut freezer, mut pids, mut unified) = (None, None, None, None, None);
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let (mnt, fstype, opts) = (PathBuf::from(f[1]), f[2], f[3]);
        match fstype {
            "cgroup" => {
                for o in opts.split(',') {
                    match o {
                        "memory" => memory = Some(mnt.clone()),
                        "cpu" => cpu = Some(mnt.clone()),
                        "freezer" => freezer = Some(mnt.clone()),
                        "pids" => pids = Some(mnt.clone()),
                        _ => {}
                    }
                }
            }
            "cgroup2" => unified = Some(mnt),
            _ => {}
        }
    }
    match (memory, cpu, freezer, unified) {
        (Some(memory), Some(cpu), Some(freezer), _) => Ok(Hierarchy::V1 {
            memory,
            cpu,
            freezer,
            pids,
        }),
        (None, None, None, Some(root)) => Ok(Hierarchy::V2 { root }),
        (m, c, f, u) => Err(CgroupError::Detect(format!(
            "need v1 memory+cpu+freezer mounts or a pure v2 mount; found memory={} cpu={} \
             freezer={} cgroup2={}",
            m.is_some(),
            c.is_some(),
            f.is_some(),
            u.map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into())
        ))),
    }
}

/// One sandbox's cgroup directories.
#[derive(Debug)]
pub struct SandboxCgroup {
    v2: bool,
    dirs: Vec<PathBuf>,
    memory: PathBuf,
    cpu: PathBuf,
    freezer: PathBuf,
    pids: Option<PathBuf>,
}

impl SandboxCgroup {
    fn write(&self, dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = dir.join(file);
        write_file(&path, value).map_err(|source| CgroupError::Write {
            path,
            value: value.to_string(),
            source,
        })
    }

    /// The `cgroup.procs` files a new process must join (one per v1 controller).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Pids currently in the sandbox.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.memory.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// OOM kills so far in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.memory.join(file))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .unwrap_or(0)
    }

    /// Freeze every process; returns how long it took.
    pub async fn freeze(&self) -> Result<Duration, CgroupError> {
        self.set_frozen(true).await
    }

    /// Thaw; returns how long it took.
    pub async fn thaw(&self) -> Result<Duration, CgroupError> {
        self.set_frozen(false).await
    }

    async fn set_frozen(&self, frozen: bool) -> Result<Duration, CgroupError> {
        let t0 = Instant::now();
        let (file, value, state_file, want): (&str, &str, &str, &'static str) = if self.v2 {
            (
                "cgroup.freeze",
                if frozen { "1" } else { "0" },
                "cgroup.events",
                if frozen { "frozen 1" } else { "frozen 0" },
            )
        } else {
            let v = if frozen { "FROZEN" } else { "THAWED" };
            ("freezer.state", v, "freezer.state", v)
        };
        self.write(&self.freezer, file, value)?;
        let limit = Duration::from_secs(2);
        let mut spins = 0u32;
        loop {
            let state = std::fs::read_to_string(self.freezer.join(state_file)).unwrap_or_default();
            if state.lines().any(|l| l.trim() == want) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                return Err(CgroupError::FreezeTimeout {
                    path: self.freezer.clone(),
                    want,
                    waited: t0.elapsed(),
                });
            }
            spins += 1;
            if spins < 50 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    }

    /// SIGKILL everything in the sandbox (thawing first: a frozen task cannot die).
    pub fn kill_all(&self) {
        let _ = self.write(
            &self.freezer,
            if self.v2 {
                "cgroup.freeze"
            } else {
                "freezer.state"
            },
            if self.v2 { "0" } else { "THAWED" },
        );
        if self.v2 && self.freezer.join("cgroup.kill").exists() {
            let _ = self.write(&self.freezer, "cgroup.kill", "1");
            return;
        }
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from the sandbox's own cgroup; no memory is touched.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    /// Remove the directories, waiting briefly for exiting processes to leave.
    pub async fn remove(&self) {
        // Exiting tasks leave the cgroup within a few ms; back off from 1 ms to 20 ms.
        let mut pause = Duration::from_millis(1);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            let mut busy = false;
            for d in &self.dirs {
                if d.exists() && std::fs::remove_dir(d).is_err() {
                    busy = true;
                }
            }
            if !busy {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        tracing::warn!(dirs = ?self.dirs, "sandbox cgroup still busy; left behind");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v1_hybrid_like_ours() {
        let m = "cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                 cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                 cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        match parse_mounts(m).unwrap() {
            Hierarchy::V1 { memory, pids, .. } => {
                assert_eq!(memory, PathBuf::from("/sys/fs/cgroup/memory"));
                assert!(pids.is_none());
            }
            h => panic!("{h:?}"),
        }
    }

    #[test]
    fn detects_combined_cpu_cpuacct_and_pure_v2() {
        let m = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                 cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                 cgroup /sys/fs/cgroup/freezer cgroup rw,freezer 0 0\n";
        assert!(matches!(parse_mounts(m).unwrap(), Hierarchy::V1 { .. }));
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert!(matches!(parse_mounts(v2).unwrap(), Hierarchy::V2 { .. }));
        let e = parse_mounts("cgroup /x cgroup rw,memory 0 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("freezer=false"), "{e}");
    }

    #[test]
    fn quota_has_a_floor() {
        assert_eq!(cpu_quota(1.0), 100_000);
        assert_eq!(cpu_quota(0.001), 1000);
    }
}
