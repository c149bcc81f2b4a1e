"""Error-minimising weight rounding: GPTQ (Frantar et al. 2022) on int8 grids, pure numpy.

Round to nearest minimises each weight's own error; what matters is the layer's output
``W x`` on real inputs. GPTQ rounds one input column at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse of the input
Hessian ``H = X^T X`` (from the fp32 model on the calibration data), so the output error
``sum_r E_r H E_r^T`` shrinks. The plan's scales and zero points stay as they are (so the
int32 bias scales s_x * s_w and the bias fitting stay valid): only the integer codes change,
clipped to the weight's grid (7-bit where the plan reduces the range). Columns go in
descending order of H's diagonal ("act order"); ``DAMP`` times the mean diagonal is added
to it. Groups are solved side by side: a depthwise 3x3 Conv is C problems of one row with a
9 x 9 Hessian each.

The layer keeps the new codes only where its output error on the calibration rows is
smaller than round to nearest's: ``Plan.applied["rounding"][node]`` is that gain in dB.
"""

from __future__ import annotations

import numpy as np

from .layers import InputStats, Layer, db, grid, output_error, row_params, rows, unrows

DAMP = 0.01


def gptq_rows(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zp: np.ndarray, bounds: tuple[int, int],
              damp: float = DAMP, lazy: int = 64) -> np.ndarray:
    """Codes [g, r, K] (int64) of ``w`` [g, r, K] with per-row ``scale``/``zp`` [g, r] on the integer
    grid ``bounds``, each group ``i`` against its Hessian ``h[i]`` [K, K]."""
    g, r, k = w.shape
    order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable")   # [g, K]
    hp = np.take_along_axis(np.take_along_axis(h, order[:, :, None], axis=1), order[:, None, :], axis=2)
    u = _inverse_cholesky(hp, damp)
    wp = np.take_along_axis(np.asarray(w, np.float64), order[:, None, :], axis=2).copy()
    safe = np.where(scale > 0, scale, 1.0)
    lo, hi = bounds
    codes = np.zeros((g, r, k), np.int64)
    for i1 in range(0, k, lazy):  # updates within a chunk of columns, then one product for the rest
        i2 = min(i1 + lazy, k)
        w1, err = wp[:, :, i1:i2].copy(), np.zeros((g, r, i2 - i1))
        for i in range(i2 - i1):
            j = i1 + i
            q = np.clip(np.rint(w1[:, :, i] / safe) + zp, lo, hi)
            e = (w1[:, :, i] - (q - zp) * scale) / u[:, j, j][:, None]
            w1[:, :, i + 1:] -= e[:, :, None] * u[:, None, j, j + 1:i2]
            codes[:, :, j], err[:, :, i] = q, e
        wp[:, :, i2:] -= np.matmul(err, u[:, i1:i2, i2:])
    out = np.empty_like(codes)
    np.put_along_axis(out, np.broadcast_to(order[:, None, :], codes.shape), codes, axis=2)
    return out


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factors [g, K, K] of the dampened Hessians' inverses (an input that was
    always zero gets a unit diagonal: nothing to compensate there)."""
    h = np.array(h, dtype=np.float64)
    diag = np.diagonal(h, axis1=1, axis2=2).copy()
    dead = diag <= 0
    diag[dead] = 1.0
    mean = diag.mean(axis=1, keepdims=True)
    idx = np.arange(h.shape[1])
    h[:, idx, idx] = diag + damp * mean
    inverse = np.linalg.inv(h)
    return np.linalg.cholesky((inverse + inverse.transpose(0, 2, 1)) / 2).transpose(0, 2, 1)


def round_layer(layer: Layer, t, w: np.ndarray, nearest: np.ndarray, stats: InputStats
                ) -> tuple[np.ndarray | None, float]:
    """GPTQ codes for one layer's stored weight ``w`` (``nearest``: round to nearest's codes), and
    the measured gain in dB; None where it gains nothing."""
    w_rows = rows(layer, w).astype(np.float64)
    scale, zp = row_params(layer, t, w_rows)
    before = output_error(w_rows - _dequant(rows(layer, nearest), scale, zp), stats).sum()
    codes = gptq_rows(w_rows, stats.h, scale, zp, grid(t))
    after = output_error(w_rows - _dequant(codes, scale, zp), stats).sum()
    gain = db(before, after)
    if not after < before:
        return None, gain
    return unrows(layer, codes, w.shape).astype(t.precision.dtype), gain


def _dequant(codes: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float64) - zp[..., None]) * scale[..., None]
