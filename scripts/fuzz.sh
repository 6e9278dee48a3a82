#!/usr/bin/env bash
# Fuzzes streamserve's parsers with the cargo-fuzz targets in fuzz/ (fuzz/README.md):
#     bash scripts/fuzz.sh [--dev] [SECONDS] [TARGET...]
# Each target runs SECONDS (default 5) from the committed corpus and reproducers. --dev builds
# without optimisation (scripts/test.sh's 5 s smoke run): the build takes ~270 s instead of
# ~450 s on 2 cores, and each run makes fewer executions, which 5 s of fuzzing can spare;
# long runs want the default optimised build. New inputs go to a scratch directory, not into the committed corpus; a crash
# stops the run, prints the failure, and leaves the reproducer in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
profile=()
if [[ ${1:-} == --dev ]]; then
    profile=(--dev)
    shift
fi
seconds=${1:-5}
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(kserve_json kserve_binary tensor_bytes ws_message ws_audio wav)
fi
# cargo-fuzz passes rustc flags that only nightly accepts; this stable toolchain takes them so.
export RUSTC_BOOTSTRAP=1
# No sanitizer: the parsers are safe Rust, and without ASan both the build and the runs are
# several times faster. Allocation sizes are checked by the harness itself (fuzz/harness.rs).
cargo fuzz build -s none "${profile[@]}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    inputs=("corpus/$target")
    [[ -d "regressions/$target" ]] && inputs+=("regressions/$target")
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    if ! cargo fuzz run -s none "${profile[@]}" "$target" "$scratch/$target" "${inputs[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz: $target failed; reproducer in fuzz/artifacts/$target/ (fix the parser and commit it under fuzz/regressions/$target/)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    new=$(sed -n 's/^stat::new_units_added: *//p' "$log")
    echo "fuzz: $target ok, $runs runs in ${seconds}s, $new new inputs"
done
