"""fp16 and bf16 models: computed in float32 inside, their interface and storage kept.

onnxruntime's CPU EP has no fp16 Conv/Gemm kernels on x86-64 and its QDQ selectors
fuse no fp16 QuantizeLinear/DequantizeLinear (checked on onnxruntime 1.31.1: an fp16
DQ -> Conv -> Q group stays DequantizeLinear -> Cast -> Conv -> Cast -> QuantizeLinear
in its optimised graph, because InsertCastTransformer runs the Conv in float32). An
int8 QDQ model around fp16 tensors would run as fake quantization, slower than the
fp16 model. So qtool upcasts the graph to float32 (:func:`upcast`), quantizes that with
float32 scales, so that onnxruntime fuses it into integer kernels, and then
(:func:`restore_storage`) stores every weight left float in the model's own half type
again behind a Cast, so the file keeps the interface and is no larger than the source.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import model as model_io
from ..rewrite.names import fresh as _fresh

FLOAT = onnx.TensorProto.FLOAT
HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
KIND = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
_DTYPE_ATTRS = {("Cast", "to"), ("EyeLike", "dtype"), ("RandomNormal", "dtype"), ("RandomUniform", "dtype"),
                ("RandomNormalLike", "dtype"), ("RandomUniformLike", "dtype"), ("Bernoulli", "dtype")}
_TENSOR_ATTRS = {("Constant", "value"), ("ConstantOfShape", "value")}


def half_type(model: onnx.ModelProto) -> int | None:
    """The half type (FLOAT16 or BFLOAT16) the model computes in, or None for a float32 model:
    the type most of its float initializers and graph inputs have."""
    counts = {t: 0 for t in HALF + (FLOAT,)}
    for t in model.graph.initializer:
        if t.data_type in counts:
            counts[t.data_type] += 1
    for vi in list(model.graph.input) + list(model.graph.output):
        et = vi.type.tensor_type.elem_type
        if et in counts:
            counts[et] += 1
    best = max(HALF, key=counts.get)
    return best if counts[best] > counts[FLOAT] else None


def upcast(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """A float32 copy of an fp16/bf16 model: initializers, constants, type attributes and
    recorded types become float32 (subgraphs too); each half graph input gets a Cast to
    float32 and each half graph output a Cast back, so the model's interface is unchanged."""
    kind = half_type(model)
    if kind is None:
        return model, None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    used = _names(g)
    inits = {t.name for t in g.initializer}
    head, tail = [], []
    for vi in g.input:
        if vi.name in inits or vi.type.tensor_type.elem_type not in HALF:
            continue
        new = _fresh(used, f"{vi.name}_float32")
        _rename_reads(g, vi.name, new)
        head.append(helper.make_node("Cast", [vi.name], [new], to=FLOAT, name=_fresh(used, f"{vi.name}_to_float32")))
    produced = {o: n for n in g.node for o in n.output}
    inputs = {i.name for i in g.input}
    for vi in g.output:
        et = vi.type.tensor_type.elem_type
        if et not in HALF or vi.name not in produced or vi.name in inputs:
            continue
        new = _fresh(used, f"{vi.name}_float32")
        _rename_reads(g, vi.name, new)
        node = produced[vi.name]
        node.output[list(node.output).index(vi.name)] = new
        tail.append(helper.make_node("Cast", [new], [vi.name], to=et, name=_fresh(used, f"{vi.name}_to_{KIND[et]}")))
    _upcast_graph(g, top=True)
    for vi in g.input:
        if vi.name in inits and vi.type.tensor_type.elem_type in HALF:
            vi.type.tensor_type.elem_type = FLOAT  # IR < 4 lists weights as inputs too
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    return m, (f"{KIND[kind]} model: computed in float32 inside (onnxruntime's CPU EP runs fp16 Conv/MatMul "
               f"through Casts to float32 and fuses no fp16 Q/DQ), inputs and outputs stay {KIND[kind]}; "
               f"weights left float are stored as {KIND[kind]} again")


