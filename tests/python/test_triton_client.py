"""Protocol compatibility: Triton's own Python HTTP client (`tritonclient.http`), unchanged,
against the real streamserve binary serving the bundled models.

Every inference answer is checked against ONNX Runtime's Python InferenceSession run on the
same model file with the same input, so these tests prove the bytes went through the wire
format (JSON and the binary tensor data extension) and the batcher without being changed.
"""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from reference import (
    ATOL,
    BUNDLED_MODELS,
    RTOL,
    assert_mlp_result,
    features,
    infer_error,
    reference,
)


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def client(server_addr):
    with httpclient.InferenceServerClient(url=server_addr) as c:
        yield c


def mlp_input(x, binary_data=True):
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_data)
    return inp


# --------------------------------------------------------------------------------------------
# health


def test_server_live_and_ready(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_model_ready(client):
    for name in sorted(BUNDLED_MODELS):
        assert client.is_model_ready(name) is True, name
    assert client.is_model_ready("mlp", model_version="1") is True


def test_unknown_model_is_not_ready(client):
    try:
        ready = client.is_model_ready("nope")
    except InferenceServerException as e:  # acceptable, as long as it is a clean client error
        assert "nope" in e.message()
    else:
        assert ready is False
    try:
        ready = client.is_model_ready("mlp", model_version="9")
    except InferenceServerException as e:
        assert "9" in e.message()
    else:
        assert ready is False


# --------------------------------------------------------------------------------------------
# metadata, configuration, repository


def test_server_metadata(client):
    meta = client.get_server_metadata()
    assert meta["name"] == "streamserve"
    assert isinstance(meta["version"], str) and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata(client):
    meta = client.get_model_metadata("mlp")
    assert meta["name"] == "mlp"
    assert "1" in meta["versions"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 256]}]
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert set(outputs) == {"logits", "probabilities"}
    for name in ("logits", "probabilities"):
        assert outputs[name]["datatype"] == "FP32"
        assert outputs[name]["shape"] == [-1, 16]
    # The version-pinned route answers the same.
    pinned = client.get_model_metadata("mlp", model_version="1")
    assert pinned["inputs"] == meta["inputs"] and pinned["outputs"] == meta["outputs"]


def test_model_metadata_typed_ops_and_silero(client):
    typed = client.get_model_metadata("typed_ops")
    assert [(t["name"], t["datatype"], t["shape"]) for t in typed["inputs"]] == [
        ("a", "INT64", [-1, 4]),
        ("b", "FP64", [-1, 4]),
        ("mask", "BOOL", [-1, 4]),
    ]
    assert {t["name"]: t["datatype"] for t in typed["outputs"]} == {
        "sum": "FP64",
        "masked": "INT64",
        "positive": "BOOL",
        "masked_i32": "INT32",
    }
    vad = client.get_model_metadata("silero_vad")
    inputs = {t["name"]: t for t in vad["inputs"]}
    assert inputs["sr"]["datatype"] == "INT64" and inputs["sr"]["shape"] == []
    assert inputs["state"]["shape"][0] == 2 and inputs["state"]["shape"][2] == 128


def test_model_config(client):
    config = client.get_model_config("mlp")
    assert config["name"] == "mlp"
    assert config["max_batch_size"] == 64
    # Triton's convention: with batching on, dims leave out the batch axis.
    assert config["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [256]}]
    assert {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]} == {
        "logits": ("TYPE_FP32", [16]),
        "probabilities": ("TYPE_FP32", [16]),
    }
    assert client.get_model_config("mlp", model_version="1")["name"] == "mlp"


def test_model_repository_index(client):
    index = client.get_model_repository_index()
    assert isinstance(index, list)
    rows = {row["name"]: row for row in index}
    assert set(rows) == BUNDLED_MODELS, index
    for name, row in rows.items():
        assert row["state"] == "READY", row
        assert row["version"] == "1", row


