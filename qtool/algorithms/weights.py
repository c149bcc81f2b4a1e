"""The weight algorithms ("rounding", "bias_correction"): after resolve, on the resolved plan.

They change only the integer codes the rewriter writes for a quantized weight (rounding) or
an int32 bias (bias correction), stored in the tensor's ``codes``; scales and zero points stay
as resolved. The plan records where each ran and what it measured (``Plan.applied``) and one
note each, and ``quantize --plan`` writes the same codes again without data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import QtoolError
from ..graph import GraphView
from ..plans import Plan
from ..resolve import stored_weight
from . import weight_algorithms
from .layers import InputStats, encode, find_layers, grid, input_stats, weight_codes


@dataclass
class Reuse:
    """What the weight algorithms may carry from one plan of a prepared model and its calibration
    data to the next (the accuracy search treats every candidate plan): each layer's fp32 input
    statistics, which do not depend on the plan, and each layer's result per quantization of its
    weight (and bias), which a candidate mostly shares with the base plan, with the seconds each
    took (a plan's note gives what its results cost, computed now or reused). ``passes`` counts the
    fp32 passes over the data, ``seconds`` their time."""

    stats: dict[str, InputStats] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)   # layers the data never reached
    samples: int = 0
    passes: int = 0
    seconds: float = 0.0
    results: dict[tuple, tuple[str | None, float, float]] = field(default_factory=dict)  # -> (codes, gain, s)


def needs_data_error(names) -> QtoolError:
    return QtoolError(f"--algorithms {','.join(names)} measure each layer on calibration data: give --data "
                      "(a --table holds activation ranges only, not the layers' inputs)")


def apply(plan: Plan, model, data, batch_size: int, limit: int | None, names, reuse: Reuse | None = None) -> Plan:
    """Run the weight algorithms among ``names`` on a resolved static ``plan`` of ``model``
    (the prepared fp32 model) with calibration ``data`` (a Dataset). ``reuse``: statistics and
    results kept from earlier calls on the same model and data (filled in here)."""
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
        why = f" ({'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})" if skipped else ""
        return replace(plan, notes=plan.notes + tuple(f"{n}: no quantized Conv/Gemm/MatMul weight to treat{why}"
                                                      for n in names))
    reuse = reuse if reuse is not None else Reuse()
    stats, samples = _stats(model, layers, data, batch_size, limit, reuse)
    layers = [l for l in layers if l.node in stats]
    seconds = reuse.seconds
    for name in names:
        if name == "rounding":
            plan, gains, total, took = _rounding(plan, view, layers, stats, reuse.results)
            how = f"GPTQ on each layer's fp32 input Hessian from {samples} samples"
        else:
            plan, gains, total, took = _bias_correction(plan, view, layers, stats, reuse.results)
            how = f"fast form, the mean input rows of {samples} samples"
        took += seconds
        seconds = 0.0
        plan = replace(plan, applied=dict(plan.applied, **{name: gains}),
                       notes=plan.notes + (_summary(name, gains, total, how, took),))
    if skipped:
        plan = replace(plan, notes=plan.notes + (f"{', '.join(names)}: {len(skipped)} layer(s) left alone "
                                                 f"({'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})",))
    return plan


def _stats(model, layers, data, batch_size: int, limit: int | None, reuse: Reuse
           ) -> tuple[dict[str, InputStats], int]:
    """The layers' input statistics: those ``reuse`` holds, one fp32 pass for the others."""
    missing = [l for l in layers if l.node not in reuse.stats and l.node not in reuse.absent]
    if missing:
        start = time.perf_counter()
        found, reuse.samples = input_stats(model, missing, data, batch_size, limit)
        reuse.passes += 1
        reuse.seconds += time.perf_counter() - start
        reuse.stats.update(found)
        reuse.absent.update(l.node for l in missing if l.node not in found)
    return {l.node: reuse.stats[l.node] for l in layers if l.node in reuse.stats}, reuse.samples


def _params(t) -> tuple:
    """What a layer's result depends on in the plan besides its weight: the tensor's quantization."""
    return (t.precision.label, t.scale, t.zero_point, grid(t), t.codes)


def _summary(name: str, gains: dict, total: int, how: str, seconds: float) -> str:
    if not total:
        return (f"{name}: no layer to treat (only a Conv or Gemm with an int32 bias input takes a correction; "
                "a MatMul's bias is a separate Add)" if name == "bias_correction" else f"{name}: no layer to treat")
    median = f", median {np.median(list(gains.values())):+.2f} dB" if gains else ""
    return f"{name}: {len(gains)} of {total} layers{median} ({how}; {seconds:.0f} s)"


def _rounding(plan: Plan, view: GraphView, layers, stats, results: dict) -> tuple[Plan, dict, int, float]:
    from .rounding import round_layer
    tensors, gains, took = dict(plan.tensors), {}, 0.0
    for l in layers:
        t = tensors[l.weight]
        key = ("rounding", l.node, _params(t))
        if key not in results:
            start = time.perf_counter()
            codes, gain = round_layer(l, t, stored_weight(t, view), weight_codes(t, view), stats[l.node])
            results[key] = (encode(codes) if codes is not None else None, gain, time.perf_counter() - start)
        codes, gain, seconds = results[key]
        took += seconds
        if codes is not None:
            tensors[l.weight] = replace(t, codes=codes)
            gains[l.node] = round(gain, 3)
    return plan.with_tensors(tensors), gains, len(layers), took


def _bias_correction(plan: Plan, view: GraphView, layers, stats, results: dict) -> tuple[Plan, dict, int, float]:
    layers = [l for l in layers if l.bias is not None and _plain(view, l)]
    tensors, gains, took = dict(plan.tensors), {}, 0.0
    for l in layers:
        key = ("bias_correction", l.node, _params(tensors[l.weight]), _params(tensors[l.bias]))
        if key not in results:
            start = time.perf_counter()
            results[key] = _correct(l, view, tensors, stats[l.node]) + (time.perf_counter() - start,)
        codes, gain, seconds = results[key]
        took += seconds
        if codes is not None:
            tensors[l.bias] = replace(tensors[l.bias], codes=codes)
            gains[l.node] = round(gain, 3)
    return plan.with_tensors(tensors), gains, len(layers), took


def _correct(l, view: GraphView, tensors, stats: InputStats) -> tuple[str | None, float]:
    """One layer's corrected int32 bias codes (None where the correction gains nothing) and the gain in dB."""
    from . import bias_correction as bc
    t_w = tensors[l.weight]
    shift, ehe, es = bc.fast_shift(l, t_w, stored_weight(t_w, view), weight_codes(t_w, view), stats)
    b = view.array(l.bias).astype(np.float64).reshape(-1)
    codes, new = bc.corrected(tensors[l.bias], view, shift)
    before = bc.written_bias(tensors[l.bias], view).reshape(-1) - b
    gain = bc.fast_gain(ehe, es, stats.n, (before, new.reshape(-1) - b))
    return (encode(codes) if gain > 0 else None), gain


def _plain(view: GraphView, l) -> bool:
    """A Gemm that adds its bias as is (alpha = beta = 1), or a Conv, with one bias value per output channel."""
    node = view.by_name[l.node]
    if l.op_type == "Gemm" and (view.attr(node, "alpha", 1.0) != 1.0 or view.attr(node, "beta", 1.0) != 1.0):
        return False
    dims = view.initializers[l.weight].dims
    channels = dims[1] if l.rows_t else dims[0]
    return int(np.prod(view.initializers[l.bias].dims)) == channels
