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
from .model import read_text_file
from .graph import GraphView
from .plans import Action, NodePlan, Plan, Role, TensorPlan
from .prepare import Prepared
from .qparams import bias_scale
from .resolve import QDQ_16BIT_OPSET, int8_output, kernels_for, as_array, runs_dynamic, share_root
from .rules.dynamic import KERNEL as DYNAMIC_KERNEL, SHARED_KERNEL
from .rules.movement import TABLE_KERNEL, row_block
from .types import MS_DOMAIN, PerAxis, PerBlock, PerTensor, Precision

TINY = float(np.finfo(np.float32).tiny)


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    data = read_text_file(p, json.loads, PlanError, "plan", "a JSON plan", (json.JSONDecodeError,))
    try:
        return Plan.from_dict(data)
    except ValueError as exc:
        raise PlanError(f"{p}: {exc}") from None


#: static/dynamic: int8 kernels; weight-only: int4 MatMulNBits weights (--weights int4); fp16: half precision only.
PLAN_MODES = ("static", "dynamic", "weight-only", "fp16")


def check_plan(plan: Plan, p: Prepared) -> None:
    """Raise PlanError unless ``plan`` was made for the prepared model and is self-consistent."""
    if plan.model_sha256 != p.sha256:
        raise PlanError("plan was made for another model (model_sha256 differs); plan this model again")
    if not plan.resolved:
        raise PlanError("plan holds decisions only (no scales): save it from `qtool quantize --save-plan`")
    if plan.smoothquant is not None and "smoothquant" not in plan.algorithms:
        raise PlanError("plan carries a smoothquant record but its algorithms do not include smoothquant, so the "
                        "record would be ignored: add \"smoothquant\" to algorithms or drop the record")
    if plan.mode not in PLAN_MODES or plan.format not in ("qdq", "qoperator"):
        raise PlanError(f"plan mode {plan.mode!r} / quant_format {plan.format!r}: expected "
                        f"{'|'.join(PLAN_MODES)}, qdq|qoperator")
    if plan.mode == "weight-only":
        from .weight_only import check_plan as check_weight_only
        check_weight_only(plan, GraphView(p.model))
        return
    _check_graph(plan, GraphView(p.model))
    from .subgraphs import bodies, lift
    keys = {b.key: b for b in bodies(p.model)}
    for key in plan.subgraphs:
        if key not in keys:
            _fail(f"subgraph {key!r}", "is not a subgraph of this model (expected <If/Loop/Scan node>/<attribute>)")
    for key, b in keys.items():
        if key not in plan.subgraphs:
            _fail(f"subgraph {key!r}", "is in the model but not in the plan")
        sub = plan.subgraphs[key]
        try:
            _check_graph(sub, GraphView(lift(p.model, b)))
        except PlanError as exc:
            raise PlanError(str(exc).replace("plan ", f"plan subgraph {key!r}: ", 1)) from None


def _check_graph(plan: Plan, view: GraphView) -> None:
    _check_nodes(plan, view)
    used = _quantized_uses(plan, view)
    for t in plan.tensors.values():
        _check_tensor(t, plan, view)
        if t.action is not Action.SKIP and t.name not in used:
            _fail(f"tensor {t.name!r}", f"is {t.action.value}d but no quantized node of the plan reads or writes it")


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


def _quantized_uses(plan: Plan, view: GraphView) -> set[str]:
    """Tensors a quantized node reads quantized or writes (its own or its fused activation's
    output), and the biases of quantized nodes: a quantized tensor outside this set is stray."""
    used = set()
    for n in plan.nodes:
        if n.quantized:
            node = view.by_name[n.name]
            used.update(n.inputs)
            used.update(o for o in node.output if o)
            used.update(i for i in node.input if i in plan.tensors and plan.tensors[i].role is Role.BIAS)
    for name in list(used):  # a share's whole source chain is used through it
        t, seen = plan.tensors.get(name), set()
        while t is not None and t.action is Action.SHARE and t.source and t.source not in seen:
            seen.add(t.source)
            used.add(t.source)
            t = plan.tensors.get(t.source)
    return used


