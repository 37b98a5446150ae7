//! The L1 kernel: Debian's `linux-image-6.1.0-*-amd64` (what `linux-image-amd64` depends
//! on), fetched with `apt-get download`, cached by package name (which carries the ABI
//! version) in `<cache>/l1/PACKAGE/`: `vmlinuz`, `release`, and `modules/NAME.ko` for the
//! modules L1 loads. Nothing else of the 70 MB package is kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io_err, NestedError};

/// Modules L1 loads, in dependency order: KVM on emulated AMD SVM, then virtio-PCI and 9p
/// for the host's root share.
pub const MODULES: &[&str] = &[
    "irqbypass",
    "ccp",
    "kvm",
    "kvm-amd",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
];

/// A cached L1 kernel.
#[derive(Debug, Clone)]
pub struct L1Kernel {
    /// `<cache>/l1/PACKAGE`.
    pub dir: PathBuf,
    /// The Debian package name, e.g. `linux-image-6.1.0-48-amd64`.
    pub package: String,
    /// The compressed kernel.
    pub vmlinuz: PathBuf,
    /// Module files in [`MODULES`] order (built-in ones are absent).
    pub modules: Vec<PathBuf>,
}

/// `<cache>/l1`.
pub fn cache_root() -> PathBuf {
    guest_image::cache_dir().join("l1")
}

/// The L1 kernel, from the cache or fetched into it.
///
/// The package is whatever `linux-image-amd64` depends on now; when the package lists
/// cannot be read (offline) the newest cached kernel is used. Concurrent callers are
/// serialised by a lock file, so parallel tests fetch once.
pub fn prepare() -> Result<L1Kernel, NestedError> {
    let root = cache_root();
    std::fs::create_dir_all(&root).map_err(io_err(format!("cannot create {}", root.display())))?;
    let _lock = Lock::take(&root.join(".lock"))?;
    let package = match current_package() {
        Some(p) => p,
        None => match newest_cached(&root) {
            Some(k) => return Ok(k),
            None => {
                return Err(NestedError::Kernel(
                    "cannot tell which linux-image-6.1.0-*-amd64 to fetch (`apt-cache depends linux-image-amd64` found none, also after apt-get update)".into(),
                ))
            }
        },
    };
    let dir = root.join(&package);
    if let Some(k) = load(&dir, &package) {
        return Ok(k);
    }
    fetch(&package, &dir)?;
    load(&dir, &package).ok_or_else(|| {
        NestedError::Kernel(format!("{} is incomplete after fetching", dir.display()))
    })
}

fn load(dir: &Path, package: &str) -> Option<L1Kernel> {
    let vmlinuz = dir.join("vmlinuz");
    if !vmlinuz.is_file() || !dir.join("complete").is_file() {
        return None;
    }
    let modules = MODULES
        .iter()
        .map(|m| dir.join("modules").join(format!("{m}.ko")))
        .filter(|p| p.is_file())
        .collect();
    Some(L1Kernel {
        dir: dir.to_path_buf(),
        package: package.to_string(),
        vmlinuz,
        modules,
    })
}

fn newest_cached(root: &Path) -> Option<L1Kernel> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("linux-image-"))
        .collect();
    names.sort_by_key(|n| abi_number(n));
    names.iter().rev().find_map(|n| load(&root.join(n), n))
}

/// `linux-image-6.1.0-48-amd64` -> 48.
fn abi_number(package: &str) -> u32 {
    package
        .strip_prefix("linux-image-6.1.0-")
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The package `linux-image-amd64` depends on, reading the apt lists (updated once if
/// they hold nothing).
fn current_package() -> Option<String> {
    let ask = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .ok()?;
        parse_depends(&String::from_utf8_lossy(&out.stdout))
    };
    ask().or_else(|| {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        ask()
    })
}

/// Picks `linux-image-6.1.0-N-amd64` out of `apt-cache depends` output.
pub fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-6.1.0-") && p.ends_with("-amd64"))
        .map(str::to_string)
}

fn fetch(package: &str, dir: &Path) -> Result<(), NestedError> {
    eprintln!(
        "nested-kvm: fetching {package} (about 70 MB, cached in {})",
        dir.display()
    );
    let work = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io_err(format!("cannot create {}", work.display())))?;
    // apt-get download drops privileges to _apt where it can; a root-only directory makes it
    // warn and download as root, which is fine.
    run(Command::new("apt-get")
        .arg("download")
        .arg("-qq")
        .arg(package)
        .current_dir(&work))?;
    let deb = std::fs::read_dir(&work)
        .map_err(io_err("read download dir"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| NestedError::Kernel(format!("apt-get download {package} left no .deb")))?;
    let x = work.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
    let boot = x.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io_err(format!("read {}", boot.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| NestedError::Kernel(format!("{package} has no /boot/vmlinuz-*")))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    let mods = x.join("lib/modules").join(&release);
    let builtin = std::fs::read_to_string(mods.join("modules.builtin")).unwrap_or_default();
    let out_mods = work.join("out/modules");
    std::fs::create_dir_all(&out_mods).map_err(io_err("create modules dir"))?;
    let found = find_modules(&mods.join("kernel"));
    for m in MODULES {
        match found.iter().find(|(n, _)| same_module(n, m)) {
            Some((_, p)) => {
                std::fs::copy(p, out_mods.join(format!("{m}.ko")))
                    .map_err(io_err(format!("copy {}", p.display())))?;
            }
            None if builtin
                .lines()
                .any(|l| l.rsplit('/').next().is_some_and(|f| same_module(f, m))) => {}
            None => {
                return Err(NestedError::Kernel(format!(
                    "{package} has no module {m} (neither a .ko nor built in)"
                )))
            }
        }
    }
    let out = work.join("out");
    std::fs::copy(&vmlinuz, out.join("vmlinuz")).map_err(io_err("copy vmlinuz"))?;
    std::fs::write(out.join("release"), &release).map_err(io_err("write release"))?;
    std::fs::write(out.join("complete"), b"").map_err(io_err("write marker"))?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&out, dir).map_err(io_err(format!("move into {}", dir.display())))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// `kvm-amd.ko` and `kvm_amd` name the same module.
fn same_module(file: &str, name: &str) -> bool {
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_") == name.replace('-', "_")
}

fn find_modules(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if n.ends_with(".ko") {
                    out.push((n.to_string(), p.clone()));
                }
            }
        }
    }
    out
}

fn run(cmd: &mut Command) -> Result<(), NestedError> {
    let out = cmd
        .output()
        .map_err(io_err(format!("cannot run {:?}", cmd.get_program())))?;
    if out.status.success() {
        return Ok(());
    }
    Err(NestedError::Kernel(format!(
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// An exclusive `flock` held until drop.
pub(crate) struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    pub(crate) fn take(path: &Path) -> Result<Self, NestedError> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("cannot open lock {}", path.display())))?;
        // SAFETY: flock on a descriptor we own; it blocks until the lock is ours.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(format!("flock {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Lock(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_versioned_package() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-48-amd64\n  Recommends: x\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-48-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
        assert_eq!(abi_number("linux-image-6.1.0-48-amd64"), 48);
        assert_eq!(abi_number("linux-image-junk"), 0);
    }

    #[test]
    fn module_names_match_across_dash_and_underscore() {
        assert!(same_module("kvm-amd.ko", "kvm-amd"));
        assert!(same_module("kvm_amd.ko", "kvm-amd"));
        assert!(same_module("9pnet_virtio.ko.xz", "9pnet_virtio"));
        assert!(!same_module("kvm.ko", "kvm-amd"));
    }
}
