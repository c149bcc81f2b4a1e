"""The planner: model (+ table) -> Plan. Reads, decides, never mutates."""

from __future__ import annotations

from dataclasses import replace

import onnx

from .config import QuantizeOptions
from .errors import TableError
from .graph import GraphView
from .plans import Action, NodePlan, Plan, Role, TensorPlan
from .qparams import QType, choose_qparams
from .rules import RULES, Act, Bias, Context, NodeRule, Share, Skip, Weight


def plan(model: onnx.ModelProto, options: QuantizeOptions, notes: tuple[str, ...] = ()) -> Plan:
    """Decide, node by node in topological order, what is quantized and why.

    Activation parameters are left empty; :func:`apply_table` fills them.
    """
    view = GraphView(model)
    ctx = Context(view, options)
    tensors: dict[str, TensorPlan] = {}
    nodes = []
    for node in view.nodes:
        decision = _decide(node, ctx)
        if isinstance(decision, Skip):
            nodes.append(NodePlan(view.node_name(node), node.op_type, False, decision.reason))
            continue
        _record_inputs(node, decision, ctx, tensors)
        _record_output(node, decision, ctx, tensors)
        nodes.append(NodePlan(view.node_name(node), node.op_type, True, decision.reason))
    return Plan(tensors, tuple(nodes), tuple(notes))


def _decide(node: onnx.NodeProto, ctx: Context):
    name = ctx.view.node_name(node)
    if name in ctx.options.exclude or node.op_type in ctx.options.exclude:
        return Skip("excluded by the user")
    if node.domain not in ("", "ai.onnx"):
        return Skip(f"op from domain {node.domain!r} is not quantized")
    rule = RULES.get(node.op_type)
    if rule is None:
        return Skip(f"no int8 rule for {node.op_type}; stays float")
    decision = rule(node, ctx)
    if isinstance(decision, NodeRule):
        for index, spec in decision.inputs.items():
            tensor = node.input[index]
            if isinstance(spec, Act) and not ctx.view.is_float(tensor) and not ctx.is_quantized(tensor):
                return Skip(f"input {tensor} is not float32 (or its type is unknown)")
    return decision


def _act_qtype(ctx: Context) -> str:
    return ctx.options.activation_type


def _record_inputs(node, decision: NodeRule, ctx: Context, tensors: dict) -> None:
    name = ctx.view.node_name(node)
    for index, spec in decision.inputs.items():
        tensor = node.input[index]
        if isinstance(spec, Act):
            if tensor not in tensors:
                tensors[tensor] = TensorPlan(tensor, Role.ACTIVATION, Action.QUANTIZE, f"input of {name}",
                                             _act_qtype(ctx), ctx.options.activation_symmetric)
                ctx.quantized[tensor] = name
        elif isinstance(spec, Weight):
            granularity = "per-tensor" if spec.axis is None else f"per-axis {spec.axis}"
            tensors[tensor] = TensorPlan(tensor, Role.WEIGHT, Action.QUANTIZE, f"weight of {name}, {granularity}",
                                         ctx.options.weight_type, True, spec.axis)
        elif isinstance(spec, Bias):
            w_spec = decision.inputs[spec.weight_index]
            tensors[tensor] = TensorPlan(tensor, Role.BIAS, Action.DERIVE, f"bias of {name}: s_x * s_w, zero point 0",
                                         "int32", True, 0 if w_spec.axis is not None else None,
                                         source=node.input[spec.input_index], weight=node.input[spec.weight_index])


def _record_output(node, decision: NodeRule, ctx: Context, tensors: dict) -> None:
    out = node.output[0]
    name = ctx.view.node_name(node)
    if isinstance(decision.output, Act):
        tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.QUANTIZE, f"output of {name}",
                                  _act_qtype(ctx), ctx.options.activation_symmetric)
        ctx.quantized[out] = name
    elif isinstance(decision.output, Share):
        src = node.input[decision.output.input_index]
        root = tensors[src]
        tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SHARE, decision.output_reason,
                                  root.qtype, root.symmetric, source=src)
        ctx.quantized[out] = name
    elif out and ctx.view.is_float(out):
        tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SKIP, f"output of {name}: {decision.output_reason}")


def apply_table(plan_: Plan, ranges: dict[str, tuple[float, float]]) -> Plan:
    """Fill activation scale/zero point from calibrated ranges (SHARE copies its source).

    ``ranges`` maps tensor name -> (lo, hi). A tensor missing from it is a TableError.
    """
    tensors = dict(plan_.tensors)
    for name, t in plan_.tensors.items():
        if t.role is not Role.ACTIVATION or t.action is not Action.QUANTIZE:
            continue
        if name not in ranges:
            raise TableError(f"calibration table has no statistics for tensor {name!r}; "
                             "it was made for another model or other options: calibrate again")
        lo, hi = ranges[name]
        scale, zp = choose_qparams(lo, hi, QType.parse(t.qtype), t.symmetric)
        tensors[name] = _with_params(t, float(scale), int(zp), (float(lo), float(hi)))
    for name, t in plan_.tensors.items():
        if t.role is Role.ACTIVATION and t.action is Action.SHARE:
            root = _share_root(tensors, name)
            tensors[name] = _with_params(t, root.scale, root.zero_point, root.range)
    return plan_.with_tensors(tensors)


def _share_root(tensors: dict, name: str) -> TensorPlan:
    t = tensors[name]
    seen = set()
    while t.action is Action.SHARE and t.source not in seen:
        seen.add(t.source)
        t = tensors[t.source]
    return t


def _with_params(t: TensorPlan, scale, zp, rng) -> TensorPlan:
    return replace(t, scale=scale, zero_point=zp, range=rng)
