//! libFuzzer entry point for `harness::kserve_json` (the checks are there, shared with the plain
//! `cargo test` in tests/behaviour/fuzz_corpus.rs).
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::kserve_json(data));
