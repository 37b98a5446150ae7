//! VM configuration: the validated form every other module uses.

use std::path::PathBuf;

use thiserror::Error;

use crate::boot::MIN_MEM_MIB;

/// Where guest serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// Discard.
    Null,
    /// A file or FIFO (created/truncated).
    Path(PathBuf),
}

/// Where guest serial input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialInput {
    /// No input.
    None,
    /// The VMM's stdin.
    Stdin,
    /// A Unix stream socket the VMM listens on; bytes from clients go to the guest.
    Unix(PathBuf),
}

/// vsock configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest CID (>= 3).
    pub cid: u64,
    /// Host Unix socket path (the muxer listens here; guest connections go to `<uds>_P`).
    pub uds: PathBuf,
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image (bzImage or ELF).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line appended to the VMM's.
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// vCPU count.
    pub vcpus: u8,
    /// Optional vsock device.
    pub vsock: Option<VsockConfig>,
    /// Serial output.
    pub serial_out: SerialOutput,
    /// Serial input.
    pub serial_in: SerialInput,
    /// Where to write the metrics JSON (on exit and on SIGUSR1); stderr if absent on SIGUSR1.
    pub metrics: Option<PathBuf>,
    /// Boot standard Linux kernels even under PVM.
    pub allow_pvm: bool,
    /// Suppress informational log lines.
    pub quiet: bool,
    /// Destroy the VM before exiting instead of in a detached helper.
    pub sync_teardown: bool,
    /// Control socket: `metrics` / `stop` requests, one line each.
    pub control: Option<PathBuf>,
}

/// Configuration errors, each naming the option.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Memory out of range.
    #[error("--mem-mib {0}: must be between {MIN_MEM_MIB} and 262144")]
    MemSize(u32),
    /// vCPUs out of range.
    #[error("--vcpus {0}: must be between 1 and {max}", max = crate::mptable::MAX_VCPUS)]
    Vcpus(u32),
    /// Reserved CID.
    #[error("--vsock-cid {0}: must be at least 3 and below 2^32-1 (0-2 are reserved)")]
    Cid(u64),
    /// Only one of cid/uds.
    #[error("--vsock-cid and --vsock-uds must be given together")]
    VsockHalf,
    /// Socket path too long for sun_path once the port suffix is added.
    #[error("--vsock-uds {0}: path too long for a Unix socket (max 96 bytes)")]
    UdsTooLong(String),
}

/// Raw inputs, as parsed from the command line.
#[derive(Debug, Clone, Default)]
pub struct RawConfig {
    /// --kernel
    pub kernel: PathBuf,
    /// --initrd
    pub initrd: Option<PathBuf>,
    /// --cmdline
    pub cmdline: Option<String>,
    /// --mem-mib
    pub mem_mib: u32,
    /// --vcpus
    pub vcpus: u32,
    /// --vsock-cid
    pub vsock_cid: Option<u64>,
    /// --vsock-uds
    pub vsock_uds: Option<PathBuf>,
    /// --serial-out (`-` or `stdout`, `none`, or a path)
    pub serial_out: Option<String>,
    /// --serial-in (`stdin` or `unix:PATH`)
    pub serial_in: Option<String>,
    /// --metrics
    pub metrics: Option<PathBuf>,
    /// --allow-pvm
    pub allow_pvm: bool,
    /// --quiet
    pub quiet: bool,
    /// --sync-teardown
    pub sync_teardown: bool,
    /// --control-sock
    pub control: Option<PathBuf>,
}

impl VmConfig {
    /// Validates raw input.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.mem_mib < MIN_MEM_MIB || raw.mem_mib > 262_144 {
            return Err(ConfigError::MemSize(raw.mem_mib));
        }
        if raw.vcpus == 0 || raw.vcpus > u32::from(crate::mptable::MAX_VCPUS) {
            return Err(ConfigError::Vcpus(raw.vcpus));
        }
        let vsock = match (raw.vsock_cid, raw.vsock_uds) {
            (None, None) => None,
            (Some(cid), Some(uds)) => {
                if !(3..u64::from(u32::MAX)).contains(&cid) {
                    return Err(ConfigError::Cid(cid));
                }
                if uds.as_os_str().len() > 96 {
                    return Err(ConfigError::UdsTooLong(uds.display().to_string()));
                }
                Some(VsockConfig { cid, uds })
            }
            _ => return Err(ConfigError::VsockHalf),
        };
        let serial_out = match raw.serial_out.as_deref() {
            None | Some("-") | Some("stdout") => SerialOutput::Stdout,
            Some("none") => SerialOutput::Null,
            Some(p) => SerialOutput::Path(PathBuf::from(p)),
        };
        let serial_in = match raw.serial_in.as_deref() {
            None | Some("none") => SerialInput::None,
            Some("stdin") | Some("-") => SerialInput::Stdin,
            Some(p) => SerialInput::Unix(PathBuf::from(p.strip_prefix("unix:").unwrap_or(p))),
        };
        Ok(VmConfig {
            kernel: raw.kernel,
            initrd: raw.initrd,
            cmdline: raw.cmdline,
            mem_mib: raw.mem_mib,
            vcpus: raw.vcpus as u8,
            vsock,
            serial_out,
            serial_in,
            metrics: raw.metrics,
            allow_pvm: raw.allow_pvm,
            quiet: raw.quiet,
            sync_teardown: raw.sync_teardown,
            control: raw.control,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawConfig {
        RawConfig {
            kernel: "k".into(),
            mem_mib: 128,
            vcpus: 1,
            ..Default::default()
        }
    }

    #[test]
    fn validates_ranges() {
        assert!(VmConfig::from_raw(raw()).is_ok());
        let r = RawConfig {
            mem_mib: 1,
            ..raw()
        };
        assert_eq!(VmConfig::from_raw(r).unwrap_err(), ConfigError::MemSize(1));
        let r = RawConfig { vcpus: 0, ..raw() };
        assert_eq!(VmConfig::from_raw(r).unwrap_err(), ConfigError::Vcpus(0));
        let r = RawConfig {
            vsock_cid: Some(2),
            vsock_uds: Some("/tmp/v".into()),
            ..raw()
        };
        assert_eq!(VmConfig::from_raw(r).unwrap_err(), ConfigError::Cid(2));
        let r = RawConfig {
            vsock_cid: Some(3),
            ..raw()
        };
        assert_eq!(VmConfig::from_raw(r).unwrap_err(), ConfigError::VsockHalf);
    }

    #[test]
    fn parses_serial_options() {
        let r = RawConfig {
            serial_out: Some("none".into()),
            serial_in: Some("unix:/tmp/s".into()),
            ..raw()
        };
        let c = VmConfig::from_raw(r).unwrap();
        assert_eq!(c.serial_out, SerialOutput::Null);
        assert_eq!(c.serial_in, SerialInput::Unix("/tmp/s".into()));
    }
}
