"""Resolve: the planner's decisions + calibrated ranges + weights -> every number.

After this step every quantized tensor carries its precision, granularity,
scale and zero point (weights and int32 biases included) and every node the
kernel the rewriter will emit. Rewriters compute quantized values from these
scales and decide nothing, so a saved resolved plan re-applies byte for byte.

Bias fitting: a bias's scale is s_x * s_w. A channel whose weights are almost
zero (common after BatchNorm folding) gets a tiny s_w, and b / (s_x * s_w) would
leave int32 (bias 0.739 became 0.134 on EfficientNet-Lite0). As onnxruntime's
quantizer does (``_adjust_weight_scale_for_int32_bias`` in
onnxruntime/python/tools/quantization/qdq_quantizer.py), such a weight scale is
raised until the bias fits, and the plan says so.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from .errors import TableError
from .graph import GraphView
from .plans import Action, Plan, Role, TensorPlan
from .qparams import bias_scale, choose_qparams, reduced_bounds, weight_qparams
from .rules.dynamic import KERNEL as DYNAMIC_KERNEL, SHARED_KERNEL
from .rules.movement import TABLE_KERNEL
from .types import MS_DOMAIN, PerTensor, Precision

INT32_RANGE = float(2**32 - 2)      # onnxruntime's qrange for the bias check
BIAS_EPSILON = 1.0001               # ... and its multiplicative margin
QDQ_16BIT_OPSET = 21                # ai.onnx QuantizeLinear takes int16/uint16 from opset 21

QOPERATOR_KERNELS = {"Conv": "QLinearConv", "Gemm": "QGemm", "Add": "QLinearAdd", "Mul": "QLinearMul",
                     "Concat": "QLinearConcat", "AveragePool": "QLinearAveragePool",
                     "GlobalAveragePool": "QLinearGlobalAveragePool", "Sigmoid": "QLinearSigmoid",
                     "LeakyRelu": "QLinearLeakyRelu"}

RangeOf = Callable[[str, Precision], tuple[float, float]]


def resolve(plan: Plan, view: GraphView, range_of: RangeOf) -> Plan:
    """Fill every scale, zero point and kernel. ``range_of(tensor, precision)``
    gives a calibrated activation's range (KeyError when the table lacks it)."""
    tensors = dict(plan.tensors)
    for name, t in plan.tensors.items():
        if t.role is Role.ACTIVATION and t.action is Action.QUANTIZE:
            tensors[name] = _activation(t, range_of)
    weights = {name: _weight_params(t, view) for name, t in tensors.items()
               if t.role is Role.WEIGHT and t.action is Action.QUANTIZE}
    for name, (scale, zp) in weights.items():
        tensors[name] = _with_params(tensors[name], scale, zp, 0)
    _resolve_shares(tensors)  # a bias's input may share an activation's or a table's parameters
    raised = _fit_biases(tensors, weights, view)
    for name in raised:
        tensors[name] = _with_params(plan.tensors[name], *weights[name], raised[name])
    if raised:
        _resolve_shares(tensors)
    for name, t in tensors.items():
        if t.role is Role.BIAS and t.action is Action.DERIVE:
            tensors[name] = _bias(t, tensors, view)
    opset = view.opset("")
    for name, t in tensors.items():
        if t.quantized and t.precision.bits == 16 and opset < QDQ_16BIT_OPSET:
            tensors[name] = replace(t, qdq_domain=MS_DOMAIN)
    nodes = tuple(replace(n, kernel=_kernel(n, plan, tensors, view)) for n in plan.nodes)
    return replace(plan, tensors=tensors, nodes=nodes, resolved=True)


def stored_weight(t: TensorPlan, view: GraphView) -> np.ndarray:
    """The weight as it is stored quantized (transposed where the plan says)."""
    w = view.array(t.name).astype(np.float32)
    return w.T if t.transpose else w


def as_array(value, dtype) -> np.ndarray:
    """A plan's scale or zero point (number or tuple) as a numpy scalar or 1-D array."""
    return np.asarray(value if not isinstance(value, tuple) else list(value), dtype=dtype)


def _activation(t: TensorPlan, range_of: RangeOf) -> TensorPlan:
    try:
        lo, hi = range_of(t.name, t.precision)
    except KeyError:
        raise TableError(f"calibration table has no statistics for tensor {t.name!r}; "
                         "it was made for another model or other options: calibrate again") from None
    scale, zp = choose_qparams(lo, hi, t.precision, t.symmetric)
    return replace(t, scale=float(scale), zero_point=int(zp), range=(float(lo), float(hi)))


def _weight_params(t: TensorPlan, view: GraphView) -> tuple[np.ndarray, np.ndarray]:
    bounds = reduced_bounds(t.precision) if t.reduce_range else None
    return weight_qparams(stored_weight(t, view), t.precision, t.granularity, t.symmetric, bounds)


def _fit_biases(tensors: dict, weights: dict, view: GraphView) -> dict[str, int]:
    """Raise weight scales (in ``weights``) so that every int32 bias fits; return
    the number of channels raised per weight."""
    raised: dict[str, int] = {}
    for t in tensors.values():
        if t.role is not Role.BIAS or t.action is not Action.DERIVE or t.weight not in weights:
            continue
        s_x = np.float64(tensors[t.source].scale)
        scale, zp = weights[t.weight]
        b = np.abs(view.array(t.name).astype(np.float64))
        needed = BIAS_EPSILON * 2.0 * (b if np.ndim(scale) else b.max(initial=0.0)) / INT32_RANGE / s_x
        low = (np.asarray(scale, np.float64) < needed) & (np.asarray(scale) > 0)
        if low.any():
            new = np.where(low, needed, scale).astype(np.float32)
            # float32 rounding must not land just below the bound
            new = np.where(low & (new.astype(np.float64) < needed), np.nextafter(new, np.float32(np.inf)), new)
            weights[t.weight] = (new.astype(np.float32), zp)
            raised[t.weight] = raised.get(t.weight, 0) + int(np.count_nonzero(low))
    return raised


