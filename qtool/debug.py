"""Where the error comes from: per-node error of a QDQ model against its fp32 model.

For every quantized node (a node of the QDQ model that reads a DequantizeLinear) two
measures of its output against the fp32 model's value of the same tensor:

- *accumulated*: the value the quantized model computes there, every error upstream
  included;
- *isolated*: that node alone quantized, reading the fp32 model's values of its inputs
  through its own Q/DQ pairs (and its quantized weights), its output quantized as in the
  quantized model.

Both come from single streamed passes. The isolated measure runs one model: the fp32 graph
with a clone of every quantized group hung off it (``Q(x) -> DQ -> node -> Q -> DQ``, x the
fp32 tensor), which onnxruntime fuses into the same integer kernels as the quantized model, so
isolated errors are those of the kernels that will run. The accumulated measure runs the
quantized model with an extra DequantizeLinear on each QuantizeLinear's output as a graph
output (the fused groups stay fused). Only sums are kept per batch, so memory is flat in the
number of samples.

Nodes are matched by tensor names (the QDQ rewriter keeps every original name), so only the
two models are needed: the reference is prepared the same way ``quantize`` prepared it.

Range use per quantized activation: the share of the integer grid the data occupies, the share
of values clipped, and the outlier ratio, (max - min) / (p99.95 - p0.05): how much wider the
full range is than the central 99.9 % of the values (a few outlier channels give 3-10x).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from .graph import GraphView, node_name

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
DEBUG_FORMAT = "qtool.debug"
PREFIX = "qtool_dbg"


@dataclass(frozen=True)
class RangeUse:
    """One quantized activation: how well its grid fits the data."""

    tensor: str
    grid_use: float      # share of the integer grid between the data's min and max
    clipped: float       # share of values outside the grid's range
    outlier_ratio: float  # (max - min) / (p99.95 - p0.05); 1 = no outliers
    channel_ratio: float  # the widest channel's range / the median channel's (axis 1 from rank 4, else the last)


@dataclass(frozen=True)
class NodeError:
    name: str
    op_type: str
    output: str                 # the tensor compared (after a fused activation, if any)
    mac_share: float            # of the whole model's Conv/MatMul/Gemm MACs
    accumulated_sqnr: float     # dB
    accumulated_rel: float      # ||q - f|| / ||f||
    isolated_sqnr: float
    isolated_rel: float
    ranges: tuple[RangeUse, ...] = ()
    output_snr: float | None = None  # the model outputs' SNR with only this node quantized (--impact)
    applied: dict = field(default_factory=dict)  # from the plan: {algorithm: the gain it measured here, dB}

    @property
    def worst_range(self) -> RangeUse | None:
        return max(self.ranges, key=lambda r: (max(r.outlier_ratio, np.nan_to_num(r.channel_ratio)), r.clipped),
                   default=None)


@dataclass(frozen=True)
class DebugReport:
    reference: str
    candidate: str
    samples: int
    nodes: tuple[NodeError, ...]          # worst isolated SQNR first
    unmatched: tuple[str, ...] = ()        # quantized nodes that could not be measured, with why
    format: str = DEBUG_FORMAT

    def to_dict(self) -> dict:
        return _finite_json(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def node(self, name: str) -> NodeError | None:
        return next((n for n in self.nodes if n.name == name), None)


def _finite_json(value):
    """JSON has no inf: an error-free node's SQNR is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


# --- the groups of a QDQ model ---------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """A quantized node of the QDQ model and what surrounds it."""

    node: onnx.NodeProto
    chain: tuple[onnx.NodeProto, ...]  # float activations between it and its output's Q (a Relu)
    output: str                        # tensor compared against the fp32 model
    out_q: onnx.NodeProto | None       # the QuantizeLinear of ``output`` (None: a float output)


#: Float activations onnxruntime fuses into the kernel before them (the group's output follows them).
CHAIN_OPS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "HardSwish")
#: Integer kernels with a float output (no QuantizeLinear after them): quantized all the same.
FLOAT_OUTPUT_KERNELS = ("Conv", "MatMul", "Gemm", "ConvTranspose")


