#!/bin/bash
# BIN: the streamserve binary (env); MODELS dir "models" for the bundled manifest. Run from anywhere; cds to /work/main (edit for your checkout).
# usage: delay.sh MODELS N : pinned server, N streams ramp 4 s; per-thread CPU over 4 s at steady state, batch size
M=$1; N=$2
cd /work/main
taskset -c 0 $BIN serve --port 18314 --grpc-port off --http-workers 1 --models $M > /tmp/d-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18314/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18314 --model silero_vad --streams $N --duration-secs 10 --ramp-secs 4 --client-threads 1 --quiet > /tmp/d-load.log 2>&1 &
LA=$!
sleep 6
b1=$(curl -s localhost:18314/metrics | grep -E '^streamserve_batch_size_(sum|count)\{model="silero_vad"' | awk '{print $2}' | tr '\n' ' ')
c1=$(awk '{print $14+$15}' /proc/$SP/stat); t1=$(date +%s.%N)
sleep 4
b2=$(curl -s localhost:18314/metrics | grep -E '^streamserve_batch_size_(sum|count)\{model="silero_vad"' | awk '{print $2}' | tr '\n' ' ')
c2=$(awk '{print $14+$15}' /proc/$SP/stat); t2=$(date +%s.%N)
wait $LA
kill $SP; wait $SP 2>/dev/null
python3 -c "
b1='$b1'.split(); b2='$b2'.split()
rows=float(b2[0])-float(b1[0]); calls=float(b2[1])-float(b1[1]); cpu=($c2-$c1)/100; wall=$t2-$t1
print(f'N=$N cores {cpu/wall:.2f}  chunks/s {rows/wall:.0f}  batch {rows/calls:.1f}  cpu/chunk {cpu/rows*1e6:.0f} us')"
grep -E "latency ms|errors" /tmp/d-load.log
