//! The sandbox's view of itself: pure parsers over /proc text (unit tested on fixtures)
//! and the small readers that feed them, plus CPUID's view of the host.

use std::collections::HashMap;

/// Summarise /proc/cpuinfo: the first processor's model, vendor, MHz and flags, the
/// number of `processor` entries, and whether the `hypervisor` flag is set.
/// Missing or unparsable fields give empty strings / zeros, never an error.
pub fn parse_cpuinfo(text: &str) -> wire::CpuInfo {
    let mut info = wire::CpuInfo::default();
    let mut seen_processor = false;
    let mut in_first = true;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        if key == "processor" {
            if seen_processor {
                in_first = false;
            }
            seen_processor = true;
            info.cores = info.cores.saturating_add(1);
            continue;
        }
        if !in_first {
            continue;
        }
        match key {
            "model name" if info.model.is_empty() => info.model = value.to_string(),
            "vendor_id" if info.vendor.is_empty() => info.vendor = value.to_string(),
            "cpu MHz" if info.mhz == 0.0 => {
                info.mhz = value
                    .parse::<f64>()
                    .ok()
                    .filter(|m| m.is_finite())
                    .unwrap_or(0.0)
            }
            "flags" if info.flags_count == 0 => {
                let flags = value.split_ascii_whitespace();
                let mut n = 0u32;
                for f in flags {
                    n = n.saturating_add(1);
                    if f == "hypervisor" {
                        info.hypervisor_flag = true;
                    }
                }
                info.flags_count = n;
            }
            _ => {}
        }
    }
    info
}

/// Summarise /proc/meminfo (`MemTotal`, `MemFree`, `MemAvailable`, in KiB). A missing or
/// unparsable field is 0.
pub fn parse_meminfo(text: &str) -> wire::MemInfo {
    let mut m = wire::MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(v) = rest
            .split_ascii_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        match key.trim() {
            "MemTotal" => m.total_kib = v,
            "MemFree" => m.free_kib = v,
            "MemAvailable" => m.available_kib = v,
            _ => {}
        }
    }
    m
}

/// CLOCK_BOOTTIME in µs: the same clock as /proc/uptime, without needing /proc and with
/// µs resolution. In a microVM's init this is how long the kernel took to reach init.
pub fn boot_time_us() -> Option<u64> {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000)
}

/// First field of /proc/uptime (seconds with a fraction) as microseconds.
pub fn parse_uptime_us(text: &str) -> Option<u64> {
    let first = text.split_ascii_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let secs: u64 = secs.parse().ok()?;
    let mut us = 0u64;
    let mut scale = 100_000u64;
    for c in frac.chars().take(6) {
        us += u64::from(c.to_digit(10)?) * scale;
        scale /= 10;
    }
    secs.checked_mul(1_000_000)?.checked_add(us)
}

/// The fields of /proc/PID/stat the probe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcStat {
    /// Parent pid.
    pub ppid: i32,
    /// User CPU, clock ticks.
    pub utime_ticks: u64,
    /// System CPU, clock ticks.
    pub stime_ticks: u64,
    /// Resident set, pages.
    pub rss_pages: u64,
}

/// Parse /proc/PID/stat. The command name may hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After ")": state(3) ppid(4) ... utime(14) stime(15) ... rss(24); index from field 3.
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let get = |n: usize| f.get(n - 3).copied();
    Some(ProcStat {
        ppid: get(4)?.parse().ok()?,
        utime_ticks: get(14)?.parse().ok()?,
        stime_ticks: get(15)?.parse().ok()?,
        rss_pages: get(24)?.parse().ok()?,
    })
}

/// A `Key:   N kB` field of /proc/PID/status (e.g. `VmHWM`), in KiB.
pub fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != field {
            return None;
        }
        v.split_ascii_whitespace().next()?.parse().ok()
    })
}

/// Kernel names from uname(2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uname {
    /// Node name (hostname).
    pub nodename: String,
    /// Kernel release.
    pub release: String,
}

