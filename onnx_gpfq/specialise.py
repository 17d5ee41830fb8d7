"""Specialise a graph for fixed input values (``--fix-input NAME=VALUE``), before anything else.

Each fixed input becomes an initializer and leaves the model's interface: the output model has no
such input (a deployment feeding it would be refused by onnxruntime, so drop it from the feeds).
Then everything that value decides is folded, in topological order until nothing changes:

- a node whose inputs are all constant and which reads, directly or not, a fixed input (or is a
  Shape of a tensor whose shape is static) is evaluated (``onnx.reference``) and its outputs become
  initializers. Other constant subgraphs are left to onnxruntime's constant folding in
  ``graph.normalise``, so a model with nothing fixed is not touched;
- an If whose condition is now constant is replaced by the branch it takes: the branch's nodes
  join the graph (names prefixed with the If node's, outputs renamed to the If's), so its layers
  are quantized like any other. Conditions computed from shapes fold the same way once the Shape
  they read is static.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UserError
from .graph import node_inputs

MAX_FOLD_VALUES = 1 << 16  # larger results are left to onnxruntime's folding


@dataclass
class Specialisation:
    """What ``fix_inputs`` did (for the report)."""

    fixed: dict[str, list] = field(default_factory=dict)  # input -> value (as a list)
    folded: int = 0  # nodes evaluated
    inlined: list[str] = field(default_factory=list)  # If nodes replaced by their branch


def parse_fix_input(text: str) -> tuple[str, tuple[float, ...]]:
    """'sr=16000' -> ('sr', (16000.0,)); 'mask=1,0,1' -> a small 1-D tensor."""
    name, sep, value = str(text).partition("=")
    try:
        values = tuple(float(v) for v in value.split(",")) if value else ()
    except ValueError:
        values = ()
    if not sep or not name or not values:
        raise UserError(f"--fix-input must look like NAME=VALUE or NAME=V1,V2,... (got {text!r})")
    return name, values


def parse_fix_inputs(values) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """'NAME=VALUE' texts, (name, value) pairs or a {name: scalar or list} dict -> ((name, (values...)), ...),
    sorted by name (a later entry for the same name wins)."""
    pairs = values.items() if isinstance(values, dict) else values
    out = {}
    for item in pairs:
        name, value = parse_fix_input(item) if isinstance(item, str) else item
        try:
            flat = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise UserError(f"fix_inputs[{name!r}] must be a number or a list of numbers (got {value!r})") from None
        if not flat or not all(np.isfinite(flat)):
            raise UserError(f"fix_inputs[{name!r}] must hold finite numbers (got {value!r})")
        out[str(name)] = flat
    return tuple(sorted(out.items()))


def fix_inputs(model: onnx.ModelProto, values) -> tuple[onnx.ModelProto, Specialisation]:
    """``model`` with each input in ``values`` ((name, value) pairs or a dict) fixed and folded."""
    values = dict(values)
    spec = Specialisation()
    if not values:
        return model, spec
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    graph_inputs = {i.name: i for i in g.input}
    for name, value in values.items():
        if name not in graph_inputs or name in {t.name for t in g.initializer}:
            raise UserError(f"--fix-input names {name!r}, which is not a model input ({', '.join(graph_inputs)})")
        vi = graph_inputs[name]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        array = np.asarray(value, dtype=dtype)
        if len(dims) == 0:
            if array.size != 1:
                raise UserError(f"--fix-input {name}: the input is a scalar, got {array.size} values")
            array = array.reshape(())
        elif len(dims) == 1 or array.ndim == len(dims):
            array = array.reshape(-1) if len(dims) == 1 else array
        else:
            raise UserError(f"--fix-input {name}: the input has rank {len(dims)}; give a scalar or a 1-D input")
        if any(d is not None and d != s for d, s in zip(dims, array.shape)):
            raise UserError(f"--fix-input {name}: shape {array.shape} does not fit the input's {dims}")
        g.initializer.append(numpy_helper.from_array(array, name))
        g.input.remove(vi)
        spec.fixed[name] = array.tolist()
    _fold(out, set(values), spec)
    return out, spec


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Inferred shapes, None for a symbolic dimension."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  shapes are only a bonus here
        return {}
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def _shape_value(node, consts, shapes, known) -> np.ndarray | None:
    """The value of a Shape (all dims static), or of a Gather of static dims of a Shape output
    (``known``: Shape outputs with their partly symbolic dims)."""
    if node.op_type == "Shape" and not node.attribute and node.input[0] in shapes:
        dims = shapes[node.input[0]]
        known[node.output[0]] = dims
        return np.array(dims, np.int64) if None not in dims else None
    if node.op_type == "Gather" and node.input[0] in known and node.input[1] in consts:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        idx = numpy_helper.to_array(consts[node.input[1]])
        dims = np.array([-1 if d is None else d for d in known[node.input[0]]], np.int64)
        picked = dims[idx] if axis == 0 else None
        return picked if picked is not None and (picked >= 0).all() else None
    return None


def _fold(model: onnx.ModelProto, tainted: set[str], spec: Specialisation) -> None:
    """Passes in topological order (folded values feed later nodes within a pass) until one
    changes nothing; an inlined If ends a pass, so its branch's nodes are seen by the next."""
    g = model.graph
    opsets = {o.domain: o.version for o in model.opset_import}
    changed = True
    while changed:
        changed = False
        consts = {t.name: t for t in g.initializer}
        shapes = _static_shapes(model) if any(n.op_type == "Shape" for n in g.node) else {}
        known: dict[str, tuple[int | None, ...]] = {}
        nodes = list(g.node)
        new_nodes: list[onnx.NodeProto] = []
        for i, node in enumerate(nodes):
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in consts:
                taken = bool(numpy_helper.to_array(consts[node.input[0]]).reshape(-1)[0])
                branch = next(a.g for a in node.attribute if a.name == ("then_branch" if taken else "else_branch"))
                new_nodes.extend(_inline(node, branch, g))
                spec.inlined.append(node.name)
                new_nodes.extend(nodes[i + 1:])
                changed = True
                break
            ins = node_inputs(node)
            shape_value = _shape_value(node, consts, shapes, known)
            foldable = (node.domain in ("", "ai.onnx") and bool(ins) and all(n in consts for n in ins)
                        and any(n in tainted for n in ins) and not node.op_type.startswith("Random"))
            results = [shape_value] if shape_value is not None else _evaluate(node, consts, opsets) if foldable else None
            if results is None:
                new_nodes.append(node)
                continue
            for name, value in zip(node.output, results):
                if name:
                    t = numpy_helper.from_array(np.asarray(value), name)
                    g.initializer.append(t)
                    consts[name] = t
                    tainted.add(name)
            spec.folded += 1
            changed = True
        del g.node[:]
        g.node.extend(new_nodes)
    used = {n for node in g.node for n in node_inputs(node)} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _evaluate(node, consts, opsets) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    feeds = {n: numpy_helper.to_array(consts[n]) for n in node.input if n}
    try:
        results = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
    except Exception:  # noqa: BLE001  not evaluable here: onnxruntime may still fold it
        return None
    if any(np.asarray(r).size > MAX_FOLD_VALUES for r in results):
        return None
    return [np.asarray(r) for r in results]


