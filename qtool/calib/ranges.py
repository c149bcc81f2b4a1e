"""Clipping ranges read from a StreamingHistogram: minmax, percentile, entropy (KL) and mse.

Every method takes a histogram and returns ``(lo, hi)`` as Python floats with ``lo <= hi``.
Shared conventions:

* Mass is spread uniformly inside a bin, and the first and last bins are cut to ``[min, max]``
  (the histogram knows both exactly), so no method ever reaches beyond the data.
* A *one-signed* tensor (``min >= 0``, e.g. after ReLU, or ``max <= 0``) is clipped only on its
  far side; the near end stays ``min`` (resp. ``max``). The quantization grid contains 0 anyway
  (zero must be exact), so clipping the near side could only lose values for nothing.
* ``symmetric=True`` returns ``(-t, t)``; ``t`` is chosen on the histogram of ``|x|``, which the
  power-of-two grid anchored at 0 gives exactly: bin ``[j*w, (j+1)*w)`` folds onto ``|x|`` bin
  ``-j-1`` for ``j < 0``.
* A constant tensor gets ``(c, c)`` (symmetric: ``(-|c|, |c|)``); an empty one is an error.

Worked example: 1,000,000 values uniform on [0, 1) plus ten outliers at 50 (2048 bins, width
2**-5 = 0.03125 over [0, 50]): minmax gives about (0, 50); percentile 99.999 keeps 99.999 % of the
mass below hi, and 0.001 % of 1,000,010 is 10.0001 values, so hi is just under 1.0 — within
one bin of ``np.percentile(x, 99.999, method="inverted_cdf")``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .histogram import StreamingHistogram

# -- views of a histogram ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Bins:
    """Bin b is [edges[b], edges[b+1]] holding counts[b] values spread uniformly (a point
    mass when the two edges are equal). ``width`` is the grid width of the interior bins."""

    edges: np.ndarray
    counts: np.ndarray
    width: float

    def mirrored(self) -> "_Bins":
        """The bins of -x: [-3, -1, 0] with counts [2, 5] -> [0, 1, 3] with counts [5, 2]."""
        return _Bins(-self.edges[::-1], self.counts[::-1], self.width)


def _bins(h: StreamingHistogram) -> _Bins:
    """The histogram with its outer edges cut to [min, max]: origin 0.0, width 0.25 and
    min 0.1, max 0.6 -> edges [0.1, 0.25, 0.5, 0.6]."""
    edges = h.edges()
    edges[0], edges[-1] = h.min, h.max
    return _Bins(edges, h.counts.astype(np.float64), h.width)


def _abs_bins(h: StreamingHistogram) -> _Bins:
    """Bins of |x|: the negative bins folded onto the positive ones (exact on the 0-anchored
    grid); edges [0, w, 2w, ..., max|x|]."""
    if h.min >= 0:
        return _bins(h)
    if h.max <= 0:
        return _bins(h).mirrored()
    counts, width, top = _zero_based(h, "abs")
    edges = np.arange(len(counts) + 1, dtype=np.float64) * width
    edges[-1] = top
    return _Bins(edges, counts.astype(np.float64), width)


def _zero_based(h: StreamingHistogram, side: str) -> tuple[np.ndarray, float, float]:
    """(counts, width, extreme) of |x| on grid bins 0, 1, ... for one side of the data.

    ``side`` is "+" (x >= 0), "-" (x < 0, mirrored: grid bin j -> -j-1) or "abs" (both).
    ``extreme`` is that side's largest |x|. When the data sit far from 0 (min > 0) the span
    from 0 may need more than ``h.bins`` bins; it is then coarsened by a power of two, which
    sums whole bins and stays exact.
    """
    counts, first = h.counts, h.first_bin_index
    grid = np.arange(first, first + len(counts), dtype=np.int64)
    parts = []
    if side in ("+", "abs"):
        parts.append((grid[grid >= 0], counts[grid >= 0]))
    if side in ("-", "abs"):
        parts.append((-grid[grid < 0] - 1, counts[grid < 0]))
    index = np.concatenate([p[0] for p in parts])
    mass = np.concatenate([p[1] for p in parts])
    shift = 0
    while (int(index.max()) >> shift) + 1 > h.bins:
        shift += 1
    out = np.zeros((int(index.max()) >> shift) + 1, dtype=np.int64)
    np.add.at(out, index >> shift, mass)
    extreme = {"+": h.max, "-": -h.min, "abs": max(-h.min, h.max)}[side]
    return out, math.ldexp(h.width, shift), extreme


def _check(h: StreamingHistogram) -> None:
    if not isinstance(h, StreamingHistogram):
        raise TypeError(f"expected a StreamingHistogram, got {type(h).__name__}")
    if h.count == 0:
        raise ValueError("the histogram is empty (no values seen): it has no range")


def _trivial(h: StreamingHistogram, symmetric: bool) -> tuple[float, float] | None:
    """The range of a constant tensor, which no method can clip; None otherwise."""
    if h.min != h.max:
        return None
    return (-abs(h.min), abs(h.min)) if symmetric else (h.min, h.max)


def _one_sided(h: StreamingHistogram, pick_positive: Callable[[], float],
               pick_negative: Callable[[], float]) -> tuple[float, float]:
    """Combine per-side thresholds, keeping the near end of a one-signed tensor."""
    lo = h.min if h.min >= 0 else -pick_negative()
    hi = h.max if h.max <= 0 else pick_positive()
    return float(lo), float(hi)


# -- minmax -----------------------------------------------------------------------------------


def minmax_range(h: StreamingHistogram, symmetric: bool = False) -> tuple[float, float]:
    """(min, max) of everything seen; symmetric: (-m, m) with m = max|x|.

    Values seen -0.5, 2.0 -> (-0.5, 2.0); symmetric -> (-2.0, 2.0).
    """
    _check(h)
    if symmetric:
        m = max(abs(h.min), abs(h.max))
        return (-float(m), float(m))
    return float(h.min), float(h.max)


# -- percentile -------------------------------------------------------------------------------


def _quantile(b: _Bins, fraction: float, largest: bool) -> float:
    """A value v with a ``fraction`` of the mass below it, interpolated inside its bin.

    Where the CDF is flat (empty bins) any v in the gap qualifies: ``largest=False`` takes its
    left end (the smallest v reaching the mass, right for an upper clip), ``largest=True`` its
    right end (for a lower clip). Counts [2, 2] on [0, 1, 2], fraction 0.75 -> 1.5.
    """
    cum = np.concatenate([[0.0], np.cumsum(b.counts)])
    target = fraction * cum[-1]
    i = int(np.searchsorted(cum, target, side="right" if largest else "left"))
    if i == 0:
        return float(b.edges[0])
    if i > len(b.counts):
        return float(b.edges[-1])
    k = i - 1
    share = (target - cum[k]) / b.counts[k]
    return float(b.edges[k] + min(max(share, 0.0), 1.0) * (b.edges[k + 1] - b.edges[k]))


def percentile_range(h: StreamingHistogram, percentile: float = 99.999,
                     symmetric: bool = False) -> tuple[float, float]:
    """Clip each tail so that it keeps ``percentile`` % of the mass on its side of the range.

    Convention: hi is the ``percentile``-th percentile and lo the ``(100 - percentile)``-th, so
    each clipped tail loses ``100 - percentile`` % of all values (onnxruntime instead splits
    that loss between the two tails). A one-signed tensor has one tail: min >= 0 gives
    (min, p-th percentile). ``symmetric``: t is the p-th percentile of |x|, range (-t, t).
    Percentiles interpolate linearly inside a bin, so they are within one bin width of
    ``np.percentile(x, p, method="inverted_cdf")``. ``percentile`` must lie in (50, 100].

    100 values 0, 1, ..., 99 in bins of width 1, percentile 95 -> (min, 95.0) = (0.0, 95.0).
    """
    _check(h)
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    fixed = _trivial(h, symmetric)
    if fixed:
        return fixed
    keep = percentile / 100.0
    if symmetric:
        t = _quantile(_abs_bins(h), keep, largest=False)
        return -t, t
    b = _bins(h)
    return _one_sided(h, lambda: _quantile(b, keep, largest=False),
                      lambda: -_quantile(b, 1.0 - keep, largest=True))


# -- entropy (KL divergence) ------------------------------------------------------------------


def _xlogx(v: np.ndarray) -> np.ndarray:
    """v * log(v) with 0 * log(0) = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def kl_divergences(counts: np.ndarray, num_quantized_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, KL_i) for every candidate i = num_quantized_bins .. len(counts): TensorRT's recipe.

    For candidate i (threshold at the right edge of bin i-1), with c the counts and N = sum(c):

    * P = c[:i] with the clipped tail sum(c[i:]) added to its last bin (so P sums to N);
    * Q: c[:i] (without the tail) summed into ``num_quantized_bins`` levels of m = i // nq
      bins each, the last level also taking the i % nq left-over bins; each level's mass is
      spread evenly over the bins of that level where P is non-zero (Q is 0 where P is);
    * KL(P/N || Q/sum(Q)), sum(Q) = sum(c[:i]); infinite when Q is 0 where P is not (a tail
      folded into an empty last level). The i = len(counts) candidate is always finite.

    No smoothing epsilon is needed for that reason. Vectorised over all candidates at once:
    with A = sum P log P and B = sum over levels of (mass of P in the level) * log(level mass
    / non-zero bins), KL_i = (A - B) / N - log N + log sum(c[:i]); O(candidates x nq) work.

    counts [4, 0, 2, 2], nq 2: i = 2 gives P = [4, 4], Q levels [4], [0] -> KL inf;
    i = 4 gives P = Q = [4, 0, 2, 2] -> KL 0.
    """
    c = np.asarray(counts, dtype=np.float64)
    n, nq = len(c), int(num_quantized_bins)
    i = np.arange(nq, n + 1)
    if len(i) == 0:
        return i, np.zeros(0)
    total = c.sum()
    cum = np.concatenate([[0.0], np.cumsum(c)])
    nonzero = np.concatenate([[0], np.cumsum(c > 0)])
    plogp = np.concatenate([[0.0], np.cumsum(_xlogx(c))])
    kept = cum[i]
    tail = total - kept
    last = c[i - 1]
    a = plogp[i - 1] + _xlogx(last + tail)
    m = i // nq
    starts = m[:, None] * np.arange(nq)[None, :]
    ends = starts + m[:, None]
    ends[:, -1] = i
    level_mass = cum[ends] - cum[starts]
    level_bins = (nonzero[ends] - nonzero[starts]).astype(np.float64)
    level_bins[:, -1] += (last == 0) & (tail > 0)
    p_mass = level_mass.copy()
    p_mass[:, -1] += tail
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log(level_mass / np.where(level_bins > 0, level_bins, 1.0))
        b = np.where(p_mass > 0, p_mass * log_q, 0.0).sum(axis=1)
        kl = (a - b) / total - math.log(total) + np.log(kept)
    starved = ((level_mass == 0) & (p_mass > 0)).any(axis=1) | (kept <= 0)
    kl[starved] = np.inf
    return i, np.maximum(kl, 0.0)


def resample(counts: np.ndarray, width: float, extreme: float, size: int) -> np.ndarray:
    """Counts of grid bins [j*width, (j+1)*width) (the last cut at ``extreme``) moved onto
    ``size`` equal bins over [0, extreme], mass uniform within each source bin.

    counts [2, 2] with width 1, extreme 2, size 4 -> [1, 1, 1, 1]; the total is kept.
    """
    edges = np.arange(len(counts) + 1, dtype=np.float64) * (width / extreme)  # in units of extreme
    edges[-1] = 1.0
    cdf = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    out = np.interp(np.linspace(0.0, 1.0, size + 1), edges, cdf)
    out[0], out[-1] = 0.0, cdf[-1]
    return np.maximum(np.diff(out), 0.0)


def _entropy_side(h: StreamingHistogram, which: str, nq: int, flatten_zero_bin: bool) -> float:
    """The KL-optimal threshold for one side ("+", "-" or "abs"), at most that side's extreme.

    The search runs on ``size = bins * extreme / (max - min)`` equal bins over [0, extreme]
    (capped at ``bins``): a number fixed by the data's shape, not its scale, where the stored
    grid's count varies by up to 2x with where the range falls between powers of two.
    """
    counts, width, extreme = _zero_based(h, which)
    if flatten_zero_bin and len(counts) > 1:
        counts[0] = min(counts[0], counts[1])
    size = min(h.bins, math.ceil(h.bins * extreme / (h.max - h.min)))
    if size <= nq:
        return extreme  # no more bins than levels: quantization keeps every bin apart
    i, kl = kl_divergences(resample(counts, width, extreme, size), nq)
    t = float(i[int(np.argmin(kl))]) * extreme / size
    return min(max(t, _nearest(h, which)), extreme)


def _nearest(h: StreamingHistogram, which: str) -> float:
    """The smallest |x| on a side; resampled mass can sit below it, a threshold cannot."""
    signed = h.min < 0 < h.max
    return {"+": max(h.min, 0.0), "-": max(-h.max, 0.0),
            "abs": 0.0 if signed else min(abs(h.min), abs(h.max))}[which]


def entropy_range(h: StreamingHistogram, num_quantized_bins: int = 128, symmetric: bool = False,
                  flatten_zero_bin: bool = True) -> tuple[float, float]:
    """The threshold minimising KL(P || Q), searched over every bin edge (TensorRT's method).

    TensorRT histograms |x| in 2048 bins over [0, max|x|], so its answer does not depend on
    the data's scale. The stored grid's bin count does (it is a power of two wide, so the same
    shape uses between bins/2 and bins bins), and KL's choice moves with it; so the search
    runs on a histogram of |x| resampled to ``bins * extreme / (max - min)`` equal bins over
    [0, extreme] (at most ``bins``; 1024..2048 for |x| of signed data), mass uniform within a
    stored bin — between 1x and 2x finer than stored, never coarser. Every threshold from
    ``num_quantized_bins`` bins to all of them is tried (``kl_divergences``): 1921 candidates
    for 2048 bins and 128 levels, where onnxruntime's defaults (128 bins, 128 levels) try one.
    Ties go to the smaller threshold.

    Signed tensors: ``symmetric=True`` runs it once on |x| and returns (-t, t), as TensorRT
    does for int8. ``symmetric=False`` runs it on each side separately (the negative values
    mirrored) and returns (-t_neg, t_pos): an asymmetric grid spends levels on each side, and
    activations are rarely symmetric (GELU/SiLU: a short negative side, a long positive tail),
    so folding would let one side's tail decide the other side's clip. Each side is judged as
    its own distribution with ``num_quantized_bins`` levels; a side whose search would have no
    more bins than that is not clipped. A one-signed tensor is searched on its one side only.

    ``flatten_zero_bin``: exact zeros (ReLU, padding) pile up in bin [0, w). Any grid holding
    0 represents them exactly, yet with the literal recipe that spike dominates the KL (Q
    spreads it over a whole level) and drags the threshold towards the smallest candidates
    (ReLU of 10**6 N(0, 1) values: about 1.9 instead of about 4.5). As NVIDIA's
    pytorch-quantization does, bin 0 is lowered to its neighbour's count (min(c0, c1)) before
    the search. Pass False for the literal TensorRT recipe.

    1,000,000 Laplace(0, 1) values with 10 outliers at +-60 (symmetric=True): minmax gives
    (-60, 60); entropy keeps the Laplacian body and clips near 10.
    """
    _check(h)
    if num_quantized_bins < 2:
        raise ValueError(f"num_quantized_bins must be >= 2, got {num_quantized_bins}")
    fixed = _trivial(h, symmetric)
    if fixed:
        return fixed

    def side(which: str) -> float:
        return _entropy_side(h, which, num_quantized_bins, flatten_zero_bin)

    if symmetric:
        t = side("abs")
        return -t, t
    return _one_sided(h, lambda: side("+"), lambda: side("-"))


# -- mse --------------------------------------------------------------------------------------


def _segment_mean(u, v, t):
    """Mean of (x - t)**2 for x uniform on [u, v] (a point when u == v); no division."""
    du, dv = u - t, v - t
    return (du * du + du * dv + dv * dv) / 3.0


def _rounding_mean(a, b, s):
    """Mean of (x - s*round(x/s))**2 for x uniform on [a, b], a <= b, split at the rounding
    cells' borders (stable for tiny or zero widths). [0, 1] with s = 1: 1/12."""
    ka, kb = np.floor(a / s + 0.5), np.floor(b / s + 0.5)
    ga, gb, half = ka * s, kb * s, 0.5 * s
    same = _segment_mean(a, b, ga)
    first = (ga + half - a) * _segment_mean(a, ga + half, ga)
    last = (b - (gb - half)) * _segment_mean(gb - half, b, gb)
    middle = np.maximum(kb - ka - 1.0, 0.0) * s ** 3 / 12.0
    split = kb > ka
    return np.where(split, (first + last + middle) / np.where(split, b - a, 1.0), same)


def _sawtooth_integral(u):
    """G(u) = integral from 0 to u of (v - round(v))**2 dv, up to a constant; one period = 1/12."""
    y = u + 0.5
    n = np.floor(y)
    f = y - n - 0.5
    return n / 12.0 + f * f * f / 3.0


def _bin_error(a, b, c, lo, hi, s):
    """Total squared error of c values uniform on [a, b] quantized with step s in [lo, hi]:
    rounding to the nearest multiple of s inside, clipping to lo/hi outside."""
    spread = b > a
    safe = np.where(spread, b - a, 1.0)
    in_lo, in_hi = np.clip(lo, a, b), np.clip(hi, a, b)
    below_end, above_start = np.minimum(b, lo), np.maximum(a, hi)
    f_below = np.where(spread, np.maximum(below_end - a, 0.0) / safe, a < lo)
    f_above = np.where(spread, np.maximum(b - above_start, 0.0) / safe, a > hi)
    f_in = np.where(spread, np.maximum(in_hi - in_lo, 0.0) / safe, (a >= lo) & (a <= hi))
    err = f_below * _segment_mean(a, np.maximum(below_end, a), lo)
    err = err + f_above * _segment_mean(np.minimum(above_start, b), b, hi)
    err = err + f_in * _rounding_mean(in_lo, np.maximum(in_hi, in_lo), s)
    return c * err


@dataclass(frozen=True)
class _Moments:
    """Prefix sums over bins of count, count*mean and count*E[x**2] (uniform in bin)."""

    m0: np.ndarray
    m1: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, b: _Bins) -> "_Moments":
        mid, w = (b.edges[:-1] + b.edges[1:]) / 2, np.diff(b.edges)
        parts = (b.counts, b.counts * mid, b.counts * (mid * mid + w * w / 12.0))
        return cls(*(np.concatenate([[0.0], np.cumsum(p)]) for p in parts))

    def clip_error(self, start, stop, t):
        """Sum over bins start..stop-1 of count * E[(x - t)**2]."""
        m0, m1, m2 = (m[stop] - m[start] for m in (self.m0, self.m1, self.m2))
        return np.maximum(m2 - 2.0 * t * m1 + t * t * m0, 0.0)


