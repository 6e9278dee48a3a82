#!/usr/bin/env bash
# The one command that runs the whole test suite:
#     bash scripts/test.sh
# Unit and integration tests (real server on 127.0.0.1:0, real ONNX models, real HTTP),
# Triton's own Python HTTP client against the real binary, a check that the generated
# models rebuild byte for byte, a few seconds of fuzzing per parser, and a short smoke run of
# the load generator. The fleet tests need a real S3-compatible server (moto, from PyPI) and
# a real load balancer (haproxy, from Debian): `setup.sh --fleet` installs both. The
# monitoring tests need Prometheus and Chromium (from Debian): `setup.sh --observe`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev --fleet --observe

echo "== models: manifest hashes and reproducibility"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python scripts/make_models.py --out "$tmp" >/dev/null
for f in mlp mlp_small typed_ops vad_energy mlp_slow; do
    cmp "$tmp/$f/1/model.onnx" "models/$f/1/model.onnx" || { echo "models/$f does not rebuild byte for byte" >&2; exit 1; }
done

echo "== cargo test"
# From clean, the builds below write about 7 GB (target/ 4.3 GB, fuzz/target 2.4 GB, measured
# 2026-12-06). A linker that runs out of disk dies with "Bus error", which names no disk, so
# say so first.
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [[ -n "$free_kb" ]] && (( free_kb < 8 * 1024 * 1024 )); then
    echo "warning: $((free_kb / 1024)) MiB free here; a clean build needs about 7 GiB (a linker short of disk fails with 'Bus error')" >&2
fi
# --workspace in both: the same packages resolve the same dependency features, so the test
# run reuses this build (without it, load-tests' features rebuilt ort, object_store and
# streamserve itself, ~6 of CI's minutes).
cargo build --release --locked --workspace --all-targets
cargo test --release --locked --workspace

echo "== fuzz: each parser's target for a few seconds (fuzz/README.md runs them longer)"
bash scripts/fuzz.sh --dev 5

echo "== Python clients against the real binary"
./target/release/streamserve check-models
.venv/bin/python -m pytest -q tests/python
