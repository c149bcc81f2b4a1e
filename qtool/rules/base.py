"""What a rule returns, and the read-only facts it may look at.

A rule is a pure function ``(node, ctx) -> Skip(reason) | NodeRule``. It
writes nothing: ``ctx`` answers questions about the model (facts computed once
per command) and about the decisions the planner has already assembled for
earlier nodes in topological order. A ``NodeRule`` says, per input index, how
that input is quantized (``Act``, ``Joined``: the output's parameters, ``Weight``,
``Bias``), what happens to the output — ``Act`` (an integer kernel needs an int8 output), ``Optional`` (the
kernel can also produce float, e.g. MatMulIntegerToFloat and QGemm: int8 only
if a quantized consumer reads it), ``Share`` (same parameters as an input or a
weight) or None — and which neighbour it absorbs (``fuses``: a Relu/Clip after
a Conv; a bias Add after a dynamic MatMul). The planner records a fusion only
once both sides are final.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import onnx

from ..config import QuantizeOptions
from ..graph import GraphView
from ..types import Precision, Target


@dataclass(frozen=True)
class Act:
    """An activation with its own parameters from calibration."""


@dataclass(frozen=True)
class Joined(Act):
    """An input that takes the parameters of the node's own output instead of
    its own (``--target trt``: one scale across a Concat's inputs and output,
    so that TensorRT cancels the DQ->Q pairs around it and concatenates int8)."""


@dataclass(frozen=True)
class Optional:
    """An output that is int8 only if a quantized consumer wants it."""


@dataclass(frozen=True)
class Weight:
    """A constant weight; ``axis`` is the per-channel axis (of the weight as
    stored) or None for per-tensor. ``precision`` overrides the options' weight
    type (embedding tables take the activation type so that gathered rows match
    their consumers); ``matmul``: it feeds an integer matrix product (7-bit on
    CPUs without VNNI); ``transpose``: stored transposed (dynamic Gemm, transB);
    ``block``: one scale per ``block`` elements along ``axis`` instead of one per slice
    (an embedding table's rows, read by GatherBlockQuantized)."""

    axis: int | None
    precision: Precision | None = None
    symmetric: bool = True
    matmul: bool = True
    transpose: bool = False
    block: int | None = None


@dataclass(frozen=True)
class Bias:
    """An int32 bias whose scale derives from an input and a weight."""

    input_index: int
    weight_index: int


@dataclass(frozen=True)
class Share:
    """The output reuses the parameters of input ``input_index``."""

    input_index: int = 0


@dataclass(frozen=True)
class NodeRule:
    inputs: dict
    output: Act | Optional | Share | None
    reason: str
    output_reason: str = ""
    fuses: str = ""    # the neighbour node this one absorbs, if both end up final
    kernel: str = ""   # a kernel the format does not imply (dynamic mode)
    bias: str = ""     # a float bias the kernel folds in (dynamic mode)


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class Facts:
    """What is known about the model before any decision: computed once per
    command, read by every rule, never changed. ``overrides`` maps node names
    to the precision the user asked for; ``kept_float`` maps node names to why
    they must stay float (user request, or a reader that needs their float output);
    ``dynamic`` names the MatMul/Gemm nodes of a static plan quantized at run time."""

    view: GraphView
    options: QuantizeOptions
    patterns: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] | None = None
    macs: dict[str, int] = field(default_factory=dict)
    overrides: dict[str, Precision] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)
    target: Target = Target.CPU
    dynamic: frozenset[str] = frozenset()  # MatMul/Gemm quantized at run time inside a static plan


class Context:
    """A rule's read-only window: the facts, plus what the planner has decided so
    far (tensors already int8, outputs that may become int8, fusions accepted)."""

    def __init__(self, facts: Facts, quantized, optional, fused, joined=None):
        self.facts = facts
        self.view = facts.view
        self.options = facts.options
        self.patterns = facts.patterns
        self.ranges = facts.ranges
        self._quantized = MappingProxyType(quantized)
        self._optional = MappingProxyType(optional)
        self._fused = MappingProxyType(fused)
        self._joined = MappingProxyType(joined if joined is not None else {})

    def mac_share(self, node: onnx.NodeProto) -> float | None:
        """This node's share of the model's Conv/MatMul/Gemm MACs (None if unknown)."""
        macs = self.facts.macs
        total = sum(macs.values())
        key = self.node_key(node)
        return macs[key] / total if total and key in macs else None

    def is_int8_capable(self, tensor: str) -> bool:
        """Already int8, or the output of a quantized node that can emit int8."""
        return tensor in self._quantized or tensor in self._optional

    def is_model_output(self, tensor: str) -> bool:
        return tensor in self.view.graph_outputs

    def node_key(self, node: onnx.NodeProto) -> str:
        return self.view.node_name(node)

    def joined_to(self, tensor: str) -> str | None:
        """The Concat whose scale ``tensor`` already takes (``--target trt``), if any."""
        return self._joined.get(tensor)

    def fused_by(self, node: onnx.NodeProto) -> str | None:
        """The quantized node that absorbs ``node`` (accepted by the planner), if any."""
        return self._fused.get(self.node_key(node))

    def kept_float(self, node: onnx.NodeProto) -> bool:
        return self.node_key(node) in self.facts.kept_float

    def override(self, node: onnx.NodeProto) -> Precision | None:
        return self.facts.overrides.get(self.node_key(node))


def float_inputs(node: onnx.NodeProto, ctx: Context) -> list[str]:
    """Activation inputs of ``node`` that are not (and cannot cheaply become) int8."""
    return [t for t in node.input if t and not ctx.view.is_initializer(t) and not ctx.is_int8_capable(t)]
