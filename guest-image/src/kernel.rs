//! The minimal guest kernel: Debian's `linux-source-6.1`, `make tinyconfig`, our fragment,
//! `olddefconfig`, then `make bzImage`. The result lands in `CACHE/kernel/KEY/` (bzImage,
//! vmlinux, config, build-info), KEY being a hash of the fragment and the source package
//! version, so it is rebuilt only when either changes. The build tree is kept under
//! `CACHE/kernel/KEY.build/` until the build succeeds, so an interrupted build resumes.

use crate::{short_hash, Progress};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Our config fragment, applied on top of `tinyconfig`.
pub const FRAGMENT: &str = include_str!("../kernel.fragment");
/// The Debian package holding the kernel source.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Where that package puts the tarball.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Build steps (`CC`, `LD`, ... lines) a full build prints, for the progress bar.
const ESTIMATED_STEPS: u64 = 1360;

/// Why the kernel could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel source package is not installed.
    #[error("kernel source not found at {SOURCE_TARBALL}: install it with scripts/guest-deps (Debian package {SOURCE_PACKAGE})")]
    NoSource,
    /// A build tool is missing.
    #[error(
        "kernel build tool missing: {0}; install the build dependencies with scripts/guest-deps"
    )]
    MissingTool(String),
    /// A config option of the fragment did not take effect.
    #[error(
        "kernel config: `{0}` did not take effect after olddefconfig (a dependency of it is off)"
    )]
    ConfigDrift(String),
    /// A build command failed.
    #[error("`{cmd}` failed ({status}); last output:\n{tail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Exit status.
        status: String,
        /// Last lines it printed.
        tail: String,
    },
    /// A user-given kernel is not usable.
    #[error("kernel {path}: {reason}")]
    BadKernel {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the cache failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KernelError + 'a {
    move |source| KernelError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The installed kernel source.
#[derive(Debug, Clone)]
pub struct KernelSource {
    /// The tarball.
    pub tarball: PathBuf,
    /// Debian package version (or the tarball's size and mtime when dpkg cannot tell).
    pub version: String,
}

impl KernelSource {
    /// Find the installed `linux-source-6.1`.
    pub fn detect() -> Result<Self, KernelError> {
        let tarball = PathBuf::from(SOURCE_TARBALL);
        let meta = std::fs::metadata(&tarball).map_err(|_| KernelError::NoSource)?;
        let version = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success() && !o.stdout.is_empty())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| {
                use std::os::unix::fs::MetadataExt;
                format!("tarball-{}-{}", meta.len(), meta.mtime())
            });
        Ok(Self { tarball, version })
    }

    /// The cache key for this source and `fragment`.
    pub fn cache_key(&self, fragment: &str) -> String {
        cache_key(&self.version, fragment)
    }
}

/// Cache key: the first 16 hex digits of SHA-256 over `"linux-source-6.1 VERSION\n"` and
/// the fragment (the same as `{ printf 'linux-source-6.1 %s\n' V; cat F; } | sha256sum`).
pub fn cache_key(version: &str, fragment: &str) -> String {
    let head = format!("{SOURCE_PACKAGE} {version}\n");
    short_hash(&[head.as_bytes(), fragment.as_bytes()], 16)
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The bzImage (boot protocol; QEMU `-kernel`, vmm-lite `--kernel`).
    pub bzimage: PathBuf,
    /// The ELF vmlinux with the PVH note, if built.
    pub vmlinux: Option<PathBuf>,
    /// Cache key (None for a user's kernel).
    pub key: Option<String>,
    /// Whether it came from the cache (no build ran).
    pub cached: bool,
    /// Build time in seconds, if a build ran.
    pub build_secs: Option<f64>,
}

/// Where the kernel for `key` lives in `cache`.
pub fn kernel_dir(cache: &Path, key: &str) -> PathBuf {
    cache.join("kernel").join(key)
}

/// The cached kernel for the installed source and our fragment, if it has been built.
pub fn cached(cache: &Path) -> Result<Option<Kernel>, KernelError> {
    let src = KernelSource::detect()?;
    let key = src.cache_key(FRAGMENT);
    Ok(lookup(cache, &key))
}

fn lookup(cache: &Path, key: &str) -> Option<Kernel> {
    let dir = kernel_dir(cache, key);
    let bz = dir.join("bzImage");
    bz.is_file().then(|| Kernel {
        vmlinux: Some(dir.join("vmlinux")).filter(|p| p.is_file()),
        bzimage: bz,
        key: Some(key.to_string()),
        cached: true,
        build_secs: None,
    })
}

/// Check a user-supplied kernel: an x86 bzImage (`HdrS` at 0x202) or an ELF vmlinux.
pub fn check_user_kernel(path: &Path) -> Result<Kernel, KernelError> {
    let bad = |reason: String| KernelError::BadKernel {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut head = vec![0u8; 0x210];
    let n = f
        .read(&mut head)
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    head.truncate(n);
    let elf = head.starts_with(b"\x7fELF");
    let bz = head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS";
    if !(elf || bz) {
        return Err(bad(
            "neither a bzImage (no HdrS boot header) nor an ELF vmlinux".into(),
        ));
    }
    Ok(Kernel {
        bzimage: path.to_path_buf(),
        vmlinux: elf.then(|| path.to_path_buf()),
        key: None,
        cached: true,
        build_secs: None,
    })
}

/// Build options.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Parallel make jobs.
    pub jobs: usize,
    /// Rebuild even if cached.
    pub force: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            force: false,
        }
    }
}

