"""Which nodes of an fp16 model stay float32, decided by measured error.

The suspects (:func:`suspect_groups`), by kind, in the order they are tried:

- ``exp``: an Exp, and the ReduceSum/ReduceMean and Div that normalise it (a hand-built
  softmax): exp(x) overflows fp16's 65504 above x = 11.09;
- ``square``: a square (Pow with exponent >= 2, x·x, ReduceSumSquare/ReduceL2) and the
  reduction, epsilon Add, Sqrt and Div it feeds (a hand-built LayerNorm/RMSNorm's variance):
  x² overflows above |x| = 256;
- ``softmax``: Softmax, LogSoftmax;
- ``norm``: LayerNormalization, InstanceNormalization, GroupNormalization, BatchNormalization;
- ``last``: the last layer, from each model output back to its Conv/MatMul/Gemm.

:func:`measured_keep` runs the all-fp16 model, as the CUDA EP stores it (float32 with every
fp16 tensor rounded to fp16: :mod:`qtool.rewrite.half_emulation`; the CPU EP itself computes most
fp16 chains in float32 and would hide an overflow), and the fp32 reference (for an int4 base, the
int4 model with float32 activations, so only fp16's share of the error is judged) on the data
and compares every output: SNR (signal over error power, in dB) and the cosine of each
sample, minimum over samples and outputs. fp16 rounds each value with a relative error of at
most 2^-11 (4.9e-4, ~66 dB for one rounding); a network's outputs collect many such roundings,
and TARGET_SNR_DB = 40 dB leaves room for ~100 of them adding up (66 - 10·log10(100) = 46 dB)
while staying far above the issue's cosine >= 0.999 (an SNR of 27 dB: 1 - cos ~ 10^(-SNR/10)/2).
Below 40 dB something other than rounding is at work (overflow, cancellation), so each suspect
kind is tried in float32 and kept where it raises the SNR by MIN_GAIN_DB (3 dB: the error power
halved), or makes non-finite outputs finite; a kept kind with several groups is then bisected,
handing back to fp16 each half whose release costs under 1 dB. At most MAX_EVALS evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from .errors import QtoolError
from .graph import GraphView
from .subgraphs import all_names, bodies, lift, put_back
from .plans import Plan
from .types import Precision, Target

TARGET_SNR_DB = 40.0
MIN_GAIN_DB = 3.0
RELEASE_DB = 1.0
MAX_EVALS = 12
DEFAULT_SAMPLES = 128
KINDS = ("exp", "square", "softmax", "norm", "last")
STATIC_WHY = "fp16's largest value is 65504"
_REDUCE = ("ReduceSum", "ReduceMean")
_COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "FusedMatMul", "MatMulNBits")


@dataclass(frozen=True)
class Group:
    """Nodes that stay float32 together (keeping only part would cast the overflow to fp16)."""

    kind: str
    nodes: tuple[str, ...]
    why: str


def suspect_groups(view: GraphView) -> list[Group]:
    """The suspects of the main graph, by kind in KINDS order (a node may be in several)."""
    groups = []
    for node in view.nodes:
        if node.op_type == "Exp":
            groups.append(Group("exp", _forward(view, node, "exp"), "exp overflows fp16 above x = 11.09"))
        elif _is_square(view, node):
            groups.append(Group("square", _forward(view, node, "square"),
                                "a square overflows fp16 above |x| = 256"))
    for node in view.nodes:
        if node.op_type in ("Softmax", "LogSoftmax"):
            groups.append(Group("softmax", (view.node_name(node),), "softmax normalises a sum of exponentials"))
        elif node.op_type in ("LayerNormalization", "InstanceNormalization", "GroupNormalization",
                              "BatchNormalization"):
            groups.append(Group("norm", (view.node_name(node),), "normalisation: a reduction over many values"))
    last = _last_layer(view)
    if last:
        groups.append(Group("last", last, "the last layer writes the outputs"))
    return sorted(groups, key=lambda g: KINDS.index(g.kind))


def _is_square(view: GraphView, node: onnx.NodeProto) -> bool:
    if node.op_type in ("ReduceSumSquare", "ReduceL2"):
        return True
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    if node.op_type != "Pow":
        return False
    if not view.is_initializer(node.input[1]):
        return True
    exponent = view.array(node.input[1])
    return exponent.size == 0 or float(np.max(exponent)) >= 2


#: What a large value flows into before it is back in range: after a seed, its reductions
#: (and the Div of a hand-built softmax, the Sqrt of a norm); after a reduction, the epsilon
#: Add, the Sqrt and the Div/Reciprocal; a Sqrt, Div or Reciprocal ends the chain. Data
#: movement passes the value on unchanged (and would overflow in fp16 as well).
_MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Slice", "Gather",
          "Concat")
_FOLLOW = {"exp": _REDUCE + ("Div",), "square": _REDUCE + ("Sqrt",),
           "ReduceSum": ("Add", "Sqrt", "Div", "Reciprocal"), "ReduceMean": ("Add", "Sqrt", "Div", "Reciprocal"),
           "Add": ("Sqrt", "Div", "Reciprocal")}


def _forward(view: GraphView, node: onnx.NodeProto, kind: str) -> tuple[str, ...]:
    """``node`` and the chain its large values flow through (see _FOLLOW)."""
    members, frontier, seen = [view.node_name(node)], [(node, kind)], {id(node)}
    while frontier:
        current, key = frontier.pop()
        if key not in _FOLLOW:  # a Sqrt, Div or Reciprocal: the value is back in range
            continue
        for out in current.output:
            for c in view.consumers.get(out, []):
                moves = c.op_type in _MOVES
                if id(c) in seen or not (moves or c.op_type in _FOLLOW.get(key, ())):
                    continue
                seen.add(id(c))
                members.append(view.node_name(c))
                frontier.append((c, key if moves else c.op_type))
    return tuple(members)


def _last_layer(view: GraphView, limit: int = 8) -> tuple[str, ...]:
    """From each output's producer back through at most ``limit`` nodes to the first compute op."""
    names = []
    for out in view.graph_outputs:
        node, steps = view.producer.get(out), 0
        while node is not None and steps < limit:
            names.append(view.node_name(node))
            if node.op_type in _COMPUTE:
                break
            ins = [i for i in node.input if i in view.producer and view.is_float(i)]
            node, steps = (view.producer[ins[0]] if ins else None), steps + 1
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Score:
    snr_db: float          # lowest over outputs; -inf when an output is not finite where fp32 is
    min_cosine: float      # lowest over samples and outputs
    finite: bool

    def text(self) -> str:
        if not self.finite:
            return "inf/NaN outputs"
        return f"outputs' SNR {self.snr_db:.1f} dB, min cosine {self.min_cosine:.6f}"


