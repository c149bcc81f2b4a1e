"""Measured speed, per node: what onnxruntime runs for each planned node, fp32 against int8.

    costs = node_costs(prepared_model, candidate, plan, feeds)   # one NodeCost per group
    slow = slower_groups(costs)                                   # int8 groups that lose
    median, p10, p90 = paired_speedup(prepared_model, candidate, feeds)

``reference`` is the float model the plan was made on (``Prepared.model``: its node
names are the plan's), ``candidate`` the model the plan rewrote it into. Both run with
onnxruntime's profiler on, fully optimised (ORT_ENABLE_ALL), alternately run by run;
each session also saves the graph it optimised, and every kernel event
(``<node>_kernel_time``) is mapped back to a plan node by walking that graph:

1. by the optimised node's name: QDQ fusion names the fused kernel after its target
   node (selectors_actions/actions.cc), generated names add ``_token_N`` to a base
   (graph.cc, GenerateNodeName), the NCHWc transformer names a node after its output
   tensor plus ``_nchwc`` and the activation fusions put ``fused `` before the name;
2. by the tensors it writes (onnxruntime keeps tensor names: a fused kernel writes its
   Q's output);
3. by its neighbours in the optimised graph (a generated Transpose, QuantizeLinear or
   reorder goes to the one group it feeds, else to the one it reads from);
4. whatever is left is reported in the ``(unattributed)`` entry, never dropped.

A group is a plan node and the nodes fused into it (a Relu into its Conv). Its int8
cost includes the Q/DQ nodes qtool wrote for it: the QuantizeLinear of its output
(of its input when the producer stays float), its DequantizeLinears, and the layout
reorders onnxruntime put around it. Kernel time only: the profiler's own per-node
overhead falls outside ``_kernel_time`` events, and both sessions are profiled alike.

Its profiling sessions start from :func:`qtool.runtime.session_options` with the profiler
switched on (it must be set before a session exists); onnxruntime itself is imported only by
:mod:`qtool.runtime`.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from . import model as model_io
from . import runtime
from .graph import GraphView
from .plans import Plan

UNATTRIBUTED = "(unattributed)"


@dataclass(frozen=True)
class NodeCost:
    """One group's time per run, median over the profiled runs.

    ``node``: the plan node that heads the group; ``members``: the plan nodes fused into
    it. ``float_ms``: its kernels in the fp32 session; ``int8_ms``: everything onnxruntime
    ran for it in the candidate session. ``delta_p10_ms``/``delta_p90_ms``: the 10th and
    90th percentile over run pairs of (int8 - float), the noise band. ``shared``: groups
    whose time one fused kernel holds on one side only (fp32's NCHWc Conv adds the residual
    Add in, int8 runs a QLinearAdd): compare them together. ``quantized``: the
    plan quantizes it. ``detail``/``float_detail``: what ran, e.g. ``QLinearConv[uint8]
    0.21 ms + QuantizeLinear[uint8] 0.05 ms``.
    """

    node: str
    op_type: str
    float_ms: float
    int8_ms: float
    detail: str
    quantized: bool = True
    members: tuple[str, ...] = ()
    float_detail: str = ""
    delta_p10_ms: float = 0.0
    delta_p90_ms: float = 0.0
    shared: tuple[str, ...] = ()

    @property
    def delta_ms(self) -> float:
        return self.int8_ms - self.float_ms


# -- mapping optimised nodes back to plan groups -------------------------------------------------

def _groups(plan: Plan) -> dict[str, str]:
    """Plan node -> the node heading its group (follows ``fused_into`` chains)."""
    head = {}
    for n in plan.nodes:
        seen, cur = set(), n
        while cur.fused_into and cur.fused_into not in seen and plan.node(cur.fused_into) is not None:
            seen.add(cur.name)
            cur = plan.node(cur.fused_into)
        head[n.name] = cur.name
    return head


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose unnamed nodes carry the plan's name for them (``Op(output)``), so that
    onnxruntime's fused and generated nodes inherit names that lead back to the plan."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    view = GraphView(model)
    for node in out.graph.node:
        if not node.name:
            node.name = view.node_name(node)
    return out


class _Base:
    """The model handed to onnxruntime: which group owns each of its nodes and tensors."""

    def __init__(self, model: onnx.ModelProto, plan: Plan, head: dict[str, str]):
        self.node_owner: dict[str, str] = {}
        self.tensor_owner: dict[str, str] = {}
        nodes = list(model.graph.node)
        producer = {o: n for n in nodes for o in n.output if o}
        self.head, self.producer = head, producer
        self.absorbed: dict[str, str] = {}  # group -> the group whose fused kernel runs it too
        self.nodes = {n.name: n for n in nodes}
        consumers = defaultdict(list)
        for n in nodes:
            for i in n.input:
                if i:
                    consumers[i].append(n)
        self.readers = {t: len(c) for t, c in consumers.items()}
        quantized = {n.name for n in plan.nodes if n.quantized}

        def group(n):
            return head.get(n.name)

        def is_q(g):
            return g is not None and g in quantized

        def unique(groups, want_quantized=False):
            gs = {g for g in groups if g is not None and (is_q(g) or not want_quantized)}
            return gs.pop() if len(gs) == 1 else None

        def downstream(n, depth=0):
            """Groups of the plan nodes reading n's outputs, through Q/DQ pairs."""
            out = []
            for o in n.output:
                for c in consumers.get(o, []):
                    if group(c) is not None:
                        out.append(group(c))
                    elif depth < 3 and c.op_type in ("QuantizeLinear", "DequantizeLinear"):
                        out.extend(downstream(c, depth + 1))
            return out

        def upstream(n, depth=0):
            p = producer.get(n.input[0]) if n.input else None
            if p is None:
                return None
            if group(p) is not None:
                return group(p)
            if depth < 3 and p.op_type in ("QuantizeLinear", "DequantizeLinear"):
                return upstream(p, depth + 1)
            return None

        for n in nodes:
            g = group(n)
            if g is None:
                down, up = downstream(n), upstream(n)
                if n.op_type == "QuantizeLinear":
                    # the Q of a quantized group's output; else the Q its quantized readers need
                    g = up if is_q(up) else unique(down, True) or up or unique(down)
                else:  # DequantizeLinear (weights, activations) and anything else qtool wrote
                    g = unique(down, True) or unique(down) or up
            if g is not None:
                self.node_owner[n.name] = g
                for o in n.output:
                    self.tensor_owner[o] = g

    def absorber(self, group: str) -> str | None:
        """The group whose kernel onnxruntime fused ``group`` into, when ``group`` ran nothing of
        its own: the producer of one of its inputs that only it reads (a Conv before its Add)."""
        for n in self.nodes.values():
            if self.head.get(n.name) != group:
                continue
            for i in n.input:
                p = self.producer.get(i)
                if p is not None and self.head.get(p.name) not in (None, group) and self.readers.get(i) == 1:
                    return self.head[p.name]
        return None

    def by_name(self, name: str, op_type: str) -> str | None:
        for key in _name_keys(name):
            if key in self.node_owner:
                return self.node_owner[key]
            if key in self.tensor_owner:
                return self.through_fusion(key, op_type)
        return None

    def through_fusion(self, tensor: str, op_type: str) -> str:
        """The group of the node named by its output tensor: onnxruntime names a fused node
        (NCHWc Conv+Relu) after the last tensor it writes, so when that tensor's node is not
        of the fused kernel's kind, the group of the nearest producer above that is."""
        want = _base_op(op_type)
        named = self.tensor_owner[tensor]
        level = [self.producer.get(tensor)]
        for _ in range(4):  # breadth first up the inputs; a fused node's producers feed it alone
            found = [n for n in level if n is not None and n.op_type == want and self.head.get(n.name)
                     and all(self.readers.get(o, 0) <= 1 for o in n.output)]
            if found:
                g = self.head[found[0].name]
                if g != named:  # e.g. a residual Add the fp32 NCHWc Conv adds in (Sum input)
                    self.absorbed[named] = g
                return g
            level = [self.producer.get(i) for n in level if n is not None for i in n.input]
        return named


