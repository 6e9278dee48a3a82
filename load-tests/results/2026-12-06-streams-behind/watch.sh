#!/bin/bash
# usage: watch.sh BIN OUTDIR N DUR [extra server args]
BIN=$1; OUT=$2; N=$3; DUR=$4; shift 4
mkdir -p $OUT
cd /work/main
taskset -c 0 $BIN serve --port 18311 --grpc-port off --http-workers 1 "$@" > $OUT/server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18311/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18311 --model silero_vad --streams $N --duration-secs $DUR --ramp-secs 4 --client-threads 1 --quiet > $OUT/loadgen.log 2>&1 &
LP=$!
p() { curl -s localhost:18311/metrics | awk '/^streamserve_stream_chunks_total\{model="silero/{c=$2} /^streamserve_stream_behind_chunks_total\{model="silero/{b=$2} /^streamserve_stream_chunk_latency_seconds_sum\{model="silero/{s=$2} /^streamserve_streams_open /{o=$2} END{print c, b, s, o}'; }
prev=$(p); t0=$(date +%s.%N)
while kill -0 $LP 2>/dev/null; do sleep 1; cur=$(p); echo "$prev $cur" | awk -v t=$(echo "$(date +%s.%N)-$t0" | bc) '{dc=$5-$1; if (dc>0) printf "t=%.0f open=%d chunks/s=%d behind=%.0f%% mean_lat_ms=%.1f\n", t, $8, dc, 100*($6-$2)/dc, 1000*($7-$3)/dc}'; prev=$cur; done | tee $OUT/timeline.txt
wait $LP
kill $SP; wait $SP 2>/dev/null
grep -E "latency ms|streams  " $OUT/loadgen.log
