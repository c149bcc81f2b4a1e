"""Nodes the plan runs in fp16 (``--weights fp16``, ``--target cuda``, ``--precision NAME=fp16``,
``--fallback fp16``), with Casts only at the borders of their fp16 regions.

A float32 tensor an fp16 node produces becomes fp16 under its own name and stays so while only
fp16 nodes read it. A Cast to float32 appears only where something needs float32 (a node kept
float32, a QuantizeLinear, an If/Loop body reading it from outside, a model output while the
plan keeps the interface float32); a Cast to fp16 only where an fp16 node reads a float32
activation (one Cast per tensor, shared by all its fp16 readers). The float32 version keeps
the tensor's name wherever one exists, so float32 readers, subgraphs and outputs are
untouched. Weights of fp16 nodes become fp16 copies (finite values saturated to ±65504; a
float32 original nothing else reads is dropped). With ``plan.io_fp16`` the model's float32
inputs and outputs are fp16 instead. A Cast of the model that would now convert a tensor to
its own type is removed. A body (If/Loop/Scan, rewritten before its outer graph) that only
casts an outer fp16 tensor to fp16 reads it as it is. Which positions of a node become fp16,
and which ops qtool runs in fp16 at all, is :mod:`qtool.rewrite.half_ops`.

On a GPU this is the fast float path; on the CPU EP onnxruntime runs most fp16 ops through
its own Casts (see ``half_ops.CPU_HALF_KERNELS``), so there it buys size, not speed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import PlanError
from ..graph import node_name, subgraph_reads
from ..plans import NodePlan, Plan
from ..types import Precision, Target
from ..preprocess.half import rename_in_bodies
from .half_ops import (CPU_HALF_KERNELS, FLOAT, HALF, HALF_OPS, INT4_KERNELS, Slots, elem_types,  # noqa: F401
                       half_slots, is_agnostic, opset_of)
from .names import Names

FP16_MAX = 65504.0


def runs_in_half(plan: Plan, n: NodePlan) -> bool:
    """The agreed rule: fp16 nodes, and on CUDA the weight-only int4 kernels (their fast path
    takes fp16 activations and scales)."""
    return n.precision is Precision.FP16 or (plan.target is Target.CUDA and n.kernel in INT4_KERNELS)


def half_nodes(plan: Plan) -> list[str]:
    return [n.name for n in plan.nodes if runs_in_half(plan, n)]


def apply(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """``model`` with the plan's fp16 nodes in half precision and Casts at the borders
    (``model`` itself when nothing changes)."""
    if not half_nodes(plan) and not plan.io_fp16:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _Regions(out, plan).rewrite()
    return out


def fp16_slots(g: onnx.GraphProto, plan: Plan, opset: int, types: dict[str, int]) -> dict[int, Slots]:
    """Index of each node of ``g`` that runs in fp16 -> its fp16 positions: the plan's fp16
    nodes, and a node the plan does not know (one its rewriter added: the bias Add after a
    MatMulNBits that replaced a Gemm) in HALF_OPS whose first input an fp16 node writes."""
    wanted, known = set(half_nodes(plan)), {n.name for n in plan.nodes}
    slots: dict[int, Slots] = {}
    half_outputs: set[str] = set()
    for idx, node in enumerate(g.node):
        name = node_name(node)
        if name in wanted:
            found = half_slots(node, opset, types)
            if found is None:
                raise PlanError(f"plan node {name!r}: {node.op_type} cannot run in fp16 (qtool runs "
                                f"{', '.join(HALF_OPS[:6])}, ...); plan it fp32")
        elif name not in known and node.op_type in HALF_OPS and node.input and node.input[0] in half_outputs:
            found = half_slots(node, opset, types)
            if found is None:
                continue
        else:
            continue
        slots[idx] = found
        half_outputs.update(node.output[k] for k in found.outputs)
    return slots


class _Regions:
    """One pass over the main graph: each float32 tensor's home type (fp16 when an fp16 node or
    an fp16 model input makes it), the types its readers need, a name per version, the Casts."""

    def __init__(self, model: onnx.ModelProto, plan: Plan):
        self.model, self.g, self.io = model, model.graph, plan.io_fp16
        self.types = elem_types(self.g, opset_of(model))
        self.names = Names(model)
        self.inits = {t.name: t for t in self.g.initializer}
        self.inputs = [i.name for i in self.g.input if i.name not in self.inits]
        self.outputs = [o.name for o in self.g.output]
        self.slots = fp16_slots(self.g, plan, opset_of(model), self.types)
        self.home = self._home()
        self.bypass: dict[tuple[int, str], list] = {}
        self.need = self._needs()

    def is_float(self, t: str) -> bool:
        return bool(t) and self.types.get(t) == FLOAT

    def _home(self) -> dict[str, int]:
        home = {t: HALF for t in self.inputs if self.io and self.is_float(t)}
        for idx, s in self.slots.items():
            node = self.g.node[idx]
            home.update({node.output[k]: HALF for k in s.outputs})
        return home

    def kind(self, t: str) -> int:
        return self.home.get(t, FLOAT)

    def _needs(self) -> dict[str, set[int]]:
        need: dict[str, set[int]] = defaultdict(set)
        for idx, node in enumerate(self.g.node):
            half_in = self.slots[idx].inputs if idx in self.slots else frozenset()
            for k, t in enumerate(node.input):
                if self.is_float(t) and not is_agnostic(node, k):
                    need[t].add(HALF if k in half_in else FLOAT)
            for t in subgraph_reads(node):
                if not self.is_float(t):
                    continue
                casts = _body_casts_to_half(node, t) if self.kind(t) == HALF else None
                if casts:  # the bodies cast it to fp16 at once: they read the fp16 version instead
                    self.bypass[(idx, t)] = casts
                need[t].add(HALF if casts else FLOAT)
        for t in self.outputs:
            if self.is_float(t):
                need[t].add(HALF if self.io else FLOAT)
        return need

    def _version_names(self) -> dict[tuple[str, int], str]:
        """(tensor, type) -> name. The original name goes to the version a model input or
        output must have, else to the float32 version when there is one."""
        names = {}
        for t in set(self.need) | set(self.home):
            versions = {self.kind(t)} | self.need.get(t, set())
            if len(versions) == 1:
                names[(t, versions.pop())] = t
                continue
            if t in self.outputs:
                pinned = HALF if self.io else FLOAT
            elif t in self.inputs:
                pinned = self.kind(t)
            else:
                pinned = FLOAT
            other = HALF if pinned == FLOAT else FLOAT
            names[(t, pinned)] = t
            names[(t, other)] = self.names.fresh(f"{t}_{'fp16' if other == HALF else 'fp32'}")
        return names

    def rewrite(self) -> None:
        g = self.g
        names = self._version_names()
        body = [self._cast(t, names) for t in self.inputs if (t, HALF) in names and (t, FLOAT) in names]
        for t in self.inits:
            if (t, HALF) in names:
                g.initializer.append(_half_copy(self.inits[t], names[(t, HALF)]))
        for idx, node in enumerate(g.node):
            s = self.slots.get(idx)
            for k, t in enumerate(node.input):
                if self.is_float(t):
                    want = self.kind(t) if is_agnostic(node, k) else HALF if s and k in s.inputs else FLOAT
                    node.input[k] = names.get((t, want), t)
            for t in subgraph_reads(node):
                if (idx, t) in self.bypass:
                    _drop_body_casts(self.bypass[(idx, t)], names[(t, HALF)])
                elif self.is_float(t) and names.get((t, FLOAT), t) != t:
                    rename_in_bodies(node, t, names[(t, FLOAT)])
            if s is not None:
                _to_half_attributes(node, s)
            produced = [o for o in node.output if self.is_float(o)]
            for k, o in enumerate(node.output):
                if self.is_float(o):
                    node.output[k] = names.get((o, self.kind(o)), o)
            body.append(node)
            body.extend(self._cast(o, names) for o in produced if (o, HALF) in names and (o, FLOAT) in names)
        final = {name: typ for (_, typ), name in names.items()}
        nodes = _drop_noop_casts(g, body, {**self.types, **final}, set(self.outputs))
        del g.node[:]
        g.node.extend(nodes)
        self._retype(final)
        _drop_unread(self.model, {t for (t, typ) in names if typ == HALF and t in self.inits} | _copied_in_bodies(g))

    def _cast(self, t: str, names: dict) -> onnx.NodeProto:
        """The border Cast from ``t``'s home version to its other one."""
        src, dst = (HALF, FLOAT) if self.kind(t) == HALF else (FLOAT, HALF)
        return helper.make_node("Cast", [names[(t, src)]], [names[(t, dst)]], to=dst,
                                name=self.names.fresh(f"{t}_to_{'fp32' if dst == FLOAT else 'fp16'}"))

    def _retype(self, final: dict[str, int]) -> None:
        """Model inputs/outputs and recorded types follow the versions; stale records go."""
        g = self.g
        for vi in list(g.input) + list(g.output):
            if vi.name in final and vi.name not in self.inits:
                vi.type.tensor_type.elem_type = final[vi.name]
        present = {o for n in g.node for o in n.output}
        keep = []
        for vi in g.value_info:
            if vi.name in present:
                if vi.name in final:
                    vi.type.tensor_type.elem_type = final[vi.name]
                keep.append(vi)
        del g.value_info[:]
        g.value_info.extend(keep)


