"""``--target trt``: int8 Q/DQ placed the way TensorRT builds an explicitly quantized engine.

TensorRT reads Q/DQ pairs and fuses them into its own kernels; where they sit decides
what runs in int8. The placement follows NVIDIA's guidance (TensorRT developer guide,
"Explicit Quantization" / "Q/DQ layer-placement recommendations") and what NVIDIA's
ModelOpt does for int8 ONNX (``modelopt/onnx/quantization/int8.py``, ``graph_utils.py``,
``partitioning.py``, ``ort_utils.py`` in NVIDIA/Model-Optimizer):

- Q/DQ on the *inputs* of the ops TensorRT runs in int8, never on an output for its
  own sake (ModelOpt: ``OpTypesToExcludeOutputQuantization`` = every op type). A
  Conv's output reaches its Relu/Clip float, so TensorRT fuses conv+bias+activation.
- Symmetric int8 everywhere (ModelOpt: ``ActivationSymmetric``); weights per output
  channel; biases stay float (``QuantizeBias: False``): TensorRT folds them in.
- Conv/ConvTranspose/Gemm/MatMul inputs, except GEMV and GEMMs with K or N < 16
  (``find_nodes_from_matmul_to_exclude``) and Convs with < 16 channels unless a
  multiple of 8 (``find_nodes_from_convs_to_exclude``). A linear op kept float reads
  float inputs (``classify_partially_quantized_weighted_ops``).
- A residual Add: only its skip input is quantized; the input from the Conv branch
  stays float so TensorRT fuses the Add into that Conv with an int8 residual
  (``build_non_residual_input_map``/``remove_partial_input_qdq``).
- Concat: one scale for its inputs and its output (ModelOpt's concat elimination,
  ``get_concat_eliminated_tensors``), so the DQ->Q pairs around it cancel.
- Pooling: its input is quantized when a quantized node precedes or follows it
  (``find_quantizable_nodes``).

Every rule here is pure; the look-ahead helpers only evaluate other nodes' rules.
"""

from __future__ import annotations

import onnx

