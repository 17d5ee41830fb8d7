"""Reduced version of tools/error_decay.py: GPFQ's relative error decays ~1/N0, MSQ's is flat."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "error_decay.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("error_decay_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_error_decay_slopes():
    res = load_tool().run(trials=4, n0_max=1024, neurons=4, seed=0)
    assert res["n0"] == [64, 128, 256, 512, 1024]
    assert -1.3 <= res["gpfq_slope"] <= -0.7, res
    assert -0.2 <= res["msq_slope"] <= 0.2, res
    assert -1.3 <= res["gpfq_slope_ternary"] <= -0.7, res
    assert -0.2 <= res["msq_slope_ternary"] <= 0.2, res
    assert all(g < m for g, m in zip(res["gpfq_error"][1:], res["msq_error"][1:]))
