"""Why the `any` target bounds int8 codes instead of storing uint8 weights: onnxruntime's U8U8 kernels never
saturate (they widen to int16 and use vpmaddwd), but they are slower where VNNI exists.

Prints JSON: for a QDQ MatMul (64x512 @ 512x512, uint8 activations 200..255, codes -127..127) whether
onnxruntime's output equals the exact product, and ms per run (one thread), with int8 weights (zero point 0)
and with the same codes stored as uint8 (zero point 128); and for a QDQ Conv (64 -> 64, 3x3, 28x28) the ms and
the ops onnxruntime's optimizer produced. Run it natively and as an AVX2 CPU without VNNI:

    python tools/kernel_u8u8.py
    qemu-x86_64 -cpu Haswell .venv/bin/python tools/kernel_u8u8.py   # times under emulation mean nothing
"""
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
def model(wdtype, codes, zp, axis=1, conv=False, xshape=None):
    c = lambda a, n: numpy_helper.from_array(np.asarray(a), n)
    n_out = codes.shape[0] if conv else codes.shape[1]
    inits = [c(np.float32(1), "sx"), c(np.uint8(0), "zx"), c(codes.astype(wdtype), "wq"),
             c(np.ones(n_out, np.float32), "sw"), c(np.full(n_out, zp, wdtype), "zw"),
             c(np.float32(256.0), "sy"), c(np.uint8(0), "zy")]
    layer = helper.make_node("Conv", ["xd", "wd"], ["y0"], pads=[1,1,1,1]) if conv else helper.make_node("MatMul", ["xd", "wd"], ["y0"])
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0 if conv else 1), layer]
    if conv:
        nodes += [helper.make_node("QuantizeLinear", ["y0", "sy", "zy"], ["yq"]), helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    else:
        nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "p", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
def sess(m):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
m, k, n = 64, 512, 512
a = rng.integers(200, 256, (m, k)).astype(np.float32)
q = rng.integers(-127, 128, (k, n))
exact = a.astype(np.int64) @ q
out = {}
for name, wdt, codes, zp in (("s8", np.int8, q, 0), ("u8", np.uint8, q + 128, 128)):
    s = sess(model(wdt, codes, zp, xshape=[m, k]))
    y = s.run(None, {"x": a})[0]
    t = time.perf_counter(); 
    for _ in range(50): s.run(None, {"x": a})
    dt = (time.perf_counter() - t) / 50
    out[name] = {"exact": bool(np.array_equal(y, exact)), "ms": 1000 * dt}
# conv
c_, hw = 64, 28
xa = rng.integers(0, 256, (1, c_, hw, hw)).astype(np.float32)
wq = rng.integers(-20, 21, (64, c_, 3, 3))
for name, wdt, codes, zp in (("conv s8", np.int8, wq, 0), ("conv u8", np.uint8, wq + 128, 128)):
    mm = model(wdt, codes, zp, conv=True, xshape=list(xa.shape))
    s = sess(mm); y = s.run(None, {"x": xa})[0]
    t = time.perf_counter()
    for _ in range(50): s.run(None, {"x": xa})
    so = ort.SessionOptions(); so.optimized_model_filepath = "/tmp/opt.onnx"; so.log_severity_level=3
    ort.InferenceSession(mm.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = sorted({nd.op_type for nd in onnx.load("/tmp/opt.onnx").graph.node})
    out[name] = {"ms": 1000 * (time.perf_counter() - t) / 50, "ops": ops, "y_sum": float(y.sum())}
print(json.dumps(out))
