//! `sandscope top`: the terminal UI (the `tui` crate) over one or more agents.

use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Agent URL; repeat for several agents (`--agent A --agent B`).
    #[arg(long, env = "SANDSCOPE_AGENT", default_value = crate::client::DEFAULT_AGENT)]
    agent: Vec<String>,
    /// Poll interval, ms.
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    interval_ms: u64,
    /// Log file (logs never go to the screen).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("sandscope-top.log"))]
    log_file: PathBuf,
    /// Time rendering (100 functions, 1000 sandboxes) instead of running the UI.
    #[arg(long, hide = true)]
    bench_render: bool,
}

/// Where `tracing` writes: the log file for `top`, stderr otherwise.
pub fn log_writer(top: Option<&TopArgs>) -> BoxMakeWriter {
    let Some(a) = top else {
        return BoxMakeWriter::new(std::io::stderr);
    };
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log_file)
    {
        Ok(f) => BoxMakeWriter::new(std::sync::Mutex::new(f)),
        Err(_) => BoxMakeWriter::new(std::io::sink),
    }
}

pub async fn run(a: TopArgs) -> Result<ExitCode> {
    if a.bench_render {
        for (w, h) in [(80, 24), (200, 60)] {
            let d = tui::bench_render(100, 1000, w, h, 200);
            println!(
                "render {w}x{h}, 100 functions, 1000 sandboxes: {:.3} ms/frame (mean of 200, all tabs)",
                d.as_secs_f64() * 1e3
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    tui::run(tui::Config {
        agents: a.agent,
        interval: Duration::from_millis(a.interval_ms),
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}
