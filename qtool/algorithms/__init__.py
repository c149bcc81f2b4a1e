"""Accuracy algorithms (opt-in, ``--algorithms``; ``auto`` picks those that apply).

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


AUTO = "auto"


#: ops that mark a transformer (its normalisations), where SmoothQuant's activation outliers live
TRANSFORMER_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                   "SkipSimplifiedLayerNormalization", "RMSNormalization")


def is_transformer(graph) -> bool:
    """A LayerNormalization-type op, or attention as exporters decompose it: a Softmax and a
    MatMul of two computed tensors (scores = Q K^T)."""
    ops = {n.op_type for n in graph.node}
    if ops & set(TRANSFORMER_OPS):
        return True
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                        for o in n.output}
    return "Softmax" in ops and any(n.op_type == "MatMul" and not set(n.input) & constants for n in graph.node)


def choose(options, *, data: bool, table_algorithms: tuple[str, ...] | None = None,
           transformer: bool = True) -> tuple[str, ...]:
    """``--algorithms auto``: the algorithms that apply to this recipe, each of which then keeps its
    change only where it measured a gain (SmoothQuant per group of layers, rounding and bias
    correction per layer: ``Plan.applied``). Other lists are returned as given.

    Model algorithms: a table's own (``table_algorithms``: a table fixes the model it describes);
    otherwise smoothquant for static int8 transformers (``transformer``: :func:`is_transformer`; as NNCF applies it only with model_type=TRANSFORMER: on the CNN
    sample and EfficientNet-Lite0 its per-layer gains did not reach the outputs, -2.5 points of
    agreement on EfficientNet-Lite0), and cle only with per-tensor weights (with per-channel
    weights it measured as noise on EfficientNet-Lite0 and it has no per-chain measure of its own).
    Weight algorithms (rounding, bias_correction) need the calibration data (``data``)."""
    names = tuple(options.algorithms)
    if AUTO not in names:
        return names
    static_int8 = options.mode == "static" and options.recipe == "int8"
    if table_algorithms is not None:
        chosen = tuple(table_algorithms)
    else:
        chosen = (("cle",) if static_int8 and not options.per_channel else ()) + (
            ("smoothquant",) if static_int8 and transformer else ())
    return chosen + (WEIGHT if static_int8 and data else ())
