//! Host and per-process figures from /proc, parsed by hand (a few fields, no crate).

use std::path::Path;

/// Host memory and load.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostMem {
    /// MemTotal in bytes.
    pub total_bytes: u64,
    /// MemAvailable in bytes.
    pub available_bytes: u64,
}

/// Parse MemTotal / MemAvailable (kB) from /proc/meminfo text.
pub fn parse_meminfo(text: &str) -> HostMem {
    let mut m = HostMem::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0) * 1024;
        match k {
            "MemTotal:" => m.total_bytes = v,
            "MemAvailable:" => m.available_bytes = v,
            _ => {}
        }
    }
    m
}

/// Host memory now.
pub fn host_mem() -> HostMem {
    std::fs::read_to_string("/proc/meminfo")
        .map(|t| parse_meminfo(&t))
        .unwrap_or_default()
}

/// 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// Online CPUs.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Resident bytes of a process (statm field 2 × page size), 0 if gone.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * crate::util::page_size())
        .unwrap_or(0)
}

/// CPU time of a process including its reaped children (utime+stime+cutime+cstime), µs.
/// Summed over every live process of a sandbox this counts each CPU second once: a
/// process's own time moves into its parent's cutime/cstime when it is reaped.
pub fn cpu_us_with_children(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .map(|t| parse_stat_cpu_ticks(&t))
        .map(|ticks| ticks * 1_000_000 / crate::util::clk_tck())
        .unwrap_or(0)
}

/// utime+stime+cutime+cstime ticks from a /proc/<pid>/stat line.
pub fn parse_stat_cpu_ticks(stat: &str) -> u64 {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    // rest starts at field 3 (state); utime is field 14 → index 11 here.
    rest.split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// Contents of /etc/machine-id (trimmed), empty when absent.
pub fn machine_id() -> String {
    read_trim("/etc/machine-id")
}

/// The host's boot id.
pub fn boot_id() -> String {
    read_trim("/proc/sys/kernel/random/boot_id")
}

/// The host's name.
pub fn hostname() -> String {
    read_trim("/proc/sys/kernel/hostname")
}

fn read_trim(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The host CPU's model name (`/proc/cpuinfo`), empty if unknown.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let line =
            "123 (my (weird) proc) S 1 123 123 0 -1 4194560 100 0 0 0 7 3 2 1 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), 7 + 3 + 2 + 1);
        assert_eq!(parse_stat_cpu_ticks("garbage"), 0);
    }

    #[test]
    fn meminfo_fields() {
        let m = parse_meminfo("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:   500 kB\n");
        assert_eq!(m.total_bytes, 1000 * 1024);
        assert_eq!(m.available_bytes, 500 * 1024);
        assert_eq!(parse_meminfo("nonsense").total_bytes, 0);
    }

    #[test]
    fn live_process_figures() {
        let me = std::process::id();
        assert!(rss_bytes(me) > 0);
        assert_eq!(rss_bytes(u32::MAX), 0);
        assert!(host_mem().total_bytes > 0);
    }
}
