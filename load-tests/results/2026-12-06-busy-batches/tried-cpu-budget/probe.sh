#!/bin/bash
# usage: probe.sh BIN N  -- pinned server, N streams, prints the capacity gauge every second
BIN=$1; N=$2
cd /work/main
taskset -c 0 $BIN serve --port 18312 --grpc-port off --http-workers 1 > /tmp/probe-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18312/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18312 --model silero_vad --streams $N --duration-secs 8 --ramp-secs 4 --client-threads 1 --quiet > /tmp/probe-load.log 2>&1 &
LA=$!
for i in $(seq 1 12); do sleep 1; [ "$i" = 6 ] && [ -n "$PERF" ] && perf record -F 999 -g -o /tmp/spin.data -p $SP -- sleep 3 >/dev/null 2>&1; echo "$i $(curl -s localhost:18312/metrics | grep -E '^streamserve_(stream_capacity|streams_open|streams_refused_full_total) ' | tr '\n' ' ') $(awk '{print $14+$15}' /proc/$SP/stat)"; done
wait $LA
kill $SP; wait $SP 2>/dev/null
grep -E "streams  |latency ms|errors" /tmp/probe-load.log
