#!/bin/bash
# usage: threads.sh BIN N : per-thread CPU over 2 s at steady state
BIN=$1; N=$2
cd /work/main
taskset -c 0 $BIN serve --port 18313 --grpc-port off --http-workers 1 > /tmp/t-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18313/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen streams --url http://127.0.0.1:18313 --model silero_vad --streams $N --duration-secs 8 --ramp-secs ${RAMP:-4} --client-threads 1 --quiet > /tmp/t-load.log 2>&1 &
LA=$!
sleep 7
snap() { for t in /proc/$SP/task/*; do echo "$(basename $t) $(cat $t/comm | tr ' ' _) $(awk '{print $14+$15}' $t/stat)"; done; }
snap > /tmp/t1; sleep 2; snap > /tmp/t2
join /tmp/t1 /tmp/t2 | awk '{d=$5-$3; if (d>0) print $2, d}' | sort -k2 -n -r | head
grep -c . /proc/$SP/net/tcp 2>/dev/null; ls /proc/$SP/fd | wc -l
wait $LA
kill $SP; wait $SP 2>/dev/null
grep -E "streams  |errors" /tmp/t-load.log
