//! The WebSocket stream protocol's JSON messages (documented in `docs/streaming.md`).
//!
//! Client → server: a text `start` first, then binary audio frames, then a text `end`.
//! Server → client: `started`, then `vad` results and `speech_start` / `speech_end` events
//! (each with the `seq` of the chunk it belongs to), `summary` after `end`, and `error` before
//! any close for a reason other than a normal end.

use serde::{Deserialize, Serialize};

use super::audio::SampleFormat;
use super::keyword::KeywordOptions;
use super::vad::{Segment, VadOptions};

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Start(StartMessage),
    End,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StartMessage {
    #[serde(default = "default_rate")]
    pub sample_rate: u32,
    #[serde(default)]
    pub format: SampleFormat,
    /// Resume this stream instead of starting a new one.
    #[serde(default)]
    pub stream_id: Option<String>,
    /// With `stream_id` or `resume`: the last `seq` the client received; everything after it
    /// is sent again, nothing before it.
    #[serde(default)]
    pub last_seq: Option<u64>,
    /// Resume from a checkpoint's token, on any instance of the fleet (docs/streaming.md).
    #[serde(default)]
    pub resume: Option<String>,
    /// Ask for checkpoints (resume tokens) every `--stream-checkpoint-ms` of audio, and one
    /// at shutdown: the client then keeps its audio from the last one on.
    #[serde(default)]
    pub checkpoints: bool,
    #[serde(default)]
    pub results: ResultsMode,
    /// Detection settings of a voice activity stream (refused on a keyword stream).
    #[serde(default)]
    pub vad: Given<VadOptions>,
    /// Detection settings of a keyword stream (refused on a voice activity stream).
    #[serde(default)]
    pub keyword: Given<KeywordOptions>,
    /// `false`: the model's gate (if its stream declares one) is left out, and every stage
    /// runs on all the audio. Absent: the gate runs.
    #[serde(default)]
    pub gate: Option<bool>,
}

fn default_rate() -> u32 {
    16000
}

/// Options that read as their defaults when left out, and remember whether the client sent
/// them: those of the other kind of stream are refused, not ignored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Given<T> {
    pub value: T,
    /// The `start` message had them.
    pub given: bool,
}

impl<T> std::ops::Deref for Given<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Given<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(|value| Given { value, given: true })
    }
}

/// Which messages a stream sends while it runs.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResultsMode {
    /// A `vad` message for every chunk, plus events.
    #[default]
    All,
    /// Only `speech_start` / `speech_end` events (and the summary).
    Events,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Started {
        stream_id: &'a str,
        resumed: bool,
        model: &'a str,
        version: &'a str,
        sample_rate: u32,
        format: SampleFormat,
        chunk_samples: usize,
        /// Audio samples the server holds for this stream; a resuming client re-sends from here.
        samples_received: u64,
        /// `seq` of the next result.
        next_seq: u64,
        /// Seconds a dropped connection may take to resume.
        resume_window_secs: u64,
        /// Audio samples between two checkpoints (0: none are sent).
        checkpoint_samples: u64,
        /// Present (true) when a stream was taken over on another model version than its
        /// checkpoint's, from a zero state: every result from the checkpoint's audio on is
        /// computed again by this version and sent, numbered from `next_seq` (after the
        /// client's `last_seq`), so results for audio the client has results for come again.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        fresh_state: bool,
    },
    /// A resume token: the stream as of sample `samples`, results up to `next_seq - 1`. A
    /// client keeps its audio from `samples` on, to send again if it resumes from this token.
    Checkpoint {
        token: &'a str,
        samples: u64,
        next_seq: u64,
        /// The server is shutting down: resume from this token (on another instance).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        handover: bool,
    },
    Vad {
        seq: u64,
        /// Audio time of the chunk's start, in seconds.
        t: f64,
        probability: f32,
        /// Present (true) when the model's fallback computed this chunk.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        degraded: bool,
    },
    SpeechStart {
        seq: u64,
        t: f64,
    },
    SpeechEnd {
        seq: u64,
        t: f64,
    },
    /// A keyword stream's score for the audio up to `t` (seconds).
    Score {
        seq: u64,
        t: f64,
        score: f32,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        degraded: bool,
    },
    /// The phrase was heard in the audio up to `t`.
    Keyword {
        seq: u64,
        t: f64,
        phrase: &'a str,
        score: f32,
    },
    Summary {
        seq: u64,
        duration: f64,
        chunks: u64,
        segments: Vec<SegmentSecs>,
        /// Keyword events of a keyword stream.
        #[serde(skip_serializing_if = "Option::is_none")]
        keywords: Option<u64>,
        /// Segments at the start of a very long stream that a checkpoint could not carry
        /// (more than `stream::checkpoint::MAX_SEGMENTS`): only after a takeover.
        #[serde(skip_serializing_if = "is_zero")]
        segments_omitted: u64,
    },
    Error {
        code: &'a str,
        message: &'a str,
    },
}

