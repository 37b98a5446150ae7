//! Bench-time artefacts: the trivial static binary, the noop responder, OCI bundles,
//! and the agent configuration.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A `main` that exits 0.
const TRUE_C: &str = "int main(void) { return 0; }\n";

/// sandscope-lines/1 noop runtime: `ready`, then one `{}` line per input line. Raw
/// read/write, one write per response (no stdio buffering to flush).
const NOOP_C: &str = r#"#include <unistd.h>
static char buf[1 << 16];
int main(void) {
    if (write(1, "ready\n", 6) != 6) return 1;
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0) return 0;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] == '\n' && write(1, "{}\n", 3) != 3) return 1;
    }
}
"#;

/// Files made for one bench run; removed on drop.
pub struct Work {
    /// Temp directory holding everything.
    pub dir: tempfile::TempDir,
    /// Static `exit 0` binary.
    pub true_bin: PathBuf,
    /// Function code directory (holds `noop`), mounted at /var/task.
    pub code: PathBuf,
}

fn gcc(src: &str, out: &Path, name: &str) -> anyhow::Result<()> {
    let c = out.with_extension("c");
    std::fs::write(&c, src)?;
    let o = Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(out)
        .arg(&c)
        .output()
        .context("running gcc (apt-get install gcc libc6-dev)")?;
    if !o.status.success() {
        bail!("gcc {name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

impl Work {
    /// Build the binaries.
    pub fn new() -> anyhow::Result<Work> {
        let dir = tempfile::Builder::new()
            .prefix("sandscope-bench-")
            .tempdir()?;
        let true_bin = dir.path().join("true-static");
        gcc(TRUE_C, &true_bin, "true")?;
        let code = dir.path().join("code");
        std::fs::create_dir_all(&code)?;
        gcc(NOOP_C, &code.join("noop"), "noop")?;
        std::fs::remove_file(code.join("noop.c"))?;
        Ok(Work {
            dir,
            true_bin,
            code,
        })
    }

    /// An agent config with the `cat` exec function and the `noop` persistent function.
    pub fn agent_config(
        &self,
        tag: &str,
        max_sandboxes: usize,
        prewarm_cat: usize,
        prewarm_noop: usize,
    ) -> anyhow::Result<host_agent::AgentConfig> {
        let state = self.dir.path().join(format!("state-{tag}"));
        let text = format!(
            r#"
[agent]
http = "127.0.0.1:0"
driver = "process"
state_dir = "{state}"
boot_timeout_s = 10

[[functions]]
name = "cat"
handler = "cat"
code = "{code}"
memory_mb = 128
timeout_s = 5
[functions.pool]
max_sandboxes = {max_sandboxes}
prewarm = {prewarm_cat}
keep_alive_s = 3600
queue = 100000

[[functions]]
name = "noop"
kind = "persistent"
handler = "exec ./noop"
code = "{code}"
memory_mb = 64
timeout_s = 5
[functions.pool]
max_sandboxes = {max_sandboxes}
prewarm = {prewarm_noop}
keep_alive_s = 3600
queue = 100000
"#,
            state = state.display(),
            code = self.code.display(),
        );
        Ok(host_agent::AgentConfig::parse(
            &text,
            "bench.toml",
            self.dir.path(),
        )?)
    }

    /// An OCI bundle (from `RUNTIME spec`) whose process is the static binary, read-only root.
    pub fn oci_bundle(&self, runtime: &str) -> anyhow::Result<PathBuf> {
        let b = self.dir.path().join(format!("bundle-{runtime}"));
        let rootfs = b.join("rootfs");
        std::fs::create_dir_all(&rootfs)?;
        std::fs::copy(&self.true_bin, rootfs.join("true"))?;
        let o = Command::new(runtime)
            .arg("spec")
            .arg("--bundle")
            .arg(&b)
            .output()
            .with_context(|| format!("running `{runtime} spec`"))?;
        if !o.status.success() {
            bail!(
                "{runtime} spec: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        let p = b.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)?;
        cfg["process"]["args"] = serde_json::json!(["/true"]);
        cfg["process"]["terminal"] = serde_json::json!(false);
        cfg["root"]["readonly"] = serde_json::json!(true);
        std::fs::write(&p, serde_json::to_string_pretty(&cfg)?)?;
        Ok(b)
    }
}
