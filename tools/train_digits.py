#!/usr/bin/env python
"""Train and export the small digits test models used by onnx-gpfq.

Regenerates, deterministically:

* ``<out>/digits_calib.npz``  -- key ``input``: (256, 1, 8, 8) float32
* ``<out>/digits_test.npz``   -- keys ``input``: (500, 1, 8, 8) float32,
  ``labels``: (500,) int64
* ``<out>/digits_mlp.onnx``   -- Flatten + Gemm/ReLU MLP
* ``<out>/digits_cnn.onnx``   -- Conv + (unfused) BatchNormalization, residual
  Add, depthwise conv, strided conv, GlobalAveragePool, Gemm head
* ``<out>/digits_vit.onnx``   -- tiny vision transformer (MatMul, LayerNorm,
  softmax attention, Erf-GELU MLP)

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 images, pixel values
0..16), scaled to float32 ``x / 16`` (no further normalisation).  The split is
stratified and seeded: 500 test, 256 calibration, 1041 train.

All models take input ``input`` of shape (batch, 1, 8, 8) float32 and produce
``logits`` of shape (batch, 10); the batch dimension is symbolic ("batch").

Usage::

    python tools/train_digits.py [--out models] [--seed 0]

Requires torch (CPU is fine), scikit-learn, onnx, onnxruntime, numpy.  The
script prints the onnxruntime test accuracies as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np

N_TEST = 500
N_CALIB = 256
OPSET = 17
MAX_BYTES = 2 * 1024 * 1024


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------

def set_determinism(seed: int) -> None:
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------

def load_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    idx_rest, idx_test = train_test_split(
        idx, test_size=N_TEST, stratify=y, random_state=seed)
    idx_train, idx_calib = train_test_split(
        idx_rest, test_size=N_CALIB, stratify=y[idx_rest], random_state=seed + 1)
    # sort for a canonical order independent of sklearn's shuffling details
    idx_train, idx_calib, idx_test = (np.sort(i) for i in (idx_train, idx_calib, idx_test))
    return ((np.ascontiguousarray(x[idx_train]), y[idx_train]),
            (np.ascontiguousarray(x[idx_calib]), y[idx_calib]),
            (np.ascontiguousarray(x[idx_test]), y[idx_test]))


def random_shift(xb, gen, max_shift: int = 1):
    """Randomly translate each 8x8 image by up to ``max_shift`` pixels (zero fill)."""
    import torch
    import torch.nn.functional as F

    n = xb.shape[0]
    p = max_shift
    padded = F.pad(xb, (p, p, p, p))
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    out = torch.empty_like(xb)
    for sx in range(2 * p + 1):
        for sy in range(2 * p + 1):
            m = (dx == sx) & (dy == sy)
            if m.any():
                out[m] = padded[m, :, sy:sy + 8, sx:sx + 8]
    return out


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------

def build_models():
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(64, 256)
            self.fc2 = nn.Linear(256, 128)
            self.fc3 = nn.Linear(128, 10)
            self.act = nn.ReLU()
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            x = self.flatten(x)
            x = self.drop(self.act(self.fc1(x)))
            x = self.drop(self.act(self.fc2(x)))
            return self.fc3(x)

    class CNN(nn.Module):
        def __init__(self, c1: int = 32, c2: int = 64):
            super().__init__()
            self.conv0 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
            self.bn0 = nn.BatchNorm2d(c1)
            self.dw = nn.Conv2d(c1, c1, 3, padding=1, groups=c1, bias=False)
            self.bn_dw = nn.BatchNorm2d(c1)
            self.pw = nn.Conv2d(c1, c1, 1, bias=False)
            self.bn_pw = nn.BatchNorm2d(c1)
            self.down = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
            self.bn_down = nn.BatchNorm2d(c2)
            self.conv3 = nn.Conv2d(c2, c2, 3, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(c2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.drop = nn.Dropout(0.1)
            self.fc = nn.Linear(c2, 10)
            self.relu = nn.ReLU()

        def forward(self, x):
            x = self.relu(self.bn0(self.conv0(x)))
            y = self.relu(self.bn_dw(self.dw(x)))
            y = self.bn_pw(self.pw(y))
            x = self.relu(x + y)
            x = self.relu(self.bn_down(self.down(x)))
            x = self.relu(self.bn3(self.conv3(x)))
            x = self.flatten(self.pool(x))
            return self.fc(self.drop(x))

    class Attention(nn.Module):
        def __init__(self, dim: int, heads: int, tokens: int):
            super().__init__()
            self.heads = heads
            self.hd = dim // heads
            self.tokens = tokens
            self.dim = dim
            self.scale = self.hd ** -0.5
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            t, h, hd = self.tokens, self.heads, self.hd
            qkv = self.qkv(x).reshape(-1, t, 3, h, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]          # (B, h, t, hd)
            att = torch.matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
            o = torch.matmul(att, v)                  # (B, h, t, hd)
            o = o.transpose(1, 2).reshape(-1, t, self.dim)
            return self.proj(o)

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int, tokens: int, mlp_ratio: int = 2):
            super().__init__()
            self.ln1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, heads, tokens)
            self.ln2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, mlp_ratio * dim)
            self.act = nn.GELU(approximate="none")
            self.fc2 = nn.Linear(mlp_ratio * dim, dim)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            x = x + self.drop(self.attn(self.ln1(x)))
            x = x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))
            return x

    class ViT(nn.Module):
        def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 2):
            super().__init__()
            self.patch = patch
            self.g = 8 // patch
            self.tokens = self.g * self.g
            self.embed = nn.Linear(patch * patch, dim)
            self.pos = nn.Parameter(torch.zeros(1, self.tokens, dim))
            nn.init.trunc_normal_(self.pos, std=0.02)
            self.blocks = nn.Sequential(*[Block(dim, heads, self.tokens) for _ in range(depth)])
            self.ln = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            p, g = self.patch, self.g
            # (B,1,8,8) -> (B,g,p,g,p) -> (B,g,g,p,p) -> (B,g*g,p*p)
            x = x.reshape(-1, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(-1, self.tokens, p * p)
            x = self.embed(x) + self.pos
            x = self.blocks(x)
            x = self.ln(x).mean(dim=1)
            return self.head(x)

    return {"digits_mlp": MLP, "digits_cnn": CNN, "digits_vit": ViT}


# hyper-parameters per model: epochs, lr, weight decay, batch size, shift aug
HPARAMS = {
    "digits_mlp": dict(epochs=150, lr=2e-3, wd=1e-4, bs=64, shift=0),
    "digits_cnn": dict(epochs=40, lr=3e-3, wd=5e-4, bs=64, shift=1),
    "digits_vit": dict(epochs=200, lr=2e-3, wd=5e-2, bs=64, shift=1),
}


def train(model, x_train, y_train, hp, seed: int, log=print):
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    n = xt.shape[0]
    steps_per_epoch = (n + hp["bs"] - 1) // hp["bs"]
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["wd"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=hp["lr"], total_steps=hp["epochs"] * steps_per_epoch, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for epoch in range(hp["epochs"]):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, hp["bs"]):
            bi = perm[i:i + hp["bs"]]
            xb, yb = xt[bi], yt[bi]
            if hp["shift"]:
                xb = random_shift(xb, gen, hp["shift"])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(bi)
        if (epoch + 1) % 10 == 0 or epoch == hp["epochs"] - 1:
            log(f"  epoch {epoch + 1:3d}  loss {total / n:.4f}")
    model.eval()
    return model


# --------------------------------------------------------------------------
# export / verification
# --------------------------------------------------------------------------

def export_onnx(model, path: str, preserve_bn: bool = False) -> None:
    import onnx
    import torch

    model.eval()
    dummy = torch.zeros(2, 1, 8, 8, dtype=torch.float32)
    kwargs = dict(
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    if preserve_bn:
        # Keep BatchNormalization nodes (no BN->Conv folding).  Constant
        # folding is what fuses BN into Conv in the legacy exporter; the model
        # is in eval mode so the exported BN nodes use running statistics.
        kwargs["do_constant_folding"] = False
    else:
        kwargs["do_constant_folding"] = True
    tmp = path + ".tmp"
    with torch.no_grad():
        torch.onnx.export(model, (dummy,), tmp, **kwargs)
    m = onnx.load(tmp)
    os.remove(tmp)
    # canonicalise: drop doc strings (may contain source paths)
    m.doc_string = ""
    for node in m.graph.node:
        node.doc_string = ""
    m.producer_name = "onnx-gpfq/tools/train_digits.py"
    m.producer_version = ""
    onnx.checker.check_model(m, full_check=True)
    onnx.save_model(m, path, save_as_external_data=False)
    onnx.checker.check_model(path, full_check=True)


def ort_logits(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def op_counts(path: str) -> dict:
    import onnx

    m = onnx.load(path)
    counts: dict = {}
    for node in m.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def verify(name: str, path: str, model, x_test, y_test, log=print) -> float:
    import onnx
    import torch

    m = onnx.load(path)
    assert [i.name for i in m.graph.input] == ["input"], name
    assert [o.name for o in m.graph.output] == ["logits"], name
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8], name
    odims = m.graph.output[0].type.tensor_type.shape.dim
    assert odims[0].dim_param == "batch" and odims[1].dim_value == 10, name
    for init in m.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, (name, init.name)
    size = os.path.getsize(path)
    assert size < MAX_BYTES, (name, size)
    ops = op_counts(path)
    if name == "digits_cnn":
        for op in ("BatchNormalization", "Conv", "Add", "GlobalAveragePool", "Gemm", "Relu"):
            assert op in ops, (name, op, ops)
        for node in m.graph.node:
            if node.op_type == "BatchNormalization":
                for a in node.attribute:
                    assert not (a.name == "training_mode" and a.i != 0), (name, "training_mode")
    if name == "digits_mlp":
        assert ops.get("Gemm", 0) == 3, (name, ops)
    if name == "digits_vit":
        for op in ("LayerNormalization", "MatMul", "Softmax", "Erf"):
            assert op in ops, (name, op, ops)

    logits = ort_logits(path, x_test)
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test)).numpy()
    maxdiff = float(np.max(np.abs(logits - ref)))
    assert maxdiff < 1e-3, (name, maxdiff)
    # odd batch size to exercise the dynamic batch dimension
    l3 = ort_logits(path, x_test[:3])
    assert np.allclose(l3, logits[:3], atol=1e-4), name
    acc = float(np.mean(np.argmax(logits, axis=1) == y_test))
    log(f"  {name}: size {size} B, ort acc {acc:.4f}, max |ort - torch| {maxdiff:.2e}")
    log(f"  ops: {ops}")
    return acc


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models", help="output directory (default: models)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="train/export only these models (default: all)")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    set_determinism(args.seed)
    import torch

    os.makedirs(args.out, exist_ok=True)
    (x_tr, y_tr), (x_ca, _y_ca), (x_te, y_te) = load_split(args.seed)
    log(f"split: train {len(y_tr)}, calib {len(x_ca)}, test {len(y_te)}")
    np.savez(os.path.join(args.out, "digits_calib.npz"), input=x_ca.astype(np.float32))
    np.savez(os.path.join(args.out, "digits_test.npz"),
             input=x_te.astype(np.float32), labels=y_te.astype(np.int64))

    builders = build_models()
    names = list(builders) if args.only is None else args.only
    accs = {}
    for k, name in enumerate(names):
        t0 = time.time()
        seed = args.seed * 1000 + k
        torch.manual_seed(seed)
        model = builders[name]()
        log(f"{name}: {sum(p.numel() for p in model.parameters())} params")
        train(model, x_tr, y_tr, HPARAMS[name], seed, log=log)
        path = os.path.join(args.out, f"{name}.onnx")
        export_onnx(model, path, preserve_bn=(name == "digits_cnn"))
        accs[name] = round(verify(name, path, model, x_te, y_te, log=log), 4)
        log(f"  {name}: {time.time() - t0:.1f} s")
    print(json.dumps(accs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
