//! Machine facts, CPU affinity, load.

use serde::Serialize;

/// What the figures were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu_model: String,
    /// cpuidle driver.
    pub cpuidle: String,
    /// /proc/loadavg at the start.
    pub loadavg_start: String,
    /// This process' CPU affinity at the start.
    pub affinity: Vec<usize>,
}

/// Read machine facts.
pub fn machine() -> Machine {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu_model,
        cpuidle: read("/sys/devices/system/cpu/cpuidle/current_driver"),
        loadavg_start: loadavg(),
        affinity: affinity(),
    }
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPUs the calling thread may run on.
pub fn affinity() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: we pass the set's real size and a valid pointer to it.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET only reads the set; the index is below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect()
}

/// A CPU set of the given CPUs.
pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus {
        // SAFETY: CPU_SET writes one bit of the set; the libc macro bounds-checks the index.
        unsafe { libc::CPU_SET(*c, &mut set) };
    }
    set
}

/// Restrict the calling thread (and threads/processes it creates later) to `cpus`.
pub fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: valid pointer to a set of the size we pass.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Total and idle jiffies of all CPUs (first line of /proc/stat).
pub fn cpu_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, idle)
}

/// Busy share of all CPUs between two [`cpu_jiffies`] readings, in "cores busy".
pub fn busy_cores(a: (u64, u64), b: (u64, u64), nproc: usize) -> f64 {
    let total = b.0.saturating_sub(a.0) as f64;
    let idle = b.1.saturating_sub(a.1) as f64;
    if total == 0.0 {
        return 0.0;
    }
    (total - idle) / total * nproc as f64
}

/// CPU time (user + system) of this process so far, µs.
pub fn self_cpu_us() -> u64 {
    // SAFETY: rusage is plain data; zeroed is valid, and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
