"""FastAPI + uvicorn + onnxruntime peer of streamserve for `loadgen bench`.

Serves the `mlp` model with the Open Inference Protocol REST shape streamserve uses:

    POST /v2/models/mlp/infer
    {"inputs": [{"name": "features", "shape": [R, 256], "datatype": "FP32", "data": [...]}]}
 -> {"model_name": "mlp", "model_version": "1",
     "outputs": [{"name": "logits", ...FP32 [R, 16]}, {"name": "probabilities", ...}]}

The binary tensor data extension (`Inference-Header-Content-Length`, raw little-endian f32
after the JSON header, `binary_data_output`) is understood too. No batching across requests:
each request is one `InferenceSession.run`, on the event loop of its uvicorn worker
process (a typical minimal Python deployment). One session per worker process,
intra_op_num_threads = 1, so that `--workers 2` matches streamserve's 2 replicas x 1 thread.

Run (loopback only):
    PEER_MODEL=models/mlp/1/model.onnx \
    python -m uvicorn fastapi_peer:app --app-dir load-tests/peers --host 127.0.0.1 --port 8090 --workers 2
"""

import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request, Response

MODEL_NAME = "mlp"
FEATURES = 256
INPUT = "features"

_here = os.path.dirname(os.path.abspath(__file__))
MODEL_PATH = os.environ.get(
    "PEER_MODEL", os.path.join(_here, "..", "..", "models", "mlp", "1", "model.onnx")
)

_options = ort.SessionOptions()
_options.intra_op_num_threads = 1
_options.inter_op_num_threads = 1
_session = ort.InferenceSession(MODEL_PATH, _options, providers=["CPUExecutionProvider"])
_output_names = [o.name for o in _session.get_outputs()]

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


def _error(status: int, message: str) -> Response:
    return Response(
        content=json.dumps({"error": message}), status_code=status, media_type="application/json"
    )


@app.get("/v2/health/ready")
async def ready() -> Response:
    return Response(status_code=200)


@app.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request) -> Response:
    if model != MODEL_NAME:
        return _error(404, f"unknown model {model}")
    body = await request.body()
    header_length = request.headers.get("inference-header-content-length")
    try:
        if header_length is not None:
            n = int(header_length)
            req = json.loads(body[:n])
            binary = body[n:]
        else:
            req = json.loads(body)
            binary = b""
        (inp,) = req["inputs"]
        if inp.get("name") != INPUT or inp.get("datatype") != "FP32":
            return _error(400, "expected one FP32 input named 'features'")
        shape = [int(d) for d in inp["shape"]]
        if len(shape) != 2 or shape[1] != FEATURES:
            return _error(400, "features must be [rows, 256]")
        if "data" in inp:
            x = np.asarray(inp["data"], dtype=np.float32).reshape(shape)
        else:
            size = int(inp["parameters"]["binary_data_size"])
            x = np.frombuffer(binary[:size], dtype="<f4").reshape(shape)
    except (ValueError, KeyError, TypeError) as e:
        return _error(400, f"bad request: {e}")
    outputs = _session.run(_output_names, {INPUT: x})
    want_binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
    answer = {"model_name": MODEL_NAME, "model_version": "1", "outputs": []}
    tail = b""
    for name, y in zip(_output_names, outputs):
        out = {"name": name, "datatype": "FP32", "shape": list(y.shape)}
        if want_binary:
            raw = np.ascontiguousarray(y, dtype="<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            tail += raw
        else:
            out["data"] = y.ravel().tolist()
        answer["outputs"].append(out)
    head = json.dumps(answer).encode()
    if want_binary:
        return Response(
            content=head + tail,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
    return Response(content=head, media_type="application/json")
