//! The boot-timer marker: as a microVM's init, tell the VMM "init has started" by writing
//! the magic byte to its boot-timer device, so the kernel phase of the cold-start waterfall
//! is measured on the VMM's clock rather than the guest's.
//!
//! The VMM names the device's guest-physical address on the kernel command line,
//! `sandscope.boot_timer=ADDR` (vmm-lite: `0xd0000000`, Firecracker's layout); a VMM
//! without the device (QEMU) leaves the key out and nothing is written. The write goes
//! through /dev/mem (`CONFIG_DEVMEM`; `STRICT_DEVMEM` allows MMIO that is not RAM): open
//! with `O_SYNC` (uncached), map the page holding ADDR, one volatile byte store, unmap.
//!
//! Order, fastest first: the address is only on /proc/cmdline, so /proc is mounted first;
//! then /dev/mem is opened. From an initramfs, /dev is not mounted yet (`DEVTMPFS_MOUNT`
//! only applies to a disk root), so on ENOENT devtmpfs is mounted on /dev — a mount the
//! init does anyway, just earlier — and, should that fail, the node is made with mknod
//! (char 1:1) on the root filesystem. Only then do the other mounts follow.
//!
//! Nothing here is fatal: a failure is a warning on stderr (the VM's console) and a
//! `boot_timer_failed` marker in Hello; the agent then falls back to the guest's clocks.

use crate::clock::{monotonic_ns, Clock, Markers};
use crate::setup::SetupError;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Kernel command-line key naming the device's guest-physical address.
pub const CMDLINE_KEY: &str = "sandscope.boot_timer";
/// The byte the device waits for at offset 0 (Firecracker's and vmm-lite's value).
pub const MAGIC: u8 = 123;
/// The physical-memory device.
pub const DEV_MEM: &str = "/dev/mem";
/// Marker recorded just before a successful write (its guest time lets the agent place
/// `init_start` on the VMM's clock).
pub const MARKER: &str = "boot_timer";
/// Marker recorded when the address was given but the write failed.
pub const MARKER_FAILED: &str = "boot_timer_failed";
/// Highest physical address x86-64 can have (52 bits).
pub const MAX_PHYS_ADDR: u64 = (1 << 52) - 1;

