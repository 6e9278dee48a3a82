//! What each fuzz target checks, one function per parser, fed bytes the way the server feeds
//! that parser. Shared by the libFuzzer targets (fuzz_targets/) and by tests/behaviour/fuzz_corpus.rs,
//! which runs every committed corpus file and crash reproducer through the same functions in
//! the plain `cargo test`.
//!
//! Every function holds for any input: the parser returns an error or a result, never panics,
//! and a result is no bigger than the bytes it came from can account for (an attacker declares
//! sizes; only bytes actually sent may cost memory).
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use streamserve::api::kserve;
use streamserve::manifest::{audio_window, StreamDecl};
use streamserve::stream::audio::{read_wav, SampleFormat};
use streamserve::stream::protocol::ClientMessage;
use streamserve::stream::vad::VadTracker;
use streamserve::tensor::{DataType, TensorData};

/// A KServe v2 JSON request body, as `POST /v2/models/{model}/infer` gets it without
/// `Inference-Header-Content-Length`.
pub fn kserve_json(data: &[u8]) {
    if let Ok(request) = bounded(data.len(), || kserve::decode(data, None)) {
        check_decoded(&request, data.len());
    }
}

/// A request with the binary tensor data extension. Input layout: 4 bytes little-endian, the
/// `Inference-Header-Content-Length` value (the JSON part's length), then the whole body.
pub fn kserve_binary(data: &[u8]) {
    let Some((header, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let json_length = u32::from_le_bytes(*header) as usize;
    if let Ok(request) = bounded(data.len(), || kserve::decode(body, Some(json_length))) {
        check_decoded(&request, body.len());
    }
}

fn check_decoded(request: &kserve::DecodedRequest, body_len: usize) {
    // Each element, JSON or binary, takes at least one byte of the body.
    let elements: usize = request.inputs.iter().map(|i| i.data.len()).sum();
    assert!(
        elements <= body_len,
        "{elements} elements from {body_len} bytes"
    );
    if let Some(outputs) = &request.outputs {
        assert_eq!(outputs.len(), request.binary_outputs.len());
    }
}

/// One tensor's raw little-endian bytes in the binary extension. Input layout: one byte picks
/// the datatype, the rest is the tensor's bytes.
pub fn tensor_bytes(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let datatype = DataType::ALL[pick as usize % DataType::ALL.len()];
    if let Ok(tensor) = bounded(data.len(), || TensorData::from_le_bytes(datatype, bytes)) {
        assert_eq!(tensor.datatype(), datatype);
        assert_eq!(tensor.len() * datatype.element_size(), bytes.len());
        // Decoding loses nothing: the bytes come back exactly (NaN payloads included).
        let mut out = Vec::new();
        tensor.write_le_bytes(&mut out);
        assert_eq!(out, bytes);
    }
}

/// A WebSocket text message: the `start` message, or a control message mid-stream. WebSocket
/// text is UTF-8 (the server's WebSocket layer refuses anything else before parsing), and a
/// start message goes through the checks `StreamSession::new` makes, then drives a VAD tracker
/// with its options to the end of a stream.
pub fn ws_message(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = bounded(data.len(), || serde_json::from_str::<ClientMessage>(text));
    let Ok(ClientMessage::Start(start)) = parsed else {
        return;
    };
    let silero = StreamDecl::silero_vad();
    if !silero.sample_rates.contains(&start.sample_rate) {
        return;
    }
    let Ok((_, window)) = audio_window(&silero.input, start.sample_rate) else {
        return;
    };
    if start.vad.validate().is_err() {
        return;
    }
    let mut tracker = VadTracker::new(&start.vad, start.sample_rate, window);
    let mut events = Vec::new();
    // Speech, silence, speech, then the stream ends mid-speech.
    let pattern = [0.9f32, 0.95, 0.2, 0.0, 0.6, 0.99];
    let mut end = 0u64;
    for (i, &probability) in pattern.iter().cycle().take(600).enumerate() {
        end = (i as u64 + 1) * window as u64;
        tracker.push(end, probability, &mut events);
    }
    tracker.finish(end, &mut events);
    let mut last = 0;
    for segment in &tracker.segments {
        assert!(
            last <= segment.start && segment.start <= segment.end && segment.end <= end,
            "segments out of order or past the audio: {:?}",
            tracker.segments
        );
        last = segment.end;
    }
}

/// A binary audio frame on a stream. Input layout: one byte picks the format (even: pcm16,
/// odd: f32), the rest is the frame.
pub fn ws_audio(data: &[u8]) {
    let Some((&pick, frame)) = data.split_first() else {
        return;
    };
    let format = if pick % 2 == 0 {
        SampleFormat::Pcm16
    } else {
        SampleFormat::F32
    };
    if let Ok(samples) = bounded(data.len(), || format.decode(frame)) {
        assert_eq!(samples.len() * format.bytes_per_sample(), frame.len());
        check_audio(&samples);
    }
}

/// A WAV file, as `POST /v1/models/{model}/segments` gets it.
pub fn wav(data: &[u8]) {
    if let Ok(wav) = bounded(data.len(), || read_wav(data)) {
        assert!(wav.samples.len() <= data.len());
        check_audio(&wav.samples);
    }
}

/// What the model may be fed: finite samples in [-1, 1] (with the decoder's hair of headroom).
fn check_audio(samples: &[f32]) {
    if let Some((i, v)) = samples
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && v.abs() <= 1.001))
    {
        panic!("sample {i} is {v}: not audio in [-1, 1]");
    }
}

thread_local! {
    /// The largest single allocation this thread made since `bounded` last reset it. Const
    /// initialised and without a destructor, so the allocator can touch it without allocating.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting allocation sizes for `bounded`.
struct Tracking;

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is passed on to `System` unchanged; `note` neither allocates nor panics.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs one parse and checks that no single allocation it made is out of proportion to the
/// input: a few times the input (decoded elements are wider than their bytes, and vectors grow
/// by doubling) plus a little. A capacity taken from a declared shape or length, rather than
/// from the bytes present, fails this on a small input. (libFuzzer's own -malloc_limit_mb needs
/// a sanitizer's malloc hooks, which these builds, made with `-s none`, do not have.)
fn bounded<R>(input_len: usize, parse: impl FnOnce() -> R) -> R {
    LARGEST.with(|largest| largest.set(0));
    let result = parse();
    let largest = LARGEST.with(Cell::get);
    assert!(
        largest <= 16 * input_len + (64 << 10),
        "one allocation of {largest} bytes while parsing {input_len} bytes"
    );
    result
}
