#!/usr/bin/env python3
"""Peers measured in the same run as the criterion benches (see benches/run.sh):

- onnxruntime (one intra-op thread) running the feed model's deep layers (429 -> 256 -> 128 -> 1,
  ReLU) on a batch of 200 rows: the same shapes and batch as `engine_feed/deep_layers_only_200`;
- numpy's OpenBLAS sgemm peak on one thread for the 256x512x256 product of `sgemm/gemm_256x512x256`.

Prints one JSON object per line.
"""
import json
import os
import time

import numpy as np


def bench(fn, seconds=3.0):
    for _ in range(20):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            fn()
        n += 20
    return (time.perf_counter() - start) / n


def onnx_mlp(batch=200, dims=(429, 256, 128, 1)):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out]))
        if i + 2 < len(dims):
            nodes.append(helper.make_node("Relu", [out], [out + "r"]))
            out += "r"
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, dims[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [batch, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((batch, dims[0])).astype(np.float32)
    t = bench(lambda: sess.run(None, {"x": x}))
    return {"peer": "onnxruntime", "version": ort.__version__, "what": "deep_layers_200",
            "seconds_per_batch": t, "items_per_second": batch / t}


def numpy_sgemm(m=256, k=512, n=256):
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    t = bench(lambda: a @ b)
    return {"peer": "numpy-openblas", "version": np.__version__, "what": "sgemm_256x512x256",
            "seconds": t, "gflops": 2 * m * k * n / t / 1e9}


if __name__ == "__main__":
    print(json.dumps(onnx_mlp()))
    print(json.dumps(numpy_sgemm()))
