#!/bin/bash
# usage: [MODELS=dir] [LOADARGS="more loadgen streams arguments"] [MODEL=silero_vad] [PERF=1] [FREQ=999] prof.sh BIN N OUT : pinned server (CPU 0, one HTTP worker), N real-time streams from CPU 1 (loadgen streams); over 5 s of a 12 s run, perf record into OUT.data (PERF=0: none), and prints the server's cores, chunks/s, batch and CPU per chunk (with perf running, that CPU includes perf's). Run from anywhere; cds to /work/main (edit for your checkout).
BIN=$1; N=$2; OUT=$3
cd /work/main
taskset -c 0 $BIN serve --port 18314 --grpc-port off --http-workers 1 --models ${MODELS:-models} > /tmp/p-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18314/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18314 --model ${MODEL:-silero_vad} --streams $N --duration-secs 12 --ramp-secs 3 --client-threads 1 --quiet ${LOADARGS} > /tmp/p-load.log 2>&1 &
LA=$!
sleep 5
c1=$(awk '{print $14+$15}' /proc/$SP/stat); t1=$(date +%s.%N)
m1=$(curl -s localhost:18314/metrics | grep -E "^streamserve_batch_size_(sum|count)\{model=.${MODEL:-silero_vad}." | awk '{print $2}' | tr '\n' ' ')
if [ "${PERF:-1}" = 1 ]; then perf record -F ${FREQ:-999} -g --call-graph dwarf,16384 -o $OUT.data -p $SP -- sleep 5 2>/dev/null >/dev/null; else sleep 5; fi
c2=$(awk '{print $14+$15}' /proc/$SP/stat); t2=$(date +%s.%N)
m2=$(curl -s localhost:18314/metrics | grep -E "^streamserve_batch_size_(sum|count)\{model=.${MODEL:-silero_vad}." | awk '{print $2}' | tr '\n' ' ')
curl -s localhost:18314/metrics | grep -E '^streamserve_stream_(degraded_chunks|chunks|behind_chunks)_total' | awk '{s[$1]=$2} END {for (k in s) printf "%s %s\n", k, s[k]}' | sed 's/{.*}//' | sort | tr '\n' ' '; echo
wait $LA
kill $SP; wait $SP 2>/dev/null
python3 -c "
b1='$m1'.split(); b2='$m2'.split()
rows=float(b2[0])-float(b1[0]); calls=float(b2[1])-float(b1[1]); cpu=($c2-$c1)/100; wall=$t2-$t1
print(f'N=$N cores {cpu/wall:.2f}  chunks/s {rows/wall:.0f}  batch {rows/calls:.1f}  cpu/chunk {cpu/rows*1e6:.0f} us')"
grep -E "latency ms|errors" /tmp/p-load.log
