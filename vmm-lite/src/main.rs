//! `vmm-lite` binary: parse the command line, run the VM, map the outcome to an exit code.
//!
//! Exit codes: the guest's (0 after an i8042 reset or shutdown, the byte written to the
//! debug exit port 0x501), 2 when a vCPU failed, 128+N after signal N, and 1 when the VMM
//! could not start (the error chain is printed once to stderr).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use vmm_lite::config::{RawConfig, VmConfig};
use vmm_lite::metrics::Metrics;

/// A small KVM VMM with a Firecracker-compatible vsock.
#[derive(Parser, Debug)]
#[command(name = "vmm-lite", version)]
struct Cli {
    /// Kernel image: bzImage, vmlinux (PVH note) or a 64-bit ELF.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to the VMM's defaults.
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest CID for the virtio-vsock device.
    #[arg(long)]
    vsock_cid: Option<u64>,
    /// Host Unix socket for vsock (guest connections go to `<PATH>_<port>`).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Serial output: `-`/`stdout` (default), `none`, or a file/FIFO path.
    #[arg(long)]
    serial_out: Option<String>,
    /// Serial input: `stdin` or `unix:PATH` (a socket the VMM listens on).
    #[arg(long)]
    serial_in: Option<String>,
    /// Write metrics JSON here on exit and on SIGUSR1.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Boot a standard Linux kernel even when KVM is PVM.
    #[arg(long)]
    allow_pvm: bool,
    /// Do not log informational lines (boot-timer) to stderr.
    #[arg(long)]
    quiet: bool,
    /// Destroy the VM before exiting (default: a detached helper finishes the slow KVM
    /// teardown after this process has exited).
    #[arg(long)]
    sync_teardown: bool,
    /// Control socket: a client writes `metrics\n` (answered with the live metrics JSON on
    /// one line) or `stop\n` (stops the VM, exit status 0).
    #[arg(long)]
    control_sock: Option<PathBuf>,
}

/// Blocks SIGUSR1/SIGTERM/SIGINT before `main`: the C library runs `.init_array` entries
/// once the dynamic loader is done, before the Rust runtime's own initialisation (which
/// takes a while under PVM). From here on such a signal stays pending until the event loop
/// reads it instead of ending the process with its default action; only the kernel's exec
/// and the dynamic loader come earlier. (std captures argv the same way on glibc.)
#[used]
#[link_section = ".init_array"]
static BLOCK_CONTROL_SIGNALS: extern "C" fn() = block_control_signals_before_main;

extern "C" fn block_control_signals_before_main() {
    // Only libc calls: nothing here needs the Rust runtime. A failure is reported by `main`.
    let _ = vmm_lite::signals::block_control_signals();
}

fn main() {
    // First thing in main as well (a no-op when the constructor ran): threads created from
    // here on inherit the mask, and the signalfd created by `run` picks up what is pending.
    if let Err(e) = vmm_lite::signals::block_control_signals() {
        fail(&e);
    }
    let start = Instant::now();
    let metrics = Arc::new(Metrics::new(start));
    let cli = Cli::parse();
    let raw = RawConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        mem_mib: cli.mem_mib,
        vcpus: cli.vcpus,
        vsock_cid: cli.vsock_cid,
        vsock_uds: cli.vsock_uds,
        serial_out: cli.serial_out,
        serial_in: cli.serial_in,
        metrics: cli.metrics,
        allow_pvm: cli.allow_pvm,
        quiet: cli.quiet,
        sync_teardown: cli.sync_teardown,
        control: cli.control_sock,
    };
    let cfg = match VmConfig::from_raw(raw) {
        Ok(c) => c,
        Err(e) => fail(&e),
    };
    match vmm_lite::vmm::run(&cfg, metrics) {
        Ok(stop) => std::process::exit(stop.code),
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::error::Error) -> ! {
    let mut msg = format!("vmm-lite: error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    std::process::exit(1)
}
