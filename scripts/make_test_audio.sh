#!/usr/bin/env bash
# Makes the speech fixtures in tests/audio/ from Debian's espeak-ng and sox (apt-get install
# espeak-ng sox): synthetic speech with known stretches of (faintly noisy) silence around it,
# so the true speech boundaries are known. Writes <name>.wav and <name>.json with the true
# segments in seconds. The files are committed; this script documents and rebuilds them.
set -euo pipefail
out="$(cd "$(dirname "$0")/.." && pwd)/tests/audio"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

speech() { # text rate -> trimmed mono 16-bit wav at the rate
    espeak-ng -s 150 -w "$tmp/raw.wav" "$1"
    sox "$tmp/raw.wav" -r "$2" -c 1 -b 16 "$tmp/$3.wav" silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse
}
silence() { # seconds rate name
    sox -n -r "$2" -c 1 -b 16 "$tmp/$3.wav" synth "$1" whitenoise vol 0.002
}
make() { # name rate
    local name=$1 rate=$2
    speech "streaming speech detection works in real time" "$rate" a
    speech "the quick brown fox jumps over the lazy dog" "$rate" b
    silence 1.0 "$rate" s1; silence 1.5 "$rate" s2; silence 1.2 "$rate" s3
    sox "$tmp/s1.wav" "$tmp/a.wav" "$tmp/s2.wav" "$tmp/b.wav" "$tmp/s3.wav" "$out/$name.wav"
    python3 - "$out/$name.json" "$rate" "$(soxi -D "$tmp/s1.wav")" "$(soxi -D "$tmp/a.wav")" \
        "$(soxi -D "$tmp/s2.wav")" "$(soxi -D "$tmp/b.wav")" "$(soxi -D "$tmp/s3.wav")" <<'PY'
import json, sys
path, rate, s1, a, s2, b, s3 = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
segments = [[s1, s1 + a], [s1 + a + s2, s1 + a + s2 + b]]
json.dump({"sample_rate": rate, "duration": s1 + a + s2 + b + s3, "segments": segments}, open(path, "w"), indent=1)
PY
}
make two_phrases_16k 16000
make two_phrases_8k 8000
ls -la "$out"