def _base_op(op_type: str) -> str:
    """The ONNX op an onnxruntime kernel stands for: QLinearConv, NhwcMaxPool, FusedConv -> Conv..."""
    for prefix in ("QLinear", "Nhwc", "Fused", "Q"):
        if op_type.startswith(prefix) and op_type[len(prefix):][:1].isupper():
            return op_type[len(prefix):]
    return op_type


def _name_keys(name: str) -> list[str]:
    """The names onnxruntime derived ``name`` from, most literal first."""
    keys = [name]
    base = name[len("fused "):] if name.startswith("fused ") else name
    while True:
        stripped = re.sub(r"_token_\d+$", "", base)
        stripped = re.sub(r"_nchwc$", "", stripped)
        if stripped == base:
            break
        base = stripped
    if base not in keys:
        keys.append(base)
    return keys


def _optimized_owners(opt: onnx.ModelProto, base: _Base) -> dict[str, str]:
    """Optimised node name -> group (rules 1-3 of the module docstring)."""
    nodes = list(opt.graph.node)
    owner: dict[str, str] = {}
    for n in nodes:
        g = base.by_name(n.name, n.op_type)
        if g is None:
            g = next((base.through_fusion(o, n.op_type) for o in n.output if o in base.tensor_owner), None)
        if g is not None:
            owner[n.name] = g
    producer = {o: n for n in nodes for o in n.output if o}
    consumers = defaultdict(list)
    for n in nodes:
        for i in n.input:
            if i:
                consumers[i].append(n)
    for _ in range(len(nodes)):  # neighbours, to a fixed point
        changed = False
        for n in nodes:
            if n.name in owner:
                continue
            down = {owner[c.name] for o in n.output for c in consumers.get(o, []) if c.name in owner}
            up = {owner[producer[i].name] for i in n.input if i in producer and producer[i].name in owner}
            g = down.pop() if len(down) == 1 else up.pop() if not down and len(up) == 1 else None
            if g is not None:
                owner[n.name] = g
                changed = True
        if not changed:
            break
    for n in nodes:  # last resort: the tensors it reads
        if n.name not in owner:
            g = next((base.tensor_owner[i] for i in n.input if i in base.tensor_owner
                      and i not in {t.name for t in opt.graph.initializer}), None)
            if g is not None:
                owner[n.name] = g
    for n in nodes:  # nodes inside If/Loop/Scan bodies belong with the node holding them
        for body in _bodies(n):
            for inner in body:
                if n.name in owner:
                    owner.setdefault(inner, owner[n.name])
    return owner


