//! Length-delimited framing: a `u32` LE length then a prost body.

use crate::{Frame, LEN_PREFIX, MAX_FRAME};
use bytes::{Buf, BytesMut};
use prost::Message;

/// Why a frame could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded body is larger than [`MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Encoded body length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a byte stream is not a valid sequence of frames. Every variant is fatal for the
/// link it came from: the stream cannot be resynchronised.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more than [`MAX_FRAME`] bytes.
    #[error("frame length {len} exceeds the {max}-byte limit")]
    Oversized {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid `Frame`.
    #[error("malformed frame body ({len} bytes)")]
    Malformed {
        /// Body length.
        len: usize,
        /// What prost said.
        #[source]
        source: prost::DecodeError,
    },
    /// The frame decoded but carries no body.
    #[error("frame has no body (unknown or missing message kind)")]
    Empty,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {need} bytes)")]
    Truncated {
        /// Bytes of the frame (prefix included) received.
        have: usize,
        /// Bytes the frame needed.
        need: usize,
    },
    /// Reading the underlying stream failed.
    #[error("reading the link failed")]
    Io(#[source] std::io::Error),
}

/// Encode `frame` with its length prefix into a new buffer.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(LEN_PREFIX + frame.encoded_len());
    encode_frame_into(frame, &mut out)?;
    Ok(out)
}

/// Append `frame` with its length prefix to `out`.
pub fn encode_frame_into(frame: &Frame, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let len = frame.encoded_len();
    if len > MAX_FRAME {
        return Err(EncodeError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    out.reserve(LEN_PREFIX + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    frame
        .encode(out)
        .expect("Vec<u8> grows, so prost encoding cannot run out of space");
    Ok(())
}

/// Incremental decoder: feed it whatever bytes arrived, take out whole frames.
///
/// It validates the length prefix as soon as the 4 bytes are in, so an oversized
/// announcement is rejected before any of the body is buffered.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The internal buffer, for readers that read straight into it.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Take the next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..LEN_PREFIX].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::Oversized {
                len,
                max: MAX_FRAME,
            });
        }
        if self.buf.len() < LEN_PREFIX + len {
            self.buf.reserve(LEN_PREFIX + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(LEN_PREFIX);
        let body = self.buf.split_to(len);
        let frame = Frame::decode(body.as_ref())
            .map_err(|source| DecodeError::Malformed { len, source })?;
        if frame.body.is_none() {
            return Err(DecodeError::Empty);
        }
        Ok(Some(frame))
    }

    /// Called at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = if self.buf.len() >= LEN_PREFIX {
            LEN_PREFIX
                + u32::from_le_bytes(self.buf[..LEN_PREFIX].try_into().expect("4 bytes")) as usize
        } else {
            LEN_PREFIX
        };
        Err(DecodeError::Truncated {
            have: self.buf.len(),
            need,
        })
    }

    /// Blocking read of the next frame from `r`; `Ok(None)` on a clean end of stream.
    pub fn read_frame<R: std::io::Read>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, DecodeError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(Some(f));
            }
            let n = loop {
                match r.read(&mut chunk) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(DecodeError::Io(e)),
                }
            };
            if n == 0 {
                self.finish()?;
                return Ok(None);
            }
            self.extend(&chunk[..n]);
        }
    }
}

#[cfg(feature = "tokio")]
mod async_io {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads frames from an async byte stream.
    #[derive(Debug)]
    pub struct AsyncFrameReader<R> {
        inner: R,
        dec: FrameDecoder,
    }

    impl<R: AsyncRead + Unpin> AsyncFrameReader<R> {
        /// Wrap a reader.
        pub fn new(inner: R) -> Self {
            Self {
                inner,
                dec: FrameDecoder::new(),
            }
        }

        /// The next frame; `Ok(None)` on a clean end of stream (between frames).
        /// Cancel-safe: bytes already read stay buffered.
        pub async fn next(&mut self) -> Result<Option<Frame>, DecodeError> {
            loop {
                if let Some(f) = self.dec.next_frame()? {
                    return Ok(Some(f));
                }
                let buf = self.dec.buffer_mut();
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(16 * 1024);
                }
                let n = self.inner.read_buf(buf).await.map_err(DecodeError::Io)?;
                if n == 0 {
                    self.dec.finish()?;
                    return Ok(None);
                }
            }
        }

        /// The wrapped reader.
        pub fn into_inner(self) -> R {
            self.inner
        }
    }

    /// Writes frames to an async byte stream, reusing one encode buffer.
    #[derive(Debug)]
    pub struct AsyncFrameWriter<W> {
        inner: W,
        buf: Vec<u8>,
    }

    impl<W: AsyncWrite + Unpin> AsyncFrameWriter<W> {
        /// Wrap a writer.
        pub fn new(inner: W) -> Self {
            Self {
                inner,
                buf: Vec::with_capacity(4096),
            }
        }

        /// Encode and write one frame, then flush.
        pub async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
            self.buf.clear();
            encode_frame_into(frame, &mut self.buf)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            self.inner.write_all(&self.buf).await?;
            self.inner.flush().await?;
            if self.buf.capacity() > 64 * 1024 {
                self.buf = Vec::with_capacity(4096);
            }
            Ok(())
        }

        /// The wrapped writer.
        pub fn into_inner(self) -> W {
            self.inner
        }
    }
}
#[cfg(feature = "tokio")]
pub use async_io::{AsyncFrameReader, AsyncFrameWriter};
