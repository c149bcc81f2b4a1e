"""Ops that only move or select data: their output shares the input's parameters,
and onnxruntime drops the Q/DQ pair around them (they run on int8 data)."""

from __future__ import annotations

import onnx

from .base import Context, NodeRule, Share, Skip, Weight

MOVEMENT_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Slice",
                "DepthToSpace", "SpaceToDepth")


def movement(node: onnx.NodeProto, ctx: Context):
    data = node.input[0]
    if not ctx.is_int8_capable(data):
        return Skip("input is not quantized; nothing to pass through")
    if len([o for o in node.output if o]) != 1:
        return Skip("extra outputs (e.g. MaxPool indices)")
    if ctx.is_model_output(node.output[0]):
        return Skip("output is a model output and stays float")
    if node.op_type == "Resize" and ctx.view.attr(node, "mode", b"nearest") not in (b"nearest", "nearest", b"linear", "linear"):
        return Skip("cubic Resize can overshoot its input range")
    return NodeRule({}, Share(0), "runs on int8 data", f"shares the parameters of {data}")


def gather(node: onnx.NodeProto, ctx: Context):
    """Gather from an embedding table: the table is int8 per tensor and the
    gathered rows share its parameters (onnxruntime gathers int8 rows)."""
    table = node.input[0]
    if not ctx.view.is_initializer(table):
        if ctx.is_int8_capable(table):
            return movement(node, ctx)
        return Skip("gathers from a float activation")
    if ctx.view.rank(table) != 2 or not ctx.view.is_float(table):
        return Skip("not a 2-D float embedding table")
    if ctx.is_model_output(node.output[0]):
        return Skip("output is a model output and stays float")
    table_type = ctx.override(node) or ctx.options.activation_precision
    if not table_type.is_integer or table_type.bits != 8:
        return Skip(f"{table_type.label} embedding table: tables are int8 or uint8 only")
    return NodeRule({0: Weight(None, table_type, symmetric=False, matmul=False)}, Share(0),
                    f"{table_type.label} embedding table (rows gathered as {table_type.label})",
                    f"shares the parameters of the table {table}")


RULES = {**{op: movement for op in MOVEMENT_OPS}, "Gather": gather}
