"""What both Triton client suites (HTTP and gRPC) check answers against: ONNX Runtime's own
Python InferenceSession on the same model file, seeded features, and the shared assertions."""

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

RTOL = 1e-5
ATOL = 1e-6
BUNDLED_MODELS = {
    "mlp", "mlp_small", "typed_ops", "silero_vad", "vad_energy",
    "ww_melspec", "ww_embedding", "hey_marvin",
}

_sessions = {}


def reference(repo_root, model, feeds):
    """ONNX Runtime's own answer for `model` (version 1) on `feeds`, as {output name: array}."""
    if model not in _sessions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        _sessions[model] = ort.InferenceSession(
            str(repo_root / "models" / model / "1" / "model.onnx"),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
    session = _sessions[model]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def features(seed, rows=4):
    return np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)


def assert_mlp_result(result, expected, names=("logits", "probabilities")):
    for name in names:
        got = result.as_numpy(name)
        assert got is not None, f"output '{name}' missing from {result.get_response()}"
        assert got.dtype == np.float32, (name, got.dtype)
        assert got.shape == expected[name].shape, (name, got.shape)
        np.testing.assert_allclose(got, expected[name], rtol=RTOL, atol=ATOL, err_msg=name)


def infer_error(client, *args, **kwargs):
    with pytest.raises(InferenceServerException) as caught:
        client.infer(*args, **kwargs)
    return caught.value
