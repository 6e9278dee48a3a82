//! libFuzzer entry point for `harness::wav` (the checks are there, shared with the plain
//! `cargo test` in tests/behaviour/fuzz_corpus.rs).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::wav(data));
