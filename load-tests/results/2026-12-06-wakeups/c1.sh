#!/bin/bash
# usage: MODE=free|server0 c1.sh : streamserve with its default flags on the bundled models; MODE=server0 puts all its
# threads on CPU 0 once it is ready, and loadgen on CPU 1. Closed loop, 1-row mlp JSON, concurrency 1, 8 s; prints the
# server's CPU per request and context switches per request over 5 s of it, and the client's latency. Edit the cd.
cd /work/main
./target/release/streamserve serve --port 18319 --grpc-port off --models models ${ARGS} > /tmp/c1-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18319/v2/health/ready >/dev/null && break; sleep 0.2; done
LG=""
if [ "$MODE" = server0 ]; then taskset -a -pc 0 $SP > /dev/null; LG="taskset -c 1"; fi
$LG ./target/release/loadgen rest --url http://127.0.0.1:18319 --concurrency 1 --duration-secs 8 --client-threads 1 --quiet ${LARGS} > /tmp/c1-load.log 2>&1 &
LA=$!
sleep 3
c1=$(awk '{print $14+$15}' /proc/$SP/stat); x1=$(cat /proc/$SP/task/*/status | awk '/^nonvoluntary_ctxt|^voluntary_ctxt/ {s+=$2} END {print s}')
r1=$(curl -s localhost:18319/metrics | grep -E '^streamserve_requests_total\{' | awk '{s+=$2} END {print s}')
sleep 5
c2=$(awk '{print $14+$15}' /proc/$SP/stat); x2=$(cat /proc/$SP/task/*/status | awk '/^nonvoluntary_ctxt|^voluntary_ctxt/ {s+=$2} END {print s}')
r2=$(curl -s localhost:18319/metrics | grep -E '^streamserve_requests_total\{' | awk '{s+=$2} END {print s}')
wait $LA; kill $SP; wait $SP 2>/dev/null
python3 -c "n=$r2-$r1; print(f'$MODE cpu/request {($c2-$c1)/100/n*1e6:.0f} us  cs/request {($x2-$x1)/n:.2f}')"
grep -E "latency ms|server " /tmp/c1-load.log
