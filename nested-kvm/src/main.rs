//! `nested-kvm`: boot an L1 Linux with real (nested) KVM under QEMU/TCG and run a command
//! in it. See the crate docs; `nested-kvm --help` for usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Real KVM by nesting: an emulated L1 Linux (QEMU TCG, AMD SVM) with /dev/kvm, the host's
/// root mounted read-only over 9p, running one command.
///
/// Examples:
///   nested-kvm prepare
///   nested-kvm run -- /bin/sh -c 'ls -l /dev/kvm'
///   nested-kvm run --writable /work/out -- target/debug/vmm-lite --kernel K --mem-mib 128
#[derive(Parser)]
#[command(name = "nested-kvm", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch the L1 kernel (apt-get download, cached) and write L1's initramfs.
    Prepare,
    /// Boot L1, run PROGRAM with ARGS inside it, exit with its status.
    Run {
        /// L1 memory in MiB.
        #[arg(long, default_value_t = 2048)]
        mem_mib: u32,
        /// L1 vCPUs (each one host thread).
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Give up after this many seconds (boot included).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Mount a fresh tmpfs over DIR in L1 (repeatable); /run and /tmp always are.
        #[arg(long, value_name = "DIR")]
        writable: Vec<PathBuf>,
        /// Working directory in L1 (default: the current one).
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Set K=V for the command (repeatable); PATH and HOME are passed on.
        #[arg(long, value_name = "K=V")]
        env: Vec<String>,
        /// The program (a host path, seen at the same path in L1) and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Prepare => match nested_kvm::l1kernel::prepare()
            .and_then(|k| nested_kvm::initramfs::base(&k).map(|i| (k, i)))
        {
            Ok((k, i)) => {
                println!("L1 kernel: {} ({})", k.vmlinuz.display(), k.package);
                println!("modules:   {}", k.modules.len());
                println!("initramfs: {}", i.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Cmd::Run {
            mem_mib,
            cpus,
            timeout,
            writable,
            cwd,
            env,
            command,
        } => {
            let cwd = cwd
                .or_else(|| std::env::current_dir().ok())
                .unwrap_or_default();
            let mut run = nested_kvm::Run::new(resolve(&command[0]))
                .args(&command[1..])
                .mem_mib(mem_mib)
                .cpus(cpus)
                .timeout(Duration::from_secs(timeout))
                .cwd(cwd);
            for k in ["PATH", "HOME"] {
                if let Ok(v) = std::env::var(k) {
                    run = run.env(k, &v);
                }
            }
            for kv in &env {
                let Some((k, v)) = kv.split_once('=') else {
                    eprintln!("nested-kvm: --env {kv:?}: expected K=V");
                    return ExitCode::from(2);
                };
                run = run.env(k, v);
            }
            for w in writable {
                run = run.writable(w);
            }
            match run.run() {
                Ok(o) => {
                    eprintln!(
                        "nested-kvm: exit status {} after {:.1} s",
                        o.status,
                        o.elapsed.as_secs_f64()
                    );
                    ExitCode::from(o.status.clamp(0, 255) as u8)
                }
                Err(e) => fail(&e),
            }
        }
    }
}

/// A bare program name is looked up on PATH; a relative path is made absolute.
fn resolve(p: &str) -> PathBuf {
    if !p.contains('/') {
        if let Some(f) = nested_kvm::which(p) {
            return f;
        }
    }
    std::path::absolute(p).unwrap_or_else(|_| PathBuf::from(p))
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    let mut msg = format!("nested-kvm: error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    ExitCode::from(1)
}
