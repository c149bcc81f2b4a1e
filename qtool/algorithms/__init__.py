"""Accuracy algorithms (opt-in, ``--algorithms``).

MODEL algorithms change the fp32 model before calibration and planning (a table records them);
WEIGHT algorithms run after resolve on the resolved plan and change only what the rewriter writes
for a quantized weight or bias (the plan records it; a table does not depend on them)."""

MODEL = ("cle", "smoothquant")
WEIGHT = ("rounding", "bias_correction")
KNOWN = MODEL + WEIGHT


def model_algorithms(names) -> tuple[str, ...]:
    """The model-changing ones among ``names`` (what a calibration table must match)."""
    return tuple(n for n in names if n not in WEIGHT)


def weight_algorithms(names) -> tuple[str, ...]:
    """The weight ones among ``names``, in the order they run: rounding first (bias correction
    measures the shift of the weights as they will be written)."""
    return tuple(n for n in WEIGHT if n in names)
