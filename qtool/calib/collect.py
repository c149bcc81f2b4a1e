"""Stream data through onnxruntime and reduce the requested tensors batch by batch.

The model is augmented so that exactly the tensors to be quantized are graph
outputs; each batch's outputs are folded into observers and dropped, so memory
does not grow with the number of samples.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import helper

from .. import runtime
from ..errors import DataError


def augment(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (float32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in tensors:
        if name not in existing:
            out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def collect(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
            make_observer: Callable[[], object], on_batch: Callable[[int], None] | None = None,
            threads: int | None = None) -> tuple[dict[str, object], int, int]:
    """Run every batch and update one observer per tensor.

    Returns (observers, samples, batches). NaN/Inf in an input or in a collected
    tensor is a DataError naming the tensor and the batch.
    """
    from ..data import check_finite
    sess = runtime.session(augment(model, tensors), threads=threads)
    input_names = {i.name for i in sess.get_inputs()}
    observers = {name: make_observer() for name in tensors}
    samples = index = 0
    for index, batch in enumerate(batches):
        feeds = {k: v for k, v in batch.items() if k in input_names}
        check_finite(feeds, index)
        values = runtime.run(sess, feeds, tensors)
        for name, value in zip(tensors, values):
            if value.dtype.kind == "f" and value.size and not np.isfinite(value).all():
                raise DataError(f"tensor {name!r} holds NaN or Inf in batch {index}")
            observers[name].update(value)
        values = value = None  # free this batch's outputs before the next run allocates its own
        n = len(next(iter(feeds.values()))) if feeds else 0
        samples += n
        if on_batch:
            on_batch(n)
    if samples == 0:
        raise DataError("calibration data is empty (0 samples)")
    return observers, samples, index + 1
