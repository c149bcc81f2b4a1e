"""Subgraphs (If branches, Loop and Scan bodies) planned, calibrated and rewritten on their own.

Each body of a control-flow node of the main graph is lifted into a stand-alone model
(:func:`lift`): its formal inputs, plus the outer-scope activations it reads as extra graph
inputs and the outer initializers it reads copied in (so a weight read from outside is still
a weight). The ordinary analyse -> plan -> resolve -> rewrite stages then run on it, and the
rewritten body is put back (:func:`put_back`) without the lifted inputs and copies.

Calibration sees a body's tensors through the outer graph's runs (:func:`expose`): each is
passed out through an Identity as an extra output of the body and of its node, so that it
becomes an output of the main graph: a Loop or Scan stacks it over iterations as a scan
output; an If's other branch outputs an empty tensor, which the observers skip. Bodies nested
deeper than one level stay float, with that reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphView, infer_shapes, node_name
from .rewrite.names import fresh as _fresh

BODY_ATTRS = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}
EXPOSED_PREFIX = "qtool_calibration_"


@dataclass(frozen=True)
class Body:
    key: str        # "<node name>/<attribute>", the key of its plan
    node: str       # the node's name in the main graph (GraphView.node_name)
    attr: str


def bodies(model: onnx.ModelProto) -> list[Body]:
    """The bodies of the main graph's If/Loop/Scan nodes (default domain)."""
    view = GraphView(model)
    out = []
    for n in view.nodes:
        if n.domain in ("", "ai.onnx") and n.op_type in BODY_ATTRS:
            for a in n.attribute:
                if a.name in BODY_ATTRS[n.op_type] and a.type == onnx.AttributeProto.GRAPH:
                    name = view.node_name(n)
                    out.append(Body(f"{name}/{a.name}", name, a.name))
    return out


def _graph_of(model: onnx.ModelProto, body: Body) -> onnx.GraphProto:
    node = GraphView(model).by_name[body.node]
    return next(a.g for a in node.attribute if a.name == body.attr)


def _outer_reads(g: onnx.GraphProto) -> list[str]:
    """Names ``g`` reads that it does not define (outer-scope values), in first-read order."""
    from .graph.view import subgraph_reads
    local = {i.name for i in g.input} | {t.name for t in g.initializer}
    reads: dict[str, None] = {}
    for n in g.node:
        for i in list(n.input) + sorted(subgraph_reads(n)):
            if i and i not in local:
                reads.setdefault(i)
        local.update(n.output)
    for o in g.output:
        if o.name not in local:
            reads.setdefault(o.name)
    return list(reads)


def lift(model: onnx.ModelProto, body: Body) -> onnx.ModelProto:
    """The body as a stand-alone model (see the module docstring)."""
    view = GraphView(model)
    g = onnx.GraphProto()
    g.CopyFrom(_graph_of(model, body))
    for name in _outer_reads(g):
        if name in view.initializers:
            g.initializer.append(view.initializers[name])
        elif name in view.value_info:
            g.input.append(view.value_info[name])
        else:
            g.input.append(helper.make_tensor_value_info(name, view.elem_type(name) or 0, None))
    renamed = _outputs_behind_identity(g, all_names(model))
    lifted = helper.make_model(g, opset_imports=list(model.opset_import))
    lifted.ir_version = model.ir_version
    helper.set_model_props(lifted, {"qtool.lifted": body.key, "qtool.lifted.renamed": json.dumps(renamed)})
    inferred, _ = infer_shapes(lifted)
    return inferred


def renamed_in(lifted: onnx.ModelProto) -> dict[str, str]:
    """{name in the lifted model: name in the body} for the outputs put behind an Identity."""
    for p in lifted.metadata_props:
        if p.key == "qtool.lifted.renamed":
            return json.loads(p.value)
    return {}


def _outputs_behind_identity(g: onnx.GraphProto, used: set[str]) -> dict[str, str]:
    """A body's outputs are not the model's: each computed one gets an Identity in front
    (``X_body -> Identity -> X``), so that its producer may be quantized (Q/DQ before the
    Identity) instead of kept float as a model output is; onnxruntime removes the Identity."""
    from .preprocess.half import _rename_reads
    produced = {o: n for n in g.node for o in n.output}
    tail, renamed = [], {}
    for vi in g.output:
        node = produced.get(vi.name)
        if node is None or node.op_type == "Identity":
            continue
        inner = _fresh(used, f"{vi.name}_body")
        _rename_reads(g, vi.name, inner)
        node.output[list(node.output).index(vi.name)] = inner
        tail.append(helper.make_node("Identity", [inner], [vi.name], name=_fresh(used, f"{vi.name}_body_output")))
        renamed[inner] = vi.name
    g.node.extend(tail)
    return renamed