from .base import Act, Context, Joined, NodeRule, Skip, Weight
from .linear import _cheap_first_layer

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool")
#: ModelOpt's copy ops (``modelopt/onnx/op_types.py: get_copy_ops``) with one data input, plus Unsqueeze.
COPY_OPS = ("Flatten", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Reshape", "Tile", "Slice", "Split")
MOVEMENT = COPY_OPS + ("Resize", "DepthToSpace", "SpaceToDepth", "Gather")
MIN_DIM = 16        # ModelOpt's _MIN_MATMUL_DIM and its Conv channel floor
CHANNEL_MULTIPLE = 8
MAX_EPILOGUE = 8    # ops walked back from an Add input to find the Conv it comes from

GUIDE = "TensorRT's Q/DQ placement (NVIDIA ModelOpt)"


# -- look-ahead: would a node's TensorRT rule quantize this input? ----------------------
def _decision(node: onnx.NodeProto, ctx: Context):
    """What the planner will decide for ``node`` (not yet planned): None where it stays float
    before any rule runs (kept float, another domain, part of a float pattern, no rule)."""
    if ctx.kept_float(node) or node.domain not in ("", "ai.onnx"):
        return None
    wanted = ctx.override(node)
    if ctx.node_key(node) in ctx.patterns and not (wanted is not None and wanted.is_integer):
        return None
    rule = RULES.get(node.op_type)
    return rule(node, ctx) if rule is not None else None


def quantizes_input(node: onnx.NodeProto, tensor: str, ctx: Context) -> bool:
    """Whether ``node`` will read ``tensor`` through a Q/DQ pair."""
    decision = _decision(node, ctx) if ctx.view.is_float(tensor) else None
    return isinstance(decision, NodeRule) and any(
        node.input[i] == tensor and isinstance(spec, Act) for i, spec in decision.inputs.items())


def _readers(tensor: str, ctx: Context):
    """(consumer, the tensor it reads) pairs, looking through data-movement ops."""
    for c in ctx.view.consumers.get(tensor, []):
        if c.op_type in COPY_OPS and c.input and c.input[0] == tensor and c.output[0]:
            yield from _readers(c.output[0], ctx)
        else:
            yield c, tensor


def _quantized_producer(tensor: str, ctx: Context) -> onnx.NodeProto | None:
    """The Conv/Gemm/MatMul or Add that produces ``tensor`` (through movement ops) and is quantized."""
    node = ctx.view.producer.get(tensor)
    while node is not None and node.op_type in COPY_OPS:
        node = ctx.view.producer.get(node.input[0])
    if node is None or node.op_type not in LINEAR + ("Add",):
        return None
    return node if isinstance(_decision(node, ctx), NodeRule) else None


# -- Conv, ConvTranspose ----------------------------------------------------------------------
def _channels_skip(node: onnx.NodeProto, ctx: Context) -> Skip | None:
    """ModelOpt's int8 Conv rule: input and output channels >= 16, except a group-1 Conv with
    either count a multiple of 8 that reads a model input or has the other count >= 16 (square
    kernel), or a grouped Conv with output channels a multiple of 8 and kernels >= 3."""
    dims = list(ctx.view.initializers[node.input[1]].dims)
    out_ch, in_ch, kernel = dims[0], dims[1], dims[2:]
    if out_ch >= MIN_DIM and in_ch >= MIN_DIM:
        return None
    group = ctx.view.attr(node, "group", 1)
    first = any(t in ctx.view.graph_inputs for t in node.input)
    if group == 1 and (out_ch % CHANNEL_MULTIPLE == 0 or in_ch % CHANNEL_MULTIPLE == 0) \
            and (first or max(out_ch, in_ch) >= MIN_DIM) and len(set(kernel)) <= 1:
        return None
    if group > 1 and out_ch % CHANNEL_MULTIPLE == 0 and all(k >= 3 for k in kernel):
        return None
    return Skip(f"{in_ch} input / {out_ch} output channels per group: {GUIDE} keeps Convs with fewer than "
                f"{MIN_DIM} channels float unless a multiple of {CHANNEL_MULTIPLE} (with another channel count "
                f">= {MIN_DIM} or on the model input, square kernel; grouped: kernels >= 3): too narrow for "
                "TensorRT's int8 tensor-core kernels")


def conv(node: onnx.NodeProto, ctx: Context):
    if not ctx.view.is_initializer(node.input[1]):
        return Skip("weight is not a constant initializer")
    if ctx.override(node) is None:
        blocked = _cheap_first_layer(node, ctx) or _channels_skip(node, ctx)
        if blocked is not None:
            return blocked
    axis = 0 if ctx.options.per_channel else None
    return NodeRule({0: Act(), 1: Weight(axis)}, None,
                    f"int8 Conv for TensorRT: Q/DQ on its input and its weights ({_per(axis)}), bias and output "
                    f"float: TensorRT folds the bias and fuses the Relu/Clip after it ({GUIDE}: inputs only)",
                    "float (TensorRT fuses what follows into the Conv)")


def conv_transpose(node: onnx.NodeProto, ctx: Context):
    """TensorRT has int8 deconvolution kernels (the CPU EP has none, so on cpu it stays float);
    weights [C_in, C_out/group, k...] are per output channel along axis 1 (ModelOpt's
    ``QDQOpTypePerChannelSupportToAxis``)."""
    if not ctx.view.is_initializer(node.input[1]):
        return Skip("weight is not a constant initializer")
    axis = 1 if ctx.options.per_channel else None
    return NodeRule({0: Act(), 1: Weight(axis, matmul=False)}, None,
                    f"int8 ConvTranspose for TensorRT (int8 deconvolution): Q/DQ on its input and its weights "
                    f"({_per(axis)}), bias and output float ({GUIDE}: inputs only)", "float")


def _per(axis: int | None) -> str:
    return "per tensor" if axis is None else f"per channel, axis {axis}"


# -- Gemm, MatMul -------------------------------------------------------------------------------
def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _gemm_skip(m, k, n, rank2: bool) -> Skip | None:
    """GEMV (M, N or K of 1: no tensor cores) and GEMMs with K or N below 16, as ModelOpt
    excludes them (``find_nodes_from_matmul_to_exclude``); unknown dims do not exclude."""
    if n == 1 or k == 1 or (rank2 and m == 1):
        which = "N" if n == 1 else "K" if k == 1 else "M"
        return Skip(f"a vector product (GEMV, {which} = 1): TensorRT cannot use tensor cores for it and Q/DQ "
                    f"around it slow it down ({GUIDE}: GEMV stays float)")
    small = [f"{name} = {v}" for name, v in (("K", k), ("N", n)) if v is not None and v < MIN_DIM]
    if small:
        return Skip(f"{' and '.join(small)} < {MIN_DIM}: TensorRT's int8 tensor-core GEMMs need K and N >= {MIN_DIM}; "
                    f"Q/DQ on a smaller GEMM is slower than float ({GUIDE})")
    return None


def gemm(node: onnx.NodeProto, ctx: Context):
    view = ctx.view
    b = node.input[1]
    if not view.is_initializer(b) or len(view.initializers[b].dims) != 2:
        return Skip("B is not a constant 2-D initializer")
    trans_b = view.attr(node, "transB", 0)
    k, n = list(view.initializers[b].dims)[::-1] if trans_b else list(view.initializers[b].dims)
    a = view.shape(node.input[0]) or ()
    m = _static(a[1] if view.attr(node, "transA", 0) else a[0]) if len(a) == 2 else None
    if ctx.override(node) is None:
        blocked = _gemm_skip(m, k, n, True)
        if blocked is not None:
            return blocked
    axis = (0 if trans_b else 1) if ctx.options.per_channel else None
    return NodeRule({0: Act(), 1: Weight(axis)}, None,
                    f"int8 Gemm for TensorRT: Q/DQ on A and on B ({_per(axis)}); C and the output float "
                    f"({GUIDE}: inputs only, biases float)", "float")


def matmul(node: onnx.NodeProto, ctx: Context):
    view = ctx.view
    a, b = node.input[0], node.input[1]
    if view.is_initializer(a):
        return Skip("constant first input: no int8 weight x activation placement")
    a_shape = view.shape(a) or ()
    m = _static(a_shape[-2]) if len(a_shape) >= 2 else None
    if view.is_initializer(b):
        dims = list(view.initializers[b].dims)
        if len(dims) < 2:
            return Skip("1-D weight: a vector product")
        k, n, rank2 = dims[-2], dims[-1], len(a_shape) == 2
        axis = len(dims) - 1 if ctx.options.per_channel and len(dims) == 2 else None
        inputs, what = {0: Act(), 1: Weight(axis)}, f"Q/DQ on the input and the weights ({_per(axis)})"
    else:
        b_shape = view.shape(b) or ()
        k = _static(a_shape[-1]) if a_shape else None
        n = _static(b_shape[-1]) if b_shape else None
        rank2 = True  # M = 1 in a batched product is a GEMV too
        inputs, what = {0: Act(), 1: Act()}, "Q/DQ on both activations"
    if ctx.override(node) is None:
        blocked = _gemm_skip(m, k, n, rank2)
        if blocked is not None:
            return blocked
    return NodeRule(inputs, None, f"int8 MatMul for TensorRT: {what}, output float ({GUIDE}: inputs only)", "float")


# -- residual Add --------------------------------------------------------------------------------
def _data_input(node: onnx.NodeProto, ctx: Context) -> str | None:
    """The one activation an epilogue op carries on (None: not an op TensorRT fuses after a Conv)."""
    view = ctx.view
    op = node.op_type
    if op in COPY_OPS or op in ("Relu", "BatchNormalization", "MaxPool"):
        return node.input[0]
    if op == "Clip":
        return node.input[0] if all(view.is_initializer(t) for t in node.input[1:] if t) else None
    acts = [t for t in node.input if t and not view.is_initializer(t)]
    if op in ("Add", "Mul") and len(acts) == 1:  # a bias or a scale
        return acts[0]
    if op == "Mul" and len(acts) == 2:  # SiLU: x * Sigmoid(x)
        for x, s in ((acts[0], acts[1]), (acts[1], acts[0])):
            sig = view.producer.get(s)
            if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x:
                return x
    return None


def backbone(tensor: str, ctx: Context) -> onnx.NodeProto | None:
    """The Conv/ConvTranspose ``tensor`` comes out of through ops TensorRT fuses into its kernel
    (bias/scale, BatchNorm, Relu/Clip, SiLU, MaxPool, movement): ModelOpt's ``get_fusible_backbone``,
    with Clip (ReLU6) added to its Relu."""
    node = ctx.view.producer.get(tensor)
    for _ in range(MAX_EPILOGUE):
        if node is None:
            return None
        if node.op_type in ("Conv", "ConvTranspose"):
            return node
        data = _data_input(node, ctx)
        if data is None:
            return None
        node = ctx.view.producer.get(data)
    return None


def _ancestors(tensor: str, ctx: Context) -> dict[str, int]:
    """Node name -> hops up from ``tensor``'s producer (breadth first; the producer is 0)."""
    start = ctx.view.producer.get(tensor)
    if start is None:
        return {}
    dist, frontier = {ctx.node_key(start): 0}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            d = dist[ctx.node_key(node)]
            for t in node.input:
                parent = ctx.view.producer.get(t)
                if parent is not None and ctx.node_key(parent) not in dist:
                    dist[ctx.node_key(parent)] = d + 1
                    nxt.append(parent)
        frontier = nxt
    return dist


def lowest_common_ancestor(a: str, b: str, ctx: Context) -> tuple[str | None, int, int]:
    """(node, hops from a's producer, hops from b's producer) of the closest common ancestor."""
    da, db = _ancestors(a, ctx), _ancestors(b, ctx)
    common = [(da[k], db[k], k) for k in da.keys() & db.keys()]
    if not common:
        return None, -1, -1
    d1, d2, key = min(common)
    return key, d1, d2


def conv_branch(node: onnx.NodeProto, ctx: Context) -> tuple[int, onnx.NodeProto] | None:
    """(index of the input that comes from a Conv branch, that Conv) for a residual Add, or None.

    One input from a Conv (through its fused epilogue), the other not: that input, unless the
    Conv is also the closest common ancestor of both (the Conv feeds its own skip, as in ConvNeXt:
    not a residual). Both from Convs: the input farther from their closest common ancestor (the
    skip is the shorter path, e.g. a projection shortcut). ModelOpt: ``build_non_residual_input_map``.
    """
    a, b = node.input[0], node.input[1]
    ba, bb = backbone(a, ctx), backbone(b, ctx)
    if ba is None and bb is None:
        return None
    lca, da, db = lowest_common_ancestor(a, b, ctx)
    if ba is not None and bb is not None:
        if ba is bb:
            return None
        return (0, ba) if da > db else (1, bb)
    index, conv_node = (0, ba) if ba is not None else (1, bb)
    return None if lca == ctx.node_key(conv_node) else (index, conv_node)


def add(node: onnx.NodeProto, ctx: Context):
    view = ctx.view
    a, b = node.input[0], node.input[1]
    if view.is_initializer(a) or view.is_initializer(b):
        return Skip("a bias or constant Add: TensorRT fuses it into its producer's kernel; no Q/DQ")
    if a == b:
        return Skip("both inputs are the same tensor")
    found = conv_branch(node, ctx)
    if found is None:
        return NodeRule({0: Act(), 1: Act()}, None,
                        f"Add of two activations, not a Conv residual: Q/DQ on both inputs (int8 element-wise "
                        f"add, {GUIDE})", "float")
    index, conv_node = found
    skip = node.input[1 - index]
    return NodeRule({1 - index: Act()}, None,
                    f"residual Add for TensorRT: Q/DQ on the skip input {skip} only; the input from "
                    f"{ctx.node_key(conv_node)} stays float so TensorRT fuses the Add into that Conv with an int8 "
                    f"residual (TensorRT: quantize the residual input of skip connections; ModelOpt: "
                    "build_non_residual_input_map)", "float")


# -- Concat, pooling, the rest ----------------------------------------------------------------------
def concat(node: onnx.NodeProto, ctx: Context):
    out = node.output[0]
    if not any(quantizes_input(c, out, ctx) for c in ctx.view.consumers.get(out, [])):
        return Skip("no consumer reads its output quantized, so there is no Q/DQ for TensorRT to carry across it")
    inputs = {}
    for i, t in enumerate(node.input):
        if not t or ctx.view.is_initializer(t):
            continue
        other = ctx.joined_to(t)
        if other is not None:
            return Skip(f"input {t} already takes the scale of {other} (one scale group per tensor): stays float")
        inputs[i] = Joined()
    return NodeRule(inputs, Act(), f"Concat for TensorRT: its inputs take the scale of its output (the range of "
                    f"all its inputs), so TensorRT cancels the DQ->Q pairs around it and concatenates int8 "
                    f"({GUIDE}: concat elimination, one scale across inputs and output)",
                    "quantized: the range of the concatenation covers every input")


def pool(node: onnx.NodeProto, ctx: Context):
    out = node.output[0]
    producer = _quantized_producer(node.input[0], ctx)
    reader = next((c for c, t in _readers(out, ctx) if quantizes_input(c, t, ctx)), None)
    if producer is None and reader is None:
        return Skip(f"no quantized node before or after it: {node.op_type} stays float for TensorRT")
    near = ctx.node_key(reader) if reader is not None else ctx.node_key(producer)
    return NodeRule({0: Act()}, None, f"int8 {node.op_type} for TensorRT: Q/DQ on its input, beside the quantized "
                    f"{near} (TensorRT fuses DQ -> {node.op_type} -> Q into an int8 pooling kernel; {GUIDE})",
                    "float")


def activation(node: onnx.NodeProto, ctx: Context):
    producer = ctx.view.producer.get(node.input[0])
    if producer is not None and producer.op_type in LINEAR:
        return Skip(f"TensorRT fuses it into {ctx.node_key(producer)} (conv/gemm + bias + activation): no Q/DQ "
                    "between them")
    return Skip(f"TensorRT runs a standalone {node.op_type} in its input's precision: no Q/DQ of its own")


def movement(node: onnx.NodeProto, ctx: Context):
    return Skip("data movement: TensorRT moves Q/DQ across it itself (Q/DQ propagation); no Q/DQ of its own")


def other(node: onnx.NodeProto) -> Skip:
    """Any op without a rule: TensorRT fuses it with its neighbours in their precision."""
    return Skip(f"no Q/DQ on {node.op_type} for TensorRT: it runs in the precision of its neighbours ({GUIDE} "
                "quantizes the inputs of Conv/ConvTranspose/Gemm/MatMul, pooling, Add and Concat only)")


RULES = {"Conv": conv, "ConvTranspose": conv_transpose, "Gemm": gemm, "MatMul": matmul, "Add": add,
         "Concat": concat, **{op: pool for op in POOLS}, "Relu": activation, "Clip": activation,
         **{op: movement for op in MOVEMENT}}