def _bodies(node: onnx.NodeProto):
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            names = []
            for inner in g.node:
                names.append(inner.name)
                for sub in _bodies(inner):
                    names.extend(sub)
            yield names


# -- profiling ------------------------------------------------------------------------------------

class _Profiled:
    """A session with onnxruntime's profiler on, saving the graph it optimised (``save_optimized``:
    onnxruntime refuses to save a graph an EP compiled, e.g. TensorRT's engines, and fails the
    session). ``disabled``: graph transformers left out, as in :func:`qtool.runtime.session`."""

    def __init__(self, model: onnx.ModelProto | str, provider: str, threads: int, folder: str, tag: str,
                 save_optimized: bool = True, disabled: tuple[str, ...] = ()):
        self.optimized_path = os.path.join(folder, f"{tag}.optimized.onnx") if save_optimized else None
        # weights to a side file (never read back): only the graph is walked, and a big model fits
        opts = runtime.session_options(threads, True, self.optimized_path, f"{tag}.optimized.onnx.data")
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(folder, tag)
        providers = runtime.provider_list(provider, model)
        if isinstance(model, str):  # a file: onnxruntime reads it (and its external data) itself
            self.sess = runtime._session(model, opts, providers, disabled)
        elif model_io.by_path(model):
            with model_io.temp_model_file(model) as path:
                self.sess = runtime._session(str(path), opts, providers, disabled)
        else:
            self.sess = runtime._session(model.SerializeToString(), opts, providers, disabled)
        names = {i.name for i in self.sess.get_inputs()}
        self.names = names

    def run(self, feeds):
        runtime.run(self.sess, runtime.typed_feeds(self.sess, {k: v for k, v in feeds.items() if k in self.names}))

    def events(self) -> tuple[list[dict], list[tuple[float, float]]]:
        path = self.sess.end_profiling()
        try:
            with open(path) as f:
                trace = json.load(f)
        finally:
            os.unlink(path)
        kernels = [e for e in trace if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]
        runs = [(e["ts"], e["ts"] + e["dur"]) for e in trace
                if e.get("cat") == "Session" and e.get("name") == "model_run"]
        return kernels, runs

    def optimized(self) -> onnx.ModelProto:
        return onnx.load(self.optimized_path, load_external_data=False)


