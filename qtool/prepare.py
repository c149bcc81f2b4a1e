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
    smoothing: object | None = None  # the SmoothQuant record applied (algorithms.smoothquant.Smoothing)


def prepare(path, preprocess: bool = True, algorithms: tuple[str, ...] = (), smoothing=None,
            measure=None) -> Prepared:
    """Load, then run the pre-processing passes (fp16/bf16 upcast, opset upgrade and
    shape inference always; constant folding, Constant->initializer, BatchNorm and Pad folding
    unless ``preprocess`` is False); every step that changed something is noted. Then the
    weight-changing ``algorithms`` asked for, in order ("cle": cross-layer equalisation,
    "smoothquant": SmoothQuant).

    SmoothQuant depends on calibration statistics: ``smoothing`` is the record a table or plan
    carries (a ``Smoothing`` or its dict); without one, ``measure(model)`` makes it (calibration's
    pass 1, on the model as it is at that point); with neither it is a ConfigError."""
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
        elif name == "smoothquant":
            model, smoothing, more = _smoothquant(model, smoothing, measure)
            notes += tuple(more)
        else:
            from .errors import ConfigError
            from .algorithms import KNOWN
            raise ConfigError(f"unknown algorithm {name!r} (known: {', '.join(KNOWN)})")
    return Prepared(model, model_io.sha256_file(path), notes, half_type(m),
                    smoothing if "smoothquant" in algorithms else None)


def _smoothquant(model, smoothing, measure):
    from .algorithms.smoothquant import Smoothing, smooth
    from .errors import ConfigError, TableError
    if smoothing is None:
        if measure is None:
            raise ConfigError("--algorithms smoothquant needs calibration statistics (per-channel activation "
                              "maxima): give --data, or a --table or --plan made with --algorithms smoothquant")
        smoothing = measure(model)
    elif not isinstance(smoothing, Smoothing):
        smoothing = Smoothing.from_dict(smoothing)
    try:
        model, notes = smooth(model, smoothing)
    except ValueError as exc:
        raise TableError(str(exc)) from None
    return model, smoothing, notes
