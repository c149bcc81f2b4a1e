"""Pre-processing passes: small functions, model in, (new model, note) out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import model as model_io
from ..graph import GraphView, infer_shapes, reads_of


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    notes: tuple[str, ...]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _nodes_to_initializers(model: onnx.ModelProto, value_of) -> tuple[onnx.ModelProto, int]:
    """Replace every node for which ``value_of(node)`` gives an array by an initializer
    holding it under the node's output name; return the new model and the count."""
    m = _copy(model)
    keep, moved = [], 0
    for node in m.graph.node:
        value = value_of(node)
        if value is None:
            keep.append(node)
            continue
        m.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        moved += 1
    if not moved:
        return model, 0
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m, moved


def constants_to_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """``Constant`` nodes (as some exporters write weights) become initializers,
    so that the planner quantizes them as weights."""
    m, moved = _nodes_to_initializers(model, _constant_value)
    return m, (f"{moved} Constant nodes turned into initializers" if moved else None)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return model_io.tensor_array(attr.t)
    simple = {"value_float": np.float32, "value_int": np.int64}
    lists = {"value_floats": np.float32, "value_ints": np.int64}
    if attr.name in simple:
        return np.array(helper.get_attribute_value(attr), dtype=simple[attr.name])
    if attr.name in lists:
        return np.array(helper.get_attribute_value(attr), dtype=lists[attr.name])
    return None


FOLD_DENY = {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike",
             "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan"}
FOLD_MAX_ELEMENTS = 1 << 24


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Evaluate nodes whose inputs are all constants (e.g. a transposed weight),
    with onnx's reference evaluator, and store the results as initializers."""
    m = _copy(model)
    values = {t.name: t for t in m.graph.initializer}
    outputs = {o.name for o in m.graph.output}
    keep, folded = [], 0
    for node in m.graph.node:
        inputs = [i for i in node.input if i]
        if (node.domain not in ("", "ai.onnx") or node.op_type in FOLD_DENY or not inputs
                or not all(i in values for i in inputs) or any(o in outputs for o in node.output)):
            keep.append(node)
            continue
        from onnx.reference import ReferenceEvaluator  # imported only when a node can be folded
        result = _evaluate(ReferenceEvaluator, node, values, m)
        if result is None:
            keep.append(node)
            continue
        for name, arr in zip(node.output, result):
            values[name] = numpy_helper.from_array(np.asarray(arr), name)
            m.graph.initializer.append(values[name])
        folded += 1
    if not folded:
        return model, None
    del m.graph.node[:]
    m.graph.node.extend(keep)
    _drop_unused_initializers(m)
    return m, f"folded {folded} nodes with constant inputs"


def _evaluate(evaluator, node, values, m) -> list | None:
    try:
        if sum(int(np.prod(values[i].dims)) for i in node.input if i) > FOLD_MAX_ELEMENTS:
            return None  # decided from the shapes, before reading any weight
        feeds = {i: model_io.tensor_array(values[i]) for i in node.input if i}
        graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(k, values[k].data_type, None)
                                                   for k in feeds],
                                  [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                                   for o in node.output if o])
        tiny = helper.make_model(graph, opset_imports=list(m.opset_import))
        out = evaluator(tiny).run(None, feeds)
        if any(np.asarray(o).size > FOLD_MAX_ELEMENTS for o in out):
            return None
        return out
    except Exception:
        return None


def _drop_unused_initializers(m: onnx.ModelProto) -> None:
    used = reads_of(m.graph.node) | {o.name for o in m.graph.output}  # subgraphs read outer names too
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    inits = {t.name for t in keep}
    all_inits = inits
    kept_inputs = [i for i in m.graph.input if i.name in used or i.name not in all_inits]
    del m.graph.input[:]
    m.graph.input.extend(kept_inputs)


def fold_known_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """``Shape`` of a tensor whose shape is fully known becomes a constant (used on
    models whose inputs were given concrete shapes, e.g. to count MACs)."""
    view = GraphView(model)

    def value_of(node):
        shape = view.shape(node.input[0]) if node.op_type == "Shape" else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        start, end = view.attr(node, "start", 0), view.attr(node, "end", None)
        return np.array(shape[start:end], dtype=np.int64)

    m, folded = _nodes_to_initializers(model, value_of)
    return m, (f"folded {folded} Shape nodes" if folded else None)