def _inline(node: onnx.NodeProto, branch: onnx.GraphProto, g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The branch's nodes computing ``node``'s outputs in the enclosing graph ``g``."""
    prefix = f"{node.name or node.output[0]}/"
    inner = {t.name for t in branch.initializer} | {o for n in branch.node for o in n.output if o}
    outputs = {b.name: o for b, o in zip(branch.output, node.output)}
    rename = {n: outputs.get(n, prefix + n) for n in inner}
    for t in branch.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = rename[t.name]
        g.initializer.append(copy)
    out = []
    for n in branch.node:
        new = onnx.NodeProto()
        new.CopyFrom(n)
        new.name = prefix + (n.name or n.op_type)
        del new.input[:]
        new.input.extend(rename.get(i, i) for i in n.input)
        del new.output[:]
        new.output.extend(rename.get(o, o) for o in n.output)
        for attr in new.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _rename_reads(sub, rename)
        out.append(new)
    for b, o in outputs.items():  # a branch output that is an outer tensor: copied
        if b not in inner:
            out.append(helper.make_node("Identity", [b], [o], name=f"{prefix}{o}_Identity"))
    return out


def _rename_reads(sub: onnx.GraphProto, rename: dict[str, str]) -> None:
    """Outer-scope reads inside a nested subgraph follow the renaming."""
    local = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
    for n in sub.node:
        for k, i in enumerate(n.input):
            if i in rename and i not in local:
                n.input[k] = rename[i]
        for attr in n.attribute:
            for s in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _rename_reads(s, rename)
