"""Bias correction (Nagel et al. 2019; NNCF's "fast bias correction"), from calibration data.

Quantized weights shift each output channel's mean: ``E[W_q x] - E[W x] = (W_q - W) E[x]``.
The shift is subtracted from the layer's bias, which the plan then stores as its int32 codes
(same scale s_x * s_w), so ``--plan`` writes it again without data. The mean input row ``E[x]``
(a Conv's mean im2col patch, so padding is counted) comes from the same fp32 pass that gives
the rounding its Hessians (:mod:`qtool.algorithms.layers`): one pass, data only, and the weights
it corrects are those the rewriter writes (after ``rounding``, when both run).

Why this form: the empirical one (run the quantized model beside the fp32 one and subtract each
layer's measured output mean difference, upstream activation errors included) corrected every
layer at once from one run, which counts an upstream layer's shift again downstream:
EfficientNet-Lite0's top-1 agreement with fp32 fell from 0.8926 to 0.4668 (512 crops), where
this form raised it to 0.9277. Corrected layer by layer (one run of the quantized model per
layer) it would not double count, at ~50 runs for that model.

A layer keeps its corrected bias only where its output error on the calibration rows goes down
(``Plan.applied["bias_correction"][node]``: the gain in dB, from ``H``, ``s`` and ``n``). Layers
without a bias tensor (a MatMul whose bias is a separate Add, a Conv/Gemm without one) are left
alone: adding a bias changes the model's graph, not only the plan.
"""

from __future__ import annotations

import numpy as np

from ..graph import GraphView
from ..qparams import quantize_int32
from ..resolve import as_array
from .layers import InputStats, Layer, db, decode, output_error, row_params, rows


def bias_codes(t, b: np.ndarray) -> np.ndarray:
    """The int32 codes of float bias ``b`` with the plan's bias scale."""
    return quantize_int32(b, as_array(t.scale, np.float32).reshape(np.shape(b)) if np.ndim(t.scale) else
                          as_array(t.scale, np.float32))


def written_bias(t, view: GraphView) -> np.ndarray:
    """The bias the rewriter writes, dequantized (float64): the plan's codes, or the model's bias rounded."""
    b = view.array(t.name).astype(np.float64)
    codes = decode(t.codes, np.int32, b.shape) if t.codes else bias_codes(t, b)
    scale = as_array(t.scale, np.float32).astype(np.float64)
    return codes * (scale.reshape(b.shape) if scale.ndim else scale)


def fast_shift(layer: Layer, t_w, w: np.ndarray, written: np.ndarray, stats: InputStats
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean output shift per channel, squared error per channel with the bias as written, the
    (E.s, E H E, n) terms) of a layer whose weight is written as ``written`` codes."""
    w_rows = rows(layer, w).astype(np.float64)
    scale, zp = row_params(layer, t_w, w_rows)
    e = (rows(layer, written).astype(np.float64) - zp[..., None]) * scale[..., None] - w_rows
    es = np.einsum("grk,gk->gr", e, stats.s).reshape(-1)
    ehe = output_error(e, stats).reshape(-1)
    return es / stats.n, ehe, es


def corrected(t_b, view: GraphView, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes, the bias they write, float64) of the model's bias corrected by ``-shift`` per channel."""
    b = view.array(t_b.name).astype(np.float64)
    codes = bias_codes(t_b, (b.reshape(-1) - shift).reshape(b.shape))
    scale = as_array(t_b.scale, np.float32).astype(np.float64)
    return codes, codes * (scale.reshape(b.shape) if scale.ndim else scale)


def fast_gain(ehe: np.ndarray, es: np.ndarray, n: int, deltas) -> float:
    """dB gain of the layer's output error (weight error terms ``ehe``, ``es``) when its bias error
    (written - model, per channel) goes from ``deltas[0]`` to ``deltas[1]``."""
    err = [float(np.sum(ehe + 2 * d * es + n * d * d)) for d in deltas]
    return db(err[0], err[1])
