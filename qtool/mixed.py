"""Static or dynamic per node (``--dynamic auto|NODES``).

In a static int8 plan every MatMul/Gemm reads its input through a QuantizeLinear whose range
was calibrated once. Where that range fits the data of each run badly (a few outlier batches
stretched it, or it varies from run to run), onnxruntime's DynamicQuantizeMatMul does better:
it quantizes the input at run time over that run's own min/max (uint8, per tensor) and folds
the bias Add in. onnxruntime runs both kinds in one graph (the static QDQ groups fuse into
MatMulIntegerToFloat/QLinearMatMul as usual; the dynamic node is a contrib kernel of its own).

``auto`` decides per node by measured error: on the calibration data, the fp32 model's input
X of every candidate is fed, batch by batch (a batch is one run, as for the kernel), through
both quantizers with the weights as each plan writes them, and the matrix product's error
against fp32 is summed: SQNR = 10 log10(sum Y^2 / sum (Y_q - Y)^2). A node goes dynamic
where it gains at least ``MARGIN_DB``; ``Plan.applied["dynamic"]`` holds each such node's gain.
Candidates are the quantized MatMul/Gemm with a constant weight whose input comes from a float
node or a model input: reading it unquantized then costs nothing else (a quantized producer
would have to give up its integer output).

Worked example: a node whose static SQNR is 22.0 dB and dynamic 25.5 dB gains 3.5 dB (its
output error energy falls to 45 %) and goes dynamic; one at 30.1 vs 30.6 dB stays static.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import numpy as np
import onnx

from .calib.collect import augment
from .errors import ConfigError, QtoolError
from .graph import GraphView
from .plans import Plan
from .qparams import choose_qparams, dequantize, fake_quantize
from .resolve import as_array, stored_weight
from .rules.dynamic import KERNELS
from .types import Precision

MARGIN_DB = 1.0    # a dynamic input costs one more pass over X (its min/max); ask for a clear gain
SAMPLES = 64       # calibration samples measured (MiniLM: 64 sentences x 128 tokens, ~10 s on 2 cores)

PlanWith = Callable[[frozenset], Plan]


def choose(static: Plan, model: onnx.ModelProto, wanted: tuple[str, ...], plan_with: PlanWith,
           batches: Callable[[], Iterable[dict]] | None) -> Plan:
    """The plan with the chosen MatMul/Gemm dynamic. ``wanted``: ("auto",) or node names / op
    types; ``plan_with(nodes)`` plans and resolves with those nodes dynamic; ``batches()``
    yields the calibration batches (None: no data, which ``auto`` needs)."""
    view = GraphView(model)
    if wanted != ("auto",):
        nodes = _named(wanted, view)
        chosen = plan_with(nodes)
        made = [n.name for n in chosen.nodes if n.kernel in KERNELS]
        note = (f"dynamic: {len(made)} of {len(nodes)} requested MatMul/Gemm quantized at run time"
                + ("" if len(made) == len(nodes) else " (the others have no constant 2-D weight or float input)"))
        return replace(chosen, notes=chosen.notes + (note,))
    if batches is None:
        raise QtoolError("--dynamic auto measures each MatMul/Gemm's error on calibration data: give --data "
                         "(a table holds ranges, not activations), or name the nodes")
    candidates = frozenset(candidates_of(static, view))
    trial = plan_with(candidates) if candidates else static
    nodes = [n.name for n in trial.nodes if n.kernel in KERNELS]
    sqnr = measure(model, static, trial, nodes, batches()) if nodes else {}
    gains = {k: round(d - s, 3) for k, (s, d) in sqnr.items()}
    picked = {k: g for k, g in gains.items() if g >= MARGIN_DB}
    final = plan_with(frozenset(picked)) if picked else static
    final = _explained(final, sqnr, picked)
    applied = dict(final.applied, dynamic=picked) if picked else final.applied
    median = f", median gain {np.median(list(picked.values())):+.1f} dB" if picked else ""
    note = (f"dynamic auto: {len(picked)} of {len(nodes)} MatMul/Gemm quantized at run time, where their "
            f"output SQNR on the calibration data beat the static range by >= {MARGIN_DB:g} dB{median}")
    return replace(final, applied=applied, notes=final.notes + (note,))


def _named(wanted: tuple[str, ...], view: GraphView) -> frozenset:
    from .planner import unknown_key
    names = {view.node_name(n): n.op_type for n in view.nodes}
    out = set()
    for key in wanted:
        if key == "auto":
            raise ConfigError("--dynamic auto measures and chooses on its own: give it alone, or name nodes")
        hits = [k for k, op in names.items() if k == key or op == key]
        if not hits:
            raise unknown_key("--dynamic", key, list(names))
        out.update(k for k in hits if names[k] in ("MatMul", "Gemm"))
    return frozenset(out)


def candidates_of(plan: Plan, view: GraphView) -> list[str]:
    """Quantized MatMul/Gemm with a constant weight whose input is a model input or a float node's output."""
    out = []
    for n in plan.nodes:
        if n.op_type not in ("MatMul", "Gemm") or not n.quantized or n.fused_into:
            continue
        node = view.by_name[n.name]
        if not view.is_initializer(node.input[1]) or view.is_initializer(node.input[0]):
            continue
        producer = view.producer.get(node.input[0])
        if producer is None or not plan.node(view.node_name(producer)).quantized:
            out.append(n.name)
    return out