def _half_copy(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
    """An fp16 copy of a float32 initializer; finite values beyond fp16's range saturate at
    ±65504 (a -3.4e38 attention-mask constant stays a very large negative number, not -inf)."""
    from .. import model as model_io
    return numpy_helper.from_array(_saturated(model_io.tensor_array(t)), name)


def _saturated(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    clipped = np.where(np.isfinite(value), np.clip(value, -FP16_MAX, FP16_MAX), value)
    return clipped.astype(np.float16)


def _to_half_attributes(node: onnx.NodeProto, s: Slots) -> None:
    """Types an fp16 node carries in its attributes: Cast's ``to``, Constant/ConstantOfShape values."""
    if 0 not in s.outputs:
        return
    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to":
                a.i = HALF
    elif node.op_type in ("Constant", "ConstantOfShape"):
        value = None
        for a in list(node.attribute):
            if a.name == "value":
                value = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_floats"):
                value = np.asarray(helper.get_attribute_value(a), np.float32)
            else:
                continue
            node.attribute.remove(a)
        if value is None:  # ConstantOfShape without a value: a float32 zero
            value = np.zeros((1,), np.float32)
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_saturated(value))))


def _body_casts_to_half(node: onnx.NodeProto, t: str) -> list | None:
    """The (body, Cast) pairs when every read of outer ``t`` in ``node``'s bodies is a Cast to
    fp16 of the body's own border (not nested deeper, not a body output), else None."""
    found = []
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            own = {i.name for i in sub.input} | {i.name for i in sub.initializer} | \
                  {o for n in sub.node for o in n.output}
            if t in own:
                continue
            outputs = {o.name for o in sub.output}
            if t in outputs:
                return None
            for n in sub.node:
                if t in subgraph_reads(n):
                    return None
                if t not in n.input:
                    continue
                if n.op_type != "Cast" or _cast_to(n) != HALF or n.output[0] in outputs:
                    return None
                found.append((sub, n))
    return found or None


