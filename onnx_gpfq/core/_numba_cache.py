"""Cold start: load the core's cached numba kernels without numba's full context refresh."""

from __future__ import annotations


def load_from_cache_without_refresh(namespace) -> None:
    """Make every cached kernel in ``namespace`` (a kernel module's globals()) load from numba's disk cache without the
    ``target_context.refresh()`` that numba's ``Cache.load_overload`` runs first.

    That refresh imports and installs all of numba's typing and lowering registries (NumPy,
    random, typed containers, jitclass, ..., and ``import scipy.linalg`` through
    ``numba.np.arraymath``'s BLAS probe): ~0.25 s, most of a fresh process's first quantize
    call, and all of it only needed to *compile*. Loading cached machine code needs the NRT
    (initialised here, exactly as the refresh would) and the C helper / math symbols installed
    when the CPU context is created; the kernels reference nothing else (checked: NRT_*,
    numba_* helpers, the Python C API and LLVM intrinsics). Whenever numba compiles anything
    (a cache miss, a new signature, anyone else's jitted code), its compiler runs the full
    refresh itself, as before. The loaded code is the cached code: same bits, same results.

    Only the given modules' dispatchers are changed (their own cache objects); if numba's internals
    are not what this expects (checked on numba 0.6x; other versions keep numba's own path), or
    ONNX_GPFQ_NUMBA_FULL_LOAD=1 is set, nothing is changed, and if the fast load fails for any
    reason the normal load (refresh included) runs instead.
    """
    import os

    import numba

    if os.environ.get("ONNX_GPFQ_NUMBA_FULL_LOAD") == "1" or not numba.__version__.startswith("0.6"):
        return
    try:
        from numba.core.caching import Cache
        from numba.core.dispatcher import Dispatcher
        from numba.core.runtime import rtsys
    except ImportError:  # pragma: no cover - another numba layout: keep numba's own path
        return
    if not all(hasattr(Cache, a) for a in ("load_overload", "_load_overload", "_guard_against_spurious_io_errors")):
        return  # pragma: no cover
    for obj in list(namespace.values()):
        cache = getattr(obj, "_cache", None) if isinstance(obj, Dispatcher) else None
        if not isinstance(cache, Cache):  # NullCache: caching off, nothing to load
            continue

        def load_overload(sig, target_context, _cache=cache, _full=cache.load_overload):
            try:
                rtsys.initialize(target_context)  # what the refresh would do first; idempotent
                with _cache._guard_against_spurious_io_errors():
                    return _cache._load_overload(sig, target_context)
            except Exception:
                return _full(sig, target_context)

        cache.load_overload = load_overload


# The compiled kernels the pipeline calls from Python, each with the one signature it calls it with
# (float64 C arrays, int64 and float64 scalars), in the order a first layer reaches them. Kernels
# inlined into these (level, greedy_step, ...) have no signature of their own.
_F3, _I3 = "float64[:, :, ::1]", "int32[:, :, ::1]"
_GREEDY = (f"({_F3}, int64, {_F3}, int64, {_F3}, int64, {_F3}, {_I3}, int64, {_F3}, int64, int64, int64, int64, "
           "int64, int64, float64, int64, float64[::1], float64[:, ::1], int32[:, ::1])")
PIPELINE_SIGNATURES = (
    ("steps", "abs_max_blocks", f"({_F3}, int64, {_F3})"),
    ("greedy", "tril_matmul_small", f"({_F3}, {_F3}, {_F3})"),
    ("greedy", "_dead_threshold_into", f"({_F3}, float64, float64[::1])"),
    ("greedy", "_greedy_block_one_column", _GREEDY),
    ("greedy", "greedy_block", _GREEDY),
    ("rounding", "quantize_array", f"({_F3}, {_F3}, int64, int64, int64, int64, float64, int64, {_I3})"),
    ("fused", "residual_lanes", f"({_F3}, {_F3}, {_F3}, float64[:, ::1], float64[::1], float64[:, :, :, ::1], "
                                f"float64[:, :, :, ::1], int64, int64, int64, int64, float64, int64, int64, boolean, "
                                f"{_I3}, {_F3}, {_F3}, float64[:, ::1])"),
)


def prepare_kernels(modules: dict) -> None:
    """Have every kernel of PIPELINE_SIGNATURES ready: loaded from numba's disk cache (a few ms each)
    or, on the first run after an install (an empty cache), compiled (seconds each) and cached.
    ``modules``: the kernel modules by name (fused, greedy, rounding, steps). Already present:
    nothing happens. numba's compiler lock makes this safe beside calls of the same kernels: a
    call waits for the compilation under way, then runs the compiled code (the same machine code
    as a compilation at the call: the same bits)."""
    from numba.core.sigutils import normalize_signature

    for module, name, signature in PIPELINE_SIGNATURES:
        # as a tuple of types, the key a call compiles and caches under (a string is another key)
        modules[module].__dict__[name].compile(tuple(normalize_signature(signature)[0]))


class KernelWarmup:
    """``prepare_kernels`` on a background thread for the duration of a ``with`` block: the
    pipeline starts it before loading the model, so loading, normalising and the first capture
    (onnxruntime and LLVM's passes release the GIL) overlap numba's loading or compiling, instead
    of all of it landing in the first layer's GPFQ call. The block's exit waits for the thread
    (no thread outlives a quantize call) and re-raises nothing: a kernel that failed here is
    compiled again, as before, where it is called (and fails there with numba's own error).
    ONNX_GPFQ_NUMBA_WARMUP=0 turns it off."""

    def __init__(self, modules: dict):
        import os
        import threading

        self.thread = None
        if os.environ.get("ONNX_GPFQ_NUMBA_WARMUP", "1") != "0":
            self.thread = threading.Thread(target=self._run, args=(modules,), name="onnx_gpfq-kernels", daemon=True)

    @staticmethod
    def _run(modules: dict) -> None:
        try:
            prepare_kernels(modules)
        except Exception:  # noqa: BLE001  (compiled again where called)
            pass

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread is not None:
            self.thread.join()
        return False
