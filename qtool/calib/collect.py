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
    """A copy of ``model`` that also outputs ``tensors`` (float32; names of the main graph)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in tensors:
        if name not in existing:
            out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def collect(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
            make_observer: Callable[[str], object], on_batch: Callable[[int], None] | None = None,
            threads: int | None = None, fetch: dict[str, str] | None = None
            ) -> tuple[dict[str, object], int, int, tuple[str, ...]]:
    """Run every batch and update one observer per tensor (``make_observer(name)``). ``fetch``: the main-graph
    output that carries a subgraph's tensor (see qtool.subgraphs.expose).

    Returns (observers, samples, batches, notes); a tensor that never held a value (an If
    branch never taken) has no observer. NaN/Inf in an input or in a collected tensor is a
    DataError naming the tensor and the batch.
    """
    from ..data import check_finite
    fetch = fetch or {}
    outputs = [fetch.get(t, t) for t in tensors]
    sess = runtime.session(augment(model, outputs), threads=threads)
    input_names = {i.name for i in sess.get_inputs()}
    observers = {name: make_observer(name) for name in tensors}
    seen: set[str] = set()
    samples = index = 0
    single = False  # the model only runs one sample at a time (a batch of 1 fixed inside it)
    for index, batch in enumerate(batches):
        feeds = {k: v for k, v in batch.items() if k in input_names}
        check_finite(feeds, index)
        n = len(next(iter(feeds.values()))) if feeds else 0
        for part in _parts(sess, feeds, outputs, n, single):
            if part is None:
                single = True
                continue
            for name, value in zip(tensors, part):
                if value.size == 0:
                    continue  # a subgraph tensor of an If branch not taken on this batch
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise DataError(f"tensor {name!r} holds NaN or Inf in batch {index}")
                observers[name].update(value)
                seen.add(name)
            part = value = None  # free this batch's outputs before the next run allocates its own
        samples += n
        if on_batch:
            on_batch(n)
    if samples == 0:
        raise DataError("calibration data is empty (0 samples)")
    notes = ("the model fails on batches of several samples but runs one (a batch of 1 fixed inside it): "
             "calibrated one sample at a time",) if single else ()
    never = [t for t in tensors if t not in seen and t in fetch]
    if never:
        notes += (f"{len(never)} subgraph tensors never held a value on this data (an If branch not taken, "
                  f"e.g. {never[0]}): no statistics, their nodes stay float",)
    return {t: o for t, o in observers.items() if t in seen or t not in fetch}, samples, index + 1, notes


def _parts(sess, feeds: dict, tensors: list[str], n: int, single: bool):
    """The batch's outputs, or, where the model fails on a batch but runs one sample (a batch
    of 1 fixed inside it, e.g. by a Reshape), None and then the outputs sample by sample.
    Statistics are the same either way: observers fold any split of the data exactly."""
    from ..errors import ModelError
    if not single:
        try:
            yield runtime.run(sess, feeds, tensors)
            return
        except ModelError:
            if n <= 1:
                raise
            yield runtime.run(sess, {k: v[:1] for k, v in feeds.items()}, tensors)  # fails again: not batching
            yield None
            start = 1
    else:
        start = 0
    for i in range(start, n):
        yield runtime.run(sess, {k: v[i:i + 1] for k, v in feeds.items()}, tensors)
