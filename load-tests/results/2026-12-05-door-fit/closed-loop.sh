#!/bin/bash
# Closed-loop REST load on a pinned server, adaptive door, at several pool sizes.
# Usage: closed-loop.sh BIN [BIN...]  (each binary in turn, twice, alternating)
# Server: taskset -c 0, one HTTP worker, shipped manifest. Load: loadgen rest on CPU 1.
set -u
cd "$(dirname "$0")/../../.."
LG=target/release/loadgen
PORT=18095
for round in 1 2; do
  for BIN in "$@"; do
    taskset -c 0 "$BIN" serve --port $PORT --grpc-port off --http-workers 1 --admission adaptive >/dev/null 2>&1 &
    SP=$!
    for i in $(seq 100); do curl -sf localhost:$PORT/v2/health/ready >/dev/null && break; sleep 0.2; done
    for c in ${CONCS:-16 64 128}; do
      echo "== round $round, $BIN, concurrency $c"
      taskset -c 1 $LG rest --url http://127.0.0.1:$PORT --model mlp --concurrency $c --duration-secs 4 \
        --warmup-secs 1 --client-threads 1 --quiet 2>&1 | grep -E "^(throughput|latency ms|error  )"
      curl -s localhost:$PORT/metrics | grep -E "^streamserve_admission_(limit|refused_total)"
      sleep 1.2
    done
    kill $SP; wait $SP 2>/dev/null
  done
done
