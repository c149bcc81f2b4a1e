"""Merge calibration tables computed on disjoint shards of the same data.

min/max merge by min and max; histograms merge exactly (power-of-two grids, see
``histogram.py``), and the method's range is recomputed from the merged histogram.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import TableError
from .table import CalibrationTable, TensorStats


def merge_tables(tables: list[CalibrationTable]) -> CalibrationTable:
    if len(tables) < 2:
        raise TableError("--merge needs at least two tables")
    first = tables[0]
    if first.method == "auto":
        raise TableError("tables made with --method auto cannot be merged: each shard's choices were measured on "
                         "that shard alone; merge tables of a histogram method (e.g. mse) and calibrate --method "
                         "auto on one shard, or on all the data at once")
    for t in tables[1:]:
        if t.model_sha256 != first.model_sha256:
            raise TableError("cannot merge tables of different models (sha256 differs)")
        if t.method != first.method or _method_params(t) != _method_params(first):
            raise TableError(f"cannot merge tables of different methods or parameters "
                             f"({first.method} {_method_params(first)} vs {t.method} {_method_params(t)})")
        if set(t.tensors) != set(first.tensors):
            raise TableError("cannot merge tables that cover different tensors")
    tensors = {name: _merge_stats([t.tensors[name] for t in tables], first) for name in first.tensors}
    return replace(first, tensors=tensors, samples=sum(t.samples for t in tables),
                   batches=sum(t.batches for t in tables))


def _method_params(t: CalibrationTable) -> dict:
    return {k: v for k, v in t.params.items() if k not in ("batch_size",)}


def _merge_stats(parts: list[TensorStats], table: CalibrationTable) -> TensorStats:
    seen = [p for p in parts if p.count > 0]
    if not seen:
        return parts[0]
    from .channels import merge_channels
    channels = merge_channels([(p.channels, p.count) for p in parts])
    lo, hi = min(p.min for p in seen), max(p.max for p in seen)
    count = sum(p.count for p in parts)
    notes = tuple(sorted({n for p in parts for n in p.notes if not n.startswith(("constant", "no values"))}))
    if lo == hi:
        notes += (f"constant tensor (every value {lo:g})",)
    if parts[0].histogram is None:
        if table.params.get("moving_average"):
            raise TableError("tables calibrated with a moving average cannot be merged exactly")
        rng = (lo, hi)
        if table.params.get("symmetric"):
            m = max(abs(lo), abs(hi))
            rng = (-m, m)
        return TensorStats(lo, hi, count, rng, notes, None, channels)
    from .histogram import StreamingHistogram
    from .methods import histogram_range
    merged = StreamingHistogram.merged([StreamingHistogram.from_dict(p.histogram) for p in parts])
    hist = merged.to_dict()
    return TensorStats(lo, hi, count, histogram_range(hist, table.method, table.params), notes, hist, channels)
