"""Turn the synthesized audio into a trained keyword head and measure it.

- make_set / merge: synthesize a data set and compute its embeddings (via features.Features).
- windows: label the 16-embedding windows (positive just after the phrase end, negative where
  no window audio overlaps the phrase, the rest left out).
- train_head / head_model: the numpy MLP (Adam, weighted cross-entropy, fixed seeds) and its
  ONNX export with the input standardisation folded into the first Gemm.
- evaluate / sweep: held-out misses and false accepts under the server's detection rule.
"""
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .config import (
    BATCH, CONFUSABLE_P, DROPOUT, EMB_DIM, EPOCHS, HIDDEN, INPUT_NOISE, KW_WINDOW, LR, NEG_STRIDE,
    PAIR_BOOST, PHRASE, POS_AFTER_S, POS_FROM_S, POS_WEIGHT_SHARE, SEED_INIT, SEED_SGD, SR,
    WEIGHT_DECAY, WINDOW_AUDIO_S, log,
)
from .features import detect
from .speech import confusable_clip, negative_stream, noise_stream, positive_clip


# ---------------------------------------------------------------------------------------
# Data sets


def make_set(name, seed, spk, feats, voice_list, pos_texts, sentences, confusables, n_pos=0, n_neg=0,
             n_noise=0, confusable_p=CONFUSABLE_P, pair_seed=None, augment=False):
    """-> {"pos": positive clips, "neg": negative clips and streams, "pos_s"/"neg_s": their
    seconds}, each clip with its embeddings and their times. With pair_seed, every positive
    clip gets a twin in "neg": the same voice and layout kind with a confusable instead."""
    rng = np.random.Generator(np.random.PCG64(seed))
    t0 = time.time()
    pos, neg, used = [], [], []
    for _ in range(n_pos):
        audio, (s, e), voice = positive_clip(rng, spk, voice_list, pos_texts, sentences, augment=augment)
        embs, times = feats.embeddings(audio)
        pos.append({"embs": embs, "times": times, "start": s, "end": e, "samples": len(audio)})
        used.append(voice)
    if pair_seed is not None:
        pair_rng = np.random.Generator(np.random.PCG64(pair_seed))
        for voice in used:
            audio = confusable_clip(pair_rng, spk, confusables, voice)
            embs, times = feats.embeddings(audio)
            neg.append({"embs": embs, "times": times, "samples": len(audio), "kind": "pair"})
    for _ in range(n_neg):
        audio, said = negative_stream(rng, spk, voice_list, sentences, confusables, confusable_p, augment)
        embs, times = feats.embeddings(audio)
        neg.append({"embs": embs, "times": times, "samples": len(audio), "said": said,
                    "kind": "confusables" if confusable_p >= 1 else "speech"})
    for i in range(n_noise):
        audio = noise_stream(rng, i)
        embs, times = feats.embeddings(audio)
        neg.append({"embs": embs, "times": times, "samples": len(audio), "kind": "noise"})
    pos_s = sum(c["samples"] for c in pos) / SR
    neg_s = sum(c["samples"] for c in neg) / SR
    log(f"{name}: {len(pos)} positive clips ({pos_s / 60:.1f} min), {len(neg)} negative clips/streams "
        f"({neg_s / 60:.1f} min), {time.time() - t0:.0f} s")
    return {"pos": pos, "neg": neg, "pos_s": pos_s, "neg_s": neg_s}


def merge(*sets):
    return {"pos": [c for d in sets for c in d["pos"]], "neg": [c for d in sets for c in d["neg"]],
            "pos_s": sum(d["pos_s"] for d in sets), "neg_s": sum(d["neg_s"] for d in sets)}


