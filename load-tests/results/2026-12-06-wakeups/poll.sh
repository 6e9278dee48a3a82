#!/bin/bash
# usage: poll.sh : c=1 JSON (c1.sh) with the server free and with all its threads on CPU 0, each
# with the guest's halt polling off (0 ns, this VM's setting) and at 200 µs; restores 0 at the end.
# Needs root and the haltpoll cpuidle driver (/sys/module/haltpoll). Run from anywhere.
P=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HERE=$(dirname "$(readlink -f "$0")")
for round in 1 2; do
  for ns in 0 200000; do
    echo $ns > $P
    for mode in free server0; do
      echo "== round $round, guest_halt_poll_ns $(cat $P), $mode"
      MODE=$mode bash "$HERE/c1.sh"
    done
  done
done
echo 0 > $P
