"""The calibration table: a versioned JSON record of per-tensor statistics.

Layout (format_version 1)::

    {"format": "qtool.calibration", "format_version": 1, "qtool_version": "0.1.0",
     "model_sha256": "...", "method": "minmax", "params": {...},
     "samples": 256, "batches": 8,
     "tensors": {"conv1_out": {"min": -1.2, "max": 3.4, "count": 200704,
                               "range": [-1.2, 3.4], "notes": [],
                               "histogram": null | {compact histogram},
                               "channels": {"axis": -1, "min": [...], "max": [...], "mean": [...]}}},
     "smoothquant": {...}}

``range`` is what ``method`` chose; ``min``/``max`` are always kept, and a
``histogram`` (histogram methods) lets another method be derived later without
running the model again. ``channels`` (optional: the data inputs of MatMul, Gemm and Conv)
holds per-channel extremes and means along the layer's input-channel axis (see
``channels.py``); ``smoothquant`` (optional, tables made with ``--algorithms smoothquant``)
the record from which the smoothed model is rebuilt (see ``qtool.algorithms.smoothquant``).
Both are absent from older tables, which load as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TableError
from ..model import atomic_write_text

FORMAT = "qtool.calibration"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorStats:
    min: float
    max: float
    count: int
    range: tuple[float, float]
    notes: tuple[str, ...] = ()
    histogram: dict | None = None
    channels: dict | None = None  # per input channel: {"axis", "min", "max", "mean"} (channels.py)
    auto: dict | None = None  # --method auto: {"method": chosen, "output_snr_db": {candidate: dB}} (auto.py)

    def to_dict(self) -> dict:
        return {"min": self.min, "max": self.max, "count": self.count, "range": list(self.range),
                "notes": list(self.notes), "histogram": self.histogram} \
            | ({"channels": self.channels} if self.channels is not None else {}) \
            | ({"auto": self.auto} if self.auto is not None else {})

    @classmethod
    def from_dict(cls, d: dict) -> "TensorStats":
        """Parse and check one tensor's statistics: finite numbers, min <= max, lo <= hi.
        A bad range would silently cost accuracy, so every problem is an error here."""
        if not isinstance(d, dict):
            raise ValueError("statistics must be a JSON object")
        lo_hi = d["range"]
        if not isinstance(lo_hi, list) or len(lo_hi) != 2:
            raise ValueError(f"range must be [lo, hi], got {lo_hi!r}")
        lo, hi = (_finite(v, "range") for v in lo_hi)
        mn, mx = _finite(d["min"], "min"), _finite(d["max"], "max")
        if lo > hi or mn > mx:
            raise ValueError(f"inverted range: range [{lo}, {hi}], min {mn}, max {mx}")
        count = d["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        hist = d.get("histogram")
        if hist is not None and not isinstance(hist, dict):
            raise ValueError("histogram must be an object or null")
        notes = d.get("notes", [])
        if not isinstance(notes, list):
            raise ValueError("notes must be a list")
        channels = d.get("channels")
        if channels is not None:
            from .channels import check_channels
            channels = check_channels(channels)
        auto = d.get("auto")
        if auto is not None:
            from .auto import Choice
            auto = Choice.from_dict(auto).to_dict()
        return cls(mn, mx, count, (lo, hi), tuple(str(n) for n in notes), hist, channels, auto)


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CalibrationTable:
    model_sha256: str
    method: str
    params: dict
    samples: int
    batches: int
    tensors: dict[str, TensorStats]
    qtool_version: str = ""
    format_version: int = FORMAT_VERSION
    notes: tuple[str, ...] = field(default=())
    smoothquant: dict | None = None  # the SmoothQuant record (qtool.algorithms.smoothquant.Smoothing.to_dict)

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {name: s.range for name, s in self.tensors.items()}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": self.format_version, "qtool_version": self.qtool_version,
                "model_sha256": self.model_sha256, "method": self.method, "params": self.params,
                "samples": self.samples, "batches": self.batches, "notes": list(self.notes),
                "tensors": {k: v.to_dict() for k, v in self.tensors.items()}} \
            | ({"smoothquant": self.smoothquant} if self.smoothquant is not None else {})

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationTable":
        from ..config import CALIBRATION_METHODS
        if d.get("format") != FORMAT:
            raise TableError("not a qtool calibration table (missing format marker)")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise TableError(f"format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise TableError(f"table format {version} is newer than this qtool reads ({FORMAT_VERSION})")
        if d.get("method") not in CALIBRATION_METHODS:
            raise TableError(f"unknown method {d.get('method')!r} (known: {', '.join(CALIBRATION_METHODS)})")
        if not isinstance(d.get("tensors"), dict):
            raise TableError("\"tensors\" must map tensor names to statistics (an object, not a list)")
        if not isinstance(d.get("params", {}), dict):
            raise TableError("\"params\" must be an object")
        tensors = {}
        for name, stats in d["tensors"].items():
            try:
                tensors[name] = TensorStats.from_dict(stats)
            except (KeyError, TypeError, ValueError) as exc:
                raise TableError(f"tensor {name!r}: {f'missing {exc}' if isinstance(exc, KeyError) else exc}") from None
        smooth = d.get("smoothquant")
        if smooth is not None:
            from ..algorithms.smoothquant import Smoothing
            try:
                smooth = Smoothing.from_dict(smooth).to_dict()
            except (KeyError, TypeError, ValueError) as exc:
                raise TableError(f"smoothquant: {f'missing {exc}' if isinstance(exc, KeyError) else exc}") from None
        try:
            return cls(d["model_sha256"], d["method"], dict(d.get("params", {})), int(d["samples"]),
                       int(d["batches"]), tensors, d.get("qtool_version", ""), int(d["format_version"]),
                       tuple(d.get("notes", ())), smooth)
        except (KeyError, TypeError, ValueError) as exc:
            raise TableError(f"malformed calibration table ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationTable":
        p = Path(path)
        if not p.is_file():
            raise TableError(f"{p}: no such calibration table")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TableError(f"{p}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise TableError(f"{p}: not a qtool calibration table")
        try:
            return cls.from_dict(data)
        except TableError as exc:
            raise TableError(f"{p}: {exc}") from None
