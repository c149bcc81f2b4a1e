"""Weight-only int4 rewriter: writes a ``weight-only`` plan, decides nothing.

MatMul -> ``com.microsoft.MatMulNBits`` (A, B packed [N, k_blocks, block/2], scales
[N * k_blocks], zero points packed [N * ceil(k_blocks/2)] unless symmetric; K, N, bits 4,
block_size, accuracy_level); Gemm -> MatMulNBits then an Add of its C; Gather ->
``com.microsoft.GatherBlockQuantized`` with the table packed two 4-bit values per uint8
along its rows (scales [V, blocks], zero points [V, ceil(blocks/2)]; bits 4, gather_axis 0,
quantize_axis 1): the uint8 form is the one every onnxruntime CUDA build registers, besides
the CPU EP (contrib_ops/{cpu,cuda}/quantization/gather_block_quantized.cc). Each new node
keeps the original node's plan name, so a later pass (the fp16 nodes) finds it. Float
originals that nothing reads any more are dropped.

Float inputs of the emitted kernels (what an fp16 pass converts): MatMulNBits inputs 0 (A)
and 2 (scales) and its output; GatherBlockQuantized input 2 (scales) and its output.
Scales are written in A's float type as the graph records it (float32 in a prepared model).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import int4
from ..graph import GraphView, reads_of
from ..plans import Plan, TensorPlan
from ..weight_only import ACCURACY_LEVEL, GATHER_KERNEL, KERNEL, blocks_of
from . import qdq
from .names import Names

HALF = onnx.TensorProto.FLOAT16


def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    kernels = {n.name: n for n in plan.nodes if n.kernel in (KERNEL, GATHER_KERNEL)}
    if not kernels:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    view = GraphView(out)
    names = Names(out)
    made: dict[tuple[str, str, int], list[str]] = {}
    body = []
    for node in view.nodes:
        decided = kernels.get(view.node_name(node))
        if decided is None:
            body.append(node)
            continue
        t = plan.tensors[decided.inputs[0]]
        half = decided.kernel == KERNEL and view.elem_type(node.input[0]) == HALF
        key = (t.name, decided.kernel, int(half))  # a tied table read by a Gemm too: each kernel its own layout
        if key not in made:
            made[key] = _initializers(out, view, names, t, decided.kernel, half)
        body.extend(_nodes(node, view.node_name(node), decided, made[key], t, view, names))
    del out.graph.node[:]
    out.graph.node.extend(body)
    _drop_unread(out, {w for w, _, _ in made})
    qdq.ensure_ms_opset(out)
    return out


def _initializers(out: onnx.ModelProto, view: GraphView, names: Names, t: TensorPlan, kernel: str,
                  half: bool) -> list[str]:
    """Packed weight, scales and (asymmetric) zero points of one weight, added to ``out``;
    their names (zero points "" when symmetric)."""
    array = view.array(t.name)
    q = blocks_of(t, array)
    scales = q.scales.astype(np.float16 if half else np.float32)
    if kernel == KERNEL:
        data, scales, zps = int4.matmul_nbits_b(q.codes, q.block_size), scales.reshape(-1), \
            int4.packed_zero_points(q.zero_points).reshape(-1)
    else:
        data, zps = int4.pack_nibbles(q.codes), int4.packed_zero_points(q.zero_points)
    base = f"{t.name}_int4" + ("_fp16" if half else "")
    made = [names.fresh(base), names.fresh(f"{base}_scales")]
    tensors = [numpy_helper.from_array(data, made[0]), numpy_helper.from_array(scales, made[1])]
    if t.symmetric:
        made.append("")
    else:
        made.append(names.fresh(f"{base}_zero_points"))
        tensors.append(numpy_helper.from_array(zps, made[2]))
    out.graph.initializer.extend(tensors)
    return made


def _nodes(node: onnx.NodeProto, key: str, decided, made: list[str], t: TensorPlan, view: GraphView,
           names: Names) -> list[onnx.NodeProto]:
    data, scales, zps = made
    if decided.kernel == GATHER_KERNEL:
        return [helper.make_node(GATHER_KERNEL, [data, node.input[1], scales] + ([zps] if zps else []),
                                 [node.output[0]], name=key, domain=qdq.MS_DOMAIN, bits=int4.BITS,
                                 block_size=t.granularity.size, gather_axis=0, quantize_axis=1)]
    dims = tuple(view.initializers[t.name].dims)
    k, n = (dims[0], dims[1]) if t.granularity.axis == 0 else (dims[1], dims[0])
    output = names.fresh(f"{node.output[0]}_nobias") if decided.bias else node.output[0]
    matmul = helper.make_node(KERNEL, [node.input[0], data, scales] + ([zps] if zps else []), [output], name=key,
                              domain=qdq.MS_DOMAIN, K=k, N=n, bits=int4.BITS, block_size=t.granularity.size,
                              accuracy_level=ACCURACY_LEVEL)
    if not decided.bias:
        return [matmul]
    return [matmul, helper.make_node("Add", [output, decided.bias], [node.output[0]],
                                     name=names.fresh(f"{key}_bias"))]


def _drop_unread(model: onnx.ModelProto, originals: set[str]) -> None:
    """The float originals of quantized weights that nothing reads any more (subgraphs included)."""
    used = reads_of(list(model.graph.node)) | {o.name for o in model.graph.output}
    inits = model.graph.initializer
    removed = set()
    for i in reversed(range(len(inits))):  # in place: the kept tensors are not copied again
        if inits[i].name in originals and inits[i].name not in used:
            removed.add(inits[i].name)
            del inits[i]
    qdq.drop_stale_inputs(model.graph, removed)
