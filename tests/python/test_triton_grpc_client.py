"""Protocol compatibility over gRPC: Triton's own Python gRPC client (`tritonclient.grpc`),
unchanged, against the real streamserve binary (the same server as the HTTP client's tests,
on its gRPC port).

Inference answers are checked against ONNX Runtime's Python InferenceSession on the same
model file, so these tests prove the tensors crossed the wire (raw little-endian contents) and
the batcher unchanged.
"""

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from reference import (
    BUNDLED_MODELS,
    assert_mlp_result,
    features,
    infer_error,
    reference,
)


@pytest.fixture(scope="module")
def client(server_grpc_addr):
    c = grpcclient.InferenceServerClient(url=server_grpc_addr)
    yield c
    c.close()


def mlp_input(x):
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


# --------------------------------------------------------------------------------------------
# health and metadata


def test_server_live_and_ready(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    for name in sorted(BUNDLED_MODELS):
        assert client.is_model_ready(name) is True, name
    assert client.is_model_ready("mlp", model_version="1") is True


def test_server_metadata(client):
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "streamserve"
    assert meta["version"]


def test_model_metadata(client):
    meta = client.get_model_metadata("mlp")
    assert meta.name == "mlp"
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("features", "FP32", [-1, 256])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 16]),
        ("probabilities", "FP32", [-1, 16]),
    ]
    pinned = client.get_model_metadata("mlp", model_version="1", as_json=True)
    assert pinned["name"] == "mlp" and pinned["inputs"][0]["name"] == "features"
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "nope" in caught.value.message()


def test_model_config_and_repository_index(client):
    config = client.get_model_config("mlp").config
    assert config.name == "mlp"
    assert config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [256])]
    assert config.instance_group[0].count == 2
    index = client.get_model_repository_index(as_json=True)
    rows = {row["name"]: row for row in index["models"]}
    assert set(rows) == BUNDLED_MODELS, index
    assert all(row["state"] == "READY" and row["version"] == "1" for row in rows.values())


def test_model_repository_load_and_unload(client, admin_token):
    """`unload_model` and `load_model` as a Triton user calls them: with the admin token (gRPC
    metadata keys are lower case)."""
    auth = {"authorization": f"Bearer {admin_token}"}
    with pytest.raises(InferenceServerException, match="admin token"):
        client.unload_model("mlp_small")
    client.unload_model("mlp_small", headers=auth)
    index = client.get_model_repository_index(as_json=True)
    states = {row["name"]: row["state"] for row in index["models"]}
    assert states["mlp_small"] == "UNLOADED", states
    client.load_model("mlp_small", headers=auth)
    assert client.is_model_ready("mlp_small")
    index = client.get_model_repository_index(as_json=True)
    states = {row["name"]: row["state"] for row in index["models"]}
    assert states["mlp_small"] == "READY", states


# --------------------------------------------------------------------------------------------
# unary inference


def test_mlp_infer_numpy(client, repo_root):
    x = features(seed=1)
    result = client.infer("mlp", [mlp_input(x)], request_id="grpc-1")
    response = result.get_response()
    assert response.model_name == "mlp"
    assert response.model_version == "1"
    assert response.id == "grpc-1"
    assert response.parameters["served_by"].string_param == "mlp:1"
    assert response.parameters["degraded"].bool_param is False
    assert response.parameters["batch_size"].int64_param >= 4
    assert_mlp_result(result, reference(repo_root, "mlp", {"features": x}))


def test_requested_output_and_version_pinning(client, repo_root):
    x = features(seed=2, rows=3)
    result = client.infer(
        "mlp",
        [mlp_input(x)],
        model_version="1",
        outputs=[grpcclient.InferRequestedOutput("probabilities")],
    )
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    assert result.as_numpy("logits") is None
    assert_mlp_result(result, reference(repo_root, "mlp", {"features": x}), names=("probabilities",))
    error = infer_error(client, "mlp", [mlp_input(x)], model_version="9")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "no version '9'" in error.message()


def test_typed_ops_every_datatype(client, repo_root):
    rng = np.random.default_rng(3)
    a = rng.integers(-1_000_000, 1_000_000, size=(2, 4), dtype=np.int64)
    a[0, 0] = 9007199254740993  # beyond double precision: must come back exactly
    b = rng.standard_normal((2, 4))
    mask = rng.random((2, 4)) < 0.5
    mask[0, 0] = True  # so that `masked` carries it
    inputs = []
    for name, value, datatype in (("a", a, "INT64"), ("b", b, "FP64"), ("mask", mask, "BOOL")):
        t = grpcclient.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    result = client.infer("typed_ops", inputs)
    expected = reference(repo_root, "typed_ops", {"a": a, "b": b, "mask": mask})
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_bad_requests_get_their_status(client):
    wrong_shape = grpcclient.InferInput("features", [1, 255], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 255), dtype=np.float32))
    error = infer_error(client, "mlp", [wrong_shape])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "dimension 1 must be 256" in error.message()
    wrong_type = grpcclient.InferInput("features", [1, 256], "FP64")
    wrong_type.set_data_from_numpy(np.zeros((1, 256), dtype=np.float64))
    error = infer_error(client, "mlp", [wrong_type])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must be FP32" in error.message()
    error = infer_error(client, "nope", [mlp_input(features(seed=4, rows=1))])
    assert error.status() == "StatusCode.NOT_FOUND"
    # The client and the server carry on.
    assert client.infer("mlp", [mlp_input(features(seed=5, rows=1))]).as_numpy("logits").shape == (1, 16)


