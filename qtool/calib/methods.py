"""Turn an observer into TensorStats with the range its method chooses, and
re-derive a range for another method from a table's stored histogram."""

from __future__ import annotations

from ..config import CalibrateOptions
from ..errors import TableError
from .table import TensorStats


def finish(observer, options: CalibrateOptions) -> TensorStats:
    stats = observer.stats()
    hist = stats.get("histogram")
    if options.method in ("minmax", "auto") or hist is None:  # auto: minmax until measured (auto.choose)
        lo, hi = stats["min"], stats["max"]
        if options.symmetric:
            m = max(abs(lo), abs(hi))
            lo, hi = -m, m
        rng = (lo, hi)
    else:
        rng = _range_of(observer.hist, options.method, _params(options))
    return TensorStats(stats["min"], stats["max"], stats["count"], rng, tuple(stats["notes"]), hist,
                       stats.get("channels"))


def _params(options: CalibrateOptions) -> dict:
    return {"percentile": options.percentile, "symmetric": options.symmetric}


def histogram_range(hist: dict, method: str, params: dict) -> tuple[float, float]:
    """The range ``method`` picks from a stored (table) histogram."""
    from .histogram import StreamingHistogram
    return _range_of(StreamingHistogram.from_dict(hist), method, params)


def _range_of(h, method: str, params: dict) -> tuple[float, float]:
    from .ranges import compute_range
    if h.count == 0:
        return (0.0, 0.0)
    kwargs = {"symmetric": bool(params.get("symmetric", False))}
    if method == "percentile":
        kwargs["percentile"] = float(params.get("percentile", 99.999))
    if method == "mse" and "num_levels" in params:
        kwargs["num_levels"] = int(params["num_levels"])
    lo, hi = compute_range(method, h, **kwargs)
    return float(lo), float(hi)


def derive_range(stats: TensorStats, method: str, params: dict, bits: int = 8) -> tuple[float, float]:
    """The range ``method`` gives for a tensor, from the table alone, for a
    ``bits``-wide grid: mse searches that grid; entropy's 128-bin KL search models
    an 8-bit grid only, so wider grids take min/max; percentile does not depend on it.
    auto: the method measured best for this tensor (recorded by ``--method auto``)."""
    if method == "auto":
        if stats.auto is None:
            raise TableError("--method auto chooses each range by measuring the model's outputs, which a table "
                             "alone cannot do; calibrate with --method auto (or quantize --data ... --method auto)")
        method = stats.auto["method"]
    if method == "minmax" or (method == "entropy" and bits > 8):
        return stats.min, stats.max
    if stats.histogram is None:
        raise TableError(f"table holds no histograms, so --method {method} cannot be derived from it; "
                         f"calibrate with --method {method} (or any histogram method)")
    if method == "mse" and bits != 8:
        params = dict(params, num_levels=2**bits)
    return histogram_range(stats.histogram, method, params)
