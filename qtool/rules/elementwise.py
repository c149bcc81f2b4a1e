"""Add/Mul of two activations, pools, Concat, Sigmoid, LeakyRelu: onnxruntime's QLinear* kernels.

Each needs int8 inputs and an int8 output to run as an integer kernel on the CPU
EP, so a node whose inputs come from float ops stays float: a Q/DQ pair at the
boundary costs more than the kernel saves.
"""

from __future__ import annotations

import onnx

from .base import Act, Context, NodeRule, Skip, float_inputs

CONCAT_RANGE_RATIO = 8.0


def _needs_int8_neighbours(node: onnx.NodeProto, ctx: Context):
    """Skip when an input is float or the output is a model output."""
    floats = float_inputs(node, ctx)
    if floats:
        return Skip(f"input {floats[0]} comes from a float op; a Q/DQ pair here costs more than the int8 kernel saves")
    if ctx.is_model_output(node.output[0]):
        return Skip("output is a model output; onnxruntime has no int8 kernel with float output for this op")
    return None


def binary(node: onnx.NodeProto, ctx: Context):
    """Add/Mul of two activations (residual connections): QLinearAdd/QLinearMul."""
    a, b = node.input[0], node.input[1]
    if ctx.view.is_initializer(a) or ctx.view.is_initializer(b):
        return Skip("one input is a constant (a bias or scale): stays float, fused by the producer's kernel")
    if a == b:
        return Skip("both inputs are the same tensor")
    blocked = _needs_int8_neighbours(node, ctx)
    if blocked:
        return blocked
    return NodeRule({0: Act(), 1: Act()}, Act(), f"int8 {node.op_type} of two activations (QLinear{node.op_type})",
                    "quantized")


def unary(node: onnx.NodeProto, ctx: Context):
    """Pools, Sigmoid, LeakyRelu: one int8 input, int8 output with its own range."""
    blocked = _needs_int8_neighbours(node, ctx)
    if blocked:
        return blocked
    if node.op_type == "AveragePool" and ctx.view.attr(node, "count_include_pad", 0) and ctx.view.attr(node, "pads"):
        return Skip("AveragePool with count_include_pad has no int8 kernel")
    return NodeRule({0: Act()}, Act(), f"int8 {node.op_type} (QLinear{node.op_type})", "quantized")


def concat(node: onnx.NodeProto, ctx: Context):
    """Concat: int8 only when its inputs' ranges are comparable.

    A detection head concatenating box coordinates in pixels with scores in
    [0, 1] would lose every score under one output scale.
    """
    blocked = _needs_int8_neighbours(node, ctx)
    if blocked:
        return blocked
    inputs = [t for t in node.input if t]
    if ctx.ranges is not None:
        widths = [ctx.ranges[t][1] - ctx.ranges[t][0] for t in inputs if t in ctx.ranges]
        if widths and min(widths) > 0 and max(widths) / min(widths) > CONCAT_RANGE_RATIO:
            return Skip(f"input ranges differ {max(widths) / min(widths):.0f}x (more than {CONCAT_RANGE_RATIO:g}x): "
                        "one output scale would crush the smaller inputs")
    return NodeRule({i: Act() for i, t in enumerate(node.input) if t}, Act(), "int8 Concat (QLinearConcat)",
                    "quantized")


RULES = {"Add": binary, "Mul": binary, "AveragePool": unary, "GlobalAveragePool": unary, "Sigmoid": unary,
         "LeakyRelu": unary, "Concat": concat}
