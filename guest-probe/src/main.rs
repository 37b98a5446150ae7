//! `guest-probe`: the sandbox init. See the crate docs and README.md.

use guest_probe::args::{self, Args, ArgsError, USAGE};
use guest_probe::clock::{Clock, Markers};
use guest_probe::probe::{self, Boot, Ending};
use guest_probe::{boot_timer, error_chain, forkinit, procinfo, reaper, setup};

fn fail(step: &str, e: &(dyn std::error::Error + 'static)) -> ! {
    eprintln!("guest-probe: {step}: {}", error_chain(e));
    std::process::exit(1)
}

/// PATH for handlers when the probe's environment has none (a VM init gets only HOME and
/// TERM from the kernel).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn main() {
    let clock = Clock::start();
    // Guest uptime at init: in a microVM, the time the kernel took to reach init.
    let uptime = procinfo::boot_time_us();
    let mut markers = Markers::new();
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    let vm_init = pid1 && std::path::Path::new(args::VM_ARGS_FILE).is_file();
    let argv: Vec<String> = if vm_init {
        // /proc first: the sandbox id and the boot-timer address are on the kernel command
        // line. The boot-timer marker goes out before anything slow (it ends the kernel
        // phase on the VMM's clock); it mounts /dev itself if it has to. Then the rest.
        if let Err(e) = setup::mount_proc_if_missing() {
            eprintln!("guest-probe: {}", error_chain(&e));
        }
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        boot_timer::mark_boot(pid1, vm_init, &cmdline, &clock, &mut markers);
        setup::mount_missing();
        let file = std::fs::read_to_string(args::VM_ARGS_FILE).unwrap_or_default();
        // Linux hands init the command-line words it does not know (vmm-lite's `nomodule`
        // on a kernel without modules, say): they are not ours, so they are ignored.
        let leftovers: Vec<String> = std::env::args().skip(1).collect();
        if !leftovers.is_empty() {
            eprintln!(
                "guest-probe: ignoring kernel parameters handed to init: {}",
                leftovers.join(" ")
            );
        }
        args::vm_init_args(&file, &cmdline)
    } else {
        std::env::args().skip(1).collect()
    };
    let args = match Args::parse(argv) {
        Ok(a) => a,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("guest-probe: {e}\n{USAGE}");
            if vm_init {
                guest_probe::power_off(false)
            }
            std::process::exit(2);
        }
    };
    // Still single-threaded: setting the environment here is safe.
    if std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", DEFAULT_PATH);
    }
    for (k, v) in &args.env {
        std::env::set_var(k, v);
    }
    if args.fork_init {
        let link_fd = match args.endpoint {
            guest_probe::args::Endpoint::Fd(fd) => Some(fd),
            _ => None,
        };
        if let Err(e) = forkinit::fork_init(link_fd) {
            fail("--fork-init", &e);
        }
    }
    // After fork-init the namespace's own boot clock applies (the same one, for now).
    let uptime = if args.fork_init {
        procinfo::boot_time_us()
    } else {
        uptime
    };
    let vm_fail = |step: &str, e: &(dyn std::error::Error + 'static)| -> ! {
        eprintln!("guest-probe: {step}: {}", error_chain(e));
        if vm_init {
            guest_probe::power_off(false)
        }
        std::process::exit(1)
    };
    if let Some(root) = &args.root {
        if let Err(e) = setup::build_root(root) {
            fail("building the sandbox root", &e);
        }
    } else if pid1 {
        setup::mount_missing();
    }
    if args.root.is_some() || vm_init {
        if let Err(e) = setup::set_hostname(&args.sandbox_id) {
            vm_fail("setting the hostname", &e);
        }
        if let Err(e) = setup::loopback_up() {
            vm_fail("network setup", &e);
        }
    }
    markers.mark(&clock, "mounts_done");
    setup::protect_from_oom();
    if !pid1 {
        reaper::become_subreaper();
    }
    let view = procinfo::read_view(&args.host_id);
    markers.mark(&clock, "procinfo_read");

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => vm_fail("starting the async runtime", &e),
    };
    let fork_init = args.fork_init;
    let boot = Boot {
        args,
        clock,
        markers,
        view,
        uptime_at_init_us: uptime.unwrap_or(0),
    };
    // A probe that dials the agent (vsock, Unix path) can dial again; an inherited fd
    // cannot be reopened.
    let redial = !matches!(boot.args.endpoint, args::Endpoint::Fd(_));
    if vm_init {
        eprintln!(
            "guest-probe: init of sandbox {} (kernel reached init after {:.3} s), connecting to {:?}",
            boot.args.sandbox_id,
            boot.uptime_at_init_us as f64 / 1e6,
            boot.args.endpoint
        );
    }
    let served = rt.block_on(async move {
        let reaper = reaper::Reaper::start().map_err(probe::ProbeError::StartReaper)?;
        loop {
            match probe::serve(boot.clone(), reaper.clone()).await? {
                // A VM outlives its link: connect again and say Hello again.
                Ending::LinkLost if redial => {
                    eprintln!("guest-probe: link to the agent lost; reconnecting");
                }
                e => return Ok::<_, probe::ProbeError>(e),
            }
        }
    });
    match served {
        Ok(_) => {
            drop(rt);
            guest_probe::power_off(fork_init)
        }
        Err(e) => vm_fail("serving the agent", &e),
    }
}
