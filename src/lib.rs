//! streamserve: a serverless-style ONNX inference server built from supervised actors.
//!
//! Where a request goes: `api/rest.rs` decodes and validates it (`api/kserve.rs`,
//! `model.rs`) and calls `actors/served.rs`'s `ServedModel::infer`; the model version's
//! `actors/router/` queues and batches it, an `actors/worker/` thread runs the batch on its
//! model session (`runtime/`), and the worker answers the request directly.
//! `actors/supervisor/` starts it all from `models/models.toml`. The whole map is
//! `docs/architecture.md`.

pub mod access;
pub mod actors;
pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod files;
pub mod jobs;
pub mod machine;
pub mod manifest;
pub mod model;
pub mod monitor;
pub mod registry;
pub mod rules;
pub mod runtime;
pub mod server;
pub mod stream;
pub mod telemetry;
pub mod tensor;
pub mod untrusted;
