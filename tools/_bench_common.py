"""Shared helpers of tools/benchmark.py and tools/bench_quantize.py (not part of the package).

- resolving a model argument (a path, or ``light:NAME`` for the onnx package's light model zoo
  prepared by tests/light_models.py) and a calibration argument (a .npz, or ``random:N``);
- onnxruntime's own static quantizer (``quantize_static``, QDQ, per-channel, MinMax) with the
  preprocessing it needs, every step recorded so the result says what ORT got;
- a description of the machine and library versions for BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# ---------------------------------------------------------------- model and calibration arguments

def _real_spec(name: str):
    """The real-model suite's Spec ``name`` (tools/_real_models/specs.py)."""
    from _real_models import specs  # noqa: PLC0415  (tools/_real_models)

    if name not in specs.SPECS:
        raise SystemExit(f"unknown real model {name!r}; one of {', '.join(specs.SPECS)}")
    return specs.SPECS[name]


def resolve_model(spec: str, workdir: str) -> str:
    """A path to an .onnx file: ``spec`` itself, ``light:NAME`` saved into ``workdir``, or ``real:NAME``
    (a model of the real-model suite, from its cache: ~/.cache/onnx-gpfq/real-models, fetched there by
    tools/real_models.py)."""
    if spec.startswith("real:"):
        from _real_models import fetch  # noqa: PLC0415

        return _real_spec(spec.split(":", 1)[1]).path(fetch.DEFAULT_CACHE)
    if spec.startswith("light:"):
        name = spec.split(":", 1)[1]
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import light_models  # noqa: PLC0415  (tests/light_models.py)
        import onnx  # noqa: PLC0415

        if name not in light_models.NAMES:
            raise SystemExit(f"unknown light model {name!r}; one of {', '.join(light_models.NAMES)}")
        path = os.path.join(workdir, f"light_{name}_prepared.onnx")
        onnx.save(light_models.prepared(name), path)
        return path
    if not os.path.exists(spec):
        raise SystemExit(f"model not found: {spec}")
    return spec


