//! `sandscope top`: a terminal UI over one or more agents.
//!
//! Shaped like tokio-console: [`conn`] polls each agent's JSON API and sends updates,
//! [`state`] holds what is known, [`view`] draws it (borrowing only), [`input`] maps
//! keys to state changes, and [`term`] owns the terminal (RAII restore, also on panic).
//! One `select!` loop in [`run`] ties them together. The crate reads the agent's API
//! through its own tolerant serde types ([`model`]) and never links the agent.
//! Logs never go to the screen: the caller routes `tracing` to a file.

#![warn(missing_docs)]

pub mod conn;
#[doc(hidden)]
pub mod fixtures;
pub mod input;
pub mod model;
pub mod state;
pub mod term;
pub mod view;

use state::State;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Options of `sandscope top`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Agent base URLs.
    pub agents: Vec<String>,
    /// Poll interval.
    pub interval: Duration,
}

/// Failures of the UI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Setting up or drawing to the terminal failed.
    #[error("terminal")]
    Terminal(#[source] std::io::Error),
}

/// Run the UI until `q`. Must be called inside a tokio runtime.
pub async fn run(cfg: Config) -> Result<(), Error> {
    let mut state = State::new(cfg.agents.iter().cloned());
    let (tx, mut updates) = mpsc::channel(64);
    let mut details = Vec::new();
    let mut pollers = Vec::new();
    for (i, a) in cfg.agents.iter().enumerate() {
        let (dtx, drx) = watch::channel(None);
        details.push(dtx);
        pollers.push(tokio::spawn(conn::poll(
            i,
            a.clone(),
            cfg.interval,
            tx.clone(),
            drx,
        )));
    }
    drop(tx);

    let mut guard = term::TermGuard::enter().map_err(Error::Terminal)?;
    let (ktx, mut keys) = mpsc::channel(64);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match crossterm::event::poll(Duration::from_millis(100)) {
                    Ok(true) => match crossterm::event::read() {
                        Ok(ev) => {
                            if ktx.blocking_send(ev).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                    Ok(false) => {}
                    Err(_) => return,
                }
            }
        })
    };

    // Redraw at least once a second so ages and "retry in" stay current.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        if let Err(e) = guard.terminal.draw(|f| view::draw(f, &state)) {
            break Err(Error::Terminal(e));
        }
        tokio::select! {
            Some(ev) = keys.recv() => {
                if let crossterm::event::Event::Key(k) = ev {
                    input::on_key(&mut state, k);
                }
                // Resize and other events just redraw.
            }
            Some(u) = updates.recv() => state.apply(u),
            _ = tick.tick() => {}
        }
        if state.quit {
            break Ok(());
        }
        let target = state.detail_target();
        for (i, d) in details.iter().enumerate() {
            let want = target.as_ref().filter(|t| t.0 == i).map(|t| t.1.clone());
            d.send_if_modified(|cur| {
                if *cur != want {
                    *cur = want;
                    true
                } else {
                    false
                }
            });
        }
    };
    stop.store(true, Ordering::Relaxed);
    for p in pollers {
        p.abort();
    }
    drop(guard);
    let _ = reader.join();
    result
}

/// Render `frames` frames of a synthetic state (`functions` functions, `sandboxes`
/// sandboxes) on every tab into a `width`x`height` test backend; returns the mean time
/// per frame.
pub fn bench_render(
    functions: usize,
    sandboxes: usize,
    width: u16,
    height: u16,
    frames: u32,
) -> Duration {
    let mut s = fixtures::many(functions, sandboxes);
    let mut t = ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height))
        .expect("test backend never fails");
    let t0 = Instant::now();
    for i in 0..frames {
        s.tab = state::Tab::ALL[i as usize % state::Tab::ALL.len()];
        t.draw(|f| view::draw(f, &s))
            .expect("test backend never fails");
    }
    t0.elapsed() / frames.max(1)
}
