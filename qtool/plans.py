"""The plan: for every tensor, quantize / share / derive / skip, and why.

The planner reads a model (and, once calibrated, a table) and returns a Plan; it
never mutates the model. The rewriter applies a Plan and decides nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from enum import Enum

PLAN_FORMAT_VERSION = 1


class Action(str, Enum):
    QUANTIZE = "quantize"  # own parameters (activations from the table, weights from their values)
    DYNAMIC = "dynamic"    # quantized at run time from each batch's own range (dynamic mode)
    SHARE = "share"        # reuses another tensor's parameters (data-movement ops)
    DERIVE = "derive"      # parameters follow from others (bias: s_x * s_w, zero point 0)
    SKIP = "skip"          # stays float; reason says why


class Role(str, Enum):
    ACTIVATION = "activation"
    WEIGHT = "weight"
    BIAS = "bias"


@dataclass(frozen=True)
class TensorPlan:
    """One tensor's decision. ``axis`` is set for per-axis weights and biases;
    ``source`` names the tensor a SHARE copies, or the activation a bias derives
    from (with ``weight``); ``scale``/``zero_point`` are filled for activations
    once a calibration table is applied."""

    name: str
    role: Role
    action: Action
    reason: str
    qtype: str = "int8"
    symmetric: bool = False
    axis: int | None = None
    source: str | None = None
    weight: str | None = None
    scale: float | None = None
    zero_point: int | None = None
    range: tuple[float, float] | None = None

    @property
    def quantized(self) -> bool:
        return self.action is not Action.SKIP


@dataclass(frozen=True)
class NodePlan:
    """One node's decision. ``kernel`` names the op a rewriter emits when it is
    not implied by the format (e.g. DynamicQuantizeMatMul); ``fused_into`` names
    the node that absorbs this one (a bias Add folded into its MatMul)."""

    name: str
    op_type: str
    quantized: bool
    reason: str
    kernel: str = ""
    fused_into: str = ""


@dataclass(frozen=True)
class Plan:
    tensors: dict[str, TensorPlan]
    nodes: tuple[NodePlan, ...]
    notes: tuple[str, ...] = ()
    format_version: int = PLAN_FORMAT_VERSION

    def activations_to_calibrate(self) -> list[str]:
        return [t.name for t in self.tensors.values()
                if t.role is Role.ACTIVATION and t.action is Action.QUANTIZE]

    def quantized_nodes(self) -> list[NodePlan]:
        return [n for n in self.nodes if n.quantized]

    def with_tensors(self, tensors: dict[str, TensorPlan]) -> "Plan":
        return replace(self, tensors=tensors)

    def to_dict(self) -> dict:
        return {
            "format": "qtool.plan", "format_version": self.format_version, "notes": list(self.notes),
            "nodes": [asdict(n) for n in self.nodes],
            "tensors": [_tensor_dict(t) for t in self.tensors.values()],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        tensors = {}
        for t in data["tensors"]:
            t = dict(t, role=Role(t["role"]), action=Action(t["action"]))
            if t.get("range") is not None:
                t["range"] = tuple(t["range"])
            tensors[t["name"]] = TensorPlan(**t)
        nodes = tuple(NodePlan(**n) for n in data["nodes"])
        return cls(tensors, nodes, tuple(data.get("notes", ())), data["format_version"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def explain(self) -> str:
        """Human-readable plan: one line per node, then quantized activations."""
        width = max([len(n.name) for n in self.nodes] + [4])
        lines = [f"{'node':<{width}}  {'op':<14} decision  reason"]
        for n in self.nodes:
            lines.append(f"{n.name:<{width}}  {n.op_type:<14} {'int8' if n.quantized else 'float':<9} {n.reason}"
                         + (f" -> {n.kernel}" if n.kernel else ""))
        acts = [t for t in self.tensors.values() if t.role is Role.ACTIVATION]
        if acts:
            lines.append("")
            lines.append("activations:")
            for t in acts:
                params = "" if t.scale is None else f" scale={t.scale:.6g} zp={t.zero_point}"
                lines.append(f"  {t.name}: {t.action.value}{params} ({t.reason})")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _tensor_dict(t: TensorPlan) -> dict:
    d = asdict(t)
    d["role"], d["action"] = t.role.value, t.action.value
    if t.range is not None:
        d["range"] = list(t.range)
    return d
