"""Scale and zero-point math, pure numpy: the vocabulary of affine quantization.

``r = scale * (q - zero_point)``. Worked example, int8 asymmetric over [-1.0, 3.0]:
scale = (3 - (-1)) / (127 - (-128)) = 4/255 = 0.015686..., zero_point =
round(-128 - (-1)/scale) = round(-64.25) = -64; then 0.0 -> q = -64 exactly and
3.0 -> round(191.25) - 64 = 127.

Rounding is half to even and division is float32, exactly as ONNX's
QuantizeLinear specifies, so these functions agree bit for bit with onnxruntime.
"""

from __future__ import annotations

import numpy as np

from .types import PerAxis, PerBlock, PerTensor, Precision

__all__ = ["PerAxis", "PerBlock", "PerTensor", "Precision", "choose_qparams", "dequantize", "quantize",
           "bias_scale", "quantize_bias", "quantize_int32", "reduced_bounds", "symmetric_bounds", "weight_qparams"]


def symmetric_bounds(qtype: Precision) -> tuple[int, int]:
    """Integer range used for symmetric quantization: int8 -> (-127, 127).

    Dropping -128 keeps the range symmetric so that -max and +max both exist.
    """
    if qtype.qmin < 0:
        return -qtype.qmax, qtype.qmax
    return qtype.qmin, qtype.qmax


def reduced_bounds(qtype: Precision) -> tuple[int, int]:
    """One bit less (onnxruntime's ``reduce_range``): int8 -> (-64, 64), uint8 -> (0, 127).

    On x86-64 without VNNI, onnxruntime's u8 x s8 kernels add two products into
    int16 and saturate: 2 * 255 * 127 > 32767, while 2 * 255 * 64 = 32640 fits.
    """
    if qtype.qmin < 0:
        half = (qtype.qmax + 1) // 2
        return -half, half
    return qtype.qmin, qtype.qmax // 2


def _usable_scale(scale) -> np.ndarray:
    """float32 scale; 1.0 where it is zero or below float32's normal range.

    Checked after the cast: uint8 over [0, 1e-44] gives 3.9e-47, which is 0.0 in float32.
    """
    scale = np.asarray(scale).astype(np.float32)
    return np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1.0)).astype(np.float32)


def choose_qparams(rmin, rmax, qtype: Precision, symmetric: bool,
                   bounds: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (``qtype``) that cover [rmin, rmax].

    ``rmin``/``rmax`` are scalars or arrays (one entry per channel). The range is
    widened to include 0.0 so that zero is exactly representable. A zero-width
    range, or one so narrow that its scale underflows float32's normal range,
    gets scale 1.0. Symmetric: scale = max|r| / qmax_sym, zero point 0
    (uint8 symmetric uses the mid point 128). ``bounds`` narrows the integer
    grid (see :func:`reduced_bounds`); the stored type stays ``qtype``.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        qmin, qmax = bounds or symmetric_bounds(qtype)
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        scale = _usable_scale(absmax * 2.0 / (qmax - qmin))
        zero = 0 if qtype.qmin < 0 else (qtype.qmin + qtype.qmax + 1) // 2
        zp = np.full(np.shape(scale), zero, dtype=qtype.dtype)
        return scale, zp
    qmin, qmax = bounds or (qtype.qmin, qtype.qmax)
    scale = _usable_scale((rmax - rmin) / (qmax - qmin))
    zp = np.round(qmin - rmin / scale.astype(np.float64))
    zp = np.clip(zp, qmin, qmax).astype(qtype.dtype)
    return scale, zp


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = param.shape[0]
    return param.reshape(shape)


def quantize(x, scale, zero_point, qtype: Precision, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _broadcast(np.asarray(zero_point).astype(np.int64), x.ndim, axis)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.rint(x / s).astype(np.float64) + z
    return np.clip(q, qtype.qmin, qtype.qmax).astype(qtype.dtype)


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32."""
    q = np.asarray(q)
    s = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point).astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def fake_quantize(x, scale, zero_point, qtype: Precision, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear, as onnxruntime computes them: what a Q/DQ pair passes on."""
    return dequantize(quantize(x, scale, zero_point, qtype, axis), scale, zero_point, axis)


def weight_qparams(w: np.ndarray, qtype: Precision, granularity, symmetric: bool = True,
                   bounds: tuple[int, int] | None = None):
    """Per-tensor, per-axis or per-block scale/zero point of a weight from its own min/max.

    A [2, 3] weight [[1, -2, 0.5], [0.1, 0.2, -0.4]] per axis 0, int8 symmetric:
    scales = [2/127, 0.4/127], zero points [0, 0]. Per block, the parameters have the
    weight's shape with the block axis replaced by its block count (a [V, 384] table in
    blocks of 128 along axis 1: [V, 3]).
    """
    w = np.asarray(w, dtype=np.float32)
    if isinstance(granularity, PerBlock):
        blocks = _blocks(w, granularity)
        lo, hi = blocks.min(axis=-1, initial=0.0), blocks.max(axis=-1, initial=0.0)
        return choose_qparams(np.moveaxis(lo, -1, granularity.axis), np.moveaxis(hi, -1, granularity.axis),
                              qtype, symmetric, bounds)
    if isinstance(granularity, PerAxis):
        moved = np.moveaxis(w, granularity.axis, 0).reshape(w.shape[granularity.axis], -1)
        lo, hi = moved.min(axis=1, initial=0.0), moved.max(axis=1, initial=0.0)
    else:
        lo, hi = w.min(initial=0.0), w.max(initial=0.0)
    return choose_qparams(lo, hi, qtype, symmetric, bounds)


def _blocks(w: np.ndarray, g: PerBlock) -> np.ndarray:
    """``w`` with the block axis moved last and split into (blocks, size); its length must be a multiple of the size."""
    moved = np.moveaxis(w, g.axis, -1)
    if moved.shape[-1] % g.size:
        raise ValueError(f"axis {g.axis} of length {moved.shape[-1]} is not a multiple of the block size {g.size}")
    return moved.reshape(moved.shape[:-1] + (moved.shape[-1] // g.size, g.size))


def expand_blocks(param: np.ndarray, g: PerBlock) -> np.ndarray:
    """Per-block parameters (the tensor's shape with the block axis replaced by its block count)
    repeated to one per element: [[0.1, 0.2]] per block of 2 along axis 1 -> [[0.1, 0.1, 0.2, 0.2]]."""
    return np.repeat(np.asarray(param), g.size, axis=g.axis)


def bias_scale(input_scale, weight_scale, shape=()) -> np.ndarray:
    """float32 s_x * s_w (per channel when s_w is), broadcast to the bias ``shape``."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    return np.broadcast_to(scale, shape).astype(np.float32) if np.ndim(scale) else scale


def quantize_int32(bias: np.ndarray, scale) -> np.ndarray:
    """round(bias / scale) saturated to int32 (a bias's zero point is 0)."""
    q = np.rint(np.asarray(bias, dtype=np.float64) / np.asarray(scale, dtype=np.float32))
    return np.clip(q, Precision.INT32.qmin, Precision.INT32.qmax).astype(np.int32)


def quantize_bias(bias: np.ndarray, input_scale, weight_scale) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale s_x * s_w (per channel when s_w is) and zero point 0.

    bias 0.5 with s_x = 0.1, s_w = 0.02 -> scale 0.002, q = 250.
    """
    scale = bias_scale(input_scale, weight_scale, np.shape(bias))
    return quantize_int32(bias, scale), scale