def _errors(b: _Bins, moments: _Moments, steps: np.ndarray, lo: np.ndarray,
            hi: np.ndarray) -> np.ndarray:
    """Squared error of the whole histogram for candidates (steps[k], lo[k, z], hi[k, z]).

    Bins strictly between the bins holding lo and hi are rounded: their exact errors come from
    G(edge / s) differences, summed by prefix sums; bins wholly outside are clipped (moments);
    the two bins holding lo and hi are split exactly (``_bin_error``).
    """
    n, e, c = len(b.counts), b.edges, b.counts
    s, widths = steps[:, None], np.diff(e)
    g = _sawtooth_integral(e[None, :] / s)
    inner = c * s ** 3 * np.diff(g, axis=1) / np.where(widths > 0, widths, 1.0)
    for k in (0, n - 1):  # the cut end bins may be tiny or points: the stable formula
        inner[:, k] = c[k] * _rounding_mean(e[k], e[k + 1], steps)
    inside = np.concatenate([np.zeros((len(steps), 1)), np.cumsum(inner, axis=1)], axis=1)
    bl = np.clip(np.searchsorted(e, lo, side="right") - 1, 0, n - 1)
    bh = np.clip(np.searchsorted(e, hi, side="right") - 1, 0, n - 1)
    rows = np.arange(len(steps))[:, None]
    err = np.where(bh > bl + 1, inside[rows, bh] - inside[rows, np.minimum(bl + 1, n)], 0.0)
    err = err + moments.clip_error(0, bl, lo) + moments.clip_error(bh + 1, n, hi)
    err = err + _bin_error(e[bl], e[bl + 1], c[bl], lo, hi, s)
    return err + np.where(bh != bl, _bin_error(e[bh], e[bh + 1], c[bh], lo, hi, s), 0.0)