/// Why the marker was not written.
#[derive(Debug, thiserror::Error)]
pub enum BootTimerError {
    /// The address on the command line is not a number.
    #[error("{CMDLINE_KEY}={0:?} is not an address (hex with 0x, or decimal)")]
    BadAddress(String),
    /// The address does not fit the 52-bit physical address space.
    #[error("{CMDLINE_KEY}={0:#x} is beyond the physical address space")]
    AddressRange(u64),
    /// /dev/mem is absent and could not be made.
    #[error("no {DEV_MEM} (mounting devtmpfs failed: {mount})")]
    NoDevMem {
        /// The devtmpfs mount's error chain.
        mount: String,
        /// The mknod fallback's error.
        #[source]
        source: SetupError,
    },
    /// open(2) failed.
    #[error("open {path}")]
    Open {
        /// Path.
        path: PathBuf,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// mmap(2) of the page failed.
    #[error("map page {page:#x} of {path}")]
    Map {
        /// Path.
        path: PathBuf,
        /// Page-aligned offset.
        page: u64,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// munmap(2) failed (the byte was written).
    #[error("unmap page {page:#x}")]
    Unmap {
        /// Page-aligned offset.
        page: u64,
        /// errno.
        #[source]
        source: std::io::Error,
    },
}

/// Parse an address: `0x` / `0X` followed by hex digits, or decimal digits. Nothing else
/// (no sign, no spaces, no underscores, no suffix); at most [`MAX_PHYS_ADDR`].
pub fn parse_addr(s: &str) -> Result<u64, BootTimerError> {
    let bad = || BootTimerError::BadAddress(s.to_string());
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    let addr = u64::from_str_radix(digits, radix).map_err(|_| bad())?;
    if addr > MAX_PHYS_ADDR {
        return Err(BootTimerError::AddressRange(addr));
    }
    Ok(addr)
}

/// Whether to write the marker, and where: only as a microVM's init (PID 1 with the VM
/// image's argument file) and only when the kernel command line names the address. The
/// first `sandscope.boot_timer=` counts (as for `sandscope.id=`).
///
/// `Ok(None)`: nothing to do (not a VM's init, or a VMM without the device).
pub fn plan(
    pid1: bool,
    vm_image: bool,
    kernel_cmdline: &str,
) -> Result<Option<u64>, BootTimerError> {
    if !(pid1 && vm_image) {
        return Ok(None);
    }
    let value = kernel_cmdline.split_whitespace().find_map(|w| {
        w.strip_prefix(CMDLINE_KEY)
            .and_then(|rest| rest.strip_prefix('='))
    });
    value.map(parse_addr).transpose()
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 && (p as u64).is_power_of_two() {
        p as u64
    } else {
        4096
    }
}

/// Write [`MAGIC`] at byte `addr` of `path` (/dev/mem, or a regular file in tests): open
/// read-write with `O_SYNC`, map the one page holding `addr`, a volatile store, unmap.
/// Returns [`monotonic_ns`] read just before the store.
pub fn write_marker(path: &Path, addr: u64) -> Result<u64, BootTimerError> {
    let page_len = page_size();
    let page = addr & !(page_len - 1);
    let offset = (addr - page) as usize;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open(path)
        .map_err(|source| BootTimerError::Open {
            path: path.into(),
            source,
        })?;
    let map_err = |source| BootTimerError::Map {
        path: path.into(),
        page,
        source,
    };
    let off = libc::off_t::try_from(page)
        .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    // SAFETY: a new shared mapping of `page_len` bytes of an open fd; no existing memory is
    // affected, and the result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            off,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(map_err(std::io::Error::last_os_error()));
    }
    let at = monotonic_ns();
    // SAFETY: `ptr` is a live, writable mapping of `page_len` bytes and
    // `offset < page_len`; a volatile store is a single MMIO write on a device page.
    unsafe { ptr.cast::<u8>().add(offset).write_volatile(MAGIC) };
    // SAFETY: unmaps exactly the mapping made above, which nothing else refers to.
    if unsafe { libc::munmap(ptr, page_len as usize) } != 0 {
        return Err(BootTimerError::Unmap {
            page,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(at)
}

/// [`write_marker`] on /dev/mem as a VM's init: when /dev/mem is missing (an initramfs
/// root, /dev not mounted yet), mount devtmpfs on /dev, else mknod /dev/mem, and retry.
pub fn write_as_init(addr: u64) -> Result<u64, BootTimerError> {
    let dev_mem = Path::new(DEV_MEM);
    match write_marker(dev_mem, addr) {
        Err(BootTimerError::Open { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            if let Err(mount) = crate::setup::mount_devtmpfs() {
                crate::setup::mknod_char(dev_mem, 1, 1).map_err(|source| {
                    BootTimerError::NoDevMem {
                        mount: crate::error_chain(&mount),
                        source,
                    }
                })?;
            }
            write_marker(dev_mem, addr)
        }
        r => r,
    }
}

/// What [`mark_boot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not asked for.
    Skipped,
    /// Written; the marker [`MARKER`] was recorded.
    Written,
    /// Asked for but failed; warned, and [`MARKER_FAILED`] recorded.
    Failed,
}

/// Decide ([`plan`]), write ([`write_as_init`]) and record the outcome in `markers`.
/// Never fails: problems are a warning on stderr.
pub fn mark_boot(
    pid1: bool,
    vm_image: bool,
    kernel_cmdline: &str,
    clock: &Clock,
    markers: &mut Markers,
) -> Outcome {
    let res = plan(pid1, vm_image, kernel_cmdline).and_then(|p| p.map(write_as_init).transpose());
    match res {
        Ok(None) => Outcome::Skipped,
        Ok(Some(at)) => {
            markers.mark_at(MARKER, clock.since_init_at(at));
            Outcome::Written
        }
        Err(e) => {
            eprintln!(
                "guest-probe: warning: boot-timer marker not written: {}",
                crate::error_chain(&e)
            );
            markers.mark(clock, MARKER_FAILED);
            Outcome::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn addresses_parse_strictly() {
        assert_eq!(parse_addr("0xd0000000").unwrap(), 0xd000_0000);
        assert_eq!(parse_addr("0XD0000000").unwrap(), 0xd000_0000);
        assert_eq!(parse_addr("0xDeadBee0").unwrap(), 0xdead_bee0);
        assert_eq!(parse_addr("3489660928").unwrap(), 0xd000_0000);
        assert_eq!(parse_addr("0").unwrap(), 0);
        assert_eq!(parse_addr("0x000fffffffffffff").unwrap(), MAX_PHYS_ADDR);
        for bad in [
            "",
            "0x",
            "0X",
            "x10",
            "+5",
            "-1",
            "0x-1",
            "0x+1",
            " 1",
            "1 ",
            "1_000",
            "0xd000_0000",
            "0xd0000000garbage",
            "12ab",
            "0b101",
            "0o17",
            "1e6",
            "٣",
            "0x١",
            "0xg",
            "99999999999999999999999",
            "0x10000000000000000",
        ] {
            assert!(
                matches!(parse_addr(bad), Err(BootTimerError::BadAddress(ref v)) if v == bad),
                "{bad:?} gave {:?}",
                parse_addr(bad)
            );
        }
        for big in ["0x10000000000000", "18446744073709551615"] {
            let e = parse_addr(big).unwrap_err();
            assert!(matches!(e, BootTimerError::AddressRange(_)), "{big}: {e:?}");
            assert!(e.to_string().contains("beyond"), "{e}");
        }
        assert_eq!(
            parse_addr("junk").unwrap_err().to_string(),
            "sandscope.boot_timer=\"junk\" is not an address (hex with 0x, or decimal)"
        );
    }

    #[test]
    fn writes_only_as_vm_init_with_the_key() {
        let c = "console=ttyS0 reboot=k panic=-1 quiet sandscope.id=sb-1 sandscope.boot_timer=0xd0000000";
        assert_eq!(plan(true, true, c).unwrap(), Some(0xd000_0000));
        // Not PID 1 (a process sandbox's probe, a test run), or PID 1 without the VM
        // image's argument file (a process sandbox's init): never, whatever the cmdline.
        assert_eq!(plan(false, true, c).unwrap(), None);
        assert_eq!(plan(true, false, c).unwrap(), None);
        assert_eq!(plan(false, false, c).unwrap(), None);
        // A VMM without the device (QEMU) leaves the key out.
        assert_eq!(
            plan(true, true, "console=ttyS0 quiet sandscope.id=sb-1").unwrap(),
            None
        );
        // Only the exact key counts; the first occurrence wins.
        assert_eq!(
            plan(
                true,
                true,
                "sandscope.boot_timerx=1 xsandscope.boot_timer=2"
            )
            .unwrap(),
            None
        );
        assert_eq!(
            plan(
                true,
                true,
                "sandscope.boot_timer=4096 sandscope.boot_timer=0x2000"
            )
            .unwrap(),
            Some(4096)
        );
        // A bare key names nothing; a key with a bad value is an error to report.
        assert_eq!(plan(true, true, "sandscope.boot_timer").unwrap(), None);
        for c in ["sandscope.boot_timer=", "sandscope.boot_timer=0xzz"] {
            let e = plan(true, true, c).unwrap_err();
            assert!(
                matches!(e, BootTimerError::BadAddress(_)),
                "{c:?} gave {e:?}"
            );
        }
    }

    fn page_file(pages: u64) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0u8; (pages * page_size()) as usize])
            .unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn marker_lands_at_the_address() {
        // A regular file maps like /dev/mem: byte `addr` of the file is "physical" `addr`.
        let f = page_file(1);
        let t0 = monotonic_ns();
        let at = write_marker(f.path(), 0).unwrap();
        assert!(at >= t0);
        let bytes = std::fs::read(f.path()).unwrap();
        assert_eq!(bytes[0], MAGIC);
        assert!(bytes[1..].iter().all(|&b| b == 0));

        // Not page-aligned, in the second page: the page holding it is mapped.
        let f = page_file(2);
        let addr = page_size() + 0x123;
        write_marker(f.path(), addr).unwrap();
        let bytes = std::fs::read(f.path()).unwrap();
        for (i, &b) in bytes.iter().enumerate() {
            assert_eq!(b, if i as u64 == addr { MAGIC } else { 0 }, "byte {i}");
        }
    }

    #[test]
    fn write_failures_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_marker(&dir.path().join("absent"), 0).unwrap_err();
        assert!(matches!(e, BootTimerError::Open { .. }), "{e:?}");
        // A directory opens neither read-write nor maps.
        let e = write_marker(dir.path(), 0).unwrap_err();
        assert!(matches!(e, BootTimerError::Open { .. }), "{e:?}");
        // Beyond the end of an empty file the mapping succeeds but would fault (SIGBUS) on
        // a regular file; /dev/mem has no end, so only an unmappable fd is tested here.
        let e = write_marker(Path::new("/proc/self/status"), 0).unwrap_err();
        assert!(
            matches!(e, BootTimerError::Open { .. } | BootTimerError::Map { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn outcome_is_recorded_in_markers() {
        let clock = Clock::start();
        let mut m = Markers::new();
        // Not a VM's init: nothing written, nothing recorded.
        let c = "sandscope.boot_timer=0xd0000000";
        assert_eq!(mark_boot(false, false, c, &clock, &mut m), Outcome::Skipped);
        assert_eq!(m.list().len(), 1);
        // A bad address is reported, not fatal.
        let c = "sandscope.boot_timer=nope";
        assert_eq!(mark_boot(true, true, c, &clock, &mut m), Outcome::Failed);
        assert_eq!(m.list().last().unwrap().name, MARKER_FAILED);
    }
}
