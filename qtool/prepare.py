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


def prepare(path, preprocess: bool = True) -> Prepared:
    """Load, then run the pre-processing passes (fp16/bf16 upcast, opset upgrade and
    shape inference always; constant folding, Constant->initializer, BatchNorm and Pad folding
    unless ``preprocess`` is False); every step that changed something is noted."""
    from .preprocess import run_all
    from .preprocess.half import half_type
    m = model_io.load(path)
    result = run_all(m, preprocess)
    return Prepared(result.model, model_io.sha256_file(path), result.notes, half_type(m))
