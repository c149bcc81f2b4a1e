"""Task-metric hooks for ``qtool eval --task FILE``: gate on what users care about
(retrieval accuracy, mAP, ...) and not only on logits.

A task file is a Python module with::

    NAME = "retrieval top-1"                       # shown in the report
    def reduce(outputs: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> np.ndarray:
        ...  # per batch: the rows the score needs (e.g. mean-pooled embeddings)
    def score(rows: np.ndarray) -> float:
        ...  # once, on the rows of every batch concatenated; higher is better

``reduce`` keeps memory small (a 384-float embedding per sample instead of a
whole hidden state). Both models' rows go through the same ``score``; the report
gives both scores and the drop, and ``--max-task-drop`` gates on it.
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
    score: Callable[[np.ndarray], float]


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
    missing = [f for f in ("reduce", "score") if not callable(getattr(module, f, None))]
    if missing:
        raise QtoolError(f"{p}: task file must define {' and '.join(missing)}()")
    return Task(str(getattr(module, "NAME", p.stem)), module.reduce, module.score)
