"""The 'light' model zoo that the installed onnx package ships (onnx/backend/test/data/light).

Their weights are ConstantOfShape nodes filled with 0.02; ``prepared`` replaces each with seeded
random values of realistic scale (He-normal conv/FC weights, BatchNormalization statistics near
identity), so that quantizing them is a meaningful test.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]


def path(name: str) -> str:
    return os.path.join(LIGHT_DIR, f"light_{name}.onnx")


def prepared(name: str, seed: int = 0) -> onnx.ModelProto:
    model = onnx.load(path(name))
    graph = model.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name_in in enumerate(node.input):
            consumers.setdefault(name_in, []).append((node, i))
    keep, new_inits = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        out = node.output[0]
        use = consumers.get(out, [(None, -1)])[0]
        new_inits.append(numpy_helper.from_array(_values(rng, shape, use), out))
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    return model


def _values(rng: np.random.Generator, shape: tuple[int, ...], use) -> np.ndarray:
    node, position = use
    op = node.op_type if node is not None else ""
    if op in ("Conv", "Gemm") and position == 1:
        fan_in = int(np.prod(shape[1:])) if op == "Conv" else min(shape)
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if op == "BatchNormalization":
        if position == 1:  # scale
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if position == 4:  # variance
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if op == "Mul":  # densenet / inception-v2 express BN as Mul + Add
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def random_inputs(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random calibration inputs for the model's data inputs (batch dim set to n)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    data = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        data[value.name] = rng.standard_normal([n] + dims[1:]).astype(np.float32)
    return data
