"""A per-tensor histogram collected batch by batch in flat memory, exact under re-binning.

The grid
--------
Bin ``j`` of a histogram whose width is ``w = 2**k`` is the half-open interval
``[j*w, (j+1)*w)``: the grid is anchored at 0, every edge is an integer multiple of ``w``,
and a value ``x`` falls in bin ``floor(x / w)``. Dividing by a power of two only changes a
float's exponent, so that index is exact. ``k`` is always the *smallest* integer for which the
bins from ``floor(min/w)`` to ``floor(max/w)`` number at most ``bins``; only those bins are
stored, so the first holds ``min`` and the last holds ``max``.

How re-binning keeps every count
--------------------------------
When a batch widens ``[min, max]``, the smallest admissible ``k`` can only grow (a wider range
never fits in fewer bins), say to ``k + d``. Old bin ``j`` is ``[j*2**k, (j+1)*2**k)``, which
lies entirely inside new bin ``j >> d`` because
``floor(floor(x / 2**k) / 2**d) == floor(x / 2**(k+d))``. So old counts are *summed* into new
bins, never split or interpolated: no mass moves across an edge it did not already sit beside.
The histogram after any sequence of batches therefore equals the one computed directly from all
the values at the final ``k``, and the final ``k`` depends only on the overall min and max. The
state is a function of the multiset of values seen: batch order, batch sizes and sharding
(``merge``) do not change a single count.

Worked example (``bins=4``): the batch ``[0.3, 0.9]`` needs ``w = 0.25`` (bins 1..3, since
``w = 0.125`` would need bins 2..7). Then ``[2.5]`` arrives: ``[0.3, 2.5]`` needs ``w = 1``
(bins 0..2), ``d = 2``, and old bins 1 and 3 both map to new bin ``1 >> 2 == 3 >> 2 == 0``:
counts ``[2, 0, 1]`` over ``[0, 1), [1, 2), [2, 3)``, exactly what one pass over
``[0.3, 0.9, 2.5]`` gives.

Resolution floor and degenerate tensors
---------------------------------------
A width finer than float32 resolution at the largest magnitude seen says nothing new, and an
all-equal tensor has no smallest width at all. So ``k`` never drops below
``exponent(max|x|) - 24`` (the float32 ulp of ``max|x|``; ``max|x| in [2**(e-1), 2**e)``):
a constant tensor of 5.0 gets one bin of width ``2**-21``, and indices stay below ``2**25``.
An all-zero tensor gets one bin of width ``2**-24``. These are the only states whose width can
later *shrink* (zeros, then a value 1e-30): all their mass sits at one known point, which lands
in exactly one bin of any grid, so that re-binning is exact too.
"""

from __future__ import annotations

import base64
import math
import zlib
from typing import Iterable

import numpy as np

FORMAT_VERSION = 1
_RESOLUTION_BITS = 24  # float32 significand: the finest width is the float32 ulp of max|x|
_MIN_WIDTH_LOG2 = -1074  # 2**-1074, the smallest positive float64
_CHUNK = 1 << 18  # values binned at a time: 2 MiB temporaries
_KEYS = {"version", "bins", "count", "batches", "min", "max", "width_log2", "first_bin_index",
         "counts"}


def _grid_index(x: float, k: int) -> int:
    """floor(x / 2**k) exactly: _grid_index(-0.3, -2) == floor(-1.2) == -2."""
    y = math.ldexp(x, -k)
    if y == 0.0 and x < 0.0:  # a negative value too small to survive the scaling
        return -1
    return math.floor(y)


def _bins_needed(lo: float, hi: float, k: int) -> int:
    """Bins of width 2**k from the one holding lo to the one holding hi: ([0.3, 0.9], -2) -> 3."""
    return _grid_index(hi, k) - _grid_index(lo, k) + 1


def _resolution_floor(lo: float, hi: float) -> int:
    """The finest width_log2 allowed: float32 ulp of max|x|; max|x| = 5.0 -> 3 - 24 = -21."""
    biggest = max(abs(lo), abs(hi))
    exponent = math.frexp(biggest)[1] if biggest > 0.0 else 0
    return max(exponent - _RESOLUTION_BITS, _MIN_WIDTH_LOG2)


def width_log2_for(lo: float, hi: float, bins: int) -> int:
    """The smallest k (not below the resolution floor) with [lo, hi] in at most ``bins`` bins.

    [0.3, 0.9] with 4 bins: k = -3 needs bins 2..7 (6 bins), k = -2 needs bins 1..3, so -2.
    """
    k = _resolution_floor(lo, hi)
    if hi > lo:  # start just below the answer: hi - lo > bins * 2**k means too many bins
        spread = hi - lo if math.isfinite(hi - lo) else math.ldexp(hi / 2 - lo / 2, 1)
        k = max(k, math.frexp(spread)[1] - bins.bit_length() - 2)
    while _bins_needed(lo, hi, k) > bins:
        k += 1
    return k


