"""Read-only views over an ONNX graph."""

from .view import GraphView, infer_shapes, node_name, reads_of, subgraph_reads, tensor_shape

__all__ = ["GraphView", "infer_shapes", "node_name", "reads_of", "subgraph_reads", "tensor_shape"]
