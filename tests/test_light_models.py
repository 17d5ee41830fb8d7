"""Every model of the onnx package's light zoo (opset 9 exports from Caffe2: ConstantOfShape weights,
weights listed as graph inputs, BatchNormalization, LRN, Dropout, Sum, ...) quantizes at W8A8 and W4A8:
the output passes the full checker, runs in onnxruntime, has every Conv/Gemm weight quantized, and
runs every quantized layer as an integer kernel.

Weights are seeded random values of realistic scale (light_models.prepared), calibration is one seeded
random sample with 16 patches per layer and the fixed step rule, to keep the whole file to minutes.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import light_models
from onnx_gpfq import quantize
from onnx_gpfq.inspection import inspect


@pytest.fixture(scope="module", params=light_models.NAMES)
def zoo_model(request):
    model = light_models.prepared(request.param)
    return request.param, model, light_models.random_inputs(model, 1, seed=1)


@pytest.mark.parametrize("bits", [8, 4])
def test_light_model_quantizes(zoo_model, bits):
    name, model, data = zoo_model
    q, report = quantize(model, data, weight_bits=bits, max_patches=16, scale_rule="fixed", quiet=True)
    onnx.checker.check_model(q, full_check=True)
    assert report.skipped == [], report.skipped
    produced_by = {o: n for n in q.graph.node for o in n.output}
    layers = [n for n in q.graph.node if n.op_type in ("Conv", "Gemm")]
    n_float = sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    assert len(layers) == n_float == len(report.layers)
    for node in layers:  # every weight is integer codes read through DequantizeLinear
        dq = produced_by[node.input[1]]
        assert dq.op_type == "DequantizeLinear", node.name
        codes = next(t for t in q.graph.initializer if t.name == dq.input[0])
        assert codes.data_type == onnx.TensorProto.INT8
        values = onnx.numpy_helper.to_array(codes)
        assert values.min() >= -(2 ** (bits - 1) - 1) and values.max() <= 2 ** (bits - 1) - 1
    info = inspect(q)
    assert info["integer_kernel_fraction"] == 1.0, info["float_layers"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    other = light_models.random_inputs(model, 1, seed=7)
    outputs = session.run(None, other)
    assert all(np.isfinite(o).all() for o in outputs)
