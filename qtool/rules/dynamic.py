"""Dynamic mode: int8 weights, activations quantized at run time (no calibration).

MatMul/Gemm with a constant weight become onnxruntime's DynamicQuantizeMatMul
(uint8 activations quantized per batch, int8 weights per column), and a bias
Add right after is folded into it. Embedding tables are int8 with their rows
gathered as int8, exactly as in static mode (their parameters come from the
table itself, so no calibration is needed).
"""

from __future__ import annotations

import onnx

from .base import Context, NodeRule, Skip, Weight
from .movement import gather

KERNEL = "DynamicQuantizeMatMul"
SHARED_KERNEL = "MatMulIntegerToFloat"  # after one DynamicQuantizeLinear shared by several MatMuls
KERNELS = (KERNEL, SHARED_KERNEL)  # every kernel a dynamically quantized MatMul/Gemm becomes
MIN_MAC_SHARE = 0.01


class Dynamic:
    """An activation quantized at run time."""


def _weight(node: onnx.NodeProto, ctx: Context) -> tuple[str, bool] | None:
    """(weight name, stored transposed) of a MatMul/Gemm with a constant 2-D weight."""
    view = ctx.view
    w = node.input[1]
    if not view.is_initializer(w) or len(view.initializers[w].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return w, False
    if view.attr(node, "transA", 0) or view.attr(node, "alpha", 1.0) != 1.0 or view.attr(node, "beta", 1.0) != 1.0:
        return None
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        if not view.is_initializer(c) or len(view.initializers[c].dims) != 1:
            return None
    return w, bool(view.attr(node, "transB", 0))


def linear(node: onnx.NodeProto, ctx: Context):
    """The weight is stored [K, N] (a transB Gemm's weight transposed) and quantized
    per column (axis 1), as onnxruntime's dynamic kernels expect."""
    found = _weight(node, ctx)
    if found is None:
        return Skip("no constant 2-D weight: dynamic mode quantizes weights of MatMul/Gemm only")
    _, transpose = found
    share = ctx.mac_share(node)
    if share is not None and share < MIN_MAC_SHARE and ctx.override(node) is None:
        return Skip(f"{share:.2%} of the model's MACs: too small for run-time input quantization to pay off")
    if not ctx.view.is_float(node.input[0]):
        return Skip(f"input {node.input[0]} is not float32")
    add = _bias_add(node, ctx)
    bias = ""
    if add is not None:
        bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
    axis = 1 if ctx.options.per_channel else None
    return NodeRule({0: Dynamic(), 1: Weight(axis, transpose=transpose)}, None,
                    "int8 weights, activations quantized at run time", "float",
                    fuses=ctx.node_key(add) if add is not None else "", kernel=KERNEL, bias=bias)


def _bias_add(node: onnx.NodeProto, ctx: Context):
    """Add(y, b) with a constant 1-D b of the output width, right after a MatMul."""
    if node.op_type != "MatMul":
        return None
    nxt = ctx.view.sole_consumer(node.output[0])
    if nxt is None or nxt.op_type != "Add" or ctx.kept_float(nxt):
        return None
    other = nxt.input[1] if nxt.input[0] == node.output[0] else nxt.input[0]
    dims = ctx.view.initializers[other].dims if ctx.view.is_initializer(other) else None
    n_out = ctx.view.initializers[node.input[1]].dims[1]
    return nxt if dims is not None and list(dims) == [n_out] else None


def bias_add(node: onnx.NodeProto, ctx: Context):
    producer = ctx.fused_by(node)
    if producer is not None:
        return NodeRule({}, None, f"bias folded into {producer}")
    return Skip("dynamic mode leaves Add in float")


RULES = {"MatMul": linear, "Gemm": linear, "Gather": gather, "Add": bias_add}
