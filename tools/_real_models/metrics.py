"""Task metrics of the real-model suite: pure NumPy, no model, no download (unit-tested).

- text: CTC greedy decoding as ddddocr does it, edit distance, character error rate, line accuracy;
- boxes: IoU, hard NMS (the greedy form every package here uses), box F1 at an IoU threshold and
  average precision of a model's detections against a reference set (the float model's own);
- tensors: output SQNR; embeddings: cosine against the reference and nearest-neighbour agreement.
"""

from __future__ import annotations

import numpy as np


# ---------------------------------------------------------------- text

def ctc_greedy(indices) -> list[int]:
    """Collapse consecutive repeats, then drop the blank (index 0): ddddocr's _ctc_decode_indices."""
    out, prev = [], None
    for i in (int(v) for v in indices):
        if i != prev and i != 0:
            out.append(i)
        prev = i
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(predictions: list[str], truths: list[str]) -> float:
    """Character error rate: total edit distance over total reference characters."""
    chars = sum(len(t) for t in truths)
    return sum(edit_distance(p, t) for p, t in zip(predictions, truths)) / max(chars, 1)


def line_accuracy(predictions: list[str], truths: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predictions, truths)])) if truths else float("nan")


# ---------------------------------------------------------------- boxes (x1, y1, x2, y2)

def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a (N, 4) and b (M, 4), corner form."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, top_k: int = -1) -> list[int]:
    """Greedy hard NMS: keep the best box, drop the rest overlapping it by more than iou_threshold,
    repeat. Ties in score keep the lower index first (stable). Returns kept indices, best first."""
    order = list(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if 0 < top_k == len(keep):
            break
        if order:
            overlap = iou(boxes[i:i + 1], boxes[order])[0]
            order = [j for j, o in zip(order, overlap) if o <= iou_threshold]
    return keep


def _match(pred_boxes, pred_scores, pred_labels, ref_boxes, ref_labels, threshold):
    """Greedy matching, predictions by descending score, each to the unmatched reference box of the
    same label with the highest IoU >= threshold. Returns a bool per prediction (in score order) and
    the order."""
    order = np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable")
    used = np.zeros(len(ref_boxes), dtype=bool)
    hits = []
    overlaps = iou(np.asarray(pred_boxes).reshape(-1, 4), np.asarray(ref_boxes).reshape(-1, 4))
    ref_labels = np.asarray(ref_labels)
    for i in order:
        cand = (~used) & (ref_labels == pred_labels[i]) & (overlaps[i] >= threshold) if len(ref_boxes) else used
        if cand.any():
            j = int(np.argmax(np.where(cand, overlaps[i], -1.0)))
            used[j] = True
            hits.append(True)
        else:
            hits.append(False)
    return np.array(hits, dtype=bool), order


def box_f1(pred: list[dict], ref: list[dict], threshold: float = 0.5) -> dict:
    """Box-level F1 of detections ``pred`` against ``ref`` over a data set. Each item is one image:
    {"boxes": (N, 4), "scores": (N,), "labels": (N,)}. A prediction is a true positive when it matches
    an unmatched reference box of the same label at IoU >= threshold."""
    tp = fp = fn = 0
    for p, r in zip(pred, ref):
        hits, _ = _match(p["boxes"], p["scores"], np.asarray(p["labels"]), r["boxes"], r["labels"], threshold)
        tp += int(hits.sum())
        fp += int((~hits).sum())
        fn += len(r["boxes"]) - int(hits.sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "fn": fn,
            "reference_boxes": tp + fn}


def average_precision(pred: list[dict], ref: list[dict], threshold: float = 0.5) -> float:
    """Mean over the reference's labels of the all-point-interpolated AP (VOC style) of ``pred``
    against ``ref`` at IoU >= threshold. NaN when the reference has no box."""
    labels = sorted({int(v) for r in ref for v in np.asarray(r["labels"]).ravel()})
    aps = []
    for label in labels:
        scores, hits, total = [], [], 0
        for p, r in zip(pred, ref):
            pm = np.asarray(p["labels"]) == label
            rm = np.asarray(r["labels"]) == label
            total += int(rm.sum())
            pb = np.asarray(p["boxes"]).reshape(-1, 4)[pm]
            ps = np.asarray(p["scores"])[pm]
            h, order = _match(pb, ps, np.full(len(pb), label), np.asarray(r["boxes"]).reshape(-1, 4)[rm],
                              np.full(int(rm.sum()), label), threshold)
            scores.extend(ps[order].tolist())
            hits.extend(h.tolist())
        if total == 0:
            continue
        order = np.argsort(-np.asarray(scores), kind="stable")
        h = np.asarray(hits, dtype=float)[order] if hits else np.zeros(0)
        tp = np.cumsum(h)
        fp = np.cumsum(1 - h)
        recall = tp / total
        precision = tp / np.maximum(tp + fp, 1e-12)
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[1.0], precision, [0.0]])
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])))
    return float(np.mean(aps)) if aps else float("nan")


# ---------------------------------------------------------------- tensors and embeddings

def sqnr_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) over all arrays; inf when they are equal."""
    signal = sum(float(np.sum(np.square(r.astype(np.float64)))) for r in reference)
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - t.astype(np.float64)))) for r, t in zip(reference, test))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """For each row, the index of the most cosine-similar other row."""
    e = np.asarray(emb, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def nn_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """Fraction of rows whose nearest neighbour (among the other rows) is the same in both."""
    return float(np.mean(nearest_neighbours(ref) == nearest_neighbours(test)))
