"""The one pre-processing path that calibrate, quantize and inspect share, so
tensor names in a calibration table match the model the planner sees."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from . import model as model_io


@dataclass(frozen=True)
class Prepared:
    model: onnx.ModelProto
    sha256: str
    notes: tuple[str, ...]
    half: int | None = None  # the source's half type (fp16/bf16) when it computes in one


def prepare(path, preprocess: bool = True, algorithms: tuple[str, ...] = ()) -> Prepared:
    """Load, then run the pre-processing passes (fp16/bf16 upcast, opset upgrade and
    shape inference always; constant folding, Constant->initializer, BatchNorm and Pad folding
    unless ``preprocess`` is False); every step that changed something is noted. Then the
    weight-changing ``algorithms`` asked for, in order ("cle": cross-layer equalisation)."""
    from .preprocess import run_all
    from .preprocess.half import half_type
    m = model_io.load(path)
    result = run_all(m, preprocess)
    model, notes = result.model, tuple(result.notes)
    from .algorithms import WEIGHT
    for name in algorithms:
        if name in WEIGHT:
            continue  # run after resolve, on the plan (qtool.algorithms.weights)
        if name == "cle":
            from .algorithms.cle import equalize
            model, more = equalize(model)
            notes += tuple(more)
        else:
            from .errors import ConfigError
            from .algorithms import KNOWN
            raise ConfigError(f"unknown algorithm {name!r} (known: {', '.join(KNOWN)})")
    return Prepared(model, model_io.sha256_file(path), notes, half_type(m))