def node_placement(model: onnx.ModelProto | str, provider: str, feeds: dict[str, np.ndarray],
                   threads: int | None = None, disabled: tuple[str, ...] = ()) -> dict[str, dict[str, int]]:
    """Which EP ran each kernel of one run (onnxruntime's profile, after its optimisations and
    fusions, ``disabled`` left out as in the session it describes): provider -> op type -> number of
    kernels. Control-flow bodies count once per kernel, not once per iteration. The optimised graph
    is not saved: the profile names each kernel's EP, and onnxruntime cannot save the graph of an EP
    that compiles its nodes (TensorRT)."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="qtool-placement-") as folder:
        prof = _Profiled(model if isinstance(model, onnx.ModelProto) else str(model), provider, threads or 1,
                         folder, "placement", save_optimized=False, disabled=disabled)
        prof.run(feeds)
        kernels, _ = prof.events()
    seen: dict[str, tuple[str, str]] = {}
    for e in kernels:
        args = e.get("args", {})
        seen[e["name"][: -len("_kernel_time")]] = (str(args.get("provider", "?")), str(args.get("op_name", "?")))
    out: dict[str, dict[str, int]] = {}
    for ep, op in seen.values():
        out.setdefault(ep, {})
        out[ep][op] = out[ep].get(op, 0) + 1
    return {ep: dict(sorted(ops.items())) for ep, ops in sorted(out.items())}


def _dtype(event: dict) -> str:
    shapes = event.get("args", {}).get("output_type_shape") or []
    return next(iter(shapes[0]), "") if shapes and isinstance(shapes[0], dict) else ""


CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def _outermost(kernels: list[dict]) -> list[dict]:
    """The kernel events without those of control-flow bodies: onnxruntime's If/Loop/Scan event
    already spans its body's kernels, which it also reports one by one (on the same thread,
    inside the If's [ts, ts + dur]); counting both would count the body twice."""
    found = defaultdict(list)  # thread -> (start, end) of its control-flow events
    for e in kernels:
        if e.get("args", {}).get("op_name") in CONTROL_FLOW:
            found[e.get("tid")].append((e["ts"], e["ts"] + e["dur"]))
    if not found:
        return list(kernels)
    outer = {}  # thread -> disjoint outermost windows, by start
    for tid, ws in found.items():
        kept = []
        for start, end in sorted(ws, key=lambda w: (w[0], -w[1])):
            if kept and end <= kept[-1][1]:
                continue  # nested in the previous one (an If inside a Loop body)
            kept.append((start, end))
        outer[tid] = ([w[0] for w in kept], kept)

    def inside(e) -> bool:
        starts, kept = outer.get(e.get("tid"), ((), ()))
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0:
            return False
        start, end = kept[i]
        is_window = e.get("args", {}).get("op_name") in CONTROL_FLOW and (e["ts"], e["ts"] + e["dur"]) == (start, end)
        return not is_window and e["ts"] + e["dur"] <= end

    return [e for e in kernels if not inside(e)]


