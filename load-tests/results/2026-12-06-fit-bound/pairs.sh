#!/bin/bash
# usage: pairs.sh BEFORE_BIN AFTER_BIN N [DIR] : N alternating pairs of the pinned overload
# scenario (before/after, after/before, ...), each into DIR/overload-{before,after}-K/ (DIR:
# this folder; on-5a52397/ for the runs on that build). Run from the repository root with the
# workspace built (target/release/loadgen).
set -e
B=$1; A=$2; N=$3
DIR=${4:-$(dirname "$0")}
run() { ./target/release/loadgen overload --pin --admission adaptive --server-bin "$1" \
  --client-threads 1 --capacity-concurrency 128 --capacity-secs 5 --warmup-secs 1 \
  --duration-secs 6 --max-in-flight 2048 --quiet-wait-secs 20 --out "$DIR/$2" > "$DIR/$2.log" 2>&1; }
for k in $(seq 1 "$N"); do
  if (( k % 2 )); then run "$B" overload-before-$k; run "$A" overload-after-$k
  else run "$A" overload-after-$k; run "$B" overload-before-$k; fi
done
