//! What a sandbox's own processes write: a process sandbox's probe output (its stderr,
//! which handlers running as root inside can write to through `/proc/1/fd/2`), a VM's
//! serial console and its helpers' output. The guest controls all of it, so the host
//! keeps a bounded tail: lines cut at [`MAX_LINE`] bytes (the rest counted, not kept),
//! at most a given number of lines and [`MAX_BYTES`] in all, oldest dropped first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest console line kept, in bytes; the rest of a longer line is cut and counted.
pub const MAX_LINE: usize = 4096;

/// Most console text kept per sandbox, in bytes.
pub const MAX_BYTES: usize = 64 * 1024;

/// Console lines cut at [`MAX_LINE`], by every sandbox of this agent.
pub static LINES_CUT: AtomicU64 = AtomicU64::new(0);

/// Bytes cut off console lines, by every sandbox of this agent.
pub static BYTES_CUT: AtomicU64 = AtomicU64::new(0);

/// The bounded tail of a sandbox's console.
#[derive(Debug)]
pub struct Console {
    max_lines: usize,
    ring: Mutex<Ring>,
    /// Readers ([`keep_lines`]) not yet at the end of their stream.
    readers: AtomicUsize,
    /// Signalled when a reader reaches its end.
    reader_done: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Console {
    /// An empty console keeping at most `max_lines` lines (and [`MAX_BYTES`]).
    pub fn new(max_lines: usize) -> Self {
        Self {
            max_lines: max_lines.max(1),
            ring: Mutex::default(),
            readers: AtomicUsize::new(0),
            reader_done: tokio::sync::Notify::new(),
        }
    }

    /// Waits, at most `limit`, until every stream feeding this console has ended (its
    /// writers exited) and all it carried is kept.
    pub async fn drained(&self, limit: Duration) {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let done = self.reader_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.readers.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(until, done).await.is_err() {
                return;
            }
        }
    }

    /// The kept lines, oldest first, joined with newlines.
    pub fn text(&self) -> String {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        r.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Keep one line (at most [`MAX_LINE`] bytes, already cut), noting `cut` bytes that
    /// were dropped from its end.
    fn push(&self, id: &str, prefix: &str, line: &[u8], cut: u64) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        let mut kept = format!("{prefix}{text}");
        if cut > 0 {
            LINES_CUT.fetch_add(1, Ordering::Relaxed);
            BYTES_CUT.fetch_add(cut, Ordering::Relaxed);
            kept.push_str(&format!(" [... {cut} more bytes cut]"));
        }
        tracing::debug!(sandbox = %id, "{kept}");
        let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        while !r.lines.is_empty()
            && (r.lines.len() >= self.max_lines || r.bytes + kept.len() > MAX_BYTES)
        {
            let old = r.lines.pop_front().unwrap_or_default();
            r.bytes -= old.len();
        }
        r.bytes += kept.len();
        r.lines.push_back(kept);
    }
}

/// Read `out` to its end on a task of its own, line by line into `console` (each line
/// prefixed with `prefix`, logged at debug level for sandbox `id`). Memory stays bounded
/// whatever arrives: a line without an end holds at most [`MAX_LINE`] bytes, and the
/// pipe is always drained, so the writer never blocks on it.
pub fn keep_lines(
    mut out: Box<dyn AsyncRead + Send + Unpin>,
    console: Arc<Console>,
    id: String,
    prefix: String,
) {
    console.readers.fetch_add(1, Ordering::AcqRel);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let mut line = Vec::with_capacity(256);
        let mut cut = 0u64;
        loop {
            let n = match out.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut rest = &buf[..n];
            while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                take(&mut line, &mut cut, &rest[..end]);
                console.push(&id, &prefix, &line, cut);
                line.clear();
                cut = 0;
                rest = &rest[end + 1..];
            }
            take(&mut line, &mut cut, rest);
        }
        if !line.is_empty() || cut > 0 {
            console.push(&id, &prefix, &line, cut);
        }
        console.readers.fetch_sub(1, Ordering::AcqRel);
        console.reader_done.notify_waiters();
    });
}

/// Append `bytes` to `line` up to [`MAX_LINE`]; count the rest in `cut`.
fn take(line: &mut Vec<u8>, cut: &mut u64, bytes: &[u8]) {
    let room = MAX_LINE.saturating_sub(line.len()).min(bytes.len());
    line.extend_from_slice(&bytes[..room]);
    *cut += (bytes.len() - room) as u64;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn fed(input: Vec<u8>, max_lines: usize) -> Console {
        let (mut w, r) = tokio::io::duplex(1024);
        let c = Arc::new(Console::new(max_lines));
        keep_lines(Box::new(r), c.clone(), "sb".into(), "[p] ".into());
        w.write_all(&input).await.unwrap();
        drop(w);
        // The reader ends at EOF; wait for it by polling the Arc's count.
        while Arc::strong_count(&c) > 1 {
            tokio::task::yield_now().await;
        }
        Arc::try_unwrap(c).unwrap()
    }

    #[tokio::test]
    async fn drained_waits_for_the_last_words_of_an_exited_writer_and_is_bounded() {
        let c = Arc::new(Console::new(10));
        let (mut w, r) = tokio::io::duplex(1024);
        keep_lines(Box::new(r), c.clone(), "sb".into(), String::new());
        // A writer still open: drained gives up at its limit.
        let t0 = std::time::Instant::now();
        c.drained(Duration::from_millis(50)).await;
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // It writes its last line and exits: drained returns once the line is kept.
        w.write_all(b"error: bzImage is truncated\n").await.unwrap();
        drop(w);
        c.drained(Duration::from_secs(5)).await;
        assert_eq!(c.text(), "error: bzImage is truncated");
        assert_eq!(c.readers.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_counted() {
        let mut input = vec![b'x'; MAX_LINE * 3];
        input.extend_from_slice(b"\r\nshort\nno end");
        let c = fed(input, 10).await;
        let text = c.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].starts_with("[p] xxx"));
        assert!(
            lines[0].ends_with(&format!(" [... {} more bytes cut]", MAX_LINE * 2 + 1)),
            "{}",
            &lines[0][lines[0].len() - 40..]
        );
        assert_eq!(&lines[1..], ["[p] short", "[p] no end"]);
    }

    #[tokio::test]
    async fn lines_and_bytes_kept_are_bounded() {
        let c = fed(b"a\nb\nc\nd\n".to_vec(), 2).await;
        assert_eq!(c.text(), "[p] c\n[p] d");
        let mut input = Vec::new();
        for _ in 0..100 {
            input.extend(vec![b'z'; MAX_LINE - 10]);
            input.push(b'\n');
        }
        let c = fed(input, 1000).await;
        let text = c.text();
        assert!(text.len() <= MAX_BYTES + 1000, "{}", text.len());
        assert_eq!(text.lines().count(), MAX_BYTES / MAX_LINE);
    }

    #[tokio::test]
    async fn invalid_utf8_does_not_stop_the_reader() {
        let c = fed(b"ok\n\xff\xfe bad\nafter\n".to_vec(), 10).await;
        let text = c.text();
        assert!(text.ends_with("[p] after"), "{text}");
    }
}
