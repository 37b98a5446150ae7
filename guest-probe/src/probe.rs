//! The probe's life after setup: connect, Hello, start the runtime, Ready, then serve
//! frames from the agent until Shutdown or end of stream.

use crate::args::{Args, HandlerKind};
use crate::clock::{Clock, Markers};
use crate::handler::{self, HandlerCtx, Persistent};
use crate::lambda::Lambda;
use crate::outbox::Outbox;
use crate::procinfo::SandboxView;
use crate::reaper::Reaper;
use crate::transport::{self, TransportError};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use wire::{frame::Body, AsyncFrameReader, AsyncFrameWriter, Hello, InvokeResult, Ready};

/// Why serving could not begin or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Making the link failed.
    #[error("connecting to the agent")]
    Connect(#[source] TransportError),
    /// The reaper could not start.
    #[error("starting the reaper")]
    StartReaper(#[source] crate::reaper::ReaperError),
    /// Sending Hello failed.
    #[error("sending Hello")]
    SendHello(#[source] std::io::Error),
    /// Installing a signal handler failed.
    #[error("installing the {0} handler")]
    InstallSignal(&'static str, #[source] std::io::Error),
    /// The agent sent bytes that are not frames.
    #[error("reading frames from the agent")]
    Decode(#[source] wire::DecodeError),
}

/// What was learned during setup, handed to [`serve`].
#[derive(Debug, Clone)]
pub struct Boot {
    /// The command line.
    pub args: Args,
    /// The probe's clock.
    pub clock: Clock,
    /// Markers so far (`init_start`, `mounts_done`, `procinfo_read`).
    pub markers: Markers,
    /// The sandbox's view of itself.
    pub view: SandboxView,
    /// /proc/uptime at init, µs (0 if unknown).
    pub uptime_at_init_us: u64,
}

/// Why the probe stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Shutdown frame or SIGTERM: exit 0.
    Clean,
    /// The link ended without a Shutdown (a VM init reconnects; a process exits 0).
    LinkLost,
    /// The persistent or Lambda runtime exited between invokes: the sandbox can serve no
    /// more, and ending it closes the link, which tells the agent at once (its pool
    /// drops the sandbox instead of handing it the next invoke). Exit 0.
    RuntimeExited,
}

/// How long to keep trying to reach the agent (a VM may boot before its host-side
/// socket is connected).
pub const CONNECT_LIMIT: Duration = Duration::from_secs(60);

type BoxFut<T> = Pin<Box<dyn Future<Output = T>>>;

enum Slot {
    Exec,
    Persistent(Box<Persistent>),
    Lambda(Box<Lambda>),
    Lent,
    Down(String),
}

async fn optional<T>(f: &mut Option<BoxFut<T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// An I/O error that means the peer closed or reset the link.
fn link_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

/// Serve the agent. Must run inside a current-thread tokio runtime; `reaper` is shared by
/// successive links (started once, before any child).
pub async fn serve(boot: Boot, reaper: Reaper) -> Result<Ending, ProbeError> {
    let Boot {
        args,
        clock,
        mut markers,
        view,
        uptime_at_init_us,
    } = boot;
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| ProbeError::InstallSignal("SIGTERM", e))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| ProbeError::InstallSignal("SIGINT", e))?;

    let transport = transport::for_endpoint(&args.endpoint);
    let link =
        transport::connect_with_retry(&*transport, CONNECT_LIMIT).map_err(ProbeError::Connect)?;
    let (rd, wr) = link.into_split().map_err(ProbeError::Connect)?;
    markers.mark(&clock, "connected");
    let mut reader = AsyncFrameReader::new(rd);
    let mut writer = AsyncFrameWriter::new(wr);
    let hello = Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        sandbox_id: args.sandbox_id.clone(),
        boot_id: view.boot_id,
        hostname: view.hostname,
        machine_id: view.machine_id,
        kernel_release: view.kernel_release,
        cpu: Some(view.cpu),
        mem: Some(view.mem),
        uptime_at_init_us,
        markers: markers.list().to_vec(),
        host: Some(view.host),
        probe_version: env!("CARGO_PKG_VERSION").into(),
        sent_since_init_ns: clock.since_init_ns(),
        probe_pid: std::process::id(),
        handler_kind: args.handler_kind.as_str().into(),
    };
    writer
        .send(&hello.into())
        .await
        .map_err(ProbeError::SendHello)?;
    let hello_sent = Instant::now();
    let outbox = Outbox::start(writer, clock);

    let ctx = HandlerCtx {
        handler: args.handler.clone(),
        sandbox_id: args.sandbox_id.clone(),
        outbox: outbox.clone(),
        reaper: reaper.clone(),
        groups: Default::default(),
    };
    let shells = crate::shell::Shells::new(outbox.clone(), reaper.clone(), &args.sandbox_id);
    let mut slot = Slot::Lent;
    let mut starting: Option<BoxFut<Result<Slot, String>>> = None;
    match args.handler_kind {
        HandlerKind::Exec => {
            slot = Slot::Exec;
            outbox
                .frame(Ready {
                    runtime_init_us: 0,
                    error: String::new(),
                })
                .await;
        }
        HandlerKind::Persistent => {
            let (c, t) = (ctx.clone(), args.init_timeout);
            starting = Some(Box::pin(async move {
                Persistent::start(c, t)
                    .await
                    .map(|p| Slot::Persistent(Box::new(p)))
            }));
        }
        HandlerKind::Lambda => {
            let (c, t, a) = (ctx.clone(), args.init_timeout, args.runtime_api);
            starting = Some(Box::pin(async move {
                Lambda::start(c, t, a)
                    .await
                    .map(|l| Slot::Lambda(Box::new(l)))
            }));
        }
    }
    let mut inflight: Option<BoxFut<(Option<Slot>, InvokeResult)>> = None;

    let (grace, ending) = loop {
        tokio::select! {
            f = reader.next() => {
                let frame = match f {
                    Ok(Some(f)) => f,
                    Ok(None) => break (0, Ending::LinkLost),
                    // The agent's end went away mid-stream (reset, not a clean EOF): the
                    // link is lost, not corrupt, and a dialing probe dials again.
                    Err(wire::DecodeError::Io(e)) if link_gone(&e) => break (0, Ending::LinkLost),
                    Err(e) => {
                        shutdown_handlers(&ctx, 0).await;
                        return Err(ProbeError::Decode(e));
                    }
                };
                match frame.body {
                    Some(Body::Invoke(inv)) => {
                        if inflight.is_some() {
                            outbox.result(handler::runtime_error(
                                &inv.invoke_id,
                                "Sandbox.Busy",
                                "another invoke is running in this sandbox".into(),
                            )).await;
                            continue;
                        }
                        if starting.is_some() {
                            outbox.result(handler::runtime_error(
                                &inv.invoke_id,
                                "Sandbox.NotReady",
                                "the runtime is still starting (wait for Ready)".into(),
                            )).await;
                            continue;
                        }
                        match std::mem::replace(&mut slot, Slot::Lent) {
                            Slot::Exec => {
                                slot = Slot::Exec;
                                let c = ctx.clone();
                                inflight = Some(Box::pin(async move {
                                    (None, handler::run_exec(c, inv).await)
                                }));
                            }
                            Slot::Persistent(p) => inflight = Some(Box::pin(async move {
                                let (p, r) = p.invoke(inv).await;
                                (p.map(|p| Slot::Persistent(Box::new(p))), r)
                            })),
                            Slot::Lambda(l) => inflight = Some(Box::pin(async move {
                                let (l, r) = l.invoke(inv).await;
                                (l.map(|l| Slot::Lambda(Box::new(l))), r)
                            })),
                            Slot::Down(reason) => {
                                outbox.result(handler::runtime_error(
                                    &inv.invoke_id,
                                    "Runtime.Unavailable",
                                    reason.clone(),
                                )).await;
                                slot = Slot::Down(reason);
                            }
                            Slot::Lent => {
                                outbox.result(handler::runtime_error(
                                    &inv.invoke_id,
                                    "Runtime.Unavailable",
                                    "no runtime".into(),
                                )).await;
                            }
                        }
                    }
                    Some(Body::StatsRequest(_)) => outbox.frame(stats(&clock)).await,
                    Some(Body::Ping(p)) => {
                        outbox.frame(wire::Pong {
                            nonce: p.nonce,
                            since_init_ns: clock.since_init_ns(),
                        }).await
                    }
                    Some(Body::Pong(_)) => {}
                    Some(Body::ShellOpen(o)) => shells.open(o).await,
                    Some(Body::ShellData(d)) => shells.data(d),
                    Some(Body::ShellResize(r)) => shells.resize(r.session, r.cols, r.rows),
                    Some(Body::ShellSignal(s)) => shells.signal(s.session, s.signal),
                    Some(Body::Shutdown(s)) => {
                        eprintln!("guest-probe: shutdown requested: {}", s.reason);
                        break (s.grace_ms, Ending::Clean);
                    }
                    _ => eprintln!("guest-probe: ignoring unexpected {} frame", frame.kind()),
                }
            }
            r = optional(&mut starting) => {
                starting = None;
                let init_us = hello_sent.elapsed().as_micros() as u64;
                match r {
                    Ok(p) => {
                        slot = p;
                        outbox.frame(Ready { runtime_init_us: init_us, error: String::new() }).await;
                    }
                    Err(e) => {
                        slot = Slot::Down(format!("runtime failed to start: {e}"));
                        outbox.frame(Ready { runtime_init_us: init_us, error: e }).await;
                    }
                }
            }
            r = optional(&mut inflight) => {
                inflight = None;
                let (rt, result) = r;
                if let Slot::Lent = slot {
                    slot = match rt {
                        Some(p) => p,
                        None => Slot::Down(format!(
                            "runtime is gone after invoke {}: {}",
                            result.invoke_id, result.error_message
                        )),
                    };
                }
                outbox.result(result).await;
                match &mut slot {
                    Slot::Persistent(p) => p.after_reply(),
                    Slot::Lambda(l) => l.after_reply(),
                    _ => {}
                }
            }
            why = idle_runtime_exit(&mut slot) => {
                eprintln!("guest-probe: {why} between invokes; ending the sandbox");
                break (0, Ending::RuntimeExited);
            }
            _ = sigterm.recv() => break (SIGNAL_GRACE_MS, Ending::Clean),
            _ = sigint.recv() => break (SIGNAL_GRACE_MS, Ending::Clean),
        }
    };
    drop(inflight);
    drop(starting);
    drop(slot);
    shells.kill_all();
    shutdown_handlers(&ctx, grace).await;
    outbox.flush(Duration::from_secs(1)).await;
    Ok(ending)
}

/// Resolves when the runtime in `slot` exits while no invoke has it (a lent runtime's
/// exit is the invoke's to report).
async fn idle_runtime_exit(slot: &mut Slot) -> String {
    match slot {
        Slot::Persistent(p) => p.exited().await,
        Slot::Lambda(l) => l.exited().await,
        _ => std::future::pending().await,
    }
}

/// Grace given to handlers when the probe itself gets SIGTERM/SIGINT.
pub const SIGNAL_GRACE_MS: u32 = 500;

/// SIGTERM every handler group, wait up to `grace_ms` for them to go, then SIGKILL.
async fn shutdown_handlers(ctx: &HandlerCtx, grace_ms: u32) {
    if grace_ms > 0 {
        ctx.groups.signal_all(libc::SIGTERM);
        let until = Instant::now() + Duration::from_millis(grace_ms.into());
        while ctx.groups.any_alive() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            ctx.reaper.reap_now();
        }
    }
    ctx.groups.signal_all(libc::SIGKILL);
}

fn stats(clock: &Clock) -> wire::Stats {
    let tree = crate::procinfo::sample_tree(std::process::id() as i32);
    // SAFETY: rusage is plain data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec.max(0) as u64 * 1_000_000 + t.tv_usec.max(0) as u64;
    wire::Stats {
        rss_kib: tree.rss_kib,
        cpu_user_us: tv(ru.ru_utime) + tree.cpu_user_us,
        cpu_system_us: tv(ru.ru_stime) + tree.cpu_system_us,
        processes: tree.processes,
        since_init_ns: clock.since_init_ns(),
    }
}
