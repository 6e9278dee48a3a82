#!/usr/bin/env python3
"""Writes the seed corpus, fuzz/corpus/<target>/seed-*: small valid (and a few nearly valid)
inputs for each parser, built from the bundled models' real interfaces and from real speech
(tests/audio/two_phrases_16k.wav). Deterministic; stdlib only. Inputs the fuzzer found later
sit next to the seeds under other names and are not touched.

    python3 fuzz/make_seeds.py
"""

import json
import math
import struct
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def speech(start_s=1.2, count=800):
    """`count` 16 kHz PCM16 samples of real speech from the test fixture."""
    with wave.open(str(ROOT / "tests/audio/two_phrases_16k.wav"), "rb") as w:
        w.setpos(int(start_s * w.getframerate()))
        frames = w.readframes(count)
    return list(struct.unpack(f"<{len(frames) // 2}h", frames))


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


def js(value):
    return json.dumps(value, separators=(",", ":"))


def features(n, seed):
    """Short deterministic values in [-1, 1] (three decimals keep the files small)."""
    return [round(math.sin(seed * 7.1 + i * 0.37), 3) for i in range(n)]


def kserve_json():
    f = features(256, 1)
    write("kserve_json", "mlp-nested", js({"inputs": [
        {"name": "features", "shape": [1, 256], "datatype": "FP32", "data": [f]}]}))
    write("kserve_json", "mlp-flat-outputs", js({
        "id": "req-7",
        "parameters": {"binary_data_output": False, "timeout": 50000},
        "inputs": [{"name": "features", "shape": [2, 256], "datatype": "FP32",
                    "data": features(256, 2) + features(256, 3)}],
        "outputs": [{"name": "probabilities"}, {"name": "logits", "parameters": {"binary_data": True}}]}))
    write("kserve_json", "typed-ops", js({"inputs": [
        {"name": "a", "shape": [2, 4], "datatype": "INT64", "data": [[1, -2, 3, 9007199254740993], [0, 5, -6, 7]]},
        {"name": "b", "shape": [2, 4], "datatype": "FP64", "data": [[0.5, -1.25, 3.0, 1e300], [2, 2, 2, 2]]},
        {"name": "mask", "shape": [2, 4], "datatype": "BOOL", "data": [[True, False, True, True], [False] * 4]}],
        "outputs": [{"name": "sum"}, {"name": "masked"}, {"name": "positive"}, {"name": "masked_i32"}]}))
    write("kserve_json", "silero-vad", js({"inputs": [
        {"name": "input", "shape": [1, 576], "datatype": "FP32", "data": [[round(s / 32768, 4) for s in speech(1.2, 576)]]},
        {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": [0] * 256},
        {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]}]}))
    write("kserve_json", "every-datatype", js({"inputs": [
        {"name": dt.lower(), "shape": [2], "datatype": dt, "data": data} for dt, data in [
            ("BOOL", [True, False]), ("UINT8", [0, 255]), ("UINT16", [0, 65535]),
            ("UINT32", [0, 4294967295]), ("UINT64", [0, 18446744073709551615]),
            ("INT8", [-128, 127]), ("INT16", [-32768, 32767]), ("INT32", [-2147483648, 2147483647]),
            ("INT64", [-9223372036854775808, 9223372036854775807]), ("FP32", [3.0, -1.5e-3]),
            ("FP64", [1e-308, 2.5])]]}))
    # Nearly valid: each is refused with a reason, and gives the fuzzer the error paths.
    write("kserve_json", "bad-element", js({"inputs": [{"name": "a", "shape": [2], "datatype": "INT64", "data": [1, 1.5]}]}))
    write("kserve_json", "classification", js({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
                                               "outputs": [{"name": "z", "parameters": {"classification": 3}}]}))
    write("kserve_json", "deep-nesting", js({"inputs": [{"name": "a", "shape": [1, 1, 1, 1, 1, 1, 1, 1], "datatype": "FP32",
                                                        "data": [[[[[[[[0.25]]]]]]]]}]}))