/// Build (or find in the cache) the minimal kernel.
pub fn build(
    cache: &Path,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Kernel, KernelError> {
    let src = KernelSource::detect()?;
    let key = src.cache_key(FRAGMENT);
    if !opts.force {
        if let Some(k) = lookup(cache, &key) {
            return Ok(k);
        }
    }
    check_tools()?;
    let root = cache.join("kernel");
    std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
    let _lock = Lock::take(&root.join(format!("{key}.lock")))?;
    // Someone else may have finished it while we waited for the lock.
    if !opts.force {
        if let Some(k) = lookup(cache, &key) {
            return Ok(k);
        }
    }
    let t0 = Instant::now();
    let tree = root.join(format!("{key}.build"));
    if !tree.join("Makefile").is_file() {
        progress.stage("extracting linux-source-6.1", None);
        let tmp = root.join(format!("{key}.extract"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
        run(
            Command::new("tar")
                .arg("-xf")
                .arg(&src.tarball)
                .arg("--strip-components=1")
                .arg("-C")
                .arg(&tmp),
            None,
        )?;
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::rename(&tmp, &tree).map_err(io("renaming", &tmp))?;
    }
    let config = tree.join(".config");
    let config_ok = std::fs::read_to_string(&config)
        .map(|c| fragment_drift(&c, FRAGMENT).is_none())
        .unwrap_or(false);
    if !config_ok {
        progress.stage("configuring (tinyconfig + sandscope fragment)", None);
        run(make(&tree, 1).arg("tinyconfig"), None)?;
        let mut c = std::fs::read_to_string(&config).map_err(io("reading", &config))?;
        c.push_str(FRAGMENT);
        std::fs::write(&config, c).map_err(io("writing", &config))?;
        run(make(&tree, 1).arg("olddefconfig"), None)?;
        let c = std::fs::read_to_string(&config).map_err(io("reading", &config))?;
        if let Some(opt) = fragment_drift(&c, FRAGMENT) {
            return Err(KernelError::ConfigDrift(opt));
        }
    }
    progress.stage(
        &format!("compiling the kernel (make -j{} bzImage)", opts.jobs),
        Some(ESTIMATED_STEPS),
    );
    run(make(&tree, opts.jobs).arg("bzImage"), Some(progress))?;

    progress.stage("storing in the cache", None);
    let out = kernel_dir(cache, &key);
    let tmp = root.join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
    for (from, to) in [
        ("arch/x86/boot/bzImage", "bzImage"),
        ("vmlinux", "vmlinux"),
        (".config", "config"),
    ] {
        let (f, t) = (tree.join(from), tmp.join(to));
        std::fs::copy(&f, &t).map_err(io("copying", &f))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let info = format!(
        "{{\"source\":\"{SOURCE_PACKAGE}\",\"version\":\"{}\",\"key\":\"{key}\",\"build_secs\":{secs:.1},\"jobs\":{}}}\n",
        src.version, opts.jobs
    );
    let info_path = tmp.join("build-info.json");
    std::fs::write(&info_path, info).map_err(io("writing", &info_path))?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&tmp, &out).map_err(io("renaming", &tmp))?;
    // The tree is ~1.3 GB; the cache keeps only the results.
    let _ = std::fs::remove_dir_all(&tree);
    let mut k = lookup(cache, &key).ok_or_else(|| KernelError::BadKernel {
        path: out.join("bzImage"),
        reason: "missing after the build".into(),
    })?;
    k.cached = false;
    k.build_secs = Some(secs);
    Ok(k)
}

/// The first fragment line that `config` does not satisfy.
pub fn fragment_drift(config: &str, fragment: &str) -> Option<String> {
    for line in fragment.lines().map(str::trim) {
        if let Some(opt) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            let set = format!("{opt}=");
            if config.lines().any(|l| l.starts_with(&set)) {
                return Some(line.to_string());
            }
        } else if line.starts_with("CONFIG_") && !config.lines().any(|l| l.trim() == line) {
            return Some(line.to_string());
        }
    }
    None
}

fn check_tools() -> Result<(), KernelError> {
    for tool in [
        "make", "gcc", "ld", "bison", "flex", "bc", "tar", "xz", "perl",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(KernelError::MissingTool(tool.to_string()));
        }
    }
    if !Path::new("/usr/include/libelf.h").is_file() {
        return Err(KernelError::MissingTool(
            "libelf headers (libelf-dev)".into(),
        ));
    }
    Ok(())
}

fn make(tree: &Path, jobs: usize) -> Command {
    let mut c = Command::new("make");
    c.arg("-C").arg(tree).arg(format!("-j{jobs}"));
    c
}

/// Run a command; with `progress`, count its build-step lines. On failure, the error
/// carries the last lines of its output.
fn run(cmd: &mut Command, progress: Option<&dyn Progress>) -> Result<(), KernelError> {
    let desc = format!("{cmd:?}").replace('"', "");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| KernelError::Command {
            cmd: desc.clone(),
            status: "not started".into(),
            tail: e.to_string(),
        })?;
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        if let Some(e) = stderr {
            for l in BufReader::new(e).lines().map_while(Result::ok) {
                if tail.len() == 30 {
                    tail.pop_front();
                }
                tail.push_back(l);
            }
        }
        tail
    });
    let mut tail = std::collections::VecDeque::new();
    let mut steps = 0u64;
    if let Some(out) = child.stdout.take() {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if is_build_step(&l) {
                steps += 1;
                if let Some(p) = progress {
                    p.step(steps.min(ESTIMATED_STEPS - 1));
                }
            }
            if tail.len() == 10 {
                tail.pop_front();
            }
            tail.push_back(l);
        }
    }
    let status = child.wait().map_err(|e| KernelError::Command {
        cmd: desc.clone(),
        status: "wait failed".into(),
        tail: e.to_string(),
    })?;
    let err_tail = err_thread.join().unwrap_or_default();
    if let Some(p) = progress {
        p.step(ESTIMATED_STEPS);
    }
    if status.success() {
        return Ok(());
    }
    tail.extend(err_tail);
    Err(KernelError::Command {
        cmd: desc,
        status: status.to_string(),
        tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
    })
}

