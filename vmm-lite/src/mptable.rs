//! Intel MultiProcessor Specification 1.4 tables, so a guest without ACPI finds its vCPUs,
//! the I/O APIC and the legacy interrupt routing.
//!
//! Layout, at [`MPTABLE_START`] (the last KiB of conventional memory, which Linux scans and
//! our e820 map reserves): the 16-byte floating pointer, then the configuration table with
//! one processor entry per vCPU, an ISA bus, the I/O APIC, an I/O interrupt entry per IRQ
//! 0-23 and the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::GuestMem;

/// Where the tables go.
pub const MPTABLE_START: u64 = 0x9fc00;
/// Space available (up to 640 KiB).
pub const MPTABLE_MAX: usize = 0x400;
/// Most vCPUs the table (and the VMM) supports.
pub const MAX_VCPUS: u8 = 32;
/// I/O APIC address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Highest legacy IRQ routed.
pub const IRQ_MAX: u8 = 23;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

/// MP table errors.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// Too many vCPUs for the space.
    #[error("the MP table supports at most {MAX_VCPUS} vCPUs, got {0}")]
    TooManyCpus(u8),
    /// Writing guest memory failed.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// Builds the floating pointer and configuration table as bytes, for `ncpus` vCPUs whose
/// local APIC ids are 0..ncpus.
pub fn build(ncpus: u8) -> Result<Vec<u8>, MpTableError> {
    if ncpus == 0 || ncpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(ncpus));
    }
    let cfg_addr = MPTABLE_START as u32 + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for id in 0..ncpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // I/O APIC, id after the CPUs.
    let ioapic_id = ncpus;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // I/O interrupts: ISA IRQ n -> I/O APIC pin n, conforming polarity/trigger.
    for irq in 0..=IRQ_MAX {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT -> LINT0, NMI -> LINT1, on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut cfg = Vec::with_capacity(44 + entries.len());
    cfg.extend_from_slice(b"PCMP");
    cfg.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    cfg.push(4); // spec revision 1.4
    cfg.push(0); // checksum, below
    cfg.extend_from_slice(b"VMM-LITE");
    cfg.extend_from_slice(b"000000000000");
    cfg.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    cfg.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    cfg.extend_from_slice(&count.to_le_bytes());
    cfg.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    cfg.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    cfg.push(0); // extended table checksum
    cfg.push(0); // reserved
    cfg.extend_from_slice(&entries);
    cfg[7] = checksum(&cfg);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&cfg_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: config table present
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&cfg);
    if out.len() > MPTABLE_MAX {
        return Err(MpTableError::TooManyCpus(ncpus));
    }
    Ok(out)
}

/// Writes the MP tables for `ncpus` vCPUs into guest memory.
pub fn setup(mem: &GuestMem, ncpus: u8) -> Result<(), MpTableError> {
    let bytes = build(ncpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 8, MAX_VCPUS] {
            let t = build(n).unwrap();
            assert!(t.len() <= MPTABLE_MAX, "{n} cpus: {} bytes", t.len());
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
            // Walk the entries: processors are 20 bytes, the rest 8.
            let (mut off, mut cpus, mut seen) = (44, 0, 0);
            while off < len {
                let size = if cfg[off] == 0 { 20 } else { 8 };
                if cfg[off] == 0 && cfg[off + 3] & CPU_ENABLED != 0 {
                    cpus += 1;
                }
                off += size;
                seen += 1;
            }
            assert_eq!(off, len);
            assert_eq!(seen, count);
            assert_eq!(cpus, n as usize);
        }
        assert!(build(0).is_err());
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
