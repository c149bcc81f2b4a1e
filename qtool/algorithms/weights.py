"""The weight algorithms ("rounding", "bias_correction"): after resolve, on the resolved plan.

They change only the integer codes the rewriter writes for a quantized weight (rounding) or
an int32 bias (bias correction), stored in the tensor's ``codes``; scales and zero points stay
as resolved. The plan records where each ran and what it measured (``Plan.applied``) and one
note each, and ``quantize --plan`` writes the same codes again without data.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from ..errors import QtoolError
from ..graph import GraphView
from ..plans import Plan
from ..resolve import stored_weight
from . import weight_algorithms
from .layers import encode, find_layers, input_stats, weight_codes

def needs_data_error(names) -> QtoolError:
    return QtoolError(f"--algorithms {','.join(names)} measure each layer on calibration data: give --data "
                      "(a --table holds activation ranges only, not the layers' inputs)")


def apply(plan: Plan, model, data, batch_size: int, limit: int | None, names) -> Plan:
    """Run the weight algorithms among ``names`` on a resolved static ``plan`` of ``model``
    (the prepared fp32 model) with calibration ``data`` (a Dataset)."""
    names = weight_algorithms(names)
    if not names:
        return plan
    if plan.mode != "static":
        raise QtoolError(f"--algorithms {','.join(names)} apply to static int8 plans (not {plan.mode})")
    if data is None:
        raise needs_data_error(names)
    view = GraphView(model)
    layers, skipped = find_layers(plan, view)
    if not layers:
        return replace(plan, notes=plan.notes + tuple(f"{n}: no quantized Conv/Gemm/MatMul weight to treat"
                                                      for n in names))
    start = time.perf_counter()
    stats, samples = input_stats(model, layers, data, batch_size, limit)
    layers = [l for l in layers if l.node in stats]
    seconds = time.perf_counter() - start
    for name in names:
        start = time.perf_counter()
        if name == "rounding":
            plan, gains, total = _rounding(plan, view, layers, stats)
            how = f"GPTQ on each layer's fp32 input Hessian from {samples} samples"
        else:
            plan, gains, total = _bias_correction(plan, view, layers, stats)
            how = f"fast form, the mean input rows of {samples} samples"
        took = seconds + time.perf_counter() - start
        seconds = 0.0
        plan = replace(plan, applied=dict(plan.applied, **{name: gains}),
                       notes=plan.notes + (_summary(name, gains, total, how, took),))
    if skipped:
        plan = replace(plan, notes=plan.notes + (f"{', '.join(names)}: {len(skipped)} layer(s) left alone "
                                                 f"({'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})",))
    return plan


def _summary(name: str, gains: dict, total: int, how: str, seconds: float) -> str:
    if not total:
        return (f"{name}: no layer to treat (only a Conv or Gemm with an int32 bias input takes a correction; "
                "a MatMul's bias is a separate Add)" if name == "bias_correction" else f"{name}: no layer to treat")
    median = f", median {np.median(list(gains.values())):+.2f} dB" if gains else ""
    return f"{name}: {len(gains)} of {total} layers{median} ({how}; {seconds:.0f} s)"


def _rounding(plan: Plan, view: GraphView, layers, stats) -> tuple[Plan, dict, int]:
    from .rounding import round_layer
    tensors, gains = dict(plan.tensors), {}
    for l in layers:
        t = tensors[l.weight]
        codes, gain = round_layer(l, t, stored_weight(t, view), weight_codes(t, view), stats[l.node])
        if codes is not None:
            tensors[l.weight] = replace(t, codes=encode(codes))
            gains[l.node] = round(gain, 3)
    return plan.with_tensors(tensors), gains, len(layers)


def _bias_correction(plan: Plan, view: GraphView, layers, stats) -> tuple[Plan, dict, int]:
    from . import bias_correction as bc
    layers = [l for l in layers if l.bias is not None and _plain(view, l)]
    tensors, gains = dict(plan.tensors), {}
    for l in layers:
        t_w = tensors[l.weight]
        shift, ehe, es = bc.fast_shift(l, t_w, stored_weight(t_w, view), weight_codes(t_w, view), stats[l.node])
        b = view.array(l.bias).astype(np.float64).reshape(-1)
        codes, new = bc.corrected(tensors[l.bias], view, shift)
        before = bc.written_bias(tensors[l.bias], view).reshape(-1) - b
        gain = bc.fast_gain(ehe, es, stats[l.node].n, (before, new.reshape(-1) - b))
        if gain > 0:
            tensors[l.bias] = replace(tensors[l.bias], codes=encode(codes))
            gains[l.node] = round(gain, 3)
    return plan.with_tensors(tensors), gains, len(layers)


def _plain(view: GraphView, l) -> bool:
    """A Gemm that adds its bias as is (alpha = beta = 1), or a Conv, with one bias value per output channel."""
    node = view.by_name[l.node]
    if l.op_type == "Gemm" and (view.attr(node, "alpha", 1.0) != 1.0 or view.attr(node, "beta", 1.0) != 1.0):
        return False
    dims = view.initializers[l.weight].dims
    channels = dims[1] if l.rows_t else dims[0]
    return int(np.prod(view.initializers[l.bias].dims)) == channels
