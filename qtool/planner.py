"""The planner: model (+ table) -> Plan. Reads, decides, never mutates."""

from __future__ import annotations

from dataclasses import replace

import onnx

from .config import QuantizeOptions
from .errors import TableError
from .graph import GraphView
from .graph.patterns import float_patterns
from .plans import Action, NodePlan, Plan, Role, TensorPlan
from .qparams import PerTensor, QType, choose_qparams, weight_qparams
from .rules import RULES, Act, Bias, Context, NodeRule, Optional, Share, Skip, Weight
from .rules import dynamic as dynamic_rules


def plan(model: onnx.ModelProto, options: QuantizeOptions, notes: tuple[str, ...] = (),
         ranges: dict[str, tuple[float, float]] | None = None) -> Plan:
    """Decide, node by node in topological order, what is quantized and why.

    ``ranges`` (calibrated, when known) lets range-dependent rules (Concat)
    decide; activation parameters are filled by :func:`apply_table`.
    """
    view = GraphView(model)
    ctx = Context(view, options, patterns=float_patterns(view), ranges=ranges, macs=node_macs(model))
    tensors: dict[str, TensorPlan] = {}
    nodes = []
    for node in view.nodes:
        decision = _decide(node, ctx)
        if isinstance(decision, Skip):
            nodes.append(NodePlan(view.node_name(node), node.op_type, False, decision.reason))
            continue
        _record_inputs(node, decision, ctx, tensors)
        _record_output(node, decision, ctx, tensors)
        nodes.append(_node_plan(node, decision, ctx))
    for out, producer in ctx.optional.items():
        tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SKIP,
                                  f"output of {producer}: float (no quantized consumer; int8 kernel with float output)")
    return Plan(tensors, tuple(nodes), tuple(notes))


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs of each Conv/MatMul/Gemm node at batch 1 (dynamic dims taken as 1)."""
    from .inspection import macs_by_node, static_view
    try:
        view, _ = static_view(model, {})
    except ValueError:
        return {}
    return macs_by_node(view)


def calibration_tensors(model: onnx.ModelProto, options: QuantizeOptions) -> list[str]:
    """The activations a table for this model must hold: those the plan quantizes,
    plus the float inputs of every node a rule exists for (outside float patterns)."""
    first = plan(model, options)
    wanted = dict.fromkeys(first.activations_to_calibrate())
    if options.mode == "dynamic":
        return list(wanted)
    view = GraphView(model)
    patterns = float_patterns(view)
    for node in view.nodes:
        if node.op_type not in RULES or view.node_name(node) in patterns:
            continue
        for t in node.input:
            if t and not view.is_initializer(t) and view.is_float(t):
                wanted.setdefault(t)
    return list(wanted)


def _node_plan(node, decision: NodeRule, ctx: Context) -> NodePlan:
    name = ctx.view.node_name(node)
    kernel = dynamic_rules.KERNEL if any(isinstance(s, dynamic_rules.Dynamic) for s in decision.inputs.values()) else ""
    fused_into = ctx.fused.get(name, "")
    return NodePlan(name, node.op_type, True, decision.reason, kernel, fused_into)


def _decide(node: onnx.NodeProto, ctx: Context):
    name = ctx.view.node_name(node)
    if name in ctx.options.exclude or node.op_type in ctx.options.exclude:
        return Skip("excluded by the user")
    if node.domain not in ("", "ai.onnx"):
        return Skip(f"op from domain {node.domain!r} is not quantized")
    if name in ctx.patterns:
        return Skip(f"part of a {ctx.patterns[name]} pattern: stays float (quantizing its small ops loses accuracy)")
    dynamic = ctx.options.mode == "dynamic"
    rule = (dynamic_rules.RULES if dynamic else RULES).get(node.op_type)
    if rule is None:
        if dynamic:
            return Skip("dynamic mode quantizes MatMul/Gemm weights and embedding tables only")
        return Skip(f"no int8 kernel for {node.op_type} on the CPU EP; stays float")
    decision = rule(node, ctx)
    if isinstance(decision, NodeRule):
        for index, spec in decision.inputs.items():
            tensor = node.input[index]
            if isinstance(spec, Act) and not ctx.view.is_float(tensor) and not ctx.is_int8_capable(tensor):
                return Skip(f"input {tensor} is not float32 (or its type is unknown)")
    return decision


def _record_inputs(node, decision: NodeRule, ctx: Context, tensors: dict) -> None:
    name = ctx.view.node_name(node)
    for index, spec in decision.inputs.items():
        tensor = node.input[index]
        if isinstance(spec, Act):
            _quantize_activation(tensor, f"input of {name}", ctx, tensors)
        elif isinstance(spec, dynamic_rules.Dynamic):
            tensors[tensor] = TensorPlan(tensor, Role.ACTIVATION, Action.DYNAMIC, f"input of {name}: uint8 per batch",
                                         "uint8")
        elif isinstance(spec, Weight):
            granularity = "per-tensor" if spec.axis is None else f"per-axis {spec.axis}"
            tensors[tensor] = TensorPlan(tensor, Role.WEIGHT, Action.QUANTIZE, f"weight of {name}, {granularity}",
                                         spec.qtype or ctx.options.weight_type, spec.symmetric, spec.axis)
        elif isinstance(spec, Bias):
            w_spec = decision.inputs[spec.weight_index]
            tensors[tensor] = TensorPlan(tensor, Role.BIAS, Action.DERIVE, f"bias of {name}: s_x * s_w, zero point 0",
                                         "int32", True, 0 if w_spec.axis is not None else None,
                                         source=node.input[spec.input_index], weight=node.input[spec.weight_index])


def _quantize_activation(tensor: str, why: str, ctx: Context, tensors: dict) -> None:
    """Mark an activation int8; an optional output (MatMul/Gemm) is promoted."""
    if tensor in ctx.optional:
        producer = ctx.optional.pop(tensor)
        why = f"output of {producer} (int8 because a quantized consumer reads it)"
    elif tensor in tensors and tensors[tensor].action is not Action.SKIP:
        return
    tensors[tensor] = TensorPlan(tensor, Role.ACTIVATION, Action.QUANTIZE, why, ctx.options.activation_type,
                                 ctx.options.activation_symmetric)
    ctx.quantized[tensor] = why


def _record_output(node, decision: NodeRule, ctx: Context, tensors: dict) -> None:
    out = node.output[0]
    name = ctx.view.node_name(node)
    if isinstance(decision.output, Act):
        _quantize_activation(out, f"output of {name}", ctx, tensors)
    elif isinstance(decision.output, Optional):
        ctx.optional[out] = name
    elif isinstance(decision.output, Share):
        src = node.input[decision.output.input_index]
        if src in ctx.optional:
            _quantize_activation(src, "", ctx, tensors)
        root = tensors[src]
        tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SHARE, decision.output_reason,
                                  root.qtype if root.role is Role.ACTIVATION else ctx.options.activation_type,
                                  root.symmetric, source=src)
        ctx.quantized[out] = name
    elif out and ctx.view.is_float(out):
        tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SKIP, f"output of {name}: {decision.output_reason}")


def apply_table(plan_: Plan, ranges: dict[str, tuple[float, float]], model: onnx.ModelProto | None = None) -> Plan:
    """Fill activation scale/zero point from calibrated ranges (SHARE copies its source).

    ``ranges`` maps tensor name -> (lo, hi); a tensor missing from it is a
    TableError. A SHARE of a weight (Gather rows) takes the weight's own
    per-tensor parameters, computed from ``model``'s initializer.
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
        tensors[name] = replace(t, scale=float(scale), zero_point=int(zp), range=(float(lo), float(hi)))
    view = GraphView(model) if model is not None else None
    for name, t in plan_.tensors.items():
        if t.role is Role.ACTIVATION and t.action is Action.SHARE:
            root = _share_root(tensors, name)
            if root.role is Role.WEIGHT:
                tensors[name] = _weight_share(t, root, view)
            else:
                tensors[name] = replace(t, scale=root.scale, zero_point=root.zero_point, range=root.range)
    return plan_.with_tensors(tensors)


def _weight_share(t: TensorPlan, weight: TensorPlan, view: GraphView | None) -> TensorPlan:
    if view is None:
        raise ValueError("apply_table needs the model to share a weight's parameters")
    scale, zp = weight_qparams(view.array(weight.name), QType.parse(weight.qtype), PerTensor(), weight.symmetric)
    rng = (float(scale) * (QType.parse(weight.qtype).qmin - int(zp)), float(scale) * (QType.parse(weight.qtype).qmax - int(zp)))
    return replace(t, qtype=weight.qtype, symmetric=weight.symmetric, scale=float(scale), zero_point=int(zp), range=rng)


def _share_root(tensors: dict, name: str) -> TensorPlan:
    t = tensors[name]
    seen = set()
    while t.action is Action.SHARE and t.source not in seen:
        seen.add(t.source)
        t = tensors[t.source]
    return t
