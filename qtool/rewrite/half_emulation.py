"""The fp16 model's numbers, computed on a CPU as a GPU would hold them.

onnxruntime's CPU EP has no fp16 kernel for most ops; its InsertCastTransformer runs them in
float32 and drops the Casts between two such ops ("InsertedPrecisionFreeCast"): an Exp whose
output overflows fp16 feeds the next op in float32 there, and the overflow never shows
(checked on onnxruntime 1.31.1: a hand-built softmax of logits up to 20 stays finite on the
CPU EP in fp16). The CUDA EP stores every fp16 tensor in fp16. So the keep list is measured on
this emulation instead: the model stays float32, and every value the fp16 model holds in fp16
is rounded to fp16 there (a Cast to fp16 and back, which onnxruntime keeps): each output of an
fp16 node, each float32 activation an fp16 node reads, the weights of fp16 nodes (saturated at
±65504, as the fp16 model stores them), the model's inputs and outputs when they are fp16.
Compute inside a kernel stays float32 (cuBLAS and onnxruntime's CUDA reductions and
normalisations accumulate fp16 in float32), so this is rounding and overflow of stored
values, which is where fp16 models go wrong.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .. import model as model_io
from ..graph import reads_of
from ..plans import Plan
from .half_nodes import _saturated, fp16_slots, half_nodes
from .half_ops import FLOAT, HALF, elem_types, opset_of
from .names import Names


def emulate(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """A float32 copy of ``model`` whose values are rounded to fp16 where ``plan``'s fp16 model
    holds fp16 (main graph; bodies are emulated on their own, like the rewrite)."""
    if not half_nodes(plan) and not plan.io_fp16:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    opset = opset_of(out)
    types = elem_types(g, opset)
    fp16 = fp16_slots(g, plan, opset, types)
    names = Names(out)
    inits = {t.name: t for t in g.initializer}
    rounded: dict[str, str] = {}  # tensor -> the name of its fp16-rounded value
    body = []

    def round_trip(src: str, dst: str) -> list:
        mid = names.fresh(f"{dst}_as_fp16")
        return [helper.make_node("Cast", [src], [mid], to=HALF, name=names.fresh(f"{dst}_to_fp16")),
                helper.make_node("Cast", [mid], [dst], to=FLOAT, name=names.fresh(f"{dst}_rounded"))]

    def rounded_input(t: str) -> str:
        if t not in rounded:
            rounded[t] = names.fresh(f"{t}_fp16_rounded")
            if t in inits:
                value = _saturated(model_io.tensor_array(inits[t])).astype("float32")
                g.initializer.append(numpy_helper.from_array(value, rounded[t]))
            else:
                body.extend(round_trip(t, rounded[t]))
        return rounded[t]

    half_io = [i.name for i in g.input if plan.io_fp16 and i.name not in inits and types.get(i.name) == FLOAT]
    half_io_rounded = {rounded_input(t) for t in half_io}
    for idx, node in enumerate(g.node):
        slots = fp16.get(idx)
        for k, t in enumerate(node.input):
            if t in half_io:
                node.input[k] = rounded[t]
        after = []
        if slots is not None:
            for k in slots.inputs:
                if node.input[k] not in half_io_rounded:
                    node.input[k] = rounded_input(node.input[k])
            for k in slots.outputs:
                exact = names.fresh(f"{node.output[k]}_exact")
                after.extend(round_trip(exact, node.output[k]))
                rounded[node.output[k]] = node.output[k]  # its readers see the rounded value already
                node.output[k] = exact
        body.append(node)
        body.extend(after)
    if plan.io_fp16:
        produced = {o: n for n in body for o in n.output}
        for o in g.output:
            if types.get(o.name) == FLOAT and o.name not in rounded and o.name in produced:
                exact = names.fresh(f"{o.name}_exact")
                node = produced[o.name]
                node.output[list(node.output).index(o.name)] = exact
                for n in body:
                    n.input[:] = [exact if i == o.name else i for i in n.input]
                body.extend(round_trip(exact, o.name))
    del g.node[:]
    g.node.extend(body)
    read = reads_of(body) | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in read or t.name not in rounded]  # originals of rounded copies
    del g.initializer[:]
    g.initializer.extend(keep)
    return out
