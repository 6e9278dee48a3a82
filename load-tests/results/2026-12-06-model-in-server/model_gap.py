# A model's call time in-process, back to back against calls with a gap before each, as a
# server between requests or real-time chunks has: the gap slept (the vCPU may halt), spun
# (the thread keeps the CPU), or filled with 1-row calls of the same model (its weights stay
# warm). Times only the measured calls. Run with the peer venv's python (onnxruntime 1.31.1):
#   load-tests/.venv-peer/bin/python model_gap.py [rounds]
# It pins itself to the last CPU it may use; edit REPO for another checkout.
import os, statistics, sys, time
import numpy as np, onnxruntime as ort

REPO = "/work/main"
os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3


def session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    path = f"{REPO}/models/{model}/1/model.onnx"
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


rng = np.random.default_rng(1)
def mlp_feed(b):
    return {"features": rng.standard_normal((b, 256)).astype(np.float32)}
def vad_feed(b):
    return {"input": rng.standard_normal((b, 576)).astype(np.float32) * 0.3,
            "state": np.zeros((2, b, 128), np.float32), "sr": np.array(16000, dtype=np.int64)}
MODELS = [("mlp", 1, mlp_feed), ("silero_vad", 6, vad_feed)]


def per_row(s, feed, one, batch, gap_s, mode, n=600):
    total = 0.0
    for _ in range(n):
        if gap_s and mode == "sleep":
            time.sleep(gap_s)
        elif gap_s:
            end = time.perf_counter() + gap_s
            while time.perf_counter() < end:
                if mode == "warm":
                    s.run(None, one)
        t = time.perf_counter()
        s.run(None, feed)
        total += time.perf_counter() - t
    return total / n / batch * 1e6


with open("/sys/module/haltpoll/parameters/guest_halt_poll_ns") as f:
    print(f"guest_halt_poll_ns {f.read().strip()}; CPU {max(os.sched_getaffinity(0))}")
for model, batch, make in MODELS:
    s, feed, one = session(model), make(batch), make(1)
    for _ in range(300):
        s.run(None, feed)
    cases = [("back to back", 0, "sleep")] + [
        (f"{g} ms {m}", g / 1000, m) for g in (0.2, 1.0) for m in ("sleep", "spin", "warm")]
    got = {label: [] for label, _, _ in cases}
    for _ in range(rounds):
        for label, gap, mode in cases:
            got[label].append(per_row(s, feed, one, batch, gap, mode))
    base = statistics.median(got["back to back"])
    for label, v in got.items():
        med = statistics.median(v)
        print(f"{model:10s} batch {batch}  {label:14s} " + " ".join(f"{x:6.1f}" for x in v)
              + f"  median {med:6.1f} µs/row  {med / base:4.2f}x")
