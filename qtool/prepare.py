"""The one pre-processing path that calibrate, quantize and inspect share, so
tensor names in a calibration table match the model the planner sees."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from . import model as model_io
from .graph import infer_shapes


@dataclass(frozen=True)
class Prepared:
    model: onnx.ModelProto
    sha256: str
    notes: tuple[str, ...]


def prepare(path) -> Prepared:
    """Load, upgrade the opset to 13 when needed, infer shapes; report each step."""
    m = model_io.load(path)
    notes = []
    m, note = model_io.ensure_opset(m)
    if note:
        notes.append(note)
    m, note = infer_shapes(m)
    if note:
        notes.append(note)
    return Prepared(m, model_io.sha256_file(path), tuple(notes))
