"""Weight-only int4 (``--weights int4``): MatMul/Gemm weights as onnxruntime's MatMulNBits,
embedding tables as GatherBlockQuantized; activations stay float.

:func:`plan_int4` returns a resolved plan (mode ``weight-only``): every MatMul/Gemm with a
constant 2-D float32 weight of at least 16x16 gets int4 weights blocked along K; every
Gather from a constant 2-D table gets int4 rows blocked along its columns; every other node
stays float with its reason. The plan carries each weight's scales and zero points (and,
for GPTQ, whose values do not follow from them, the 4-bit values themselves), so
``quantize --plan`` rebuilds the same model without data.

A weight's TensorPlan describes the tensor as stored: ``PerBlock(axis, size)`` blocks run
along ``axis`` (0 for a MatMul weight ``W[K, N]``, 1 for a transB Gemm's ``[N, K]`` and for
a table ``[V, D]``); scales and zero points have the tensor's shape with that axis replaced
by its block count, in C order; symmetric weights are int4 (zero point 0, stored as uint4
around MatMulNBits' default 8), asymmetric ones uint4. :func:`blocks_of` is the one
mapping between that and :mod:`qtool.int4`'s rows.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np
import onnx

from . import int4
from .errors import PlanError, QtoolError
from .graph import GraphView
from .plans import Action, NodePlan, Plan, Role, TensorPlan
from .types import PerBlock, Precision

KERNEL = "MatMulNBits"
GATHER_KERNEL = "GatherBlockQuantized"
KERNELS = {"MatMul": KERNEL, "Gemm": KERNEL, "Gather": GATHER_KERNEL}
#: Smallest K and N (and table width) quantized: MatMulNBits' smallest block is 16, and a
#: layer narrower than that holds a negligible share of the bytes (TensorRT/ModelOpt also
#: leave GEMMs with K or N < 16 alone).
MIN_DIM = 16
#: MatMulNBits' accuracy_level: 0 keeps the activations float32 inside the kernel (measured on
#: MiniLM's MatMuls on this AVX2 CPU: level 4, int8 activations, was no faster and added 0.4-0.5 %
#: relative output error; see docs/design.md).
ACCURACY_LEVEL = 0
#: CUDA's fpA_intB GEMM needs N % 64 == 0 and K % block == 0 (contrib_ops/cuda/quantization/matmul_nbits.cc).
CUDA_N_MULTIPLE = 64
FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class Candidate:
    """A node whose constant weight can be int4: ``axis`` is the block axis of the stored weight."""

    key: str
    op_type: str
    weight: str
    axis: int
    activation: str = ""  # a MatMul/Gemm's input A (GPTQ's Hessian is collected there)
    bias: str = ""        # a Gemm's C (added after MatMulNBits)


# --------------------------------------------------------------------------- eligibility

def linear_candidate(node: onnx.NodeProto, view: GraphView) -> Candidate | str:
    """The MatMul/Gemm's int4 candidate, or why it stays float."""
    key, w = view.node_name(node), node.input[1]
    if not view.is_initializer(w):
        return "no constant weight (both inputs are activations): weight-only int4 quantizes constant weights only"
    dims = tuple(view.initializers[w].dims)
    if len(dims) != 2 or view.initializers[w].data_type != FLOAT:
        return f"weight {w} is not a 2-D float32 matrix ({len(dims)}-D): stays float"
    if view.rank(node.input[0]) == 1 or view.elem_type(node.input[0]) not in (FLOAT, onnx.TensorProto.FLOAT16, None):
        return f"input {node.input[0]} is not a float matrix: stays float"
    axis, bias = 0, ""
    if node.op_type == "Gemm":
        why = _gemm_unsupported(node, view)
        if why:
            return why
        axis = 1 if view.attr(node, "transB", 0) else 0
        bias = node.input[2] if len(node.input) > 2 else ""
    k, n = (dims[0], dims[1]) if axis == 0 else (dims[1], dims[0])
    if k < MIN_DIM or n < MIN_DIM:
        return (f"weight {k}x{n} (K x N): int4 needs K and N of at least {MIN_DIM} (MatMulNBits' smallest block; "
                "too few bytes to matter): stays float")
    return Candidate(key, node.op_type, w, axis, node.input[0], bias)