def windows(data):
    """Training windows -> (all embeddings, window start rows, labels, sample weights)."""
    blocks, starts, labels, boosts = [], [], [], []
    offset = 0
    for clip in data["pos"] + data["neg"]:
        embs, times = clip["embs"], clip["times"]
        n = len(embs) - KW_WINDOW + 1
        if n > 0:
            t = times[KW_WINDOW - 1:]
            if "end" in clip:
                s, e = clip["start"], clip["end"]
                lab = np.full(n, -1, np.int8)
                lab[(t >= e + POS_FROM_S * SR) & (t <= e + POS_AFTER_S * SR)] = 1
                lab[(t <= s) | (t - WINDOW_AUDIO_S * SR >= e)] = 0
            else:
                lab = np.zeros(n, np.int8)
                if clip["kind"] in ("speech", "noise"):
                    lab[np.arange(n) % NEG_STRIDE != 0] = -1  # neighbouring windows are near copies
            keep = lab >= 0
            starts.append(offset + np.flatnonzero(keep))
            labels.append(lab[keep])
            boosts.append(np.full(int(keep.sum()), PAIR_BOOST if clip.get("kind") == "pair" else 1.0, np.float32))
        blocks.append(embs)
        offset += len(embs)
    return (np.concatenate(blocks), np.concatenate(starts), np.concatenate(labels).astype(np.float32),
            np.concatenate(boosts))


# ---------------------------------------------------------------------------------------
# The head


def train_head(E, starts, y, boost=None, epochs=None):
    """Adam on weighted binary cross-entropy; float32 numpy, fixed seeds."""
    rows = np.arange(KW_WINDOW)
    X_of = lambda idx: E[starts[idx][:, None] + rows[None]].reshape(len(idx), -1)
    # standardise the inputs (folded into the first layer afterwards)
    mu = E.mean(axis=0).astype(np.float64)
    sd = E.std(axis=0).astype(np.float64) + 1e-3
    mu_f, sd_f = np.tile(mu, KW_WINDOW).astype(np.float32), np.tile(sd, KW_WINDOW).astype(np.float32)
    d = KW_WINDOW * EMB_DIM
    init = np.random.Generator(np.random.PCG64(SEED_INIT))
    params = {
        "w1": (init.standard_normal((d, HIDDEN)) * np.sqrt(2.0 / d)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (init.standard_normal((HIDDEN, 1)) * np.sqrt(1.0 / HIDDEN)).astype(np.float32),
        "b2": np.zeros(1, np.float32),
    }
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    wpos = POS_WEIGHT_SHARE * len(y) / n_pos
    wneg = (1 - POS_WEIGHT_SHARE) * len(y) / n_neg
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    order_rng = np.random.Generator(np.random.PCG64(SEED_SGD))
    step = 0
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    epochs = EPOCHS if epochs is None else epochs
    for epoch in range(epochs):
        order = order_rng.permutation(len(y))
        total = 0.0
        for i in range(0, len(y), BATCH):
            idx = order[i:i + BATCH]
            x = (X_of(idx) - mu_f) / sd_f
            if INPUT_NOISE:
                x = x + (order_rng.standard_normal(x.shape, dtype=np.float32) * INPUT_NOISE)
            yb = y[idx]
            wb = np.where(yb > 0, wpos, wneg).astype(np.float32)
            if boost is not None:
                wb = wb * boost[idx]
            h_pre = x @ params["w1"] + params["b1"]
            h = np.maximum(h_pre, 0)
            if DROPOUT:
                keep = (order_rng.random(h.shape, dtype=np.float32) >= DROPOUT) / np.float32(1 - DROPOUT)
                h = h * keep
            z = (h @ params["w2"])[:, 0] + params["b2"][0]
            p = 0.5 * (1.0 + np.tanh(0.5 * z))
            loss = (wb * (np.logaddexp(0, z) - yb * z)).sum() / wb.sum()
            total += float(loss) * len(idx)
            gz = (wb * (p - yb) / wb.sum()).astype(np.float32)[:, None]
            grads = {"w2": h.T @ gz, "b2": gz.sum(0)}
            gh = (gz @ params["w2"].T) * (h_pre > 0)
            if DROPOUT:
                gh = gh * keep
            grads["w1"] = x.T @ gh
            grads["b1"] = gh.sum(0)
            step += 1
            for k in params:
                g = grads[k] + (WEIGHT_DECAY * params[k] if k.startswith("w") else 0)
                m[k] = b1_ * m[k] + (1 - b1_) * g
                v[k] = b2_ * v[k] + (1 - b2_) * g * g
                mh = m[k] / (1 - b1_ ** step)
                vh = v[k] / (1 - b2_ ** step)
                params[k] = (params[k] - LR * mh / (np.sqrt(vh) + eps)).astype(np.float32)
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"  epoch {epoch + 1}: loss {total / len(y):.4f}")
    # fold the standardisation into the first layer
    w1 = (params["w1"].astype(np.float64) / np.tile(sd, KW_WINDOW)[:, None])
    b1 = params["b1"].astype(np.float64) - np.tile(mu, KW_WINDOW) @ w1
    return (w1.astype(np.float32), b1.astype(np.float32), params["w2"].astype(np.float32),
            params["b2"].astype(np.float32))


