"""What a rule returns, and what it may ask of the planner.

A rule looks at one node and answers either ``Skip(reason)`` or a ``NodeRule``
that says, per input index, how it is quantized (``Act``, ``Weight``,
``Bias``) and what happens to its output: ``Act`` (int8 output required for an
integer kernel), ``Optional`` (the kernel can also produce float, e.g.
MatMulIntegerToFloat and QGemm: the output is int8 only if a quantized consumer
reads it), ``Share`` (same parameters as an input or a weight) or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from ..config import QuantizeOptions
from ..graph import GraphView


@dataclass(frozen=True)
class Act:
    """An activation with its own parameters from calibration."""


@dataclass(frozen=True)
class Optional:
    """An output that is int8 only if a quantized consumer wants it."""


@dataclass(frozen=True)
class Weight:
    """A constant weight; ``axis`` is the per-channel axis or None for per-tensor.
    ``qtype``/``symmetric`` override the options' weight type (embedding tables
    take the activation type so that gathered rows match their consumers)."""

    axis: int | None
    qtype: str | None = None
    symmetric: bool = True


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


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass
class Context:
    """What the planner knows so far, in topological order.

    ``quantized`` maps activation tensors already represented in int8 to the
    node that decided it; ``optional`` holds outputs that may become int8 if a
    consumer wants them; ``fused`` holds activation nodes (Relu, Clip) that a
    preceding quantized op absorbs; ``patterns`` maps node names to the float
    pattern (LayerNorm, GELU, Swish) they belong to; ``ranges`` holds
    calibrated ranges once known.
    """

    view: GraphView
    options: QuantizeOptions
    quantized: dict[str, str] = field(default_factory=dict)
    optional: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)
    patterns: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] | None = None
    macs: dict[str, int] = field(default_factory=dict)

    def mac_share(self, node: onnx.NodeProto) -> float | None:
        """This node's share of the model's Conv/MatMul/Gemm MACs (None if unknown)."""
        total = sum(self.macs.values())
        key = self.node_key(node)
        return self.macs[key] / total if total and key in self.macs else None

    def is_quantized(self, tensor: str) -> bool:
        return tensor in self.quantized

    def is_int8_capable(self, tensor: str) -> bool:
        """Already int8, or the output of a quantized node that can emit int8."""
        return tensor in self.quantized or tensor in self.optional

    def is_model_output(self, tensor: str) -> bool:
        return tensor in self.view.graph_outputs

    def node_key(self, node: onnx.NodeProto) -> str:
        return self.view.node_name(node)


def float_inputs(node: onnx.NodeProto, ctx: Context) -> list[str]:
    """Activation inputs of ``node`` that are not (and cannot cheaply become) int8."""
    return [t for t in node.input if t and not ctx.view.is_initializer(t) and not ctx.is_int8_capable(t)]
