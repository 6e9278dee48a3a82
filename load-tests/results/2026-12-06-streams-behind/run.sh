#!/bin/bash
# usage: run.sh BIN OUTDIR N [extra server args]
BIN=$1; OUT=$2; N=$3; shift 3
mkdir -p $OUT
cd /work/main
taskset -c 0 $BIN serve --port 18311 --grpc-port off --http-workers 1 "$@" > $OUT/server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18311/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18311 --model silero_vad --streams $N --duration-secs 10 --ramp-secs 4 --client-threads 1 --quiet > $OUT/loadgen.log 2>&1
curl -s localhost:18311/metrics > $OUT/metrics.txt
kill $SP; wait $SP 2>/dev/null
grep -v "^#" $OUT/metrics.txt | grep -E "stream_degraded|stream_chunks_total|admission_refused|stream_drops|stream_chunk_latency_seconds_(sum|count)|behind" 
tail -25 $OUT/loadgen.log
