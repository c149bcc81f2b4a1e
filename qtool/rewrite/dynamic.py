"""Dynamic rewriter: nodes the plan marks DynamicQuantizeMatMul become that
onnxruntime contrib op (int8 weight initializers, float bias folded in); the
rest of the plan (int8 embedding tables) is applied by the QDQ rewriter."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import GraphView
from ..plans import Action, Plan, Role
from ..rules.dynamic import KERNEL
from . import qdq
from .names import Names
from .weights import initializer, quantize_weight

MS_DOMAIN = "com.microsoft"


def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    kernels = {n.name for n in plan.nodes if n.kernel == KERNEL}
    fused = {n.fused_into: n.name for n in plan.nodes if n.fused_into}
    view = GraphView(model)
    weights = {n.input[1] for n in view.nodes if view.node_name(n) in kernels}
    rest = plan.with_tensors({k: t for k, t in plan.tensors.items()
                              if k not in weights and t.action is not Action.DYNAMIC})
    out = qdq.apply(model, rest)
    names = Names(out)
    view = GraphView(out)
    inits = {t.name: t for t in out.graph.initializer}
    drop, new_inits = set(), []
    replaced = {}
    for node in view.nodes:
        key = view.node_name(node)
        if key not in kernels:
            continue
        bias_node = next((n for n in view.nodes if view.node_name(n) == fused.get(key)), None)
        replaced[key] = _kernel_node(node, bias_node, plan.tensors[node.input[1]], inits, names, new_inits, view)
        if bias_node is not None:
            drop.add(view.node_name(bias_node))
    nodes = [replaced.get(view.node_name(n), n) for n in view.nodes if view.node_name(n) not in drop]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_inits)
    used = {i for n in out.graph.node for i in n.input}
    keep = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def _kernel_node(node, bias_node, spec, inits, names: Names, new_inits: list, view: GraphView):
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if node.op_type == "Gemm" and view.attr(node, "transB", 0):
        w = w.T
    axis = None if spec.axis is None else 1
    q, scale, zp = quantize_weight(w, _with_axis(spec, axis))
    base = node.input[1]
    q_name, s_name, z_name = (names.fresh(f"{base}_{suffix}") for suffix in ("quantized", "scale", "zero_point"))
    new_inits += [initializer(q, q_name), initializer(scale, s_name), initializer(zp, z_name)]
    inputs = [node.input[0], q_name, s_name, z_name]
    output = node.output[0]
    bias = _bias(node, bias_node, inits)
    if bias is not None:
        inputs.append(bias)
    if bias_node is not None:
        output = bias_node.output[0]
    return helper.make_node(KERNEL, inputs, [output], name=names.fresh(f"{view.node_name(node)}_dynamic"),
                            domain=MS_DOMAIN)


def _bias(node, bias_node, inits) -> str | None:
    if bias_node is not None:
        return bias_node.input[1] if bias_node.input[0] == node.output[0] else bias_node.input[0]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and len(inits[node.input[2]].dims) == 1:
        return node.input[2]
    return None


def _with_axis(spec, axis):
    from dataclasses import replace
    return replace(spec, axis=axis)
