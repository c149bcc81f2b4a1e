"""QDQ rewriter: QuantizeLinear/DequantizeLinear pairs where the plan says.

Activations get ``T -> Q -> DQ -> T_dequantized`` right after their producer and
every consumer reads the dequantized tensor (the model's own outputs keep their
float producer). Weights and biases become integer initializers behind one
DequantizeLinear each. The decisions all come from the plan.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..plans import Action, Plan, Role, TensorPlan
from ..qparams import QType
from .names import Names
from .weights import initializer, quantize_bias_tensor, quantize_weight


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.names = Names(model)
        self.inits: list[onnx.TensorProto] = []
        self.renames: dict[str, str] = {}

    def const(self, base: str, value) -> str:
        name = self.names.fresh(base)
        self.inits.append(initializer(value, name))
        return name

    def dq(self, q_name: str, scale: str, zp: str, out_base: str, axis: int | None) -> onnx.NodeProto:
        out = self.names.fresh(out_base)
        kwargs = {"axis": axis} if axis is not None else {}
        return helper.make_node("DequantizeLinear", [q_name, scale, zp], [out],
                                name=self.names.fresh(f"{out_base}_DequantizeLinear"), **kwargs)


def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """Return a new model with the plan applied; ``model`` is left untouched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    b = _Builder(out)
    inits = {t.name: t for t in graph.initializer}
    head: list[onnx.NodeProto] = []
    weight_scales = _rewrite_weights(plan, inits, b, head)
    _rewrite_biases(plan, inits, b, head, weight_scales)
    act_nodes = {name: _activation_nodes(t, b) for name, t in plan.tensors.items()
                 if t.role is Role.ACTIVATION and t.action is not Action.SKIP}
    body: list[onnx.NodeProto] = []
    for name in _graph_inputs(graph):
        body.extend(act_nodes.get(name, []))
    for node in graph.node:
        body.append(node)
        for o in node.output:
            body.extend(act_nodes.get(o, []))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in b.renames:
                node.input[i] = b.renames[name]
    used = {i for n in list(head) + body for i in n.input}
    outputs = {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used or t.name in outputs]
    removed = {t.name for t in graph.initializer} - {t.name for t in kept}
    del graph.initializer[:]
    graph.initializer.extend(kept + b.inits)
    del graph.node[:]
    graph.node.extend(head + body)
    _drop_stale_inputs(graph, removed)
    return out


def _graph_inputs(graph: onnx.GraphProto) -> list[str]:
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def _activation_nodes(t: TensorPlan, b: _Builder) -> list[onnx.NodeProto]:
    qtype = QType.parse(t.qtype)
    if t.scale is None:
        raise ValueError(f"plan has no parameters for activation {t.name}; apply a calibration table first")
    scale = b.const(f"{t.name}_scale", np.float32(t.scale))
    zp = b.const(f"{t.name}_zero_point", np.array(t.zero_point, dtype=qtype.dtype))
    q_out = b.names.fresh(f"{t.name}_quantized")
    q = helper.make_node("QuantizeLinear", [t.name, scale, zp], [q_out], name=b.names.fresh(f"{t.name}_QuantizeLinear"))
    dq = b.dq(q_out, scale, zp, f"{t.name}_dequantized", None)
    b.renames[t.name] = dq.output[0]
    return [q, dq]


def _rewrite_weights(plan: Plan, inits: dict, b: _Builder, head: list) -> dict[str, np.ndarray]:
    scales = {}
    for t in plan.tensors.values():
        if t.role is not Role.WEIGHT or t.action is Action.SKIP:
            continue
        w = numpy_helper.to_array(inits[t.name])
        q, scale, zp = quantize_weight(w, t)
        q_name = b.const(f"{t.name}_quantized", q)
        s_name = b.const(f"{t.name}_scale", scale)
        z_name = b.const(f"{t.name}_zero_point", zp)
        dq = b.dq(q_name, s_name, z_name, f"{t.name}_dequantized", t.axis)
        head.append(dq)
        b.renames[t.name] = dq.output[0]
        scales[t.name] = scale
    return scales


def _rewrite_biases(plan: Plan, inits: dict, b: _Builder, head: list, weight_scales: dict) -> None:
    for t in plan.tensors.values():
        if t.role is not Role.BIAS or t.action is Action.SKIP:
            continue
        src = plan.tensors[t.source]
        root = src if src.scale is not None else None
        if root is None or t.weight not in weight_scales:
            continue  # the plan leaves this bias without parameters: keep it float
        bias = numpy_helper.to_array(inits[t.name])
        q, scale, zp = quantize_bias_tensor(bias, root.scale, weight_scales[t.weight])
        q_name = b.const(f"{t.name}_quantized", q)
        s_name = b.const(f"{t.name}_scale", scale)
        z_name = b.const(f"{t.name}_zero_point", zp)
        dq = b.dq(q_name, s_name, z_name, f"{t.name}_dequantized", 0 if np.ndim(scale) else None)
        head.append(dq)
        b.renames[t.name] = dq.output[0]


def _drop_stale_inputs(graph: onnx.GraphProto, removed: set[str]) -> None:
    """Graph inputs that named a replaced initializer (IR < 4 models list both)."""
    keep = [i for i in graph.input if i.name not in removed]
    del graph.input[:]
    graph.input.extend(keep)
