#!/usr/bin/env python3
"""Crash drill: how long from a worker crash until the model is back at full capacity.

    python3 scripts/crash_drill.py --url http://127.0.0.1:8080 --token T [--model mlp] [--runs 10]

The server must run with the same admin token. Each run injects a panic into replica 0 through
the admin API, sends requests one at a time until one lands on that replica and its batch
crashes (the restart counter moves), and polls /admin/models until every replica is healthy
again; the time runs from sending that request. It reports the
request's status (the crashed batch is retried on another replica, so 200 is expected) and the
time to full capacity. Loopback targets only; bounded by --runs and a 10 s limit per run.
"""
import argparse
import json
import statistics
import time
import urllib.parse
import urllib.request


def call(url, token=None, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def router(base, token, model):
    _, listing = call(f"{base}/admin/models", token)
    for row in listing["models"]:
        if row["name"] == model and row.get("default"):
            return row["router"]
    raise SystemExit(f"model {model} is not serving")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--token", required=True)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    host = urllib.parse.urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("crash drills target loopback only")
    base = args.url.rstrip("/")
    _, meta = call(f"{base}/v2/models/{args.model}")
    shape = [1 if d < 0 else d for d in meta["inputs"][0]["shape"]]
    count = 1
    for d in shape:
        count *= d
    request = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": shape, "datatype": meta["inputs"][0]["datatype"], "data": [0.1] * count}]}

    recoveries, statuses = [], []
    for run in range(args.runs):
        before = router(base, args.token, args.model)
        replicas = before["replicas"]
        status, answer = call(f"{base}/admin/models/{args.model}/faults", args.token, {"fault": {"kind": "panic"}, "replica": 0})
        assert status == 200, answer
        # Requests go to the least recently used idle replica: send one at a time until one
        # lands on replica 0 and its batch crashes (the restart counter moves).
        for _ in range(20):
            crash = time.perf_counter()
            result = {"status": call(f"{base}/v2/models/{args.model}/infer", body=request)[0]}
            if router(base, args.token, args.model)["restarts"] > before["restarts"]:
                break
        else:
            raise SystemExit(f"run {run}: the injected panic never fired")
        while True:
            state = router(base, args.token, args.model)
            if state["healthy_replicas"] == replicas:
                break
            if time.perf_counter() - crash > 10:
                raise SystemExit(f"run {run}: not back to {replicas} healthy replicas within 10 s: {state}")
            time.sleep(0.002)
        recovered = time.perf_counter() - crash
        recoveries.append(recovered * 1000)
        statuses.append(result.get("status"))
        print(f"run {run + 1}: request answered {result.get('status')}, full capacity after {recovered * 1000:.1f} ms")
        time.sleep(0.2)
    print(
        f"\n{args.runs} crashes of {args.model} replica 0: requests answered {sorted(set(statuses))}; "
        f"time to full capacity min {min(recoveries):.1f} ms, median {statistics.median(recoveries):.1f} ms, "
        f"max {max(recoveries):.1f} ms (polling every 2 ms, so +-2 ms)"
    )


if __name__ == "__main__":
    main()
