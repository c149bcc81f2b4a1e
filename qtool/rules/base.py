"""What a rule returns, and what it may ask of the planner.

A rule looks at one node and answers either ``Skip(reason)`` or a ``NodeRule``
that says, per input index, how it is quantized (``Act``, ``Weight`` or
``Bias``) and what happens to its output (``Act``, ``Share`` or None).
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
class Weight:
    """A constant weight; ``axis`` is the per-channel axis or None for per-tensor."""

    axis: int | None


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
    output: Act | Share | None
    reason: str
    output_reason: str = ""


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass
class Context:
    """What the planner knows so far, in topological order.

    ``quantized`` maps activation tensors already represented in int8 to the
    node that decided it; ``fused`` holds activation nodes (Relu, Clip) that a
    preceding quantized op absorbs.
    """

    view: GraphView
    options: QuantizeOptions
    quantized: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)

    def is_quantized(self, tensor: str) -> bool:
        return tensor in self.quantized

    def is_model_output(self, tensor: str) -> bool:
        return tensor in self.view.graph_outputs

    def node_key(self, node: onnx.NodeProto) -> str:
        return self.view.node_name(node)
