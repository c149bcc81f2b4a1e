"""QDQ rewriter: QuantizeLinear/DequantizeLinear pairs where the resolved plan says.

Activations get ``T -> Q -> DQ -> T_dequantized`` right after their producer;
consumers read the dequantized tensor, except the float nodes that the plan
says read ``T`` itself (``float_inputs``), and the model's own outputs keep
their float producer. Weights and biases become integer initializers behind one
DequantizeLinear each, with the plan's scales. The decisions all come from the plan.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..graph import GraphView, reads_of
from ..plans import Action, Plan, Role, TensorPlan
from ..qparams import expand_blocks, quantize
from ..resolve import stored_weight
from ..rules.movement import TABLE_KERNEL
from ..types import MS_DOMAIN
from .names import Names
from .weights import initializer, params, quantize_bias, quantize_weight



class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.names = Names(model)
        # new initializers go straight into the model, after its own: one copy of each int8 weight
        self.inits = model.graph.initializer
        self.renames: dict[str, str] = {}

    def const(self, base: str, value) -> str:
        name = self.names.fresh(base)
        self.inits.append(initializer(value, name))
        return name

    def dq(self, t: TensorPlan, q_name: str, scale: str, zp: str, axis: int | None) -> onnx.NodeProto:
        out = self.names.fresh(f"{t.name}_dequantized")
        kwargs = {"axis": axis} if axis is not None else {}
        return helper.make_node("DequantizeLinear", [q_name, scale, zp], [out], domain=t.qdq_domain or None,
                                name=self.names.fresh(f"{t.name}_dequantized_DequantizeLinear"), **kwargs)

    def constant_dq(self, t: TensorPlan, q, scale, zp) -> onnx.NodeProto:
        """An integer initializer behind one DequantizeLinear; consumers are renamed to its output."""
        q_name = self.const(f"{t.name}_quantized", q)
        s_name = self.const(f"{t.name}_scale", scale)
        z_name = self.const(f"{t.name}_zero_point", zp)
        node = self.dq(t, q_name, s_name, z_name, t.axis if np.ndim(scale) else None)
        self.renames[t.name] = node.output[0]
        return node


def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """Return a new model with the plan applied; ``model`` is left untouched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    view = GraphView(model)
    own = len(graph.initializer)
    b = _Builder(out)
    gathers = {n.name: n for n in plan.nodes if n.kernel == TABLE_KERNEL}
    tables = {n.inputs[0] for n in gathers.values()}
    head = [b.constant_dq(t, *quantize_weight(stored_weight(t, view), t)) for t in _constants(plan, Role.WEIGHT)
            if t.name not in tables]
    head += [b.constant_dq(t, *quantize_bias(view.array(t.name), t)) for t in _constants(plan, Role.BIAS)]
    act_nodes = {name: _activation_nodes(t, b) for name, t in plan.tensors.items()
                 if t.role is Role.ACTIVATION and t.action in (Action.QUANTIZE, Action.SHARE)}
    body: list[onnx.NodeProto] = []
    for name in view.graph_inputs:
        body.extend(act_nodes.get(name, []))
    rows: dict[str, list[str]] = {}
    for node in graph.node:
        decided = gathers.get(view.node_name(node))
        body.append(node if decided is None else _table_gather(node, plan.tensors[decided.inputs[0]], view, b, rows))
        for o in node.output:
            body.extend(act_nodes.get(o, []))
    for node in graph.node:
        decided = plan.node(view.node_name(node))
        keep = set(decided.float_inputs) if decided is not None else set()
        for i, name in enumerate(node.input):
            if name in b.renames and name not in keep:
                node.input[i] = b.renames[name]
    used = reads_of(list(head) + body)  # subgraphs (If/Loop bodies) read outer initializers by name
    outputs = {o.name for o in graph.output}
    removed = set()
    for i in reversed(range(own)):  # in place, order kept: the new initializers are not copied again
        if graph.initializer[i].name not in used and graph.initializer[i].name not in outputs:
            removed.add(graph.initializer[i].name)
            del graph.initializer[i]
    del graph.node[:]
    graph.node.extend(head + body)
    drop_stale_inputs(graph, removed)
    if gathers or any(t.qdq_domain == MS_DOMAIN for t in plan.tensors.values() if t.quantized):
        ensure_ms_opset(out)
    return out


def _table_gather(node: onnx.NodeProto, t: TensorPlan, view: GraphView, b: _Builder,
                  rows: dict[str, list[str]]) -> onnx.NodeProto:
    """Gather -> GatherBlockQuantized reading the uint8 table with its per-row (per-block)
    scales and zero points [V, D / block]; a table read by several Gathers is written once."""
    if t.name not in rows:
        q, scale, zp = table_rows(view.array(t.name), t)
        rows[t.name] = [b.const(f"{t.name}_quantized", q), b.const(f"{t.name}_scale", scale),
                        b.const(f"{t.name}_zero_point", zp)]
    data, scale, zp = rows[t.name]
    return helper.make_node(TABLE_KERNEL, [data, node.input[1], scale, zp], list(node.output), name=node.name,
                            domain=MS_DOMAIN, bits=8, block_size=t.granularity.size, gather_axis=0,
                            quantize_axis=1)


def table_rows(table: np.ndarray, t: TensorPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero point) of a [V, D] table quantized per block of its rows with the plan's
    parameters, which it holds flat in C order: [V * D / block] -> [V, D / block]."""
    g = t.granularity
    scale, zp = params(t)
    grid = (table.shape[0], table.shape[1] // g.size)
    scale, zp = scale.reshape(grid), zp.reshape(grid)
    q = quantize(table.astype(np.float32), expand_blocks(scale, g), expand_blocks(zp, g), t.precision)
    return q, scale, zp


def _constants(plan: Plan, role: Role) -> list[TensorPlan]:
    action = Action.QUANTIZE if role is Role.WEIGHT else Action.DERIVE
    return [t for t in plan.tensors.values() if t.role is role and t.action is action]


def _activation_nodes(t: TensorPlan, b: _Builder) -> list[onnx.NodeProto]:
    scale, zp = params(t)
    s_name = b.const(f"{t.name}_scale", scale)
    z_name = b.const(f"{t.name}_zero_point", zp)
    q_out = b.names.fresh(f"{t.name}_quantized")
    q = helper.make_node("QuantizeLinear", [t.name, s_name, z_name], [q_out], domain=t.qdq_domain or None,
                         name=b.names.fresh(f"{t.name}_QuantizeLinear"))
    dq = b.dq(t, q_out, s_name, z_name, None)
    b.renames[t.name] = dq.output[0]
    return [q, dq]


def drop_stale_inputs(graph: onnx.GraphProto, removed: set[str]) -> None:
    """Graph inputs that named a replaced initializer (IR < 4 models list both)."""
    keep = [i for i in graph.input if i.name not in removed]
    del graph.input[:]
    graph.input.extend(keep)


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
