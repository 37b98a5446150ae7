//! sandscope-bench: the foundation benchmarks (docs/BENCHMARKS.md).
//!
//! Needs root (namespace sandboxes), gcc (builds the trivial static binaries at run time),
//! the static guest probe (scripts/build-probe), and bwrap / runc / crun for the peers
//! (scripts/bench installs them).

mod agent_bench;
mod floor;
mod otlp_bench;
mod recorder_bench;
mod ssh_bench;
mod stats;
mod sys;
mod vm_bench;
mod work;

use clap::{Parser, Subcommand};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts allocations (process-wide and per thread), then defers to the system allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    // try_with: the slot may be gone during thread teardown; a const Cell never allocates.
    let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// GlobalAlloc contract is System's; counting touches only an atomic and a const thread-local.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded contract (see the impl).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded contract (see the impl).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded contract (see the impl).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this process so far.
pub fn global_allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

/// Allocations made by the calling thread so far.
pub fn thread_allocs() -> u64 {
    THREAD_ALLOCS.try_with(|c| c.get()).unwrap_or(0)
}

#[derive(Parser, Debug)]
#[command(name = "sandscope-bench", about = "sandscope foundation benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Print one JSON document instead of text tables.
    #[arg(long, global = true)]
    json: bool,
    /// Cold-start runs per contender.
    #[arg(long, global = true, default_value_t = 50)]
    runs: usize,
    /// Warm persistent invokes per placement (Agent::invoke).
    #[arg(long, global = true, default_value_t = 20_000)]
    invokes: usize,
    /// Warm persistent invokes over HTTP per placement (0 = skip).
    #[arg(long, global = true, default_value_t = 5_000)]
    http_invokes: usize,
    /// Warm exec invokes per placement (0 = skip).
    #[arg(long, global = true, default_value_t = 1_000)]
    exec_invokes: usize,
    /// Ping-pong round trips for the floor.
    #[arg(long, global = true, default_value_t = 100_000)]
    rounds: usize,
    /// Placements for `warm`: unpinned, pinned (agent + sandbox on CPU 0), or both.
    #[arg(long, global = true, default_value = "both")]
    placement: String,
    /// Keystrokes timed in the `ssh` echo test.
    #[arg(long, global = true, default_value_t = 500)]
    keystrokes: usize,
    /// Recorder::record calls per case.
    #[arg(long, global = true, default_value_t = 4_000_000)]
    records: u64,
    /// max_sandboxes values for `throughput`.
    #[arg(long, global = true, value_delimiter = ',', default_value = "2,3,4")]
    sandboxes: Vec<usize>,
    /// Concurrent callers per sandbox for `throughput`.
    #[arg(long, global = true, default_value_t = 2)]
    callers_per_sandbox: usize,
    /// Seconds per `throughput` row.
    #[arg(long, global = true, default_value_t = 5.0)]
    secs: f64,
    /// Timed warm invocations per variant / collector state for `otlp`.
    #[arg(long, global = true, default_value_t = 2_000)]
    otlp_invokes: usize,
    /// Alternating rounds the `otlp` up/down/off latency series is split into.
    #[arg(long, global = true, default_value_t = 8)]
    otlp_rounds: usize,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// Cold start vs direct exec, bwrap, runc (crun is tried).
    Coldstart,
    /// Warm invoke round trips (persistent, exec, HTTP) beside the floor.
    Warm,
    /// The wake-up floor alone: Unix-socket ping-pong, three placements.
    Floor,
    /// Recorder::record ns/call and allocations.
    Recorder,
    /// Warm invokes/s from concurrent callers, telemetry on.
    Throughput,
    /// microVM cold start under the qemu driver (launch → Hello, phase breakdown).
    Vmboot,
    /// vmm-lite vs QEMU microvm with KVM, interleaved, same guest: launch → Hello and VMM
    /// memory beyond guest pages. Needs hardware KVM; elsewhere runs itself inside a
    /// nested L1 (QEMU/TCG with emulated SVM; scripts/test prepares it).
    VmmVsQemu,
    /// SSH into a live sandbox vs a local sshd: `ssh true`, first prompt byte, keystroke
    /// echo (needs openssh-client; openssh-server for the baseline).
    Ssh,
    /// OTLP export cost: agent CPU per 1k invocations with OTLP off vs on (HTTP, gRPC), and
    /// warm invoke p50 with the collector up vs down (needs rotel: pip install rotel).
    Otlp,
    /// Everything above except vmboot, in that order (recorder first, before any runtime
    /// exists); `otlp` is skipped with a note when rotel is not installed.
    All,
    /// The `otlp` load client (run by `otlp` itself in a child process).
    #[command(hide = true)]
    OtlpClient,
}