def _upcast_graph(g: onnx.GraphProto, top: bool) -> None:
    for i, t in enumerate(g.initializer):
        if t.data_type in HALF:
            g.initializer[i].CopyFrom(_float32(t))
    infos = list(g.value_info) + ([] if top else list(g.input) + list(g.output))
    for vi in infos:
        tt = vi.type.tensor_type
        if tt.elem_type in HALF:
            tt.elem_type = FLOAT
    for n in g.node:
        for a in n.attribute:
            if (n.op_type, a.name) in _DTYPE_ATTRS and a.i in HALF:
                a.i = FLOAT
            elif (n.op_type, a.name) in _TENSOR_ATTRS and a.t.data_type in HALF:
                a.t.CopyFrom(_float32(a.t))
            elif a.type == onnx.AttributeProto.GRAPH:
                _upcast_graph(a.g, top=False)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _upcast_graph(sub, top=False)


def _float32(t: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(model_io.tensor_array(t).astype(np.float32), t.name)


def restore_storage(model: onnx.ModelProto, kind: int) -> tuple[onnx.ModelProto, int]:
    """Store each float32 initializer that only float nodes read (a weight left float:
    not a scale, which Q/DQ and QLinear kernels read) in ``kind`` again, behind a Cast
    to float32 that onnxruntime folds at load time. Changes ``model`` in place."""
    g = model.graph
    readers: dict[str, set[str]] = {}
    for n in _all_nodes(g):
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}")
    outputs = {o.name for o in g.output} | {i.name for i in g.input}  # IR < 4 lists weights as inputs
    used = _names(g)
    casts, count = [], 0
    for i, t in enumerate(g.initializer):
        ops = readers.get(t.name, set())
        if t.data_type != FLOAT or not ops or t.name in outputs or any(_integer_op(op) for op in ops):
            continue
        stored = _fresh(used, f"{t.name}_{KIND[kind]}")
        value = model_io.tensor_array(t)
        half = _exact_half(value, kind, stored)
        if half is None:  # float32 in the source (e.g. Resize scales), or folded: stays float32
            continue
        casts.append(helper.make_node("Cast", [stored], [t.name], to=FLOAT, name=_fresh(used, f"{t.name}_to_float32")))
        g.initializer[i].CopyFrom(half)
        count += 1
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model, count


def _exact_half(value: np.ndarray, kind: int, name: str) -> onnx.TensorProto | None:
    """``value`` in ``kind`` when that type holds it exactly (as every upcast half weight
    does), else None: a float32 constant of the source keeps its precision."""
    value = np.ascontiguousarray(value, dtype=np.float32)
    if kind == onnx.TensorProto.FLOAT16:
        with np.errstate(over="ignore"):
            half = value.astype(np.float16)
        return numpy_helper.from_array(half, name) if np.array_equal(half.astype(np.float32), value) else None
    bits = value.view(np.uint32)
    if np.any(bits & 0xFFFF):
        return None
    t = onnx.TensorProto(name=name, data_type=kind, dims=value.shape)
    t.raw_data = (bits >> 16).astype("<u2").tobytes()
    return t


def _integer_op(op: str) -> bool:
    low = op.lower()
    return "quantize" in low or "qlinear" in low or "integer" in low or low.endswith("qgemm")


def _all_nodes(g: onnx.GraphProto):
    for n in g.node:
        yield n
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                yield from _all_nodes(sub)


def _names(g: onnx.GraphProto) -> set[str]:
    used = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    for n in _all_nodes(g):
        used.update(n.input)
        used.update(n.output)
        used.add(n.name)
    return used



def _rename_reads(g: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` in ``g`` and in its subgraphs, unless a subgraph defines its own."""
    for n in g.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new
        rename_in_bodies(n, old, new)


def rename_in_bodies(node: onnx.NodeProto, old: str, new: str) -> None:
    """The implicit reads of ``old`` in ``node``'s subgraphs (those not shadowed by their own names)."""
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            own = {i.name for i in sub.input} | {t.name for t in sub.initializer} | \
                  {o for sn in sub.node for o in sn.output}
            if old not in own:
                _rename_reads(sub, old, new)
                for o in sub.output:
                    if o.name == old:
                        o.name = new
