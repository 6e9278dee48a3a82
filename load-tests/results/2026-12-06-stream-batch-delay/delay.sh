#!/bin/bash
# usage: delay.sh N : the bundled manifest with silero_vad's max_queue_delay_ms at 0 (as shipped), 1, 2 and 4 ms
# (copies in /tmp/models-dD, the model folders linked), then N pinned real-time streams on each in turn, twice, with
# ../2026-12-06-stream-timers/prof.sh (PERF=0). Run from anywhere; edit the checkout path.
ROOT=/work/main
for d in 1 2 4; do
  mkdir -p /tmp/models-d$d
  for x in $ROOT/models/*/; do ln -sfn $x /tmp/models-d$d/$(basename $x); done
  python3 - "$d" "$ROOT/models/models.toml" "/tmp/models-d$d/models.toml" <<'PY'
import sys
d, src, dst = sys.argv[1:]
t = open(src).read()
i = t.index('name = "silero_vad"')
j = t.index("max_queue_delay_ms = 0.0", i)
open(dst, "w").write(t[:j] + f"max_queue_delay_ms = {d}.0" + t[j + len("max_queue_delay_ms = 0.0"):])
PY
done
for round in 1 2; do
  for m in $ROOT/models /tmp/models-d1 /tmp/models-d2 /tmp/models-d4; do
    echo "== $m"
    MODELS=$m PERF=0 bash $ROOT/load-tests/results/2026-12-06-stream-timers/prof.sh $ROOT/target/release/streamserve ${1:-200} /tmp/x 2>&1 | tail -3 | grep -v "^errors\|^streamserve_"
  done
done
