"""Nodes the plan runs in fp16 (``--precision NAME=fp16``, ``--fallback fp16``).

After the rewriter, each such node reads fp16: its float32 weights become fp16 copies (the
float32 original stays for any other reader), its float32 activations go through one
Cast(to=FLOAT16) each, and each float32 output comes back through a Cast(to=FLOAT) under its
own name, so the rest of the graph is unchanged. On a GPU this is the fast float path; on the
CPU EP onnxruntime runs most fp16 ops through its own Casts, so there it buys accuracy, not speed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import GraphView
from ..plans import Plan
from ..types import Precision
from .names import Names

#: Ops whose float inputs and outputs all share one type T, so fp16 is a valid choice for all of them.
HALF_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid",
            "Tanh", "Softmax", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "HardSigmoid",
            "HardSwish", "Erf", "LayerNormalization", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")

FLOAT = onnx.TensorProto.FLOAT
HALF = onnx.TensorProto.FLOAT16


def half_nodes(plan: Plan) -> list[str]:
    return [n.name for n in plan.nodes if n.precision is Precision.FP16]


def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """Return ``model`` with the plan's fp16 nodes wrapped in Casts (``model`` itself when there are none)."""
    wanted = set(half_nodes(plan))
    if not wanted:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    view = GraphView(out)
    names = Names(out)
    inits = {t.name: t for t in out.graph.initializer}
    half_inits: dict[str, str] = {}
    casts: dict[str, str] = {}
    body = []
    for node in out.graph.node:
        if view.node_name(node) not in wanted:
            body.append(node)
            continue
        for i, t in enumerate(node.input):
            if not t:
                continue
            if t in inits and inits[t].data_type == FLOAT:
                if t not in half_inits:
                    value = numpy_helper.to_array(inits[t]).astype(np.float16)
                    half_inits[t] = names.fresh(f"{t}_fp16")
                    out.graph.initializer.append(numpy_helper.from_array(value, half_inits[t]))
                node.input[i] = half_inits[t]
            elif t not in inits and _is_float(view, t):
                if t not in casts:
                    casts[t] = names.fresh(f"{t}_fp16")
                    body.append(helper.make_node("Cast", [t], [casts[t]], to=HALF, name=names.fresh(f"{t}_to_fp16")))
                node.input[i] = casts[t]
        after = []
        for k, o in enumerate(node.output):
            if o and view.elem_type(o) in (FLOAT, None):
                half = names.fresh(f"{o}_fp16")
                node.output[k] = half
                after.append(helper.make_node("Cast", [half], [o], to=FLOAT, name=names.fresh(f"{o}_to_fp32")))
        body.append(node)
        body.extend(after)
    del out.graph.node[:]
    out.graph.node.extend(body)
    _drop_stale_value_info(out, wanted_outputs={n for n in body for n in n.output})
    _drop_unread(out, set(half_inits))
    return out


def _is_float(view: GraphView, tensor: str) -> bool:
    """A float32 activation; a DequantizeLinear's output (a shared weight another node reads
    quantized) has no recorded type but is float32."""
    elem = view.elem_type(tensor)
    if elem is None:
        producer = view.producer.get(tensor)
        return producer is not None and producer.op_type == "DequantizeLinear"
    return elem == FLOAT


def _drop_unread(model: onnx.ModelProto, originals: set[str]) -> None:
    """The float32 originals of fp16 copies that nothing reads any more (subgraphs included)."""
    from ..graph import reads_of
    from .qdq import drop_stale_inputs
    used = reads_of(list(model.graph.node)) | {o.name for o in model.graph.output}
    gone = {t.name for t in model.graph.initializer if t.name in originals and t.name not in used}
    keep = [t for t in model.graph.initializer if t.name not in gone]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    drop_stale_inputs(model.graph, gone)


def _drop_stale_value_info(model: onnx.ModelProto, wanted_outputs: set[str]) -> None:
    """Recorded types of renamed tensors are gone; those that remain still hold."""
    keep = [vi for vi in model.graph.value_info if vi.name in wanted_outputs]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