/// A [`ServerMessage`] read back, owned, by a transport that re-encodes the session's
/// messages (gRPC sequences and speech calls): the same tags and fields.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SentMessage {
    Started {
        stream_id: String,
        resumed: bool,
        version: String,
        samples_received: u64,
        chunk_samples: u64,
        next_seq: u64,
        #[serde(default)]
        fresh_state: bool,
    },
    Checkpoint {
        token: String,
        samples: u64,
        #[serde(default)]
        handover: bool,
    },
    Vad {
        seq: u64,
        t: f64,
        probability: f32,
        #[serde(default)]
        degraded: bool,
    },
    SpeechStart {
        seq: u64,
        t: f64,
    },
    SpeechEnd {
        seq: u64,
        t: f64,
    },
    Score {
        seq: u64,
        t: f64,
        score: f32,
        #[serde(default)]
        degraded: bool,
    },
    Keyword {
        seq: u64,
        t: f64,
        phrase: String,
        score: f32,
    },
    Summary {
        seq: u64,
        duration: f64,
        chunks: u64,
        segments: Vec<SegmentSecs>,
        #[serde(default)]
        keywords: Option<u64>,
        #[serde(default)]
        segments_omitted: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize, Clone, Copy, PartialEq)]
pub struct SegmentSecs {
    pub start: f64,
    pub end: f64,
}

impl SegmentSecs {
    pub fn from_samples(segment: &Segment, sample_rate: u32) -> SegmentSecs {
        SegmentSecs {
            start: segment.start as f64 / sample_rate as f64,
            end: segment.end as f64 / sample_rate as f64,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_messages_parse_with_defaults_and_reject_typos() {
        let ClientMessage::Start(start) = serde_json::from_str(r#"{"type":"start"}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (start.sample_rate, start.format, start.results),
            (16000, SampleFormat::Pcm16, ResultsMode::All)
        );
        let ClientMessage::Start(start) = serde_json::from_str(
            r#"{"type":"start","sample_rate":8000,"format":"f32","stream_id":"abc","last_seq":7,"results":"events","vad":{"threshold":0.6}}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(start.last_seq, Some(7));
        assert_eq!((start.vad.threshold, start.vad.given), (0.6, true));
        assert!(!start.keyword.given);
        assert!(
            serde_json::from_str::<ClientMessage>(r#"{"type":"start","samplerate":8000}"#).is_err()
        );
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"begin"}"#).is_err());
        assert!(matches!(
            serde_json::from_str(r#"{"type":"end"}"#).unwrap(),
            ClientMessage::End
        ));
    }

    #[test]
    fn server_messages_are_tagged() {
        let json = ServerMessage::SpeechStart { seq: 3, t: 0.25 }.to_json();
        assert_eq!(json, r#"{"type":"speech_start","seq":3,"t":0.25}"#);
    }
}
