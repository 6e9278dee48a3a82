#!/bin/bash
# usage: [MODELS=dir] two.sh BIN OUTDIR NA NB : pinned server (CPU 0, one HTTP worker), NA real-time silero_vad
# streams over 4 s, NB more 8 s later (loadgen on CPU 1)
BIN=$1; OUT=$2; NA=$3; NB=$4
mkdir -p $OUT
cd /work/main
taskset -c 0 $BIN serve --port 18311 --grpc-port off --http-workers 1 --models ${MODELS:-models} > $OUT/server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18311/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18311 --model silero_vad --streams $NA --duration-secs 16 --ramp-secs 4 --client-threads 1 --quiet > $OUT/a.log 2>&1 &
LA=$!
sleep 8
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18311 --model silero_vad --streams $NB --duration-secs 8 --ramp-secs 4 --client-threads 1 --quiet > $OUT/b.log 2>&1 &
LB=$!
wait $LA $LB
curl -s localhost:18311/metrics > $OUT/metrics.txt
kill $SP; wait $SP 2>/dev/null
grep -E "^streamserve_(streams_refused_behind_total|stream_behind_chunks_total.*silero|stream_chunks_total.*silero|stream_degraded_chunks_total.*silero)" $OUT/metrics.txt
for g in a b; do echo "-- group $g"; grep -E "streams  |latency ms|errors" $OUT/$g.log; done
