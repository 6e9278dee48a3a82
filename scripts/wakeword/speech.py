"""Training and evaluation audio: speech from espeak-ng, resampled (and, for training,
augmented) by sox, laid out with silence and white noise into positive clips, confusable
clips, negative speech streams and noise-only streams. Every choice comes from the caller's
numpy generator and fixed ordered lists, so the same seed gives the same audio.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np

from .config import (
    AUG_EQ_DB, AUG_EQ_P, AUG_PITCH_CENTS, AUG_PITCH_P, AUG_REVERB_P, GAIN_DB, MEL_HOP, NEG_STREAM_S,
    NOISE_DB, NOISE_STREAM_S, PITCHES, SPEEDS, SR,
)


# ---------------------------------------------------------------------------------------
# Speech


def espeak_variants():
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    return {tok[3:] for line in out.splitlines() for tok in line.split() if tok.startswith("!v/")}


def voices(bases, variants):
    known = espeak_variants()
    missing = [v for v in variants if v and v not in known]
    if missing:
        sys.exit(f"espeak-ng lacks the variants {missing}")
    return [b + ("+" + v if v else "") for b in bases for v in variants]


class Speaker:
    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.count = 0

    def say(self, text, voice, speed, pitch, fx=()):
        """Trimmed 16 kHz float32 speech with peak 1; fx: sox effects (training augmentation)."""
        self.count += 1
        raw = self.tmp / "say.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text],
                       check=True, capture_output=True)
        pcm = subprocess.run(["sox", str(raw), "-r", str(SR), "-c", "1", "-e", "floating-point", "-b", "32",
                              "-t", "raw", "-", *fx], check=True, capture_output=True).stdout
        x = np.frombuffer(pcm, np.float32).astype(np.float64)
        loud = np.flatnonzero(np.abs(x) > 0.01 * np.abs(x).max())
        x = x[loud[0]:loud[-1] + 1]
        return x / np.abs(x).max()


def pick(rng, items):
    return items[int(rng.integers(len(items)))]


def draw_voice(rng, voice_list, augment=False):
    """-> (voice, speed, pitch, sox effects). With augment, sox shifts the whole spectrum
    (a different vocal tract), tilts it with an equaliser and adds reverb, each sometimes."""
    voice = (pick(rng, voice_list), int(rng.integers(SPEEDS[0], SPEEDS[1] + 1)),
             int(rng.integers(PITCHES[0], PITCHES[1] + 1)))
    fx = []
    if augment:
        if rng.random() < AUG_PITCH_P:
            fx += ["pitch", f"{rng.uniform(-AUG_PITCH_CENTS, AUG_PITCH_CENTS):.0f}"]
        if rng.random() < AUG_EQ_P:
            fx += ["equalizer", f"{rng.uniform(300, 3000):.0f}", "1.0q", f"{rng.uniform(-AUG_EQ_DB, AUG_EQ_DB):.1f}"]
        if rng.random() < AUG_REVERB_P:
            fx += ["reverb", f"{rng.uniform(10, 60):.0f}"]
    return (*voice, tuple(fx))


def gain(rng):
    return 10.0 ** (rng.uniform(*GAIN_DB) / 20.0)


def add_noise(rng, x):
    if rng.random() < 0.1:
        return x
    rms = 10.0 ** (rng.uniform(*NOISE_DB) / 20.0)
    return x + rng.standard_normal(len(x)) * rms


def silence(seconds):
    return np.zeros(int(round(seconds * SR)))


def positive_clip(rng, spk, voice_list, texts, sentences, voice=None, augment=False):
    """A phrase in silence/noise, sometimes with a sentence by the same voice before
    and/or after. -> audio float32, (phrase start, phrase end) in samples, the voice."""
    if voice is None:
        voice = draw_voice(rng, voice_list, augment)
    level = gain(rng)
    parts = [silence(rng.uniform(0.2, 2.0))]
    if rng.random() < 0.4:
        parts += [spk.say(pick(rng, sentences), *voice) * level * rng.uniform(0.7, 1.3),
                  silence(rng.uniform(0.3, 1.0))]
    parts.append(np.zeros(int(rng.integers(MEL_HOP))))  # vary the alignment to the 80 ms hop
    start = sum(len(p) for p in parts)
    phrase = spk.say(pick(rng, texts), *voice) * level
    parts.append(phrase)
    end = start + len(phrase)
    if rng.random() < 0.4:
        parts += [silence(rng.uniform(0.15, 1.0)),
                  spk.say(pick(rng, sentences), *voice) * level * rng.uniform(0.7, 1.3)]
    parts.append(silence(rng.uniform(1.3, 1.8)))
    x = add_noise(rng, np.concatenate(parts))
    return np.clip(x, -1, 1).astype(np.float32), (start, end), voice


def confusable_clip(rng, spk, texts, voice):
    """A confusable alone in silence/noise, said by a given voice -> audio float32."""
    level = gain(rng)
    parts = [silence(rng.uniform(0.2, 1.0)), np.zeros(int(rng.integers(MEL_HOP))),
             spk.say(pick(rng, texts), *voice) * level, silence(rng.uniform(1.0, 1.4))]
    x = add_noise(rng, np.concatenate(parts))
    return np.clip(x, -1, 1).astype(np.float32)


def negative_stream(rng, spk, voice_list, sentences, confusables, confusable_p, augment=False,
                    seconds=NEG_STREAM_S):
    """-> audio float32, [(start, end, text, voice)] of its utterances."""
    parts, total, said = [], 0, []
    while total < seconds * SR:
        voice = draw_voice(rng, voice_list, augment)
        text = pick(rng, confusables) if rng.random() < confusable_p else pick(rng, sentences)
        gap = silence(rng.uniform(0.2, 1.5))
        speech = spk.say(text, *voice) * gain(rng)
        said.append((total + len(gap), total + len(gap) + len(speech), text, " ".join(map(str, voice))))
        parts += [gap, speech]
        total += len(gap) + len(speech)
    parts.append(silence(rng.uniform(0.5, 1.0)))
    x = add_noise(rng, np.concatenate(parts))
    return np.clip(x, -1, 1).astype(np.float32), said


def noise_stream(rng, i, seconds=NOISE_STREAM_S):
    """Silence or white noise, some of it swelling and fading."""
    n = int(seconds * SR)
    if i % 6 == 0:
        return np.zeros(n, np.float32)
    rms = 10.0 ** (rng.uniform(-90.0, -25.0) / 20.0)
    env = 1.0
    if i % 2 == 1:
        t = np.arange(n) / SR
        env = 10.0 ** (rng.uniform(10.0, 30.0) / 20.0 * np.sin(2 * np.pi * t / rng.uniform(2.0, 8.0)) / 2.0)
    return np.clip(rng.standard_normal(n) * rms * env, -1, 1).astype(np.float32)
