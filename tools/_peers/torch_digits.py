"""Brevitas' side: the digits models as PyTorch modules with the ONNX file's weights, Brevitas' own
PTQ flow with GPFQ at its documented defaults, and its QCDQ ONNX export. Runs in the brevitas venv.

Brevitas quantizes PyTorch modules and has no ONNX import, so the module definitions are those of
tools/train_digits.py (the export path of models/digits_*.onnx), and the weights are copied from the
ONNX initializers (by name; the ViT's MatMul weights, which the exporter left unnamed, in graph order,
transposed). The loaded module must reproduce onnxruntime's float outputs, or this raises.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def load(name: str, onnx_path: str):
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train_digits

    if name not in train_digits.build_models():
        raise ValueError(f"no PyTorch definition for {name!r} (Brevitas needs one: it has no ONNX import)")
    module = train_digits.build_models()[name]().eval()
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(onnx_path).graph.initializer}
    state = module.state_dict()
    unnamed = [v for k, v in inits.items() if k.startswith("onnx::MatMul")]
    new_state, missing = {}, []
    for key, value in state.items():
        if key in inits and tuple(inits[key].shape) == tuple(value.shape):
            new_state[key] = torch.from_numpy(np.array(inits[key]))
        elif key.endswith("num_batches_tracked"):
            new_state[key] = value
        else:
            missing.append(key)
    for key in missing:  # Linear weights exported as MatMul (x @ W^T): in module order, transposed
        w = unnamed.pop(0) if unnamed else None
        if w is None or tuple(w.T.shape) != tuple(state[key].shape):
            raise ValueError(f"cannot find the ONNX weight for {key} {tuple(state[key].shape)}")
        new_state[key] = torch.from_numpy(np.ascontiguousarray(w.T))
    module.load_state_dict(new_state)
    with np.load(os.path.join(os.path.dirname(onnx_path), "digits_test.npz")) as d:
        x = d["input"][:64]
    ref = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    err = float(np.abs(got - ref).max())
    if err > 1e-3:
        raise ValueError(f"the loaded module differs from the ONNX model by {err:.2e}")
    return module, (f"PyTorch definition from tools/train_digits.py with the ONNX weights loaded "
                    f"(max |torch - onnxruntime| {err:.1e}; Brevitas has no ONNX import)")


def brevitas_gpfq(module, batches: list[dict], weight_bits: int, act_bits: int):
    """Brevitas' ImageNet PTQ flow (brevitas_examples ptq_evaluate) with its argument defaults and --gpfq."""
    import torch
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq import ptq_common
    from brevitas_examples.imagenet_classification.ptq.ptq_imagenet_args import create_args_parser

    args = create_args_parser().parse_args(["--gpfq", "--weight-bit-width", str(weight_bits),
                                            "--act-bit-width", str(act_bits)])
    loader = [(torch.from_numpy(b["input"]), None) for b in batches]
    model = preprocess_for_quantize(module, equalize_iters=args.graph_eq_iterations,
                                    equalize_merge_bias=args.graph_eq_merge_bias, merge_bn=args.merge_bn,
                                    channel_splitting_ratio=args.channel_splitting_ratio,
                                    channel_splitting_split_input=args.channel_splitting_split_input)
    qmodel = ptq_common.quantize_model(
        model, dtype=torch.float32, device="cpu", backend=args.target_backend,
        scale_factor_type=args.scale_factor_type, bias_bit_width=args.bias_bit_width,
        weight_bit_width=args.weight_bit_width, weight_narrow_range=args.weight_narrow_range,
        weight_param_method=args.weight_quant_calibration_type,
        weight_quant_granularity=args.weight_quant_granularity, act_quant_granularity=args.act_quant_granularity,
        weight_quant_type=args.weight_quant_type, layerwise_first_last_bit_width=args.layerwise_first_last_bit_width,
        act_bit_width=args.act_bit_width, act_param_method=args.act_quant_calibration_type,
        act_quant_percentile=args.act_quant_percentile, act_quant_type=args.act_quant_type,
        quant_format=args.quant_format,
        layerwise_first_last_mantissa_bit_width=args.layerwise_first_last_mantissa_bit_width,
        layerwise_first_last_exponent_bit_width=args.layerwise_first_last_exponent_bit_width,
        weight_mantissa_bit_width=args.weight_mantissa_bit_width,
        weight_exponent_bit_width=args.weight_exponent_bit_width,
        act_mantissa_bit_width=args.act_mantissa_bit_width, act_exponent_bit_width=args.act_exponent_bit_width,
        act_scale_computation_type=args.act_scale_computation_type,
        uint_sym_act_for_unsigned_values=args.uint_sym_act_for_unsigned_values)
    with torch.no_grad():
        model(loader[0][0])
    ptq_common.calibrate(loader, qmodel)
    ptq_common.apply_gpfq(loader, qmodel, act_order=args.gpxq_act_order,
                          max_accumulator_bit_width=args.gpxq_accumulator_bit_width,
                          max_accumulator_tile_size=args.gpxq_accumulator_tile_size)
    if args.bias_corr:
        ptq_common.apply_bias_correction(loader, qmodel)
    settings = (f"brevitas_examples ptq flow at its defaults + --gpfq (backend {args.target_backend}, weights "
                f"{args.weight_quant_granularity} {args.weight_quant_type}, activations {args.act_quant_type} "
                f"percentile {args.act_quant_percentile}, graph equalization {args.graph_eq_iterations} iterations, "
                f"bias correction {'on' if args.bias_corr else 'off'}), export_onnx_qcdq")
    return qmodel, settings


def export(qmodel, path: str, batch: dict) -> None:
    import torch
    from brevitas.export import export_onnx_qcdq

    qmodel.eval()
    x = torch.from_numpy(batch["input"][:2])
    with torch.no_grad():
        export_onnx_qcdq(qmodel, x, path, input_names=["input"], output_names=["logits"],
                         dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