def _per_run(kernels, runs, keep: int, owners: dict[str, str]):
    """group -> per-run ms (last ``keep`` runs), and group -> {(op, dtype, name): per-run ms}."""
    runs = sorted(runs)[-keep:]
    totals = defaultdict(lambda: np.zeros(len(runs)))
    parts = defaultdict(lambda: defaultdict(lambda: np.zeros(len(runs))))
    starts = np.array([r[0] for r in runs])
    for e in _outermost(kernels):
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue  # a warm-up run
        name = e["name"][: -len("_kernel_time")]
        g = owners.get(name, UNATTRIBUTED)
        ms = e["dur"] / 1000.0
        totals[g][i] += ms
        key = (e.get("args", {}).get("op_name", "?"), _dtype(e), name if g == UNATTRIBUTED else "")
        parts[g][key][i] += ms
    return totals, parts, len(runs)


def _describe(parts: dict) -> str:
    items = sorted(((float(np.median(v)), k) for k, v in parts.items()), key=lambda kv: -kv[0])
    text = []
    for ms, (op, dtype, name) in items:
        label = f"{op}[{dtype}]" if dtype else op
        text.append(f"{label}{' ' + name if name else ''} {ms:.3f} ms")
    return " + ".join(text)


def node_costs(reference: onnx.ModelProto, candidate: onnx.ModelProto, plan: Plan,
               feeds: dict[str, np.ndarray], provider: str = runtime.PROVIDERS["cpu"], threads: int = 2,
               runs: int = 20, warmup: int = 5) -> list[NodeCost]:
    """Per-group kernel time of ``reference`` (fp32) and ``candidate`` (the plan applied).

    One NodeCost per group of the plan's main graph, in plan order (float groups too, with
    ``quantized=False``: onnxruntime may still run them on uint8, e.g. a MaxPool it moved a
    QuantizeLinear above), then a last ``(unattributed)`` entry when any kernel time could
    not be mapped. Medians over ``runs`` profiled runs after ``warmup``, the two sessions
    alternating run by run.
    """
    head = _groups(plan)
    ref, cand = _named(reference), _named(candidate)
    with tempfile.TemporaryDirectory(prefix="qtool-profile-") as folder:
        sessions = [_Profiled(m, provider, threads, folder, tag) for m, tag in ((ref, "fp32"), (cand, "int8"))]
        for _ in range(warmup):
            for s in sessions:
                s.run(feeds)
        for i in range(runs):
            for s in (sessions if i % 2 == 0 else sessions[::-1]):
                s.run(feeds)
        measured, shared, bases, ran = [], defaultdict(set), [], []
        for s, m in zip(sessions, (ref, cand)):
            base = _Base(m, plan, head)
            owners = _optimized_owners(s.optimized(), base)
            for a, b in base.absorbed.items():
                shared[a].add(b)
                shared[b].add(a)
            kernels, run_windows = s.events()
            measured.append(_per_run(kernels, run_windows, runs, owners))
            bases.append(base)
            ran.append(set(owners.values()))
        for side in (0, 1):  # a group that runs on one side only, fused into a neighbour on the other
            for g in ran[1 - side] - ran[side]:
                b = bases[side].absorber(g)
                if b is not None:
                    shared[g].add(b)
                    shared[b].add(g)
    (f_tot, f_parts, nf), (q_tot, q_parts, nq) = measured
    n = min(nf, nq)
    members = defaultdict(list)
    for name, h in head.items():
        if name != h:
            members[h].append(name)
    costs = []
    zero = np.zeros(n)
    for node in plan.nodes:
        if head[node.name] != node.name:
            continue
        f = f_tot.get(node.name, zero)[:n]
        q = q_tot.get(node.name, zero)[:n]
        d = q - f
        costs.append(NodeCost(node.name, node.op_type, float(np.median(f)), float(np.median(q)),
                              _describe(q_parts.get(node.name, {})) or "nothing (removed by onnxruntime)",
                              node.quantized, tuple(members[node.name]),
                              _describe(f_parts.get(node.name, {})) or "nothing (removed by onnxruntime)",
                              float(np.percentile(d, 10)) if n else 0.0, float(np.percentile(d, 90)) if n else 0.0,
                              tuple(sorted(shared.get(node.name, ())))))
    if UNATTRIBUTED in f_tot or UNATTRIBUTED in q_tot:
        f = f_tot.get(UNATTRIBUTED, zero)[:n]
        q = q_tot.get(UNATTRIBUTED, zero)[:n]
        costs.append(NodeCost(UNATTRIBUTED, "", float(np.median(f)), float(np.median(q)),
                              _describe(q_parts.get(UNATTRIBUTED, {})), False, (),
                              _describe(f_parts.get(UNATTRIBUTED, {})),
                              float(np.percentile(q - f, 10)) if n else 0.0,
                              float(np.percentile(q - f, 90)) if n else 0.0))
    return costs


