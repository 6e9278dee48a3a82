//! Speech streaming: the WebSocket protocol's messages, audio decoding, the engine that steps
//! a stream through its declared stages (`pipeline`), and what turns the last stage's output
//! into events: the voice activity tracker (speech start/end) and the keyword detector.
//! The actors that run streams are `actors::stream_session` and `actors::stream_hub`.

pub mod audio;
pub mod checkpoint;
pub mod gate;
pub mod idle;
pub mod keyword;
pub mod layout;
pub mod pace;
pub mod pipeline;
pub mod protocol;
pub mod resume;
pub mod vad;