def _gemm_unsupported(node: onnx.NodeProto, view: GraphView) -> str:
    if view.attr(node, "transA", 0) or view.attr(node, "alpha", 1.0) != 1.0:
        return "Gemm with transA or alpha != 1: stays float"
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        if view.attr(node, "beta", 1.0) != 1.0 or not view.is_initializer(c) or len(view.initializers[c].dims) > 2:
            return "Gemm whose C is not a constant bias (or beta != 1): stays float"
    return ""


def table_candidate(node: onnx.NodeProto, view: GraphView, block_size: int) -> Candidate | str:
    """The Gather's int4 candidate (a constant 2-D table gathered along rows), or why it stays float."""
    table = node.input[0]
    if not view.is_initializer(table):
        return "gathers from a computed tensor, not a constant table: stays float"
    dims = tuple(view.initializers[table].dims)
    if len(dims) != 2 or view.initializers[table].data_type != FLOAT or view.attr(node, "axis", 0) not in (0, -2):
        return "not a 2-D float32 table gathered along its rows: stays float"
    if min(dims) < MIN_DIM:
        return f"table {dims[0]}x{dims[1]}: int4 needs both sides of at least {MIN_DIM}: stays float"
    if dims[1] % block_size:
        return (f"table width {dims[1]} is not a multiple of the block size {block_size} (onnxruntime's CUDA "
                "GatherBlockQuantized counts blocks across rows): stays float")
    return Candidate(view.node_name(node), "Gather", table, 1)


def candidates(view: GraphView, block_size: int) -> dict[str, Candidate | str]:
    """Node key -> its candidate or why it stays float, for every node of the graph."""
    out: dict[str, Candidate | str] = {}
    for node in view.nodes:
        key = view.node_name(node)
        if node.op_type in ("MatMul", "Gemm"):
            out[key] = linear_candidate(node, view)
        elif node.op_type == "Gather":
            out[key] = table_candidate(node, view, block_size)
        else:
            out[key] = f"weight-only int4 leaves {node.op_type} float (only MatMul/Gemm weights and Gather tables)"
    return out


# --------------------------------------------------------------------------- layout

def rows_of(array: np.ndarray, axis: int) -> np.ndarray:
    """The stored 2-D weight as int4's ``M[R, C]`` (blocks along C = the weight's ``axis``)."""
    return array if axis == 1 else array.T


def blocks_of(t: TensorPlan, array: np.ndarray) -> int4.Quantized:
    """The plan's weight as int4 rows: codes (the plan's own, or from its scale and zero
    point), scales and stored (unsigned) zero points, all [R, ...]."""
    g = t.granularity
    m = rows_of(np.asarray(array, np.float32), g.axis)
    nb = int4.num_blocks(m.shape[1], g.size)
    grid = (nb, m.shape[0]) if g.axis == 0 else (m.shape[0], nb)
    scales = np.asarray(t.scale, np.float32).reshape(grid)
    zps = (np.asarray(t.zero_point, np.int64).reshape(grid) - t.precision.qmin).astype(np.uint8)
    if g.axis == 0:
        scales, zps = scales.T, zps.T
    scales, zps = np.ascontiguousarray(scales), np.ascontiguousarray(zps)
    if t.codes is not None:
        stored = int4.unpack_nibbles(np.frombuffer(base64.b64decode(t.codes), np.uint8), array.size)
        codes = np.ascontiguousarray(rows_of(stored.reshape(array.shape), g.axis))
    else:
        codes = int4.quantize_codes(m, scales, zps, g.size)
    return int4.Quantized(codes, scales, zps, g.size)


def tensor_plan(c: Candidate, q: int4.Quantized, symmetric: bool, reason: str, with_codes: bool) -> TensorPlan:
    """The TensorPlan of a weight quantized as ``q`` (int4 rows of the stored weight)."""
    precision = Precision.INT4 if symmetric else Precision.UINT4
    scales, zps, codes = q.scales, q.zero_points.astype(np.int64) + precision.qmin, q.codes
    if c.axis == 0:
        scales, zps, codes = scales.T, zps.T, codes.T
    packed = None
    if with_codes:
        packed = base64.b64encode(int4.pack_nibbles(np.ascontiguousarray(codes).reshape(-1)).tobytes()).decode()
    return TensorPlan(c.weight, Role.WEIGHT, Action.QUANTIZE, reason, precision, PerBlock(c.axis, q.block_size),
                      symmetric, scale=tuple(float(v) for v in np.ascontiguousarray(scales).ravel()),
                      zero_point=tuple(int(v) for v in np.ascontiguousarray(zps).ravel()), codes=packed)


