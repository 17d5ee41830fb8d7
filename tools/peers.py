"""Peers side by side: onnx-gpfq against the other quantizers that compensate rounding error.

    python tools/peers.py --json                      # install what is missing, run everything, write the section
    python tools/peers.py --models digits_cnn --peers onnx-gpfq,amd-quark --json
    python tools/peers.py --from-results RESULTS.jsonl --json   # only (re)write BENCHMARKS.md from saved rows

Each peer lives in its own virtual environment under the cache folder (--cache, default
~/.cache/onnx-gpfq/peers/<peer>/venv), created by this tool and reused when its recorded
requirements match. Peers, at their documented default settings:

- AIMET-ONNX (``aimet-onnx``): ``apply_adaround`` (its default iterations) and ``apply_seq_mse``,
  W4A8 and W8A8 (``QuantizationSimModel(param_type, activation_type)``, exported with to_onnx_qdq);
- AMD Quark's ONNX flow (``amd-quark``): its presets A8W8_ADAROUND_QCONFIG and A8W8_QCONFIG at W8A8;
  W4A8 is recorded as not possible when its ONNX config has no int4 spec (checked at run time);
- Brevitas (``brevitas``) GPFQ on the digits models' PyTorch definitions (tools/train_digits.py)
  with the ONNX file's weights loaded into them (Brevitas has no ONNX import), exported as QCDQ ONNX;
- onnx-gpfq (this repo, in the interpreter running this tool): ``onnx_gpfq.quantize`` defaults
  (numba's on-disk kernel cache is made valid by one untimed warm-up run first).

Models: the digits models (models/digits_*.onnx; calibration models/digits_calib.npz, accuracy on
models/digits_test.npz) and real models by the real-model suite's names (e.g. ocr, orientation): the
model file, seeded calibration / evaluation data and the task metric are that suite's own functions
(tools/_real_models, see tools/_peers/real.py); where it is not importable, the model's rows say so.

Torch for AIMET and Brevitas: ``torch==2.13.0`` (the CPU wheel on this machine's disk), or the
wheel given by --torch-wheel. Before installing, a ``pip install --dry-run --report`` must show
that torch resolves to 2.13.0 from a local file and that no nvidia-* package comes with it; else the
peer is reported as not runnable here, with the reason.

Every quantization runs in its own child process (the peer's interpreter): wall and CPU seconds are
the child's own clock around the quantization (float model on disk -> quantized ONNX written;
imports not counted), peak RSS is the child's ru_maxrss (os.wait4). The quantized models are then
evaluated here, all the same way: onnxruntime with default session options (as deployed) on the
evaluation set: task metric (accuracy on digits), output SQNR against the float model, and whether
the result runs on integer kernels: the ops onnxruntime's optimiser writes
(onnx_gpfq.inspection.optimised_ops), integer kernels (QLinear*, QGemm, MatMulInteger*, ...) against
the float compute ops (Conv, Gemm, MatMul and their fused forms) left.

Rows go to --results (JSON lines, appended as each finishes; a later row for the same model,
quantizer, method and bits replaces an earlier one), then the ``## Peers`` section of BENCHMARKS.md
is regenerated between its markers from every row in that file, and one JSON object is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peers import report  # noqa: E402
from _peers.report import RUNS, row_key  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
CHILD = os.path.join(TOOLS, "_peers", "child.py")
DEFAULT_CACHE = os.path.expanduser("~/.cache/onnx-gpfq/peers")
DEFAULT_RESULTS = os.path.join(DEFAULT_CACHE, "results.jsonl")
TORCH_VERSION = "2.13.0"

PEERS = {  # pip requirements of each peer's venv (onnxruntime pinned to the version onnx-gpfq is measured with)
    "aimet-onnx": {"requirements": ["aimet-onnx==2.42.0"], "torch": True},
    "amd-quark": {"requirements": ["amd-quark==0.13"], "torch": True},  # its ONNX flow imports torch (custom ops, AdaRound)
    "brevitas": {"requirements": ["brevitas==0.13.4", "onnx", "onnxoptimizer", "tqdm"], "torch": True},  # its export; its PTQ example
}
DIGITS = ("digits_mlp", "digits_cnn", "digits_vit")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- installs

def _ort_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime")


def requirements(peer: str, torch_wheel: str | None) -> list[str]:
    spec = PEERS[peer]
    reqs = list(spec["requirements"]) + [f"onnxruntime=={_ort_version()}"]
    if spec["torch"]:
        reqs.append(torch_wheel or f"torch=={TORCH_VERSION}")
    return reqs


def check_torch_plan(plan: dict) -> str | None:
    """None when pip's --dry-run report installs torch 2.13.0 from a local file and no CUDA package; else why not."""
    items = plan.get("install", [])
    torches = [i for i in items if i["metadata"]["name"].lower() == "torch"]
    cuda = sorted(i["metadata"]["name"] for i in items if i["metadata"]["name"].lower().startswith("nvidia-"))
    if cuda:
        return f"pip would pull CUDA packages with torch ({', '.join(cuda[:3])}, ...)"
    for t in torches:
        version = t["metadata"]["version"]
        url = t.get("download_info", {}).get("url", "")
        if version.split("+")[0] != TORCH_VERSION:
            return f"the peer needs torch {version}, not the {TORCH_VERSION} CPU wheel on this machine's disk"
        if not url.startswith("file:"):
            return f"pip would download torch {version} ({url[:60]}) instead of using the local CPU wheel"
    return None


