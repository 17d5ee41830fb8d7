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


STAMP = "onnx_gpfq_kernels.stamp"


def drop_stale(modules) -> None:
    """Empty the disk cache of every cached kernel in ``modules`` when any of their sources changed.

    numba keys a kernel's cache entry on its own file's modification time and size only, but the
    kernels inline functions of other modules (greedy.py's and fused.py's loops inline
    rounding.level and rounding.pair_limits): after an edit to rounding.py alone they would load
    the old machine code, and decide by the old rule. A stamp beside the cache files records a
    hash of all the modules' sources; when it differs, each kernel's cache index is emptied
    (numba's ``Cache.flush``), so the next call compiles afresh and caches again. Installed
    packages are not affected (a reinstall rewrites every file); this is for a working copy.
    Best effort: an unwritable cache folder leaves numba's own behaviour.
    """
    import hashlib
    import os

    from numba.core.caching import Cache
    from numba.core.dispatcher import Dispatcher

    digest = hashlib.sha256()
    for module in modules:
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    stamp = digest.hexdigest()
    caches = [obj._cache for module in modules for obj in vars(module).values()
              if isinstance(obj, Dispatcher) and isinstance(getattr(obj, "_cache", None), Cache)]
    for folder in sorted({c._cache_path for c in caches}):
        path = os.path.join(folder, STAMP)
        try:
            with open(path) as f:
                if f.read() == stamp:
                    continue
        except OSError:
            pass
        try:
            for c in caches:
                if c._cache_path == folder:
                    c.flush()
            os.makedirs(folder, exist_ok=True)
            with open(path, "w") as f:
                f.write(stamp)
        except OSError:
            pass