def measured_keep(p, plan: Plan, base: Plan | None, groups: list[Group], data, calibrate_options) -> Plan:
    """``plan`` with the suspect groups that measurably help kept float32 (see the module doc)."""
    from . import api
    batch = api._batch_size(p.model, calibrate_options.batch_size)
    limit = calibrate_options.limit or DEFAULT_SAMPLES
    judge = _Judge(p, plan, base, data, batch, limit)
    fp16 = {n.name for n in plan.nodes if n.precision is Precision.FP16}
    groups = [replace(g, nodes=tuple(n for n in g.nodes if n in fp16)) for g in groups]
    groups = [g for g in groups if g.nodes]
    start = judge(frozenset())
    kept: dict[str, str] = {}
    kept_kinds: list[str] = []
    best = start
    if not _good(start):
        for kind in KINDS:
            members = [g for g in groups if g.kind == kind]
            if not members or judge.evals >= MAX_EVALS:
                continue
            trial = frozenset(kept) | {n for g in members for n in g.nodes}
            score = judge(trial)
            if _helps(score, best):
                why = members[0].why
                reason = (f"kept fp32 by measurement on {judge.samples} samples: with the {kind} group in fp16 "
                          f"{best.text()}, with it fp32 {score.text()} ({why})")
                kept.update({n: reason for g in members for n in g.nodes})
                kept_kinds.append(kind)
                best = score
                kept, best = _bisect(judge, kept, [g for g in members], best)
            if _good(best):
                break
    final = judge(frozenset(kept))
    if not final.finite:
        raise QtoolError("the fp16 model gives inf/NaN outputs on the data even with its overflow suspects kept fp32 "
                         f"({', '.join(sorted(kept)[:3]) or 'none helped'}): keep the offending nodes with --keep-fp32 "
                         "(qtool debug shows where the error starts)")
    nodes = tuple(replace(n, precision=Precision.FLOAT, reason=kept[n.name]) if n.name in kept else n
                  for n in plan.nodes)
    kinds = [k for k in kept_kinds if any(n in kept for g in groups if g.kind == k for n in g.nodes)]
    note = (f"fp16 keep list measured on {judge.samples} samples against "
            f"{'the fp32 model' if base is None else 'the int4 model with fp32 activations'}, every fp16 tensor "
            f"rounded to fp16 as the CUDA EP stores it ({judge.evals} evaluations, target SNR "
            f"{TARGET_SNR_DB:.0f} dB): all-fp16 {start.text()}; "
            + (f"kept fp32: {len(kept)} nodes ({', '.join(kinds)})" if kept else "nothing measurably needs fp32")
            + f"; final {final.text()}")
    return replace(plan, nodes=nodes, notes=plan.notes + (note,))