def _with_params(t: TensorPlan, scale, zp, raised: int) -> TensorPlan:
    per_axis = np.ndim(scale) > 0
    reason = t.reason
    if raised:
        reason += (f"; scale of {raised} channel(s) raised so that the int32 bias fits"
                   if per_axis else "; scale raised so that the int32 bias fits")
    return replace(t, reason=reason,  # per block: the parameters' array in C order
                   scale=tuple(float(v) for v in np.ravel(scale)) if per_axis else float(scale),
                   zero_point=tuple(int(v) for v in np.ravel(zp)) if per_axis else int(zp))


def _bias(t: TensorPlan, tensors: dict, view: GraphView) -> TensorPlan:
    x, w = tensors[t.source], tensors[t.weight]
    if not x.has_params or not w.has_params:
        raise ValueError(f"bias {t.name}: its input {t.source} or weight {t.weight} has no parameters")
    shape = tuple(view.initializers[t.name].dims)
    scale = bias_scale(x.scale, as_array(w.scale, np.float32), shape)
    if np.ndim(scale):
        return replace(t, scale=tuple(float(v) for v in scale), zero_point=tuple(0 for _ in range(scale.size)))
    return replace(t, scale=float(scale), zero_point=0)


def share_root(tensors: dict, name: str) -> TensorPlan:
    t = tensors[name]
    seen = set()
    while t.action is Action.SHARE and t.source not in seen:
        seen.add(t.source)
        t = tensors[t.source]
    return t


def _resolve_shares(tensors: dict) -> None:
    """SHARE copies its root's parameters: an activation's, or an embedding table's
    per-tensor ones (the rows a Gather reads)."""
    for name, t in list(tensors.items()):
        if t.role is not Role.ACTIVATION or t.action is not Action.SHARE:
            continue
        root = share_root(tensors, name)
        if root.role is Role.WEIGHT and not isinstance(root.granularity, PerTensor):
            raise ValueError(f"{name} shares the per-axis weight {root.name}: only per-tensor tables can be shared")
        lo = root.scale * (root.precision.qmin - root.zero_point)
        hi = root.scale * (root.precision.qmax - root.zero_point)
        tensors[name] = replace(t, precision=root.precision, symmetric=root.symmetric, scale=root.scale,
                                zero_point=root.zero_point,
                                range=root.range if root.role is Role.ACTIVATION else (float(lo), float(hi)))


def kernels_for(op_type: str, mode: str, fmt: str) -> set[str]:
    """Every kernel a rewriter may emit for a quantized ``op_type`` node."""
    if op_type == "Gather" and (mode == "dynamic" or fmt == "qdq"):
        return {op_type, TABLE_KERNEL}
    if mode == "dynamic":
        return {DYNAMIC_KERNEL, SHARED_KERNEL} if op_type in ("MatMul", "Gemm") else {op_type}
    if fmt == "qdq":  # static: a MatMul/Gemm may run dynamically inside it (--dynamic)
        return {op_type, DYNAMIC_KERNEL, SHARED_KERNEL} if op_type in ("MatMul", "Gemm") else {op_type}
    if op_type == "MatMul":
        return {"QLinearMatMul", "MatMulIntegerToFloat"}
    return {QOPERATOR_KERNELS.get(op_type, op_type)}


def _kernel(n, plan: Plan, tensors: dict, view: GraphView) -> str:
    """The op the rewriter emits for a quantized node ("" when fused into another)."""
    if not n.quantized or n.fused_into:
        return ""
    if n.kernel == TABLE_KERNEL:  # decided by the rule: the table's layout depends on it
        return n.kernel
    if runs_dynamic(n, plan):
        node = view.by_name[n.name]
        readers = sum(1 for m in plan.nodes if m.kernel in (DYNAMIC_KERNEL, SHARED_KERNEL)
                      and view.by_name[m.name].input[0] == node.input[0])
        return SHARED_KERNEL if readers > 1 else DYNAMIC_KERNEL
    if plan.mode == "dynamic":
        return n.op_type
    if plan.format != "qoperator":
        return n.op_type
    if n.op_type == "MatMul":
        return "QLinearMatMul" if int8_output(n, plan, tensors, view) else "MatMulIntegerToFloat"
    return QOPERATOR_KERNELS.get(n.op_type, n.op_type)


def runs_dynamic(n, plan: Plan) -> bool:
    """A dynamic kernel: in dynamic mode, or ``--dynamic`` in a static QDQ plan (a QOperator plan's
    MatMulIntegerToFloat is a static kernel reading a QuantizeLinear)."""
    return n.kernel in (DYNAMIC_KERNEL, SHARED_KERNEL) and (plan.mode == "dynamic" or plan.format == "qdq")


def int8_output(n, plan: Plan, tensors: dict, view: GraphView) -> bool:
    """Whether the node's kernel emits 8-bit: its own output, or its fused activation's, is quantized."""
    outs = [view.by_name[n.name].output[0]] + [view.by_name[m.name].output[0] for m in plan.nodes
                                               if m.fused_into == n.name]
    return any(o in tensors and tensors[o].quantized and tensors[o].role is Role.ACTIVATION for o in outs)
