"""One module per op family: what to quantize, share, derive or skip, and why."""

from . import elementwise, linear, movement
from .base import Act, Bias, Context, Facts, Joined, NodeRule, Optional, Share, Skip, Weight

RULES = {**linear.RULES, **movement.RULES, **elementwise.RULES}

__all__ = ["RULES", "Act", "Bias", "Context", "Facts", "Joined", "NodeRule", "Optional", "Share", "Skip", "Weight"]