fn run(cli: &Cli) -> anyhow::Result<(sys::Machine, Vec<stats::Table>)> {
    let machine = sys::machine();
    if !cli.json {
        println!(
            "# sandscope-bench {:?}\n\nmachine: {} CPUs ({}), kernel {}, cpuidle {}, affinity {:?}, load {}\n",
            cli.cmd,
            machine.nproc,
            machine.cpu_model,
            machine.kernel,
            machine.cpuidle,
            machine.affinity,
            machine.loadavg_start
        );
    }
    let mut tables = Vec::new();
    let emit = |tables: &mut Vec<stats::Table>, new: Vec<stats::Table>| {
        for t in new {
            if !cli.json {
                println!("{}", t.render());
            }
            tables.push(t);
        }
    };
    let all = cli.cmd == Cmd::All;
    if all || cli.cmd == Cmd::Recorder {
        emit(&mut tables, vec![recorder_bench::run(cli.records)]);
    }
    if all || cli.cmd == Cmd::Floor {
        let (t, _) = floor::run(
            cli.rounds,
            &[
                floor::Placement::Unpinned,
                floor::Placement::SameCore,
                floor::Placement::SplitCores,
            ],
        )?;
        emit(&mut tables, vec![t]);
    }
    if cli.cmd == Cmd::Vmboot {
        emit(&mut tables, vm_bench::vmboot(cli.runs)?);
    }
    if cli.cmd == Cmd::VmmVsQemu {
        // Nested: the L1 run prints its own tables (echoed as they come).
        if let Some(t) = vm_bench::vmm_vs_qemu_nested(cli.runs, cli.json)? {
            emit(&mut tables, t);
        }
    }
    if cli.cmd == Cmd::Ssh {
        emit(&mut tables, ssh_bench::ssh(cli.runs, cli.keystrokes)?);
    }
    let needs_work = all
        || matches!(
            cli.cmd,
            Cmd::Coldstart | Cmd::Warm | Cmd::Throughput | Cmd::Otlp
        );
    if needs_work {
        if !host_agent::util::is_root() {
            anyhow::bail!("the agent benchmarks need root (namespace sandboxes, cgroups)");
        }
        let work = work::Work::new()?;
        if all || cli.cmd == Cmd::Coldstart {
            emit(&mut tables, agent_bench::coldstart(&work, cli.runs)?);
        }
        if all || cli.cmd == Cmd::Warm {
            let placements: Vec<bool> = match cli.placement.as_str() {
                "unpinned" => vec![false],
                "pinned" => vec![true],
                "both" => vec![false, true],
                o => anyhow::bail!("--placement {o}: expected unpinned, pinned or both"),
            };
            emit(
                &mut tables,
                agent_bench::warm(
                    &work,
                    &placements,
                    cli.invokes,
                    cli.http_invokes,
                    cli.exec_invokes,
                    cli.rounds,
                )?,
            );
        }
        if all || cli.cmd == Cmd::Throughput {
            emit(
                &mut tables,
                agent_bench::throughput(&work, &cli.sandboxes, cli.callers_per_sandbox, cli.secs)?,
            );
        }
        if all || cli.cmd == Cmd::Otlp {
            let params = otlp_bench::Params {
                invokes: cli.otlp_invokes,
                rounds: cli.otlp_rounds,
                floor_rounds: cli.rounds.min(20_000),
            };
            match otlp_bench::rotel_bin() {
                Some(bin) => emit(&mut tables, otlp_bench::run(&work, &bin, params)?),
                None if all => {
                    let mut t = stats::Table::new("OTLP export cost: skipped", &["reason"]);
                    t.row(vec![
                        "rotel not installed (python3 -m pip install rotel==0.0.1a15)".into(),
                    ]);
                    emit(&mut tables, vec![t]);
                }
                None => anyhow::bail!(
                    "`otlp` needs the rotel collector: python3 -m pip install rotel==0.0.1a15"
                ),
            }
        }
    }
    Ok((machine, tables))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.cmd == Cmd::OtlpClient {
        return match otlp_bench::client_main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sandscope-bench otlp-client: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&cli) {
        Ok((machine, tables)) => {
            if cli.json {
                let doc = serde_json::json!({
                    "command": format!("{:?}", cli.cmd).to_lowercase(),
                    "machine": machine,
                    "load_end": sys::loadavg(),
                    "tables": tables,
                });
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                println!("load at end: {}", sys::loadavg());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sandscope-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
