//! L1's initramfs: static busybox, the L1 kernel's modules and an `/init` that loads them,
//! brings up loopback, mounts the host's root read-only over 9p at `/newroot` with L1's own proc, sys, dev,
//! devpts, cgroup2 and a tmpfs `/run`, copies the run's script to
//! `/run/l1/run.sh` and runs it chrooted, then prints the exit marker and powers off.
//!
//! The base archive is cached beside the kernel; each run appends a small second archive
//! holding only `/run.sh` (Linux unpacks concatenated newc archives in order).

use std::path::{Path, PathBuf};

use guest_image::cpio::Writer;

use crate::{io_err, L1Kernel, NestedError};

/// Printed by `/init` after the command: `sandscope-l1: exit=N`.
pub const EXIT_MARKER: &str = "sandscope-l1: exit=";

/// The 9p mount tag of the host's root.
pub const ROOT_TAG: &str = "hostroot";

const INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "sandscope-l1: $*" >/dev/console; }
for m in $(cat /etc/l1-modules); do
    insmod /lib/l1/$m.ko >/dev/console 2>&1 || say "insmod $m failed"
done
ifconfig lo 127.0.0.1 up || say "cannot bring up loopback"
[ -c /dev/kvm ] || say "no /dev/kvm: kvm_amd did not load (is QEMU's -cpu max missing svm?)"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot; then
    say "cannot mount the host's root over 9p"
    echo "sandscope-l1: exit=125" >/dev/console
    poweroff -f
fi
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/run/l1
cp /run.sh /newroot/run/l1/run.sh
chroot /newroot /bin/sh /run/l1/run.sh </dev/null >/dev/console 2>&1
rc=$?
echo "" >/dev/console
echo "sandscope-l1: exit=$rc" >/dev/console
poweroff -f
"#;

const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "cat", "cp", "chroot", "poweroff", "echo", "ifconfig",
];

/// The cached base archive for `kernel` (written on first use).
pub fn base(kernel: &L1Kernel) -> Result<PathBuf, NestedError> {
    let busybox = guest_image::find_busybox().ok_or(NestedError::MissingTool {
        tool: "busybox",
        hint: "apt-get install busybox-static",
    })?;
    let bb = std::fs::read(&busybox).map_err(io_err(format!("read {}", busybox.display())))?;
    let key = guest_image::short_hash(&[INIT.as_bytes(), &bb, kernel.package.as_bytes()], 12);
    let path = kernel.dir.join(format!("initramfs-{key}.cpio"));
    if path.is_file() {
        return Ok(path);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let f = std::fs::File::create(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    let mut w = Writer::new(std::io::BufWriter::new(f));
    let werr = |e| io_err("write the L1 initramfs")(e);
    for d in [
        "bin", "dev", "etc", "lib", "lib/l1", "proc", "sys", "newroot",
    ] {
        w.dir(d, 0o755).map_err(werr)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1).map_err(werr)?;
    w.file("bin/busybox", 0o755, &bb).map_err(werr)?;
    for a in APPLETS {
        w.symlink(&format!("bin/{a}"), "busybox").map_err(werr)?;
    }
    let mut names = Vec::new();
    for m in &kernel.modules {
        let name = m
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let data = std::fs::read(m).map_err(io_err(format!("read {}", m.display())))?;
        w.file(&format!("lib/l1/{name}.ko"), 0o644, &data)
            .map_err(werr)?;
        names.push(name);
    }
    w.file("etc/l1-modules", 0o644, names.join("\n").as_bytes())
        .map_err(werr)?;
    w.file("init", 0o755, INIT.as_bytes()).map_err(werr)?;
    w.finish().map_err(werr)?;
    std::fs::rename(&tmp, &path).map_err(io_err(format!("rename to {}", path.display())))?;
    Ok(path)
}

/// Writes `base` followed by an archive holding `/run.sh` = `script` to `out`.
pub fn with_script(base: &Path, script: &str, out: &Path) -> Result<(), NestedError> {
    let mut bytes = std::fs::read(base).map_err(io_err(format!("read {}", base.display())))?;
    let mut w = Writer::new(Vec::new());
    w.file("run.sh", 0o755, script.as_bytes())
        .map_err(io_err("write run.sh"))?;
    let extra = w.finish().map_err(io_err("write run.sh"))?;
    bytes.extend_from_slice(&extra);
    std::fs::write(out, bytes).map_err(io_err(format!("write {}", out.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_archive_holds_the_script_after_the_base() {
        let d = tempdir();
        let base = d.join("base.cpio");
        let mut w = Writer::new(Vec::new());
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        std::fs::write(&base, w.finish().unwrap()).unwrap();
        let out = d.join("run.cpio");
        with_script(&base, "echo hi\n", &out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let base_len = std::fs::metadata(&base).unwrap().len() as usize;
        let first = guest_image::cpio::read(&bytes[..base_len]).unwrap();
        assert_eq!(first[0].name, "init");
        let second = guest_image::cpio::read(&bytes[base_len..]).unwrap();
        assert_eq!(second[0].name, "run.sh");
        assert_eq!(
            second[0].kind,
            guest_image::cpio::Kind::File(b"echo hi\n".to_vec())
        );
        let _ = std::fs::remove_dir_all(d);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("nested-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
