#!/usr/bin/env python3
"""Prints, per run folder given, each level's goodput per second and admitted (primary) p99 ms."""
import json, sys
for d in sys.argv[1:]:
    r = json.load(open(f"{d}/results.json")); v = r["variants"][0]; cap = v["capacity"]["requests_per_s"]
    cells = [f'{l["multiplier"]:g}x {l["goodput_per_s"]:5.0f}/s p99 {l["latency_primary_ms"]["p99"]:4.0f}' for l in v["levels"]]
    print(f"{d.split('/')[-1]:20} cap {cap:6.0f}  " + "  ".join(cells))
