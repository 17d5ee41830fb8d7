"""W8A8 on CPUs without VNNI: what --target costs at the QDQ reference, and what it saves where the int8 kernels saturate.

    python tools/target_check.py --json                                  # digits models, this CPU
    python tools/target_check.py --qemu --update-benchmarks --json       # + as an AVX2 CPU runs them (qemu-user)
    python tools/target_check.py --real orientation,ocr --qemu --json    # + models of tools/real_models.py's cache
    python tools/target_check.py --eval 500 --seeds 0,1,2 --json         # the bound's cost over three seeds

For each model, W8A8 with default options and ``target`` = any (the default: codes within the pair bound of
onnxruntime's AVX2 u8s8 kernels), reference (unconstrained 8-bit codes) and, for comparison, 7-bit codes
(onnxruntime's ``reduce_range`` answer). Columns: output SQNR against the float model at the QDQ reference
(graph optimisations off), as deployed on this CPU, and with --qemu as deployed under ``qemu-x86_64 -cpu
Haswell`` (an AVX2 CPU without VNNI: MLAS dispatches its saturating kernels); the layers whose codes exceed the
pair bound (``onnx_gpfq.inspection.pair_sums``: the kernel model, whatever CPU this is). With --seeds, the
any and reference variants are quantized again with each further seed (patch subsampling, hence every
rounding decision, changes with it): the bound's cost (any - reference at the QDQ reference) per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as common  # noqa: E402

REPO = common.REPO
DIGITS = ["digits_mlp", "digits_cnn", "digits_vit"]
VARIANTS = {"W8A8 any": {"weight_bits": 8, "target": "any"}, "W8A8 reference": {"weight_bits": 8, "target": "reference"},
            "W7A8": {"weight_bits": 7}}
BEGIN, END = "<!-- cpu-target:begin -->", "<!-- cpu-target:end -->"


def _outputs(path: str, feeds: dict, optimise: bool) -> list[np.ndarray]:
    from onnx_gpfq import runtime

    session = runtime.session(path, optimization="all" if optimise else "disable")
    n = next(iter(feeds.values())).shape[0]
    runs = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)]
    return [np.concatenate([r[j] for r in runs]).astype(np.float64) for j in range(len(runs[0]))]


def sqnr_db(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """10 log10(sum ref^2 / sum (ref - out)^2) over all outputs."""
    noise = sum(float(((r - o) ** 2).sum()) for r, o in zip(ref, out))
    return float("inf") if noise == 0 else 10 * np.log10(sum(float((r ** 2).sum()) for r in ref) / noise)


def child(float_path: str, data_path: str, quantized: list[str]) -> dict:
    """Deployed SQNR of each quantized model on the CPU this runs on (run under qemu by --qemu)."""
    with np.load(data_path) as data:
        feeds = {k: data[k] for k in data.files}
    ref = _outputs(float_path, feeds, True)
    return {q: sqnr_db(ref, _outputs(q, feeds, True)) for q in quantized}


def models(real: list[str], calib_n: int, eval_n: int, cache: str):
    """(name, float path, calibration, evaluation feeds) per model."""
    for name in DIGITS:
        with np.load(os.path.join(REPO, "models", "digits_test.npz")) as test:
            feeds = {k: test[k][:eval_n] for k in test.files if k != "labels"}
        yield name, os.path.join(REPO, "models", f"{name}.onnx"), os.path.join(REPO, "models", "digits_calib.npz"), feeds
    if real:
        from _real_models.specs import SPECS, make_data

        for name in real:
            spec = SPECS[name]
            calib, _ = make_data(spec, calib_n, 0, 0, cache)
            feeds, _ = make_data(spec, eval_n, 1, 0, cache)
            yield name, spec.path(cache), calib, feeds


def run(args) -> dict:
    import onnx_gpfq
    from onnx_gpfq.inspection import pair_sums

    from onnx_gpfq.cpu import PAIR_BOUND

    qemu = shutil.which("qemu-x86_64") if args.qemu and platform.machine() == "x86_64" else None
    if args.qemu and qemu is None:
        sys.exit("target_check: --qemu needs qemu-user on x86_64 (apt-get install qemu-user)")
    rows = []
    work = tempfile.mkdtemp(prefix="target_check_")
    for name, float_path, calib, feeds in models(args.real, args.calib, args.eval, args.cache):
        data = os.path.join(work, f"{name}.npz")
        np.savez(data, **feeds)
        ref = _outputs(float_path, feeds, True)
        paths = {}
        for seed in args.seeds[1:]:  # further seeds: the bound's cost only (no qemu, no W7A8)
            for label in ("W8A8 any", "W8A8 reference"):
                model, report = onnx_gpfq.quantize(float_path, calib, quiet=True, seed=seed, **VARIANTS[label])
                path = os.path.join(work, f"{name}.seed{seed}.onnx")
                onnx_gpfq.save_model(model, path)
                rows.append({"model": name, "variant": label, "seed": seed, "bounded_layers": report.bounded_layers,
                             "sqnr_reference_db": sqnr_db(ref, _outputs(path, feeds, False))})
        for label, options in VARIANTS.items():
            model, report = onnx_gpfq.quantize(float_path, calib, quiet=True, seed=args.seeds[0], **options)
            paths[label] = os.path.join(work, f"{name}.{label.replace(' ', '_')}.onnx")
            onnx_gpfq.save_model(model, paths[label])
            sums = pair_sums(model)
            rows.append({"model": name, "variant": label, "seed": args.seeds[0], "bounded_layers": report.bounded_layers,
                         "saturating_layers": sum(s > PAIR_BOUND for s in sums.values()), "int8_layers": len(sums),
                         "sqnr_reference_db": sqnr_db(ref, _outputs(paths[label], feeds, False)),
                         "sqnr_deployed_db": sqnr_db(ref, _outputs(paths[label], feeds, True))})
            print(f"  {name} {label}: {rows[-1]}", file=sys.stderr, flush=True)
        if qemu:
            n = min(args.qemu_eval, args.eval)
            small = os.path.join(work, f"{name}.qemu.npz")
            np.savez(small, **{k: v[:n] for k, v in feeds.items()})
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, *sys.path]))
            out = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, os.path.abspath(__file__), "--child", float_path,
                                  small, *paths.values()], capture_output=True, text=True, env=env, timeout=3600)
            if out.returncode != 0:
                sys.exit(f"target_check: the qemu child failed: {out.stderr.strip().splitlines()[-1:]}")
            avx2 = json.loads(out.stdout.strip().splitlines()[-1])
            # the reference SQNR on the same first n samples, for a like-for-like kernel loss (the float
            # outputs recomputed on them: an output's batch axis need not be its first, e.g. a CTC (T, N, C))
            small_feeds = {k: v[:n] for k, v in feeds.items()}
            ref_n = _outputs(float_path, small_feeds, True)
            for label, path in paths.items():
                row = next(r for r in rows if r["model"] == name and r["variant"] == label and r["seed"] == args.seeds[0])
                row["qemu_samples"] = n
                row["sqnr_avx2_db"] = avx2[path]
                row["sqnr_reference_qemu_samples_db"] = sqnr_db(ref_n, _outputs(path, small_feeds, False))
    shutil.rmtree(work, ignore_errors=True)
    return {"machine": common.machine(), "command": " ".join(["python", "tools/target_check.py", *sys.argv[1:]]),
            "calibration_samples_real": args.calib, "evaluation_samples": args.eval, "seeds": args.seeds,
            "bound_cost_db": bound_cost(rows), "rows": rows}


def bound_cost(rows: list[dict]) -> dict:
    """{model: {seed: SQNR at the QDQ reference of W8A8 any minus W8A8 reference (dB)}}."""
    sqnr = {(r["model"], r["variant"], r["seed"]): r["sqnr_reference_db"] for r in rows}
    cost: dict = {}
    for (model, variant, seed), v in sqnr.items():
        if variant == "W8A8 any":
            cost.setdefault(model, {})[seed] = v - sqnr[model, "W8A8 reference", seed]
    return cost


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [BEGIN, "## W8A8 on CPUs without VNNI (`--target`)", "",
             f"Generated by `{result['command']}`. CPU: {m['cpu']} ({m['int8_path_text']}); onnxruntime {m['onnxruntime']}, "
             f"onnx-gpfq commit {m.get('commit')}. Output SQNR (dB) against the float model on the first "
             f"{result['evaluation_samples']} evaluation samples: at the QDQ reference (graph optimisations off), as this "
             "CPU runs the model (default session options), and as an AVX2 CPU without VNNI runs it (`qemu-x86_64 -cpu "
             "Haswell`, on fewer samples: the reference on those same samples beside it). Saturating layers: int8 layers "
             "whose codes exceed the pair bound of those kernels (same-sign |q_2j| + |q_2j+1| <= 128) (the kernel model, on any CPU).",
             "", "| model | variant | reference | this CPU | AVX2 (qemu) | reference, qemu samples | saturating layers |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in result["rows"]:
        if r["seed"] != result["seeds"][0]:
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {f(r['sqnr_reference_db'])} | {f(r['sqnr_deployed_db'])} | "
                     f"{f(r.get('sqnr_avx2_db'))} | {f(r.get('sqnr_reference_qemu_samples_db'))} | "
                     f"{r['saturating_layers']} / {r['int8_layers']} |")
    seeds = result["seeds"]
    lines += ["", f"The bound's cost at the QDQ reference (W8A8 any minus W8A8 reference, dB) with seeds {', '.join(map(str, seeds))} "
              "(the seed picks the calibration patches, so every rounding decision moves with it):", "",
              "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "| --- |" + " ---: |" * (len(seeds) + 1)]
    for model, per_seed in result["bound_cost_db"].items():
        vals = [{str(k): v for k, v in per_seed.items()}[str(s)] for s in seeds]  # keys are strings after JSON
        lines.append(f"| {model} | " + " | ".join(f"{v:+.2f}" for v in vals) + f" | {sum(vals) / len(vals):+.2f} |")
    lines += ["", END, ""]
    return "\n".join(lines)


def update_benchmarks(text: str, path: str) -> None:
    old = open(path).read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as fh:
        fh.write(new)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4:])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="models of tools/real_models.py to add (e.g. orientation,ocr)")
    ap.add_argument("--calib", type=int, default=16, help="calibration samples for the real models (default 16)")
    ap.add_argument("--eval", type=int, default=64, help="evaluation samples (default 64)")
    ap.add_argument("--qemu", action="store_true", help="also run the models as an AVX2 CPU without VNNI (qemu-user)")
    ap.add_argument("--qemu-eval", type=int, default=16, help="evaluation samples under qemu (default 16: emulation is slow)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[0],
                    help="quantization seeds: the first for every variant, the others for the bound's cost (default 0)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/onnx-gpfq/real-models"))
    ap.add_argument("--update-benchmarks", action="store_true", help="write the section into BENCHMARKS.md")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    result = run(args)
    if args.update_benchmarks:
        update_benchmarks(markdown(result), os.path.join(REPO, "BENCHMARKS.md"))
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
