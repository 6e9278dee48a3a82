# Two builds, alternating: old = a3b3367 (before the hardening pass), head = 25f2c86.
# Both binaries built with `cargo build --release --locked --bin streamserve` and copied to /tmp/ss-old, /tmp/ss-head.
set -u
cd /work/main
for round in 1 2; do
 for b in old head; do
  echo "== $b $round $(date +%T)"
  target/release/loadgen efficiency --out load-tests/results/2026-12-07-hardening-cost/$b-$round --concurrency 32 --streams 200 --plumbing-streams 200 --server-bin /tmp/ss-$b > load-tests/results/2026-12-07-hardening-cost/$b-$round.log 2>&1
  echo "rc=$?"
 done
done
echo done $(date +%T)
