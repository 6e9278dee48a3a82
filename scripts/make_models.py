#!/usr/bin/env python3
"""Generate the project's own small ONNX models, byte for byte reproducibly.

    python3 scripts/make_models.py [--out models]

Weights come from numpy's PCG64 generator with fixed seeds, and the ONNX
protobuf is serialised deterministically, so running this again writes files
with the same sha256 as those committed in models/models.toml (the test suite
checks that).

Models:
  mlp        FP32 [batch, 256] -> logits/probabilities [batch, 16]; two 1024-wide
             hidden layers (~1.3 M weights), heavy enough that micro-batching pays.
  mlp_small  the same interface with one 32-wide hidden layer: the cheap fallback
             for `mlp` in degraded mode.
  vad_energy an energy-threshold voice activity detector with Silero VAD's interface
             (input [B, N], state [2, B, 128], sr -> output [B, 1], stateN): the cheap
             fallback for silero_vad in degraded mode. The state passes through unchanged.
  mlp_slow   mlp's interface, made slow on purpose (one 512x512 layer applied 1000 times,
             several ms a call): not in models.toml; the registry tests push it as a new
             version of `mlp` that a canary's latency gate must roll back.
  typed_ops  mixed datatypes (INT64, FP64, BOOL in; FP64, INT64, BOOL, INT32 out) to
             exercise the protocol's datatype handling with exactly checkable answers.
"""
import argparse
import hashlib
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def dense_layers(prefix, sizes, seed):
    """He-initialised weights for a stack of Gemm layers."""
    rng = np.random.Generator(np.random.PCG64(seed))
    inits = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{prefix}_w{i}"))
        inits.append(numpy_helper.from_array(b, f"{prefix}_b{i}"))
    return inits


def mlp(name, hidden, seed, in_features=256, classes=16):
    sizes = [in_features, *hidden, classes]
    inits = dense_layers(name, sizes, seed)
    nodes = []
    current = "features"
    for i in range(len(sizes) - 1):
        out = "logits" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"{name}_w{i}", f"{name}_b{i}"], [out + ("" if out == "logits" else "_pre")]))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out + "_pre"], [out]))
        current = out
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", in_features])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        ],
        inits,
    )
    return graph


def mlp_slow(repeats=1000, in_features=256, width=512, classes=16, seed=20261204):
    """features -> x W_in -> tanh(x W) `repeats` times (one shared weight) -> logits."""
    rng = np.random.Generator(np.random.PCG64(seed))
    w_in = (rng.standard_normal((in_features, width)) / np.sqrt(in_features)).astype(np.float32)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    w_out = (rng.standard_normal((width, classes)) / np.sqrt(width)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w_in, "slow_in"),
        numpy_helper.from_array(w, "slow_w"),
        numpy_helper.from_array(w_out, "slow_out"),
    ]
    nodes = [helper.make_node("MatMul", ["features", "slow_in"], ["x"])]
    current = "x"
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [current, "slow_w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        current = f"t{i}"
    nodes.append(helper.make_node("MatMul", [current, "slow_out"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    return helper.make_graph(
        nodes,
        "mlp_slow",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", in_features])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        ],
        inits,
    )


def typed_ops():
    zero = numpy_helper.from_array(np.zeros((), dtype=np.int64), "zero_i64")
    zero_f = numpy_helper.from_array(np.zeros((), dtype=np.float64), "zero_f64")
    nodes = [
        helper.make_node("Cast", ["a"], ["a_f64"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["a_f64", "b"], ["sum"]),
        helper.make_node("Where", ["mask", "a", "zero_i64"], ["masked"]),
        helper.make_node("Greater", ["b", "zero_f64"], ["positive"]),
        helper.make_node("Cast", ["masked"], ["masked_i32"], to=TensorProto.INT32),
    ]
    return helper.make_graph(
        nodes,
        "typed_ops",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.DOUBLE, ["batch", 4]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.DOUBLE, ["batch", 4]),
            helper.make_tensor_value_info("masked", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("positive", TensorProto.BOOL, ["batch", 4]),
            helper.make_tensor_value_info("masked_i32", TensorProto.INT32, ["batch", 4]),
        ],
        [zero, zero_f],
    )


def vad_energy(floor_db=-40.0, gain=0.5):
    """output = sigmoid(gain * (10 * log10(mean(x^2) + 1e-10) - floor_db)); stateN = state."""
    const = lambda name, value: numpy_helper.from_array(np.array(value, dtype=np.float32), name)
    nodes = [
        helper.make_node("Mul", ["input", "input"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["power"], axes=[1], keepdims=1),
        helper.make_node("Add", ["power", "eps"], ["power_eps"]),
        helper.make_node("Log", ["power_eps"], ["ln_power"]),
        helper.make_node("Mul", ["ln_power", "db_per_neper"], ["db"]),
        helper.make_node("Sub", ["db", "floor_db"], ["above_floor"]),
        helper.make_node("Mul", ["above_floor", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["output"]),
        helper.make_node("Identity", ["state"], ["stateN"]),
    ]
    return helper.make_graph(
        nodes,
        "vad_energy",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 128]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 128]),
        ],
        [const("eps", 1e-10), const("db_per_neper", 10.0 / np.log(10.0)), const("floor_db", floor_db), const("gain", gain)],
    )


def save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="streamserve-make-models")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = model.SerializeToString(deterministic=True)
    with open(path, "wb") as f:
        f.write(data)
    print(f"{hashlib.sha256(data).hexdigest()}  {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models"))
    args = parser.parse_args()
    save(mlp("mlp", [1024, 1024], seed=20261125), os.path.join(args.out, "mlp", "1", "model.onnx"))
    save(mlp("mlp_small", [32], seed=20261126), os.path.join(args.out, "mlp_small", "1", "model.onnx"))
    save(typed_ops(), os.path.join(args.out, "typed_ops", "1", "model.onnx"))
    save(vad_energy(), os.path.join(args.out, "vad_energy", "1", "model.onnx"))
    save(mlp_slow(), os.path.join(args.out, "mlp_slow", "1", "model.onnx"))


if __name__ == "__main__":
    main()