def ensure_venv(peer: str, cache: str, torch_wheel: str | None, install: bool = True) -> dict:
    """The peer's interpreter, creating its venv when missing: {"python", "versions"} or {"reason"}."""
    home = os.path.join(cache, peer)
    python = os.path.join(home, "venv", "bin", "python")
    marker = os.path.join(home, "installed.json")
    reqs = requirements(peer, torch_wheel)
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("requirements") == reqs and os.path.exists(python):
            return {"python": python, "versions": done.get("versions", {})}
    if not install:
        return {"reason": f"not installed in {home} (run without --no-install)"}
    os.makedirs(home, exist_ok=True)
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", os.path.join(home, "venv")], check=True)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if PEERS[peer]["torch"]:
        plan_path = os.path.join(home, "plan.json")
        proc = subprocess.run(pip + ["--dry-run", "--report", plan_path] + reqs, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"reason": "pip cannot resolve " + " ".join(reqs) + ": " + proc.stderr.strip().splitlines()[-1][:200]}
        with open(plan_path) as f:
            why = check_torch_plan(json.load(f))
        if why:
            return {"reason": why}
    log(f"installing {peer} into {home}/venv: {' '.join(reqs)}")
    proc = subprocess.run(pip + reqs, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"reason": "pip install failed: " + proc.stderr.strip().splitlines()[-1][:200]}
    subprocess.run([python, "-m", "pip", "cache", "purge"], capture_output=True)
    out = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True)
    versions = {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}
    keep = {k: v for k, v in versions.items() if k in (peer, "torch", "onnxruntime", "onnx")}
    with open(marker, "w") as f:
        json.dump({"requirements": reqs, "versions": keep}, f)
    return {"python": python, "versions": keep}


# ---------------------------------------------------------------- models and data

def digits_model(name: str) -> dict:
    import numpy as np

    with np.load(os.path.join(REPO, "models", "digits_test.npz")) as d:
        x, labels = d["input"], d["labels"]
    return {"name": name, "path": os.path.join(REPO, "models", f"{name}.onnx"),
            "calib": os.path.join(REPO, "models", "digits_calib.npz"), "eval_inputs": {"input": x},
            "metric_name": "accuracy", "higher_is_better": True, "torch_module": name, "per_sample": False,
            "metric": lambda runs, _float_runs: float((runs[0][0].argmax(axis=1) == labels).mean())}


def load_models(names: list[str], work: str) -> list[dict]:
    """The models to run: the digits models, and real models from the real-model suite (or, where it
    cannot give one, {"name", "unavailable": reason})."""
    out = []
    for name in names:
        if name in DIGITS:
            out.append(digits_model(name))
            continue
        from _peers import real

        try:
            out.append(real.model(name, work=work))
        except Exception as exc:  # noqa: BLE001  (reported as the model's rows)
            out.append({"name": name, "unavailable": f"{type(exc).__name__}: {exc}"[:300]})
    return out


# ---------------------------------------------------------------- running and evaluating

