//! sandscope's probe <-> agent protocol.
//!
//! The wire is a stream of frames: a `u32` little-endian length, then one prost-encoded
//! [`Frame`]. The same framing runs over a Unix socket (process sandboxes) and over
//! virtio-vsock (microVMs). This crate owns the message types and the framing, and
//! nothing else: the probe and the agent both use it, so nothing is defined twice.
//!
//! Anything arriving from a sandbox is untrusted: a frame longer than [`MAX_FRAME`], a
//! body that does not decode, or a stream that ends mid-frame is a [`DecodeError`] that
//! the caller turns into closing that one link.

#![warn(missing_docs)]

mod codec;
mod messages;

pub use codec::{encode_frame, encode_frame_into, DecodeError, EncodeError, FrameDecoder};
#[cfg(feature = "tokio")]
pub use codec::{AsyncFrameReader, AsyncFrameWriter};
pub use messages::*;

/// Largest frame body accepted or produced, in bytes (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;

/// Largest event or response payload that fits in a frame with room for its envelope.
pub const MAX_PAYLOAD: usize = MAX_FRAME - 16 * 1024;

/// Longest log line carried in one [`Log`] frame; longer lines are cut and flagged.
pub const MAX_LOG_LINE: usize = 16 * 1024;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

impl Frame {
    /// Wrap a body in a frame.
    pub fn new(body: frame::Body) -> Self {
        Frame { body: Some(body) }
    }

    /// Short name of the body kind, for logs and error messages.
    pub fn kind(&self) -> &'static str {
        use frame::Body::*;
        match &self.body {
            None => "empty",
            Some(Hello(_)) => "hello",
            Some(Ready(_)) => "ready",
            Some(Invoke(_)) => "invoke",
            Some(InvokeResult(_)) => "invoke_result",
            Some(Log(_)) => "log",
            Some(Stats(_)) => "stats",
            Some(StatsRequest(_)) => "stats_request",
            Some(Ping(_)) => "ping",
            Some(Pong(_)) => "pong",
            Some(Shutdown(_)) => "shutdown",
            Some(ShellOpen(_)) => "shell_open",
            Some(ShellData(_)) => "shell_data",
            Some(ShellResize(_)) => "shell_resize",
            Some(ShellSignal(_)) => "shell_signal",
            Some(ShellExit(_)) => "shell_exit",
        }
    }
}

macro_rules! impl_from_body {
    ($($t:ident),*) => {$(
        impl From<$t> for Frame {
            fn from(m: $t) -> Frame { Frame::new(frame::Body::$t(m)) }
        }
    )*};
}
impl_from_body!(
    ShellOpen,
    ShellData,
    ShellResize,
    ShellSignal,
    ShellExit,
    Hello,
    Ready,
    Invoke,
    InvokeResult,
    Log,
    Stats,
    StatsRequest,
    Ping,
    Pong,
    Shutdown
);

/// How the probe runs a function's handler. Chosen in the agent's config, passed on the
/// probe's command line, reported back in [`Hello::handler_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandlerKind {
    /// `/bin/sh -c HANDLER` once per invoke; payload on stdin, response on stdout.
    Exec,
    /// `/bin/sh -c HANDLER` once per sandbox, speaking `sandscope-lines/1`.
    Persistent,
    /// `/bin/sh -c HANDLER` once per sandbox, speaking the AWS Lambda Runtime API that the
    /// probe serves on 127.0.0.1:9001 inside the sandbox.
    Lambda,
}

impl HandlerKind {
    /// The name used in config, on the command line and in Hello.
    pub fn as_str(self) -> &'static str {
        match self {
            HandlerKind::Exec => "exec",
            HandlerKind::Persistent => "persistent",
            HandlerKind::Lambda => "lambda",
        }
    }

    /// Parse a name produced by [`HandlerKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "exec" => Some(HandlerKind::Exec),
            "persistent" => Some(HandlerKind::Persistent),
            "lambda" => Some(HandlerKind::Lambda),
            _ => None,
        }
    }
}

/// Format an error with its `source()` chain: `outer: inner: innermost`. Used wherever an
/// error reaches a person (probe stderr, API bodies, CLI output).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Cut `line` to at most `max` bytes on a char boundary; returns whether it was cut.
pub fn truncate_line(line: &mut String, max: usize) -> bool {
    if line.len() <= max {
        return false;
    }
    let mut cut = max;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line.truncate(cut);
    true
}
