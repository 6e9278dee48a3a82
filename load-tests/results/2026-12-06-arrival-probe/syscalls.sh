#!/bin/bash
# usage: [SERVERARGS=...] [LOADARGS="--concurrency 32"] syscalls.sh BIN RATE : the server pinned on CPU 0 (one HTTP worker, a static door of 16 unless SERVERARGS says otherwise), open-loop 1-row mlp JSON at RATE/s from CPU 1 (or the loadgen arguments in LOADARGS), counting the server's system calls over 4 s with perf stat
BIN=$1; RATE=$2
cd /work/main  # edit for your checkout
taskset -c 0 $BIN serve --port 18317 --grpc-port off --http-workers 1 --models models ${SERVERARGS---admission static --max-inflight 16} > /tmp/s-server.log 2>&1 &
SP=$!
for i in $(seq 1 100); do curl -sf localhost:18317/v2/health/ready >/dev/null && break; sleep 0.2; done
taskset -c 1 ./target/release/loadgen rest --url http://127.0.0.1:18317 --model mlp ${LOADARGS:---rate $RATE --max-in-flight 4096} --duration-secs 10 --warmup-secs 1 --client-threads 1 > /tmp/s-load.log 2>&1 &
LA=$!
sleep 4
r1=$(curl -s localhost:18317/metrics | grep -E '^streamserve_requests_total\{' | awk '{s+=$2} END {print s}')
perf stat -e 'syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_write,syscalls:sys_enter_read,syscalls:sys_enter_writev,syscalls:sys_enter_getsockopt,syscalls:sys_enter_setsockopt,syscalls:sys_enter_accept4,syscalls:sys_enter_epoll_ctl' -p $SP -- sleep 4 2>&1 | grep syscalls
r2=$(curl -s localhost:18317/metrics | grep -E '^streamserve_requests_total\{' | awk '{s+=$2} END {print s}')
echo "requests in window ~ $((r2-r1))"
wait $LA
kill $SP; wait $SP 2>/dev/null
grep -E "answers|latency" /tmp/s-load.log | head -3