def test_model_repository_load_and_unload(client, admin_token):
    """`unload_model` and `load_model` as a Triton user calls them: with the admin token."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    with pytest.raises(InferenceServerException, match="admin token"):
        client.unload_model("mlp_small")
    client.unload_model("mlp_small", headers=auth)
    states = {row["name"]: row["state"] for row in client.get_model_repository_index()}
    assert states["mlp_small"] == "UNLOADED", states
    with pytest.raises(InferenceServerException, match="'config'"):
        client.load_model("mlp_small", headers=auth, config='{"max_batch_size": 4}')
    client.load_model("mlp_small", headers=auth)
    states = {row["name"]: row["state"] for row in client.get_model_repository_index()}
    assert states["mlp_small"] == "READY", states
    assert client.is_model_ready("mlp_small")


# --------------------------------------------------------------------------------------------
# inference: mlp, every combination of request and response encodings


OUTPUT_MODES = ["all-default", "out-binary", "out-json", "out-mixed"]


@pytest.mark.parametrize("input_binary", [True, False], ids=["in-binary", "in-json"])
@pytest.mark.parametrize("output_mode", OUTPUT_MODES)
def test_mlp_infer(client, repo_root, input_binary, output_mode):
    x = features(seed=2 * OUTPUT_MODES.index(output_mode) + int(input_binary))
    expected = reference(repo_root, "mlp", {"features": x})
    if output_mode == "all-default":
        outputs = None  # the client then asks for every output, binary (binary_data_output)
    elif output_mode == "out-binary":
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("logits", "probabilities")]
    elif output_mode == "out-json":
        outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("logits", "probabilities")]
    else:
        # Listed in the opposite order of the model's outputs, with different encodings, so a
        # response that pairs encodings with the wrong outputs cannot pass.
        outputs = [
            httpclient.InferRequestedOutput("probabilities", binary_data=False),
            httpclient.InferRequestedOutput("logits", binary_data=True),
        ]
    result = client.infer("mlp", [mlp_input(x, binary_data=input_binary)], outputs=outputs)
    response = result.get_response()
    assert response["model_name"] == "mlp"
    assert response["model_version"] == "1"
    assert_mlp_result(result, expected)

    # The encoding of each output is the one that was asked for.
    want_binary = {
        "all-default": {"logits": True, "probabilities": True},
        "out-binary": {"logits": True, "probabilities": True},
        "out-json": {"logits": False, "probabilities": False},
        "out-mixed": {"logits": True, "probabilities": False},
    }[output_mode]
    for name, binary in want_binary.items():
        out = result.get_output(name)
        assert out["datatype"] == "FP32" and out["shape"] == [4, 16], out
        if binary:
            assert (out.get("parameters") or {}).get("binary_data_size") == 4 * 16 * 4, out
            assert "data" not in out, out
        else:
            assert "data" in out and len(out["data"]) == 4 * 16, out
            assert "binary_data_size" not in (out.get("parameters") or {}), out


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_mlp_single_requested_output(client, repo_root, binary):
    x = features(seed=7, rows=3)
    expected = reference(repo_root, "mlp", {"features": x})
    result = client.infer(
        "mlp",
        [mlp_input(x, binary_data=binary)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)],
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probabilities"]
    assert result.as_numpy("logits") is None
    assert_mlp_result(result, expected, names=("probabilities",))


def test_request_id_is_echoed(client, repo_root):
    x = features(seed=11, rows=1)
    result = client.infer("mlp", [mlp_input(x)], request_id="req-42")
    assert result.get_response()["id"] == "req-42"
    assert_mlp_result(result, reference(repo_root, "mlp", {"features": x}))


# --------------------------------------------------------------------------------------------
# inference: mixed datatypes


def typed_inputs(rows, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-1_000_000, 1_000_000, size=(rows, 4), dtype=np.int64)
    b = rng.standard_normal((rows, 4)) * 1000.0
    b[0, 0] = 0.0  # not positive
    b[0, 1] = -0.0  # not positive either
    b[0, 2] = 0.1  # not exactly representable: must still round-trip exactly
    mask = rng.random((rows, 4)) < 0.5
    mask[0, :2] = [True, False]
    return a, b.astype(np.float64), mask


def typed_request(a, b, mask, binary):
    tensors = []
    for name, value, datatype in (("a", a, "INT64"), ("b", b, "FP64"), ("mask", mask, "BOOL")):
        t = httpclient.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value, binary_data=binary)
        tensors.append(t)
    return tensors


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_typed_ops(client, repo_root, binary):
    a, b, mask = typed_inputs(rows=5, seed=3 if binary else 4)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("sum", "masked", "positive", "masked_i32")
    ]
    result = client.infer("typed_ops", typed_request(a, b, mask, binary), outputs=outputs)
    assert result.get_response()["model_version"] == "1"
    got = {n: result.as_numpy(n) for n in ("sum", "masked", "positive", "masked_i32")}

    assert got["sum"].dtype == np.float64
    np.testing.assert_array_equal(got["sum"], a.astype(np.float64) + b)
    assert got["masked"].dtype == np.int64
    np.testing.assert_array_equal(got["masked"], np.where(mask, a, 0))
    assert got["positive"].dtype == np.bool_
    np.testing.assert_array_equal(got["positive"], b > 0)
    assert got["masked_i32"].dtype == np.int32
    np.testing.assert_array_equal(got["masked_i32"], np.where(mask, a, 0).astype(np.int32))

    expected = reference(repo_root, "typed_ops", {"a": a, "b": b, "mask": mask})
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
        assert got[name].shape == (5, 4)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_typed_ops_int64_beyond_double_precision(client, binary):
    """INT64 values that a double cannot hold must cross JSON and binary encodings exactly."""
    a = np.array([[2**53 + 1, -(2**62) - 3, 2**63 - 1, -(2**63)]], dtype=np.int64)
    b = np.zeros((1, 4), dtype=np.float64)
    mask = np.ones((1, 4), dtype=bool)
    result = client.infer(
        "typed_ops",
        typed_request(a, b, mask, binary),
        outputs=[httpclient.InferRequestedOutput("masked", binary_data=binary)],
    )
    np.testing.assert_array_equal(result.as_numpy("masked"), a)


# --------------------------------------------------------------------------------------------
# inference: silero_vad (no batch axis, a scalar input)


def vad_chunks(count):
    rng = np.random.default_rng(123)
    t = np.arange(576 * count, dtype=np.float64) / 16000.0
    audio = 0.3 * np.sin(2 * np.pi * 220.0 * t) + 0.05 * rng.standard_normal(t.shape)
    return [audio[i * 576:(i + 1) * 576].astype(np.float32).reshape(1, 576) for i in range(count)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_silero_vad_stateful_sequence(client, repo_root, binary):
    # tritonclient expresses a scalar as shape [] with a 0-d numpy array: binary, it sends
    # 8 bytes; as JSON, "data": [16000].
    state = np.zeros((2, 1, 128), dtype=np.float32)
    ref_state = state
    sr = np.array(16000, dtype=np.int64)
    for chunk in vad_chunks(3):
        inputs = []
        for name, value, datatype in (("input", chunk, "FP32"), ("state", state, "FP32"), ("sr", sr, "INT64")):
            t = httpclient.InferInput(name, list(value.shape), datatype)
            t.set_data_from_numpy(value, binary_data=binary)
            inputs.append(t)
        assert inputs[2].shape() == []
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("output", "stateN")]
        result = client.infer("silero_vad", inputs, outputs=outputs)
        assert result.get_response()["model_version"] == "1"
        expected = reference(repo_root, "silero_vad", {"input": chunk, "state": ref_state, "sr": sr})
        got_out = result.as_numpy("output")
        got_state = result.as_numpy("stateN")
        assert got_out.dtype == np.float32 and got_out.shape == expected["output"].shape == (1, 1)
        assert got_state.dtype == np.float32 and got_state.shape == expected["stateN"].shape == (2, 1, 128)
        np.testing.assert_allclose(got_out, expected["output"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got_state, expected["stateN"], rtol=RTOL, atol=ATOL)
        # Carry the state forward on both sides, as a streaming VAD client does.
        state = got_state.copy()
        ref_state = expected["stateN"]


def test_silero_vad_scalar_via_plain_json(server_addr, repo_root):
    """The same scalar, sent as plain KServe v2 JSON with urllib (no tritonclient)."""
    chunk = vad_chunks(1)[0]
    state = np.zeros((2, 1, 128), dtype=np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 576], "datatype": "FP32", "data": chunk.ravel().tolist()},
            {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": state.ravel().tolist()},
            {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]},
        ]
    }
    request = urllib.request.Request(
        f"http://{server_addr}/v2/models/silero_vad/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        answer = json.loads(response.read())
    outputs = {o["name"]: o for o in answer["outputs"]}
    expected = reference(repo_root, "silero_vad", {"input": chunk, "state": state, "sr": np.array(16000, dtype=np.int64)})
    for name in ("output", "stateN"):
        got = np.array(outputs[name]["data"], dtype=np.float32).reshape(outputs[name]["shape"])
        np.testing.assert_allclose(got, expected[name], rtol=RTOL, atol=ATOL, err_msg=name)


# --------------------------------------------------------------------------------------------
# version pinning


def test_version_pinning(client, repo_root):
    x = features(seed=21, rows=2)
    result = client.infer("mlp", [mlp_input(x)], model_version="1")
    assert result.get_response()["model_version"] == "1"
    assert_mlp_result(result, reference(repo_root, "mlp", {"features": x}))

    error = infer_error(client, "mlp", [mlp_input(x)], model_version="9")
    assert "'9'" in error.message(), error.message()
    assert "mlp" in error.message(), error.message()
    assert error.status() == "404"


# --------------------------------------------------------------------------------------------
# errors come back as InferenceServerException carrying the server's message


def test_error_unknown_model(client):
    error = infer_error(client, "nope", [mlp_input(features(seed=1, rows=1))])
    assert error.message() == "unknown model 'nope'"
    assert error.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_error_wrong_shape(client, binary):
    x = np.zeros((4, 255), dtype=np.float32)
    error = infer_error(client, "mlp", [mlp_input(x, binary_data=binary)])
    assert error.status() == "400"
    message = error.message()
    assert "features" in message and "255" in message and "256" in message, message


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_error_wrong_datatype(client, binary):
    x = np.zeros((4, 256), dtype=np.float64)
    inp = httpclient.InferInput("features", [4, 256], "FP64")
    inp.set_data_from_numpy(x, binary_data=binary)
    error = infer_error(client, "mlp", [inp])
    assert error.status() == "400"
    message = error.message()
    assert "features" in message and "FP32" in message and "FP64" in message, message


def test_error_unknown_output(client):
    outputs = [httpclient.InferRequestedOutput("nope")]
    error = infer_error(client, "mlp", [mlp_input(features(seed=2, rows=1))], outputs=outputs)
    assert error.status() == "400"
    assert "nope" in error.message()


def test_timeout_zero_is_no_timeout(client, repo_root):
    # tritonclient sends `timeout` (microseconds) as given; Triton reads 0 as "no timeout".
    # It was a deadline already passed: every such request answered 504 and never run.
    x = features(seed=5, rows=1)
    expected = reference(repo_root, "mlp", {"features": x})
    assert_mlp_result(client.infer("mlp", [mlp_input(x)], timeout=0), expected)
    assert_mlp_result(client.infer("mlp", [mlp_input(x)], timeout=10_000_000), expected)


def test_server_still_serves_after_errors(client, repo_root):
    x = features(seed=99, rows=1)
    assert_mlp_result(client.infer("mlp", [mlp_input(x)]), reference(repo_root, "mlp", {"features": x}))


# --------------------------------------------------------------------------------------------
# optional transport features of the client


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(client, repo_root, algorithm):
    """tritonclient's request_compression_algorithm: the body goes compressed, with
    Content-Encoding: gzip|deflate (deflate meaning a zlib stream), and
    Inference-Header-Content-Length still counting the uncompressed JSON. Triton's HTTP
    endpoint decompresses such requests."""
    x = features(seed=31, rows=2)
    result = client.infer("mlp", [mlp_input(x)], request_compression_algorithm=algorithm)
    assert_mlp_result(result, reference(repo_root, "mlp", {"features": x}))


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_response(client, repo_root, algorithm):
    """tritonclient's response_compression_algorithm (Accept-Encoding): the server may answer
    compressed or not; either way the client must read the same tensors."""
    x = features(seed=32, rows=2)
    result = client.infer("mlp", [mlp_input(x)], response_compression_algorithm=algorithm)
    assert_mlp_result(result, reference(repo_root, "mlp", {"features": x}))


# --------------------------------------------------------------------------------------------
# concurrency: the batcher must never mix rows between requests


def test_concurrent_async_infer(server_addr, repo_root):
    requests = []
    for i in range(64):
        rows = 1 + i % 4
        x = features(seed=1000 + i, rows=rows)
        x[:, 0] = i  # distinct inputs, even if two seeds collided
        binary = i % 3 != 0
        outputs = None if i % 2 == 0 else [
            httpclient.InferRequestedOutput("logits", binary_data=binary),
            httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        ]
        requests.append((x, binary, outputs))
    expected = [reference(repo_root, "mlp", {"features": x}) for x, _, _ in requests]

    with httpclient.InferenceServerClient(url=server_addr, concurrency=16) as concurrent:
        handles = [
            concurrent.async_infer("mlp", [mlp_input(x, binary_data=binary)], request_id=str(i), outputs=outputs)
            for i, (x, binary, outputs) in enumerate(requests)
        ]
        results = [h.get_result(timeout=60) for h in handles]

    batch_sizes = []
    for i, (result, want) in enumerate(zip(results, expected)):
        response = result.get_response()
        assert response["id"] == str(i)
        assert response["model_version"] == "1"
        for name in ("logits", "probabilities"):
            got = result.as_numpy(name)
            assert got.shape == want[name].shape, (i, name, got.shape)
            np.testing.assert_allclose(got, want[name], rtol=RTOL, atol=ATOL, err_msg=f"request {i} output {name}")
        batch_sizes.append((response.get("parameters") or {}).get("batch_size"))
    # Not a requirement of the protocol, but shows whether the run exercised batching at all.
    print(f"server batch sizes seen: {sorted(set(b for b in batch_sizes if b is not None))}")


def test_concurrent_aio_infer_batches_without_mixing_rows(server_addr, repo_root):
    """The same check with tritonclient's asyncio client, whose requests really are in flight
    together. (`async_infer` above yields for 10 ms after each submission, so its requests
    reach the server one at a time and the batcher seldom gets two to merge.) Here the server
    must merge requests into shared batches, and each caller must get exactly its own rows."""
    import asyncio

    import tritonclient.http.aio as aioclient

    async def one_round(round_no):
        inputs = []
        for i in range(64):
            x = features(seed=5000 + 64 * round_no + i, rows=1 + i % 4)
            x[:, 1] = 100 * round_no + i
            inputs.append(x)
        async with aioclient.InferenceServerClient(url=server_addr, conn_limit=64) as c:
            results = await asyncio.gather(*[
                c.infer("mlp", [mlp_input(x, binary_data=i % 2 == 0)], request_id=f"{round_no}-{i}")
                for i, x in enumerate(inputs)
            ])
        merged = 0
        for i, (x, result) in enumerate(zip(inputs, results)):
            response = result.get_response()
            assert response["id"] == f"{round_no}-{i}"
            want = reference(repo_root, "mlp", {"features": x})
            for name in ("logits", "probabilities"):
                got = result.as_numpy(name)
                assert got.shape == want[name].shape, (i, name, got.shape)
                np.testing.assert_allclose(got, want[name], rtol=RTOL, atol=ATOL, err_msg=f"request {i} output {name}")
            if response["parameters"]["batch_size"] > x.shape[0]:
                merged += 1
        return merged

    merged = 0
    for round_no in range(5):
        merged += asyncio.run(one_round(round_no))
        print(f"round {round_no}: {merged} of 64 responses came from a batch shared with other requests")
        if merged:
            break
    assert merged > 0, "no request was ever batched with another: the batching path went untested"