_ROWS_PER_CHUNK = 64
_COARSE_LIMIT = 1 << 17  # (candidate x bin) cells searched exhaustively before coarse-to-fine
_STRIDE = 8
_REFINE = 3


def _search(b: _Bins, steps: np.ndarray, lo: np.ndarray, hi: np.ndarray,
            exhaustive: bool = False) -> tuple[int, int]:
    """(row, column) of the candidate with the least error.

    Exhaustive when steps x bins is small; otherwise rows (steps, sorted) are scanned with
    stride 8 and every row within 8 of the 3 best coarse rows is then searched: the error
    varies smoothly from one step to the next, and refining three basins guards against a
    second, narrower minimum. ``exhaustive=True`` forces the full scan.
    """
    moments = _Moments.of(b)

    def scan(rows: np.ndarray) -> np.ndarray:
        chunks = np.array_split(rows, max(1, math.ceil(len(rows) / _ROWS_PER_CHUNK)))
        out = [_errors(b, moments, steps[r], lo[r], hi[r]) for r in chunks]
        return np.concatenate(out, axis=0)

    every = np.arange(len(steps))
    if exhaustive or len(steps) * len(b.counts) <= _COARSE_LIMIT:
        rows = every
    else:
        coarse = every[::_STRIDE]
        best = coarse[np.argsort(scan(coarse).min(axis=1), kind="stable")[:_REFINE]]
        near = (best[:, None] + np.arange(-_STRIDE, _STRIDE + 1)[None, :]).ravel()
        rows = np.unique(np.clip(near, 0, len(steps) - 1))
    err = scan(rows)
    r, z = np.unravel_index(int(np.argmin(err)), err.shape)
    return int(rows[r]), int(z)