# --------------------------------------------------------------------------- the plan

def plan_int4(p, options, data, calibrate_options) -> Plan:
    """The resolved weight-only int4 plan of the prepared model ``p`` (``data``: a Dataset
    or None; only gptq reads it). No ``int4_method``: gptq when there is data, rtn without."""
    from dataclasses import replace
    from .planner import match_overrides
    if options.int4_method is None:
        options = replace(options, int4_method="gptq" if data is not None else "rtn")
    view = GraphView(p.model)
    method, bs = options.int4_method, options.block_size
    if method == "gptq" and data is None:
        raise QtoolError("--int4-method gptq needs --data (the MatMuls' input activations, from which it builds "
                         "each layer's Hessian; a calibration table holds only ranges, not activations): give "
                         "--data, or use --int4-method rtn or hqq, which need none")
    from .subgraphs import node_keys
    overrides = match_overrides(view, options, node_keys(p.model))  # a body's node: no error, stays float there
    chosen, reasons = _choose(candidates(view, bs), overrides)
    if not chosen:
        raise QtoolError("--weights int4 found nothing to quantize (no MatMul/Gemm with a constant 2-D weight of "
                         f"at least {MIN_DIM}x{MIN_DIM}, no constant embedding table that the options leave to it)")
    notes = list(p.notes)
    hessians = {}
    if method == "gptq":
        acts = sorted({c.activation for c in chosen.values() if c.op_type != "Gather"})
        hessians, note = collect_hessians(p, acts, data, calibrate_options)
        notes.append(note)
    tensors = _quantize_weights(view, chosen, hessians, options)
    nodes = _node_plans(view, chosen, reasons, tensors, overrides, options)
    notes += _target_notes(view, chosen, options)
    return Plan(tensors, tuple(nodes), tuple(notes), mode="weight-only", format="qoperator",
                target=options.target_enum, model_sha256=p.sha256, preprocess=options.preprocess, resolved=True)