def _as_float_array(x) -> np.ndarray:
    """float32/float64 kept as they are; other real dtypes converted to float64."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"histogram needs real numbers, got dtype {x.dtype}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return x


def _bin_counts(x: np.ndarray, k: int, first: int, n: int) -> np.ndarray:
    """Counts of ``x`` in bins first..first+n-1 of width 2**k (vectorised floor + bincount).

    Division by a power of two is exact; in float64 a float32 value cannot underflow. A float64
    value can, when k > 0 and |x| < 2**(k-1075): a tiny negative x would land in bin 0, not -1.
    Works in chunks so that temporaries stay small (and in cache) whatever the batch size.
    """
    flat, width = x.reshape(-1), math.ldexp(1.0, k)
    counts = np.zeros(n, dtype=np.int64)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        q = np.divide(part, width, dtype=np.float64)
        np.floor(q, out=q)
        if k > 0 and x.dtype == np.float64:
            q[(q == 0.0) & (part < 0.0)] = -1.0
        idx = q.astype(np.int64)
        idx -= first
        counts += np.bincount(idx, minlength=n)
    return counts


def _encode_counts(counts: np.ndarray) -> str:
    """base64(zlib(little-endian int64)): [3, 0, 1] -> a 24-byte buffer, compressed."""
    raw = np.ascontiguousarray(counts, dtype="<i8").tobytes()
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def _decode_counts(text: str) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


class StreamingHistogram:
    """Histogram of one tensor's values, updated batch by batch, at most ``bins`` int64 counts.

    >>> h = StreamingHistogram(bins=4)
    >>> h.update(np.array([0.3, 0.9])); h.update(np.array([2.5]))
    >>> h.width, h.first_bin_index, h.counts.tolist(), h.edges().tolist()
    (1.0, 0, [2, 0, 1], [0.0, 1.0, 2.0, 3.0])

    An empty histogram has ``count == 0``, ``min == inf``, ``max == -inf`` (the identities of
    min/max), no bins, and ``width_log2 is None``. ``batches`` counts ``update`` calls, empty
    ones included; it records how the data arrived and is the one field ``==`` ignores, so
    that one pass, shuffled batches and merged shards compare equal.
    """

    __slots__ = ("_bins", "_k", "_first", "_counts", "_min", "_max", "_count", "_batches")

    def __init__(self, bins: int = 2048):
        if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        self._bins = int(bins)
        self._k: int | None = None
        self._first = 0
        self._counts = np.zeros(0, dtype=np.int64)
        self._min = math.inf
        self._max = -math.inf
        self._count = 0
        self._batches = 0

    # -- reading -------------------------------------------------------------------------------

    @property
    def bins(self) -> int:
        """The most bins this histogram may use (it uses between about half and all of them)."""
        return self._bins

    @property
    def min(self) -> float:
        return self._min

    @property
    def max(self) -> float:
        return self._max

    @property
    def count(self) -> int:
        """Number of values seen."""
        return self._count

    @property
    def batches(self) -> int:
        """Number of ``update`` calls (empty batches included), summed by ``merge``."""
        return self._batches

    @property
    def width_log2(self) -> int | None:
        """k in width = 2**k; None while empty."""
        return self._k

    @property
    def width(self) -> float:
        """Bin width 2**k (nan while empty)."""
        return math.ldexp(1.0, self._k) if self._k is not None else math.nan

    @property
    def first_bin_index(self) -> int:
        """Grid index j of the first stored bin, which covers [j*width, (j+1)*width)."""
        return self._first

    @property
    def origin(self) -> float:
        """Left edge of the first stored bin: first_bin_index * width (<= min)."""
        return self._first * self.width if self._k is not None else math.nan

    @property
    def counts(self) -> np.ndarray:
        """A copy of the int64 counts, first and last bins non-zero."""
        return self._counts.copy()

    def edges(self) -> np.ndarray:
        """The len(counts) + 1 bin edges (first_bin_index + i) * width, exact in float64."""
        if self._k is None:
            return np.zeros(0)
        idx = np.arange(self._first, self._first + len(self._counts) + 1, dtype=np.float64)
        return idx * self.width

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StreamingHistogram):
            return NotImplemented
        return (self._bins, self._k, self._first, self._min, self._max, self._count) == (
            other._bins, other._k, other._first, other._min, other._max, other._count
        ) and np.array_equal(self._counts, other._counts)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        if self._k is None:
            return f"StreamingHistogram(bins={self._bins}, empty, batches={self._batches})"
        return (f"StreamingHistogram(bins={self._bins}, count={self._count}, min={self._min:g}, "
                f"max={self._max:g}, width=2**{self._k}, used={len(self._counts)})")

    # -- writing -------------------------------------------------------------------------------

    def update(self, x: np.ndarray) -> None:
        """Add the values of ``x`` (any shape, finite); an empty ``x`` only counts a batch."""
        x = _as_float_array(x)
        if x.size:
            lo, hi = float(x.min()), float(x.max())
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("histogram values must be finite (got NaN or Inf)")
            self._regrid(min(lo, self._min), max(hi, self._max))
            self._counts += _bin_counts(x, self._k, self._first, len(self._counts))
            self._count += int(x.size)
        self._batches += 1

    def merge(self, other: "StreamingHistogram") -> "StreamingHistogram":
        """A new histogram equal to one that saw both streams; neither input changes."""
        return StreamingHistogram.merged([self, other])

    @classmethod
    def merged(cls, hists: Iterable["StreamingHistogram"]) -> "StreamingHistogram":
        """The histogram of all streams together, e.g. of shards collected in parallel."""
        hists = list(hists)
        if not hists:
            raise ValueError("merged() needs at least one histogram")
        bins = {h.bins for h in hists}
        if len(bins) != 1:
            raise ValueError(f"cannot merge histograms with different bin budgets {sorted(bins)}")
        out = cls(bins.pop())
        out._regrid(min(h.min for h in hists), max(h.max for h in hists))
        for h in hists:
            if h.count:
                out._counts += h._counts_on(out._k, out._first, len(out._counts))
            out._count += h.count
            out._batches += h.batches
        return out

    def _regrid(self, lo: float, hi: float) -> None:
        """Move to the grid that [lo, hi] needs, summing old bins into new ones."""
        if lo > hi:  # still empty
            return
        k = width_log2_for(lo, hi, self._bins)
        first = _grid_index(lo, k)
        n = _grid_index(hi, k) - first + 1
        if (k, first, n) != (self._k, self._first, len(self._counts)):
            self._counts = self._counts_on(k, first, n)
            self._k, self._first = k, first
        self._min, self._max = lo, hi

    def _counts_on(self, k: int, first: int, n: int) -> np.ndarray:
        """This histogram's counts on the grid (k, first, n); exact, see the module docstring."""
        out = np.zeros(n, dtype=np.int64)
        if self._count == 0:
            return out
        if self._min == self._max:  # one point: it lies in exactly one bin of any grid
            out[_grid_index(self._min, k) - first] = self._count
            return out
        if k < self._k:
            raise AssertionError("a histogram's width never shrinks while min < max")
        shift = min(k - self._k, 63)  # |old indices| < 2**26, so >> 63 == >> anything larger
        old = np.arange(self._first, self._first + len(self._counts), dtype=np.int64)
        np.add.at(out, (old >> shift) - first, self._counts)
        return out

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A compact, JSON-ready record; ``from_dict(to_dict())`` is exact.

        ``counts`` is base64 of zlib-compressed little-endian int64. No zero bins need trimming
        at the ends: the first stored bin holds min and the last holds max. A float survives
        ``json.dumps``/``loads`` exactly (repr round-trips).
        """
        empty = self._k is None
        return {
            "version": FORMAT_VERSION,
            "bins": self._bins,
            "count": self._count,
            "batches": self._batches,
            "min": None if empty else self._min,
            "max": None if empty else self._max,
            "width_log2": self._k,
            "first_bin_index": None if empty else self._first,
            "counts": _encode_counts(self._counts),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "StreamingHistogram":
        """Rebuild a histogram from ``to_dict``'s record, checking that it is consistent."""
        unknown, missing = set(d) - _KEYS, _KEYS - {"batches"} - set(d)
        if unknown or missing:
            raise ValueError(f"histogram record: unknown keys {sorted(unknown)}, "
                             f"missing keys {sorted(missing)}")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"histogram version {d.get('version')!r} is not {FORMAT_VERSION}")
        h = cls(int(d["bins"]))
        h._batches = int(d.get("batches", 0))
        counts = _decode_counts(d["counts"])
        if d["count"] == 0:
            if len(counts) or d["min"] is not None or d["width_log2"] is not None:
                raise ValueError("an empty histogram (count 0) must hold no bins and no min/max")
            return h
        h._set(float(d["min"]), float(d["max"]), int(d["count"]), counts)
        if (h._k, h._first) != (d["width_log2"], d["first_bin_index"]):
            raise ValueError(f"width_log2/first_bin_index {d['width_log2']}/{d['first_bin_index']} "
                             f"do not match min/max (expected {h._k}/{h._first})")
        return h

    def _set(self, lo: float, hi: float, count: int, counts: np.ndarray) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"histogram min/max must be finite with min <= max, got {lo}, {hi}")
        self._regrid(lo, hi)
        if len(counts) != len(self._counts):
            raise ValueError(f"{len(counts)} counts stored, min/max need {len(self._counts)}")
        if (counts < 0).any() or counts[0] == 0 or counts[-1] == 0 or int(counts.sum()) != count:
            raise ValueError("counts must be non-negative, non-zero at both ends and sum to count")
        self._counts, self._count = counts, count
