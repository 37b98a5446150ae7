//! The guest's CPUID, built from what KVM supports.
//!
//! [`build`] is a pure function from the entries of KVM_GET_SUPPORTED_CPUID (plus the
//! vCPU's place in the topology and what KVM can emulate beyond that list) to the entries
//! given to KVM_SET_CPUID2, so it is unit-tested with synthetic Intel and AMD lists.
//!
//! What it changes, and why:
//!
//! | leaf | change |
//! |---|---|
//! | 0x1 | EBX: CLFLUSH line size 64 bytes, logical processor count N, initial APIC id; ECX: hypervisor bit set, TSC-deadline timer set when KVM emulates it (`KVM_CAP_TSC_DEADLINE_TIMER`; KVM does not list it in the supported CPUID), MONITOR/MWAIT cleared; EDX: HTT set iff N > 1 |
//! | 0x4 | per cache: cores per package - 1 = N - 1; threads sharing - 1 = N - 1 for L3, 0 for L1/L2 |
//! | 0x6 | ECX bit 3 (energy/performance bias) cleared |
//! | 0xB, 0x1F | replaced: level 0 SMT (1 thread per core), level 1 core (N cores, shift = bits for N), then an invalid level; EDX = x2APIC id (0x1F only when KVM lists it) |
//! | 0x4000_0000 | added when missing: "KVMKVMKVM\0\0\0", EAX = highest hypervisor leaf |
//! | 0x4000_0001 | KVM's paravirtual features as KVM reports them (added, empty, when missing) |
//! | AMD 0x8000_0001 | ECX CmpLegacy set iff N > 1 |
//! | AMD 0x8000_0008 | ECX: NC = N - 1, APIC id size = bits for N |
//! | AMD 0x8000_001D | per cache: threads sharing - 1 = N - 1 for L3, 0 for L1/L2 |
//! | AMD 0x8000_001E | extended APIC id, core id = vCPU index, 1 thread per core, node 0 of 1 |
//!
//! Topology: N vCPUs are N cores of one package, one thread each; vCPU i has APIC id i (the
//! MP table says the same). MONITOR/MWAIT is not offered: KVM intercepts MWAIT and runs it
//! as a NOP unless MWAIT exits are disabled, which this VMM does not do, so a guest would
//! spin in its idle loop instead of halting. Everything else is passed through as KVM
//! reports it.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Where a vCPU sits and what KVM emulates beyond its supported-CPUID list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidParams {
    /// vCPU index, also its (x2)APIC id.
    pub vcpu_id: u8,
    /// vCPUs in the VM (cores of the one package).
    pub vcpu_count: u8,
    /// KVM emulates the TSC-deadline timer mode of the LAPIC timer.
    pub tsc_deadline: bool,
}

/// CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD, or Hygon (same topology leaves).
    Amd,
    /// Anything else: only vendor-neutral leaves are changed.
    Other,
}

/// The 12-byte vendor string of leaf 0 in EBX, EDX, ECX order.
fn vendor_bytes(e: &kvm_cpuid_entry2) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&e.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&e.edx.to_le_bytes());
    v[8..].copy_from_slice(&e.ecx.to_le_bytes());
    v
}

/// The vendor named by leaf 0 of `entries`.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match entries.iter().find(|e| e.function == 0).map(vendor_bytes) {
        Some(v) if &v == b"GenuineIntel" => Vendor::Intel,
        Some(v) if &v == b"AuthenticAMD" || &v == b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Leaf 1 ECX: MONITOR/MWAIT.
pub const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// Leaf 1 ECX: TSC-deadline timer.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: HTT (`EBX[23:16]` holds the logical processor count).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX (AMD): CmpLegacy.
pub const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
/// CLFLUSH line size, in 8-byte units (64 bytes).
const CLFLUSH_QWORDS: u32 = 8;
/// First hypervisor leaf: signature and highest hypervisor leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM paravirtual features.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// Topology level types in leaves 0xB/0x1F `ECX[15:8]`.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (0 for 1).
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: 0,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Leaves 0xB/0x1F for `p`: SMT level, core level, then the terminating invalid level.
fn topology_leaf(function: u32, p: &CpuidParams) -> [kvm_cpuid_entry2; 3] {
    let n = u32::from(p.vcpu_count.max(1));
    let id = u32::from(p.vcpu_id);
    let mut out = [
        entry(function, 0, [0, 1, LEVEL_SMT << 8, id]),
        entry(function, 1, [id_bits(n), n, (LEVEL_CORE << 8) | 1, id]),
        entry(function, 2, [0, 0, 2, id]),
    ];
    for e in &mut out {
        e.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    }
    out
}