def _drop_body_casts(casts: list, half_name: str) -> None:
    """Remove each body Cast and let its readers read the outer fp16 version ``half_name``."""
    from ..preprocess.half import _rename_reads as rename_graph_reads
    for sub, cast in casts:
        out = cast.output[0]
        sub.node.remove(cast)
        rename_graph_reads(sub, out, half_name)
        keep = [vi for vi in sub.value_info if vi.name != out]
        del sub.value_info[:]
        sub.value_info.extend(keep)


def _drop_noop_casts(g: onnx.GraphProto, nodes: list, types: dict[str, int], outputs: set[str]) -> list:
    """Remove the Casts to fp16 whose input is fp16 already (a Cast to float32 inside an fp16
    region, or an fp16 model's own Casts around its float32 computation): readers take the
    input itself; one that writes a model output takes over its input's name from that input's
    producer instead. The model's other Casts, no-ops included, stay as they are."""
    inputs = {i.name for i in g.input} | {t.name for t in g.initializer}
    producer = {o: n for n in nodes for o in n.output if o}
    kept = []
    for n in nodes:
        noop = n.op_type == "Cast" and n.domain in ("", "ai.onnx") and len(n.input) == 1 and \
            _cast_to(n) == HALF and types.get(n.input[0]) == HALF
        src, dst = (n.input[0], n.output[0]) if noop else ("", "")
        if noop and dst not in outputs:
            _rename_reads(nodes, dst, src)
            continue
        if noop and src in producer and src not in outputs and src not in inputs:
            _rename_reads(nodes, src, dst)
            prod = producer[src]
            prod.output[list(prod.output).index(src)] = dst
            producer[dst] = prod
            continue
        kept.append(n)
    return kept


def _rename_reads(nodes: list, old: str, new: str) -> None:
    """Every read of ``old`` by ``nodes``, their subgraphs' implicit reads included."""
    for n in nodes:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new
        rename_in_bodies(n, old, new)


def _cast_to(n: onnx.NodeProto) -> int | None:
    return next((a.i for a in n.attribute if a.name == "to"), None)


def _copied_in_bodies(g: onnx.GraphProto) -> set[str]:
    """Float32 initializers of ``g`` that a body (rewritten before ``g``, from a lifted copy)
    now reads as its own fp16 copy ``<name>_fp16``."""
    copies = set()
    for n in g.node:
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                copies.update(t.name for t in sub.initializer if t.data_type == HALF)
    return {t.name for t in g.initializer if t.data_type == FLOAT and
            any(c == f"{t.name}_fp16" or c.startswith(f"{t.name}_fp16_") for c in copies)}


def _drop_unread(model: onnx.ModelProto, originals: set[str]) -> None:
    """The float32 originals of fp16 copies that nothing reads any more (subgraphs included)."""
    from ..graph import reads_of
    from .qdq import drop_stale_inputs
    used = reads_of(list(model.graph.node)) | {o.name for o in model.graph.output}
    gone = {t.name for t in model.graph.initializer if t.name in originals and t.name not in used}
    keep = [t for t in model.graph.initializer if t.name not in gone]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    drop_stale_inputs(model.graph, gone)
