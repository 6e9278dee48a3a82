//! The deployment files (`Dockerfile`, `.dockerignore`, `fly.toml`, `fly.gpu.toml`) checked
//! against each other, against the server's own defaults and manifest, and against the real
//! binary: the image's command line and environment are read from the Dockerfile and the binary
//! is started exactly so (with a free port on loopback and the repository's models instead of
//! /app/models), answers fly's health check, logs JSON, and exits 0 on SIGTERM within fly's
//! kill_timeout. No container engine is needed: the image's instructions are parsed, not built.

mod dockerfile;
mod fly;
mod image;
mod run;

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(name: &str) -> String {
    std::fs::read_to_string(repo().join(name)).unwrap_or_else(|e| panic!("cannot read {name}: {e}"))
}