def groups(qmodel: onnx.ModelProto, reference_names: set[str],
           float_tensors: set[str] | None = None) -> tuple[list[Group], list[str]]:
    """The quantized nodes of ``qmodel`` whose output exists in the reference; and the rest, with why.

    A node is quantized when it reads a DequantizeLinear and either its output (after a fused
    activation) is quantized again or it is a Conv/MatMul/Gemm (an integer kernel with a float
    output). Float nodes that merely read a dequantized tensor (Shape, a float Mul) are not.
    ``float_tensors``: the reference's float32 tensors; a group whose output is not one is skipped.
    """
    view = GraphView(qmodel)
    found, skipped = [], []
    for node in view.nodes:
        if node.op_type in QDQ_OPS or not any(_op(view, i) == "DequantizeLinear" for i in node.input):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        chain, cur = [], node
        out_q = None
        while True:
            users = view.consumers.get(cur.output[0], [])
            q = next((u for u in users if u.op_type == "QuantizeLinear"), None)
            if q is not None:
                out_q = q
                break
            if (len(users) == 1 and len(chain) < 2 and users[0].op_type in CHAIN_OPS
                    and cur.output[0] not in view.graph_outputs
                    and all(i == cur.output[0] or i in view.initializers or not i for i in users[0].input)):
                cur = users[0]
                chain.append(cur)
                continue
            break
        if out_q is None and node.op_type not in FLOAT_OUTPUT_KERNELS:
            continue  # a float node reading a dequantized tensor
        why = _unsupported_input(view, node, reference_names)
        if why is None and cur.output[0] not in reference_names:
            why = f"its output {cur.output[0]!r} is not a tensor of the fp32 model"
        if why is None and float_tensors is not None and cur.output[0] not in float_tensors:
            why = f"its output {cur.output[0]!r} is not a float32 tensor"
        if why:
            skipped.append(f"{node_name(node)}: {why}")
            continue
        found.append(Group(node, tuple(chain), cur.output[0], out_q))
    for node in view.nodes:
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) and any(
                    n.op_type == "DequantizeLinear" for g in ([a.g] if a.g.node else list(a.graphs)) for n in g.node):
                skipped.append(f"{node_name(node)}/{a.name}: nodes inside subgraphs are not measured")
    return found, skipped


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """The main graph's float32 tensors, by the types shape inference recorded."""
    view = GraphView(model)
    names = {o for n in view.nodes for o in n.output if o} | set(view.graph_inputs) | set(view.initializers)
    return {t for t in names if view.elem_type(t) == onnx.TensorProto.FLOAT}


def _op(view: GraphView, tensor: str) -> str | None:
    p = view.producer.get(tensor)
    return p.op_type if p is not None else None


def _unsupported_input(view: GraphView, node, reference_names: set[str]) -> str | None:
    for i in node.input:
        if not i or i in view.initializers:
            continue
        p = view.producer.get(i)
        if p is not None and p.op_type == "DequantizeLinear":
            src = p.input[0]
            if src in view.initializers:
                continue
            q = view.producer.get(src)
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in reference_names:
                return f"input {i!r} is not a Q/DQ pair over a tensor of the fp32 model"
        elif i not in reference_names:
            return f"float input {i!r} is not a tensor of the fp32 model"
    return None


def tensor_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return ({i.name for i in g.input} | {t.name for t in g.initializer}
            | {o for n in g.node for o in n.output if o})


# --- the two measuring models ----------------------------------------------------------------

