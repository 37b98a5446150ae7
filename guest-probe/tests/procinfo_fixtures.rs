//! procinfo parsers on real and hand-made /proc files, including garbage.

use guest_probe::procinfo::{parse_cpuinfo, parse_meminfo};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()
}

#[test]
fn cpuinfo_of_this_host() {
    let c = parse_cpuinfo(&fixture("cpuinfo-this-host.txt"));
    assert_eq!(c.vendor, "AuthenticAMD");
    assert_eq!(c.model, "AMD EPYC");
    assert_eq!(c.cores, 2);
    assert!((c.mhz - 2596.122).abs() < 1e-9);
    assert!(c.flags_count > 100, "{}", c.flags_count);
    assert!(c.hypervisor_flag);
}

#[test]
fn cpuinfo_small_hand_made() {
    let c = parse_cpuinfo(&fixture("cpuinfo-small.txt"));
    assert_eq!(c.vendor, "GenuineIntel");
    assert_eq!(c.model, "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz");
    assert_eq!(c.cores, 4);
    assert_eq!(c.mhz, 2899.998, "MHz of the first processor");
    assert_eq!(c.flags_count, 6);
    assert!(c.hypervisor_flag);
}

#[test]
fn cpuinfo_missing_fields_are_zero() {
    let c = parse_cpuinfo(&fixture("cpuinfo-missing-fields.txt"));
    assert_eq!(c.model, "Some CPU without MHz or flags");
    assert_eq!(c.vendor, "");
    assert_eq!(c.mhz, 0.0);
    assert_eq!(c.flags_count, 0);
    assert_eq!(c.cores, 2);
    assert!(!c.hypervisor_flag);
}

#[test]
fn cpuinfo_garbage_does_not_panic() {
    let c = parse_cpuinfo(&fixture("cpuinfo-garbage.txt"));
    assert_eq!(c.cores, 1);
    assert_eq!(c.mhz, 0.0);
    assert_eq!(c.vendor, "X");
    assert_eq!(c.model, "");
    assert_eq!(
        parse_cpuinfo(&fixture("empty.txt")),
        wire::CpuInfo::default()
    );
    assert_eq!(parse_cpuinfo("cpu MHz : NaN\ncpu MHz : inf").mhz, 0.0);
}

#[test]
fn meminfo_of_this_host() {
    let m = parse_meminfo(&fixture("meminfo-this-host.txt"));
    assert!(m.total_kib > 0);
    assert!(m.free_kib > 0 && m.free_kib <= m.total_kib);
    assert!(m.available_kib > 0 && m.available_kib <= m.total_kib);
}

#[test]
fn meminfo_small_and_missing() {
    let m = parse_meminfo(&fixture("meminfo-small.txt"));
    assert_eq!(
        (m.total_kib, m.free_kib, m.available_kib),
        (131072, 100000, 120000)
    );
    let m = parse_meminfo(&fixture("meminfo-missing-available.txt"));
    assert_eq!(
        (m.total_kib, m.free_kib, m.available_kib),
        (262144, 200000, 0)
    );
}

#[test]
fn meminfo_garbage_does_not_panic() {
    let m = parse_meminfo(&fixture("meminfo-garbage.txt"));
    assert_eq!((m.total_kib, m.free_kib, m.available_kib), (0, 77, 0));
    assert_eq!(
        parse_meminfo(&fixture("empty.txt")),
        wire::MemInfo::default()
    );
}