def _choose(found: dict, overrides: dict) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Candidates the user did not keep float, one block axis per weight; reasons for the rest."""
    chosen: dict[str, Candidate] = {}
    reasons: dict[str, str] = {}
    axis_of: dict[str, tuple[int, str]] = {}
    for key, c in found.items():
        wanted = overrides.get(key)
        if wanted is not None:
            reasons[key] = _override_reason(wanted)
        elif isinstance(c, str):
            reasons[key] = c
        elif axis_of.setdefault(c.weight, (c.axis, key))[0] != c.axis:
            reasons[key] = (f"its weight {c.weight} is also read by {axis_of[c.weight][1]}, which blocks it "
                            "along the other axis: stays float")
        else:
            chosen[key] = c
    return chosen, reasons


def _override_reason(wanted: Precision) -> str:
    if wanted is Precision.FP32:
        return "kept float on request (--precision NAME=fp32 or --exclude)"
    if wanted is Precision.FP16:
        return "fp16 on request (--precision NAME=fp16): float inputs cast to fp16, weights stored in fp16"
    return f"--precision NAME={wanted.label} does not apply to weight-only int4: stays float"


def _quantize_weights(view: GraphView, chosen: dict[str, Candidate], hessians: dict, options
                      ) -> dict[str, TensorPlan]:
    """One TensorPlan per quantized weight (a weight several nodes read is quantized once)."""
    method, bs, symmetric = options.int4_method, options.block_size, options.int4_symmetric
    by_weight: dict[str, list[Candidate]] = {}
    for c in chosen.values():
        by_weight.setdefault(c.weight, []).append(c)
    tensors = {}
    for weight, cs in by_weight.items():
        # a table may also be a transB Gemm's weight (tied embeddings): the table's rules hold for
        # both readers, and gptq's Hessian comes from the Gemm's inputs only
        linear = [x for x in cs if x.op_type != "Gather"]
        table = next((x for x in cs if x.op_type == "Gather"), None)
        c = table or cs[0]
        array = view.array(weight).astype(np.float32)
        m = rows_of(array, c.axis)
        sym, how = _table_symmetry(c, m.shape[1], options) if table is not None else (symmetric, "")
        used = method if linear or method != "gptq" else "rtn"
        h = sum(hessians[x.activation] for x in linear) if used == "gptq" else None
        q = int4.quantize(m, bs, sym, used, h)
        tensors[weight] = tensor_plan(c, q, sym, _weight_reason(c, used, bs, sym, method) + how,
                                      with_codes=used == "gptq")
    return tensors


def _table_symmetry(c: Candidate, width: int, options) -> tuple[bool, str]:
    """A table on --target cuda with zero points and an odd number of blocks per row is stored
    symmetric: onnxruntime's CUDA kernel reads zero points packed across rows
    (contrib_ops/cuda/quantization/gather_block_quantized.cu), the CPU kernel per row; the two
    agree only for an even block count."""
    nb = int4.num_blocks(width, options.block_size)
    if options.int4_symmetric or options.target != "cuda" or nb % 2 == 0:
        return options.int4_symmetric, ""
    return True, (f"; symmetric: {nb} blocks per row is odd, and the CPU and CUDA kernels pack a table's zero "
                  "points differently then")


def _weight_reason(c: Candidate, used: str, bs: int, symmetric: bool, method: str) -> str:
    kind = "symmetric int4" if symmetric else "asymmetric uint4"
    what = "embedding table, blocks along its rows" if c.op_type == "Gather" else "weight, blocks along K"
    why = " (gptq needs a layer's input activations; a table has none: round to nearest)" \
        if used != method else ""
    return f"{kind} {what}, block {bs}, {used}{why}"


def _node_plans(view: GraphView, chosen: dict[str, Candidate], reasons: dict[str, str],
                tensors: dict[str, TensorPlan], overrides: dict, options) -> list[NodePlan]:
    out = []
    for node in view.nodes:
        key = view.node_name(node)
        c = chosen.get(key)
        if c is None:
            half = overrides.get(key) is Precision.FP16
            out.append(NodePlan(key, node.op_type, Precision.FP16 if half else Precision.FLOAT, reasons[key]))
            continue
        t = tensors[c.weight]
        kernel = KERNELS[c.op_type]
        why = f"int4 weights as {kernel} ({t.reason}); activations stay float" + cuda_miss(c, view, options)
        out.append(NodePlan(key, node.op_type, t.precision, why, kernel, inputs=(c.weight,), bias=c.bias))
    return out


def kn_of(c: Candidate, view: GraphView) -> tuple[int, int]:
    """(K, N) of a MatMul/Gemm candidate's weight as the product sees it (a table: its rows and width)."""
    dims = tuple(view.initializers[c.weight].dims)
    return (dims[0], dims[1]) if c.axis == 0 else (dims[1], dims[0])


def cuda_miss(c: Candidate, view: GraphView, options) -> str:
    """Why CUDA's fast fpA_intB GEMM will not take this MatMulNBits ("" when it will, or off cuda)."""
    if options.target != "cuda" or c.op_type == "Gather":
        return ""
    k, n = kn_of(c, view)
    misses = []
    if n % CUDA_N_MULTIPLE:
        misses.append(f"N={n} is not a multiple of {CUDA_N_MULTIPLE}")
    if k % options.block_size:
        misses.append(f"K={k} is not a multiple of the block size")
    if options.block_size not in (32, 64, 128):
        misses.append(f"block {options.block_size} is not 32, 64 or 128")
    return f"; on CUDA: {', '.join(misses)}, so not the fpA_intB fast GEMM" if misses else ""


def _target_notes(view: GraphView, chosen: dict[str, Candidate], options) -> list[str]:
    lines = [f"int4 weight-only: {sum(c.op_type != 'Gather' for c in chosen.values())} MatMul/Gemm as {KERNEL} "
             f"(accuracy_level {ACCURACY_LEVEL}: float32 activations inside the kernel), "
             f"{sum(c.op_type == 'Gather' for c in chosen.values())} tables as {GATHER_KERNEL}; "
             f"block {options.block_size}, {options.int4_method}, "
             f"{'symmetric' if options.int4_symmetric else 'asymmetric'}"]
    from .subgraphs import bodies
    if bodies(view.model):
        lines.append("nodes inside If/Loop/Scan bodies stay float: weight-only int4 plans the main graph only")
    if options.target == "cuda":
        slow = [c.key for c in chosen.values() if cuda_miss(c, view, options)]
        if slow:
            lines.append(f"{len(slow)} MatMulNBits miss CUDA's fpA_intB fast GEMM (N % 64, K % block or the block "
                         f"size; each node's reason says which), e.g. {slow[0]}")
    return lines


