"""Per-channel statistics of the activations that feed a linear layer's data input.

SmoothQuant (and a later bias correction) need, for each input channel of a MatMul/Gemm
(and Conv), the channel's extremes and mean over the calibration data. They are reduced
batch by batch like every other statistic, so memory stays flat: three float64 vectors per
tensor.

    >>> obs = ChannelObserver(inner=None, axis=-1)
    >>> obs.update(np.array([[1.0, -4.0], [3.0, 2.0]], np.float32))
    >>> obs.channels()["max"], obs.channels()["min"], obs.channels()["mean"]
    ([3.0, 2.0], [1.0, -4.0], [2.0, -1.0])

In a table the record sits in the tensor's statistics as an optional field::

    "channels": {"axis": -1, "min": [...], "max": [...], "mean": [...]}

(absmax of channel j is max(-min[j], max[j])); tables without it load as before.
"""

from __future__ import annotations

import math

import numpy as np

DIGITS = 7  # significant digits kept in a table: float32's precision, a compact JSON


def channel_axes(view, conv: bool = True) -> dict[str, int]:
    """{activation: channel axis} for the data input of every MatMul (last axis: K), Gemm
    (last axis, or 0 under transA: A is [K, M]) and, with ``conv``, Conv (axis 1)."""
    axes: dict[str, int] = {}
    for node in view.nodes:
        if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
            continue
        x = node.input[0]
        if view.is_initializer(x) or not view.is_float(x):
            continue
        if node.op_type == "MatMul":
            axes.setdefault(x, -1)
        elif node.op_type == "Gemm":
            axes.setdefault(x, 0 if view.attr(node, "transA", 0) else -1)
        elif node.op_type == "Conv" and conv:
            axes.setdefault(x, 1)
    return axes


def rounded(values) -> list[float]:
    """Float vector as stored in a table (``DIGITS`` significant digits): what is computed in
    memory and what a table gives back are the same numbers."""
    return [float(f"{float(v):.{DIGITS}g}") for v in values]


class ChannelObserver:
    """Wraps a tensor's observer (``inner``, may be None) and also keeps, per channel along
    ``axis``, the running min, max and sum (float64). A batch whose channel count differs
    from the first one's (or whose rank has no such axis) drops the record, with a note."""

    def __init__(self, inner, axis: int):
        self.inner = inner
        self.axis = axis
        self.min = self.max = self.sum = None
        self.rows = 0
        self.dropped: str | None = None

    def __getattr__(self, name):  # the histogram methods read observer.hist
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def update(self, x: np.ndarray) -> None:
        if self.inner is not None:
            self.inner.update(x)
        if self.dropped or x.size == 0:
            return
        if x.ndim == 0 or not -x.ndim <= self.axis < x.ndim:
            self.dropped = f"per-channel statistics dropped: a batch of rank {x.ndim} has no axis {self.axis}"
            return
        flat = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])
        if self.min is not None and flat.shape[1] != len(self.min):
            self.dropped = (f"per-channel statistics dropped: {flat.shape[1]} channels in a batch after "
                            f"{len(self.min)} in the first")
            return
        lo, hi, total = flat.min(axis=0), flat.max(axis=0), flat.sum(axis=0, dtype=np.float64)
        if self.min is None:
            self.min, self.max, self.sum = lo.astype(np.float64), hi.astype(np.float64), total
        else:
            np.minimum(self.min, lo, out=self.min)
            np.maximum(self.max, hi, out=self.max)
            self.sum += total
        self.rows += flat.shape[0]

    def channels(self) -> dict | None:
        if self.dropped or self.min is None:
            return None
        return {"axis": self.axis, "min": rounded(self.min), "max": rounded(self.max),
                "mean": rounded(self.sum / self.rows)}

    def stats(self) -> dict:
        out = self.inner.stats() if self.inner is not None else {"notes": []}
        out["notes"] = list(out.get("notes", [])) + ([self.dropped] if self.dropped else [])
        record = self.channels()
        if record is not None:
            out["channels"] = record
        return out


def check_channels(d) -> dict:
    """Parse a table's ``channels`` field; a ValueError names the part that is wrong."""
    if not isinstance(d, dict):
        raise ValueError("channels must be an object {axis, min, max, mean}")
    axis = d.get("axis")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"channels.axis must be an integer, got {axis!r}")
    vectors = {}
    for key in ("min", "max", "mean"):
        v = d.get(key)
        if not isinstance(v, list) or not v:
            raise ValueError(f"channels.{key} must be a non-empty list of numbers")
        for i, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"channels.{key}[{i}] must be a finite number, got {x!r}")
        vectors[key] = [float(x) for x in v]
    if not len(vectors["min"]) == len(vectors["max"]) == len(vectors["mean"]):
        raise ValueError("channels.min, .max and .mean must have the same length")
    bad = next((i for i, (a, b) in enumerate(zip(vectors["min"], vectors["max"])) if a > b), None)
    if bad is not None:
        raise ValueError(f"channels: min[{bad}] > max[{bad}]")
    return {"axis": axis, **vectors}


def merge_channels(parts: list[tuple[dict | None, int]]) -> dict | None:
    """One record from shards' (channels, count) pairs: extremes by min/max, means weighted by
    each shard's count; None when a shard with values has none (or the axes or widths differ)."""
    seen = [(c, n) for c, n in parts if n > 0]
    if not seen or any(c is None for c, _ in seen):
        return None
    first = seen[0][0]
    if any(c["axis"] != first["axis"] or len(c["min"]) != len(first["min"]) for c, _ in seen):
        return None
    total = sum(n for _, n in seen)
    mean = sum(np.asarray(c["mean"], np.float64) * n for c, n in seen) / total
    return {"axis": first["axis"], "min": rounded(np.min([c["min"] for c, _ in seen], axis=0)),
            "max": rounded(np.max([c["max"] for c, _ in seen], axis=0)), "mean": rounded(mean)}