def _check_node(n: NodePlan, plan: Plan, view: GraphView) -> None:
    what = f"node {n.name!r}"
    for t in n.inputs + n.float_inputs:
        if t not in plan.tensors or plan.tensors[t].action in (Action.SKIP, Action.DERIVE):
            _fail(what, f"reads {t!r} quantized, but the plan does not quantize that tensor")
    if not n.quantized:
        if n.kernel or n.bias or n.fused_into or n.inputs:
            _fail(what, "is float, so it can have no kernel, bias, fused_into or quantized inputs")
        return
    dynamic = runs_dynamic(n, plan)
    if n.float_inputs and not (dynamic and plan.mode == "static"
                               and n.float_inputs == (view.by_name[n.name].input[0],)):
        _fail(what, "is quantized: float_inputs are for float nodes only (and for the input a dynamic kernel "
                    "of a static plan reads unquantized)")
    if n.fused_into:
        host = plan.node(n.fused_into)
        if host is None or not host.quantized or n.kernel:
            _fail(what, f"is fused into {n.fused_into!r}, which is not a quantized node of the plan "
                        "(a fused node has no kernel of its own)")
        return
    allowed = kernels_for(n.op_type, plan.mode, plan.format)
    if n.kernel not in allowed:
        _fail(what, f"kernel {n.kernel!r} is not one the {plan.mode} {plan.format} rewriter emits for "
                    f"{n.op_type} (expected one of {', '.join(sorted(allowed))})")
    if n.kernel in ("QLinearMatMul", "MatMulIntegerToFloat") and plan.mode == "static" and not dynamic:
        int8_out = int8_output(n, plan, plan.tensors, view)
        if int8_out != (n.kernel == "QLinearMatMul"):
            _fail(what, f"kernel {n.kernel} does not match its output, which the plan "
                        f"{'quantizes' if int8_out else 'keeps float'}")
    if n.kernel == TABLE_KERNEL:
        table = plan.tensors.get(view.by_name[n.name].input[0])
        if table is None or not isinstance(table.granularity, PerBlock) or n.inputs != (table.name,):
            _fail(what, "GatherBlockQuantized reads its table quantized per block (and nothing else quantized)")
    elif any(isinstance(plan.tensors[t].granularity, PerBlock) for t in n.inputs if t in plan.tensors):
        _fail(what, "only GatherBlockQuantized reads a tensor quantized per block")
    if dynamic:
        _check_dynamic(what, n, plan, view)
    elif n.bias:
        _fail(what, f"folds bias {n.bias!r}: only dynamic kernels fold a bias")


def _check_dynamic(what: str, n: NodePlan, plan: Plan, view: GraphView) -> None:
    """A dynamic kernel: int8 weights [K, N] per column or per tensor, and a folded bias that is
    exactly the Gemm's C or the constant of the one Add fused into it."""
    node = view.by_name[n.name]
    w = plan.tensors.get(node.input[1])
    transposed = node.op_type == "Gemm" and bool(view.attr(node, "transB", 0))
    if w is None or w.action is not Action.QUANTIZE or w.granularity not in (PerTensor(), PerAxis(1)) \
            or w.transpose != transposed:
        _fail(what, f"a dynamic kernel needs its weight {node.input[1]!r} quantized per tensor or per axis 1 "
                    f"of the stored [K, N] matrix (transpose {'true' if transposed else 'false'})")
    adds = [view.by_name[m.name] for m in plan.nodes if m.fused_into == n.name]
    if node.op_type == "Gemm":
        expected = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    elif adds:
        add = adds[0]
        expected = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if len(adds) > 1 or add.op_type != "Add" or node.output[0] not in add.input:
            _fail(what, "only the one bias Add right after it can be fused into a dynamic MatMul")
    else:
        expected = ""
    if n.bias != expected:
        _fail(what, f"folds bias {n.bias or 'none'!r}, but its " + (f"fused Add/C adds {expected!r}" if expected
                                                                    else "plan fuses no bias Add"))


def _check_tensor(t: TensorPlan, plan: Plan, view: GraphView) -> None:
    what = f"tensor {t.name!r}"
    if t.role is Role.ACTIVATION:
        if t.name not in view.value_info and t.name not in view.producer and t.name not in view.graph_inputs:
            _fail(what, "is not a tensor of this model")
    elif not view.is_initializer(t.name):
        _fail(what, f"is a {t.role.value} in the plan but not an initializer of the model")
    allowed = {Role.ACTIVATION: {Action.QUANTIZE, Action.SHARE, Action.SKIP}, Role.WEIGHT: {Action.QUANTIZE, Action.SKIP},
               Role.BIAS: {Action.DERIVE, Action.SKIP}}[t.role]
    if t.role is Role.ACTIVATION and (plan.mode == "dynamic" or plan.mode == "static" and plan.format == "qdq"):
        allowed = allowed | {Action.DYNAMIC}
    if t.action not in allowed:
        _fail(what, f"a {t.role.value} can be {', '.join(sorted(a.value for a in allowed))} "
                    f"in a {plan.mode} plan, not {t.action.value}")
    if t.action in (Action.SKIP, Action.DYNAMIC):
        return
    _check_precision(what, t, plan, view)
    if not t.has_params:
        _fail(what, "is quantized but has no scale/zero point")
    scale = as_array(t.scale, np.float64)
    zp = as_array(t.zero_point, np.int64)
    _check_values(what, t, scale, zp, view)
    if t.action is Action.SHARE:
        _check_share(what, t, plan)
    if t.role is Role.BIAS:
        _check_bias(what, t, plan, view)
    if t.codes is not None and not isinstance(t.granularity, PerBlock):  # int8 weight / int32 bias codes
        from .algorithms.layers import check_codes
        why = check_codes(t, view) if t.role is not Role.ACTIVATION else "an activation has no codes"
        if why:
            _fail(what, why)