# --------------------------------------------------------------------------- GPTQ's Hessians

class HessianObserver:
    """Accumulates ``X^T X`` (float64) over every row of an activation ``[..., K]``."""

    def __init__(self):
        self.h = None
        self.rows = 0

    def update(self, value: np.ndarray) -> None:
        x = np.asarray(value, np.float32).reshape(-1, value.shape[-1])
        batch = (x.T @ x).astype(np.float64)  # a batch's sum in float32 (2x faster), the total in float64
        self.h = batch if self.h is None else self.h + batch
        self.rows += len(x)


def collect_hessians(p, activations: list[str], data, calibrate_options) -> tuple[dict[str, np.ndarray], str]:
    """``X^T X`` of each MatMul input over the data (the fp32 model's activations)."""
    from .api import _batch_size
    from .calib.collect import collect
    batch_size = _batch_size(p.model, calibrate_options.batch_size)
    observers, samples, batches, _ = collect(p.model, activations, data.batches(batch_size, calibrate_options.limit),
                                             lambda _: HessianObserver())
    missing = [a for a in activations if getattr(observers.get(a), "h", None) is None]
    if missing:
        raise QtoolError(f"--int4-method gptq: no activation reached {missing[0]} on this data")
    rows = max(o.rows for o in observers.values()) if observers else 0
    return {a: observers[a].h for a in activations}, (
        f"gptq: Hessians X^T X of {len(activations)} MatMul inputs from {samples} samples ({batches} batches, up "
        f"to {rows} rows each) of the fp32 model; damp {int4.GPTQ_DAMP} of the mean diagonal")


# --------------------------------------------------------------------------- checking a saved plan

def check_plan(plan: Plan, view: GraphView) -> None:
    """Raise PlanError unless a weight-only plan fits the model and agrees with itself."""
    model_nodes = {view.node_name(n): n for n in view.nodes}
    planned = {n.name for n in plan.nodes}
    for key in model_nodes:
        if key not in planned:
            _fail(f"node {key!r}", "is in the model but not in the plan")
    readers: dict[str, list[tuple[NodePlan, int]]] = {}
    for n in plan.nodes:
        node = model_nodes.get(n.name)
        if node is None or node.op_type != n.op_type:
            _fail(f"node {n.name!r}", "is not a node of this model" if node is None
                  else f"is a {node.op_type} in the model, not a {n.op_type}")
        axis = _check_node(n, node, plan, view)
        if axis is not None:
            readers.setdefault(n.inputs[0], []).append((n, axis))
    for t in plan.tensors.values():
        _check_tensor(t, readers.get(t.name, []), view)
    if plan.subgraphs:
        _check_bodies(plan, view)


def _check_bodies(plan: Plan, view: GraphView) -> None:
    """Body plans (written by the fp16 pass of --target cuda --weights int4): one per If/Loop/Scan
    body, float or fp16 nodes only (int4 plans the main graph only)."""
    from .subgraphs import bodies, lift
    keys = {b.key: b for b in bodies(view.model)}
    for key in plan.subgraphs:
        if key not in keys:
            _fail(f"subgraph {key!r}", "is not a subgraph of this model (expected <If/Loop/Scan node>/<attribute>)")
    for key, b in keys.items():
        sub = plan.subgraphs.get(key)
        if sub is None:
            _fail(f"subgraph {key!r}", "is in the model but not in the plan")
        if sub.tensors or sub.quantized_nodes():
            _fail(f"subgraph {key!r}", "weight-only int4 plans the main graph only: a body's nodes are float or "
                                       "fp16, with no tensors")
        try:
            check_plan(sub, GraphView(lift(view.model, b)))
        except PlanError as exc:
            raise PlanError(str(exc).replace("plan ", f"plan subgraph {key!r}: ", 1)) from None


def _fail(what: str, message: str):
    raise PlanError(f"plan {what}: {message}")


