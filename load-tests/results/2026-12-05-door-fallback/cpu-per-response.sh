#!/bin/bash
# Server CPU per response, pinned: streamserve on CPU 0 (one HTTP worker, static door of
# MAXINFLIGHT places, 0: none), `loadgen rest` on CPU 1 in closed loop (CONC connections,
# default 32; MODEL, default mlp) for 5 s; the server's CPU ticks from /proc over its
# /metrics count of answers and 429s. With "perf", a profile of 4 s into /tmp/perf.data.
# Usage: cpu-per-response.sh BIN MAXINFLIGHT [perf]
set -u
cd "$(dirname "$0")/../../.."
BIN=$1; MI=$2; PERF=${3:-}
LG=target/release/loadgen
PORT=18097
taskset -c 0 "$BIN" serve --port $PORT --grpc-port off --http-workers 1 --admission static --max-inflight $MI > /dev/null 2>&1 &
for i in $(seq 100); do curl -sf localhost:$PORT/v2/health/ready >/dev/null && break; sleep 0.2; done
SP=$(pgrep -f "serve --port $PORT" | head -1)
cpu() { awk '{print $14+$15}' /proc/$SP/stat; }
cnt() { curl -s localhost:$PORT/metrics | grep -E '^streamserve_requests_total' | awk '{s+=$2} END {print s}'; }
c0=$(cpu); n0=$(cnt)
PP=; if [ -n "$PERF" ]; then perf record -F 999 -g -p $SP -o /tmp/perf.data -- sleep 4 >/dev/null 2>&1 & PP=$!; fi
taskset -c 1 $LG rest --url http://127.0.0.1:$PORT --model ${MODEL:-mlp} --concurrency ${CONC:-32} --duration-secs 5 --warmup-secs 0 --client-threads 1 --quiet 2>&1 | grep -E "^(throughput|latency ms|error  )"
c1=$(cpu); n1=$(cnt)
[ -n "$PP" ] && wait $PP
curl -s localhost:$PORT/metrics | grep -E '^streamserve_(requests_total|shed_total)' | head
echo "cpu ticks $((c1-c0)) responses $((n1-n0)) us/response $(( (c1-c0)*10000*1000/(n1-n0) / 1000 ))"
kill $SP; sleep 0.5
