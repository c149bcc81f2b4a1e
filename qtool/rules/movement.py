"""Ops that only move or select data: their output shares the input's parameters."""

from __future__ import annotations

import onnx

from .base import Context, NodeRule, Share, Skip

MOVEMENT_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


def movement(node: onnx.NodeProto, ctx: Context):
    data = node.input[0]
    if not ctx.is_quantized(data):
        return Skip("input is not quantized; nothing to pass through")
    if len([o for o in node.output if o]) != 1:
        return Skip("extra outputs (e.g. MaxPool indices)")
    if ctx.is_model_output(node.output[0]):
        return Skip("output is a model output and stays float")
    return NodeRule({}, Share(0), "runs on int8 data", f"shares the parameters of {data}")


RULES = {op: movement for op in MOVEMENT_OPS}
