"""Read-only views over an ONNX graph."""

from .view import GraphView, infer_shapes, tensor_shape

__all__ = ["GraphView", "infer_shapes", "tensor_shape"]
