# Silero batch 7 in-process on CPU 0: calls back to back, versus calls with an idle gap between
# them (as a server at partial load makes), timing only the calls.
import numpy as np, onnxruntime as ort, time, statistics, os
os.sched_setaffinity(0, {0})
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
s = ort.InferenceSession("/work/main/models/silero_vad/1/model.onnx", so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(1); B = 7
f = {"input": rng.random((B, 576), dtype=np.float32) * 0.1, "state": np.zeros((2, B, 128), np.float32), "sr": np.array(16000, dtype=np.int64)}
junk = np.ones(1 << 20, np.float32)  # 4 MB
def rate(gap, touch=False, n=800):
    tot = 0.0
    for i in range(n):
        if gap: time.sleep(gap)
        if touch: junk.sum()
        t = time.perf_counter(); s.run(None, f); tot += time.perf_counter() - t
    return tot / n / B * 1e6
for _ in range(300): s.run(None, f)
res = {}
for r in range(3):
    for label, args in (("back to back", (0,)), ("1 ms idle gap", (0.001,)), ("4 MB touched", (0, True)), ("1 ms gap + 4 MB", (0.001, True))):
        res.setdefault(label, []).append(rate(*args))
for k, v in res.items(): print(f"{k:18s}", " ".join(f"{x:.1f}" for x in v), f"median {statistics.median(v):.1f} us/row")
