//! Everything the probe sends goes through one queue to one writer task, which owns the
//! link's write half, numbers [`wire::Log`] frames (`seq` from 1, +1 per Log frame on
//! the link, all streams) and stamps [`wire::InvokeResult::last_log_seq`]. Because logs
//! and results share the queue, a result never overtakes the logs enqueued before it.
//!
//! Also here: the bounded line splitter and the per-source log rate limit, so a handler
//! flooding stderr cannot starve the link.

use crate::clock::Clock;
use crate::transport::LinkWriter;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use wire::{AsyncFrameWriter, Frame, InvokeResult, Log, LogStream};

/// Log lines admitted per source per second; the rest are counted and reported.
pub const MAX_LINES_PER_SEC: u32 = 10_000;

/// Queue depth between producers and the writer task.
const QUEUE: usize = 1024;

enum Out {
    Frame(Box<Frame>),
    Log(Log),
    Result(InvokeResult),
    Flush(oneshot::Sender<()>),
}

/// Producer handle of the send queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Out>,
    clock: Clock,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Out")
    }
}

impl Outbox {
    /// Start the writer task on `writer`; returns the producer handle.
    pub fn start(writer: AsyncFrameWriter<LinkWriter>, clock: Clock) -> Outbox {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run_writer(rx, writer));
        Outbox { tx, clock }
    }

    /// The probe's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Queue a frame (not a Log or InvokeResult: use [`Outbox::log`] / [`Outbox::result`]).
    pub async fn frame(&self, f: impl Into<Frame>) {
        let _ = self.tx.send(Out::Frame(Box::new(f.into()))).await;
    }

    /// Queue one log line; `seq` is assigned by the writer.
    pub async fn log(&self, stream: LogStream, line: String, truncated: bool, invoke_id: &str) {
        let log = Log {
            seq: 0,
            stream: stream as i32,
            since_init_ns: self.clock.since_init_ns(),
            line,
            invoke_id: invoke_id.to_string(),
            truncated,
            dropped: 0,
        };
        let _ = self.tx.send(Out::Log(log)).await;
    }

    /// Queue a platform event line (cut to [`wire::MAX_LOG_LINE`]).
    pub async fn platform(&self, mut line: String, invoke_id: &str) {
        let t = wire::truncate_line(&mut line, wire::MAX_LOG_LINE);
        self.log(LogStream::Platform, line, t, invoke_id).await
    }

    /// Queue an invoke result; `last_log_seq` is filled in by the writer.
    pub async fn result(&self, r: InvokeResult) {
        let _ = self.tx.send(Out::Result(r)).await;
    }

    /// Wait until everything queued so far was written (or the link failed), at most
    /// `limit`.
    pub async fn flush(&self, limit: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Out::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(limit, rx).await;
        }
    }
}

async fn run_writer(mut rx: mpsc::Receiver<Out>, mut w: AsyncFrameWriter<LinkWriter>) {
    let mut seq = 0u64;
    let mut last_for_invoke: HashMap<String, u64> = HashMap::new();
    let mut broken = false;
    while let Some(out) = rx.recv().await {
        let frame = match out {
            Out::Frame(f) => *f,
            Out::Log(mut l) => {
                seq += 1;
                l.seq = seq;
                if !l.invoke_id.is_empty() {
                    last_for_invoke.insert(l.invoke_id.clone(), seq);
                }
                l.into()
            }
            Out::Result(mut r) => {
                r.last_log_seq = last_for_invoke.remove(&r.invoke_id).unwrap_or(0);
                r.into()
            }
            Out::Flush(ack) => {
                let _ = ack.send(());
                continue;
            }
        };
        if broken {
            continue; // keep draining so producers never block on a dead link
        }
        if let Err(e) = w.send(&frame).await {
            eprintln!(
                "guest-probe: writing {} frame to the agent: {e}",
                frame.kind()
            );
            broken = true;
        }
    }
}

/// Splits a byte stream into lines of at most [`wire::MAX_LOG_LINE`] bytes, holding at
/// most that much. A longer line is emitted cut (flagged) and its rest discarded.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    discarding: bool,
}