def slower_groups(costs: list[NodeCost], margin: float = 0.10, min_ms: float = 0.005,
                  include_float: bool = False) -> list[NodeCost]:
    """The quantized groups whose int8 time beats their float time, beyond noise, slowest first.

    A group counts as slower when its median int8 time exceeds the float one by more than
    ``margin`` (relative) and the 10th percentile of its per-pair difference (int8 - float,
    runs taken alternately) is above ``min_ms``: in at least 9 pairs of 10 it lost by more
    than the profiler's microsecond resolution. Groups ``shared`` with others are judged
    by their sums, and returned together. ``include_float``: also float groups that
    onnxruntime ran slower in the candidate (e.g. on uint8 after moving a Q above them).
    """
    by_node = {c.node: c for c in costs if c.node != UNATTRIBUTED}
    slow, seen = [], set()
    for c in by_node.values():
        if c.node in seen:
            continue
        cluster, todo = {c.node}, [c.node]
        while todo:  # groups one fused kernel covers on one side are judged together
            for other in by_node[todo.pop()].shared:
                if other in by_node and other not in cluster:
                    cluster.add(other)
                    todo.append(other)
        seen |= cluster
        members = [by_node[n] for n in cluster]
        f = sum(m.float_ms for m in members)
        q = sum(m.int8_ms for m in members)
        lo = sum(m.delta_p10_ms for m in members)  # a conservative bound on the sum's p10
        if q > f * (1.0 + margin) and lo > min_ms:
            slow.extend(m for m in members if m.quantized or include_float)
    return sorted(slow, key=lambda c: -(c.int8_ms - c.float_ms))


# -- whole model ----------------------------------------------------------------------------------

def paired_speedup(reference, candidate, feeds: dict[str, np.ndarray], provider: str = runtime.PROVIDERS["cpu"],
                   threads: int = 2, pairs: int = 100, warmup: int = 10) -> tuple[float, float, float]:
    """fp32 time / candidate time per run pair (which runs first alternates): median, p10, p90.

    Above 1 the candidate is faster. Each pair's two runs are back to back, so slow
    stretches of a noisy machine hit both sides of a ratio alike
    (:func:`qtool.runtime.time_pair`, the same measurement as ``qtool eval``).
    """
    a, b = (runtime.session(m, provider, threads) for m in (reference, candidate))
    names = {i.name for i in a.get_inputs()}
    _, _, ratios = runtime.time_pair(a, b, {k: v for k, v in feeds.items() if k in names}, warmup, pairs)
    return float(np.median(ratios)), float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))


def format_costs(costs: list[NodeCost]) -> str:
    """A table: group, op, float ms, int8 ms, ratio, what onnxruntime ran."""
    width = max([len(c.node) for c in costs] + [5])
    lines = [f"{'group':<{width}}  {'op':<10} {'fp32 ms':>8} {'int8 ms':>8} {'x':>5}  int8 ran"]
    for c in costs:
        ratio = f"{c.int8_ms / c.float_ms:5.2f}" if c.float_ms > 0 else "    -"
        lines.append(f"{c.node:<{width}}  {c.op_type:<10} {c.float_ms:8.3f} {c.int8_ms:8.3f} {ratio}  "
                     f"{'' if c.quantized else '(float) '}{c.detail}")
    return "\n".join(lines)
