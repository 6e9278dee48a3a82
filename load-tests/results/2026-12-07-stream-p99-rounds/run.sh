# Three builds, alternating, three rounds: a3b3367 (before the first hardening pass),
# 25f2c86 (after it), head (a005055, after this session's fixes). Each built with
# `cargo build --release --locked --bin streamserve` and copied to /tmp/ss-<name>.
set -u
cd /work/main
D=load-tests/results/2026-12-07-stream-p99-rounds
for round in 1 2 3; do
 for b in a3b3367 25f2c86 head; do
  echo "== $b $round $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  target/release/loadgen efficiency --out $D/$b-$round --concurrency 32 --streams 200 --plumbing-streams 200 --server-bin /tmp/ss-$b > $D/$b-$round.log 2>&1
  echo "rc=$?"
 done
done
echo done $(date +%T)