def measure(model: onnx.ModelProto, static: Plan, dynamic: Plan, nodes: list[str],
            batches: Iterable[dict]) -> dict[str, tuple[float, float]]:
    """Per node, (static SQNR, dynamic SQNR) in dB of its matrix product on ``batches`` (at most
    ``SAMPLES`` samples), against the fp32 product of the same fp32 input."""
    from . import runtime
    view = GraphView(model)
    layers = {k: _Layer(view, view.by_name[k], static, dynamic) for k in nodes}
    inputs = list(dict.fromkeys(layer.x for layer in layers.values()))
    sess = runtime.session(augment(model, inputs), threads=2)
    seen = 0
    for feeds in batches:
        if seen >= SAMPLES:
            break
        seen += len(next(iter(feeds.values())))
        values = dict(zip(inputs, runtime.run(sess, feeds, inputs)))
        for layer in layers.values():
            layer.add(values[layer.x])
    return {k: layer.sqnr() for k, layer in layers.items()}


class _Layer:
    """One MatMul/Gemm: its fp32 weight [K, N], the static and dynamic plans' dequantized
    weights, the static input's parameters, and the running sums of the signal and both errors."""

    def __init__(self, view: GraphView, node: onnx.NodeProto, static: Plan, dynamic: Plan):
        self.x = node.input[0]
        trans_b = node.op_type == "Gemm" and bool(view.attr(node, "transB", 0))
        w = view.array(node.input[1]).astype(np.float32)
        self.w = w.T if trans_b else w
        self.w_static = _dequantized(static, node.input[1], view, trans_b)
        self.w_dynamic = _dequantized(dynamic, node.input[1], view, trans_b)
        t = static.tensors[self.x]
        self.act = (as_array(t.scale, np.float32), as_array(t.zero_point, np.int64), t.precision)
        self.sums = np.zeros(3)

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, self.w.shape[0]).astype(np.float32)
        y = x @ self.w
        scale, zp, precision = self.act
        y_static = fake_quantize(x, scale, zp, precision) @ self.w_static
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)  # DynamicQuantizeLinear: uint8, this run's range
        d_scale, d_zp = choose_qparams(lo, hi, Precision.UINT8, False)
        y_dynamic = fake_quantize(x, d_scale, d_zp, Precision.UINT8) @ self.w_dynamic
        self.sums += [np.square(y, dtype=np.float64).sum(), np.square(y_static - y, dtype=np.float64).sum(),
                      np.square(y_dynamic - y, dtype=np.float64).sum()]

    def sqnr(self) -> tuple[float, float]:
        signal, static, dynamic = self.sums
        return tuple(float(10 * np.log10(signal / max(e, 1e-30))) for e in (static, dynamic))


def _dequantized(plan: Plan, name: str, view: GraphView, trans_b: bool) -> np.ndarray:
    """The weight as ``plan`` writes it, dequantized, as [K, N]."""
    from .rewrite.weights import quantize_weight
    t = plan.tensors[name]
    q, scale, zp = quantize_weight(stored_weight(t, view), t)
    w = dequantize(q, scale, zp, t.axis if np.ndim(scale) else None)
    return w.T if trans_b and not t.transpose else w


def _explained(plan: Plan, sqnr: dict, picked: dict) -> Plan:
    """Each measured node's reason says what was measured and which way it went."""
    nodes = []
    for n in plan.nodes:
        if n.name in sqnr:
            s, d = sqnr[n.name]
            how = "dynamic" if n.name in picked else "static"
            n = replace(n, reason=f"{n.reason}; output SQNR {s:.1f} dB static, {d:.1f} dB dynamic: {how}")
        nodes.append(n)
    return replace(plan, nodes=tuple(nodes))

