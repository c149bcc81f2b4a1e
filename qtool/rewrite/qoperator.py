"""QOperator rewriter: each quantized node becomes the integer op its resolved
plan names (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd,
...) on int8/uint8 tensors, with the plan's scales. An int8 tensor ``T`` is named ``T_quantized``; a QuantizeLinear
makes it where a float op produced ``T``, a DequantizeLinear gives ``T`` back to
float consumers and model outputs where a quantized op produced it.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..graph import GraphView, reads_of
from ..plans import Action, Plan, Role
from ..resolve import stored_weight
from .names import Names
from .qdq import MS_DOMAIN as MS, drop_stale_inputs, ensure_ms_opset
from .weights import initializer, params, quantize_bias, quantize_weight

UNARY = ("QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu")
BINARY = ("QLinearAdd", "QLinearMul")


class _Rewrite:
    def __init__(self, model: onnx.ModelProto, plan: Plan):
        self.model, self.plan = model, plan
        self.view = GraphView(model)
        self.names = Names(model)
        self.inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.qnames: dict[str, tuple[str, str, str]] = {}
        self.wq: dict[str, tuple[str, str, str]] = {}
        self.fused = {n.fused_into: n.name for n in plan.nodes if n.fused_into}
        self.dropped = {n.name for n in plan.nodes if n.fused_into}
        self.int8_nodes = {n.name for n in plan.nodes if n.quantized and n.name not in self.dropped}

    # -- tensors -----------------------------------------------------------------
    def const(self, base, value) -> str:
        name = self.names.fresh(base)
        self.inits.append(initializer(value, name))
        return name

    def act(self, tensor: str) -> tuple[str, str, str]:
        """(int8 name, scale, zero point) of a quantized activation."""
        if tensor not in self.qnames:
            scale, zp = params(self.plan.tensors[tensor])
            self.qnames[tensor] = (self.names.fresh(f"{tensor}_quantized"),
                                   self.const(f"{tensor}_scale", scale), self.const(f"{tensor}_zero_point", zp))
        return self.qnames[tensor]

    def weight(self, name: str) -> tuple[str, str, str]:
        if name not in self.wq:
            spec = self.plan.tensors[name]
            q, scale, zp = quantize_weight(stored_weight(spec, self.view), spec)
            self.wq[name] = (self.const(f"{name}_quantized", q), self.const(f"{name}_scale", scale),
                             self.const(f"{name}_zero_point", zp))
        return self.wq[name]

    def bias(self, name: str) -> str:
        q, _, _ = quantize_bias(self.view.array(name), self.plan.tensors[name])
        return self.const(f"{name}_quantized", q)

    def is_int8(self, tensor: str) -> bool:
        t = self.plan.tensors.get(tensor)
        return t is not None and t.role is Role.ACTIVATION and t.action in (Action.QUANTIZE, Action.SHARE)

    # -- graph -------------------------------------------------------------------
    def int8_output(self, node) -> str | None:
        """The tensor this node's integer kernel emits in int8 (its own, or its fused activation's)."""
        key = self.view.node_name(node)
        if self.is_int8(node.output[0]):
            return node.output[0]
        fused = self.fused.get(key)
        if fused:
            act = self.view.by_name[fused]
            if self.is_int8(act.output[0]):
                return act.output[0]
        return None

    def quantize_if_needed(self, tensor: str) -> None:
        """Emit Q after a float producer when an integer op consumes ``tensor``."""
        if self.is_int8(tensor) and any(self.view.node_name(c) in self.int8_nodes
                                        for c in self.view.consumers.get(tensor, [])):
            q, s, z = self.act(tensor)
            self.nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [q],
                                               name=self.names.fresh(f"{tensor}_QuantizeLinear")))

    def dequantize_if_needed(self, tensor: str) -> None:
        """Emit DQ back to ``tensor`` for float consumers and model outputs."""
        users = self.view.consumers.get(tensor, [])
        floats = [c for c in users if self.view.node_name(c) not in self.int8_nodes
                  and self.view.node_name(c) not in self.dropped]
        if floats or tensor in self.view.graph_outputs:
            q, s, z = self.act(tensor)
            self.nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [tensor],
                                               name=self.names.fresh(f"{tensor}_DequantizeLinear")))


def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """Return a new QOperator model; ``model`` is left untouched."""
    r = _Rewrite(model, plan)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    r.inits = out.graph.initializer  # new initializers go straight into the model: one copy of each int8 weight
    for name in r.view.graph_inputs:
        r.quantize_if_needed(name)
    for node in r.view.nodes:
        key = r.view.node_name(node)
        if key in r.dropped:
            continue
        if key not in r.int8_nodes:
            r.nodes.append(node)
            for o in node.output:
                r.quantize_if_needed(o)
            continue
        emitted = _emit(node, r.plan.node(key).kernel, r)
        if emitted is not None:
            r.dequantize_if_needed(emitted)
    del out.graph.node[:]
    out.graph.node.extend(r.nodes)
    used = reads_of(out.graph.node)
    removed = set()
    inits = out.graph.initializer
    for i in reversed(range(len(inits))):  # in place, order kept: nothing is copied again
        if inits[i].name not in used:
            removed.add(inits[i].name)
            del inits[i]
    drop_stale_inputs(out.graph, removed)
    ensure_ms_opset(out)
    return out


def _emit(node, kernel: str, r: _Rewrite) -> str | None:
    """Append ``kernel`` for ``node``; return the int8 tensor it produced (or None for float output)."""
    out = r.int8_output(node)
    if kernel == "QLinearConv":
        return _conv(node, r, out)
    if kernel in ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat"):
        return _linear(node, kernel, r, out)
    if kernel in BINARY or kernel in UNARY or kernel == "QLinearConcat":
        return _qlinear(node, kernel, r, out)
    op = node.op_type
    if op == "Gather" and r.view.is_initializer(node.input[0]):
        wq = r.weight(node.input[0])[0]
        r.nodes.append(helper.make_node("Gather", [wq, node.input[1]], [r.act(out)[0]], name=node.name,
                                        axis=r.view.attr(node, "axis", 0)))
        return out
    inputs = [r.act(node.input[0])[0]] + list(node.input[1:])  # data movement on int8 data
    r.nodes.append(helper.make_node(op, inputs, [r.act(out)[0]], name=node.name, domain=node.domain,
                                    **_attrs(node)))
    return out


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv(node, r: _Rewrite, out: str) -> str:
    x, s, z = r.act(node.input[0])
    wq, ws, wz = r.weight(node.input[1])
    y, ys, yz = r.act(out)
    inputs = [x, s, z, wq, ws, wz, ys, yz]
    if len(node.input) > 2 and node.input[2]:
        inputs.append(r.bias(node.input[2]))
    r.nodes.append(helper.make_node("QLinearConv", inputs, [y], name=node.name, **_attrs(node)))
    return out


def _linear(node, kernel: str, r: _Rewrite, out: str | None) -> str | None:
    a, a_s, a_z = r.act(node.input[0])
    b_name = node.input[1]
    weight = r.view.is_initializer(b_name)
    b, b_s, b_z = r.weight(b_name) if weight else r.act(b_name)
    if kernel == "QGemm":
        inputs = [a, a_s, a_z, b, b_s, b_z]
        inputs.append(r.bias(node.input[2]) if len(node.input) > 2 and node.input[2] else "")
        outputs = [r.act(out)[0]] if out else [node.output[0]]
        if out:
            inputs += [r.act(out)[1], r.act(out)[2]]
        attrs = {k: v for k, v in _attrs(node).items() if k in ("transA", "transB", "alpha")}
        r.nodes.append(helper.make_node("QGemm", inputs, outputs, name=node.name, domain=MS, **attrs))
        return out
    if kernel == "QLinearMatMul":
        y, ys, yz = r.act(out)
        r.nodes.append(helper.make_node("QLinearMatMul", [a, a_s, a_z, b, b_s, b_z, ys, yz], [y], name=node.name))
        return out
    r.nodes.append(helper.make_node("MatMulIntegerToFloat", [a, b, a_s, b_s, a_z, b_z], [node.output[0]],
                                    name=node.name, domain=MS))
    return None


def _qlinear(node, kernel: str, r: _Rewrite, out: str) -> str:
    y, ys, yz = r.act(out)
    if kernel == "QLinearConcat":
        inputs = [ys, yz] + [part for t in node.input if t for part in r.act(t)]
        r.nodes.append(helper.make_node(kernel, inputs, [y], name=node.name, domain=MS, **_attrs(node)))
        return out
    if kernel in BINARY:
        inputs = [*r.act(node.input[0]), *r.act(node.input[1]), ys, yz]
        r.nodes.append(helper.make_node(kernel, inputs, [y], name=node.name, domain=MS))
        return out
    attrs = _attrs(node)
    if kernel == "QLinearGlobalAveragePool":
        attrs["channels_last"] = 0
    r.nodes.append(helper.make_node(kernel, [*r.act(node.input[0]), ys, yz], [y], name=node.name, domain=MS,
                                    **attrs))
    return out
