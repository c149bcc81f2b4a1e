"""Observers reduce one tensor's values batch by batch into statistics.

Memory per tensor is constant: a min/max pair, or a fixed-size histogram.
"""

from __future__ import annotations

import numpy as np


class MinMaxObserver:
    """Running min/max; with ``moving_average`` the per-batch extremes are
    averaged as min <- min + c * (batch_min - min), as onnxruntime's option does."""

    def __init__(self, moving_average: bool = False, averaging_constant: float = 0.01):
        self.moving_average = moving_average
        self.c = averaging_constant
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.batches = 0
        self.notes: list[str] = []

    def update(self, x: np.ndarray) -> None:
        self.batches += 1
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if self.moving_average and self.count:
            self.min += self.c * (lo - self.min)
            self.max += self.c * (hi - self.max)
        else:
            self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(x.size)

    def stats(self) -> dict:
        notes = list(self.notes)
        lo, hi = self.min, self.max
        if self.count == 0:
            lo, hi = 0.0, 0.0
            notes.append("no values seen (empty batches); range set to [0, 0]")
        elif lo == hi:
            notes.append(f"constant tensor (every value {lo:g})")
        return {"min": float(lo), "max": float(hi), "count": self.count, "notes": notes}


def make_observer(options):
    """The observer a CalibrateOptions asks for."""
    if options.method == "minmax":
        return MinMaxObserver(options.moving_average, options.averaging_constant)
    from .histogram_observer import HistogramObserver
    return HistogramObserver(options.bins)
