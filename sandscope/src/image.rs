//! `sandscope image build`: the guest kernel (built once, cached) and the initramfs of each
//! function, for the microVM drivers.

use anyhow::{Context, Result};
use guest_image::{kernel, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
#[command(after_help = "\
The kernel is Debian's linux-source-6.1 with `make tinyconfig` and sandscope's config \
fragment (virtio-mmio, vsock, serial, PVH, PTYs, loopback INET; no modules). The first build \
takes 4-11 minutes; the result is cached under ~/.cache/sandscope/kernel/KEY (KEY hashes the \
fragment and the source version) and reused until either changes. Install the build \
dependencies first with scripts/guest-deps.

Each function's initramfs holds the static guest-probe as /init, busybox for shells, and the \
function's code at /var/task. The agent writes these itself at start; this command writes \
them too so you can inspect them.")]
pub struct BuildArgs {
    /// Use this kernel (bzImage or vmlinux) instead of building one; it is only checked.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Parallel compile jobs (default: all cores).
    #[arg(long, short)]
    jobs: Option<usize>,
    /// Rebuild the kernel even if it is cached.
    #[arg(long)]
    force: bool,
    /// Functions whose initramfs to write (default: the embedded example functions).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// guest-probe binary (static; default: found next to sandscope or in target/).
    #[arg(long, env = "SANDSCOPE_PROBE")]
    probe: Option<PathBuf>,
    /// Where to write the initramfs images (default: ~/.cache/sandscope/images).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON document with the paths and timings.
    #[arg(long)]
    json: bool,
}

/// Draws [`Progress`] with indicatif on stderr (hidden when stderr is not a terminal).
struct Bar {
    bar: ProgressBar,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar }
    }
}

impl Progress for Bar {
    fn stage(&self, name: &str, total: Option<u64>) {
        match total {
            Some(t) => {
                self.bar.set_length(t);
                self.bar.set_position(0);
                self.bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg} [{bar:30}] {percent:>3}% {elapsed_precise} (eta {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
            }
            None => self.bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed_precise}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        }
        self.bar.set_message(name.to_string());
        if !self.bar.is_hidden() {
            return;
        }
        eprintln!("sandscope image: {name}");
    }

    fn step(&self, done: u64) {
        self.bar.set_position(done);
    }
}

pub async fn build(a: BuildArgs) -> Result<ExitCode> {
    tokio::task::spawn_blocking(move || build_blocking(a))
        .await
        .context("image build task")?
}

fn build_blocking(a: BuildArgs) -> Result<ExitCode> {
    let cache = guest_image::cache_dir();
    let t0 = Instant::now();
    let k = match &a.kernel {
        Some(p) => kernel::check_user_kernel(p)?,
        None => {
            let bar = Bar::new();
            let opts = kernel::BuildOptions {
                jobs: a
                    .jobs
                    .unwrap_or_else(|| kernel::BuildOptions::default().jobs)
                    .max(1),
                force: a.force,
            };
            let r = kernel::build(&cache, &opts, &bar);
            bar.bar.finish_and_clear();
            r.context("building the guest kernel")?
        }
    };
    let kernel_secs = t0.elapsed().as_secs_f64();

    let state = std::env::temp_dir().join("sandscope-image-build");
    let cfg = crate::load_config(a.config.as_ref(), Some(state), a.probe.clone(), None, None)?;
    let probe = host_agent::drivers::find_probe(cfg.probe.as_deref())?;
    let busybox = guest_image::find_busybox();
    let out = a.out.clone().unwrap_or_else(|| cache.join("images"));
    let t1 = Instant::now();
    let mut images = Vec::new();
    for f in &cfg.functions {
        let p = host_agent::drivers::vm::write_initramfs(f, &probe, busybox.as_deref(), &out)
            .with_context(|| format!("initramfs for function {}", f.name))?;
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        images.push((f.name.clone(), p, size));
    }
    let initramfs_secs = t1.elapsed().as_secs_f64();
    if a.json {
        let doc = serde_json::json!({
            "kernel": {
                "bzimage": k.bzimage,
                "vmlinux": k.vmlinux,
                "key": k.key,
                "cached": k.cached,
                "build_secs": k.build_secs,
                "secs": kernel_secs,
            },
            "busybox": busybox,
            "initramfs": images.iter().map(|(n, p, s)| serde_json::json!({
                "function": n, "path": p, "bytes": s})).collect::<Vec<_>>(),
            "initramfs_secs": initramfs_secs,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    let how = match (k.key.is_some(), k.cached) {
        (false, _) => "given with --kernel".to_string(),
        (true, true) => format!("cached, key {}", k.key.as_deref().unwrap_or("")),
        (true, false) => format!(
            "built in {:.0} s, key {}",
            k.build_secs.unwrap_or(kernel_secs),
            k.key.as_deref().unwrap_or("")
        ),
    };
    println!("kernel     {} ({how})", k.bzimage.display());
    if let Some(v) = &k.vmlinux {
        if v != &k.bzimage {
            println!("vmlinux    {} (PVH entry)", v.display());
        }
    }
    match &busybox {
        Some(b) => println!("busybox    {}", b.display()),
        None => println!("busybox    not found: guests get no shell (apt install busybox-static)"),
    }
    for (n, p, s) in &images {
        println!(
            "initramfs  {:<12} {} ({:.1} MiB)",
            n,
            p.display(),
            *s as f64 / (1 << 20) as f64
        );
    }
    println!(
        "done in {:.1} s (kernel {:.1} s, initramfs {:.2} s). Run microVMs with: sandscope demo --driver qemu",
        t0.elapsed().as_secs_f64(),
        kernel_secs,
        initramfs_secs
    );
    Ok(ExitCode::SUCCESS)
}