def resolve_calibration(spec: str, model_path: str, multiplier: int = 1) -> tuple[dict[str, np.ndarray], str]:
    """The calibration arrays ({input name: samples along axis 0}) and a description of them.

    ``random:N`` -> N * multiplier seeded samples from tests/light_models.random_inputs;
    a .npz path -> its arrays (``labels`` dropped), tiled ``multiplier`` times along axis 0;
    ``real:NAME:N`` -> N * multiplier calibration samples of the real-model suite's model NAME
    (specs.make_data, split 0, seed 0: distinct samples, not a tiling).
    """
    import onnx  # noqa: PLC0415

    if spec.startswith("real:"):
        parts = spec.split(":")
        try:
            name, n = parts[1], int(parts[2])
        except (IndexError, ValueError):
            raise SystemExit(f"--calib real:NAME:N needs a model name and an integer N (got {spec!r})") from None
        from _real_models import fetch, specs  # noqa: PLC0415

        arrays, _ = specs.make_data(_real_spec(name), n * multiplier, 0, 0, fetch.DEFAULT_CACHE)
        return arrays, f"{n * multiplier} calibration samples of the real-model suite's {name} (split 0, seed 0)"

    if spec.startswith("random:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise SystemExit(f"--calib random:N needs an integer N (got {spec!r})") from None
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import light_models  # noqa: PLC0415

        model = onnx.load(model_path, load_external_data=False)
        arrays = light_models.random_inputs(model, n * multiplier)
        return arrays, f"{n * multiplier} seeded N(0,1) samples (tests/light_models.random_inputs, seed 0)"
    if not os.path.exists(spec):
        raise SystemExit(f"calibration file not found: {spec}")
    with np.load(spec, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "labels"}
    if multiplier > 1:
        arrays = {k: np.concatenate([v] * multiplier) for k, v in arrays.items()}
    n = next(iter(arrays.values())).shape[0]
    how = f" (the file's samples tiled {multiplier}x)" if multiplier > 1 else ""
    return arrays, f"{n} samples from {spec}{how}"


def fixed_batch(model_path: str) -> int | None:
    """The model's fixed leading input dimension (e.g. 1 for the light zoo), or None if symbolic."""
    import onnx  # noqa: PLC0415

    model = onnx.load(model_path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = min(v.shape[0] for v in arrays.values())
    n -= n % batch_size
    return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def sample_count(arrays: dict[str, np.ndarray]) -> int:
    return int(min(v.shape[0] for v in arrays.values()))


# ---------------------------------------------------------------- onnxruntime's quantizer

def _reader(batch_list):
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415

    class _Reader(CalibrationDataReader):
        """The same calibration batches as onnx-gpfq sees, one dict per get_next()."""

        def __init__(self, items):
            self.items = items
            self.pos = 0

        def get_next(self):
            if self.pos >= len(self.items):
                return None
            self.pos += 1
            return self.items[self.pos - 1]

        def rewind(self):
            self.pos = 0

    return _Reader(batch_list)


def opset_of(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def ort_prepare(model_path: str, workdir: str, min_opset: int = 13, pre_process: bool = True) -> tuple[str, dict]:
    """Make ``model_path`` acceptable to quantize_static: opset >= ``min_opset`` (onnx.version_converter;
    per-channel QDQ needs 13, int4 weights need 21) and onnxruntime's quant_pre_process (symbolic shape
    inference + graph optimisation). Returns the prepared path and what was done."""
    import onnx  # noqa: PLC0415
    from onnx import version_converter  # noqa: PLC0415

    info: dict = {}
    t0 = time.perf_counter()
    workdir = os.path.abspath(workdir)
    model = onnx.load(model_path)
    opset = opset_of(model)
    info["original_opset"] = opset
    path = model_path
    inits = {t.name for t in model.graph.initializer}
    as_inputs = [i for i in model.graph.input if i.name in inits]
    if model.ir_version < 4 or as_inputs:
        # Old exports (IR < 4) list weights as graph inputs too: ORT then cannot treat them as
        # constants (no BatchNormalization folding, ...), and the version converter rejects an IR-3
        # model whose initializers are not all inputs ("Input ... is undefined"). Do what onnx-gpfq's
        # own normalisation does: drop them from the inputs and declare IR 7.
        keep = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        info["initializers_removed_from_inputs"] = len(as_inputs)
        if model.ir_version < 7:
            info["ir_version_raised"] = f"{model.ir_version} -> 7"
            model.ir_version = 7
        path = os.path.join(workdir, "ort_no_init_inputs.onnx")
        onnx.save(model, path)
    if opset < min_opset:
        model = version_converter.convert_version(model, min_opset)
        path = os.path.join(workdir, f"ort_opset{min_opset}.onnx")
        onnx.save(model, path)
        info["opset_converted_to"] = min_opset
    if pre_process:
        from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

        out = os.path.join(workdir, f"ort_pre_opset{max(opset, min_opset)}.onnx")
        cwd, src = os.getcwd(), os.path.abspath(path)
        try:
            # its symbolic shape inference writes temporary files (sym_shape_infer_temp.onnx, *.data)
            # into the working directory: keep them in workdir, out of the user's checkout
            os.chdir(workdir)
            quant_pre_process(src, out)
            path = out
            info["quant_pre_process"] = True
        except Exception as exc:  # noqa: BLE001  (recorded, then quantize without it)
            info["quant_pre_process"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            os.chdir(cwd)
    else:
        info["quant_pre_process"] = False
    info["preprocess_seconds"] = time.perf_counter() - t0
    return path, info


def ort_quantize_static(model_path: str, out_path: str, arrays: dict[str, np.ndarray], batch_size: int,
                        weight_type: str = "QInt8", workdir: str | None = None) -> dict:
    """onnxruntime.quantization.quantize_static, QDQ, per-channel, MinMax, activations QUInt8, weights
    ``weight_type`` ("QInt8" or "QInt4"; QInt4 raises the opset to 21 first). Returns timings and the
    preprocessing it got; ``seconds`` is quantize_static alone (calibration included)."""
    import onnxruntime  # noqa: PLC0415
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415

    onnxruntime.set_default_logger_severity(3)  # no per-initializer warnings on old models

    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="ortq-")
        workdir = own_tmp.name
    try:
        min_opset = 21 if weight_type == "QInt4" else 13
        prepared, info = ort_prepare(model_path, workdir, min_opset=min_opset)
        reader = _reader(batches(arrays, batch_size))
        t0 = time.perf_counter()
        quantize_static(prepared, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, activation_type=QuantType.QUInt8,
                        weight_type=getattr(QuantType, weight_type))
        info["seconds"] = time.perf_counter() - t0
        info["weight_type"] = weight_type
        return info
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()


# ---------------------------------------------------------------- memory and machine

def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def package_commit() -> str | None:
    """The last commit that changed onnx_gpfq/ (short), with '+dirty' when it has uncommitted changes."""
    import subprocess  # noqa: PLC0415

    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "onnx_gpfq"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnx_gpfq"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def rss_parts_mb() -> dict:
    """Current RssAnon / RssFile / RssShmem in MiB (/proc/self/status). RssFile counts pages of
    memory-mapped files (e.g. spilled activations) that the kernel can drop and re-read."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out


class RssSampler:
    """Background thread polling /proc/self/status: peak RssAnon (anonymous memory, what cannot be
    dropped) and peak RssAnon + RssFile, next to the kernel's VmHWM (which counts mapped file pages)."""

    def __init__(self, interval: float = 0.05):
        import threading  # noqa: PLC0415

        self.interval = interval
        self.peak_anon = 0.0
        self.peak_total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            parts = rss_parts_mb()
            anon = parts.get("RssAnon", 0.0)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_total = max(self.peak_total, anon + parts.get("RssFile", 0.0) + parts.get("RssShmem", 0.0))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def machine() -> dict:
    """CPU model, cores, memory, OS and library versions."""
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        import numba  # noqa: PLC0415

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    import onnx_gpfq  # noqa: PLC0415
    from onnx_gpfq.cpu import int8_path, int8_path_text  # noqa: PLC0415

    return {
        "commit": package_commit(),
        "cpu": cpu,
        "int8_path": int8_path(),  # x86-vnni | x86-avx2 | arm64 | other: which onnxruntime int8 kernels run here
        "int8_path_text": int8_path_text(),
        "cores": cores,
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "numba": numba_version,
        "onnx_gpfq": onnx_gpfq.__version__,
    }
