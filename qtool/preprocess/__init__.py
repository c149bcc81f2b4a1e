"""Passes that return a new model; each reports whether it changed anything and what.

Run in this order by :func:`run_all`: opset upgrade, Constant nodes -> initializers,
constant folding, BatchNorm folded into Conv, zero Pad folded into Conv, shape inference.
"""

from .passes import PassResult, run_all

__all__ = ["PassResult", "run_all"]
