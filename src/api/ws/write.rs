//! The writing side of a stream connection: the session's messages, the answers to the
//! client's pings, and the close. Every write has a deadline ([`WRITE_TIMEOUT`]): a client
//! that takes nothing for that long is not reading, and the writer gives up on it at once,
//! without a close it could not deliver, which ends the connection (`connection` in mod.rs
//! stops reading it and lets the socket go).

use std::future::Future;
use std::time::Duration;

use actix_ws::{CloseCode, CloseReason};
use bytes::Bytes;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};

use super::open::EndedReplay;
use crate::machine::traffic::{self, Protocol};
use crate::stream::protocol::ServerMessage;

/// How long one write may wait for the client to take what was sent before it.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings the reader has passed on and the writer not yet answered. A client that sends pings
/// faster than it reads the pongs gets no answer to those past these (RFC 6455 lets a server
/// answer only the latest ping), and the reader never waits on the writer.
pub(super) const PONGS_QUEUED: usize = 8;

/// What the writer sends, from where.
pub(super) struct Outgoing {
    /// The session's messages.
    pub messages: mpsc::Receiver<ByteString>,
    /// Why the session let go of the connection, if it did (a normal end, a newer connection,
    /// a client not reading its results, a shutdown).
    pub session_close: oneshot::Receiver<(CloseCode, String)>,
    /// Why the reader ends the connection; dropped: the client closed or vanished.
    pub reader_close: mpsc::Receiver<(CloseCode, String)>,
    /// The payloads of pings to answer.
    pub pongs: mpsc::Receiver<Bytes>,
}

/// Why a write did not go out.
pub(super) enum Unsent {
    /// The connection is gone.
    Closed,
    /// The client took nothing for [`WRITE_TIMEOUT`].
    Blocked,
}

/// `write`, given [`WRITE_TIMEOUT`] to go out.
pub(super) async fn bounded(
    write: impl Future<Output = Result<(), actix_ws::Closed>>,
) -> Result<(), Unsent> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Unsent::Closed),
        Err(_) => Err(Unsent::Blocked),
    }
}

/// Writes until the connection closes. It returns when it has sent the close frame, when the
/// client stopped reading (nothing more can be sent), or when the reader's side went away
/// without a reason (the client closed or vanished).
pub(super) async fn write_loop(mut ws: actix_ws::Session, out: Outgoing) {
    let Outgoing {
        mut messages,
        mut session_close,
        mut reader_close,
        mut pongs,
    } = out;
    // Whether the last message sent was an `error` (the session says why it fails a stream).
    let mut explained = false;
    let (code, reason) = loop {
        let sent = tokio::select! {
            biased;
            // The reader's reason first: it detaches from the session right after, which
            // closes `messages`, and the close must say why rather than "stream closed".
            close = reader_close.recv() => match close {
                Some(close) => {
                    explained = false;
                    break close;
                }
                None => return,
            },
            close = &mut session_close => {
                // The session let go of this connection (it queues its last messages first,
                // then says why): send what it queued (e.g. the summary, or the results a
                // client not reading has not taken yet).
                while let Ok(text) = messages.try_recv() {
                    explained = is_error(&text);
                    if let Err(unsent) = bounded(send_text(&mut ws, text)).await {
                        return gave_up(unsent);
                    }
                }
                break close.unwrap_or_else(|_| stream_closed());
            }
            message = messages.recv() => match message {
                Some(text) => {
                    explained = is_error(&text);
                    bounded(send_text(&mut ws, text)).await
                }
                // The session let go of this connection; its word why comes with it (relayed:
                // it may come a moment after).
                None => {
                    let close = tokio::time::timeout(WRITE_TIMEOUT, &mut session_close).await;
                    break close.ok().and_then(Result::ok).unwrap_or_else(stream_closed);
                }
            },
            Some(bytes) = pongs.recv() => bounded(pong(&mut ws, &bytes)).await,
        };
        if let Err(unsent) = sent {
            return gave_up(unsent);
        }
    };
    close(ws, code, reason, code != CloseCode::Normal && !explained).await;
}

