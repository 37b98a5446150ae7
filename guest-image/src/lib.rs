//! Guest images for sandscope microVMs.
//!
//! - [`kernel`]: the minimal guest kernel, built from Debian's `linux-source-6.1` with our
//!   config fragment (`kernel.fragment`) and cached under `~/.cache/sandscope/kernel/KEY`,
//!   where KEY hashes the fragment and the source package version.
//! - [`initramfs`]: the per-function initramfs (cpio newc, written by [`cpio`]): the static
//!   guest-probe as `/init`, busybox for shells, and the function's code at `/var/task`.

pub mod cpio;
pub mod initramfs;
pub mod kernel;

use std::path::{Path, PathBuf};

/// Where sandscope caches heavy artifacts: `$SANDSCOPE_CACHE`, else
/// `$XDG_CACHE_HOME/sandscope`, else `~/.cache/sandscope`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SANDSCOPE_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("sandscope");
    }
    let home = std::env::var_os("HOME")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("sandscope")
}

/// The static busybox (Debian `busybox-static` installs `/bin/busybox`), if present.
pub fn find_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

/// Hex SHA-256 of some byte strings, truncated to `len` characters.
pub fn short_hash(parts: &[&[u8]], len: usize) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p);
    }
    let d = h.finalize();
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s.truncate(len);
    s
}

/// Reports progress of long work (the CLI draws it as a progress bar).
pub trait Progress {
    /// A new stage begins; `total` steps if known.
    fn stage(&self, name: &str, total: Option<u64>);
    /// `done` steps of the current stage are finished.
    fn step(&self, done: u64);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _: &str, _: Option<u64>) {}
    fn step(&self, _: u64) {}
}
