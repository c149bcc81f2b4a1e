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
MIN_MAC_SHARE = 0.01


class Dynamic:
    """An activation quantized at run time."""


def _weight(node: onnx.NodeProto, ctx: Context):
    view = ctx.view
    if node.op_type == "MatMul":
        w = node.input[1]
        if not view.is_initializer(w) or len(view.initializers[w].dims) != 2:
            return None
        return w, 1 if ctx.options.per_channel else None
    if view.attr(node, "transA", 0) or view.attr(node, "alpha", 1.0) != 1.0 or view.attr(node, "beta", 1.0) != 1.0:
        return None
    w = node.input[1]
    if not view.is_initializer(w) or len(view.initializers[w].dims) != 2:
        return None
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        if not view.is_initializer(c) or len(view.initializers[c].dims) != 1:
            return None
    return w, (0 if view.attr(node, "transB", 0) else 1) if ctx.options.per_channel else None


def linear(node: onnx.NodeProto, ctx: Context):
    found = _weight(node, ctx)
    if found is None:
        return Skip("no constant 2-D weight: dynamic mode quantizes weights of MatMul/Gemm only")
    _, axis = found
    share = ctx.mac_share(node)
    if share is not None and share < MIN_MAC_SHARE:
        return Skip(f"{share:.2%} of the model's MACs: too small for run-time input quantization to pay off")
    if not ctx.view.is_float(node.input[0]):
        return Skip(f"input {node.input[0]} is not float32")
    bias = _bias_add(node, ctx)
    if bias is not None:
        ctx.fused[ctx.node_key(bias)] = ctx.node_key(node)
    return NodeRule({0: Dynamic(), 1: Weight(axis)}, None, "int8 weights, activations quantized at run time",
                    "float")


def _bias_add(node: onnx.NodeProto, ctx: Context):
    """Add(y, b) with a constant 1-D b of the output width, right after a MatMul."""
    if node.op_type != "MatMul":
        return None
    nxt = ctx.view.sole_consumer(node.output[0])
    if nxt is None or nxt.op_type != "Add":
        return None
    other = nxt.input[1] if nxt.input[0] == node.output[0] else nxt.input[0]
    dims = ctx.view.initializers[other].dims if ctx.view.is_initializer(other) else None
    n_out = ctx.view.initializers[node.input[1]].dims[1]
    return nxt if dims is not None and list(dims) == [n_out] else None


def bias_add(node: onnx.NodeProto, ctx: Context):
    key = ctx.node_key(node)
    if key in ctx.fused:
        return NodeRule({}, None, f"bias folded into {ctx.fused[key]}")
    return Skip("dynamic mode leaves Add in float")


RULES = {"MatMul": linear, "Gemm": linear, "Gather": gather, "Add": bias_add}
