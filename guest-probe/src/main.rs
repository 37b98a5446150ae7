//! `guest-probe`: the sandbox init. See the crate docs and README.md.

use guest_probe::args::{Args, ArgsError, USAGE};
use guest_probe::clock::{Clock, Markers};
use guest_probe::probe::{self, Boot};
use guest_probe::{error_chain, forkinit, procinfo, reaper, setup};

fn fail(step: &str, e: &(dyn std::error::Error + 'static)) -> ! {
    eprintln!("guest-probe: {step}: {}", error_chain(e));
    std::process::exit(1)
}

fn main() {
    let clock = Clock::start();
    let mut markers = Markers::new();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("guest-probe: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if args.fork_init {
        let link_fd = match args.endpoint {
            guest_probe::args::Endpoint::Fd(fd) => Some(fd),
            _ => None,
        };
        if let Err(e) = forkinit::fork_init(link_fd) {
            fail("--fork-init", &e);
        }
    }
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    let mut uptime = procinfo::read_uptime_us();
    if let Some(root) = &args.root {
        if let Err(e) = setup::build_root(root) {
            fail("building the sandbox root", &e);
        }
        if let Err(e) = setup::set_hostname(&args.sandbox_id) {
            fail("setting the hostname", &e);
        }
        if let Err(e) = setup::loopback_up() {
            fail("network setup", &e);
        }
    } else if pid1 {
        setup::mount_missing();
    }
    markers.mark(&clock, "mounts_done");
    if uptime.is_none() {
        uptime = procinfo::read_uptime_us();
    }
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
        Err(e) => fail("starting the async runtime", &e),
    };
    let fork_init = args.fork_init;
    let boot = Boot {
        args,
        clock,
        markers,
        view,
        uptime_at_init_us: uptime.unwrap_or(0),
    };
    match rt.block_on(probe::serve(boot)) {
        Ok(probe::Ending::Clean) => {
            drop(rt);
            guest_probe::power_off(fork_init)
        }
        Err(e) => fail("serving the agent", &e),
    }
}