/// uname(2); empty fields if it fails.
pub fn uname() -> Uname {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Uname::default();
    }
    fn field(f: &[libc::c_char]) -> String {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    Uname {
        nodename: field(&u.nodename),
        release: field(&u.release),
    }
}

/// CPUID's view of the host: (hypervisor signature, CPU brand string).
#[cfg(target_arch = "x86_64")]
pub fn cpuid_view() -> (String, String) {
    use std::arch::x86_64::{__cpuid, CpuidResult};
    fn cpuid(leaf: u32) -> CpuidResult {
        // SAFETY: CPUID exists on every x86_64 CPU and only reads processor information.
        #[allow(unused_unsafe)]
        unsafe {
            __cpuid(leaf)
        }
    }
    fn text(words: &[u32]) -> String {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string()
    }
    let max_basic = cpuid(0).eax;
    let hypervisor_bit = max_basic >= 1 && cpuid(1).ecx & (1 << 31) != 0;
    let hypervisor = if hypervisor_bit {
        let r = cpuid(0x4000_0000);
        text(&[r.ebx, r.ecx, r.edx])
    } else {
        String::new()
    };
    let brand = if cpuid(0x8000_0000).eax >= 0x8000_0004 {
        let words: Vec<u32> = (0x8000_0002u32..=0x8000_0004)
            .flat_map(|l| {
                let r = cpuid(l);
                [r.eax, r.ebx, r.ecx, r.edx]
            })
            .collect();
        text(&words)
    } else {
        String::new()
    };
    (hypervisor, brand)
}

/// CPUID's view of the host: not available off x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub fn cpuid_view() -> (String, String) {
    (String::new(), String::new())
}

/// Everything Hello carries about the sandbox, read once at init.
#[derive(Debug, Clone, Default)]
pub struct SandboxView {
    /// /proc/sys/kernel/random/boot_id, trimmed.
    pub boot_id: String,
    /// uname nodename.
    pub hostname: String,
    /// /etc/machine-id, trimmed, empty when absent.
    pub machine_id: String,
    /// uname release.
    pub kernel_release: String,
    /// /proc/cpuinfo summary.
    pub cpu: wire::CpuInfo,
    /// /proc/meminfo summary.
    pub mem: wire::MemInfo,
    /// The host as CPUID shows it, plus the echoed host id.
    pub host: wire::HostView,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default()
}

/// Read the sandbox's view of itself. Unreadable files give empty fields.
pub fn read_view(host_id: &str) -> SandboxView {
    let u = uname();
    let (hypervisor, cpu_model) = cpuid_view();
    SandboxView {
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
        hostname: u.nodename,
        machine_id: read_trimmed("/etc/machine-id"),
        kernel_release: u.release,
        cpu: parse_cpuinfo(&read_lossy("/proc/cpuinfo")),
        mem: parse_meminfo(&read_lossy("/proc/meminfo")),
        host: wire::HostView {
            hypervisor,
            cpu_model,
            host_id_echo: host_id.to_string(),
        },
    }
}

/// Read a file as text, invalid UTF-8 replaced; empty if unreadable.
pub fn read_lossy(path: &str) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// /proc/uptime in microseconds, if /proc is mounted.
pub fn read_uptime_us() -> Option<u64> {
    parse_uptime_us(&std::fs::read_to_string("/proc/uptime").ok()?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), 100 if unknown.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Page size in KiB.
pub fn page_kib() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64 / 1024
    } else {
        4
    }
}

/// Convert clock ticks to microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    ticks.saturating_mul(1_000_000) / clk_tck()
}

/// Resource use of a process tree, sampled from /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSample {
    /// Sum of resident sets, KiB.
    pub rss_kib: u64,
    /// Sum of user CPU of the live processes, excluding the root, microseconds.
    pub cpu_user_us: u64,
    /// Sum of system CPU of the live processes, excluding the root, microseconds.
    pub cpu_system_us: u64,
    /// Processes in the tree, the root included.
    pub processes: u32,
}