def isolated_model(reference: onnx.ModelProto, qmodel: onnx.ModelProto,
                   found: list[Group]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The fp32 graph plus a clone of every group reading fp32 values; node -> the clone's output."""
    qview = GraphView(qmodel)
    out = onnx.ModelProto()
    out.CopyFrom(reference)
    del out.opset_import[:]
    out.opset_import.extend(qmodel.opset_import)
    inits = out.graph.initializer
    outputs = {}
    for k, g in enumerate(found):
        pre = f"{PREFIX}/{k}/"
        copied: dict[str, str] = {}

        def const(name):
            if name not in copied:
                t = onnx.TensorProto()
                t.CopyFrom(qview.initializers[name])
                t.name = pre + name
                inits.append(t)
                copied[name] = t.name
            return copied[name]

        def clone(node, inputs, outs):
            c = onnx.NodeProto()
            c.CopyFrom(node)
            c.name = pre + node_name(node)
            del c.input[:]
            c.input.extend(inputs)
            del c.output[:]
            c.output.extend(outs)
            out.graph.node.append(c)

        done: dict[str, str] = {}

        def qdq_input(i):
            if i not in done:
                done[i] = _qdq_input(i)
            return done[i]

        def _qdq_input(i):
            if not i:
                return i
            if i in qview.initializers:
                return const(i)
            dq = qview.producer.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                return i  # an fp32 tensor of the reference
            src = dq.input[0]
            if src in qview.initializers:
                dq_in = const(src)
            elif src in done:
                dq_in = done[src]
            else:
                q = qview.producer[src]
                dq_in = done[src] = pre + src
                clone(q, [q.input[0]] + [const(x) for x in q.input[1:]], [dq_in])
            clone(dq, [dq_in] + [const(x) for x in dq.input[1:]], [pre + i])
            return pre + i

        clone(g.node, [qdq_input(i) for i in g.node.input], [pre + o if o else o for o in g.node.output])
        local = {o: pre + o for o in g.node.output if o}
        for m in g.chain:
            clone(m, [local.get(i) or (const(i) if i in qview.initializers else i) for i in m.input],
                  [pre + m.output[0]])
            local[m.output[0]] = pre + m.output[0]
        last = local[g.output]
        if g.out_q is not None:
            q = g.out_q
            qout = pre + q.output[0]
            clone(q, [last] + [const(x) for x in q.input[1:]], [qout])
            dq = helper.make_node("DequantizeLinear", [qout] + [const(x) for x in q.input[1:]], [pre + "iso"],
                                  name=pre + "iso_DequantizeLinear", domain=q.domain or None)
            out.graph.node.append(dq)
            last = pre + "iso"
        outputs[node_name(g.node)] = last
    return out, outputs


def exposed_model(qmodel: onnx.ModelProto, found: list[Group]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The quantized model with each group's output (as its consumers see it) as a graph output."""
    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    outputs = {}
    for k, g in enumerate(found):
        if g.out_q is None:
            outputs[node_name(g.node)] = g.output
            continue
        q = g.out_q
        name = f"{PREFIX}/acc/{k}"
        out.graph.node.append(helper.make_node("DequantizeLinear", [q.output[0]] + list(q.input[1:]), [name],
                                               name=name + "_DequantizeLinear", domain=q.domain or None))
        outputs[node_name(g.node)] = name
    return out, outputs


def perturbed_model(reference: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The fp32 model with ``t + d_t`` in place of each tensor ``t`` for every node after it, ``d_t``
    a graph input of t's shape: fed zeros, the fp32 model; fed one node's quantization error
    (isolated output - fp32), the model with only that node quantized. Returns (model, inputs)."""
    model = onnx.ModelProto()
    model.CopyFrom(reference)
    g = model.graph
    shapes = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    mixed, inputs, extra = {}, [], []
    for k, t in enumerate(tensors):
        d, m = f"{PREFIX}/delta/{k}", f"{PREFIX}/perturbed/{k}"
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(shapes[t]) if t in shapes else vi.CopyFrom(
            helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        vi.name = d
        g.input.append(vi)
        extra.append(helper.make_node("Add", [t, d], [m], name=m))
        mixed[t] = m
        inputs.append(d)
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in mixed:
                node.input[i] = mixed[name]
    result = _toposort(list(g.node) + extra, {i.name for i in g.input} | {t.name for t in g.initializer})
    del g.node[:]
    g.node.extend(result)
    return model, inputs


def _toposort(nodes: list, available: set[str]) -> list:
    """Kahn's algorithm, keeping the given order where it is already valid."""
    done, out, pending = set(available), [], list(nodes)
    while pending:
        rest = []
        progressed = False
        for n in pending:
            if all(not i or i in done for i in n.input):
                out.append(n)
                done.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise ValueError("cycle in the switched model")
        pending = rest
    return out


def output_sensitivity(reference: onnx.ModelProto, qmodel: onnx.ModelProto, batches, threads: int | None = None,
                       provider: str = "CPUExecutionProvider", disabled: tuple[str, ...] = ()) -> dict[str, float]:
    """For every quantized node: the model outputs' SNR (dB) against fp32 with only that node
    quantized (its inputs from fp32 through its own Q/DQ, as onnxruntime's integer kernel computes
    it). Per batch one run of the isolated model gives every node's error at its output; the
    perturbed fp32 model (:func:`perturbed_model`) then propagates each alone to the outputs."""
    from . import runtime
    from .calib.collect import augment
    from .errors import InternalError, ModelError
    found, _ = groups(qmodel, tensor_names(reference), float_tensors(reference))
    outputs = {o.name for o in reference.graph.output}
    tensors = list(dict.fromkeys(g.output for g in found if g.output not in outputs))
    iso_model, iso = isolated_model(reference, qmodel, found)
    pert, deltas = perturbed_model(reference, tensors)
    fetch_iso = list(dict.fromkeys(g.output for g in found)) + [iso[node_name(g.node)] for g in found]
    try:
        sess_i = runtime.session(augment(iso_model, fetch_iso), provider, threads=threads, disabled=disabled)
        sess_p = runtime.session(pert, provider, threads=threads, disabled=disabled)
    except ModelError as exc:
        raise InternalError(f"internal error: a sensitivity model does not load ({exc})") from None
    inputs = [i.name for i in reference.graph.input if i.name not in {t.name for t in reference.graph.initializer}]
    names = runtime.output_names(sess_p)
    signal, noise = 0.0, np.zeros(len(found))
    for batch in batches:
        feeds = {k: batch[k] for k in inputs}
        values = runtime.run(sess_i, feeds, fetch_iso)
        fp32 = dict(zip(fetch_iso, values))
        errors = [iso_v - fp32[g.output] for g, iso_v in zip(found, values[len(fetch_iso) - len(found):])]
        zeros = {d: np.zeros_like(fp32[t]) for d, t in zip(deltas, tensors)}
        ref = runtime.run(sess_p, {**feeds, **zeros}, names)
        signal += sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)
        for k, (g, err) in enumerate(zip(found, errors)):
            if g.output in outputs:  # a model output: its own error is the outputs' error
                noise[k] += float((err.astype(np.float64) ** 2).sum())
                continue
            d = deltas[tensors.index(g.output)]
            out = runtime.run(sess_p, {**feeds, **zeros, d: err}, names)
            noise[k] += sum(float(((o.astype(np.float64) - r) ** 2).sum()) for o, r in zip(out, ref))
        values = fp32 = errors = zeros = None
    return {node_name(g.node): _Error.db(signal, noise[k]) for k, g in enumerate(found)}


# --- streaming statistics -------------------------------------------------------------------

class _Error:
    def __init__(self):
        self.signal = self.acc = self.iso = 0.0

    def update(self, ref, acc, iso):
        ref = ref.astype(np.float64)
        self.signal += float((ref * ref).sum())
        self.acc += float(((acc - ref) ** 2).sum())
        self.iso += float(((iso - ref) ** 2).sum())

    @staticmethod
    def db(signal, noise):
        if noise == 0:
            return float("inf")
        return float(10 * np.log10(max(signal, 1e-300) / noise))

    def result(self):
        rel = (lambda n: math.sqrt(n / self.signal) if self.signal > 0 else (0.0 if n == 0 else float("inf")))
        return self.db(self.signal, self.acc), rel(self.acc), self.db(self.signal, self.iso), rel(self.iso)


class _Range:
    """Streamed min/max, clipped count and a histogram of one activation."""

    def __init__(self, lo: float, hi: float, qmin: int, qmax: int, scale: float, zero_point: int, bins: int = 2048):
        from .calib.histogram import StreamingHistogram
        self.lo, self.hi, self.qmin, self.qmax = lo, hi, qmin, qmax
        self.scale, self.zp = scale, zero_point
        self.min, self.max = math.inf, -math.inf
        self.clipped = self.count = 0
        self.hist = StreamingHistogram(bins)
        self.ch_min = self.ch_max = None
        self.ch_unknown = False

    def update(self, x: np.ndarray):
        if not x.size:
            return
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        self.clipped += int(((x < self.lo) | (x > self.hi)).sum())
        self.count += x.size
        self.hist.update(x)
        axis = 1 if x.ndim >= 4 else x.ndim - 1  # NCHW images; [batch, tokens, channels] sequences
        if x.ndim >= 2 and not self.ch_unknown:
            flat = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
            lo, hi = flat.min(axis=1), flat.max(axis=1)
            if self.ch_min is None:
                self.ch_min, self.ch_max = lo, hi
            elif self.ch_min.shape != lo.shape:
                self.ch_unknown = True  # the channel axis changed length: no per-channel figure
            else:
                self.ch_min, self.ch_max = np.minimum(self.ch_min, lo), np.maximum(self.ch_max, hi)

    def channel_ratio(self) -> float:
        if self.ch_unknown:
            return float("nan")
        if self.ch_min is None or len(self.ch_min) < 2:
            return 1.0
        widths = (self.ch_max - self.ch_min).astype(np.float64)
        med = float(np.median(widths))
        return float(widths.max() / med) if med > 0 else (1.0 if widths.max() == 0 else float("inf"))

    def result(self, tensor: str, table_hist: dict | None) -> RangeUse:
        q = lambda v: min(max(round(v / self.scale) + self.zp, self.qmin), self.qmax)  # noqa: E731
        use = (q(self.max) - q(self.min)) / (self.qmax - self.qmin) if self.count else 0.0
        h = self.hist
        if table_hist is not None:
            from .calib.histogram import StreamingHistogram
            h = StreamingHistogram.from_dict(table_hist)
        return RangeUse(tensor, float(use), self.clipped / max(self.count, 1), outlier_ratio(h), self.channel_ratio())


def outlier_ratio(h) -> float:
    """(max - min) / (p99.95 - p0.05) of a StreamingHistogram."""
    if h.count == 0 or h.max == h.min:
        return 1.0
    counts = h.counts.astype(np.float64)
    edges = h.edges()
    cdf = np.cumsum(counts) / counts.sum()
    lo = float(np.interp(0.0005, cdf, edges[1:]))
    hi = float(np.interp(0.9995, cdf, edges[1:]))
    lo, hi = max(lo, h.min), min(hi, h.max)
    return float((h.max - h.min) / (hi - lo)) if hi > lo else float("inf")


def _source(view: GraphView, tensor: str) -> str:
    """The float tensor behind ``tensor`` when it is the output of a Q/DQ pair."""
    dq = view.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return tensor
    q = view.producer.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else tensor


def _q_params(view: GraphView, q: onnx.NodeProto):
    scale = view.array(q.input[1]).reshape(-1)
    zp_arr = view.array(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros(1, np.uint8)
    if scale.size != 1:
        return None
    info = np.iinfo(zp_arr.dtype)
    return float(scale[0]), int(zp_arr.reshape(-1)[0]), int(info.min), int(info.max)


def measure(reference: onnx.ModelProto, qmodel: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]],
            macs: dict[str, int] | None = None, table=None, threads: int | None = None,
            reference_path: str = "", candidate_path: str = "",
            provider: str = "CPUExecutionProvider", disabled: tuple[str, ...] = ()) -> DebugReport:
    """Accumulated and isolated error of every quantized node, streamed over ``batches``, on ``provider``
    (``disabled``: onnxruntime transformers left out, as :func:`qtool.runtime.target_session` does for a
    TensorRT target on the CPU EP)."""
    from . import runtime
    from .calib.collect import augment
    from .errors import InternalError, ModelError
    ref_names = tensor_names(reference)
    found, skipped = groups(qmodel, ref_names, float_tensors(reference))
    iso_model, iso_out = isolated_model(reference, qmodel, found)
    acc_model, acc_out = exposed_model(qmodel, found)
    qview = GraphView(qmodel)
    ranges: dict[str, _Range] = {}
    for n in qview.nodes:
        if n.op_type == "QuantizeLinear" and n.input[0] in ref_names and n.input[0] not in qview.initializers:
            params = _q_params(qview, n)
            if params and n.input[0] not in ranges:
                s, zp, qmin, qmax = params
                ranges[n.input[0]] = _Range((qmin - zp) * s, (qmax - zp) * s, qmin, qmax, s, zp)
    names = [node_name(g.node) for g in found]
    ref_fetch = list(dict.fromkeys([g.output for g in found] + list(ranges)))
    iso_fetch = [iso_out[n] for n in names]
    acc_fetch = [acc_out[n] for n in names]
    try:
        sess_i = runtime.session(augment(iso_model, ref_fetch + iso_fetch), provider, threads=threads,
                                 disabled=disabled)
        sess_a = runtime.session(augment(acc_model, acc_fetch), provider, threads=threads, disabled=disabled)
    except ModelError as exc:  # qtool built these models: a failure to load them is qtool's bug
        raise InternalError(f"internal error: debug's measuring model does not load ({exc}); please report "
                            "it with the model") from None
    inputs = [i.name for i in sess_i.get_inputs()]
    errors = {n: _Error() for n in names}
    samples = 0
    for batch in batches:
        feeds = {k: batch[k] for k in inputs}
        values = runtime.run(sess_i, feeds, ref_fetch + iso_fetch)
        ref_vals = dict(zip(ref_fetch, values[:len(ref_fetch)]))
        iso_vals = values[len(ref_fetch):]
        acc_vals = runtime.run(sess_a, feeds, acc_fetch)
        for g, n, iso, acc in zip(found, names, iso_vals, acc_vals):
            errors[n].update(ref_vals[g.output], acc, iso)
        for t, r in ranges.items():
            r.update(ref_vals[t])
        samples += len(batch[inputs[0]]) if inputs else 0
        values = ref_vals = iso_vals = acc_vals = None
    total = sum((macs or {}).values())
    table_hists = {t: s.histogram for t, s in table.tensors.items()} if table is not None else {}
    nodes = []
    for g, n in zip(found, names):
        acc_db, acc_rel, iso_db, iso_rel = errors[n].result()
        acts = [t for t in [_source(qview, i) for i in g.node.input] + [g.output] if t in ranges]
        use = tuple(ranges[t].result(t, table_hists.get(t)) for t in dict.fromkeys(acts))
        share = (macs or {}).get(n, 0) / total if total else 0.0
        nodes.append(NodeError(n, g.node.op_type, g.output, share, acc_db, acc_rel, iso_db, iso_rel, use))
    nodes.sort(key=lambda e: (e.isolated_sqnr, e.accumulated_sqnr))
    return DebugReport(reference_path, candidate_path, samples, tuple(nodes), tuple(skipped))


def format_report(r: DebugReport, top: int | None = None) -> str:
    """The ranking ``qtool debug`` prints: worst isolated SQNR first."""
    impact = any(n.output_snr is not None for n in r.nodes)
    algorithms = any(n.applied for n in r.nodes)
    rows = [("#", "node", "op", "MACs", "isolated dB", "accum. dB") + (("alone->outputs dB",) if impact else ())
            + ("rel.err iso", "grid use", "clipped", "max/p99.9", "ch.max/med", "tensor")
            + (("algorithms (gain dB)",) if algorithms else ())]
    shown = r.nodes if top is None else r.nodes[:top]
    for i, n in enumerate(shown, 1):
        w = n.worst_range
        alone = ((_db(n.output_snr) if n.output_snr is not None else "-",) if impact else ())
        rows.append((str(i), n.name, n.op_type, f"{n.mac_share * 100:.1f}%", _db(n.isolated_sqnr),
                     _db(n.accumulated_sqnr), *alone, f"{n.isolated_rel:.4f}",
                     f"{w.grid_use * 100:.0f}%" if w else "-", f"{w.clipped * 100:.3f}%" if w else "-",
                     f"{w.outlier_ratio:.1f}" if w else "-", f"{w.channel_ratio:.1f}" if w else "-",
                     w.tensor if w else "")
                    + ((", ".join(f"{k} {v:+.1f}" for k, v in n.applied.items()) or "-",) if algorithms else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"{len(r.nodes)} quantized nodes measured on {r.samples} samples"
                 + (f" ({len(r.nodes) - len(shown)} more in --json)" if len(shown) < len(r.nodes) else ""))
    for s in r.unmatched:
        lines.append(f"not measured: {s}")
    return "\n".join(lines)


def applied_at(plan, n: NodeError, model: onnx.ModelProto) -> dict[str, float]:
    """What the plan's accuracy algorithms measured at node ``n``: entries keyed by the node, or by
    a tensor it reads or writes (a range method chosen per tensor, a smoothed input)."""
    node = next((m for m in model.graph.node if m.name == n.name), None)
    names = {n.name, n.output} | (set(node.input) | set(node.output) if node is not None else set())
    return {algorithm: gain for algorithm, where in plan.applied.items()
            for key, gain in where.items() if key in names}


def _db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def require_matplotlib():
    """matplotlib's pyplot (headless), or a one-line error saying how to get it."""
    from .errors import QtoolError
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QtoolError("--plot needs matplotlib: pip install 'qtool[plot]'") from None
    return plt


def plot(r: DebugReport, path: str, top: int = 40) -> None:
    """A horizontal bar chart of the ranking (matplotlib, the optional ``plot`` extra)."""
    plt = require_matplotlib()
    from .model import atomic_write_bytes
    import io
    nodes = list(r.nodes[:top])[::-1]
    cap = lambda v: 80.0 if math.isinf(v) else v  # noqa: E731
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(nodes) + 1.5))
    y = np.arange(len(nodes))
    ax.barh(y - 0.2, [cap(n.isolated_sqnr) for n in nodes], height=0.4, label="isolated")
    ax.barh(y + 0.2, [cap(n.accumulated_sqnr) for n in nodes], height=0.4, label="accumulated")
    ax.set_yticks(y, [f"{n.name} ({n.mac_share * 100:.0f}% MACs)" for n in nodes], fontsize=7)
    ax.set_xlabel("SQNR vs fp32 (dB, higher is better)")
    ax.set_title(f"per-node quantization error, worst {len(nodes)} (isolated) at the top")
    ax.legend(loc="best")
    fig.tight_layout()
    fmt = "svg" if str(path).lower().endswith(".svg") else "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(reference, candidate, data, table=None, preprocess: bool = True, batch_size: int | None = None,
        limit: int | None = None, threads: int | None = None, impact: bool = False, plan=None,
        provider: str = "CPUExecutionProvider", disabled: tuple[str, ...] = ()) -> DebugReport:
    """``qtool debug``: prepare the fp32 model as ``quantize`` did, then :func:`measure`.

    ``plan`` (the one ``quantize --save-plan`` wrote): its pre-processing is used, it must belong
    to ``reference``, and only the nodes it quantizes are reported (a float node that onnxruntime
    would fuse anyway is listed as not measured)."""
    from . import model as model_io
    from .api import _batch_size, open_data
    from .calib.table import CalibrationTable
    from .errors import ModelError
    from .inspection import macs_by_node, static_view
    from .prepare import prepare
    if plan is not None:
        from .plan_check import load_plan
        from .errors import PlanError
        plan = load_plan(plan) if not hasattr(plan, "nodes") else plan
        preprocess = plan.preprocess
    p = prepare(reference, preprocess, plan.algorithms if plan is not None else (),
                plan.smoothquant if plan is not None else None)
    if plan is not None and plan.model_sha256 != p.sha256:
        raise PlanError(f"the plan was made for another model than {reference} (model_sha256 differs)")
    q = model_io.load(candidate)
    ds = open_data(data, p.model)
    if table is not None and not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    found, skipped = groups(q, tensor_names(p.model), float_tensors(p.model))
    if not found:
        kinds = sorted({n.op_type for n in q.graph.node if n.op_type.startswith(("QLinear", "DynamicQuantize",
                                                                                  "MatMulInteger", "ConvInteger"))})
        if kinds:
            raise ModelError(f"{candidate}: a QOperator or dynamic model ({', '.join(kinds[:3])}): debug measures "
                             "QDQ models; quantize with --format qdq (the default) and --save-plan to debug it")
        raise ModelError(f"{candidate}: no quantized node of it matches a tensor of {reference}"
                         + (f" ({skipped[0]})" if skipped else "")
                         + "; give the fp32 model it was quantized from (and --no-preprocess if it was)")
    batch_size = _batch_size(p.model, batch_size or 8)
    first = next(iter(ds.batches(1, 1)), {})
    shapes = {i.name: tuple(first[i.name].shape) for i in p.model.graph.input if i.name in first}
    macs = macs_by_node(static_view(p.model, shapes)[0], unknown_as_one=True)
    report = measure(p.model, q, ds.batches(batch_size, limit), macs, table, threads, str(reference), str(candidate),
                     provider, disabled)
    from dataclasses import replace
    if plan is not None:
        quantized = {n.name for n in plan.quantized_nodes()}
        report = replace(report, nodes=tuple(replace(n, applied=applied_at(plan, n, p.model))
                                             for n in report.nodes if n.name in quantized),
                         unmatched=report.unmatched + tuple(f"{n.name}: float in the plan" for n in report.nodes
                                                            if n.name not in quantized))
    if not impact:
        return report
    snr = output_sensitivity(p.model, q, ds.batches(batch_size, limit), threads, provider, disabled)
    return replace(report, nodes=tuple(replace(n, output_snr=snr.get(n.name)) for n in report.nodes))
