//! VM and vCPU state: creating the KVM VM, configuring vCPUs, and the vCPU run loop.

use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{BootEntry, EntryKind, GuestMem, BOOT_STACK, GDT, GDT_ADDR, PML4_ADDR};
use crate::cpuid::{self, CpuidParams};
use crate::devices::ExitHandle;
use crate::metrics::Metrics;
use crate::signals;

/// Errors while creating or configuring the VM and vCPUs.
#[derive(Debug, Error)]
pub enum VstateError {
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("registering guest memory with KVM failed")]
    SetMemory(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("KVM_SET_TSS_ADDR failed")]
    SetTss(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("creating the in-kernel irqchip failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("creating the in-kernel PIT failed")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    GetCpuid(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VCPU failed.
    #[error("creating vCPU {0} failed")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    /// A vCPU register/state ioctl failed.
    #[error("configuring vCPU {id}: {what} failed")]
    ConfigureVcpu {
        /// vCPU index.
        id: u8,
        /// Which step.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The built CPUID does not fit in KVM_SET_CPUID2.
    #[error("configuring vCPU {0}: its CPUID has {1} entries, more than KVM accepts")]
    CpuidTooLarge(u8, usize),
    /// Not every MSR was accepted.
    #[error("configuring vCPU {0}: KVM accepted only {1} of {2} MSRs")]
    PartialMsrs(u8, usize, usize),
    /// Registering an irqfd or ioeventfd failed.
    #[error("registering an {0} with KVM failed")]
    RegisterEventFd(&'static str, #[source] kvm_ioctls::Error),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, VstateError>;

/// Device access from vCPU exits.
pub trait ExitHandler: Send + Sync {
    /// Port read.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// Port write.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// MMIO read.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// MMIO write.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Creates the VM: memory first (much cheaper under PVM), then TSS, irqchip and PIT.
pub fn create_vm(kvm: &Kvm, mem: &GuestMem) -> Result<VmFd> {
    let vm = kvm.create_vm().map_err(VstateError::CreateVm)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| VstateError::SetMemory(kvm_ioctls::Error::new(libc::EFAULT)))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points to a mapping of `region.len()` bytes owned by `mem`, which the
        // caller keeps alive (it is moved into the VMM) for as long as the VM fd exists; slots
        // do not overlap because vm-memory regions do not overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(VstateError::SetMemory)?;
    }
    vm.set_tss_address(0xfffb_d000)
        .map_err(VstateError::SetTss)?;
    vm.create_irq_chip().map_err(VstateError::CreateIrqchip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(VstateError::CreatePit)?;
    Ok(vm)
}

/// The host's supported CPUID, fetched once.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VstateError::GetCpuid)
}

/// What KVM emulates for every vCPU beyond its supported-CPUID list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmCpuFeatures {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the LAPIC timer's TSC-deadline mode is emulated.
    pub tsc_deadline: bool,
}

impl KvmCpuFeatures {
    /// Asks KVM.
    pub fn query(kvm: &Kvm) -> Self {
        KvmCpuFeatures {
            tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        }
    }
}

fn cfg_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VstateError {
    move |source| VstateError::ConfigureVcpu { id, what, source }
}

fn seg(selector: u16, type_: u8, l: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back (else Linux maps RAM uncached).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Creates and configures vCPU `id` of `count`; its CPUID is built by [`cpuid::build`]
/// from `supported`. Only vCPU 0 gets boot registers; the others wait for INIT/SIPI from the
/// guest (in-kernel LAPIC).
pub fn create_vcpu(
    vm: &VmFd,
    supported: &CpuId,
    features: KvmCpuFeatures,
    id: u8,
    count: u8,
    entry: &BootEntry,
) -> Result<VcpuFd> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(|e| VstateError::CreateVcpu(id, e))?;
    let entries = cpuid::build(
        supported.as_slice(),
        &CpuidParams {
            vcpu_id: id,
            vcpu_count: count,
            tsc_deadline: features.tsc_deadline,
        },
    );
    let guest_cpuid =
        CpuId::from_entries(&entries).map_err(|_| VstateError::CpuidTooLarge(id, entries.len()))?;
    vcpu.set_cpuid2(&guest_cpuid)
        .map_err(cfg_err(id, "KVM_SET_CPUID2"))?;

    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let list: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&list).map_err(|_| VstateError::PartialMsrs(id, 0, list.len()))?;
    let n = vcpu.set_msrs(&msrs).map_err(cfg_err(id, "KVM_SET_MSRS"))?;
    if n != list.len() {
        return Err(VstateError::PartialMsrs(id, n, list.len()));
    }

    // LAPIC: LINT0 = ExtINT, LINT1 = NMI, as a PC would wire them.
    let mut lapic = vcpu.get_lapic().map_err(cfg_err(id, "KVM_GET_LAPIC"))?;
    for (off, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(cfg_err(id, "KVM_SET_LAPIC"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(cfg_err(id, "KVM_SET_FPU"))?;

    if id == 0 {
        set_boot_regs(&vcpu, id, entry)?;
    }
    Ok(vcpu)
}

fn set_boot_regs(vcpu: &VcpuFd, id: u8, entry: &BootEntry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(cfg_err(id, "KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        ..Default::default()
    };
    let data = seg(0x18, 3, 0, 1, 1);
    let mut tr = seg(0x20, 0xb, 0, 0, 0);
    tr.limit = 0xfffff;
    tr.g = 0;
    match entry.kind {
        EntryKind::Linux64 => {
            sregs.cs = seg(0x10, 0xb, 1, 0, 1);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= 0x20; // PAE
            sregs.cr0 |= 0x8000_0011; // PG | ET | PE
            sregs.efer |= 0x500; // LME | LMA
            regs.rsi = entry.boot_info;
        }
        EntryKind::Pvh => {
            sregs.cs = seg(0x08, 0xb, 0, 1, 1);
            sregs.cr0 = 0x11; // ET | PE
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = entry.boot_info;
        }
    }
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tr;
    vcpu.set_sregs(&sregs)
        .map_err(cfg_err(id, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(cfg_err(id, "KVM_SET_REGS"))?;
    Ok(())
}

/// Runs a vCPU until the VM stops. Returns when a stop was requested or the vCPU failed.
///
/// The stop latch is checked before every KVM_RUN; a vCPU inside KVM_RUN is brought out by
/// the kick signal ([`crate::signals::kick`]), whose handler also sets `immediate_exit`, so
/// a kick that lands just before KVM_RUN makes it return at once. The resulting EINTR is
/// counted in `vcpu_exits.intr`, never as an error.
pub fn run_vcpu(
    mut vcpu: VcpuFd,
    id: u8,
    bus: Arc<dyn ExitHandler>,
    metrics: Arc<Metrics>,
    exit: Arc<ExitHandle>,
) {
    if let Err(err) = signals::unblock_kick_signal() {
        eprintln!("vmm-lite: vCPU {id}: cannot unblock the kick signal: {err}");
    }
    // Declared after `vcpu`, so it is dropped (and the handler disarmed) before `vcpu`.
    let _kick = signals::ImmediateExitOnKick::register(&mut vcpu);
    let e = &metrics.exits;
    while !exit.is_stopping() {
        if id == 0 {
            metrics.first_kvm_run.mark(metrics.start);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                e.io_out.inc();
                bus.pio_write(port, data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                e.io_in.inc();
                bus.pio_read(port, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                e.mmio_read.inc();
                bus.mmio_read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                e.mmio_write.inc();
                bus.mmio_write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                e.hlt.inc();
                metrics.guest_stop.mark(metrics.start);
                exit.request("hlt", 0);
            }
            Ok(VcpuExit::Shutdown) => {
                e.shutdown.inc();
                metrics.guest_stop.mark(metrics.start);
                exit.request("shutdown", 0);
            }
            Ok(VcpuExit::InternalError) => {
                e.error.inc();
                let regs = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                eprintln!(
                    "vmm-lite: vCPU {id}: KVM internal error (emulation failure) at rip {regs:#x}"
                );
                exit.request("vcpu-error", 2);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                e.error.inc();
                eprintln!("vmm-lite: vCPU {id}: KVM entry failure {reason:#x} on cpu {cpu}");
                exit.request("vcpu-error", 2);
            }
            Ok(VcpuExit::Intr) => e.intr.inc(),
            Ok(other) => {
                e.other.inc();
                crate::guest_warn!("vCPU {id}: unhandled exit {other:?}");
            }
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                e.intr.inc();
            }
            Err(err) => {
                e.error.inc();
                eprintln!("vmm-lite: vCPU {id}: KVM_RUN failed: {err}");
                exit.request("vcpu-error", 2);
            }
        }
    }
}
