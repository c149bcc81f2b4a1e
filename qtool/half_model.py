"""The fp16 model (``--weights fp16``, and ``--target cuda``'s default): every float node in
half precision except those that must stay float32.

Kept float32, each with its reason in the plan:

- nodes named (or whose op type is named) in ``keep_fp32``;
- ops qtool does not run in fp16 (no float16 kernel on onnxruntime's CUDA EP, or ONNX's type
  constraints exclude float16: Range, RoiAlign, If/Loop, ...; see :mod:`qtool.rewrite.half_ops`);
- the overflow suspects (:mod:`qtool.half_search`: an Exp and the sum that normalises it, a
  square and the reduction/Sqrt it feeds, ...). With data, decided by measured error: the
  fp16 model's outputs against fp32, each suspect kind tried in float32 and kept only where it
  raises the outputs' SNR (see ``half_search.measured_keep``). Without data, by a static rule:
  the Exp and square groups, which overflow fp16 beyond exp(11.1) and |x| = 256, stay float32.

Casts sit only at the borders (:mod:`qtool.rewrite.half_nodes`); the model's inputs and outputs
stay float32 unless ``keep_io_types`` is false (``Plan.io_fp16``). If/Loop/Scan bodies are
planned the same way (fp16 inside, their interface float32) with the static rule, since the
measured search tries groups of the main graph only. A base plan (int4 weight-only) keeps its
MatMulNBits/GatherBlockQuantized nodes, which run fp16 on CUDA by the rule in
``half_nodes.runs_in_half``.
"""

from __future__ import annotations

from dataclasses import replace

import onnx

from .config import CalibrateOptions, QuantizeOptions
from .graph import GraphView
from .plans import NodePlan, Plan
from .rewrite.half_ops import AGNOSTIC_INPUTS, CPU_HALF_KERNELS, FLOAT, INT4_KERNELS, elem_types, half_slots, opset_of
from .types import Precision

STATIC_KINDS = ("exp", "square")


def plan_half(p, options: QuantizeOptions, base: Plan | None, data, calibrate_options: CalibrateOptions) -> Plan:
    """The fp16 plan of prepared model ``p`` (see the module doc). ``data``: a Dataset or None."""
    from .subgraphs import bodies, lift, node_keys
    known = node_keys(p.model)
    keep = _requested(p.model, options.keep_fp32, known)
    static = data is None
    nodes, groups = decide(p.model, keep, base, static, _overrides(p.model, options, known))
    subgraphs = {}
    for b in bodies(p.model):
        body_base = base.subgraphs.get(b.key) if base is not None else None
        lifted = lift(p.model, b)
        subgraphs[b.key] = _body_plan(lifted, keep, body_base, options, _overrides(lifted, options, known))
    notes = _notes(p, options, base, static)
    if base is None:
        plan = Plan({}, tuple(nodes), notes, "fp16", "qdq", options.target_enum, resolved=True,
                    subgraphs=subgraphs, io_fp16=not options.keep_io_types)
    else:
        plan = replace(base, nodes=tuple(nodes), notes=base.notes + notes, subgraphs=subgraphs,
                       io_fp16=not options.keep_io_types, target=options.target_enum)
    if not static:
        from .half_search import measured_keep
        plan = measured_keep(p, plan, base, groups, data, calibrate_options)
    from .rewrite.half_nodes import runs_in_half
    half = sum(runs_in_half(plan, n) for n in plan.nodes)
    int4 = sum(runs_in_half(plan, n) and n.precision is not Precision.FP16 for n in plan.nodes)
    count = f"{half} of {len(plan.nodes)} nodes in fp16" + (f" ({int4} of them int4 kernels)" if int4 else "")
    return replace(plan, notes=plan.notes + (count,))


def _body_plan(lifted: onnx.ModelProto, keep: frozenset[str], base: Plan | None, options: QuantizeOptions,
               overrides: dict[str, str]) -> Plan:
    nodes, _ = decide(lifted, keep, base, static=True, overrides=overrides)
    if base is not None:
        return replace(base, nodes=tuple(nodes))
    return Plan({}, tuple(nodes), (), "fp16", "qdq", options.target_enum, resolved=True)


def _requested(model: onnx.ModelProto, keep_fp32: tuple[str, ...], known: frozenset[str]) -> frozenset[str]:
    """``keep_fp32`` checked against the model's node names and op types (subgraphs included)."""
    from .planner import unknown_key
    for key in keep_fp32:
        if key not in known:
            raise unknown_key("--keep-fp32", key, sorted(known))
    return frozenset(keep_fp32)


