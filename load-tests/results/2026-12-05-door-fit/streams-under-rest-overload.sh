#!/bin/bash
# Open speech streams while REST traffic overloads the server's CPU.
# Usage: streams-under-rest-overload.sh BIN pinned|pinned-stream-port|unpinned RATE...
#   pinned: server on CPU 0 with one HTTP worker, load generators on CPU 1;
#   pinned-stream-port: the same, and the streams go to the server's --stream-port listener
#     (its own HTTP thread) while REST goes to --port;
#   unpinned: default HTTP workers, everything shares the machine's cores.
# 40 silero_vad streams alone (8 s), then for each RATE: 40 streams open, and 1.5 s later an
# open-loop REST load of RATE 1-row mlp requests/s for 10 s; the streams run 9 s measured.
set -u
BIN=$1 MODE=$2; shift 2
cd "$(dirname "$0")/../../.."
LG=target/release/loadgen
PORT=18096 N=40
SPORT=$PORT
case "$MODE" in
  pinned) S="taskset -c 0" L="taskset -c 1" W="--http-workers 1" T=1 ;;
  pinned-stream-port) S="taskset -c 0" L="taskset -c 1" W="--http-workers 1 --stream-port 18097" T=1 SPORT=18097 ;;
  *) S="" L="" W="" T=2 ;;
esac
$S "$BIN" serve --port $PORT --grpc-port off $W >/dev/null 2>&1 &
SP=$!
trap "kill $SP 2>/dev/null" EXIT
for i in $(seq 100); do curl -sf localhost:$PORT/v2/health/ready >/dev/null && break; sleep 0.2; done
pick='^(streams|chunks|latency|sched|senders|errors|error |requests|answers|goodput|primary)'
server_side() {
  curl -s localhost:$PORT/metrics | grep -E '^streamserve_stream_chunk_latency_seconds_(sum|count)\{model="silero_vad"\}' | awk '{print $2}' | paste -sd' '
}
echo "== $MODE: $N streams alone"
$L $LG streams --url http://127.0.0.1:$SPORT --streams $N --duration-secs 8 --ramp-secs 1 --client-threads $T --quiet 2>&1 | grep -E "$pick"
for RATE in "$@"; do
  sleep 2
  before=$(server_side)
  echo "== $MODE: $N streams, REST open loop $RATE/s from 1.5 s on"
  $L $LG streams --url http://127.0.0.1:$SPORT --streams $N --duration-secs 9 --ramp-secs 1 --client-threads $T --quiet > /tmp/streams-$$.txt 2>&1 &
  STP=$!
  sleep 1.5
  $L $LG rest --url http://127.0.0.1:$PORT --model mlp --rate $RATE --duration-secs 10 --warmup-secs 0 --client-threads $T --max-in-flight 2048 --quiet 2>&1 | grep -E "$pick"
  wait $STP; grep -E "$pick" /tmp/streams-$$.txt; rm -f /tmp/streams-$$.txt
  after=$(server_side)
  echo "server-side chunk latency over this level (session: audio in -> result out): $(echo "$before $after" | awk '{printf "%.2f ms mean over %d chunks", ($3-$1)/($4-$2)*1000, $4-$2}')"
  curl -s localhost:$PORT/metrics | grep -E '^streamserve_admission_(limit|refused_total)'
done