/// Sum a process tree from parsed stats (pid → stat): `root` and all its descendants.
/// RSS counts the root; CPU does not (callers add the root's reaped children).
pub fn sum_tree(stats: &HashMap<i32, ProcStat>, root: i32, page_kib: u64, tck: u64) -> TreeSample {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, s) in stats {
        children.entry(s.ppid).or_default().push(pid);
    }
    let mut out = TreeSample::default();
    let mut stack = vec![root];
    let mut seen = std::collections::HashSet::new();
    let tck = tck.max(1);
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        if let Some(s) = stats.get(&pid) {
            out.processes += 1;
            out.rss_kib += s.rss_pages.saturating_mul(page_kib);
            if pid != root {
                out.cpu_user_us += s.utime_ticks.saturating_mul(1_000_000) / tck;
                out.cpu_system_us += s.stime_ticks.saturating_mul(1_000_000) / tck;
            }
        }
        if let Some(c) = children.get(&pid) {
            stack.extend(c);
        }
    }
    out
}

/// Sample the probe's process tree from /proc (in a sandbox: every process in it).
pub fn sample_tree(root: i32) -> TreeSample {
    let mut stats = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(s) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|t| parse_proc_stat(&t))
            {
                stats.insert(pid, s);
            }
        }
    }
    sum_tree(&stats, root, page_kib(), clk_tck())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime_us("12.34 56.78\n"), Some(12_340_000));
        assert_eq!(parse_uptime_us("7 1"), Some(7_000_000));
        assert_eq!(parse_uptime_us("1.0000019"), Some(1_000_001));
        assert_eq!(parse_uptime_us(""), None);
        assert_eq!(parse_uptime_us("x.5"), None);
        assert_eq!(parse_uptime_us("1.x"), None);
        assert_eq!(parse_uptime_us("99999999999999999999.0"), None);
    }

    #[test]
    fn proc_stat_with_odd_comm() {
        let t = "42 (a) b (c)) S 7 42 42 0 -1 4194560 100 0 0 0 11 22 0 0 20 0 1 0 \
                 1000 10000000 321 18446744073709551615";
        let s = parse_proc_stat(t).unwrap();
        assert_eq!(
            s,
            ProcStat {
                ppid: 7,
                utime_ticks: 11,
                stime_ticks: 22,
                rss_pages: 321
            }
        );
        assert_eq!(parse_proc_stat("42 (x) S 1 2"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_proc_stat(&own).unwrap().rss_pages > 0);
    }

    #[test]
    fn status_fields() {
        let t = "Name:\tsh\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_status_kib(t, "VmHWM"), Some(1234));
        assert_eq!(parse_status_kib(t, "VmSwap"), None);
        assert_eq!(parse_status_kib("VmHWM: lots", "VmHWM"), None);
    }

    #[test]
    fn tree_sum_follows_descendants_only() {
        let st = |ppid, u, s, r| ProcStat {
            ppid,
            utime_ticks: u,
            stime_ticks: s,
            rss_pages: r,
        };
        let stats: HashMap<i32, ProcStat> = [
            (10, st(1, 100, 100, 10)),
            (11, st(10, 100, 0, 20)),
            (12, st(11, 0, 50, 30)),
            (20, st(1, 999, 999, 999)),
        ]
        .into();
        let s = sum_tree(&stats, 10, 4, 100);
        assert_eq!(
            s,
            TreeSample {
                rss_kib: 240,
                cpu_user_us: 1_000_000,
                cpu_system_us: 500_000,
                processes: 3
            }
        );
        assert_eq!(sum_tree(&stats, 99, 4, 100), TreeSample::default());
    }

    #[test]
    fn cpuid_brand_is_plausible() {
        let (_hv, brand) = cpuid_view();
        if cfg!(target_arch = "x86_64") {
            assert!(!brand.is_empty());
            assert!(!brand.contains('\0'));
        }
    }
}
