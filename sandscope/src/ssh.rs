//! `sandscope ssh` (the system ssh client, pointed at the agent's SSH endpoint) and
//! `sandscope sessions`.

use crate::client;
use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `sandscope ssh`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  sandscope ssh hello                 shell in a live `hello` sandbox (or a new one)
  sandscope ssh hello-1a2b3c4d        shell in that sandbox
  sandscope ssh hello cat /proc/meminfo
  sandscope ssh --print hello         show the ssh command instead of running it

The agent must run with --ssh (or an [ssh] table), and your public key must be in its
authorized_keys. The host key is taken from the agent's API and pinned in a known_hosts
file under ~/.cache/sandscope/ssh/, so there is no trust-on-first-use prompt.")]
pub struct SshArgs {
    /// A sandbox id, or a function name (a live sandbox of it, else a new one).
    target: String,
    /// Command to run instead of a shell (its stdout, stderr and exit status come back).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
    /// Private key to log in with (passed to ssh -i).
    #[arg(short = 'i', long)]
    identity: Option<PathBuf>,
    /// Force a terminal even for a command (ssh -t); twice (-tt) even when stdin is not
    /// a terminal.
    #[arg(short = 't', long, action = clap::ArgAction::Count)]
    tty: u8,
    /// Print the ssh command line instead of running it.
    #[arg(long)]
    print: bool,
    /// Agent URL.
    #[arg(long, env = "SANDSCOPE_AGENT", default_value = client::DEFAULT_AGENT)]
    agent: String,
}

/// The host part of an agent URL (`http://host:port/...` → `host`).
fn agent_host(agent: &str) -> String {
    let rest = agent.split("://").nth(1).unwrap_or(agent);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        "127.0.0.1".into()
    } else {
        host.into()
    }
}

/// `sandscope ssh`.
pub async fn run(a: SshArgs) -> Result<ExitCode> {
    let info = client::get_json(&a.agent, "/v1/ssh").await?;
    let listen: std::net::SocketAddr = info["listen"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("the agent's /v1/ssh has no listen address")?;
    let host_key = info["host_key"]
        .as_str()
        .context("the agent's /v1/ssh has no host key")?;
    let host = if listen.ip().is_unspecified() {
        agent_host(&a.agent)
    } else {
        listen.ip().to_string()
    };
    let dir = guest_image::cache_dir().join("ssh");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let known = dir.join(format!("known_hosts-{host}-{}", listen.port()));
    std::fs::write(&known, format!("[{host}]:{} {host_key}\n", listen.port()))
        .with_context(|| format!("writing {}", known.display()))?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-p")
        .arg(listen.port().to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .arg("-o")
        .arg("StrictHostKeyChecking=yes")
        .arg("-o")
        .arg("PreferredAuthentications=publickey");
    if let Some(i) = &a.identity {
        cmd.arg("-i").arg(i).arg("-o").arg("IdentitiesOnly=yes");
    }
    for _ in 0..a.tty.min(2) {
        cmd.arg("-t");
    }
    cmd.arg(format!("{}@{host}", a.target));
    if !a.command.is_empty() {
        cmd.arg("--").args(&a.command);
    }
    if a.print {
        let words: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|w| shell_quote(&w.to_string_lossy()))
            .collect();
        println!("{}", words.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    let e = cmd.exec();
    if e.kind() == std::io::ErrorKind::NotFound {
        bail!("`ssh` is not installed (Debian/Ubuntu: apt-get install openssh-client)");
    }
    Err(e).context("running ssh")
}

fn shell_quote(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// `sandscope sessions`.
pub async fn sessions(agent: &str, json: bool) -> Result<ExitCode> {
    let v = client::get_json(agent, "/v1/sessions").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v));
    }
    Ok(ExitCode::SUCCESS)
}

fn render(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for (title, key) in [("Open sessions", "open"), ("Recently ended", "recent")] {
        let rows = v[key].as_array().cloned().unwrap_or_default();
        out.push_str(&format!("{title}: {}\n", rows.len()));
        if rows.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "  {:>4}  {:<24} {:<6} {:>9} {:>9} {:>9}  {:<12} {}\n",
            "id", "sandbox", "kind", "secs", "in", "out", "end", "who"
        ));
        for s in rows {
            let end = &s["end"];
            let how = if end.is_null() {
                "open".to_string()
            } else if end["signal"].as_i64().unwrap_or(0) != 0 {
                format!("signal {}", end["signal"])
            } else if end["error"].is_string() {
                "error".to_string()
            } else {
                format!("exit {}", end["code"])
            };
            let kind = if s["kind"] == "exec" {
                format!("exec{}", if s["pty"] == true { "+t" } else { "" })
            } else {
                "shell".into()
            };
            out.push_str(&format!(
                "  {:>4}  {:<24} {:<6} {:>9.1} {:>9} {:>9}  {:<12} {}\n",
                s["id"],
                s["sandbox"].as_str().unwrap_or(""),
                kind,
                s["duration_s"].as_f64().unwrap_or(0.0),
                s["bytes_in"],
                s["bytes_out"],
                how,
                s["who"].as_str().unwrap_or("")
            ));
            if let Some(e) = end["error"].as_str() {
                out.push_str(&format!("        {e}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_host_is_taken_from_the_url() {
        assert_eq!(agent_host("http://127.0.0.1:9000"), "127.0.0.1");
        assert_eq!(agent_host("http://box.example:9000/"), "box.example");
        assert_eq!(agent_host("http://[::1]:9000"), "::1");
        assert_eq!(agent_host("box"), "box");
    }

    #[test]
    fn quoting_keeps_words_intact() {
        assert_eq!(shell_quote("a-b_c/d"), "a-b_c/d");
        assert_eq!(shell_quote("it's here"), r"'it'\''s here'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn sessions_render_open_and_ended() {
        let v = serde_json::json!({
            "open": [{"id": 2, "sandbox": "hello-1", "kind": "shell", "pty": true,
                      "duration_s": 3.0, "bytes_in": 10, "bytes_out": 200, "who": "SHA256:x"}],
            "recent": [{"id": 1, "sandbox": "hello-1", "kind": "exec", "pty": false,
                        "duration_s": 0.1, "bytes_in": 0, "bytes_out": 5, "who": "SHA256:x",
                        "end": {"code": 3, "signal": 0}},
                       {"id": 3, "sandbox": "hello-2", "kind": "shell", "pty": true,
                        "duration_s": 1.0, "bytes_in": 0, "bytes_out": 0, "who": "SHA256:y",
                        "end": {"code": -1, "signal": 0, "error": "sandbox hello-2 ended"}}]
        });
        let t = render(&v);
        assert!(t.contains("Open sessions: 1"), "{t}");
        assert!(t.contains("exit 3"), "{t}");
        assert!(t.contains("sandbox hello-2 ended"), "{t}");
        assert!(t.contains("open "), "{t}");
    }
}
