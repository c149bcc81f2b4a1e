"""Shared helpers for benchmarks: ORT baselines, interleaved timing, accuracy, tables."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

THREADS = 2


def session(path: str | Path, threads: int = THREADS) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_latency(sessions: dict[str, ort.InferenceSession], feeds: dict, warmup: int = 10,
                        repeats: int = 100) -> dict[str, float]:
    """Median ms per model, runs interleaved round-robin so load noise hits all alike."""
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feeds)
    times = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def accuracy(sess: ort.InferenceSession, x: np.ndarray, labels: np.ndarray, name: str, batch: int = 256):
    preds = []
    for i in range(0, len(x), batch):
        preds.append(sess.run(None, {name: x[i:i + batch]})[0].argmax(1))
    preds = np.concatenate(preds)
    return float((preds == labels).mean()), preds


class NpzReader:
    """onnxruntime CalibrationDataReader over the same arrays qtool reads."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int):
        from onnxruntime.quantization import CalibrationDataReader  # noqa: F401
        n = len(next(iter(arrays.values())))
        self.batches = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])

    def get_next(self):
        return next(self.batches, None)


def size(path) -> int:
    return os.path.getsize(path)


def print_table(rows: list[tuple], header: tuple) -> None:
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
