# usage (from the checkout, with the .venv of scripts/setup.sh): .venv/bin/python load-tests/results/2026-12-06-replica-choice/cache.py
# The mlp model in-process on CPU 0, batch 8: one session, or two sessions called in turn (as
# two replicas taking batches in turn), with 256 KB or 2 MB of other memory read between calls
# (as the HTTP thread does between batches on the same core). Prints µs per row, 4 rounds each.
import numpy as np, onnxruntime as ort, time, statistics, os
os.sched_setaffinity(0, {0})
def mk():
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    return ort.InferenceSession("models/mlp/1/model.onnx", so, providers=["CPUExecutionProvider"])
s1, s2 = mk(), mk(); name = s1.get_inputs()[0].name
B=8; x=np.random.default_rng(1).random((B,256),dtype=np.float32)
junk = np.ones(256*1024//4, np.float32)  # 256 KB touched between calls
junk2 = np.ones(2*1024*1024//4, np.float32)
def rate(sessions, touch=None, n=1500):
    t=time.perf_counter(); tt=0
    for i in range(n):
        if touch is not None:
            a=time.perf_counter(); touch.sum(); tt+=time.perf_counter()-a
        sessions[i % len(sessions)].run(None, {name:x})
    return ((time.perf_counter()-t)-tt)/n/B*1e6
for s in (s1,s2):
    for i in range(300): s.run(None,{name:x})
res={}
for r in range(4):
    for label, args in (("one session",([s1],)), ("two alternating",([s1,s2],)), ("one + 256KB touched between",([s1],junk)), ("one + 2MB touched between",([s1],junk2)), ("two + 2MB touched",([s1,s2],junk2))):
        res.setdefault(label,[]).append(rate(*args))
for k,v in res.items(): print(f"{k:30s}", " ".join(f"{x:.1f}" for x in v), f"median {statistics.median(v):.1f} us/row")
