"""Dynamic rewriter: nodes whose resolved kernel is DynamicQuantizeMatMul become
that onnxruntime contrib op (int8 weights with the plan's scales, the plan's
float bias folded in); nodes resolved to MatMulIntegerToFloat read an input that
one DynamicQuantizeLinear quantizes for all of them (a transformer's Q, K and V
projections). The rest of the plan (8-bit embedding tables; in a static plan with
``--dynamic`` nodes, everything else) is applied by the QDQ rewriter first; a dynamic
kernel reads its input as the float tensor (``float_inputs``) even where the static
nodes beside it read it through Q/DQ."""

from __future__ import annotations

import onnx
from onnx import helper

from ..graph import GraphView, reads_of
from ..plans import Action, Plan
from ..resolve import stored_weight
from ..rules.dynamic import KERNELS, SHARED_KERNEL
from . import qdq
from .names import Names
from .weights import initializer, quantize_weight




def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    kernels = {n.name: n for n in plan.nodes if n.kernel in KERNELS}
    source = GraphView(model)
    weights = {source.by_name[k].input[1] for k in kernels}
    rest = plan.with_tensors({k: t for k, t in plan.tensors.items()
                              if k not in weights and t.action is not Action.DYNAMIC})
    out = qdq.apply(model, rest)
    names = Names(out)
    view = GraphView(out)
    folded_into = {n.fused_into: n.name for n in plan.nodes if n.fused_into in kernels}  # kernel -> its bias Add
    replaced: dict[str, list] = {}
    quantized_inputs: dict[str, list[str]] = {}
    for node in view.nodes:
        key = view.node_name(node)
        if key not in kernels:
            continue
        decided = kernels[key]
        prefix = []
        a = node.input[0]
        if decided.kernel == SHARED_KERNEL and a not in quantized_inputs:
            quantized_inputs[a] = [names.fresh(f"{a}_{s}") for s in ("quantized", "scale", "zero_point")]
            prefix = [helper.make_node("DynamicQuantizeLinear", [a], quantized_inputs[a],
                                       name=names.fresh(f"{a}_DynamicQuantizeLinear"))]
        output = view.by_name[folded_into[key]].output[0] if key in folded_into else node.output[0]
        weight = plan.tensors[node.input[1]]
        q, scale, zp = quantize_weight(stored_weight(weight, source), weight)
        q_name, s_name, z_name = (names.fresh(f"{weight.name}_{suffix}") for suffix in ("quantized", "scale", "zero_point"))
        # straight into the model, one weight at a time: no second list of every int8 weight
        out.graph.initializer.extend([initializer(q, q_name), initializer(scale, s_name), initializer(zp, z_name)])
        del q
        bias = [decided.bias] if decided.bias else []
        if decided.kernel == SHARED_KERNEL:
            aq, a_s, a_z = quantized_inputs[a]
            inputs = [aq, q_name, a_s, s_name, a_z, z_name] + bias
        else:
            inputs = [a, q_name, s_name, z_name] + bias
        replaced[key] = prefix + [helper.make_node(decided.kernel, inputs, [output], domain=qdq.MS_DOMAIN,
                                                   name=names.fresh(f"{key}_dynamic"))]
    folded = set(folded_into.values())
    nodes = [m for n in view.nodes if view.node_name(n) not in folded
             for m in replaced.get(view.node_name(n), [n])]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = reads_of(out.graph.node)
    inits = out.graph.initializer
    removed = set()
    for i in reversed(range(len(inits))):  # in place: the kept weights are not copied again
        if inits[i].name not in used:
            removed.add(inits[i].name)
            del inits[i]
    qdq.drop_stale_inputs(out.graph, removed)  # IR < 4 lists weights as graph inputs too
    qdq.ensure_ms_opset(out)
    return out
