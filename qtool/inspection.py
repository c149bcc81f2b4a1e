"""What a model is: IO, opsets, parameters, size, MACs per op type, what qtool would quantize."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from .graph import GraphView, tensor_shape

MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple


@dataclass(frozen=True)
class InspectReport:
    path: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    parameters: int
    size_bytes: int
    macs: dict[str, int]
    op_types: dict[str, int]
    quantizable_nodes: int
    nodes: int
    blockers: tuple[str, ...]
    shapes_used: dict[str, tuple]
    target: object = None  # qtool.targets.TargetReport with --target

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.target is None:
            d.pop("target")
        return d

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())


def _dtype_name(elem_type: int) -> str:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def io_info(view: GraphView, names) -> tuple[TensorInfo, ...]:
    out = []
    for name in names:
        vi = view.value_info.get(name)
        shape = tensor_shape(vi) if vi is not None else None
        out.append(TensorInfo(name, _dtype_name(view.elem_type(name) or 0), tuple(shape or ())))
    return tuple(out)


def concrete_model(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[onnx.ModelProto, dict]:
    """Copy with every input dim fixed: from ``shapes``, else symbolic/unknown dims -> 1."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    inputs = [i.name for i in m.graph.input if i.name not in inits]
    unknown = [name for name in shapes if name not in inputs]
    if unknown:
        raise ValueError(f"--shape {unknown[0]}: the model has no input of that name (inputs: {', '.join(inputs)})")
    used = {}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        given = shapes.get(inp.name)
        if given is not None and len(given) != len(dims):
            raise ValueError(f"--shape {inp.name}: rank {len(given)} but the model input has rank {len(dims)}")
        for i, d in enumerate(dims):
            if given is not None and d.HasField("dim_value") and d.dim_value != given[i]:
                raise ValueError(f"--shape {inp.name}: dim {i} is fixed at {d.dim_value} in the model, "
                                 f"not {given[i]}")
            value = given[i] if given is not None else (d.dim_value if d.HasField("dim_value") else 1)
            d.Clear()
            d.dim_value = int(value)
        used[inp.name] = tuple(d.dim_value for d in dims)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    return m, used


