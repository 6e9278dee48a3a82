#!/usr/bin/env bash
# The one command that starts streamserve on the bundled models:
#     bash scripts/run.sh [serve flags...]      e.g. --port 9000
# Installs ONNX Runtime into .venv, builds the release binary, and serves on :8080.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --bin streamserve
exec ./target/release/streamserve serve "$@"