def binary_request(inputs, outputs=None, parameters=None):
    """(json, tail): the JSON part announcing each input's binary size, and the bytes after it."""
    request = {"inputs": [], **({"outputs": outputs} if outputs else {}), **({"parameters": parameters} if parameters else {})}
    tail = b""
    for name, shape, datatype, data in inputs:
        request["inputs"].append({"name": name, "shape": shape, "datatype": datatype,
                                  "parameters": {"binary_data_size": len(data)}})
        tail += data
    return js(request).encode(), tail


def kserve_binary():
    def seed(name, json_part, tail):
        write("kserve_binary", name, struct.pack("<I", len(json_part)) + json_part + tail)

    f = struct.pack("<256f", *features(256, 4))
    seed("mlp", *binary_request([("features", [1, 256], "FP32", f)],
                                outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}]))
    seed("typed-ops", *binary_request([
        ("a", [1, 4], "INT64", struct.pack("<4q", 1, -2, 3, 2**62)),
        ("b", [1, 4], "FP64", struct.pack("<4d", 0.5, -1.25, float("inf"), float("nan"))),
        ("mask", [1, 4], "BOOL", bytes([1, 0, 1, 1]))], parameters={"binary_data_output": True}))
    seed("silero-vad", *binary_request([
        ("input", [1, 576], "FP32", struct.pack("<576f", *[s / 32768 for s in speech(2.0, 576)])),
        ("state", [2, 1, 128], "FP32", bytes(1024)),
        ("sr", [], "INT64", struct.pack("<q", 16000))]))
    # Binary and JSON inputs mixed in one request.
    json_part, tail = binary_request([("a", [1, 4], "INT32", struct.pack("<4i", 7, -1, 0, 2**31 - 1))])
    mixed = json.loads(json_part)
    mixed["inputs"].append({"name": "b", "shape": [2], "datatype": "UINT16", "data": [1, 65535]})
    seed("mixed", js(mixed).encode(), tail)
    # Nearly valid: a byte too many, a size beyond the body, a JSON length past the end.
    json_part, tail = binary_request([("x", [2], "FP32", struct.pack("<2f", 1.0, 2.0))])
    seed("extra-byte", json_part, tail + b"\0")
    seed("short-tail", json_part, tail[:5])
    write("kserve_binary", "length-past-end", struct.pack("<I", 10**6) + json_part + tail)


def tensor_bytes():
    # The harness picks the datatype by index into DataType::ALL.
    types = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"]
    samples = {"BOOL": bytes([0, 1, 1, 0]), "UINT8": bytes([0, 7, 255]), "UINT16": struct.pack("<3H", 0, 1, 65535),
               "UINT32": struct.pack("<2I", 1, 2**32 - 1), "UINT64": struct.pack("<2Q", 1, 2**64 - 1),
               "INT8": struct.pack("<3b", -128, 0, 127), "INT16": struct.pack("<3h", -32768, 0, 32767),
               "INT32": struct.pack("<2i", -1, 2**31 - 1), "INT64": struct.pack("<2q", -(2**63), 5),
               "FP32": struct.pack("<3f", 0.5, float("nan"), -float("inf")), "FP64": struct.pack("<2d", 1e-300, -0.0)}
    for i, dt in enumerate(types):
        write("tensor_bytes", dt.lower(), bytes([i]) + samples[dt])
    write("tensor_bytes", "bool-bad-byte", bytes([0, 0, 2]))
    write("tensor_bytes", "fp32-odd-length", bytes([9, 0, 0, 128, 63, 0]))