/// Whether a message of the session's is an `error` (serde writes the tag first).
fn is_error(text: &str) -> bool {
    text.starts_with(r#"{"type":"error""#)
}

fn stream_closed() -> (CloseCode, String) {
    (CloseCode::Away, "stream closed".into())
}

/// A write that could not go out: the connection is over; one the client did not take is
/// counted as a client not reading.
fn gave_up(unsent: Unsent) {
    if let Unsent::Blocked = unsent {
        metrics::counter!("streamserve_stream_drops_total", "reason" => "write_timeout")
            .increment(1);
        tracing::warn!(
            "client took nothing for {} s; dropping its connection",
            WRITE_TIMEOUT.as_secs()
        );
    }
}

/// Answers a resume of a stream that ended here: `started`, what the client missed (its
/// summary last), then the close 1000, as the stream's own connection would have; each write
/// with its deadline. Counted and logged as a resume.
pub(super) async fn replay_ended(mut ws: actix_ws::Session, replay: EndedReplay) {
    replay.count_resume();
    for text in std::iter::once(replay.started).chain(replay.missed) {
        if let Err(unsent) = bounded(send_text(&mut ws, text)).await {
            return gave_up(unsent);
        }
    }
    close(ws, CloseCode::Normal, "stream ended".into(), false).await;
}

/// Closes with `code`, after an `error` message saying `reason` unless the stream ended
/// normally.
pub(super) async fn close_with_error(ws: actix_ws::Session, code: CloseCode, reason: String) {
    close(ws, code, reason, code != CloseCode::Normal).await;
}

/// Closes with `code`, after an `error` message if `explain`; each write with its deadline
/// (a client that does not take the message gets no close frame either).
async fn close(mut ws: actix_ws::Session, code: CloseCode, reason: String, explain: bool) {
    if explain {
        let error = ServerMessage::Error {
            code: error_code(code),
            message: &reason,
        }
        .to_json();
        if let Err(unsent) = bounded(send_text(&mut ws, error)).await {
            return gave_up(unsent);
        }
    }
    let close = ws.close(Some(CloseReason {
        code,
        description: Some(truncate(reason)),
    }));
    if let Err(unsent) = bounded(close).await {
        gave_up(unsent);
    }
}

/// Sends a text message, counting its payload (`streamserve_sent_bytes_total`).
async fn send_text(
    ws: &mut actix_ws::Session,
    text: impl Into<ByteString>,
) -> Result<(), actix_ws::Closed> {
    let text = text.into();
    traffic::sent(Protocol::WebSocket, text.len());
    ws.text(text).await
}

/// Answers a ping, counting the pong's payload.
pub(super) async fn pong(ws: &mut actix_ws::Session, bytes: &[u8]) -> Result<(), actix_ws::Closed> {
    traffic::sent(Protocol::WebSocket, bytes.len());
    ws.pong(bytes).await
}

fn error_code(code: CloseCode) -> &'static str {
    match code {
        CloseCode::Invalid => "invalid_data",
        CloseCode::Unsupported => "unsupported_data",
        CloseCode::Size => "too_large",
        CloseCode::Away => "going_away",
        CloseCode::Protocol => "protocol_error",
        CloseCode::Again => "try_again",
        CloseCode::Error => "inference_failed",
        _ => "policy",
    }
}

/// Close reasons must fit a control frame (123 bytes).
fn truncate(mut reason: String) -> String {
    if reason.len() > 120 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_message_is_told_by_its_tag() {
        let error = ServerMessage::Error {
            code: "inference_failed",
            message: "boom",
        };
        assert!(is_error(&error.to_json()));
        assert!(!is_error(
            r#"{"type":"vad","seq":0,"t":0.0,"probability":0.1}"#
        ));
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("é".repeat(70)).len(), 120);
        assert_eq!(truncate("short".into()), "short");
    }
}