def _mse_threshold(b: _Bins, levels_per_t: float) -> float:
    """Best clip t for non-negative bins, grid [0, t] with step t / levels_per_t."""
    t = b.edges[1:].copy()
    keep = t > 0
    t = t[keep] if keep.any() else b.edges[-1:]
    row, _ = _search(b, t / levels_per_t, np.zeros((len(t), 1)), t[:, None])
    return float(t[row])


def _mse_asymmetric(b: _Bins, num_levels: int) -> tuple[float, float]:
    """Best (lo, hi) over steps s = j*w/(L-1) and zero points z: [-z*s, (L-1-z)*s], cut to
    the data's [min, max] (the outer edges of ``b``)."""
    lowest, highest, w = float(b.edges[0]), float(b.edges[-1]), b.width
    steps_ = num_levels - 1
    spans = np.arange(1, math.ceil((highest - lowest) / w * num_levels / steps_) + 2) * w
    steps = spans / steps_
    z = np.arange(num_levels, dtype=np.float64)[None, :]
    lo, hi = -z * steps[:, None], (steps_ - z) * steps[:, None]
    row, col = _search(b, steps, lo, hi)
    return max(float(lo[row, col]), lowest), min(float(hi[row, col]), highest)


def _mse_unit_range(h: StreamingHistogram, unit: float, num_levels: int,
                    symmetric: bool) -> tuple[float, float]:
    """mse_range's search on the histogram measured in ``unit`` (a power of two)."""
    def scaled(b: _Bins) -> _Bins:
        return _Bins(b.edges / unit, b.counts, b.width / unit)

    if symmetric:
        t = _mse_threshold(scaled(_abs_bins(h)), max((num_levels - 1) // 2, 1))
        return -t, t
    if h.min >= 0:
        return h.min / unit, _mse_threshold(scaled(_bins(h)), num_levels - 1)
    if h.max <= 0:
        return -_mse_threshold(scaled(_bins(h)).mirrored(), num_levels - 1), h.max / unit
    return _mse_asymmetric(scaled(_bins(h)), num_levels)


def mse_range(h: StreamingHistogram, num_levels: int = 256,
              symmetric: bool = False) -> tuple[float, float]:
    """The range whose quantization grid gives the least expected squared error.

    The error model, exact under the histogram's uniform-within-bin assumption: a grid of
    ``num_levels`` levels with step s and 0 on the grid (zero is exact, as ``qtool.qparams``
    makes it); values inside [lo, hi] round to the nearest multiple of s, values outside clip
    to lo or hi. Each bin's error is integrated exactly (the rounding error of a bin narrower
    than s depends on where it sits; exact zeros in [0, w) cost almost nothing, as they should),
    not approximated by step**2 / 12.

    * one-signed tensors: lo = 0 (kept at min in the result), hi = t over every bin edge,
      s = t / (L - 1);
    * ``symmetric``: on |x|, t over every bin edge, s = t / ((L - 1) // 2) (int8: t / 127,
      the restricted -127..127 grid that ``qparams`` uses);
    * signed, asymmetric: a joint search over s = j * w / (L - 1) (j = 1, 2, ... until the
      grid spans the data) and every zero point z: [lo, hi] = [-z*s, (L-1-z)*s], cut to
      [min, max].

    Large searches run coarse-to-fine (see ``_search``). The optimum is not min/max even on
    uniform data: there the best top level sits about half a step inside max (for U[0, 1]
    with 256 levels, hi = 0.998), the classic optimum for uniform data.

    1,000,000 N(0, 1) values, L = 256, symmetric: t is about 3.9 (the clipping and rounding
    errors balance), while max|x| is about 5.
    """
    _check(h)
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    fixed = _trivial(h, symmetric)
    if fixed:
        return fixed
    # Work in units of a power of two near max|x|: exact, and cubes of steps can neither
    # overflow (data near 1e300) nor underflow (subnormal data).
    unit = math.ldexp(1.0, math.frexp(max(abs(h.min), abs(h.max)))[1])
    lo, hi = _mse_unit_range(h, unit, num_levels, symmetric)
    if symmetric:
        return -hi * unit, hi * unit
    return max(lo * unit, h.min), min(hi * unit, h.max)


# -- dispatch ---------------------------------------------------------------------------------

METHODS: dict[str, Callable[..., tuple[float, float]]] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "entropy": entropy_range,
    "mse": mse_range,
}


def method_parameters(method: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``method`` accepts: "mse" -> {num_levels, symmetric}."""
    if method not in METHODS:
        raise ValueError(f"unknown range method {method!r}; choose one of {', '.join(METHODS)}")
    return dict(list(inspect.signature(METHODS[method]).parameters.items())[1:])


def compute_range(method: str, h: StreamingHistogram, **params) -> tuple[float, float]:
    """``METHODS[method](h, **params)``, rejecting parameters the method does not take.

    compute_range("percentile", h, percentile=99.9, symmetric=True) == percentile_range(h,
    percentile=99.9, symmetric=True). Every method takes ``symmetric``.
    """
    accepted = method_parameters(method)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"range method {method!r} takes no parameter {', '.join(unknown)}; "
                         f"it takes {', '.join(accepted)}")
    return METHODS[method](h, **params)
