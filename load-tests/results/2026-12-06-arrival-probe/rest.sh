#!/bin/bash
# usage: [MODELS=dir] [PERF=1] rest.sh BIN C OUT : pinned server (CPU 0, one HTTP worker), closed-loop 1-row mlp JSON at concurrency C from CPU 1, 10 s
BIN=$1; C=$2; OUT=$3
cd /work/main  # edit for your checkout
taskset -c 0 $BIN serve --port 18316 --grpc-port off --http-workers 1 --models ${MODELS:-models} > /tmp/q-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18316/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen rest --url http://127.0.0.1:18316 --model mlp --concurrency $C --duration-secs 10 --warmup-secs 1 --client-threads 1 > /tmp/q-load.log 2>&1 &
LA=$!
sleep 4
c1=$(awk '{print $14+$15}' /proc/$SP/stat); t1=$(date +%s.%N); x1=$(cat /proc/$SP/task/*/status | awk '/ctxt_switches/ {s+=$2} END {print s}')
r1=$(curl -s localhost:18316/metrics | grep -E '^streamserve_requests_total\{' | awk '{s+=$2} END {print s}')
if [ "${PERF:-1}" = 1 ]; then perf record -F ${FREQ:-499} -g --call-graph dwarf,16384 -o $OUT.data -p $SP -- sleep 4 2>/dev/null >/dev/null; else sleep 4; fi
c2=$(awk '{print $14+$15}' /proc/$SP/stat); t2=$(date +%s.%N); x2=$(cat /proc/$SP/task/*/status | awk '/ctxt_switches/ {s+=$2} END {print s}')
r2=$(curl -s localhost:18316/metrics | grep -E '^streamserve_requests_total\{' | awk '{s+=$2} END {print s}')
wait $LA
kill $SP; wait $SP 2>/dev/null
python3 -c "
cpu=($c2-$c1)/100; wall=$t2-$t1; n=$r2-$r1
print(f'req/s {n/wall:.0f}  cores {cpu/wall:.2f}  cpu/request {cpu/n*1e6:.1f} us  context switches per request {($x2-$x1)/n:.2f}')"
grep -E "throughput|latency" /tmp/q-load.log | head -3
