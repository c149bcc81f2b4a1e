"""Reading a saved plan back: it must belong to the model and agree with itself.

``qtool quantize MODEL --plan P.json`` applies a plan without a table or data,
so every number the rewriters use is checked here first; a hand edit that
breaks the plan is one clear error naming the tensor or node.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import PlanError
from .graph import GraphView
from .plans import Action, NodePlan, Plan, Role, TensorPlan
from .prepare import Prepared
from .qparams import bias_scale
from .resolve import QOPERATOR_KERNELS, as_array, share_root, stored_weight
from .rules.dynamic import KERNEL as DYNAMIC_KERNEL, SHARED_KERNEL
from .types import PerAxis, PerTensor, Precision

TINY = float(np.finfo(np.float32).tiny)


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"{p}: no such plan file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{p}: not a JSON plan ({exc})") from None
    try:
        return Plan.from_dict(data)
    except ValueError as exc:
        raise PlanError(f"{p}: {exc}") from None


def check_plan(plan: Plan, p: Prepared) -> None:
    """Raise PlanError unless ``plan`` was made for the prepared model and is self-consistent."""
    if plan.model_sha256 != p.sha256:
        raise PlanError("plan was made for another model (model_sha256 differs); plan this model again")
    if not plan.resolved:
        raise PlanError("plan holds decisions only (no scales): save it from `qtool quantize --save-plan`")
    if plan.mode not in ("static", "dynamic") or plan.format not in ("qdq", "qoperator"):
        raise PlanError(f"plan mode {plan.mode!r} / quant_format {plan.format!r}: expected static|dynamic, qdq|qoperator")
    view = GraphView(p.model)
    _check_nodes(plan, view)
    for t in plan.tensors.values():
        _check_tensor(t, plan, view)


def _fail(what: str, message: str):
    raise PlanError(f"plan {what}: {message}")


def _check_nodes(plan: Plan, view: GraphView) -> None:
    model_nodes = {view.node_name(n): n.op_type for n in view.nodes}
    planned = {n.name for n in plan.nodes}
    missing = [n for n in model_nodes if n not in planned]
    if missing:
        _fail(f"node {missing[0]!r}", "is in the model but not in the plan")
    for n in plan.nodes:
        if model_nodes.get(n.name) != n.op_type:
            _fail(f"node {n.name!r}", "is not a node of this model" if n.name not in model_nodes
                  else f"is a {model_nodes[n.name]} in the model, not a {n.op_type}")
        _check_node(n, plan, view)


def _check_node(n: NodePlan, plan: Plan, view: GraphView) -> None:
    what = f"node {n.name!r}"
    for t in n.inputs + n.float_inputs:
        if t not in plan.tensors or not plan.tensors[t].quantized:
            _fail(what, f"reads {t!r} quantized, but the plan does not quantize that tensor")
    if n.fused_into:
        host = plan.node(n.fused_into)
        if host is None or not host.quantized or not n.quantized:
            _fail(what, f"is fused into {n.fused_into!r}, which is not a quantized node of the plan")
        return
    if n.quantized and n.kernel not in _kernels(n, plan):
        _fail(what, f"kernel {n.kernel!r} is not one the {plan.mode} {plan.format} rewriter emits for "
                    f"{n.op_type} (expected one of {', '.join(sorted(_kernels(n, plan)))})")
    if n.bias and (n.kernel not in (DYNAMIC_KERNEL, SHARED_KERNEL) or not view.is_initializer(n.bias)):
        _fail(what, f"folds bias {n.bias!r}: only dynamic kernels fold a constant bias")


def _kernels(n: NodePlan, plan: Plan) -> set[str]:
    if plan.mode == "dynamic":
        return {DYNAMIC_KERNEL, SHARED_KERNEL} if n.op_type in ("MatMul", "Gemm") else {n.op_type}
    if plan.format == "qdq":
        return {n.op_type}
    if n.op_type == "MatMul":
        return {"QLinearMatMul", "MatMulIntegerToFloat"}
    return {QOPERATOR_KERNELS.get(n.op_type, n.op_type)}


def _check_tensor(t: TensorPlan, plan: Plan, view: GraphView) -> None:
    what = f"tensor {t.name!r}"
    if t.role is Role.ACTIVATION:
        if t.name not in view.value_info and t.name not in view.producer and t.name not in view.graph_inputs:
            _fail(what, "is not a tensor of this model")
    elif not view.is_initializer(t.name):
        _fail(what, f"is a {t.role.value} in the plan but not an initializer of the model")
    if t.action in (Action.SKIP, Action.DYNAMIC):
        return
    if not t.precision.is_integer:
        _fail(what, f"is {t.action.value}d but its precision {t.precision.label} is not an integer type")
    if not t.has_params:
        _fail(what, "is quantized but has no scale/zero point")
    scale = as_array(t.scale, np.float64)
    zp = as_array(t.zero_point, np.int64)
    _check_values(what, t, scale, zp, view)
    if t.action is Action.SHARE:
        _check_share(what, t, plan)
    if t.role is Role.BIAS:
        _check_bias(what, t, plan, view)


def _check_values(what: str, t: TensorPlan, scale: np.ndarray, zp: np.ndarray, view: GraphView) -> None:
    if not all(math.isfinite(v) and v >= TINY for v in scale.ravel()):
        _fail(what, "every scale must be a finite float32 number above 1.2e-38")
    if np.any(zp < t.precision.qmin) or np.any(zp > t.precision.qmax):
        _fail(what, f"zero point outside the {t.precision.label} range [{t.precision.qmin}, {t.precision.qmax}]")
    if scale.shape != zp.shape:
        _fail(what, f"{scale.size} scale(s) but {zp.size} zero point(s)")
    if isinstance(t.granularity, PerTensor):
        if scale.ndim:
            _fail(what, "per-tensor granularity needs one scale, not a list")
        return
    if not isinstance(t.granularity, PerAxis) or t.role is Role.ACTIVATION:
        _fail(what, f"granularity {t.granularity} is not supported for a {t.role.value}")
    shape = stored_weight(t, view).shape if t.role is Role.WEIGHT else tuple(view.initializers[t.name].dims)
    axis = t.granularity.axis
    if not -len(shape) <= axis < len(shape):
        _fail(what, f"axis {axis} is out of range for shape {list(shape)}")
    if scale.ndim != 1 or scale.size != shape[axis]:
        _fail(what, f"per-axis {axis} needs {shape[axis]} scales, found {scale.size}")


def _check_share(what: str, t: TensorPlan, plan: Plan) -> None:
    if t.source not in plan.tensors:
        _fail(what, f"shares the parameters of {t.source!r}, which is not in the plan")
    root = share_root(plan.tensors, t.name)
    if root.action is Action.SHARE or not root.has_params:
        _fail(what, f"shares parameters in a cycle or with an unquantized tensor ({root.name!r})")
    if root.granularity != PerTensor() or (t.scale, t.zero_point, t.precision) != (root.scale, root.zero_point,
                                                                                   root.precision):
        _fail(what, f"shares the parameters of {root.name!r}, so its precision, scale and zero point must equal "
                    f"that tensor's ({root.precision.label}, {root.scale}, {root.zero_point})")


def _check_bias(what: str, t: TensorPlan, plan: Plan, view: GraphView) -> None:
    x, w = plan.tensors.get(t.source or ""), plan.tensors.get(t.weight or "")
    if t.action is not Action.DERIVE or t.precision is not Precision.INT32 or x is None or w is None \
            or not x.has_params or not w.has_params:
        _fail(what, "a bias must derive (int32) from a quantized input (source) and weight (weight)")
    expected = bias_scale(x.scale, as_array(w.scale, np.float32), tuple(view.initializers[t.name].dims))
    if not np.array_equal(np.asarray(as_array(t.scale, np.float32)).ravel(), np.asarray(expected).ravel()):
        _fail(what, f"scale must be s_x * s_w from {t.source!r} and {t.weight!r} (float32); an edited input or "
                    "weight scale needs the bias scale edited to match")
    if np.any(as_array(t.zero_point, np.int64) != 0):
        _fail(what, "a bias's zero point is 0")
