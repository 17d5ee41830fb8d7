"""What onnxruntime's CPU provider does with a 16-bit activation QDQ around MatMul / Gemm / Conv, against 8-bit.

    python tools/act16_kernels.py            # JSON on stdout

For each op and activation width (uint8 / uint16, asymmetric, opset 21), one layer reading
QuantizeLinear -> DequantizeLinear(x) and DequantizeLinear(int8 weight, per output channel), with
the output QDQ'd too for Conv (what onnx-gpfq writes, so QLinearConv can form): the node types of
the graph onnxruntime's optimiser produces (default session options) and the latency per run (one
intra-op thread, median of 7 blocks of runs). Shapes as in a BERT-base-like FFN (64 tokens x 1536
-> 384) and a 3x3 conv (64 -> 64 channels, 56x56). This is the run-time cost of --act-bits auto's
promotions (onnx_gpfq/mixed.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as common  # noqa: E402


def layer(op: str, bits: int) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    rng = np.random.default_rng(0)
    dt = np.uint8 if bits == 8 else np.uint16
    zp = 128 if bits == 8 else 32768
    if op == "Conv":
        x_shape, w = (1, 64, 56, 56), rng.integers(-127, 128, (64, 64, 3, 3)).astype(np.int8)
    else:
        x_shape, w = (64, 1536), rng.integers(-127, 128, (1536, 384)).astype(np.int8)
    n_out = w.shape[0] if op == "Conv" else w.shape[1]
    inits = [numpy_helper.from_array(np.array(4.0 / (255 if bits == 8 else 65535), np.float32), "xs"),
             numpy_helper.from_array(np.array(zp, dt), "xz"), numpy_helper.from_array(w, "wq"),
             numpy_helper.from_array(np.full(n_out, 1e-3, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n_out, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0 if op == "Conv" else 1)]
    if op == "Conv":
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "ys"), numpy_helper.from_array(np.array(zp, dt), "yz")]
        nodes += [helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
                  helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    else:
        nodes.append(helper.make_node(op, ["xd", "wd"], ["y"]))
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), x_shape


def measure(op: str, bits: int, work: str) -> dict:
    import onnxruntime as ort

    model, x_shape = layer(op, bits)
    path = os.path.join(work, f"{op}{bits}.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = path
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    for _ in range(10):
        session.run(None, {"x": x})
    blocks = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(20):
            session.run(None, {"x": x})
        blocks.append((time.perf_counter() - t0) / 20)
    return {"op": op, "act_bits": bits, "optimised_nodes": [n.op_type for n in onnx.load(path).graph.node],
            "ms": 1000 * float(np.median(blocks))}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="act16-") as work:
        rows = [measure(op, bits, work) for op in ("MatMul", "Gemm", "Conv") for bits in (8, 16)]
    for op in ("MatMul", "Gemm", "Conv"):
        r8, r16 = (next(r for r in rows if r["op"] == op and r["act_bits"] == b) for b in (8, 16))
        r16["slowdown_vs_8bit"] = r16["ms"] / r8["ms"]
    print(json.dumps({"machine": common.machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
