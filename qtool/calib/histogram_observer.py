"""Histogram observer: a StreamingHistogram per tensor, in flat memory."""

from __future__ import annotations

import numpy as np

from .histogram import StreamingHistogram


class HistogramObserver:
    def __init__(self, bins: int = 2048):
        self.hist = StreamingHistogram(bins)
        self.batches = 0

    def update(self, x: np.ndarray) -> None:
        self.batches += 1
        self.hist.update(x)

    def stats(self) -> dict:
        h = self.hist
        notes = []
        if h.count == 0:
            notes.append("no values seen (empty batches); range set to [0, 0]")
            return {"min": 0.0, "max": 0.0, "count": 0, "notes": notes, "histogram": h.to_dict()}
        if h.min == h.max:
            notes.append(f"constant tensor (every value {h.min:g})")
        return {"min": float(h.min), "max": float(h.max), "count": int(h.count), "notes": notes,
                "histogram": h.to_dict()}