def put_back(model: onnx.ModelProto, body: Body, rewritten: onnx.ModelProto, used: set[str]) -> None:
    """Replace ``body`` in ``model`` (in place) by the rewritten lifted model's graph, minus
    the lifted outer inputs and the outer initializers still read as they are; names the
    rewrite created that clash with a name elsewhere in ``model`` get fresh ones."""
    original = _graph_of(model, body)
    outer = set(_outer_reads(original))
    g = onnx.GraphProto()
    g.CopyFrom(rewritten.graph)
    keep_inputs = [i for i in g.input if i.name not in outer]
    del g.input[:]
    g.input.extend(keep_inputs)
    keep_inits = [t for t in g.initializer if t.name not in outer]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    before = _local_names(original) | outer
    _rename_new(g, before, used)
    g.name = original.name
    original.CopyFrom(g)


def _local_names(g: onnx.GraphProto) -> set[str]:
    names = {i.name for i in g.input} | {t.name for t in g.initializer} | {o.name for o in g.output}
    for n in g.node:
        names.update(n.output)
        names.add(n.name)
    return names


def _rename_new(g: onnx.GraphProto, before: set[str], used: set[str]) -> None:
    """Names the rewrite added to ``g`` that are already used elsewhere get fresh ones."""
    new = (_local_names(g) - before) & used
    mapping = {}
    for name in sorted(new):
        fresh, k = name, 1
        while fresh in used or fresh in before:
            fresh = f"{name}_{k}"
            k += 1
        mapping[name] = fresh
        used.add(fresh)
    used.update(_local_names(g) - before - set(mapping))
    if not mapping:
        return
    for t in g.initializer:
        t.name = mapping.get(t.name, t.name)
    for n in g.node:
        n.input[:] = [mapping.get(i, i) for i in n.input]
        n.output[:] = [mapping.get(o, o) for o in n.output]
        n.name = mapping.get(n.name, n.name)
    for vi in list(g.value_info) + list(g.output):
        vi.name = mapping.get(vi.name, vi.name)


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in the model, subgraphs included."""
    used: set[str] = set()

    def walk(g):
        used.update(_local_names(g))
        for n in g.node:
            used.update(n.input)
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    walk(sub)
    walk(model.graph)
    return used


def expose(model: onnx.ModelProto, wanted: dict[str, list[str]]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` whose main graph also outputs the body tensors ``wanted``
    (body key -> names); returns it and {body tensor: main-graph output name}."""
    if not any(wanted.values()):
        return model, {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    view = GraphView(m)
    used = all_names(m)
    exposed: dict[str, str] = {}
    by_node: dict[str, list[Body]] = {}
    for b in bodies(m):
        by_node.setdefault(b.node, []).append(b)
    for holder, node_bodies in by_node.items():
        node = view.by_name[holder]
        names = [t for b in node_bodies for t in wanted.get(b.key, []) if t not in exposed]
        if not names:
            continue
        names = list(dict.fromkeys(names))
        outer = {holder: [_fresh(used, f"{EXPOSED_PREFIX}{t}") for t in names]}[holder]
        for b in node_bodies:
            g = next(a.g for a in node.attribute if a.name == b.attr)
            defined = _local_names(g)
            for t, out in zip(names, outer):
                inner = _fresh(used, f"{out}_inner")
                if t in defined and t in wanted.get(b.key, []):
                    g.node.append(helper.make_node("Identity", [t], [inner]))
                else:  # the If branch that does not compute it: an empty tensor
                    g.node.append(helper.make_node("Constant", [], [inner],
                                                   value=numpy_helper.from_array(np.zeros((0,), np.float32))))
                g.output.append(helper.make_tensor_value_info(inner, onnx.TensorProto.FLOAT, None))
        if node.op_type == "Scan":
            _extend_scan_attrs(node, len(names))
        node.output.extend(outer)
        for t, out in zip(names, outer):
            m.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
            exposed[t] = out
    return m, exposed


def _extend_scan_attrs(node: onnx.NodeProto, extra: int) -> None:
    for a in node.attribute:
        if a.name in ("scan_output_axes", "scan_output_directions"):
            a.ints.extend([0] * extra)



def node_keys(model: onnx.ModelProto) -> frozenset[str]:
    """Node names (as GraphView names them) and op types of every graph of the model,
    which ``--precision``/``--exclude`` may name."""
    keys: set[str] = set()

    def walk(g):
        for n in g.node:
            keys.add(node_name(n))
            keys.add(n.op_type)
            for a in n.attribute:
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    walk(sub)
    walk(model.graph)
    return frozenset(keys)


def body_plans(model: onnx.ModelProto, options, ranges=None) -> dict:
    """The plan of every body (resolved with ``ranges``, a TableRanges, when given). A body
    tensor the table lacks (an If branch the calibration data never took) keeps the nodes
    that read or write it float, with that reason."""
    from dataclasses import replace
    from .planner import analyse, calibration_tensors, plan as make_plan
    from .resolve import resolve
    keys = node_keys(model)
    plans = {}
    for b in bodies(model):
        lifted = lift(model, b)
        body_ranges = _Renamed(ranges, renamed_in(lifted)) if ranges is not None else None
        facts, notes = analyse(lifted, options, body_ranges.base if ranges is not None else None, keys)
        if ranges is not None and options.mode == "static":
            missing = set(calibration_tensors(facts)) - set(body_ranges.base)
            if missing:
                why = ("no calibration statistics for its tensors (this branch or body never ran on the "
                       "calibration data, or could not be observed: see the table's notes): stays float")
                kept = {facts.view.node_name(n): why for n in facts.view.nodes
                        if missing & set(list(n.input) + list(n.output))}
                facts = replace(facts, kept_float={**kept, **facts.kept_float})
        decided = make_plan(facts, notes)
        plans[b.key] = resolve(decided, facts.view, body_ranges) if ranges is not None else decided
    return plans


class _Renamed:
    """A TableRanges seen from a lifted body: ``X_body`` (an output put behind an Identity)
    has the statistics of ``X``, the name calibration saw."""

    def __init__(self, ranges, renamed: dict[str, str]):
        self.ranges, self.renamed = ranges, renamed
        self.base = dict(ranges.base)
        self.base.update({new: ranges.base[old] for new, old in renamed.items() if old in ranges.base})

    def __call__(self, name: str, precision):
        return self.ranges(self.renamed.get(name, name), precision)


def calibration_plan(model: onnx.ModelProto, options, main_view: GraphView) -> tuple[list[str], dict[str, list[str]]]:
    """What calibration must see of the bodies: outer-graph tensors they quantize (calibrated
    as main-graph tensors) and, per body, the tensors it computes itself (exposed)."""
    from .planner import analyse, calibration_tensors
    keys = node_keys(model)
    outer_wanted: list[str] = []
    wanted: dict[str, list[str]] = {}
    for b in bodies(model):
        outer = set(_outer_reads(_graph_of(model, b)))
        lifted = lift(model, b)
        back = renamed_in(lifted)
        facts, _ = analyse(lifted, options, None, keys)
        for t in (back.get(t, t) for t in calibration_tensors(facts)):
            if t in outer:
                if main_view.is_float(t) and not main_view.is_initializer(t):
                    outer_wanted.append(t)
            else:
                wanted.setdefault(b.key, []).append(t)
    return outer_wanted, wanted


def separate_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Give every tensor a body defines a name no other graph uses: sibling bodies (an If's
    two branches, two Loops) may legally reuse names, but the calibration table and the plans
    key statistics by tensor name. Renamed inside the body only (its reads, nested bodies'
    reads, its formal inputs and outputs, which are positional)."""
    from .preprocess.half import _rename_reads
    found = bodies(model)
    if not found:
        return model, None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    seen = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    used = all_names(m)
    renamed = 0
    for b in found:
        body = _graph_of(m, b)
        defined = [i.name for i in body.input] + [t.name for t in body.initializer] + \
            [o for n in body.node for o in n.output if o]
        for name in defined:
            if name not in seen:
                seen.add(name)
                continue
            new = _fresh(used, f"{name}__{b.node.strip('/').replace('/', '_')}_{b.attr}")
            _rename_reads(body, name, new)
            for n in body.node:
                n.output[:] = [new if o == name else o for o in n.output]
            for coll in (body.input, body.output, body.value_info):
                for vi in coll:
                    if vi.name == name:
                        vi.name = new
            for t in body.initializer:
                if t.name == name:
                    t.name = new
            seen.add(new)
            renamed += 1
    if not renamed:
        return model, None
    return m, f"{renamed} tensor names reused across subgraphs made unique inside their subgraph"
