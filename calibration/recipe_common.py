"""Helpers shared by the model recipes in calibration/ (recipes only; qtool never imports this)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def tidy_initializer_names(graph) -> None:
    """Name Conv/Gemm weights after their module (``conv1.weight``,
    ``_blocks.3._depthwise_conv.weight``).

    The exporter names BN-folded Conv parameters ``onnx::Conv_NNN``. Node names
    such as ``/_blocks.3/_depthwise_conv/Conv`` give the module path.
    """
    inits = {i.name: i for i in graph.initializer}
    renames = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or not node.name.startswith("/"):
            continue
        module = ".".join(node.name[1:].split("/")[:-1])
        if not module:
            continue
        for inp, suffix in zip(node.input[1:], ("weight", "bias")):
            new = f"{module}.{suffix}"
            if inp in inits and inp != new and inp not in renames and new not in inits:
                renames[inp] = new
    if len(set(renames.values())) != len(renames):
        return  # ambiguous; keep exporter names
    for old, new in renames.items():
        inits[old].name = new
    for node in graph.node:
        for k, inp in enumerate(node.input):
            if inp in renames:
                node.input[k] = renames[inp]


def check_and_write(m, path: Path):
    """The checks every single-file CNN recipe makes of its export, then the write: all weights
    inside the .onnx file, onnx's full check, BatchNorm folded away, and a dynamic first axis
    named ``batch`` on every input and output. Returns the op-type counts."""
    from collections import Counter

    import onnx
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            raise RuntimeError(f"initializer {init.name} uses external data")
    onnx.checker.check_model(m, full_check=True)
    op_types = Counter(n.op_type for n in m.graph.node)
    if "BatchNormalization" in op_types:
        raise RuntimeError(f"BatchNormalization was not folded: {dict(op_types)}")
    for vi in list(m.graph.input) + list(m.graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        if dim0.dim_param != "batch":
            raise RuntimeError(f"{vi.name}: first dim is {dim0} (expected dim_param 'batch')")
    path.write_bytes(m.SerializeToString())
    return op_types


def ort_session(path: Path):
    """An onnxruntime CPU session pinned to 2 threads, to check an export against torch."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def print_outputs(out: Path, t_start: float, names=("model.onnx", "calib.npz", "eval.npz")) -> None:
    """Each output file's size, then the recipe's wall time since ``t_start`` (perf_counter)."""
    for name in names:
        print(f"{out / name}: {os.path.getsize(out / name):,} bytes")
    print(f"done in {time.perf_counter() - t_start:.1f}s")