def static_view(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[GraphView, dict]:
    """A view of ``model`` with concrete input shapes and every shape it implies resolved."""
    from .preprocess.passes import resolve_static_shapes
    fixed, used = concrete_model(model, shapes)
    return GraphView(resolve_static_shapes(fixed)), used


def macs_by_node(view: GraphView, unknown_as_one: bool = False) -> dict[str, int]:
    """MACs of every Conv/ConvTranspose/MatMul/Gemm node whose shapes are known.
    ``unknown_as_one``: count a dimension shape inference left symbolic as 1 (a batch that a
    Reshape made unknown), for MAC shares between nodes rather than absolute counts."""
    out = {}
    for node in view.nodes:
        if node.op_type in MAC_OPS:
            value = _node_macs(node, view, unknown_as_one)
            if value is not None:
                out[view.node_name(node)] = value
    return out


def macs_per_op(view: GraphView) -> dict[str, int]:
    totals: Counter = Counter()
    for name, value in macs_by_node(view).items():
        totals[view.by_name[name].op_type] += value
    return dict(totals)


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _node_macs(node, view: GraphView, unknown_as_one: bool = False) -> int | None:
    shape = view.shape if not unknown_as_one else (
        lambda t: None if view.shape(t) is None else tuple(d if isinstance(d, int) else 1 for d in view.shape(t)))
    out = shape(node.output[0])
    w = shape(node.input[1]) if len(node.input) > 1 else None
    a = shape(node.input[0])
    if not (_known(out) and _known(w) and _known(a)):
        return None
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if node.op_type == "ConvTranspose":
        group = view.attr(node, "group", 1)
        return int(np.prod(a)) * int(w[1]) * int(np.prod(w[2:])) if group else None
    if node.op_type == "Gemm":
        k = a[0] if view.attr(node, "transA", 0) else a[-1]
        return int(np.prod(out)) * int(k)
    if node.op_type == "MatMul":
        return int(np.prod(out)) * int(a[-1])
    return None


def count_parameters(view: GraphView) -> int:
    return int(sum(int(np.prod(t.dims)) for t in view.graph.initializer))


def inspect_model(model: onnx.ModelProto, path: str, size_bytes: int, plan, shapes: dict | None = None,
                  notes: tuple[str, ...] = (), prepared: onnx.ModelProto | None = None,
                  target=None) -> InspectReport:
    """Build the report. ``plan`` is the planner's uncalibrated plan for the
    model; MACs are counted on ``prepared`` (constants folded, so that shapes
    computed by small subgraphs, e.g. Pad amounts, are known)."""
    view = GraphView(model)
    blockers = list(notes)
    try:
        fixed_view, used = static_view(prepared if prepared is not None else model, shapes or {})
    except ValueError as exc:
        raise _shape_error(str(exc))
    missing = [n.output[0] for n in fixed_view.nodes if n.op_type in MAC_OPS
               and not _known(fixed_view.shape(n.output[0]))]
    if missing:
        blockers.append(f"{len(missing)} Conv/MatMul/Gemm outputs have no inferred shape (MACs not counted), e.g. {missing[0]}")
    opset = view.opset("")
    if opset < 13:
        blockers.append(f"opset {opset} < 13: will be upgraded for per-channel QDQ")
    blockers += blocked_ops(plan)
    return InspectReport(
        path=path, ir_version=model.ir_version,
        opsets={(i.domain or "ai.onnx"): i.version for i in model.opset_import},
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=io_info(view, view.graph_inputs), outputs=io_info(view, [o.name for o in view.graph.output]),
        parameters=count_parameters(view), size_bytes=size_bytes, macs=macs_per_op(fixed_view),
        op_types=dict(Counter(n.op_type for n in view.nodes).most_common()),
        quantizable_nodes=len(plan.all_quantized_nodes()), nodes=len(plan.all_nodes()),
        blockers=tuple(blockers), shapes_used=used, target=target)


def blocked_ops(plan) -> list[str]:
    """One line per op type that people expect quantized but that stays float, with why."""
    from .planner import BLOCKED
    groups: dict[tuple[str, str], list[str]] = {}
    for n in plan.all_nodes():
        if n.op_type in BLOCKED and not n.quantized:
            groups.setdefault((n.op_type, n.reason), []).append(n.name)
    return [f"{len(names)} {op} node(s) stay float ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): "
            f"{reason}" for (op, reason), names in groups.items()]


def _shape_error(msg):
    from .errors import QtoolError
    return QtoolError(msg)


def format_report(r: InspectReport) -> str:
    def dims(shape):
        return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    lines = [f"model       {r.path}", f"ir_version  {r.ir_version}",
             f"opsets      {', '.join(f'{k} {v}' for k, v in r.opsets.items())}",
             f"producer    {r.producer or '-'}", "inputs:"]
    lines += [f"  {t.name}: {t.dtype} {dims(t.shape)}" for t in r.inputs]
    lines.append("outputs:")
    lines += [f"  {t.name}: {t.dtype} {dims(t.shape)}" for t in r.outputs]
    lines.append(f"parameters  {r.parameters:,}")
    lines.append(f"size        {r.size_bytes:,} bytes")
    shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in r.shapes_used.items())
    lines.append(f"MACs        {r.total_macs:,} (input shapes {shapes})")
    lines += [f"  {op}: {n:,}" for op, n in r.macs.items()]
    lines.append("op types    " + ", ".join(f"{k} {v}" for k, v in r.op_types.items()))
    lines.append(f"quantizable {r.quantizable_nodes} of {r.nodes} nodes (after pre-processing) would be quantized")
    for b in r.blockers:
        lines.append(f"note: {b}")
    if r.target is not None:
        from .targets import format_target
        lines += format_target(r.target)
    return "\n".join(lines)
