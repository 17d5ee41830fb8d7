"""How a quantized LSTM can run in onnxruntime: the float LSTM reading int8 codes through
DequantizeLinear (what onnx-gpfq emits) against com.microsoft DynamicQuantizeLSTM with the same
codes and scales (it also quantizes X and h to uint8 at run time). Prints each one's output SQNR
against the float model and its median latency over 20 runs on one thread; compare latencies only
as ratios within one run.

    python tools/bench_lstm.py
"""

import time

import numpy as np
import onnxruntime as ort
from onnx import helper as h, numpy_helper as nh, TensorProto as TP
T, N, I, H, D = 50, 16, 128, 256, 2
rng = np.random.default_rng(0)
W = (rng.standard_normal((D, 4*H, I)) / np.sqrt(I)).astype(np.float32)
R = (rng.standard_normal((D, 4*H, H)) / np.sqrt(H)).astype(np.float32)
B = (rng.standard_normal((D, 8*H)) * 0.1).astype(np.float32)
def q8(w):
    s = np.abs(w).max(axis=2) / 127  # (D, 4H)
    return np.clip(np.round(w / s[..., None]), -127, 127).astype(np.int8), s.astype(np.float32)
Wq, Ws = q8(W); Rq, Rs = q8(R)
xi = h.make_tensor_value_info("x", TP.FLOAT, [T, N, I]); yo = h.make_tensor_value_info("y", TP.FLOAT, None)
def model(nodes, inits, domain=False):
    ops = [h.make_opsetid("", 17)] + ([h.make_opsetid("com.microsoft", 1)] if domain else [])
    return h.make_model(h.make_graph(nodes, "m", [xi], [yo], inits), opset_imports=ops).SerializeToString()
lstm = lambda w, r: h.make_node("LSTM", ["x", w, r, "B"], ["y"], hidden_size=H, direction="bidirectional")
f = model([lstm("W", "R")], [nh.from_array(W, "W"), nh.from_array(R, "R"), nh.from_array(B, "B")])
inits = [nh.from_array(Wq.reshape(D*4*H, I), "Wq"), nh.from_array(Ws.reshape(-1), "Ws"), nh.from_array(Rq.reshape(D*4*H, H), "Rq"),
         nh.from_array(Rs.reshape(-1), "Rs"), nh.from_array(B, "B"), nh.from_array(np.array([D, 4*H, I], np.int64), "sw"),
         nh.from_array(np.array([D, 4*H, H], np.int64), "sr")]
dq = model([h.make_node("DequantizeLinear", ["Wq", "Ws"], ["wd"], axis=0), h.make_node("Reshape", ["wd", "sw"], ["w3"]),
            h.make_node("DequantizeLinear", ["Rq", "Rs"], ["rd"], axis=0), h.make_node("Reshape", ["rd", "sr"], ["r3"]),
            lstm("w3", "r3")], inits)
dyn_inits = [nh.from_array(np.ascontiguousarray(Wq.transpose(0, 2, 1)), "Wt"), nh.from_array(np.ascontiguousarray(Rq.transpose(0, 2, 1)), "Rt"),
             nh.from_array(B, "B"), nh.from_array(Ws, "Ws"), nh.from_array(np.zeros_like(Wq[:, :, 0]), "Wz"),
             nh.from_array(Rs, "Rs"), nh.from_array(np.zeros_like(Rq[:, :, 0]), "Rz")]
dyn = model([h.make_node("DynamicQuantizeLSTM", ["x", "Wt", "Rt", "B", "", "", "", "", "Ws", "Wz", "Rs", "Rz"], ["y"],
                         domain="com.microsoft", hidden_size=H, direction="bidirectional")], dyn_inits, domain=True)
x = rng.standard_normal((T, N, I)).astype(np.float32)
so = ort.SessionOptions(); so.intra_op_num_threads = 1
sess = {k: ort.InferenceSession(m, so, providers=["CPUExecutionProvider"]) for k, m in [("float", f), ("dq->LSTM", dq), ("DynamicQuantizeLSTM", dyn)]}
ref = sess["float"].run(None, {"x": x})[0]
for k, s in sess.items():
    y = s.run(None, {"x": x})[0]
    ts = []
    for _ in range(20):
        t0 = time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter() - t0)
    snr = "-" if k == "float" else f"{10*np.log10((ref**2).sum()/((ref-y)**2).sum()):.1f}"
    print(f"{k:22s} SQNR {snr:>5s} dB  median {np.median(ts)*1e3:7.2f} ms")
