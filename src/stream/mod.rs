//! Speech streaming: the WebSocket protocol's messages, audio decoding, and the voice
//! activity tracker that turns per-chunk speech probabilities into speech start/end events.
//! The actors that run streams are `actors::stream_session` and `actors::stream_hub`.

pub mod audio;
pub mod checkpoint;
pub mod protocol;
pub mod vad;
