//! Test infrastructure: write functions to a temp dir, start a real agent with the
//! process driver and its HTTP API, invoke through it.

#![allow(dead_code)]

pub mod otlp;
pub mod ssh;

use host_agent::config::AgentConfig;
use host_agent::Agent;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Whether the sandbox tests can run (namespaces + cgroups need root).
pub fn can_run() -> bool {
    if host_agent::util::is_root() {
        return true;
    }
    eprintln!("SKIPPED: process-driver tests need root (namespaces and cgroups)");
    false
}

/// rotel's collector binary (inside the Python package), if installed.
pub fn rotel() -> Option<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok()?;
    let p = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if out.status.success() && std::path::Path::new(&p).exists() {
        return Some(p);
    }
    let strict = std::env::var("CI").as_deref() == Ok("true");
    assert!(
        !strict,
        "rotel is required under CI (scripts/test installs it)"
    );
    eprintln!("SKIPPED: the OTLP tests need rotel (python3 -m pip install rotel==0.0.1a15)");
    None
}

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sandbox cgroups (any controller, v1 or v2) named `prefix` or starting with `prefix-`:
/// what is left of a sandbox, or of the sandboxes of a function named `prefix` (use names
/// unique to the test: the `sandscope` parent is shared with every agent on the machine).
pub fn leftover_cgroups(prefix: &str) -> Vec<String> {
    let mut parents = vec![std::path::PathBuf::from("/sys/fs/cgroup/sandscope")];
    if let Ok(d) = std::fs::read_dir("/sys/fs/cgroup") {
        parents.extend(d.flatten().map(|e| e.path().join("sandscope")));
    }
    let mut out = Vec::new();
    for p in parents {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name == prefix || name.starts_with(&format!("{prefix}-"))) && e.path().is_dir() {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

/// Remove empty cgroups left by earlier, crashed runs of a test using function `prefix`
/// (a cgroup with processes in it cannot be removed and stays).
pub fn clear_stale_cgroups(prefix: &str) {
    for d in leftover_cgroups(prefix) {
        let _ = std::fs::remove_dir(d);
    }
}

/// Host pids of every process in sandbox `id` (from its cgroups).
pub fn sandbox_pids(id: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = leftover_cgroups(id)
        .iter()
        .filter(|d| d.ends_with(&format!("/{id}")))
        .flat_map(|d| {
            std::fs::read_to_string(format!("{d}/cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `kill -STOP` every process of sandbox `id`; returns how many there were.
pub fn stop_sandbox(id: &str) -> usize {
    let pids = sandbox_pids(id);
    for &p in &pids {
        // SAFETY: kill(2) on pids read from the sandbox's own cgroup; touches no memory.
        unsafe {
            libc::kill(p, libc::SIGSTOP);
        }
    }
    pids.len()
}

/// Resident memory of this test process (which hosts the agent), bytes.
pub fn vm_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// A running agent with its HTTP address.
pub struct TestAgent {
    pub agent: Arc<Agent>,
    pub url: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// One function for [`start`]: name, script body, extra TOML lines.
pub struct Func<'a> {
    pub name: &'a str,
    pub script: &'a str,
    pub extra: &'a str,
}

pub fn func<'a>(name: &'a str, script: &'a str, extra: &'a str) -> Func<'a> {
    Func {
        name,
        script,
        extra,
    }
}

/// Write the functions and a config, start an agent.
pub async fn start(funcs: &[Func<'_>], agent_extra: &str) -> TestAgent {
    start_with(funcs, agent_extra, process_driver).await
}

fn process_driver(cfg: &AgentConfig) -> Arc<dyn host_agent::drivers::Driver> {
    let d = host_agent::drivers::process::ProcessDriver::new(cfg)
        .unwrap_or_else(|e| panic!("{}", host_agent::agent::chain(&e)));
    Arc::new(d)
}

/// Like [`start`], with the driver built by `make_driver`.
pub async fn start_with(
    funcs: &[Func<'_>],
    agent_extra: &str,
    make_driver: impl FnOnce(&AgentConfig) -> Arc<dyn host_agent::drivers::Driver>,
) -> TestAgent {
    start_with_more(funcs, agent_extra, "", make_driver).await
}

/// Like [`start`] (process driver), with `more` appended to the generated config, e.g. a
/// `[[functions]]` table whose code directory is an example in the repository.
pub async fn start_more(funcs: &[Func<'_>], agent_extra: &str, more: &str) -> TestAgent {
    start_with_more(funcs, agent_extra, more, process_driver).await
}

/// The general form: `more` appended to the config, the driver built by `make_driver`.
pub async fn start_with_more(
    funcs: &[Func<'_>],
    agent_extra: &str,
    more: &str,
    make_driver: impl FnOnce(&AgentConfig) -> Arc<dyn host_agent::drivers::Driver>,
) -> TestAgent {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), funcs, agent_extra);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(more);
    std::fs::write(&cfg, text).unwrap();
    let cfg = AgentConfig::load(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let driver = make_driver(&cfg);
    let agent = Agent::with_driver(cfg, driver, "test driver".into())
        .unwrap_or_else(|e| panic!("{}", host_agent::agent::chain(&e)));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(host_agent::api::serve(agent.clone(), listener, async {
        let _ = rx.await;
    }));
    TestAgent {
        agent,
        url,
        http: reqwest::Client::new(),
        _dir: dir,
        stop: Some(tx),
    }
}

pub fn write_config(dir: &Path, funcs: &[Func<'_>], agent_extra: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let mut toml = format!(
        "[agent]\nstate_dir = \"{}\"\n{}\n{agent_extra}\n",
        dir.join("state").display(),
        if agent_extra.contains("boot_timeout_s") {
            ""
        } else {
            "boot_timeout_s = 20"
        }
    );
    for f in funcs {
        let code = dir.join("code").join(f.name);
        std::fs::create_dir_all(&code).unwrap();
        let h = code.join("handler.sh");
        std::fs::write(&h, format!("#!/bin/sh\n{}\n", f.script)).unwrap();
        std::fs::set_permissions(&h, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(code.join("data.txt"), "code-dir-marker\n").unwrap();
        toml.push_str(&format!(
            "\n[[functions]]\nname = \"{}\"\nhandler = \"./handler.sh\"\ncode = \"code/{}\"\n{}\n",
            f.name, f.name, f.extra
        ));
    }
    let p = dir.join("sandscope.toml");
    std::fs::write(&p, toml).unwrap();
    p
}

/// A parsed invocation response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub cold: bool,
    pub sandbox: String,
    /// `x-amzn-RequestId`: the invocation id (`faas.invocation_id` on its span).
    pub request_id: String,
    pub function_error: Option<String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

impl TestAgent {
    pub async fn invoke(&self, name: &str, payload: &str) -> Resp {
        let r = self
            .http
            .post(format!(
                "{}/2015-03-31/functions/{name}/invocations",
                self.url
            ))
            .body(payload.to_string())
            .send()
            .await
            .unwrap();
        let h = |k: &str| {
            r.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let status = r.status().as_u16();
        let cold = h("x-sandscope-coldstart").as_deref() == Some("true");
        let sandbox = h("x-sandscope-sandbox-id").unwrap_or_default();
        let request_id = h("x-amzn-requestid").unwrap_or_default();
        let function_error = h("x-amz-function-error");
        let body = r.text().await.unwrap();
        Resp {
            status,
            cold,
            sandbox,
            request_id,
            function_error,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn sandbox(&self, id: &str) -> Option<serde_json::Value> {
        let v = self.get("/v1/sandboxes").await;
        v["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
    }

    /// Poll until `f` holds or `limit` passes.
    pub async fn wait_for<F, Fut>(&self, limit: Duration, mut f: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < limit {
            if f().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// The agent's state directory (sandbox state dirs live under `sandboxes/`).
    pub fn state_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("state")
    }

    /// Sandbox state directories still on disk.
    pub fn leftover_state_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.state_dir().join("sandboxes"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Live sandboxes as the API lists them.
    pub async fn live_ids(&self) -> Vec<String> {
        self.get("/v1/sandboxes").await["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Overwrites the initramfs the agent wrote for VM function `name` with junk: its
    /// guest then has no init (the kernel panics and the VMM exits).
    pub fn corrupt_initramfs(&self, name: &str) {
        let images = self.agent.config().state_dir.join("images");
        let cpio = std::fs::read_dir(&images)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{name}-"))
            })
            .unwrap_or_else(|| panic!("no initramfs of {name} in {}", images.display()));
        std::fs::write(&cpio, vec![0x5au8; 64 << 10]).unwrap();
    }

    /// One function's `/v1/stats` entry.
    pub async fn fn_stats(&self, name: &str) -> serde_json::Value {
        let v = self.get("/v1/stats").await;
        v["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no stats for {name}: {v}"))
    }

    /// One function's `/v1/functions` entry (sandboxes by state, queued).
    pub async fn fn_view(&self, name: &str) -> serde_json::Value {
        let v = self.get("/v1/functions").await;
        v["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no function {name}: {v}"))
    }

    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stop serving and shut the agent down, keeping its state directory for inspection.
    pub async fn halt(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.agent.shutdown().await;
    }
}
