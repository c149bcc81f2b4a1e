"""Weight and bias tensors: quantized values computed from a resolved plan's numbers."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..plans import TensorPlan
from ..qparams import quantize, quantize_int32
from ..resolve import as_array


def params(t: TensorPlan) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) of a resolved tensor as float32 / its storage type."""
    if not t.has_params:
        raise ValueError(f"plan has no parameters for {t.name}; resolve the plan first")
    return as_array(t.scale, np.float32), as_array(t.zero_point, t.precision.dtype)


def quantize_weight(w: np.ndarray, t: TensorPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero point) of a weight with the plan's own scale and zero point; the plan's
    ``codes`` where it has them (chosen by ``--algorithms rounding``)."""
    scale, zp = params(t)
    if t.codes is not None:
        return plan_codes(t, w.shape), scale, zp
    return quantize(w, scale, zp, t.precision, axis=t.axis if np.ndim(scale) else None), scale, zp


def quantize_bias(b: np.ndarray, t: TensorPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int32 q, scale, zero point) of a bias with the plan's derived scale; the plan's ``codes``
    where it has them (a bias corrected by ``--algorithms bias_correction``)."""
    scale, zp = params(t)
    if t.codes is not None:
        return plan_codes(t, np.shape(b)), scale, zp
    return quantize_int32(b, scale), scale, zp


def plan_codes(t: TensorPlan, shape) -> np.ndarray:
    """A tensor's integer values as the plan stores them (base64 of little-endian values in the
    stored layout; plan_check has checked their length and range)."""
    from ..algorithms.layers import decode
    return decode(t.codes, t.precision.dtype, tuple(shape))


def initializer(array, name: str):
    return numpy_helper.from_array(np.asarray(array), name)
