"""Cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"), folded into the weights of an fp32 model.

A chain Conv1 -> act -> Conv2, where Conv1's output feeds only ``act`` and ``act`` feeds only
Conv2's data input, computes Conv2(act(W1 x + b1)). For a positively homogeneous, channel-wise
``act`` (Relu, identity, Clip with min 0 and no max, MaxPool, AveragePool, or a sequence of
them) act(y / s) = act(y) / s for s > 0, so dividing
Conv1's output channel i (weights and bias) by s_i and multiplying Conv2's input channel i by
s_i leaves the float output unchanged. With s_i = sqrt(r1_i * r2_i) / r2_i (r1_i: the range,
max |w|, of Conv1's output channel i; r2_i: that of Conv2's input channel i) both become
sqrt(r1_i * r2_i): the per-channel ranges of each weight even out, which is what a per-tensor
weight scale needs (per-channel scales mostly do not).

Clip with a finite max (ReLU6) is not homogeneous: min(y / s, 6) != min(y, 6) / s, and its max
is one scalar for all channels, so such chains are left alone (noted).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

ROUNDS = 20
TOLERANCE = 1e-6  # stop when every scale of a round is within this of 1 (relative)
_EPS = 1e-12


def _consumers(graph) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    users: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name:
                users.setdefault(name, []).append((node, k))
        for attr in node.attribute:  # a subgraph reading an outer name counts as a reader
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                for name in _outer_reads(g):
                    users.setdefault(name, []).append((node, -1))
    return users


def _outer_reads(g) -> set[str]:
    names = set()
    for node in g.node:
        names.update(n for n in node.input if n)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _outer_reads(sub)
    return names


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _clip_bounds(node, inits) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip (None: unbounded), or None when a bound is not a constant."""
    if len(node.input) <= 1 and not node.attribute:
        return None, None
    if any(a.name in ("min", "max") for a in node.attribute):  # opset < 11
        lo, hi = _attr(node, "min", None), _attr(node, "max", None)
        return lo, hi
    bounds = []
    for k in (1, 2):
        name = node.input[k] if len(node.input) > k else ""
        if not name:
            bounds.append(None)
        elif name in inits and inits[name].size == 1:
            bounds.append(float(inits[name].reshape(())))
        else:
            return None
    return bounds[0], bounds[1]


# Per-channel ops with f(y / s) = f(y) / s for every s > 0 (positively homogeneous, channel-wise)
HOMOGENEOUS = ("Relu", "MaxPool", "AveragePool")


class _Chain:
    def __init__(self, conv1, mids, conv2):
        self.conv1, self.mids, self.conv2 = conv1, tuple(mids), conv2

    @property
    def label(self) -> str:
        mid = " -> ".join(f"{n.op_type} ({n.name})" for n in self.mids) or "(direct)"
        return f"{self.conv1.name} -> {mid} -> {self.conv2.name}"


def find_chains(graph, inits: dict[str, np.ndarray]) -> tuple[list[_Chain], list[str]]:
    """Equalisable Conv->(HOMOGENEOUS or Clip(0, inf))*->Conv pairs of the main graph, each
    tensor between read only by the next, and the Conv->Clip->Conv chains left alone."""
    users = _consumers(graph)
    outputs = {o.name for o in graph.output}
    init_users = {name: len(users.get(name, [])) for name in inits}
    skipped = []

    def weight_ok(conv) -> bool:
        w = conv.input[1] if len(conv.input) > 1 else ""
        if w not in inits or init_users.get(w) != 1 or inits[w].dtype != np.float32 or inits[w].ndim < 3:
            return False
        if len(conv.input) > 2 and conv.input[2]:
            b = conv.input[2]
            if b not in inits or init_users.get(b) != 1 or inits[b].dtype != np.float32:
                return False
        return True

    def sole_reader(name):
        readers = users.get(name, [])
        if name in outputs or len(readers) != 1:
            return None
        return readers[0]

    def homogeneous(node) -> bool:
        if node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1:
            return False  # MaxPool's indices output: not a per-channel value
        if node.op_type in HOMOGENEOUS:
            return True
        if node.op_type == "Clip":
            bounds = _clip_bounds(node, inits)
            return bounds is not None and bounds[0] in (None, 0.0, -math.inf) and bounds[1] in (None, math.inf)
        return False

    chains = []
    for conv1 in graph.node:
        if conv1.op_type != "Conv" or conv1.domain not in ("", "ai.onnx") or not weight_ok(conv1):
            continue
        mids, cur, found = [], conv1.output[0], None
        while (nxt := sole_reader(cur)) is not None and nxt[1] == 0:
            node = nxt[0]
            if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
                found = node
                break
            if not homogeneous(node):
                after = sole_reader(node.output[0]) if node.output else None
                if node.op_type == "Clip" and after is not None and after[0].op_type == "Conv":
                    skipped.append(f"{conv1.name} -> Clip ({node.name}) -> {after[0].name}")
                break
            mids.append(node)
            cur = node.output[0]
        conv2 = found
        if conv2 is None or not weight_ok(conv2) or conv2 is conv1:
            continue
        w1, w2 = inits[conv1.input[1]], inits[conv2.input[1]]
        g2 = int(_attr(conv2, "group", 1))
        channels = w1.shape[0]
        if w2.shape[1] * g2 != channels or w2.shape[0] % g2 or channels % g2:
            continue
        chains.append(_Chain(conv1, mids, conv2))
    return chains, skipped