def _check_precision(what: str, t: TensorPlan, plan: Plan, view: GraphView) -> None:
    supported = {Role.BIAS: (Precision.INT32,)}.get(t.role, (Precision.INT8, Precision.UINT8, Precision.INT16,
                                                            Precision.UINT16))
    if t.precision not in supported:
        _fail(what, f"precision {t.precision.label} is not one the rewriters write for a {t.role.value} "
                    f"({', '.join(p.label for p in supported)})")
    if t.precision.bits == 16:
        if plan.mode != "static" or plan.format != "qdq" or t.role is not Role.ACTIVATION:
            _fail(what, "16-bit tensors exist only as activations of a static QDQ plan")
        if view.opset("") < QDQ_16BIT_OPSET and t.qdq_domain != MS_DOMAIN:
            _fail(what, "16-bit Q/DQ below opset 21 needs \"qdq_domain\": \"com.microsoft\"")
    if t.qdq_domain not in ("", MS_DOMAIN):
        _fail(what, f"qdq_domain {t.qdq_domain!r}: expected \"\" or \"com.microsoft\"")


def _check_values(what: str, t: TensorPlan, scale: np.ndarray, zp: np.ndarray, view: GraphView) -> None:
    if not all(math.isfinite(v) and v >= TINY for v in scale.ravel()):
        _fail(what, "every scale must be a finite float32 number above 1.2e-38")
    if np.any(zp < t.precision.qmin) or np.any(zp > t.precision.qmax):
        _fail(what, f"zero point outside the {t.precision.label} range [{t.precision.qmin}, {t.precision.qmax}]")
    if scale.shape != zp.shape:
        _fail(what, f"{scale.size} scale(s) but {zp.size} zero point(s)")
    if t.symmetric and t.role is not Role.BIAS:
        mid = 0 if t.precision.qmin < 0 else (t.precision.qmin + t.precision.qmax + 1) // 2
        if np.any(zp != mid):
            _fail(what, f"is symmetric, so its zero point must be {mid}")
    if isinstance(t.granularity, PerTensor):
        if scale.ndim:
            _fail(what, "per-tensor granularity needs one scale, not a list")
        return
    if isinstance(t.granularity, PerBlock) and t.role is Role.WEIGHT:
        _check_table(what, t, scale, view)
        return
    if not isinstance(t.granularity, PerAxis) or t.role is Role.ACTIVATION:
        _fail(what, f"granularity {t.granularity} is not supported for a {t.role.value}")
    shape = tuple(view.initializers[t.name].dims)  # the header: no need to decode the weight itself
    if t.role is Role.WEIGHT and t.transpose:
        shape = shape[::-1]
    axis = t.granularity.axis
    if not -len(shape) <= axis < len(shape):
        _fail(what, f"axis {axis} is out of range for shape {list(shape)}")
    if scale.ndim != 1 or scale.size != shape[axis]:
        _fail(what, f"per-axis {axis} needs {shape[axis]} scales, found {scale.size}")


def _check_table(what: str, t: TensorPlan, scale: np.ndarray, view: GraphView) -> None:
    """Per-block parameters exist only for an embedding table read by GatherBlockQuantized:
    uint8, blocks of a power of two (at least 16) along its rows, one scale per block."""
    shape = tuple(view.initializers[t.name].dims)
    g = t.granularity
    if len(shape) != 2 or g.axis != 1 or t.precision is not Precision.UINT8 or g.size != row_block(g.size) \
            or shape[1] % g.size:
        _fail(what, f"granularity {g} is not supported for a weight: per block is for uint8 [V, D] tables "
                    "with blocks of a power of two (at least 16) dividing D, along axis 1")
    expected = shape[0] * shape[1] // g.size
    if scale.size != expected:
        _fail(what, f"per block of {g.size} needs {expected} scales ([{shape[0]}, {shape[1] // g.size}]), "
                    f"found {scale.size}")


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
