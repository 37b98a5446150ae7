//! Sandbox setup done as PID 1 before anything else: the process sandbox's root
//! filesystem (tmpfs root, read-only binds of the host's programs, fresh /tmp /proc /dev,
//! pivot_root), hostname, loopback, and the VM-style "mount what is missing" path.

use crate::args::RootSpec;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A setup step that failed, naming the step and the path.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// mount(2) failed.
    #[error("mount {what} on {target}")]
    Mount {
        /// What was being mounted (fstype or bind source).
        what: String,
        /// Mount point.
        target: PathBuf,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// Creating a directory, file or symlink failed.
    #[error("create {path}")]
    Create {
        /// Path.
        path: PathBuf,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// Inspecting a host path failed.
    #[error("inspect {path}")]
    Inspect {
        /// Path.
        path: PathBuf,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// pivot_root(2) or the old root's removal failed.
    #[error("pivot_root into {root} ({step})")]
    PivotRoot {
        /// New root.
        root: PathBuf,
        /// The sub-step.
        step: &'static str,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// sethostname(2) failed.
    #[error("sethostname {0:?}")]
    SetHostname(String, #[source] std::io::Error),
    /// Bringing `lo` up failed.
    #[error("bring loopback up ({0})")]
    LoopbackUp(&'static str, #[source] std::io::Error),
    /// A path contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    NulInPath(PathBuf),
}

fn cpath(p: &Path) -> Result<CString, SetupError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SetupError::NulInPath(p.to_path_buf()))
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), SetupError> {
    let what = fstype
        .map(str::to_string)
        .or_else(|| source.map(|s| s.display().to_string()))
        .unwrap_or_else(|| "(remount)".into());
    let err = |source| SetupError::Mount {
        what: what.clone(),
        target: target.into(),
        source,
    };
    let src = source.map(cpath).transpose()?;
    let tgt = cpath(target)?;
    let fst = fstype.map(|f| CString::new(f).expect("static fstype has no NUL"));
    let dat = data.map(|d| CString::new(d).expect("static mount data has no NUL"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            tgt.as_ptr(),
            ptr(&fst),
            flags,
            ptr(&dat) as *const libc::c_void,
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn mkdir_p(p: &Path) -> Result<(), SetupError> {
    std::fs::create_dir_all(p).map_err(|source| SetupError::Create {
        path: p.into(),
        source,
    })
}

/// Bind `src` on `dst` read-only (bind, then remount read-only).
fn bind_ro(src: &Path, dst: &Path) -> Result<(), SetupError> {
    mount(Some(src), dst, None, libc::MS_BIND | libc::MS_REC, None)?;
    mount(
        None,
        dst,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
}

/// Host top-level entries recreated in the sandbox root (binds or symlinks).
pub const HOST_ENTRIES: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];

const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Build the sandbox root on `spec.root_dir` and pivot into it; cwd ends at /var/task.
/// Must run as PID 1 of fresh mount and pid namespaces.
pub fn build_root(spec: &RootSpec) -> Result<(), SetupError> {
    let root = spec.root_dir.as_path();
    let flags_nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        flags_nosuid,
        Some("mode=0755"),
    )?;

    for name in HOST_ENTRIES {
        let host = Path::new("/").join(name);
        let inside = root.join(name);
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(SetupError::Inspect { path: host, source }),
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host).map_err(|source| SetupError::Inspect {
                path: host.clone(),
                source,
            })?;
            std::os::unix::fs::symlink(&target, &inside).map_err(|source| SetupError::Create {
                path: inside.clone(),
                source,
            })?;
        } else if meta.is_dir() {
            mkdir_p(&inside)?;
            bind_ro(&host, &inside)?;
        }
    }

    let task = root.join("var/task");
    mkdir_p(&task)?;
    bind_ro(&spec.code_dir, &task)?;

    let tmp = root.join("tmp");
    mkdir_p(&tmp)?;
    mount(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        flags_nosuid,
        Some("mode=1777"),
    )?;

    let proc_ = root.join("proc");
    mkdir_p(&proc_)?;
    mount(
        Some(Path::new("proc")),
        &proc_,
        Some("proc"),
        flags_nosuid | libc::MS_NOEXEC,
        None,
    )?;

    let dev = root.join("dev");
    mkdir_p(&dev)?;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755"),
    )?;
    for node in DEV_NODES {
        let host = Path::new("/dev").join(node);
        if !host.exists() {
            continue;
        }
        let inside = dev.join(node);
        std::fs::File::create(&inside).map_err(|source| SetupError::Create {
            path: inside.clone(),
            source,
        })?;
        mount(Some(&host), &inside, None, libc::MS_BIND, None)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let inside = dev.join(link);
        std::os::unix::fs::symlink(target, &inside).map_err(|source| SetupError::Create {
            path: inside,
            source,
        })?;
    }
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    mount(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        flags_nosuid,
        Some("mode=1777"),
    )?;

    // A private devpts instance for shell sessions' terminals (best effort: without it
    // shells still run on pipes, and PTY requests fail with a clear error).
    let pts = dev.join("pts");
    mkdir_p(&pts)?;
    if mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .is_ok()
    {
        let ptmx = dev.join("ptmx");
        std::os::unix::fs::symlink("pts/ptmx", &ptmx)
            .map_err(|source| SetupError::Create { path: ptmx, source })?;
    }

    let sys = root.join("sys");
    mkdir_p(&sys)?;
    let sys_flags = flags_nosuid | libc::MS_NOEXEC | libc::MS_RDONLY;
    if mount(
        Some(Path::new("sysfs")),
        &sys,
        Some("sysfs"),
        sys_flags,
        None,
    )
    .is_err()
    {
        bind_ro(Path::new("/sys"), &sys)?;
    }

    pivot_into(root)?;
    // The root itself stays a tmpfs but read-only; /tmp is the writable place.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | flags_nosuid,
        None,
    )?;
    std::env::set_current_dir("/var/task").map_err(|source| SetupError::Inspect {
        path: "/var/task".into(),
        source,
    })?;
    Ok(())
}

fn pivot_into(root: &Path) -> Result<(), SetupError> {
    let e = |step, source| SetupError::PivotRoot {
        root: root.into(),
        step,
        source,
    };
    let old = root.join(".oldroot");
    mkdir_p(&old)?;
    std::env::set_current_dir(root).map_err(|s| e("chdir to new root", s))?;
    // SAFETY: both arguments are NUL-terminated strings valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".oldroot".as_ptr()) };
    if rc != 0 {
        return Err(e("pivot_root", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|s| e("chdir /", s))?;
    // SAFETY: NUL-terminated path valid for the call.
    if unsafe { libc::umount2(c"/.oldroot".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(e("detach old root", std::io::Error::last_os_error()));
    }
    std::fs::remove_dir("/.oldroot").map_err(|s| e("remove old root dir", s))?;
    Ok(())
}

/// Set the UTS hostname.
pub fn set_hostname(name: &str) -> Result<(), SetupError> {
    // SAFETY: pointer and length describe `name`'s bytes, valid for the call.
    let rc = unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) };
    if rc != 0 {
        return Err(SetupError::SetHostname(
            name.into(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Bring the loopback interface up (SIOCGIFFLAGS / SIOCSIFFLAGS with IFF_UP).
pub fn loopback_up() -> Result<(), SetupError> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SetupError::LoopbackUp(
            "socket",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just created and is owned here.
    let _guard = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming "lo"; the ioctl fills ifru_flags.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) } != 0 {
        return Err(SetupError::LoopbackUp(
            "SIOCGIFFLAGS",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS just wrote.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `ifr` is a valid ifreq with the new flags.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) } != 0 {
        return Err(SetupError::LoopbackUp(
            "SIOCSIFFLAGS",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// One filesystem a VM's init mounts where nothing is mounted yet.
struct Missing {
    target: &'static str,
    source: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: Option<&'static str>,
}

/// What [`mount_missing`] mounts, in order: /proc first, since /proc/self/mountinfo then
/// tells what else is mounted; /dev before /dev/pts.
const MISSING: &[Missing] = &[
    Missing {
        target: "/proc",
        source: "proc",
        fstype: "proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    Missing {
        target: "/sys",
        source: "sysfs",
        fstype: "sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    Missing {
        target: "/dev",
        source: "devtmpfs",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Missing {
        target: "/dev/pts",
        source: "devpts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: None,
    },
    Missing {
        target: "/tmp",
        source: "tmpfs",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some("mode=1777"),
    },
];

fn mount_entry(m: &Missing) -> Result<(), SetupError> {
    let t = Path::new(m.target);
    mkdir_p(t)?;
    mount(
        Some(Path::new(m.source)),
        t,
        Some(m.fstype),
        m.flags,
        m.data,
    )
}

fn entry(target: &str) -> &'static Missing {
    MISSING
        .iter()
        .find(|m| m.target == target)
        .expect("target is one of MISSING")
}

/// PID 1 without a built root (a VM's init): mount /proc, /sys, /dev, /dev/pts and /tmp
/// where nothing is mounted yet. Failures are reported to stderr and skipped.
pub fn mount_missing() {
    for m in MISSING {
        if let Err(e) = mount_if_missing_entry(m) {
            eprintln!("guest-probe: {}", crate::error_chain(&e));
        }
    }
}

/// Mount /proc unless it is there (a VM's init reads the kernel command line from it
/// before anything else).
pub fn mount_proc_if_missing() -> Result<(), SetupError> {
    mount_if_missing_entry(entry("/proc"))
}

fn mount_if_missing_entry(m: &Missing) -> Result<(), SetupError> {
    let mounted = if m.target == "/proc" {
        Path::new("/proc/self/stat").exists()
    } else {
        is_mount_point(
            &crate::procinfo::read_lossy("/proc/self/mountinfo"),
            m.target,
        )
    };
    if mounted {
        return Ok(());
    }
    mount_entry(m)
}

/// Mount devtmpfs on /dev without looking first: the caller knows it is missing (a device
/// node it needs is absent). [`mount_missing`] later sees it mounted and skips it.
pub fn mount_devtmpfs() -> Result<(), SetupError> {
    mount_entry(entry("/dev"))
}

/// Create the character device node `path` (major, minor), mode 0600.
pub fn mknod_char(path: &Path, major: u32, minor: u32) -> Result<(), SetupError> {
    let c = cpath(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: `c` is a NUL-terminated path valid for the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, dev) };
    if rc != 0 {
        return Err(SetupError::Create {
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `target` is a mount point according to /proc/self/mountinfo text.
pub fn is_mount_point(mountinfo: &str, target: &str) -> bool {
    mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target))
}

/// Lower this process's OOM score to -1000 (root only) so the OOM killer picks handlers.
pub fn protect_from_oom() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Without CAP_SYS_RESOURCE (e.g. root in a container) this fails; not fatal.
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
            if e.kind() != std::io::ErrorKind::PermissionDenied {
                eprintln!("guest-probe: setting oom_score_adj: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_mounts_are_in_the_table() {
        // mount_proc_if_missing and mount_devtmpfs (the boot-timer's early mounts) look
        // their entries up by target; /proc must stay first for mount_missing's checks.
        assert_eq!(entry("/proc").fstype, "proc");
        assert_eq!(entry("/dev").fstype, "devtmpfs");
        assert_eq!(MISSING[0].target, "/proc");
    }

    #[test]
    fn mount_point_lookup() {
        let mi = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                  23 1 0:22 / /sys rw - sysfs sysfs rw\n";
        assert!(is_mount_point(mi, "/proc"));
        assert!(is_mount_point(mi, "/sys"));
        assert!(!is_mount_point(mi, "/tmp"));
        assert!(!is_mount_point("garbage", "/tmp"));
    }
}