def _good(s: Score) -> bool:
    return s.finite and s.snr_db >= TARGET_SNR_DB


def _helps(score: Score, best: Score) -> bool:
    return score.finite and (not best.finite or score.snr_db >= best.snr_db + MIN_GAIN_DB)


def _bisect(judge, kept: dict[str, str], members: list[Group], best: Score) -> tuple[dict[str, str], Score]:
    """Hand halves of a kept kind back to fp16 while that costs under RELEASE_DB (against the
    kind's own score, so the drift stays under RELEASE_DB in all)."""
    live = list(members)
    while len(live) > 1 and judge.evals < MAX_EVALS:
        mid = len(live) // 2
        for drop, stay in ((live[mid:], live[:mid]), (live[:mid], live[mid:])):
            released = {n for g in drop for n in g.nodes} - {n for g in stay for n in g.nodes}
            trial = frozenset(kept) - released
            score = judge(trial)
            if score.finite and score.snr_db >= best.snr_db - RELEASE_DB:
                kept = {n: r for n, r in kept.items() if n not in released}
                live = stay
                break
            if judge.evals >= MAX_EVALS:
                return kept, best
        else:
            break
    return kept, best


def emulated(plan: Plan, model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as the plan's rewriter leaves it, in float32 with fp16 rounding where the fp16
    model holds fp16 (:mod:`qtool.rewrite.half_emulation`), bodies included, as ``api._apply``."""
    from .api import _rewriter
    from .rewrite.half_emulation import emulate
    rewriter = _rewriter(plan)
    m = model
    planned = [(b, plan.subgraphs[b.key]) for b in bodies(model) if b.key in plan.subgraphs]
    if planned:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        used = all_names(m)
        lifted = {b.key: lift(model, b) for b, _ in planned}
        for b, sub in planned:
            put_back(m, b, emulate(rewriter.apply(lifted[b.key], sub), sub), used)
    return emulate(rewriter.apply(m, plan), plan)


class _Judge:
    """Scores of the plan with a set of nodes kept float32, against reference outputs computed once."""

    def __init__(self, p, plan: Plan, base: Plan | None, data, batch: int, limit: int):
        from . import api, runtime
        self.p, self.plan = p, plan
        self.inputs = [i.name for i in api.model_inputs(p.model)]
        self.batches = [{k: b[k] for k in self.inputs} for b in data.batches(batch, limit)]
        self.samples = sum(len(next(iter(b.values()))) for b in self.batches)
        reference = p.model if base is None else api._apply(replace(base, target=Target.CPU), p.model)
        sess = runtime.session(reference)
        self.reference = [runtime.run(sess, b) for b in self.batches]
        self.evals = 0
        self.cache: dict[frozenset, Score] = {}

    def __call__(self, keep: frozenset) -> Score:
        if keep in self.cache:
            return self.cache[keep]
        from . import runtime
        nodes = tuple(replace(n, precision=Precision.FLOAT) if n.name in keep else n for n in self.plan.nodes)
        sess = runtime.session(emulated(replace(self.plan, nodes=nodes), self.p.model))
        stats = [_Stats() for _ in self.reference[0]] if self.reference else []
        for b, ref in zip(self.batches, self.reference):
            for s, r, c in zip(stats, ref, runtime.run(sess, b)):
                s.update(r, c)
        self.evals += 1
        score = Score(min((s.snr() for s in stats), default=float("inf")),
                      min((s.min_cos for s in stats), default=1.0), all(s.finite for s in stats))
        self.cache[keep] = score
        return score


class _Stats:
    def __init__(self):
        self.signal = self.noise = 0.0
        self.min_cos = 1.0
        self.finite = True

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        if not np.isfinite(cand[np.isfinite(ref)]).all():
            self.finite = False
            return
        ok = np.isfinite(ref)
        err = np.where(ok, cand - ref, 0.0)
        self.signal += float((np.where(ok, ref, 0.0) ** 2).sum())
        self.noise += float((err ** 2).sum())
        rows = len(ref) if ref.ndim else 1
        from .evaluation import row_cosines
        cos = row_cosines(np.where(ok, ref, 0.0).reshape(rows, -1), np.where(ok, cand, 0.0).reshape(rows, -1))
        if cos.size:
            self.min_cos = min(self.min_cos, float(cos.min()))

    def snr(self) -> float:
        if not self.finite:
            return float("-inf")
        return float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