def resolve_static_shapes(model: onnx.ModelProto, rounds: int = 4) -> onnx.ModelProto:
    """Alternate shape inference, Shape folding and constant folding until shapes settle."""
    for _ in range(rounds):
        model, _ = infer_shapes(model)
        model, changed = fold_known_shapes(model)
        if not changed:
            break
        model, _ = fold_constants(model)
    return model


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Conv -> BatchNormalization (inference, constant statistics) becomes one Conv."""
    m = _copy(model)
    view = GraphView(m)
    inits = {t.name: t for t in m.graph.initializer}
    remove, folded = set(), 0
    for conv in m.graph.node:
        if conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        bn = view.sole_consumer(conv.output[0])
        if bn is None or bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        if not all(i in inits for i in bn.input[1:5]):
            continue
        _fold_bn_into(conv, bn, inits, m, view)
        remove.add(view.node_name(bn))
        folded += 1
    if not folded:
        return model, None
    _remove_nodes(m, view, remove)
    return m, f"folded {folded} BatchNormalization nodes into Conv"


def _remove_nodes(m: onnx.ModelProto, view: GraphView, names: set[str]) -> None:
    keep = [n for n in m.graph.node if view.node_name(n) not in names]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    _drop_unused_initializers(m)


def _fold_bn_into(conv, bn, inits, m, view) -> None:
    scale, beta, mean, var = (model_io.tensor_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
    eps = view.attr(bn, "epsilon", 1e-5)
    factor = scale / np.sqrt(var + eps)
    w = model_io.tensor_array(inits[conv.input[1]]).astype(np.float64)
    b = model_io.tensor_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
        else np.zeros(w.shape[0])
    new_w = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
    new_b = ((b - mean) * factor + beta).astype(np.float32)
    w_name, b_name = f"{conv.input[1]}_bnfolded", f"{conv.output[0]}_bias_bnfolded"
    m.graph.initializer.extend([numpy_helper.from_array(new_w, w_name), numpy_helper.from_array(new_b, b_name)])
    inputs = [conv.input[0], w_name, b_name]
    del conv.input[:]
    conv.input.extend(inputs)
    conv.output[0] = bn.output[0]


def fold_pad_into_conv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Pad(constant 0, spatial dims only) -> Conv becomes the Conv's own ``pads``, so
    that DequantizeLinear feeds the Conv directly and onnxruntime can fuse it."""
    m = _copy(model)
    view = GraphView(m)
    inits = {t.name: t for t in m.graph.initializer}
    remove, folded = set(), 0
    for pad in m.graph.node:
        conv = view.sole_consumer(pad.output[0]) if pad.op_type == "Pad" else None
        if conv is None or conv.op_type != "Conv" or conv.input[0] != pad.output[0]:
            continue
        pads = _zero_spatial_pads(pad, inits, view)
        if pads is None or view.attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        _merge_pads(conv, pads, pad.input[0])
        remove.add(view.node_name(pad))
        folded += 1
    if not folded:
        return model, None
    _remove_nodes(m, view, remove)
    return m, f"folded {folded} zero Pad nodes into the following Conv"


def _zero_spatial_pads(pad, inits, view) -> list[int] | None:
    mode = view.attr(pad, "mode", b"constant")
    if mode not in (b"constant", "constant") or len(pad.input) < 2 or pad.input[1] not in inits:
        return None
    if len(pad.input) > 2 and pad.input[2]:
        if pad.input[2] not in inits or np.any(model_io.tensor_array(inits[pad.input[2]]) != 0):
            return None
    if len(pad.input) > 3 and pad.input[3]:
        return None
    pads = model_io.tensor_array(inits[pad.input[1]]).astype(int).tolist()
    rank = len(pads) // 2
    if rank < 3 or any(pads[i] != 0 or pads[i + rank] != 0 for i in range(2)) or min(pads) < 0:
        return None
    return pads[2:rank] + pads[rank + 2:]


def _merge_pads(conv, extra: list[int], new_input: str) -> None:
    current = None
    for a in conv.attribute:
        if a.name == "pads":
            current = list(a.ints)
            conv.attribute.remove(a)
            break
    current = current or [0] * len(extra)
    conv.attribute.append(helper.make_attribute("pads", [a + b for a, b in zip(current, extra)]))
    conv.input[0] = new_input


def upcast_half(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    from .half import upcast
    return upcast(model)


def einsum_as_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    from .einsum import rewrite_einsum
    return rewrite_einsum(model)


def sort_nodes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Nodes in topological order (ONNX requires it; some converters, onnxruntime's own fp16
    converter among them, append nodes out of order, and onnxruntime accepts it). Bodies first,
    then each graph by its producers; a graph with a cycle or reads of unknown names keeps
    its order (the checker or onnxruntime then names the problem)."""
    m = _copy(model)
    moved = _sort_graph(m.graph)
    if not moved:
        return model, None
    return m, f"nodes were not in topological order: sorted ({moved} graph(s))"


def _sort_graph(g: onnx.GraphProto) -> int:
    from ..graph.view import subgraph_reads
    moved = 0
    for n in g.node:
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                moved += _sort_graph(sub)
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[t] for t in list(n.input) + sorted(subgraph_reads(n)) if t in producer} - {i}
            for i, n in enumerate(nodes)]
    if all(d < i for i, deps_i in enumerate(deps) for d in deps_i):
        return moved
    readers: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, d in enumerate(deps):
        for j in d:
            readers[j].append(i)
    waiting = [len(d) for d in deps]
    import heapq
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)  # the original position first: a sorted graph stays as it was
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        return moved  # a cycle: left for the checker to report
    del g.node[:]
    g.node.extend(nodes[i] for i in order)
    return moved + 1


def separate_subgraph_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    from ..subgraphs import separate_names
    return separate_names(model)


def upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    return model_io.ensure_opset(model)


def shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """onnx's shape inference; report how many activations still lack a type."""
    inferred, note = infer_shapes(model)
    view = GraphView(inferred)
    missing = [o for n in view.nodes for o in n.output if o and view.elem_type(o) is None]
    if missing:
        extra = f"shape inference left {len(missing)} tensors without a type (e.g. {missing[0]}); carrying on with what is known"
        note = f"{note}; {extra}" if note else extra
    return inferred, note


ALL_PASSES = (upgrade_opset, constants_to_initializers, einsum_as_matmul, fold_constants, fold_batchnorm, fold_pad_into_conv)


def run_all(model: onnx.ModelProto, enabled: bool = True) -> PassResult:
    """fp16/bf16 upcast and opset upgrade always (QDQ needs 13); the rest only when
    ``enabled``; shapes last."""
    notes = []
    for p in (sort_nodes, upcast_half, separate_subgraph_names) + (ALL_PASSES if enabled else (upgrade_opset,)):
        model, note = p(model)
        if note:
            notes.append(note)
    model, note = shapes(model)
    if note:
        notes.append(note)
    return PassResult(model, tuple(notes))
