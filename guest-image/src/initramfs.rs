//! The per-function initramfs: `/init` is the static guest-probe, `/bin/busybox` (and its
//! applet links) gives shells, `/var/task` holds the function's code, and
//! `/etc/sandscope/probe.args` carries the probe's command line (one argument per line;
//! the sandbox id comes from the kernel command line, `sandscope.id=ID`).

use crate::cpio;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the probe finds its arguments inside the guest.
pub const PROBE_ARGS_PATH: &str = "etc/sandscope/probe.args";

/// What goes into one function's initramfs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The static guest-probe binary (becomes `/init`).
    pub probe: PathBuf,
    /// A static busybox (becomes `/bin/busybox` + applet links), if any.
    pub busybox: Option<PathBuf>,
    /// The function's code directory (copied to `/var/task`).
    pub code_dir: Option<PathBuf>,
    /// Probe arguments, one per line in `/etc/sandscope/probe.args`.
    pub probe_args: Vec<String>,
}

/// Why an initramfs could not be written.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading an input failed.
    #[error("reading {path}")]
    Read {
        /// The input.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The probe is not a static executable.
    #[error("guest probe {path} is not a static executable ({reason}); build it with scripts/build-probe")]
    ProbeNotStatic {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A probe argument cannot be stored one per line.
    #[error("probe argument {0:?} contains a newline")]
    BadArg(String),
    /// Writing the archive failed.
    #[error("writing {path}")]
    Write {
        /// The archive.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Check that `bytes` are an ELF executable with no program interpreter (static or
/// static-pie), which is what can run as `/init` in an empty root.
pub fn check_static_elf(path: &Path, bytes: &[u8]) -> Result<(), InitramfsError> {
    let bad = |reason: &str| InitramfsError::ProbeNotStatic {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file"));
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err(bad("not a 64-bit little-endian ELF"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let Some(ph) = bytes.get(o..o + 4) else {
            return Err(bad("program headers out of bounds"));
        };
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP {
            return Err(bad("dynamically linked (has a program interpreter)"));
        }
    }
    Ok(())
}

/// Applets of a busybox binary (`busybox --list`).
pub fn busybox_applets(busybox: &Path) -> Vec<String> {
    std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::trim)
                .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Write the archive for `spec`; returns its size in bytes.
pub fn write<W: Write>(spec: &Spec, out: W) -> Result<u64, InitramfsError> {
    let werr = |source| InitramfsError::Write {
        path: PathBuf::from("<initramfs>"),
        source,
    };
    for a in &spec.probe_args {
        if a.contains('\n') {
            return Err(InitramfsError::BadArg(a.clone()));
        }
    }
    let probe = read(&spec.probe)?;
    check_static_elf(&spec.probe, &probe)?;
    let mut w = cpio::Writer::new(out);
    for d in [
        "bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "sbin", "usr", "usr/bin",
        "usr/sbin", "var",
    ] {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })
            .map_err(werr)?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    w.char_dev("dev/console", 0o600, 5, 1).map_err(werr)?;
    w.char_dev("dev/null", 0o666, 1, 3).map_err(werr)?;
    w.file("init", 0o755, &probe).map_err(werr)?;
    drop(probe);
    if let Some(bb) = &spec.busybox {
        let bytes = read(bb)?;
        w.file("bin/busybox", 0o755, &bytes).map_err(werr)?;
        for applet in busybox_applets(bb) {
            w.symlink(&format!("bin/{applet}"), "busybox")
                .map_err(werr)?;
        }
    }
    w.dir("etc/sandscope", 0o755).map_err(werr)?;
    let mut args = spec.probe_args.join("\n");
    args.push('\n');
    w.file(PROBE_ARGS_PATH, 0o644, args.as_bytes())
        .map_err(werr)?;
    w.file("etc/hostname", 0o644, b"sandscope\n")
        .map_err(werr)?;
    w.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .map_err(werr)?;
    w.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        .map_err(werr)?;
    w.dir("var/task", 0o755).map_err(werr)?;
    if let Some(code) = &spec.code_dir {
        add_tree(&mut w, code, "var/task")?;
    }
    let out_len = w.written();
    w.finish().map_err(werr)?;
    Ok(out_len)
}

/// Copy a directory tree (files, dirs, symlinks; modes kept) under `prefix`, sorted so the
/// archive is reproducible.
fn add_tree<W: Write>(
    w: &mut cpio::Writer<W>,
    dir: &Path,
    prefix: &str,
) -> Result<(), InitramfsError> {
    use std::os::unix::fs::PermissionsExt;
    let rerr = |source| InitramfsError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(rerr)?
        .collect::<Result<_, _>>()
        .map_err(rerr)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
        let meta = std::fs::symlink_metadata(&path).map_err(|source| InitramfsError::Read {
            path: path.clone(),
            source,
        })?;
        let werr = |source| InitramfsError::Write {
            path: PathBuf::from(&name),
            source,
        };
        let perm = meta.permissions().mode();
        if meta.file_type().is_symlink() {
            let t = std::fs::read_link(&path).map_err(|source| InitramfsError::Read {
                path: path.clone(),
                source,
            })?;
            w.symlink(&name, &t.to_string_lossy()).map_err(werr)?;
        } else if meta.is_dir() {
            w.dir(&name, perm).map_err(werr)?;
            add_tree(w, &path, &name)?;
        } else if meta.is_file() {
            w.file(&name, perm, &read(&path)?).map_err(werr)?;
        }
    }
    Ok(())
}

/// Write the initramfs for `spec` into `dir` as `NAME-HASH.cpio`, HASH covering every
/// input, unless that file already exists. Returns its path.
pub fn build_cached(spec: &Spec, dir: &Path, name: &str) -> Result<PathBuf, InitramfsError> {
    let mut bytes = Vec::with_capacity(4 << 20);
    write(spec, &mut bytes)?;
    let hash = crate::short_hash(&[&bytes], 12);
    let path = dir.join(format!("{name}-{hash}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    let werr = |source| InitramfsError::Write {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(werr)?;
    let tmp = dir.join(format!(".{name}-{hash}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, &bytes).map_err(werr)?;
    std::fs::rename(&tmp, &path).map_err(werr)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::Kind;

    /// The test binary itself is no use as a probe (dynamic); a tiny static ELF header is.
    fn fake_static_elf() -> Vec<u8> {
        let mut b = vec![0u8; 128];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[32] = 64; // phoff
        b[54] = 56; // phentsize
        b[56] = 1; // phnum
        b[64] = 1; // PT_LOAD
        b.resize(64 + 56, 0);
        b
    }

    #[test]
    fn layout() {
        let d = tempfile::tempdir().unwrap();
        let probe = d.path().join("probe");
        std::fs::write(&probe, fake_static_elf()).unwrap();
        let code = d.path().join("code");
        std::fs::create_dir_all(code.join("lib")).unwrap();
        std::fs::write(code.join("handler.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::write(code.join("lib/x"), "x").unwrap();
        std::os::unix::fs::symlink("handler.sh", code.join("link")).unwrap();
        let spec = Spec {
            probe: probe.clone(),
            busybox: None,
            code_dir: Some(code),
            probe_args: vec!["--handler".into(), "./handler.sh arg".into()],
        };
        let mut bytes = Vec::new();
        write(&spec, &mut bytes).unwrap();
        let e = cpio::read(&bytes).unwrap();
        let find = |n: &str| {
            e.iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(find("init").kind, Kind::File(fake_static_elf()));
        assert_eq!(find("init").perm, 0o755);
        assert_eq!(find("dev/console").kind, Kind::CharDev(5, 1));
        assert_eq!(find("tmp").perm, 0o1777);
        assert_eq!(
            find(PROBE_ARGS_PATH).kind,
            Kind::File(b"--handler\n./handler.sh arg\n".to_vec())
        );
        assert!(matches!(find("var/task/handler.sh").kind, Kind::File(_)));
        assert_eq!(find("var/task/lib/x").kind, Kind::File(b"x".to_vec()));
        assert_eq!(
            find("var/task/link").kind,
            Kind::Symlink("handler.sh".into())
        );

        // Same inputs, same file; a changed input, a new file.
        let a = build_cached(&spec, d.path(), "f").unwrap();
        assert_eq!(build_cached(&spec, d.path(), "f").unwrap(), a);
        let mut s2 = spec.clone();
        s2.probe_args.push("--x".into());
        assert_ne!(build_cached(&s2, d.path(), "f").unwrap(), a);
    }

    #[test]
    fn bad_inputs() {
        let d = tempfile::tempdir().unwrap();
        let mut spec = Spec {
            probe: d.path().join("missing"),
            busybox: None,
            code_dir: None,
            probe_args: vec![],
        };
        let e = write(&spec, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        // A dynamic executable is refused (the test binary is one).
        spec.probe = std::env::current_exe().unwrap();
        let e = write(&spec, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("dynamically linked"), "{e}");
        let p = d.path().join("txt");
        std::fs::write(&p, "hello").unwrap();
        spec.probe = p;
        let e = write(&spec, Vec::new()).unwrap_err().to_string();
        assert!(e.contains("not an ELF"), "{e}");
        spec.probe_args = vec!["a\nb".into()];
        assert!(matches!(
            write(&spec, Vec::new()),
            Err(InitramfsError::BadArg(_))
        ));
    }

    #[test]
    fn busybox_applets_become_links() {
        let Some(bb) = crate::find_busybox() else {
            eprintln!("SKIPPED: busybox-static not installed (scripts/guest-deps installs it)");
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let probe = d.path().join("probe");
        std::fs::write(&probe, fake_static_elf()).unwrap();
        let spec = Spec {
            probe,
            busybox: Some(bb),
            code_dir: None,
            probe_args: vec![],
        };
        let mut bytes = Vec::new();
        write(&spec, &mut bytes).unwrap();
        let e = cpio::read(&bytes).unwrap();
        for a in ["bin/sh", "bin/ls", "bin/cat", "bin/ps"] {
            let x = e
                .iter()
                .find(|x| x.name == a)
                .unwrap_or_else(|| panic!("{a}"));
            assert_eq!(x.kind, Kind::Symlink("busybox".into()));
        }
    }
}
