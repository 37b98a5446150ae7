//! Host probing: is KVM there, may we use it, and is it hardware or PVM.

use std::path::Path;

use thiserror::Error;

/// What kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization (VT-x / AMD-V).
    Hardware,
    /// `kvm_pvm`: guest code is emulated; only PVM-aware or tiny guests run.
    Pvm,
    /// KVM present but neither signal was conclusive.
    Unknown,
}

impl KvmKind {
    /// Short name used in messages and metrics.
    pub fn name(self) -> &'static str {
        match self {
            KvmKind::Hardware => "hardware",
            KvmKind::Pvm => "kvm_pvm",
            KvmKind::Unknown => "unknown",
        }
    }
}

/// Errors from probing the host.
#[derive(Debug, Error)]
pub enum HostError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: KVM is not available on this host (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm,
    /// /dev/kvm exists but cannot be opened.
    #[error("/dev/kvm: permission denied (run as root or add the user to the kvm group)")]
    KvmPermission,
    /// Other open failure.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] std::io::Error),
}

/// Classifies the host's KVM from sysfs and /proc/cpuinfo.
pub fn kvm_kind() -> KvmKind {
    kvm_kind_from(
        Path::new("/sys/module/kvm_pvm").exists(),
        Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists(),
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
    )
}

/// Pure classification helper (testable).
pub fn kvm_kind_from(pvm_module: bool, hw_module: bool, cpuinfo: &str) -> KvmKind {
    let hw_flags = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if pvm_module && !hw_flags {
        KvmKind::Pvm
    } else if hw_flags || hw_module {
        KvmKind::Hardware
    } else {
        KvmKind::Unknown
    }
}

/// Opens /dev/kvm, mapping failures to clear errors.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, HostError> {
    match kvm_ioctls::Kvm::new() {
        Ok(k) => Ok(k),
        Err(e) => match e.errno() {
            libc::ENOENT => Err(HostError::NoKvm),
            libc::EACCES | libc::EPERM => Err(HostError::KvmPermission),
            _ => Err(HostError::KvmOpen(std::io::Error::from_raw_os_error(
                e.errno(),
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_needs_module_and_no_hw_flags() {
        let pvm = "flags\t: fpu vme sse2 hypervisor\n";
        let vmx = "flags\t: fpu vmx sse2\n";
        assert_eq!(kvm_kind_from(true, false, pvm), KvmKind::Pvm);
        assert_eq!(kvm_kind_from(true, false, vmx), KvmKind::Hardware);
        assert_eq!(kvm_kind_from(false, true, pvm), KvmKind::Hardware);
        assert_eq!(kvm_kind_from(false, false, pvm), KvmKind::Unknown);
    }
}
