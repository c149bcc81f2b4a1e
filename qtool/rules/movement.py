"""Ops that only move or select data: their output shares the input's parameters,
and onnxruntime drops the Q/DQ pair around them (they run on int8 data)."""

from __future__ import annotations

import onnx

from ..types import Precision, Target
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


TABLE_KERNEL = "GatherBlockQuantized"
MIN_BLOCK = 16  # GatherBlockQuantized's smallest block (a power of two)


def row_block(width: int) -> int | None:
    """GatherBlockQuantized's block for a table row of ``width``: the row itself when it is a
    power of two, else its largest power-of-two divisor of at least 16 (384 -> 128: three
    scales per row); None when there is none (the kernel needs whole blocks)."""
    if width < MIN_BLOCK:
        return None
    block = width & -width  # largest power of two dividing the width
    return block if block >= MIN_BLOCK else None


def _rows_gathered(node: onnx.NodeProto, ctx: Context) -> int | None:
    """The block for per-row table scales (GatherBlockQuantized, uint8, bits 8), or None
    where the table keeps one scale: onnxruntime's CPU EP runs the contrib kernel (QDQ
    format; QOperator writes its own Gather) and every Gather of the table is along its rows."""
    view = ctx.view
    if ctx.facts.target is not Target.CPU or (ctx.options.format != "qdq" and ctx.options.mode != "dynamic"):
        return None
    table = node.input[0]
    if view.attr(node, "axis", 0) != 0:
        return None
    if any(c.input[0] != table or view.attr(c, "axis", 0) != 0 for c in view.consumers.get(table, [])):
        return None
    return row_block(view.initializers[table].dims[1])


def gather(node: onnx.NodeProto, ctx: Context):
    """Gather from an embedding table. Where onnxruntime can run it (see _rows_gathered),
    the table is uint8 with one scale and zero point per row (per block of the row), read by
    com.microsoft.GatherBlockQuantized, which dequantizes only the gathered rows and
    outputs float. Otherwise the table is 8-bit per tensor and the gathered rows share its
    parameters (onnxruntime gathers 8-bit rows)."""
    table = node.input[0]
    if not ctx.view.is_initializer(table):
        if ctx.is_int8_capable(table):
            return movement(node, ctx)
        return Skip("gathers from a float activation")
    if ctx.view.rank(table) != 2 or not ctx.view.is_float(table):
        return Skip("not a 2-D float embedding table")
    other = next((c for c in ctx.view.consumers.get(table, []) if c.op_type != "Gather"), None)
    if other is not None:
        return Skip(f"the table is also the weight of {other.op_type} {ctx.node_key(other)} (tied), which decides "
                    "how it is quantized: the Gather reads it as that node's weight")
    table_type = ctx.override(node) or ctx.options.activation_precision
    if not table_type.is_integer or table_type.bits != 8:
        return Skip(f"{table_type.label} embedding table: tables are int8 or uint8 only")
    block = _rows_gathered(node, ctx)
    if block is not None:
        width = ctx.view.initializers[table].dims[1]
        per = "per row" if block == width else f"per block of {block} ({width // block} per row)"
        return NodeRule({0: Weight(1, Precision.UINT8, symmetric=False, matmul=False, block=block)}, None,
                        f"uint8 embedding table, scales {per}: GatherBlockQuantized dequantizes the gathered rows",
                        "float rows", kernel=TABLE_KERNEL)
    if ctx.is_model_output(node.output[0]):
        return Skip("output is a model output and stays float")
    return NodeRule({0: Weight(None, table_type, symmetric=False, matmul=False)}, Share(0),
                    f"{table_type.label} embedding table (rows gathered as {table_type.label})",
                    f"shares the parameters of the table {table}")


RULES = {**{op: movement for op in MOVEMENT_OPS}, "Gather": gather}
