"""Worker threads of onnxruntime and OpenBLAS, which take turns on the same cores.

The pipeline alternates onnxruntime runs (capture) with NumPy products (moments, GPFQ passes).
Both runtimes keep their worker threads busy-waiting for a while after a call so that the next
call starts at once; here the next call is the *other* runtime's, whose threads then share the
cores with spinning ones. OpenBLAS spins for 2^28 cycles (~0.1 s) after every threaded product.
Measured on 2 cores (32 ResNet-50 runs of onnxruntime, each right after a 2000 x 2000 float32
product): 3.7 s with OpenBLAS's default, 1.8-2.2 s when its workers sleep at once; the products
themselves are as fast either way.

- ``session_options`` (from ``runtime``): onnxruntime sessions whose intra-op threads do not spin
  between runs.
- ``limit``: at most N threads for numba's kernels and NumPy's BLAS (``--threads``; onnxruntime's
  sessions get the same number through session_options). By default all three use every core.
- ``blas_workers_sleep``: a context in which OpenBLAS's workers sleep right after each product.
  OpenBLAS reads its spin time (``OPENBLAS_THREAD_TIMEOUT``, as 2^N cycles) when it starts its
  workers, so this sets the variable, has OpenBLAS re-read its environment and restarts the
  workers (they start again, with the new setting, at the next product); on exit the default
  (2^28) is put back the same way. It does nothing when the user set OPENBLAS_THREAD_TIMEOUT,
  when NumPy's BLAS is not a pthreads OpenBLAS exposing those entry points, or when another
  Python thread is alive (one could be inside a product while the workers restart).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

from .runtime import session_options  # noqa: F401  (the pipeline's sessions; kept under its old name)

ENV = "OPENBLAS_THREAD_TIMEOUT"
SLEEP_AT_ONCE = 4  # 2^4 cycles: OpenBLAS's minimum
OPENBLAS_DEFAULT = 28  # OpenBLAS's THREAD_TIMEOUT
_ENTRY_POINTS = ("openblas_read_env", "openblas_thread_timeout", "blas_thread_shutdown_")


def _openblas_libraries() -> list[ctypes.CDLL]:
    """NumPy's loaded OpenBLAS libraries (pthreads builds) with the entry points we need."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    found = []
    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        dynlib = getattr(lib, "dynlib", None)
        if dynlib is None or getattr(lib, "threading_layer", None) != "pthreads":
            continue
        if all(hasattr(dynlib, name) for name in _ENTRY_POINTS):
            found.append(dynlib)
    return found


def _restart(libs: list[ctypes.CDLL], value: int) -> None:
    """Set OPENBLAS_THREAD_TIMEOUT, have OpenBLAS read it and restart its workers with it."""
    os.environ[ENV] = str(value)
    for lib in libs:
        lib.openblas_read_env()
        lib.blas_thread_shutdown_()


@contextlib.contextmanager
def blas_workers_sleep() -> Iterator[bool]:
    """Within the context, OpenBLAS's workers sleep right after each product (see the module
    docstring). Yields whether the setting was changed."""
    libs = [] if ENV in os.environ or threading.active_count() > 1 else _openblas_libraries()
    if not libs:
        yield False
        return
    _restart(libs, SLEEP_AT_ONCE)
    try:
        yield True
    finally:
        # OpenBLAS applies positive values only: restart the workers with its default (unless
        # another thread could now be inside a product: then they keep sleeping at once), then
        # unset the variable again
        if threading.active_count() == 1:
            _restart(libs, OPENBLAS_DEFAULT)
        os.environ.pop(ENV, None)
        for lib in libs:
            lib.openblas_read_env()


@contextlib.contextmanager
def limit(threads: int) -> Iterator[None]:
    """At most ``threads`` threads (0: no limit) for numba's kernels and NumPy's BLAS within the
    context; both are restored after it."""
    if not threads:
        yield
        return
    import numba
    from threadpoolctl import threadpool_limits

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(before)