def run_child(python: str, job: dict, timeout: float) -> dict:
    """Runs one quantization in a child: its JSON plus its process figures from os.wait4 (peak RSS =
    ru_maxrss, CPU = user + system, whole-process wall including interpreter start and imports)."""
    import threading

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    err_path = job["result"] + ".stderr"
    t0 = time.perf_counter()
    with open(err_path, "w") as err:
        # cwd: the job's own folder (AMD Quark writes quantized_info.csv into the working directory)
        proc = subprocess.Popen([python, CHILD, job_path], cwd=os.path.dirname(os.path.abspath(job["result"])),
                                stdout=subprocess.DEVNULL, stderr=err)
        killed = threading.Event()
        timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            proc.returncode = 0  # reaped by wait4 above; keep Popen from waiting on it again
    wall = time.perf_counter() - t0
    os.unlink(job_path)
    figures = {"process_wall_s": wall, "process_cpu_s": usage.ru_utime + usage.ru_stime,
               "peak_rss_mb": usage.ru_maxrss / 1024.0}
    if killed.is_set():
        return {"error": f"timed out after {timeout:.0f} s"} | figures
    if not os.path.exists(job["result"]):
        with open(err_path) as f:
            tail = f.read().strip().splitlines()[-3:]
        return {"error": f"child exited with status {os.waitstatus_to_exitcode(status)}: " + " | ".join(tail)[:300]} | figures
    with open(job["result"]) as f:
        return json.load(f) | figures