/// Cache-sharing field `EAX[25:14]` (leaves 4 and 0x8000_001D): threads sharing this cache
/// minus one. L1/L2 belong to a core (one thread), L3 to the package (every vCPU).
fn cache_sharing(eax: u32, n: u32) -> u32 {
    let level = (eax >> 5) & 7;
    let sharing = if level >= 3 { n } else { 1 };
    (eax & !(0xfff << 14)) | ((sharing - 1) << 14)
}

/// Builds vCPU `p.vcpu_id`'s CPUID from KVM's supported list (see the module docs).
pub fn build(supported: &[kvm_cpuid_entry2], p: &CpuidParams) -> Vec<kvm_cpuid_entry2> {
    let vendor = vendor(supported);
    let n = u32::from(p.vcpu_count.max(1));
    let id = u32::from(p.vcpu_id);
    let max_basic = supported
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let has = |f: u32| supported.iter().any(|e| e.function == f);

    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.len() + 4);
    for e in supported {
        let mut e = *e;
        match e.function {
            0xb | 0x1f => continue, // rebuilt below
            1 => {
                e.ebx = (e.ebx & 0xff) | (CLFLUSH_QWORDS << 8) | (n.min(255) << 16) | (id << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.ecx &= !LEAF1_ECX_MONITOR;
                if p.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 if e.eax & 0x1f != 0 => {
                e.eax = (cache_sharing(e.eax, n) & 0x03ff_ffff) | ((n - 1) << 26);
            }
            6 => e.ecx &= !(1 << 3),
            KVM_CPUID_SIGNATURE => {
                let max_hv = supported
                    .iter()
                    .map(|e| e.function)
                    .filter(|f| (KVM_CPUID_SIGNATURE..=0x4000_00ff).contains(f))
                    .max()
                    .unwrap_or(KVM_CPUID_FEATURES)
                    .max(KVM_CPUID_FEATURES);
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
                e.eax = max_hv;
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if n > 1 {
                    e.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(n) << 12) | (n - 1);
            }
            0x8000_001d if vendor == Vendor::Amd && e.eax & 0x1f != 0 => {
                e.eax = cache_sharing(e.eax, n);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = id;
                e.ebx = id & 0xff; // core id; threads per core - 1 = 0
                e.ecx = 0; // node 0; nodes per processor - 1 = 0
                e.edx = 0;
            }
            _ => {}
        }
        out.push(e);
    }

    if max_basic >= 0xb {
        out.extend(topology_leaf(0xb, p));
    }
    if max_basic >= 0x1f && has(0x1f) {
        out.extend(topology_leaf(0x1f, p));
    }
    if !has(KVM_CPUID_SIGNATURE) {
        let [ebx, ecx, edx] = KVM_SIGNATURE;
        out.push(entry(
            KVM_CPUID_SIGNATURE,
            0,
            [KVM_CPUID_FEATURES, ebx, ecx, edx],
        ));
    }
    if !has(KVM_CPUID_FEATURES) {
        out.push(entry(KVM_CPUID_FEATURES, 0, [0; 4]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let mut x = entry(function, index, regs);
        if matches!(function, 4 | 7 | 0xb | 0xd | 0x1f | 0x8000_001d) {
            x.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        }
        x
    }

    fn vendor_regs(v: &[u8; 12], max: u32) -> [u32; 4] {
        let w = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().unwrap());
        [max, w(0), w(8), w(4)]
    }

    /// Shaped after KVM_GET_SUPPORTED_CPUID on an Intel Xeon host: host topology (2 threads
    /// per core, 8 cores) in leaves 4, 0xB and 0x1F, no TSC-deadline bit, MONITOR set.
    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            e(0, 0, vendor_regs(b"GenuineIntel", 0x1f)),
            e(
                1,
                0,
                [
                    0x000806f8,
                    0x0010_0800 | 0x3f00_0000,
                    0x7ffa_fa0b,
                    0x1f8b_fbff,
                ],
            ),
            e(4, 0, [0x1c00_4121, 0x02c0_003f, 0x3f, 0]),
            e(4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
            e(4, 2, [0x1c00_4143, 0x03c0_003f, 0x7ff, 0]),
            e(4, 3, [0x1c03_c163, 0x03c0_003f, 0xdfff, 4]),
            e(4, 4, [0, 0, 0, 0]),
            e(6, 0, [4, 0, 0x8, 0]),
            e(0xb, 0, [1, 2, 0x100, 0x27]),
            e(0xb, 1, [4, 16, 0x201, 0x27]),
            e(0xb, 2, [0, 0, 2, 0x27]),
            e(0x1f, 0, [1, 2, 0x100, 0x27]),
            e(0x1f, 1, [4, 16, 0x201, 0x27]),
            e(0x1f, 2, [0, 0, 2, 0x27]),
            e(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            e(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            e(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            e(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ]
    }

    /// Shaped after this project's AMD EPYC host: leaf 0xB present but empty, TOPOEXT
    /// leaves 0x8000_001D/1E, no 0x1F, and no hypervisor signature leaf at all.
    fn amd() -> Vec<kvm_cpuid_entry2> {
        vec![
            e(0, 0, vendor_regs(b"AuthenticAMD", 0xd)),
            e(1, 0, [0x00800f12, 0x0102_0800, 0x8020_2008, 0x178b_fbff]),
            e(4, 0, [0, 0, 0, 0]),
            e(0xb, 0, [0, 0, 0, 1]),
            e(0xd, 0, [7, 0x340, 0x340, 0]),
            e(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            e(
                0x8000_0001,
                0,
                [0x00800f12, 0x4000_0000, 0x0040_0393, 0x23d3_fbff],
            ),
            e(0x8000_0008, 0, [0x3030, 0x0200_1005, 0x0000_7001, 0]),
            e(0x8000_001d, 0, [0x0000_0121, 0x01c0_003f, 0x3f, 0]),
            e(0x8000_001d, 1, [0x0000_0122, 0x00c0_003f, 0xff, 0]),
            e(0x8000_001d, 2, [0x0000_0143, 0x01c0_003f, 0x3ff, 2]),
            e(0x8000_001d, 3, [0x0000_4163, 0x03c0_003f, 0x1fff, 1]),
            e(0x8000_001d, 4, [0, 0, 0, 0]),
            e(0x8000_001e, 0, [5, 0x0103, 0x0300, 0]),
            e(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
        ]
    }

    fn get(c: &[kvm_cpuid_entry2], f: u32, i: u32) -> [u32; 4] {
        let v: Vec<_> = c
            .iter()
            .filter(|e| e.function == f && e.index == i)
            .collect();
        assert_eq!(v.len(), 1, "exactly one entry {f:#x}.{i}");
        [v[0].eax, v[0].ebx, v[0].ecx, v[0].edx]
    }

    fn params(id: u8, count: u8, tsc_deadline: bool) -> CpuidParams {
        CpuidParams {
            vcpu_id: id,
            vcpu_count: count,
            tsc_deadline,
        }
    }

    #[test]
    fn vendors_are_recognised() {
        assert_eq!(vendor(&intel()), Vendor::Intel);
        assert_eq!(vendor(&amd()), Vendor::Amd);
        assert_eq!(
            vendor(&[e(0, 0, vendor_regs(b"HygonGenuine", 0xd))]),
            Vendor::Amd
        );
        assert_eq!(
            vendor(&[e(0, 0, vendor_regs(b"CentaurHauls", 1))]),
            Vendor::Other
        );
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_ids_counts_and_feature_bits() {
        for list in [intel(), amd()] {
            let c = build(&list, &params(3, 4, true));
            let [eax, ebx, ecx, edx] = get(&c, 1, 0);
            assert_eq!(eax, get(&list, 1, 0)[0], "signature passed through");
            assert_eq!(ebx >> 24, 3, "initial APIC id");
            assert_eq!((ebx >> 16) & 0xff, 4, "logical processors");
            assert_eq!((ebx >> 8) & 0xff, 8, "CLFLUSH 64 bytes");
            assert_eq!(ebx & 0xff, get(&list, 1, 0)[1] & 0xff, "brand index kept");
            assert_ne!(ecx & LEAF1_ECX_HYPERVISOR, 0);
            assert_ne!(ecx & LEAF1_ECX_TSC_DEADLINE, 0, "KVM emulates it");
            assert_eq!(ecx & LEAF1_ECX_MONITOR, 0);
            assert_ne!(edx & LEAF1_EDX_HTT, 0);
            let other = !(LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_MONITOR);
            assert_eq!(
                ecx & other,
                get(&list, 1, 0)[2] & other,
                "rest as KVM reports"
            );

            let c = build(&list, &params(0, 1, false));
            let [_, ebx, ecx, edx] = get(&c, 1, 0);
            assert_eq!((ebx >> 16) & 0xff, 1);
            assert_eq!(
                ecx & LEAF1_ECX_TSC_DEADLINE,
                0,
                "not offered without the cap"
            );
            assert_eq!(edx & LEAF1_EDX_HTT, 0, "one logical processor");
        }
    }

    #[test]
    fn extended_topology_is_one_thread_per_core_n_cores() {
        for (n, shift) in [(1u8, 0u32), (2, 1), (3, 2), (4, 2), (5, 3), (32, 5)] {
            for list in [intel(), amd()] {
                let id = n - 1;
                let c = build(&list, &params(id, n, true));
                let id = u32::from(id);
                let n = u32::from(n);
                assert_eq!(get(&c, 0xb, 0), [0, 1, 0x100, id], "SMT level, n={n}");
                assert_eq!(get(&c, 0xb, 1), [shift, n, 0x201, id], "core level, n={n}");
                assert_eq!(get(&c, 0xb, 2), [0, 0, 2, id], "end of levels");
                assert!(c
                    .iter()
                    .filter(|e| e.function == 0xb)
                    .all(|e| e.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX));
            }
        }
        // 0x1F mirrors 0xB where KVM lists it (Intel here), and is not invented (AMD).
        let c = build(&intel(), &params(1, 2, true));
        for i in 0..3 {
            assert_eq!(get(&c, 0x1f, i), get(&c, 0xb, i));
        }
        assert!(!build(&amd(), &params(1, 2, true))
            .iter()
            .any(|e| e.function == 0x1f));
        // No 0xB where the basic range ends below it.
        let mut old = amd();
        old[0].eax = 0xa;
        old.retain(|e| e.function != 0xb);
        assert!(!build(&old, &params(0, 2, true))
            .iter()
            .any(|e| e.function == 0xb));
    }

    #[test]
    fn intel_leaf4_cache_topology() {
        let c = build(&intel(), &params(0, 6, true));
        for (i, shared) in [(0, 0), (1, 0), (2, 0), (3, 5)] {
            let [eax, ebx, ecx, edx] = get(&c, 4, i);
            let host = get(&intel(), 4, i);
            assert_eq!(eax >> 26, 5, "cores per package - 1, subleaf {i}");
            assert_eq!(
                (eax >> 14) & 0xfff,
                shared,
                "threads sharing - 1, subleaf {i}"
            );
            assert_eq!(
                eax & 0x3fff,
                host[0] & 0x3fff,
                "type/level kept, subleaf {i}"
            );
            assert_eq!([ebx, ecx, edx], host[1..], "geometry kept, subleaf {i}");
        }
        assert_eq!(get(&c, 4, 4), [0; 4], "no cache invented");
        // Intel's extended leaves are left alone (CmpLegacy / NC are AMD-only fields).
        assert_eq!(get(&c, 0x8000_0001, 0), get(&intel(), 0x8000_0001, 0));
        assert_eq!(get(&c, 0x8000_0008, 0), get(&intel(), 0x8000_0008, 0));
    }

    #[test]
    fn amd_core_count_leaves() {
        let c = build(&amd(), &params(2, 4, true));
        assert_ne!(get(&c, 0x8000_0001, 0)[2] & AMD_ECX_CMP_LEGACY, 0);
        let others = get(&amd(), 0x8000_0001, 0)[2] & !AMD_ECX_CMP_LEGACY;
        assert_eq!(get(&c, 0x8000_0001, 0)[2] & !AMD_ECX_CMP_LEGACY, others);
        let [eax, ebx, ecx, edx] = get(&c, 0x8000_0008, 0);
        assert_eq!(
            [eax, ebx, edx],
            [0x3030, 0x0200_1005, 0],
            "sizes and features kept"
        );
        assert_eq!(ecx & 0xff, 3, "NC = cores - 1");
        assert_eq!((ecx >> 12) & 0xf, 2, "APIC id size");
        assert_eq!(ecx >> 16, 0, "PerfTscSize kept");
        assert_eq!(
            get(&c, 0x8000_001e, 0),
            [2, 2, 0, 0],
            "APIC id, core id, node"
        );
        for (i, shared) in [(0, 0), (1, 0), (2, 0), (3, 3)] {
            let [eax, ..] = get(&c, 0x8000_001d, i);
            assert_eq!((eax >> 14) & 0xfff, shared, "0x8000001d.{i} sharing");
            assert_eq!(eax & 0x3fff, get(&amd(), 0x8000_001d, i)[0] & 0x3fff);
        }
        assert_eq!(get(&c, 0x8000_001d, 4), [0; 4]);
        assert_eq!(get(&c, 4, 0), [0; 4], "AMD has no leaf 4 caches");

        let c = build(&amd(), &params(0, 1, true));
        assert_eq!(get(&c, 0x8000_0001, 0)[2] & AMD_ECX_CMP_LEGACY, 0);
        assert_eq!(get(&c, 0x8000_0008, 0)[2] & 0xf0ff, 0);
    }

    #[test]
    fn kvm_signature_and_features_are_always_present() {
        // AMD list: signature missing, features present.
        let c = build(&amd(), &params(0, 1, true));
        let [eax, ebx, ecx, edx] = get(&c, KVM_CPUID_SIGNATURE, 0);
        assert_eq!(eax, KVM_CPUID_FEATURES);
        assert_eq!([ebx, ecx, edx], KVM_SIGNATURE);
        let sig: Vec<u8> = [ebx, ecx, edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(get(&c, KVM_CPUID_FEATURES, 0), [0x0100_7efb, 0, 0, 0]);
        // Intel list: both present, kept.
        let c = build(&intel(), &params(0, 1, true));
        assert_eq!(
            get(&c, KVM_CPUID_SIGNATURE, 0),
            get(&intel(), KVM_CPUID_SIGNATURE, 0)
        );
        // Neither present: both added, features empty.
        let bare: Vec<_> = intel()
            .into_iter()
            .filter(|e| e.function >> 28 != 4)
            .collect();
        let c = build(&bare, &params(0, 1, true));
        assert_eq!(get(&c, KVM_CPUID_SIGNATURE, 0)[0], KVM_CPUID_FEATURES);
        assert_eq!(get(&c, KVM_CPUID_FEATURES, 0), [0; 4]);
        // A further hypervisor leaf raises the reported maximum.
        let mut more = intel();
        more.push(e(0x4000_0010, 0, [1, 2, 0, 0]));
        let c = build(&more, &params(0, 1, true));
        assert_eq!(get(&c, KVM_CPUID_SIGNATURE, 0)[0], 0x4000_0010);
        // A signature leaf from elsewhere is replaced by KVM's.
        let mut odd = intel();
        odd[14].ebx = 0x1234_5678;
        let c = build(&odd, &params(0, 1, true));
        assert_eq!(get(&c, KVM_CPUID_SIGNATURE, 0)[1..], KVM_SIGNATURE);
    }

    #[test]
    fn untouched_leaves_pass_through_and_nothing_is_lost() {
        for list in [intel(), amd()] {
            let c = build(&list, &params(1, 2, true));
            for x in &list {
                assert!(
                    c.iter()
                        .any(|y| y.function == x.function && y.index == x.index),
                    "{:#x}.{} kept",
                    x.function,
                    x.index
                );
            }
            for f in [0u32, 0xd, 0x8000_0000] {
                if let Some(x) = list.iter().find(|x| x.function == f) {
                    assert_eq!(get(&c, f, 0), [x.eax, x.ebx, x.ecx, x.edx]);
                }
            }
        }
        assert_eq!(get(&build(&intel(), &params(0, 1, true)), 6, 0)[2] & 8, 0);
    }
}