def head_model(w1, b1, w2, b2):
    nodes = [
        helper.make_node("Flatten", ["embeddings"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(
        nodes, "ww_hey_marvin",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", KW_WINDOW, EMB_DIM])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="streamserve scripts/make_wakeword.py")
    model.ir_version = 8
    model.doc_string = (f'wake word "{PHRASE}": 16 openWakeWord speech embeddings [B,16,96] '
                        "(1.28 s, one per 80 ms) -> probability [B,1]")
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------
# Evaluation


def clip_scores(clip, feats):
    if "scores" not in clip:
        clip["scores"] = feats.scores(clip["embs"], clip["times"])
    return clip["scores"]


def evaluate(data, feats):
    misses, other, hits_t = 0, 0, []
    for clip in data["pos"]:
        ev = detect(*clip_scores(clip, feats))
        lo, hi = clip["end"] - 0.3 * SR, clip["end"] + 1.0 * SR
        ok = [e for e in ev if lo <= e[0] <= hi]
        if ok:
            hits_t.append((ok[0][0] - clip["end"]) / SR)
        else:
            misses += 1
        other += len(ev) - len(ok)
    fa, kinds, phrases = 0, {}, {}
    for clip in data["neg"]:
        ev = detect(*clip_scores(clip, feats))
        fa += len(ev)
        k = kinds.setdefault(clip["kind"], {"minutes": 0.0, "false_accepts": 0})
        k["minutes"] += clip["samples"] / SR / 60.0
        k["false_accepts"] += len(ev)
        if clip["kind"] == "confusables":
            for s, e, text, _ in clip["said"]:
                n_ev = sum(s <= t < e + 1.0 * SR for t, _ in ev)  # events from its start to 1 s after
                p = phrases.setdefault(text, [0, 0])
                p[0] += 1
                p[1] += n_ev > 0
    for k in kinds.values():
        k["per_hour"] = k["false_accepts"] / (k["minutes"] / 60.0)
    n_pos = len(data["pos"])
    return {
        "positives": n_pos,
        "misses": misses,
        "misses_per_100": 100.0 * misses / n_pos,
        "other_events_on_positive_clips": other,
        "median_latency_s": float(np.median(hits_t)) if hits_t else None,
        "negative_minutes": data["neg_s"] / 60.0,
        "false_accepts": fa,
        "false_accepts_per_hour": fa / (data["neg_s"] / 3600.0),
        "by_kind": kinds,
        "confusables_fired": {t: phrases[t] for t in sorted(phrases)},
    }


def sweep(data, feats, thresholds=(0.3, 0.5, 0.7, 0.9)):
    out = []
    for th in thresholds:
        miss = 0
        for clip in data["pos"]:
            t, s = clip_scores(clip, feats)
            lo, hi = clip["end"] - 0.3 * SR, clip["end"] + 1.0 * SR
            if not any(lo <= e[0] <= hi for e in detect(t, s, th)):
                miss += 1
        fa = sum(len(detect(*clip_scores(c, feats), th)) for c in data["neg"])
        out.append((th, 100.0 * miss / len(data["pos"]), fa / (data["neg_s"] / 3600.0)))
    return out
