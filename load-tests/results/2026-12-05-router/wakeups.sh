#!/bin/bash
# usage (from the repository root): wakeups.sh BIN CONC [binary]  -> prints cpu_us/req, ctxsw/req, reqs, and loadgen summary line
BIN=$1; C=$2; EXTRA=$3
PORT=$((18100 + RANDOM % 500))
$BIN serve --port $PORT > /tmp/wakeups-server-$$.log 2>&1 &
PID=$!
for i in $(seq 50); do curl -sf localhost:$PORT/v2/health/ready >/dev/null && break; sleep 0.2; done
sleep 1
sw() { cat /proc/$PID/task/*/status | awk '/ctxt_switches/{s+=$2} END{print s}'; }
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
reqs() { curl -s localhost:$PORT/metrics | awk '/^streamserve_batch_requests_sum\{model="mlp"/{print $2}'; }
s0=$(sw); c0=$(cpu); r0=$(reqs)
OUT=$(target/release/loadgen rest --url http://127.0.0.1:$PORT --concurrency $C --duration-secs ${DUR:-6} --warmup-secs 1 --quiet --client-threads 1 $EXTRA 2>&1)
s1=$(sw); c1=$(cpu); r1=$(reqs)
kill $PID; wait $PID 2>/dev/null
TCK=$(getconf CLK_TCK)
python3 -c "
r=$r1-$r0; print(f'$(basename $BIN) c=$C $EXTRA reqs={r:.0f} cpu_us/req={($c1-$c0)/$TCK*1e6/r:.1f} ctxsw/req={($s1-$s0)/r:.2f}')"
echo "$OUT" | grep -iE "p50|throughput|req/s" | head -3