def run_outputs(path: str, inputs: dict, per_sample: bool) -> list[list]:
    """Outputs of onnxruntime with default session options (as deployed): one list of outputs per run,
    one run per sample when ``per_sample`` or when the model's batch is fixed, else one run for all."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    n = min(len(v) for v in inputs.values())
    shape0 = sess.get_inputs()[0].shape[0]
    step = 1 if per_sample else (shape0 if isinstance(shape0, int) and shape0 > 0 else n)
    return [sess.run(None, {k: inputs[k][i:i + step] for k in names}) for i in range(0, n, step)]


def integer_ops(path: str) -> dict:
    import onnx

    from onnx_gpfq.inspection import INTEGER_KERNELS, optimised_ops

    ops = [n.op_type for n in optimised_ops(onnx.load(path))]
    float_compute = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"}
    return {"integer_ops": sum(op in INTEGER_KERNELS for op in ops), "float_compute_ops": sum(op in float_compute for op in ops)}


def evaluate(model: dict, qpath: str, float_runs: list) -> dict:
    runs = run_outputs(qpath, model["eval_inputs"], model["per_sample"])
    flat = lambda rs: [o for r in rs for o in r]  # noqa: E731
    return {"metric": model["metric"](runs, float_runs),
            "sqnr_db": report.sqnr_db(flat(float_runs), flat(runs))} | integer_ops(qpath)


def bench(models: list[dict], runs: list[tuple], cache: str, torch_wheel: str | None, results_path: str,
          timeout: float, install: bool, work: str) -> tuple[dict, list[dict]]:
    import onnx_gpfq  # noqa: F401  (fail early: the onnx-gpfq runs use this interpreter)
    from _bench_common import fixed_batch

    envs = {"onnx-gpfq": {"python": sys.executable, "versions": {"onnx-gpfq": "this checkout",
                                                                 "onnxruntime": _ort_version()}}}
    for peer in sorted({r[0] for r in runs} - {"onnx-gpfq"}):
        envs[peer] = ensure_venv(peer, cache, torch_wheel, install)
        log(f"{peer}: {envs[peer].get('reason') or envs[peer]['versions']}")
    if "onnx-gpfq" in {r[0] for r in runs}:  # untimed: numba's on-disk kernel cache made valid first
        warm = os.path.join(work, "warmup")
        res = run_child(sys.executable, {"peer": "onnx-gpfq", "method": "gpfq", "weight_bits": 4, "act_bits": 8,
                                         "model": os.path.join(REPO, "models", "digits_mlp.onnx"),
                                         "calib": os.path.join(REPO, "models", "digits_calib.npz"),
                                         "out": warm + ".onnx", "result": warm + ".json", "batch": 32}, timeout)
        log(f"onnx-gpfq warm-up (numba cache, untimed in the table): {res.get('wall_s')} s wall")
    rows = []
    for model in models:
        if "unavailable" in model:
            float_outs = float_metric = None
            log(f"{model['name']}: {model['unavailable']}")
        else:
            float_outs = run_outputs(model["path"], model["eval_inputs"], model["per_sample"])
            float_metric = model["metric"](float_outs, float_outs)
            rows.append(report.make_row(model["name"], "float", "-", "float", {"metric": float_metric},
                                        model["metric_name"], model["higher_is_better"]))
            with open(results_path, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        for peer, method, wbits, abits in runs:
            bits = f"W{wbits}A{abits}"
            env = envs[peer]
            if "unavailable" in model:
                res = {"unsupported": "model not available: " + model["unavailable"]}
            elif "reason" in env:
                res = {"unsupported": env["reason"]}
            else:
                stem = os.path.join(work, f"{model['name']}-{peer}-{method}-{bits}")
                job = {"peer": peer, "method": method, "weight_bits": wbits, "act_bits": abits, "model": model["path"],
                       "calib": model["calib"], "out": stem + ".onnx", "result": stem + ".json",
                       "torch_module": model.get("torch_module"), "tools_dir": TOOLS,
                       "batch": fixed_batch(model["path"]) or 32}
                log(f"{model['name']} {peer} {method} {bits} ...")
                res = run_child(env["python"], job, timeout)
                if "error" not in res and "unsupported" not in res:
                    try:
                        res |= evaluate(model, job["out"], float_outs)
                    except Exception as exc:  # noqa: BLE001  (a model onnxruntime cannot run is a finding)
                        res = {"error": f"evaluation failed: {type(exc).__name__}: {exc}"[:300]} | res
                res["versions"] = res.get("versions") or env["versions"]
            if res.get("traceback"):
                log("  " + "\n  ".join(res["traceback"]))
            row = report.make_row(model["name"], peer, method, bits, res, model.get("metric_name"),
                                  model.get("higher_is_better", True))
            row["float_metric"] = float_metric
            rows.append(row)
            log("  " + json.dumps({k: row.get(k) for k in ("metric", "sqnr_db", "wall_s", "cpu_s", "peak_rss_mb",
                                                            "integer_ops", "reason")}))
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    return envs, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DIGITS), help="comma-separated: digits_mlp,digits_cnn,digits_vit"
                    " and real models by name (tools/real_models.py)")
    ap.add_argument("--peers", default="onnx-gpfq,aimet-onnx,amd-quark,brevitas")
    ap.add_argument("--methods", default=None, help="only these methods (e.g. seqmse,gpfq)")
    ap.add_argument("--bits", default=None, help="only these, e.g. W4A8")
    ap.add_argument("--note", action="append", default=[], help="a line for the section's notes (repeatable)")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="where the peers' venvs live (outside the repo)")
    ap.add_argument("--torch-wheel", default=None, help="the torch 2.13.0 CPU wheel to install (default: pip's "
                    "torch==2.13.0 from the machine's local wheels)")
    ap.add_argument("--results", default=None, help=f"JSON lines of rows (default {DEFAULT_RESULTS})")
    ap.add_argument("--from-results", default=None, metavar="RESULTS.jsonl", help="run nothing: write the section "
                    "from these rows")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per quantization child")
    ap.add_argument("--no-install", action="store_true", help="use only peers already installed")
    ap.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    command = "python tools/peers.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    results_path = args.from_results or args.results or DEFAULT_RESULTS
    if not args.from_results:
        os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
        peers = args.peers.split(",")
        methods = set(args.methods.split(",")) if args.methods else None
        bits = set(args.bits.split(",")) if args.bits else None
        runs = [r for r in RUNS if r[0] in peers and (methods is None or r[1] in methods)
                and (bits is None or f"W{r[2]}A{r[3]}" in bits)]
        with tempfile.TemporaryDirectory(prefix="peers-") as work:
            bench(load_models(args.models.split(","), work), runs, os.path.expanduser(args.cache), args.torch_wheel,
                  results_path, args.timeout, not args.no_install, work)
    rows = report.load_rows(results_path)
    doc = report.document(rows, report.machine(), command)
    if args.note:
        doc["notes"] = args.note
    if not args.no_write:
        with open(args.out) as f:
            text = f.read()
        with open(args.out, "w") as f:
            f.write(report.replace_section(text, report.section(doc)))
    if args.json:
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
