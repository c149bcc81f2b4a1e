"""GraphView: producers, consumers, initializers and inferred types of one graph.

Built once from a model and never mutated; planners and reports query it.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import onnx

from .. import model as model_io

FLOAT = onnx.TensorProto.FLOAT


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """onnx shape inference; on failure keep the model and return a note. A model whose
    weights stay on disk (or over 2 GiB) goes by path (:func:`infer_shapes_by_path`)."""
    try:
        if model_io.by_path(model):
            return infer_shapes_by_path(model), None
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                 data_prop=True), None
    except Exception as exc:
        return model, f"shape inference failed ({str(exc).splitlines()[0][:160]}); planning with the shapes the model records"


def infer_shapes_by_path(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes_path`` on a temporary copy of the graph (weights
    marked external, no bytes written: inference reads only their types and shapes); the
    inferred types are copied onto a copy of ``model``, whose tensors are left as they are."""
    with model_io.temp_model_file(model, with_data=False) as src:
        dst = src.with_name(src.name[:-len(".onnx")] + ".inferred.onnx")
        try:
            onnx.shape_inference.infer_shapes_path(str(src), str(dst), check_type=False, strict_mode=False,
                                                   data_prop=True)
            inferred = onnx.load(str(dst), load_external_data=False)
        finally:
            dst.unlink(missing_ok=True)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _copy_types(inferred.graph, out.graph)
    return out


def _copy_types(src: onnx.GraphProto, dst: onnx.GraphProto) -> None:
    """Value infos and output types shape inference wrote into ``src`` (subgraphs too)."""
    del dst.value_info[:]
    dst.value_info.extend(src.value_info)
    for a, b in zip(src.output, dst.output):
        b.CopyFrom(a)
    for n_src, n_dst in zip(src.node, dst.node):
        for a_src, a_dst in zip(n_src.attribute, n_dst.attribute):
            if a_src.HasField("g"):
                _copy_types(a_src.g, a_dst.g)
            for g_src, g_dst in zip(a_src.graphs, a_dst.graphs):
                _copy_types(g_src, g_dst)


def tensor_shape(vi: onnx.ValueInfoProto) -> tuple | None:
    """(dims...) with ints for known dims, names for symbolic ones, None for unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that ``node``'s subgraphs (If/Loop/Scan bodies) read implicitly."""
    reads: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                reads.update(i for i in list(n.input) + sorted(subgraph_reads(n)) if i and i not in local)
                local.update(n.output)
            reads.update(o.name for o in g.output if o.name not in local)
    return reads


def reads_of(nodes) -> set[str]:
    """Every name the nodes read, explicitly or from inside their subgraphs."""
    return {i for n in nodes for i in list(n.input) + sorted(subgraph_reads(n)) if i}


def node_name(node: onnx.NodeProto) -> str:
    """A node's name, or its op type and first output when it has none (the plan's key)."""
    return node.name or f"{node.op_type}({node.output[0]})"


class GraphView:
    """Lookup tables over ``model.graph`` (the main graph; subgraphs are opaque)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)

    @cached_property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.graph.initializer}

    @cached_property
    def producer(self) -> dict[str, onnx.NodeProto]:
        return {out: n for n in self.nodes for out in n.output if out}

    @cached_property
    def by_name(self) -> dict[str, onnx.NodeProto]:
        """Nodes by :meth:`node_name` (their name, or op type and first output)."""
        return {self.node_name(n): n for n in self.nodes}

    @cached_property
    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        table: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for name in set(i for i in n.input if i) | subgraph_reads(n):
                table.setdefault(name, []).append(n)
        return table

    @cached_property
    def value_info(self) -> dict[str, onnx.ValueInfoProto]:
        infos = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            infos[vi.name] = vi
        return infos

    @cached_property
    def graph_inputs(self) -> list[str]:
        inits = self.initializers
        return [i.name for i in self.graph.input if i.name not in inits]

    @cached_property
    def graph_outputs(self) -> set[str]:
        return {o.name for o in self.graph.output}

    def node_name(self, node: onnx.NodeProto) -> str:
        return node_name(node)

    def is_initializer(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray:
        """An initializer's value (read from its data file when the weights stay on disk)."""
        return model_io.tensor_array(self.initializers[name])

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return None
        return vi.type.tensor_type.elem_type or None

    def is_float(self, name: str) -> bool:
        return self.elem_type(name) == FLOAT

    def shape(self, name: str) -> tuple | None:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        vi = self.value_info.get(name)
        return tensor_shape(vi) if vi is not None else None

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and tensor not in self.graph_outputs:
            return users[0]
        return None

    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain == domain or (domain == "" and imp.domain == "ai.onnx"):
                return imp.version
        return 0
