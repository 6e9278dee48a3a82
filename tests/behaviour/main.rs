//! The integration tests that assert on answers, status codes, files and logs, but never on
//! `/metrics`: one test binary for all of them.
//!
//! Why one binary: every integration test binary links the whole server and compiles its own
//! copy of the client code it calls (reqwest, tonic, WebSocket), about 10 s of CI's two cores
//! each, so 24 files as 24 binaries cost CI minutes of its 30. Why not every test file: the
//! metrics recorder is process-wide (the `metrics` crate's global), so a test that reads a
//! counter or gauge for `mlp` would see every other server in the process serving `mlp`. Those
//! files keep a binary each (tests/*.rs). A file moved here must not read `/metrics`, and
//! anything process-wide it touches (environment variables, the shared bundled server) must
//! be safe beside the others: tests of different modules run at the same time.

#[path = "../common/mod.rs"]
mod common;

mod access_log;
mod architecture;
mod bad_input_admin;
mod bad_input_ws;
mod batching;
mod cli;
mod config_file;
mod deploy;
mod documented_jobs_access;
mod documented_limits;
mod documented_operations;
mod documented_registry;
mod documented_rest;
mod documented_streams;
mod fuzz_corpus;
mod grpc_sequences;
mod grpc_speech;
mod grpc_tls;
mod idle_unload;
mod jobs;
mod jobs_dir;
mod jobs_edges;
mod jobs_retention;
mod kserve;
mod registry;
mod registry_edges;
mod registry_hardening;
mod repository;
mod rollout_in_flight;
mod status_page;
mod stream_ends;
mod stream_fleet;
mod stream_limits;
mod stream_pipeline_edges;
mod stream_resume_edges;
mod stream_retire;
mod stream_rollout;
mod stream_summary_resume;