def test_timeout_zero_is_no_timeout_as_in_triton(client, repo_root):
    # tritonclient sends `timeout` as Triton's int64 request parameter (microseconds); in
    # Triton 0 means no timeout, not a deadline already passed.
    x = features(seed=6, rows=2)
    result = client.infer("mlp", [mlp_input(x)], timeout=0)
    assert_mlp_result(result, reference(repo_root, "mlp", {"features": x}))
    # A timeout that has passed before the request is queued is still one.
    error = infer_error(client, "mlp", [mlp_input(x)], timeout=1)
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED", error


def test_compressed_requests_as_tritonclient_sends_them(client, repo_root):
    # `compression_algorithm` compresses each request (Triton takes gzip and deflate); it was
    # UNIMPLEMENTED here.
    x = features(seed=7, rows=3)
    expected = reference(repo_root, "mlp", {"features": x})
    for algorithm in ("gzip", "deflate"):
        result = client.infer("mlp", [mlp_input(x)], compression_algorithm=algorithm)
        assert_mlp_result(result, expected)
    answers = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), compression_algorithm="gzip"
    )
    try:
        client.async_stream_infer("mlp", [mlp_input(x)], request_id="zipped")
        result, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is None, error
    assert_mlp_result(result, expected)


# --------------------------------------------------------------------------------------------
# streaming: start_stream / async_stream_infer


def test_stream_infer_answers_each_request_and_survives_a_bad_one(client, repo_root):
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        inputs = [features(seed=100 + i, rows=1 + i % 3) for i in range(6)]
        for i, x in enumerate(inputs):
            client.async_stream_infer("mlp", [mlp_input(x)], request_id=f"s-{i}")
            if i == 2:
                bad = grpcclient.InferInput("features", [1, 255], "FP32")
                bad.set_data_from_numpy(np.zeros((1, 255), dtype=np.float32))
                client.async_stream_infer("mlp", [bad], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(len(inputs) + 1)]
    finally:
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1, errors
    assert "dimension 1 must be 256" in errors[0].message()
    results = {r.get_response().id: r for r, error in got if error is None}
    assert sorted(results) == sorted(f"s-{i}" for i in range(len(inputs)))
    for i, x in enumerate(inputs):
        assert_mlp_result(results[f"s-{i}"], reference(repo_root, "mlp", {"features": x}))
    # Answers come in request order, the bad one in its place.
    order = [r.get_response().id if error is None else "bad" for r, error in got]
    assert order == ["s-0", "s-1", "s-2", "bad", "s-3", "s-4", "s-5"], order


# --------------------------------------------------------------------------------------------
# speech streams: Triton's sequence API (sequence_id / sequence_start / sequence_end)


def test_a_sequence_streams_speech_and_finds_what_the_one_shot_endpoint_finds(
    client, server_addr, repo_root
):
    import json
    import urllib.request
    import wave

    path = repo_root / "tests" / "audio" / "two_phrases_16k.wav"
    with wave.open(str(path), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    with open(path, "rb") as f:
        request = urllib.request.Request(
            f"http://{server_addr}/v1/models/silero_vad/segments", data=f.read(), method="POST"
        )
    with urllib.request.urlopen(request, timeout=30) as r:
        want = json.load(r)

    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        steps = [pcm[i : i + 4096] for i in range(0, len(pcm), 4096)]
        for i, samples in enumerate(steps):
            audio = grpcclient.InferInput("AUDIO", [len(samples)], "INT16")
            audio.set_data_from_numpy(samples)
            client.async_stream_infer(
                "silero_vad",
                [audio],
                request_id=f"step-{i}",
                sequence_id=42,
                sequence_start=i == 0,
                sequence_end=i == len(steps) - 1,
            )
            if i == 3:
                # A step of a sequence this stream never started: an error in its place.
                client.async_stream_infer(
                    "silero_vad", [audio], request_id="stray", sequence_id=43
                )
        got = [answers.get(timeout=30) for _ in range(len(steps) + 1)]
    finally:
        client.stop_stream()

    errors = [(i, error) for i, (_, error) in enumerate(got) if error is not None]
    assert len(errors) == 1 and errors[0][0] == 4, errors
    assert "is not running on this call" in errors[0][1].message()
    results = [result for result, error in got if error is None]
    assert [r.get_response().id for r in results] == [f"step-{i}" for i in range(len(steps))]
    first = results[0].get_response()
    assert first.model_version == "1"
    assert len(first.parameters["stream_id"].string_param) == 32
    probabilities = np.concatenate([r.as_numpy("probability") for r in results])
    assert len(probabilities) == want["chunks"]
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    starts = np.concatenate([r.as_numpy("speech_start") for r in results])
    segments = results[-1].as_numpy("segments")
    assert segments.shape == (len(want["segments"]), 2)
    assert len(starts) == len(want["segments"])
    for (start, end), one_shot in zip(segments, want["segments"]):
        assert start == pytest.approx(one_shot["start"], abs=1e-3)
        assert end == pytest.approx(one_shot["end"], abs=1e-3)
    assert results[-1].get_response().parameters["duration"].double_param == pytest.approx(
        want["duration"], abs=0.04
    )
