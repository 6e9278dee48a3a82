#!/bin/bash
# BIN: the streamserve binary (env); MODELS dir "models" for the bundled manifest. Run from anywhere; cds to /work/main (edit for your checkout).
# usage: rest.sh MODELS C : pinned server, closed loop c=C mlp JSON 8 s
M=$1; C=$2
cd /work/main
$BIN serve --port 18315 --grpc-port off --models $M > /tmp/r-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18315/v2/health/ready >/dev/null && break; sleep 0.2; done
./target/release/loadgen rest --url http://127.0.0.1:18315 --model mlp --concurrency $C --duration-secs 8 --warmup-secs 1 --client-threads 2 --quiet > /tmp/r-load.log 2>&1
curl -s localhost:18315/metrics | grep -E '^streamserve_batch_size_(sum|count)\{model="mlp"' | awk '{print $2}' | tr '\n' ' '
kill $SP; wait $SP 2>/dev/null
grep -iE "throughput|latency|req/s|p99" /tmp/r-load.log | head -4