/// A kbuild progress line: two spaces, an upper-case tag, spaces, a path.
fn is_build_step(l: &str) -> bool {
    let Some(rest) = l.strip_prefix("  ") else {
        return false;
    };
    let tag: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    !tag.is_empty()
        && tag
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// An exclusive flock on a file, released on drop.
struct Lock(std::fs::File);

impl Lock {
    fn take(path: &Path) -> Result<Self, KernelError> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io("opening lock", path))?;
        // SAFETY: flock on an fd we own; blocks until the lock is ours.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io("locking", path)(std::io::Error::last_os_error()));
        }
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking an fd we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_matches_the_shell_recipe() {
        // `{ printf 'linux-source-6.1 %s\n' 1.0; printf 'CONFIG_A=y\n'; } | sha256sum`
        let k = cache_key("1.0", "CONFIG_A=y\n");
        assert_eq!(k.len(), 16);
        let out = Command::new("sh")
            .arg("-c")
            .arg("{ printf 'linux-source-6.1 %s\\n' 1.0; printf 'CONFIG_A=y\\n'; } | sha256sum")
            .output()
            .unwrap();
        assert_eq!(&String::from_utf8_lossy(&out.stdout)[..16], k);
        assert_ne!(cache_key("1.1", "CONFIG_A=y\n"), k);
        assert_ne!(cache_key("1.0", "CONFIG_A=n\n"), k);
    }

    #[test]
    fn drift_detection() {
        let frag = "# c\nCONFIG_A=y\n# CONFIG_B is not set\n";
        assert_eq!(
            fragment_drift("CONFIG_A=y\n# CONFIG_B is not set\n", frag),
            None
        );
        assert_eq!(fragment_drift("CONFIG_A=y\n", frag), None);
        assert_eq!(
            fragment_drift("# CONFIG_A is not set\n", frag).as_deref(),
            Some("CONFIG_A=y")
        );
        assert_eq!(
            fragment_drift("CONFIG_A=y\nCONFIG_B=y\n", frag).as_deref(),
            Some("# CONFIG_B is not set")
        );
    }

    #[test]
    fn fragment_has_what_a_probe_guest_needs() {
        for opt in [
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_SERIAL_8250_CONSOLE=y",
            "CONFIG_PVH=y",
            "CONFIG_UNIX98_PTYS=y",
            "CONFIG_INET=y",
            "# CONFIG_MODULES is not set",
        ] {
            assert!(FRAGMENT.lines().any(|l| l == opt), "{opt}");
        }
    }

    #[test]
    fn build_steps_are_recognised() {
        assert!(is_build_step("  CC      kernel/fork.o"));
        assert!(is_build_step("  LD      vmlinux.o"));
        assert!(is_build_step("  HOSTCC  scripts/basic/fixdep"));
        assert!(!is_build_step("make[1]: Entering directory"));
        assert!(!is_build_step(
            "Kernel: arch/x86/boot/bzImage is ready  (#1)"
        ));
        assert!(!is_build_step("  "));
    }

    #[test]
    fn user_kernel_checks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, b"not a kernel at all").unwrap();
        let e = check_user_kernel(&p).unwrap_err().to_string();
        assert!(e.contains("neither a bzImage"), "{e}");
        let e = check_user_kernel(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot open"), "{e}");
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&p, &bz).unwrap();
        let k = check_user_kernel(&p).unwrap();
        assert!(k.vmlinux.is_none());
        std::fs::write(&p, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(check_user_kernel(&p).unwrap().vmlinux.is_some());
    }
}
