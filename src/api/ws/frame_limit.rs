//! The frame size limit, enforced on a frame's header rather than on the whole frame.
//!
//! actix-ws's own `max_frame_size` is checked by actix-http's frame parser only once the
//! whole frame has arrived, so a header declaring 2^40 bytes made the server buffer whatever
//! followed, without bound. [`FrameLimit`] sits between the connection's bytes and actix-ws: it
//! follows the client's frame headers (the 2-byte head, a 2- or 8-byte extended length, the
//! 4-byte mask key) across reads, skips each payload, and ends the stream with an error, before
//! passing on any of the frame, as soon as a header declares more than the limit. The
//! connection then closes with 1009 ([`frame_too_large`] finds the error); the bytes it stopped
//! reading wait in the socket (TCP pushes back on the client) until the connection closes.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use actix_ws::ProtocolError;
use bytes::Bytes;
use futures_util::Stream;

/// The longest frame header: 2 bytes, an 8-byte extended length and a 4-byte mask key.
const MAX_HEADER: usize = 14;

/// A frame whose header declares more than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTooLarge {
    /// The payload length the frame's header declares.
    pub declared: u64,
    pub limit: usize,
}

impl fmt::Display for FrameTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "frame larger than {} bytes (its header declares {} bytes)",
            self.limit, self.declared
        )
    }
}

impl std::error::Error for FrameTooLarge {}

/// The oversized frame behind an error from actix-ws's message stream, if that is what it is
/// (actix-ws wraps a payload error in an I/O error).
pub fn frame_too_large(error: &ProtocolError) -> Option<FrameTooLarge> {
    let ProtocolError::Io(error) = error else {
        return None;
    };
    match error.get_ref()?.downcast_ref::<PayloadError>()? {
        PayloadError::Io(inner) => inner.get_ref()?.downcast_ref::<FrameTooLarge>().copied(),
        _ => None,
    }
}

/// The guard as the stream of bytes actix-web's payloads are made of.
pub fn boxed<S>(guard: FrameLimit<S>) -> Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin + 'static,
{
    Box::pin(guard)
}

/// Where the guard is in the client's frames.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// In a frame header, with `len` of its bytes seen.
    Header { bytes: [u8; MAX_HEADER], len: usize },
    /// In a frame's payload, with this many bytes of it still to come.
    Payload(u64),
    /// A frame over the limit was refused: nothing more is read.
    Refused,
}

impl Position {
    fn header() -> Position {
        Position::Header {
            bytes: [0; MAX_HEADER],
            len: 0,
        }
    }
}

/// The client's bytes, passed through unchanged while every frame header declares at most
/// `limit` bytes.
pub struct FrameLimit<S> {
    inner: S,
    limit: usize,
    position: Position,
}

impl<S> FrameLimit<S> {
    pub fn new(inner: S, limit: usize) -> FrameLimit<S> {
        FrameLimit {
            inner,
            limit,
            position: Position::header(),
        }
    }

    /// Follows the frames through `chunk`; the first header that declares too much, if any.
    fn follow(&mut self, chunk: &[u8]) -> Result<(), FrameTooLarge> {
        let mut at = 0;
        while at < chunk.len() {
            match &mut self.position {
                Position::Refused => return Ok(()),
                Position::Payload(left) => {
                    let take = (*left).min((chunk.len() - at) as u64);
                    *left -= take;
                    at += take as usize;
                    if *left == 0 {
                        self.position = Position::header();
                    }
                }
                Position::Header { bytes, len } => {
                    bytes[*len] = chunk[at];
                    *len += 1;
                    at += 1;
                    let Some(declared) = declared_length(&bytes[..*len]) else {
                        continue;
                    };
                    if declared > self.limit as u64 {
                        self.position = Position::Refused;
                        return Err(FrameTooLarge {
                            declared,
                            limit: self.limit,
                        });
                    }
                    self.position = if declared == 0 {
                        Position::header()
                    } else {
                        Position::Payload(declared)
                    };
                }
            }
        }
        Ok(())
    }
}