impl LineSplitter {
    /// Feed bytes; complete lines are appended to `out` as (line, truncated).
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<(String, bool)>) {
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let (chunk, rest, ended) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if !self.discarding {
                let room = wire::MAX_LOG_LINE - self.buf.len();
                self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    out.push(Self::finish_line(std::mem::take(&mut self.buf), true));
                    self.discarding = true;
                }
            }
            if ended {
                if !self.discarding {
                    out.push(Self::finish_line(std::mem::take(&mut self.buf), false));
                }
                self.discarding = false;
            }
        }
    }

    /// End of stream: the unterminated last line, if any.
    pub fn finish(&mut self) -> Option<(String, bool)> {
        self.discarding = false;
        (!self.buf.is_empty()).then(|| Self::finish_line(std::mem::take(&mut self.buf), false))
    }

    fn finish_line(bytes: Vec<u8>, cut: bool) -> (String, bool) {
        let mut s = String::from_utf8_lossy(&bytes).into_owned();
        if s.ends_with('\r') {
            s.pop();
        }
        let t = wire::truncate_line(&mut s, wire::MAX_LOG_LINE);
        (s, cut || t)
    }
}

/// Log lines of one source, rate limited to [`MAX_LINES_PER_SEC`].
#[derive(Debug)]
pub struct LineSink {
    outbox: Outbox,
    stream: LogStream,
    window: Instant,
    in_window: u32,
    dropped: u64,
}

impl LineSink {
    /// A sink sending `stream` lines through `outbox`.
    pub fn new(outbox: Outbox, stream: LogStream) -> Self {
        LineSink {
            outbox,
            stream,
            window: Instant::now(),
            in_window: 0,
            dropped: 0,
        }
    }

    /// Send one line, or count it as dropped when over the rate.
    pub async fn line(&mut self, line: String, truncated: bool, invoke_id: &str) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.in_window = 0;
            self.report_drops(invoke_id).await;
        }
        if self.in_window >= MAX_LINES_PER_SEC {
            self.dropped += 1;
            return;
        }
        self.in_window += 1;
        self.outbox
            .log(self.stream, line, truncated, invoke_id)
            .await;
    }

    /// Send one Platform line saying how many lines were dropped, if any.
    pub async fn report_drops(&mut self, invoke_id: &str) {
        if self.dropped > 0 {
            let n = std::mem::take(&mut self.dropped);
            let line = format!(
                "dropped {n} log lines (more than {MAX_LINES_PER_SEC} lines/s on one stream)"
            );
            // Counted by the agent from `dropped`, not from the text.
            let log = Log {
                seq: 0,
                stream: LogStream::Platform as i32,
                since_init_ns: self.outbox.clock.since_init_ns(),
                line,
                invoke_id: invoke_id.to_string(),
                truncated: false,
                dropped: n,
            };
            let _ = self.outbox.tx.send(Out::Log(log)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<(String, bool)> {
        let mut s = LineSplitter::default();
        let mut out = vec![];
        for c in chunks {
            s.push(c, &mut out);
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        let out = split(&[b"ab", b"c\nde\r\n", b"\nf"]);
        let lines: Vec<_> = out.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(lines, ["abc", "de", "", "f"]);
        assert!(out.iter().all(|(_, t)| !t));
    }

    #[test]
    fn long_line_is_cut_and_flagged_and_rest_discarded() {
        let long = vec![b'x'; wire::MAX_LOG_LINE * 2 + 10];
        let out = split(&[&long, b"\nnext\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0.len(), wire::MAX_LOG_LINE);
        assert!(out[0].1);
        assert_eq!(out[1], ("next".to_string(), false));
    }

    #[test]
    fn invalid_utf8_stays_within_limit() {
        let bad = vec![0xffu8; wire::MAX_LOG_LINE];
        let out = split(&[&bad, b"\n"]);
        assert_eq!(out.len(), 1);
        assert!(out[0].0.len() <= wire::MAX_LOG_LINE);
        assert!(out[0].1);
    }
}
