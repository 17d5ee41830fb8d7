"""onnxruntime sessions, set up in one place for every stage that runs a model.

All sessions run on the CPU provider with warnings off. The pipeline's own sessions (capture,
validation) alternate with NumPy products on the same cores, so their intra-op threads block
instead of spinning between runs; sessions that measure or serve a model keep onnxruntime's
default spinning (``spinning=True``).
"""

from __future__ import annotations

from typing import Literal

Level = Literal["disable", "basic", "all"]
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "all": "ORT_ENABLE_ALL"}


def session_options(threads: int = 0, optimization: Level | None = None, spinning: bool = False,
                    optimized_model_path: str | None = None, config: dict[str, str] | None = None):
    """SessionOptions: ``threads`` intra-op threads (0: one per core), graph optimisation level
    (None: onnxruntime's default, all), whether idle threads spin, where to write the optimised
    graph, and extra session config entries."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    if optimization is not None:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    if optimized_model_path is not None:
        so.optimized_model_filepath = optimized_model_path
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


def session(model: "bytes | str", threads: int = 0, optimization: Level | None = None, spinning: bool = False,
            optimized_model_path: str | None = None, config: dict[str, str] | None = None):
    """An InferenceSession on the CPU provider for a serialised model or a model path."""
    import onnxruntime as ort

    so = session_options(threads, optimization, spinning, optimized_model_path, config)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