/// The payload length a complete frame header declares; `None` while `header` is not yet all
/// of it.
fn declared_length(header: &[u8]) -> Option<u64> {
    if header.len() < 2 {
        return None;
    }
    let (extended, short) = match header[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let mask = if header[1] & 0x80 != 0 { 4 } else { 0 };
    if header.len() < 2 + extended + mask {
        return None;
    }
    Some(short.unwrap_or_else(|| {
        header[2..2 + extended]
            .iter()
            .fold(0u64, |n, &byte| n << 8 | u64::from(byte))
    }))
}

impl<S> Stream for FrameLimit<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if matches!(this.position, Position::Refused) {
            return Poll::Ready(None);
        }
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            if let Err(too_large) = this.follow(chunk) {
                // The frames before it in this read are not passed on either: the
                // connection closes.
                return Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    too_large,
                )))));
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    const LIMIT: usize = 64 * 1024;

    /// A masked client frame header declaring `len` bytes, in its shortest form.
    fn header(opcode: u8, len: u64) -> Vec<u8> {
        let mut h = vec![0x80 | opcode];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else if len <= u64::from(u16::MAX) {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(opcode, len as u64);
        f.extend(std::iter::repeat_n(7u8, len));
        f
    }

    /// What the guard makes of `bytes` cut into chunks of `cut` bytes: the bytes passed on,
    /// and the error it ended with.
    async fn guarded(bytes: &[u8], cut: usize) -> (Vec<u8>, Option<FrameTooLarge>) {
        let chunks: Vec<Result<Bytes, PayloadError>> = bytes
            .chunks(cut)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut guard = FrameLimit::new(futures_util::stream::iter(chunks), LIMIT);
        let mut passed = Vec::new();
        while let Some(next) = guard.next().await {
            match next {
                Ok(chunk) => passed.extend_from_slice(&chunk),
                Err(PayloadError::Io(e)) => {
                    let error = ProtocolError::Io(io::Error::other(PayloadError::Io(e)));
                    let found = frame_too_large(&error).expect("a frame too large");
                    assert!(guard.next().await.is_none(), "nothing after the error");
                    return (passed, Some(found));
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        (passed, None)
    }

    #[tokio::test]
    async fn frames_within_the_limit_pass_unchanged_however_they_are_cut() {
        let mut bytes = Vec::new();
        for (opcode, len) in [
            (1, 20),
            (2, 125),
            (2, 126),
            (2, 65535),
            (9, 0),
            (2, LIMIT),
            (0, 3),
        ] {
            bytes.extend(frame(opcode, len));
        }
        for cut in [1, 2, 3, 5, 13, 14, 1000, bytes.len()] {
            assert_eq!(
                guarded(&bytes, cut).await,
                (bytes.clone(), None),
                "cut {cut}"
            );
        }
    }

    #[tokio::test]
    async fn a_header_over_the_limit_ends_the_stream_before_its_payload() {
        for (declared, cut) in [
            (LIMIT as u64 + 1, 1),
            (70_000, 3),
            (1 << 40, 5),
            (u64::MAX, 14),
        ] {
            let mut bytes = frame(2, 100);
            bytes.extend(header(2, declared));
            bytes.extend_from_slice(b"some of the payload");
            let (passed, error) = guarded(&bytes, cut).await;
            assert_eq!(
                error,
                Some(FrameTooLarge {
                    declared,
                    limit: LIMIT
                })
            );
            // At most the bytes before the chunk that completed the header went through.
            assert!(
                passed.len() < 100 + 6 + 14,
                "{declared}: {} passed",
                passed.len()
            );
        }
    }

    #[test]
    fn the_error_says_the_limit_and_what_was_declared() {
        let error = FrameTooLarge {
            declared: 1 << 40,
            limit: LIMIT,
        };
        assert_eq!(
            error.to_string(),
            "frame larger than 65536 bytes (its header declares 1099511627776 bytes)"
        );
        assert_eq!(frame_too_large(&ProtocolError::Overflow), None);
    }
}
