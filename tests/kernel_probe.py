"""Probes of onnxruntime's int8 kernels on the CPU this runs on, printed as JSON (run by test_cpu_kernels.py,
under ``qemu-x86_64 -cpu Haswell`` to see the AVX2 kernels of a CPU without VNNI).

- matmul: a QDQ MatMul with random uint8 activations and unbounded int8 codes; onnxruntime's output
  (MatMulIntegerToFloat, scales 1, zero points 0: the int32 accumulator itself) against the exact product
  and against onnx_gpfq.cpu.saturating_u8s8_matmul.
- bounded: the same MatMul with the extreme codes the ``any`` target allows per pair (same sign summing to
  128, opposite signs up to +-127/-128) and activations of 0 and 255: equal to the exact product.
- conv: a QDQ Conv whose output channel n holds codes of 127 at two fan-in positions (i, j) and 0
  elsewhere, fed activations of 255: the channels whose output saturated are the pairs the kernel adds.
"""

import itertools
import json
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq.cpu import int8_path, saturating_u8s8_matmul


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qdq_graph(layer, codes, axis, x_shape, out_scale=None):
    c = lambda a, n: numpy_helper.from_array(np.asarray(a), n)
    n_out = codes.shape[axis]
    inits = [c(np.float32(1), "sx"), c(np.uint8(0), "zx"), c(codes.astype(np.int8), "wq"),
             c(np.ones(n_out, np.float32), "sw"), c(np.zeros(n_out, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=axis), layer]
    if out_scale is not None:  # output QDQ, so that onnxruntime fuses a QLinearConv
        inits += [c(np.float32(out_scale), "sy"), c(np.uint8(0), "zy")]
        nodes += [helper.make_node("QuantizeLinear", ["y0", "sy", "zy"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmul_probe(m=8, k=37, n=16, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(128, 256, (m, k)).astype(np.uint8)
    b = rng.integers(-127, 128, (k, n)).astype(np.int8)
    layer = helper.make_node("MatMul", ["xd", "wd"], ["y"])
    y = _session(_qdq_graph(layer, b, 1, [m, k])).run(None, {"x": a.astype(np.float32)})[0]
    exact = a.astype(np.int64) @ b.astype(np.int64)
    return {"equals_exact": bool(np.array_equal(y, exact)),
            "equals_saturating_model": bool(np.array_equal(y, saturating_u8s8_matmul(a, b)))}


def bounded_probe():
    cols = [(127, -128), (-128, 127), (127, -127), (127, 1), (1, 127), (-127, -1), (64, 64), (-64, -64), (-128, 0),
            (0, -128), (100, 28), (-100, -28)]
    b = np.array(cols, np.int8).T  # (2, n)
    a = np.array([[0, 0], [0, 255], [255, 0], [255, 255], [255, 128], [17, 255]], np.uint8)
    layer = helper.make_node("MatMul", ["xd", "wd"], ["y"])
    y = _session(_qdq_graph(layer, b, 1, list(a.shape))).run(None, {"x": a.astype(np.float32)})[0]
    return {"equals_exact": bool(np.array_equal(y, a.astype(np.int64) @ b.astype(np.int64)))}


def conv_probe(c=3, kernel=(3, 3), group=1):
    k = c * int(np.prod(kernel))
    combos = list(itertools.combinations(range(k), 2))
    per_group = len(combos)
    codes = np.zeros((per_group * group, k), np.int8)
    for g in range(group):
        for n, (i, j) in enumerate(combos):
            codes[g * per_group + n, [i, j]] = 127
    shape = [1, c * group, *(s + 2 for s in kernel)]
    layer = helper.make_node("Conv", ["xd", "wd"], ["y0"], group=group)
    model = _qdq_graph(layer, codes.reshape(per_group * group, c, *kernel), 0, shape, out_scale=256.0)
    y = _session(model).run(None, {"x": np.full(shape, 255, np.float32)})[0]
    centre = y[0, :per_group, y.shape[2] // 2, y.shape[3] // 2]
    exact = np.round(255 * 254 / 256) * 256
    return sorted([list(p) for p, v in zip(combos, centre) if abs(v - exact) > 1])


if __name__ == "__main__":
    probes = {"int8_path": int8_path(), "matmul": matmul_probe(), "bounded": bounded_probe()}
    for spec in sys.argv[1:]:  # "c:kh,kw:group"
        c, kernel, group = spec.split(":")
        probes[f"conv {spec}"] = conv_probe(int(c), tuple(int(v) for v in kernel.split(",")), int(group))
    print(json.dumps(probes))