def ws_message():
    messages = {
        "start-default": {"type": "start"},
        "start-16k": {"type": "start", "sample_rate": 16000, "format": "pcm16"},
        "start-8k-f32-events": {"type": "start", "sample_rate": 8000, "format": "f32", "results": "events"},
        "start-full-vad": {"type": "start", "sample_rate": 16000, "format": "pcm16", "results": "all",
                           "vad": {"threshold": 0.5, "neg_threshold": 0.35, "min_speech_ms": 250,
                                   "min_silence_ms": 100, "speech_pad_ms": 30}},
        "start-extreme-vad": {"type": "start", "vad": {"threshold": 1.0, "neg_threshold": 0.0, "min_speech_ms": 60000,
                                                       "min_silence_ms": 0, "speech_pad_ms": 60000}},
        "resume": {"type": "start", "stream_id": "6a72498100000000000000000000abcd", "last_seq": 41},
        "end": {"type": "end"},
        "start-typo": {"type": "start", "samplerate": 8000},
        "start-44k": {"type": "start", "sample_rate": 44100},
    }
    for name, message in messages.items():
        write("ws_message", name, js(message))
    write("ws_message", "truncated", '{"type":"start",')


def ws_audio():
    s = speech(1.5, 320)
    write("ws_audio", "pcm16-640-bytes", bytes([0]) + struct.pack(f"<{len(s)}h", *s))
    f = [v / 32768 for v in speech(2.5, 300)]
    write("ws_audio", "f32-300-samples", bytes([1]) + struct.pack(f"<{len(f)}f", *f))
    write("ws_audio", "pcm16-odd", bytes([0, 1, 2, 3]))
    write("ws_audio", "f32-nan", bytes([1]) + struct.pack("<2f", 0.1, float("nan")))
    write("ws_audio", "f32-loud", bytes([1]) + struct.pack("<f", 1.5))


def riff(fmt_tag, channels, rate, bits, data, extensible=False, extra_chunk=b""):
    """A WAV file by hand, for the formats the stdlib's wave module cannot write."""
    block = channels * bits // 8
    if extensible:
        fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block, block, bits)
        sub_format = struct.pack("<H", fmt_tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, (1 << channels) - 1) + sub_format
    else:
        fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra_chunk
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav():
    s = speech(1.3, 400)
    pcm16 = struct.pack(f"<{len(s)}h", *s)
    write("wav", "pcm16-16k-mono", riff(1, 1, 16000, 16, pcm16))
    write("wav", "pcm16-8k-mono", riff(1, 1, 8000, 16, pcm16[:400]))
    write("wav", "pcm16-stereo", riff(1, 2, 16000, 16, struct.pack(f"<{2 * len(s[:200])}h", *[v for x in s[:200] for v in (x, -x)])))
    write("wav", "u8", riff(1, 1, 16000, 8, bytes((v >> 8) + 128 for v in s)))
    write("wav", "pcm24", riff(1, 1, 16000, 24, b"".join(struct.pack("<i", v << 8)[:3] for v in s[:200])))
    write("wav", "pcm32", riff(1, 1, 16000, 32, struct.pack(f"<{len(s[:200])}i", *[v << 16 for v in s[:200]])))
    write("wav", "f32", riff(3, 1, 16000, 32, struct.pack(f"<{len(s[:200])}f", *[v / 32768 for v in s[:200]])))
    write("wav", "pcm16-extensible", riff(1, 1, 16000, 16, pcm16[:400], extensible=True))
    write("wav", "f32-extensible-stereo", riff(3, 2, 8000, 32, struct.pack("<8f", *[v / 32768 for v in s[:8]]), extensible=True))
    write("wav", "list-chunk", riff(1, 1, 16000, 16, pcm16[:200], extra_chunk=b"LIST" + struct.pack("<I", 12) + b"INFOISFT\0\0\0\0"))
    write("wav", "truncated", riff(1, 1, 16000, 16, pcm16)[:300])


if __name__ == "__main__":
    for make in (kserve_json, kserve_binary, tensor_bytes, ws_message, ws_audio, wav):
        make()
