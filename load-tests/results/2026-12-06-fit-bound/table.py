#!/usr/bin/env python3
"""Prints, per run folder given, each level's goodput / capacity, admitted (primary) p99 ms,
refusal p99 ms and the door's limit after the level."""
import json, sys
for d in sys.argv[1:]:
    r = json.load(open(f"{d}/results.json"))
    v = r["variants"][0]
    cap = v["capacity"]["requests_per_s"]
    cells = []
    for l in v["levels"]:
        cells.append(f'{l["multiplier"]:g}x {l["goodput_per_s"]/cap:.2f}/{l["latency_primary_ms"]["p99"]:.0f}/'
                     f'{l["latency_refused_ms"]["p99"]:.0f}/{l["admission_limit"]:.0f}')
    print(f"{d:20} cap {cap:6.0f}  " + "  ".join(cells))