def _in_channel_view(w2: np.ndarray, group: int) -> np.ndarray:
    """Conv2's weight as (in_channels, everything that input channel multiplies), a copy."""
    m, cg = w2.shape[0], w2.shape[1]
    per = w2.reshape(group, m // group, cg, -1)  # (group, out per group, in per group, k)
    return per.transpose(0, 2, 1, 3).reshape(group * cg, -1)


def _scale_in_channels(w2: np.ndarray, group: int, s: np.ndarray) -> np.ndarray:
    m, cg = w2.shape[0], w2.shape[1]
    factor = s.reshape(group, 1, cg, *([1] * (w2.ndim - 2)))
    per = w2.reshape(group, m // group, cg, *w2.shape[2:])
    return (per * factor).reshape(w2.shape).astype(np.float32)


def _ranges1(w1):
    return np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)


def _ranges2(w2, group):
    return np.abs(_in_channel_view(w2, group)).max(axis=1)


def _spread(r: np.ndarray) -> float:
    """max / min over the channels whose range is not zero."""
    r = r[r > _EPS]
    return float(r.max() / r.min()) if r.size else 1.0


def equalize(model: onnx.ModelProto, rounds: int = ROUNDS) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with every equalisable Conv->(Relu|identity|Clip(0, inf))->Conv chain
    equalised (rounds over all chains until the scales settle), and notes: each chain with the
    spread (max/min over channels) of its per-channel weight ranges before and after."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = {t.name: i for i, t in enumerate(graph.initializer)}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    chains, skipped = find_chains(graph, inits)
    notes = []
    if skipped:
        notes.append(f"cle: {len(skipped)} Conv->Clip->Conv chain(s) left alone: a Clip with a finite max "
                     f"(ReLU6) or a min other than 0 is not scale-invariant (e.g. {skipped[0]})")
    if not chains:
        notes.append("cle: no equalisable Conv->(Relu|identity)->Conv chain found; the model is unchanged")
        return out, notes
    before = {}
    for c in chains:
        g2 = int(_attr(c.conv2, "group", 1))
        before[c.label] = (_spread(_ranges1(inits[c.conv1.input[1]])), _spread(_ranges2(inits[c.conv2.input[1]], g2)))
    done = 0
    for done in range(1, rounds + 1):
        worst = 0.0
        for c in chains:
            w1n, w2n = c.conv1.input[1], c.conv2.input[1]
            g2 = int(_attr(c.conv2, "group", 1))
            r1, r2 = _ranges1(inits[w1n]), _ranges2(inits[w2n], g2)
            ok = (r1 > _EPS) & (r2 > _EPS)
            s = np.ones_like(r1, dtype=np.float64)
            s[ok] = np.sqrt(r1[ok].astype(np.float64) * r2[ok]) / r2[ok]
            worst = max(worst, float(np.abs(np.log(s)).max()))
            shape1 = (-1,) + (1,) * (inits[w1n].ndim - 1)
            inits[w1n] = (inits[w1n] / s.reshape(shape1)).astype(np.float32)
            if len(c.conv1.input) > 2 and c.conv1.input[2]:
                bn = c.conv1.input[2]
                inits[bn] = (inits[bn] / s).astype(np.float32)
            inits[w2n] = _scale_in_channels(inits[w2n], g2, s)
        if worst < TOLERANCE:
            break
    touched = set()
    for c in chains:
        touched.update(n for n in c.conv1.input[1:3] if n)
        touched.add(c.conv2.input[1])
    for name in sorted(touched):
        graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(inits[name], name))
    for c in chains:
        g2 = int(_attr(c.conv2, "group", 1))
        a1, a2 = _spread(_ranges1(inits[c.conv1.input[1]])), _spread(_ranges2(inits[c.conv2.input[1]], g2))
        b1, b2 = before[c.label]
        notes.append(f"cle: {c.label}: per-channel weight range spread (max/min) {b1:.3g}x -> {a1:.3g}x "
                     f"(first), {b2:.3g}x -> {a2:.3g}x (second)")
    notes.insert(0, f"cle: equalised {len(chains)} chain(s) in {done} round(s)")
    return out, notes