def _check_node(n: NodePlan, node: onnx.NodeProto, plan: Plan, view: GraphView) -> int | None:
    """The block axis its weight must have, for an int4 node; None for a float one."""
    what = f"node {n.name!r}"
    if n.fused_into or n.float_inputs:
        _fail(what, "weight-only plans fuse nothing and have no float_inputs")
    if not n.quantized:
        if n.kernel or n.bias or n.inputs:
            _fail(what, "is float, so it can have no kernel, bias or quantized inputs")
        return None
    if n.precision not in (Precision.INT4, Precision.UINT4) or n.kernel != KERNELS.get(n.op_type):
        _fail(what, f"a weight-only plan writes int4/uint4 {n.op_type} only as "
                    f"{KERNELS.get(n.op_type, 'nothing: stays float')}, not {n.precision.label} {n.kernel or '-'}")
    c = (table_candidate(node, view, _block(plan, node)) if n.op_type == "Gather"
         else linear_candidate(node, view))
    if isinstance(c, str):
        _fail(what, f"cannot be int4: {c}")
    if n.inputs != (c.weight,) or n.bias != c.bias:
        _fail(what, f"must read exactly its weight {c.weight!r} quantized" + (f" and add its bias {c.bias!r}"
                                                                           if c.bias else " (no bias)"))
    t = plan.tensors.get(c.weight)
    if t is None or t.action is not Action.QUANTIZE or t.precision is not n.precision:
        _fail(what, f"reads {c.weight!r} as {n.precision.label}, but the plan does not quantize it so")
    return c.axis


def _block(plan: Plan, node: onnx.NodeProto) -> int:
    t = plan.tensors.get(node.input[0])
    return t.granularity.size if t is not None and isinstance(t.granularity, PerBlock) else 1


def _check_tensor(t: TensorPlan, readers: list[tuple[NodePlan, int]], view: GraphView) -> None:
    what = f"tensor {t.name!r}"
    if t.role is not Role.WEIGHT or t.action not in (Action.QUANTIZE, Action.SKIP):
        _fail(what, "a weight-only plan holds weights only, quantized or skipped")
    if not view.is_initializer(t.name):
        _fail(what, "is not an initializer of the model")
    if t.action is Action.SKIP:
        return
    if not readers:
        _fail(what, "is quantized but no int4 node of the plan reads it")
    g = t.granularity
    if not isinstance(g, PerBlock) or g.size not in (16, 32, 64, 128, 256) or g.axis not in (0, 1) \
            or any(axis != g.axis for _, axis in readers):
        _fail(what, f"needs per-block granularity with a block of 16..256 (a power of two) along axis "
                    f"{readers[0][1]} (its readers' K)")
    if t.precision is not (Precision.INT4 if t.symmetric else Precision.UINT4):
        _fail(what, "symmetric weights are int4, asymmetric ones uint4")
    _check_values(what, t, tuple(view.initializers[t.name].dims))


def _check_values(what: str, t: TensorPlan, shape: tuple[int, ...]) -> None:
    g = t.granularity
    count = int4.num_blocks(shape[g.axis], g.size) * shape[1 - g.axis]
    scale, zp = t.scale, t.zero_point
    if not isinstance(scale, tuple) or not isinstance(zp, tuple) or len(scale) != count or len(zp) != count:
        _fail(what, f"needs {count} scales and {count} zero points (one per block), as lists")
    if not all(math.isfinite(s) and float(np.float32(s)) == s for s in scale):
        _fail(what, "every scale must be a finite float32 number")
    if not t.symmetric and any(s < 0 for s in scale):
        _fail(what, "an asymmetric weight's scales are not negative")
    if any(z < t.precision.qmin or z > t.precision.qmax for z in zp) or (t.symmetric and any(zp)):
        _fail(what, f"zero points must be in [{t.precision.qmin}, {t.precision.qmax}]"
                    + (" and 0 (symmetric)" if t.symmetric else ""))
    if t.codes is not None:
        try:
            raw = base64.b64decode(t.codes, validate=True)
        except ValueError:
            _fail(what, "codes is not base64")
        if len(raw) != -(-math.prod(shape) // 2):
            _fail(what, f"codes hold {len(raw)} bytes; {math.prod(shape)} 4-bit values need "
                        f"{-(-math.prod(shape) // 2)}")
