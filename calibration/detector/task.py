"""Task hook for ``qtool eval --task``: detection F1 of a candidate detector
against the reference (fp32) detector's own detections, at IoU 0.5.

For the detector built by calibration/detector/make.py, or any model with one
YOLOv8-style output [batch, 4+num_classes, num_cells] (rows cx, cy, w, h, then
sigmoid class scores):

  qtool eval FP32.onnx INT8.onnx --data ~/.cache/qtool/detector/eval.npz \\
      --task calibration/detector/task.py

``reduce`` turns each batch's raw output into post-NMS detections (pure numpy,
no torch): per image the class with the highest score per cell, score >= 0.25,
class-aware NMS at IoU 0.5, at most ``MAX_DET`` kept, packed as float32
[batch, MAX_DET, 6] (x1, y1, x2, y2, score, class), padded with -1.

``compare(reference_rows, candidate_rows)`` is the F1 of the candidate's
detections against the reference's: per image, candidates in decreasing score
order each take the unmatched reference detection of the same class with the
highest IoU, if that IoU is >= 0.5; TP, candidate and reference counts are
summed over all images; F1 = 2 TP / (candidates + references), 1.0 when both
are empty.

``score(rows)`` (the fallback metric, when qtool has no compare support) is the
mean number of detections per image.
"""

from __future__ import annotations

import numpy as np

NAME = "detection F1 vs fp32 @IoU0.5"
OUTPUT_NAME = "output0"
MAX_DET = 32
SCORE_THRESHOLD = 0.25
NMS_IOU = 0.5
MATCH_IOU = 0.5


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    a = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    b = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    return inter / np.maximum(a + b - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = NMS_IOU,
        max_det: int = MAX_DET) -> np.ndarray:
    """Class-aware greedy NMS; indices of the kept boxes, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < max_det:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        same = classes[rest] == classes[i]
        overlap = _iou_one_to_many(boxes[i], boxes[rest]) > iou
        order = rest[~(same & overlap)]
    return np.asarray(keep, dtype=np.int64)


def detect(raw: np.ndarray) -> np.ndarray:
    """YOLOv8-style raw output [B, 4+C, cells] -> detections [B, MAX_DET, 6], padded with -1."""
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise ValueError(f"expected an output [batch, 4+classes, cells], got {raw.shape}")
    rows = np.full((raw.shape[0], MAX_DET, 6), -1, np.float32)
    for b in range(raw.shape[0]):
        p = raw[b].T                                   # [cells, 4+C]
        cls_scores = p[:, 4:]
        cls = cls_scores.argmax(axis=1)
        sc = cls_scores[np.arange(len(p)), cls]
        m = sc >= SCORE_THRESHOLD
        if not m.any():
            continue
        cx, cy, w, h = p[m, 0], p[m, 1], p[m, 2], p[m, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        keep = nms(boxes, sc[m], cls[m])
        n = len(keep)
        rows[b, :n, :4] = boxes[keep]
        rows[b, :n, 4] = sc[m][keep]
        rows[b, :n, 5] = cls[m][keep]
    return rows


def reduce(outputs: dict, batch: dict) -> np.ndarray:
    """Per batch: post-NMS detections [B, MAX_DET, 6] (x1, y1, x2, y2, score, class), -1 padded."""
    raw = outputs[OUTPUT_NAME] if OUTPUT_NAME in outputs else next(iter(outputs.values()))
    return detect(raw)


def _valid(dets: np.ndarray) -> np.ndarray:
    return dets[dets[:, 5] >= 0]


def match_counts(reference_rows: np.ndarray, candidate_rows: np.ndarray) -> tuple[int, int, int]:
    """(true positives, candidate detections, reference detections) over all images."""
    ref = np.asarray(reference_rows, dtype=np.float32)
    cand = np.asarray(candidate_rows, dtype=np.float32)
    if ref.shape[0] != cand.shape[0]:
        raise ValueError(f"{ref.shape[0]} reference images but {cand.shape[0]} candidate images")
    tp = n_cand = n_ref = 0
    for r_img, c_img in zip(ref, cand):
        r = _valid(r_img)
        c = _valid(c_img)
        n_ref += len(r)
        n_cand += len(c)
        if not len(r) or not len(c):
            continue
        used = np.zeros(len(r), bool)
        for d in c[np.argsort(-c[:, 4], kind="stable")]:
            ious = _iou_one_to_many(d[:4], r[:, :4])
            ious[(r[:, 5] != d[5]) | used] = -1
            j = int(ious.argmax())
            if ious[j] >= MATCH_IOU:
                used[j] = True
                tp += 1
    return tp, n_cand, n_ref


def precision_recall_f1(reference_rows: np.ndarray, candidate_rows: np.ndarray) -> tuple[float, float, float]:
    tp, n_cand, n_ref = match_counts(reference_rows, candidate_rows)
    precision = tp / n_cand if n_cand else 1.0
    recall = tp / n_ref if n_ref else 1.0
    f1 = 2 * tp / (n_cand + n_ref) if n_cand + n_ref else 1.0
    return precision, recall, f1


def compare(reference_rows: np.ndarray, candidate_rows: np.ndarray) -> float:
    """F1 of the candidate's detections against the reference's (same class, IoU >= 0.5)."""
    return precision_recall_f1(reference_rows, candidate_rows)[2]


def score(rows: np.ndarray) -> float:
    """Fallback metric: mean number of detections per image."""
    rows = np.asarray(rows)
    if not len(rows):
        return 0.0
    return float((rows[:, :, 5] >= 0).sum() / len(rows))
