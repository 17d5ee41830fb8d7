"""Worker-thread settings (onnx_gpfq/_threads.py): OpenBLAS workers sleep during quantize, and
only when that is safe; onnxruntime sessions of the capture do not spin."""

import os
import threading

import numpy as np
import pytest

import onnx_gpfq
from onnx_gpfq import _threads

MODELS = os.path.join(os.path.dirname(__file__), "..", "models")


def _timeout(libs):
    return [lib.openblas_thread_timeout() for lib in libs]


def test_blas_workers_sleep_inside_and_restored_after(monkeypatch):
    monkeypatch.delenv(_threads.ENV, raising=False)
    libs = _threads._openblas_libraries()
    a = np.random.default_rng(0).standard_normal((300, 300))
    expected = a @ a
    # nothing in the package (or in these tests) leaves a thread running: else the context is off
    assert threading.active_count() == 1, threading.enumerate()
    with _threads.blas_workers_sleep() as changed:
        # NumPy wheels on Linux bundle a pthreads OpenBLAS: then the setting must change
        assert changed == bool(libs)
        if libs:
            assert os.environ[_threads.ENV] == str(_threads.SLEEP_AT_ONCE)
            assert _timeout(libs) == [_threads.SLEEP_AT_ONCE] * len(libs)
        np.testing.assert_array_equal(a @ a, expected)  # restarted workers compute the same product
    assert _threads.ENV not in os.environ
    assert _timeout(libs) == [0] * len(libs)  # OpenBLAS sees the variable unset again
    np.testing.assert_array_equal(a @ a, expected)


def test_blas_workers_untouched_when_user_set_the_variable(monkeypatch):
    monkeypatch.setenv(_threads.ENV, "12")
    libs = _threads._openblas_libraries()
    with _threads.blas_workers_sleep() as changed:
        assert not changed
        assert os.environ[_threads.ENV] == "12"
    assert os.environ[_threads.ENV] == "12"
    assert all(t in (0, 12) for t in _timeout(libs))  # whatever OpenBLAS read before, not ours


def test_blas_workers_untouched_while_another_thread_runs(monkeypatch):
    monkeypatch.delenv(_threads.ENV, raising=False)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with _threads.blas_workers_sleep() as changed:
            assert not changed
            assert _threads.ENV not in os.environ
    finally:
        stop.set()
        other.join()


def test_capture_sessions_do_not_spin():
    so = _threads.session_options(3)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 3


def test_same_model_whether_or_not_workers_sleep(monkeypatch):
    model, calib = os.path.join(MODELS, "digits_cnn.onnx"), os.path.join(MODELS, "digits_calib.npz")
    monkeypatch.delenv(_threads.ENV, raising=False)
    a, _ = onnx_gpfq.quantize(model, calib, weight_bits=4, act_bits=8, quiet=True)
    monkeypatch.setenv(_threads.ENV, "28")  # the context then leaves OpenBLAS alone
    b, _ = onnx_gpfq.quantize(model, calib, weight_bits=4, act_bits=8, quiet=True)
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("value", [None, "9"])
def test_quantize_leaves_the_environment_as_it_was(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(_threads.ENV, raising=False)
    else:
        monkeypatch.setenv(_threads.ENV, value)
    model, calib = os.path.join(MODELS, "digits_mlp.onnx"), os.path.join(MODELS, "digits_calib.npz")
    onnx_gpfq.quantize(model, calib, weight_bits=4, act_bits=None, quiet=True)
    assert os.environ.get(_threads.ENV) == value


def test_progress_bar_leaves_no_thread_behind(monkeypatch):
    """The progress bar runs no monitor thread (tqdm keeps one for the life of the process, which
    would switch the context off for every later call), and is closed on errors too."""
    monkeypatch.delenv(_threads.ENV, raising=False)
    before = set(threading.enumerate())
    model, calib = os.path.join(MODELS, "digits_mlp.onnx"), os.path.join(MODELS, "digits_calib.npz")
    onnx_gpfq.quantize(model, calib, weight_bits=4, quiet=False)
    assert set(threading.enumerate()) == before
    from onnx_gpfq import core

    def fail(*args):
        raise RuntimeError("a layer failed")

    monkeypatch.setattr(core, "quantize_layer", fail)  # an error inside the layer loop
    with pytest.raises(RuntimeError, match="a layer failed"):
        onnx_gpfq.quantize(model, calib, weight_bits=4, quiet=False)
    assert set(threading.enumerate()) == before
    assert _threads.ENV not in os.environ


def test_threads_option_caps_every_pool_and_changes_nothing(monkeypatch):
    """--threads N: numba, BLAS and the capture's onnxruntime sessions use at most N threads
    during quantize (all restored after); the model is the same bytes as with every core."""
    import numba
    from threadpoolctl import threadpool_info

    from onnx_gpfq import capture, core

    seen = []
    quantize_layer, run = core.quantize_layer, capture.Stream._run

    def spy_layer(*args):
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        seen.append(("numba", numba.get_num_threads()))
        seen.extend(("blas", n) for n in blas)
        return quantize_layer(*args)

    def spy_run(self, *args):
        seen.append(("ort", self.threads))
        return run(self, *args)

    model, calib = os.path.join(MODELS, "digits_cnn.onnx"), os.path.join(MODELS, "digits_calib.npz")
    every_core, _ = onnx_gpfq.quantize(model, calib, weight_bits=4, quiet=True)
    numba_before = numba.get_num_threads()
    blas_before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    monkeypatch.setattr(core, "quantize_layer", spy_layer)
    monkeypatch.setattr(capture.Stream, "_run", spy_run)
    one, report = onnx_gpfq.quantize(model, calib, weight_bits=4, quiet=True, threads=1)
    assert one.SerializeToString() == every_core.SerializeToString()
    assert {kind for kind, _ in seen} >= {"numba", "ort"} and all(n == 1 for _, n in seen)
    assert report.options["threads"] == 1
    assert numba.get_num_threads() == numba_before
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == blas_before
