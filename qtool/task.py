"""Task-metric hooks for ``qtool eval --task FILE``: gate on what users care about
(retrieval accuracy, mAP, detection F1, ...) and not only on logits.

A task file is a Python module with ``reduce`` and at least one of ``score`` and
``compare``::

    NAME = "retrieval top-1"                       # shown in the report (default: the file's stem)
    def reduce(outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> np.ndarray:
        ...  # per batch: the rows the metric needs (e.g. mean-pooled embeddings), one per sample
    def score(rows: np.ndarray) -> float:
        ...  # absolute: once per model, on its rows of every batch; higher is better
    def compare(reference_rows: np.ndarray, candidate_rows: np.ndarray) -> float:
        ...  # pairwise: the candidate judged against the reference; higher is better

``reduce`` keeps memory small (a 384-float embedding per sample instead of a
whole hidden state). The rows of all batches are concatenated along axis 0
before ``score``/``compare`` sees them; rows of varying length (a detector's
boxes) come as a 1-D object array with one entry per sample (``reduce`` returns
``np.empty(n, dtype=object)`` filled with per-sample arrays).

When the file defines ``compare`` it is used, and ``score`` is optional: the report's
reference value is ``compare(reference_rows, reference_rows)`` (the perfect score,
e.g. F1 1.0) and its candidate value ``compare(reference_rows, candidate_rows)``, so the
drop is e.g. 1 - F1 of the candidate's detections against the reference's. Otherwise both
models' rows go through the same ``score``. ``--max-task-drop`` gates on the drop.
An exception in a hook is reported as one ``error:`` line (exit 2) naming the hook.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QtoolError


@dataclass(frozen=True)
class Task:
    name: str
    reduce: Callable[[dict, dict], np.ndarray]
    score: Callable[[np.ndarray], float] | None = None
    compare: Callable[[np.ndarray, np.ndarray], float] | None = None
    path: str = ""

    def rows(self, outputs: dict, batch: dict) -> np.ndarray:
        """``reduce`` on one batch, as an array."""
        value = self._call("reduce", self.reduce, outputs, batch)
        return value if isinstance(value, np.ndarray) else np.asarray(value)

    def evaluate(self, rows_reference: list, rows_candidate: list) -> tuple[float, float]:
        """(reference value, candidate value) from the per-batch rows of both models."""
        ref, cand = self._concat(rows_reference), self._concat(rows_candidate)
        if self.compare is not None:
            return (self._number("compare", self.compare, ref, ref), self._number("compare", self.compare, ref, cand))
        return self._number("score", self.score, ref), self._number("score", self.score, cand)

    def _concat(self, rows: list) -> np.ndarray:
        try:
            return np.concatenate(rows) if rows else np.empty(0)
        except ValueError as exc:
            raise QtoolError(f"{self.path}: reduce() returned rows that do not stack along axis 0 ({exc}); "
                             "return one row per sample, as an object array for varying lengths") from None

    def _number(self, hook: str, fn, *args) -> float:
        value = self._call(hook, fn, *args)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise QtoolError(f"{self.path}: {hook}() must return a number, got {type(value).__name__}") from None

    def _call(self, hook: str, fn, *args):
        try:
            return fn(*args)
        except QtoolError:
            raise
        except Exception as exc:
            raise QtoolError(f"{self.path}: {hook}() failed ({type(exc).__name__}: {str(exc)[:200]})") from None


def load_task(path: str | Path) -> Task:
    p = Path(path)
    if not p.is_file():
        raise QtoolError(f"{p}: no such task file")
    spec = importlib.util.spec_from_file_location(f"qtool_task_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise QtoolError(f"{p}: task file failed to import ({type(exc).__name__}: {exc})") from None
    hooks = {f: getattr(module, f, None) for f in ("reduce", "score", "compare")}
    hooks = {f: fn if callable(fn) else None for f, fn in hooks.items()}
    missing = []
    if hooks["reduce"] is None:
        missing.append("reduce()")
    if hooks["score"] is None and hooks["compare"] is None:
        missing.append("score() or compare()")
    if missing:
        raise QtoolError(f"{p}: task file must define {' and '.join(missing)}")
    return Task(str(getattr(module, "NAME", p.stem)), hooks["reduce"], hooks["score"], hooks["compare"], str(p))
