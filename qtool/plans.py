"""The plan: for every tensor and node, what is quantized, how, and why.

The planner decides (``action``, ``precision``, ``granularity`` and a reason
for every tensor; a decision and a reason for every node); :mod:`qtool.resolve`
fills in every scale and zero point (weights and biases too) and every node's
kernel; the rewriters write exactly that. A resolved plan is the whole contract:
saved as JSON and applied again (``qtool quantize MODEL --plan P.json``) it gives
the same model byte for byte. Scales are float32 values, stored as JSON numbers
that round-trip exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from enum import Enum

from .types import Granularity, PerTensor, Precision, Target, axis_of, granularity_from_json, granularity_to_json

PLAN_FORMAT = "qtool.plan"
PLAN_FORMAT_VERSION = 2


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


Scale = float | tuple[float, ...]
ZeroPoint = int | tuple[int, ...]


@dataclass(frozen=True)
class TensorPlan:
    """One tensor's decision.

    ``source`` names the tensor a SHARE copies, or the activation a bias derives
    from (with ``weight``). ``scale``/``zero_point`` (a number per tensor, a
    tuple per axis) are filled by resolve. ``transpose``: a weight stored
    transposed (a Gemm with transB in dynamic mode). ``reduce_range``: a weight
    on a 7-bit grid (x86-64 without VNNI, see :func:`qtool.types.cpu_saturates_u8s8`). ``qdq_domain``: the domain
    of its QuantizeLinear/DequantizeLinear ("com.microsoft" for 16-bit types
    below opset 21). ``codes``: base64 of the quantized values themselves, for a weight
    whose values do not follow from its scale and zero point (int4 GPTQ): the tensor's
    values in its own shape, C order, as unsigned nibbles ``q - qmin``, two per byte, the
    first in the low nibble.
    """

    name: str
    role: Role
    action: Action
    reason: str
    precision: Precision = Precision.FLOAT
    granularity: Granularity = PerTensor()
    symmetric: bool = False
    source: str | None = None
    weight: str | None = None
    scale: Scale | None = None
    zero_point: ZeroPoint | None = None
    range: tuple[float, float] | None = None
    transpose: bool = False
    reduce_range: bool = False
    qdq_domain: str = ""
    codes: str | None = None

    @property
    def quantized(self) -> bool:
        return self.action is not Action.SKIP

    @property
    def axis(self) -> int | None:
        return axis_of(self.granularity)

    @property
    def has_params(self) -> bool:
        return self.scale is not None and self.zero_point is not None

    def to_dict(self) -> dict:
        d = {"name": self.name, "role": self.role.value, "action": self.action.value, "reason": self.reason,
             "precision": self.precision.label, "granularity": granularity_to_json(self.granularity),
             "symmetric": self.symmetric, "source": self.source, "weight": self.weight,
             "scale": list(self.scale) if isinstance(self.scale, tuple) else self.scale,
             "zero_point": list(self.zero_point) if isinstance(self.zero_point, tuple) else self.zero_point,
             "range": list(self.range) if self.range is not None else None}
        if self.transpose:
            d["transpose"] = True
        if self.reduce_range:
            d["reduce_range"] = True
        if self.qdq_domain:
            d["qdq_domain"] = self.qdq_domain
        if self.codes is not None:
            d["codes"] = self.codes
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorPlan":
        scale, zp, rng = d.get("scale"), d.get("zero_point"), d.get("range")
        return cls(
            name=_str(d, "name"), role=Role(d["role"]), action=Action(d["action"]), reason=str(d.get("reason", "")),
            precision=Precision.parse(d.get("precision", "float")),
            granularity=granularity_from_json(d.get("granularity", {"kind": "per-tensor"})),
            symmetric=_bool(d, "symmetric", False), source=_opt_str(d, "source"), weight=_opt_str(d, "weight"),
            scale=tuple(_num(v, float) for v in scale) if isinstance(scale, list) else _opt_num(scale, float),
            zero_point=tuple(_num(v, int) for v in zp) if isinstance(zp, list) else _opt_num(zp, int),
            range=None if rng is None else (float(rng[0]), float(rng[1])),
            transpose=_bool(d, "transpose", False), reduce_range=_bool(d, "reduce_range", False),
            qdq_domain=str(d.get("qdq_domain", "")), codes=_opt_codes(d))


@dataclass(frozen=True)
class NodePlan:
    """One node's decision.

    ``precision``: the activation precision of a quantized node, FLOAT when it
    stays float in the model's own type, FP16 when it runs in half precision (its
    float inputs cast to fp16, its weights stored in fp16, its outputs cast back). ``kernel``: the op the rewriter emits for it (filled by
    resolve). ``fused_into``: the node that absorbs this one (a Relu into its
    Conv, a bias Add into its MatMul). ``inputs``: the tensors a quantized node
    reads quantized. ``float_inputs``: quantized tensors a float node reads
    unquantized (a node kept float on request, or one onnxruntime would
    otherwise quantize behind the plan's back). ``bias``: the float bias a
    dynamic kernel folds in.
    """

    name: str
    op_type: str
    precision: Precision
    reason: str
    kernel: str = ""
    fused_into: str = ""
    inputs: tuple[str, ...] = ()
    float_inputs: tuple[str, ...] = ()
    bias: str = ""

    @property
    def quantized(self) -> bool:
        """Runs on integers (fp16 and the model's float type are not)."""
        return self.precision.is_integer

    def to_dict(self) -> dict:
        d = {"name": self.name, "op_type": self.op_type, "precision": self.precision.label, "reason": self.reason,
             "kernel": self.kernel, "fused_into": self.fused_into, "inputs": list(self.inputs)}
        if self.float_inputs:
            d["float_inputs"] = list(self.float_inputs)
        if self.bias:
            d["bias"] = self.bias
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NodePlan":
        return cls(_str(d, "name"), _str(d, "op_type"), Precision.parse(d.get("precision", "float")),
                   str(d.get("reason", "")), str(d.get("kernel", "")), str(d.get("fused_into", "")),
                   _names(d, "inputs"), _names(d, "float_inputs"), str(d.get("bias", "")))


@dataclass(frozen=True)
class Plan:
    """Every tensor's and node's decision, and what the rewriter needs to apply them.

    ``mode``/``format`` choose the rewriter; ``model_sha256`` and ``preprocess``
    tie the plan to one model file prepared one way. ``io_fp16``: the model's float32
    inputs and outputs become fp16 (an fp16 model made with ``keep_io_types`` false).
    """

    tensors: dict[str, TensorPlan]
    nodes: tuple[NodePlan, ...]
    notes: tuple[str, ...] = ()
    mode: str = "static"
    format: str = "qdq"
    target: Target = Target.CPU
    model_sha256: str = ""
    preprocess: bool = True
    resolved: bool = False
    format_version: int = PLAN_FORMAT_VERSION
    subgraphs: dict = field(default_factory=dict)  # "<node>/<attribute>" -> the plan of that body
    io_fp16: bool = False
    algorithms: tuple[str, ...] = ()  # weight-changing passes run on the fp32 model before planning ("cle")
    # what each accuracy algorithm did where: {algorithm: {node or tensor: measured gain in dB}}; the gain is
    # the SQNR of what that algorithm is judged on (a layer's output, the model's outputs), after minus before
    applied: dict = field(default_factory=dict)
    # the SmoothQuant record the model was smoothed with (algorithms.smoothquant.Smoothing.to_dict), so that
    # the plan alone rebuilds the same smoothed model
    smoothquant: dict | None = None
    node_index: dict = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "node_index", {n.name: n for n in self.nodes})

    def node(self, name: str) -> NodePlan | None:
        return self.node_index.get(name)

    def quantized_nodes(self) -> list[NodePlan]:
        return [n for n in self.nodes if n.quantized]

    def all_nodes(self) -> list[NodePlan]:
        """The main graph's nodes, then those of its subgraphs."""
        return list(self.nodes) + [n for sub in self.subgraphs.values() for n in sub.all_nodes()]

    def all_quantized_nodes(self) -> list[NodePlan]:
        return [n for n in self.all_nodes() if n.quantized]

    def with_tensors(self, tensors: dict[str, TensorPlan]) -> "Plan":
        return replace(self, tensors=tensors)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT, "format_version": self.format_version, "model_sha256": self.model_sha256,
            "preprocess": self.preprocess, "mode": self.mode, "quant_format": self.format,
            "target": self.target.label, "resolved": self.resolved, "notes": list(self.notes),
            "nodes": [n.to_dict() for n in self.nodes],
            "tensors": [t.to_dict() for t in self.tensors.values()],
        } | ({"subgraphs": {k: _body_dict(v) for k, v in self.subgraphs.items()}} if self.subgraphs else {}) \
          | ({"io_fp16": True} if self.io_fp16 else {}) \
          | ({"algorithms": list(self.algorithms)} if self.algorithms else {}) \
          | ({"applied": {k: dict(v) for k, v in self.applied.items()}} if self.applied else {}) \
          | ({"smoothquant": self.smoothquant} if self.smoothquant is not None else {})

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Parse a plan; structural problems raise ValueError naming the field."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a qtool plan (expected \"format\": \"{PLAN_FORMAT}\")")
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(f"plan format_version {version!r} is not supported (this qtool reads "
                             f"{PLAN_FORMAT_VERSION}); save the plan again with this qtool")
        tensors = {}
        for i, t in enumerate(_list(data, "tensors")):
            try:
                if not isinstance(t, dict):
                    raise ValueError("each tensor must be a JSON object")
                parsed = TensorPlan.from_dict(t)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                raise ValueError(f"tensors[{i}] ({t.get('name', '?') if isinstance(t, dict) else t!r}): "
                                 f"{_why(exc)}") from None
            if parsed.name in tensors:
                raise ValueError(f"tensor {parsed.name!r} is listed twice")
            tensors[parsed.name] = parsed
        nodes = []
        for i, n in enumerate(_list(data, "nodes")):
            try:
                if not isinstance(n, dict):
                    raise ValueError("each node must be a JSON object")
                parsed_node = NodePlan.from_dict(n)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ValueError(f"nodes[{i}]: {_why(exc)}") from None
            if any(m.name == parsed_node.name for m in nodes):
                raise ValueError(f"node {parsed_node.name!r} is listed twice")
            nodes.append(parsed_node)
        subs = data.get("subgraphs", {})
        if not isinstance(subs, dict):
            raise ValueError("subgraphs must be an object: {\"<node>/<attribute>\": plan}")
        subgraphs = {}
        for key, sub in subs.items():
            if not isinstance(sub, dict):
                raise ValueError(f"subgraphs[{key!r}] must be a plan object")
            try:
                inherited = {k: data[k] for k in ("mode", "quant_format", "target", "resolved", "preprocess")
                             if k in data}
                subgraphs[str(key)] = cls.from_dict(dict(sub, format=PLAN_FORMAT, format_version=version,
                                                         **inherited))
            except ValueError as exc:
                raise ValueError(f"subgraphs[{key!r}]: {exc}") from None
        return cls(tensors, tuple(nodes), _names(data, "notes"), str(data.get("mode", "static")),
                   str(data.get("quant_format", "qdq")), Target.parse(data.get("target", "cpu")),
                   str(data.get("model_sha256", "")), _bool(data, "preprocess", True),
                   _bool(data, "resolved", False), version, subgraphs, _bool(data, "io_fp16", False),
                   _algorithms(data), _applied(data), _smoothquant(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def explain(self) -> str:
        """Human-readable plan: one line per node, then quantized activations."""
        width = max([len(n.name) for n in self.nodes] + [4])
        lines = [f"{'node':<{width}}  {'op':<14} decision  reason"]
        for n in self.nodes:
            kernel = f" -> {n.kernel}" if n.kernel and n.kernel != n.op_type else ""
            lines.append(f"{n.name:<{width}}  {n.op_type:<14} {n.precision.label:<9} {n.reason}{kernel}")
        acts = [t for t in self.tensors.values() if t.role is Role.ACTIVATION]
        if acts:
            lines.append("")
            lines.append("activations:")
            for t in acts:
                params = "" if t.scale is None else f" {t.precision.label} scale={t.scale:.6g} zp={t.zero_point}"
                lines.append(f"  {t.name}: {t.action.value}{params} ({t.reason})")
        for note in self.notes:
            lines.append(f"note: {note}")
        for key, sub in self.subgraphs.items():
            lines.append("")
            lines.append(f"subgraph {key}:")
            lines.extend("  " + line for line in sub.explain().splitlines())
        return "\n".join(lines)


def _body_dict(plan: "Plan") -> dict:
    """A subgraph's plan: its nodes, tensors and notes (the rest is the main plan's)."""
    d = plan.to_dict()
    return {k: d[k] for k in ("notes", "nodes", "tensors", "subgraphs") if k in d}


def _why(exc: Exception) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)


def _str(d: dict, key: str) -> str:
    value = d[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _list(d: dict, key: str) -> list:
    value = d.get(key)
    if not isinstance(value, list):
        raise ValueError(f"\"{key}\" must be a list")
    return value


def _num(v, kind):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {v!r}")
    if kind is int and (not float(v).is_integer() or abs(v) > 2**32):
        raise ValueError(f"expected an integer zero point, got {v!r}")
    return kind(v)


def _bool(d: dict, key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _opt_str(d: dict, key: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key} must be a tensor name or null, got {value!r}")
    return value


def _applied(d: dict) -> dict:
    """``applied``: {algorithm: {location: finite gain in dB}}."""
    value = d.get("applied", {})
    if not isinstance(value, dict):
        raise ValueError("applied must be an object: {algorithm: {node or tensor: gain in dB}}")
    out = {}
    for algorithm, where in value.items():
        if not isinstance(where, dict):
            raise ValueError(f"applied[{algorithm!r}] must be an object: {{node or tensor: gain in dB}}")
        gains = {}
        for k, v in where.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"applied[{algorithm!r}][{k!r}] must be a finite number, got {v!r}")
            gains[str(k)] = float(v)
        out[str(algorithm)] = gains
    return out


def _smoothquant(d: dict) -> dict | None:
    value = d.get("smoothquant")
    if value is None:
        return None
    from .algorithms.smoothquant import Smoothing
    try:
        return Smoothing.from_dict(value).to_dict()
    except ValueError as exc:
        raise ValueError(f"smoothquant: {exc}") from None


def _algorithms(d: dict) -> tuple[str, ...]:
    from .algorithms import KNOWN
    names = _names(d, "algorithms")
    for name in names:
        if name not in KNOWN:
            raise ValueError(f"algorithms: unknown {name!r} (known: {', '.join(KNOWN)})")
    return names


def _names(d: dict, key: str) -> tuple[str, ...]:
    value = d.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def _opt_codes(d: dict) -> str | None:
    value = d.get("codes")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"codes must be a base64 string or null, got {type(value).__name__}")
    return value


def _opt_num(v, kind):
    return None if v is None else _num(v, kind)
