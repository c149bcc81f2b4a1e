"""Dynamic rewriter: nodes the plan marks DynamicQuantizeMatMul become that
onnxruntime contrib op (int8 weight initializers, float bias folded in); an input
read by several such nodes (a transformer's Q, K and V projections) is quantized
once by DynamicQuantizeLinear and each node becomes MatMulIntegerToFloat. The
rest of the plan (8-bit embedding tables) is applied by the QDQ rewriter."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import GraphView
from ..plans import Action, Plan
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
    replaced: dict[str, list] = {}
    shared = _shared_inputs(view, kernels)
    quantized_inputs: dict[str, list[str]] = {}
    for node in view.nodes:
        key = view.node_name(node)
        if key not in kernels:
            continue
        bias_node = view.by_name.get(fused.get(key))
        a = node.input[0]
        prefix = []
        if a in shared and a not in quantized_inputs:
            quantized_inputs[a] = [names.fresh(f"{a}_{s}") for s in ("quantized", "scale", "zero_point")]
            prefix = [helper.make_node("DynamicQuantizeLinear", [a], quantized_inputs[a],
                                       name=names.fresh(f"{a}_DynamicQuantizeLinear"))]
        kernel = _kernel_node(node, bias_node, plan.tensors[node.input[1]], inits, names, new_inits, view,
                              quantized_inputs.get(a))
        replaced[key] = prefix + [kernel]
        if bias_node is not None:
            drop.add(view.node_name(bias_node))
    nodes = [m for n in view.nodes if view.node_name(n) not in drop
             for m in replaced.get(view.node_name(n), [n])]
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


def _shared_inputs(view: GraphView, kernels: set[str]) -> set[str]:
    """Inputs read by several kernels (Q, K and V projections): quantize them once."""
    counts: dict[str, int] = {}
    for node in view.nodes:
        if view.node_name(node) in kernels:
            counts[node.input[0]] = counts.get(node.input[0], 0) + 1
    return {t for t, c in counts.items() if c > 1}


def _kernel_node(node, bias_node, spec, inits, names: Names, new_inits: list, view: GraphView,
                 quantized_input: list[str] | None = None):
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
    if quantized_input is not None:  # the input was quantized once for all its consumers
        aq, a_s, a_z = quantized_input
        inputs = [aq, q_name, a_s, s_name, a_z, z_name] + ([bias] if bias is not None else [])
        return helper.make_node("MatMulIntegerToFloat", inputs, [output],
                                name=names.fresh(f"{view.node_name(node)}_dynamic"), domain=MS_DOMAIN)
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
