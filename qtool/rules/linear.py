"""Conv, Gemm and MatMul: int8 weights (per channel), int32 bias, int8 activations."""

from __future__ import annotations

import onnx

from .base import Act, Bias, Context, NodeRule, Optional, Skip, Weight, float_inputs

FUSABLE_ACTIVATIONS = ("Relu", "Clip")


def _weight_axis(ctx: Context, axis: int) -> int | None:
    return axis if ctx.options.per_channel else None


def _fused_activation(node: onnx.NodeProto, ctx: Context) -> onnx.NodeProto | None:
    """The Relu/Clip that alone consumes this node's output, if onnxruntime can fuse it
    (and it is not kept float)."""
    nxt = ctx.view.sole_consumer(node.output[0])
    if nxt is None or nxt.op_type not in FUSABLE_ACTIVATIONS or ctx.kept_float(nxt):
        return None
    if nxt.op_type == "Clip" and not _constant_clip(nxt, ctx):
        return None
    return nxt


def _constant_clip(node: onnx.NodeProto, ctx: Context) -> bool:
    bounds = [n for n in node.input[1:] if n]
    return all(ctx.view.is_initializer(n) for n in bounds)


def _output(node: onnx.NodeProto, ctx: Context, float_ok: bool):
    """Decide the output of a linear op: quantized, fused into Relu/Clip, or float.
    Returns (output spec or Skip, why, name of the fused activation node)."""
    out = node.output[0]
    act = _fused_activation(node, ctx)
    if act is not None and ctx.is_model_output(act.output[0]):
        out, act = act.output[0], None
    if act is not None:
        return None, f"quantized after the fused {act.op_type}", ctx.node_key(act)
    if ctx.is_model_output(out):
        if float_ok:
            return None, "model output stays float (int8 kernel with float output)", ""
        return Skip("output is a model output and onnxruntime has no int8 kernel with float output for this op"), "", ""
    if float_ok:
        return Optional(), "int8 only if a quantized consumer reads it, else float (int8 kernel with float output)", ""
    return Act(), "quantized", ""


FIRST_LAYER_MAX_CHANNELS = 4
FIRST_LAYER_MAX_MAC_SHARE = 0.05


def _cheap_first_layer(node: onnx.NodeProto, ctx: Context) -> Skip | None:
    """A Conv on a raw model input (an image: 1-4 channels) that does under 5% of
    the model's MACs stays float: quantizing the input adds noise to every pixel
    (measured on EfficientNet-Lite0: the input alone cost 5.5 points of top-1
    agreement) and the int8 kernel would save little time."""
    x = node.input[0]
    if x not in ctx.view.graph_inputs:
        return None
    dims = ctx.view.initializers[node.input[1]].dims
    share = ctx.mac_share(node)
    if len(dims) > 1 and dims[1] <= FIRST_LAYER_MAX_CHANNELS and share is not None and share < FIRST_LAYER_MAX_MAC_SHARE:
        return Skip(f"first layer on the raw input ({dims[1]} channels, {share:.1%} of the MACs): "
                    "quantizing the input costs accuracy and the int8 kernel would save little time")
    return None


def conv(node: onnx.NodeProto, ctx: Context):
    w = node.input[1]
    if not ctx.view.is_initializer(w):
        return Skip("weight is not a constant initializer")
    first = _cheap_first_layer(node, ctx) if ctx.override(node) is None else None
    if first is not None:
        return first
    inputs = {0: Act(), 1: Weight(_weight_axis(ctx, 0))}
    if len(node.input) > 2 and node.input[2]:
        if not ctx.view.is_initializer(node.input[2]):
            return Skip("bias is not a constant initializer")
        inputs[2] = Bias(0, 1)
    output, why, fuses = _output(node, ctx, float_ok=False)
    if isinstance(output, Skip):
        return output
    return NodeRule(inputs, output, "int8 Conv (weights per channel)" if ctx.options.per_channel else "int8 Conv", why,
                    fuses)


def gemm(node: onnx.NodeProto, ctx: Context):
    view = ctx.view
    b = node.input[1]
    if not view.is_initializer(b) or len(view.initializers[b].dims) != 2:
        return Skip("B is not a constant 2-D initializer")
    if view.attr(node, "transA", 0):
        return Skip("transA=1 has no int8 Gemm kernel")
    trans_b = view.attr(node, "transB", 0)
    inputs = {0: Act(), 1: Weight(_weight_axis(ctx, 0 if trans_b else 1))}
    n_out = view.initializers[b].dims[0 if trans_b else 1]
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        plain = view.attr(node, "alpha", 1.0) == 1.0 and view.attr(node, "beta", 1.0) == 1.0
        if view.is_initializer(c) and tuple(view.initializers[c].dims) == (n_out,) and plain:
            inputs[2] = Bias(0, 1)
        elif ctx.options.format == "qoperator":
            return Skip("C is not a 1-D bias of the output width (or alpha/beta != 1): QGemm cannot add it")
    output, why, fuses = _output(node, ctx, float_ok=True)
    return NodeRule(inputs, output, "int8 Gemm", why, fuses)


def matmul(node: onnx.NodeProto, ctx: Context):
    view = ctx.view
    a, b = node.input[0], node.input[1]
    if view.is_initializer(a):
        return Skip("constant first input: no int8 kernel for weight x activation")
    if view.is_initializer(b):
        dims = view.initializers[b].dims
        if len(dims) < 2:
            return Skip("1-D weight")
        inputs = {0: Act(), 1: Weight(_weight_axis(ctx, len(dims) - 1) if len(dims) == 2 else None)}
        what = "int8 MatMul (weights per column)" if len(dims) == 2 and ctx.options.per_channel else "int8 MatMul"
    else:
        floats = float_inputs(node, ctx)
        if floats:
            return Skip(f"activation x activation MatMul whose input {floats[0]} comes from a float op: "
                        "two Q nodes per call cost more than the int8 kernel saves")
        inputs = {0: Act(), 1: Act()}
        what = "int8 MatMul of two activations"
    output, why, fuses = _output(node, ctx, float_ok=True)
    return NodeRule(inputs, output, what, why, fuses)


def fused_activation(node: onnx.NodeProto, ctx: Context):
    """Relu/Clip right after a quantized Conv/Gemm/MatMul: its output carries the int8 range."""
    producer = ctx.fused_by(node)
    if producer is None:
        return Skip("standalone activation: no int8 kernel, stays float")
    if ctx.is_model_output(node.output[0]):
        return NodeRule({}, None, f"fused into {producer}", "model output stays float")
    return NodeRule({}, Act(), f"fused into {producer}", "quantized (range of the fused activation)")


RULES = {"Conv": conv, "Gemm": gemm, "MatMul": matmul, "Relu": fused_activation, "Clip": fused_activation}
