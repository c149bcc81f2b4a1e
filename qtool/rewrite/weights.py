"""Weight and bias tensors: quantized initializers computed from a plan's specs."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..plans import TensorPlan
from ..qparams import PerAxis, PerTensor, QType, quantize, quantize_bias, weight_qparams


def quantize_weight(w: np.ndarray, spec: TensorPlan):
    """(q, scale, zero_point) of a weight as ``spec`` says (axis or per tensor)."""
    qtype = QType.parse(spec.qtype)
    gran = PerTensor() if spec.axis is None else PerAxis(spec.axis)
    scale, zp = weight_qparams(w, qtype, gran, spec.symmetric)
    q = quantize(w, scale, zp, qtype, axis=spec.axis)
    return q, scale, zp


def quantize_bias_tensor(b: np.ndarray, input_scale: float, weight_scale: np.ndarray):
    q, scale = quantize_bias(b, input_scale, weight_scale)
    return q, scale, np.zeros_like(q, dtype=np.int32) if np.ndim(scale) else np.int32(0)


def initializer(array, name: str):
    return numpy_helper.from_array(np.asarray(array), name)