def _overrides(model: onnx.ModelProto, options: QuantizeOptions, known: frozenset[str]) -> dict[str, str]:
    """Node name -> why it stays fp32, for ``--precision``/``--exclude`` requests in ``model``'s main
    graph (``known``: every node name and op type of the whole model, so a key of another graph is
    no error and a typo is): fp32 as asked; an integer precision has no place in an fp16 model (the
    int4 plan keeps such a node float too); fp16 is the default here."""
    from .planner import match_overrides
    out = {}
    for name, wanted in match_overrides(GraphView(model), options, known).items():
        if wanted is Precision.FP32:
            out[name] = "kept fp32 on request (--precision NAME=fp32 or --exclude)"
        elif wanted is not Precision.FP16:
            out[name] = f"--precision NAME={wanted.label} does not apply to an fp16 model: stays fp32"
    return out


def decide(model: onnx.ModelProto, keep: frozenset[str], base: Plan | None, static: bool,
           overrides: dict[str, str] | None = None):
    """Every node's NodePlan in ``model``'s main graph, and the suspect groups among its fp16
    nodes (kept float32 already when ``static``). ``overrides``: node name -> why it stays fp32
    (``--precision``/``--exclude``)."""
    overrides = overrides or {}
    from .half_search import STATIC_WHY, suspect_groups
    view = GraphView(model)
    types = elem_types(model.graph, opset_of(model))
    opset = opset_of(model)
    nodes = []
    for node in view.nodes:
        name = view.node_name(node)
        planned = base.node(name) if base is not None else None
        if planned is not None and planned.kernel in INT4_KERNELS:
            nodes.append(planned)
            continue
        if name in overrides:
            nodes.append(NodePlan(name, node.op_type, Precision.FLOAT, overrides[name]))
            continue
        nodes.append(NodePlan(name, node.op_type, *_decision(node, name, keep, types, opset)))
    groups = [g for g in suspect_groups(view) if any(_is_half(nodes, n) for n in g.nodes)]
    if static:
        held = {n: g for g in groups if g.kind in STATIC_KINDS for n in g.nodes}
        nodes = [replace(n, precision=Precision.FLOAT, reason=f"kept fp32 by rule, no data to measure: "
                         f"{held[n.name].why} ({STATIC_WHY})")
                 if n.name in held and n.precision is Precision.FP16 else n for n in nodes]
    return nodes, groups


def _is_half(nodes: list[NodePlan], name: str) -> bool:
    return any(n.name == name and n.precision is Precision.FP16 for n in nodes)


def _decision(node: onnx.NodeProto, name: str, keep: frozenset[str], types: dict, opset: int
              ) -> tuple[Precision, str]:
    floats = [t for t in list(node.input) + list(node.output) if t and types.get(t) == FLOAT]
    if not floats:
        return Precision.FLOAT, "no float32 tensors: unchanged"
    if name in keep or node.op_type in keep:
        return Precision.FLOAT, f"kept fp32 on request (--keep-fp32 {name if name in keep else node.op_type})"
    slots = half_slots(node, opset, types)
    if slots is None and node.op_type in AGNOSTIC_INPUTS and not any(types.get(o) == FLOAT for o in node.output):
        return Precision.FLOAT, f"{node.op_type} reads a tensor of any type: fp16 or not, no Cast"
    if slots is None:
        return Precision.FLOAT, (f"{node.op_type} has no float16 form qtool uses (no float16 kernel on "
                                 "onnxruntime's CUDA EP, or ONNX's types exclude it): fp32, Casts at its border")
    if not slots.inputs and not slots.outputs:
        return Precision.FLOAT, "its float32 tensors are of fixed type (read as float32 by onnxruntime): unchanged"
    cpu = "" if node.op_type in CPU_HALF_KERNELS else \
        " (no fp16 kernel on onnxruntime's CPU EP: it runs there in float32 between its own Casts)"
    return Precision.FP16, "fp16: float32 inputs, weights and outputs in half precision" + cpu


def _notes(p, options: QuantizeOptions, base: Plan | None, static: bool) -> tuple[str, ...]:
    notes = []
    if static:
        notes.append("fp16 keep list by rule, no data to measure: Exp groups and squares feeding reductions "
                     "stay fp32 (they overflow fp16's 65504); give --data to decide by measured error")
    if not options.keep_io_types:
        notes.append("inputs and outputs are fp16 (--keep-io-types false)")
    elif p.half is not None:
        notes.append("the source model's inputs and outputs are half precision already and stay so")
    if base is not None and options.target == "cuda":
        notes.append("on cuda the int4 MatMulNBits/GatherBlockQuantized nodes take fp16 activations and scales "
                     "(their fast kernel's condition)")
    return tuple(notes)
