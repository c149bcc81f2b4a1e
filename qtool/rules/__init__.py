"""One module per op family: what to quantize, share, derive or skip, and why."""

from . import linear, movement
from .base import Act, Bias, Context, NodeRule, Share, Skip, Weight

RULES = {**linear.RULES, **movement.RULES}

__all__ = ["RULES", "Act", "Bias", "Context", "NodeRule", "Share", "Skip", "Weight"]
