"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"), folded into an fp32 model before calibration.

A linear layer ``Y = X W`` (X: [..., K], W: [K, N]) computes the same ``Y = (X / s) (s W)`` for any
per-input-channel ``s > 0``. Transformer activations carry a few outlier channels (LayerNorm
scales of 10-50x the rest) that stretch one per-tensor activation scale over every channel;
``s_j = max|X_j|^a / max|W_j|^(1-a)`` moves part (``a``, the migration strength) of each
channel's range into the weight's row j, whose scales are per output channel anyway.

Where X is divided by s:
- **layernorm**: X is a LayerNormalization's output read only by the smoothed layers: its scale
  and bias are divided by s (exact, no new node);
- **linear**: X is a MatMul/Gemm output (plus a constant bias Add, then optionally Relu or
  LeakyRelu, which commute with a positive per-channel scale) with a constant weight, read only
  by the smoothed layers: that weight's columns and the bias are divided by s (exact);
- **mul**: otherwise one ``Mul(X, 1/s)`` is inserted in front of the smoothed layers (X's other
  readers, e.g. a residual Add, still read X). The planner keeps it float (a Mul by a constant),
  and its output is what the layers' QuantizeLinear quantizes, so onnxruntime runs one float
  elementwise Mul per smoothed activation; the MatMuls stay integer kernels.

Several layers reading one X (attention's Q, K and V projections) share one s, taken with the
largest ``max|W_j|`` over their weights, as the reference implementation smooths q/k/v together.

Choosing ``a`` by measurement (the paper fixes a = 0.5 or tunes it by hand): pass 1 of calibration
runs the unsmoothed model and keeps, for every candidate X, per-channel min/max over all the data
and ``ROWS`` rows sampled uniformly (priority sampling, flat memory). For each ``a`` of ``GRID``
the layers' outputs are simulated in numpy as the default int8 plan computes them (X/s uint8
asymmetric per tensor over the smoothed min/max, s W int8 symmetric per output channel) and
compared with the fp32 outputs; the best ``a`` is kept only where it beats not smoothing (gain
> 0 dB, the group's summed error). The record (per group: ``a``, X's per-channel absmax and the
gains) goes into the calibration table and the plan, so the same smoothed model is rebuilt from
either without data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import GraphView
from ..qparams import PerAxis, PerTensor, choose_qparams, fake_quantize, reduced_bounds, weight_qparams
from ..types import Precision

GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROWS = 1024  # rows of X sampled per candidate for the measured choice of a
_EPS = 1e-8


@dataclass(frozen=True)
class Candidate:
    """One activation X and the MatMul/Gemm layers with constant weights that read it."""

    x: str
    nodes: tuple[str, ...]
    weights: tuple[str, ...]
    transposed: tuple[bool, ...]  # Gemm transB: the weight is stored [N, K]
    fold: str                     # "layernorm", "linear" or "mul"
    producer: str | None = None   # the node folded into (layernorm, linear)
    bias: str | None = None       # the constant bias folded with it

    def matrices(self, view: GraphView) -> list[np.ndarray]:
        """The weights as [K, N] float64."""
        return [(view.array(w).T if t else view.array(w)).astype(np.float64)
                for w, t in zip(self.weights, self.transposed)]


# --------------------------------------------------------------------------- finding candidates

def _sole_use(view: GraphView, name: str, node) -> bool:
    users = view.consumers.get(name, [])
    return view.is_initializer(name) and len(users) == 1 and users[0] is node and name not in view.graph_outputs


def _layer_weight(view: GraphView, node, x: str) -> tuple[str, bool] | None:
    """(weight, transposed) when ``node`` is a MatMul/Gemm with X as its data input and a constant
    2-D float32 weight of its own."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[0] != x or node.input[1] == x:
        return None
    w = node.input[1]
    if not _sole_use(view, w, node) or view.initializers[w].data_type != onnx.TensorProto.FLOAT:
        return None
    if len(view.initializers[w].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return w, False
    if node.op_type == "Gemm" and not view.attr(node, "transA", 0):
        return w, bool(view.attr(node, "transB", 0))
    return None


def _vector(view: GraphView, name: str, k: int) -> bool:
    return view.is_initializer(name) and view.initializers[name].data_type == onnx.TensorProto.FLOAT and \
        int(np.prod(view.initializers[name].dims)) == k and (not view.initializers[name].dims
                                                              or view.initializers[name].dims[-1] == k)


HOMOGENEOUS = ("Relu", "LeakyRelu")  # f(y / s) = f(y) / s per channel for s > 0


def _fold(view: GraphView, x: str, k: int) -> tuple[str, str | None, str | None]:
    """How X can be divided by s exactly: (fold, producer, bias). A MatMul/Gemm (+ bias Add) producer
    is also found behind Relu/LeakyRelu, which commute with a positive per-channel scale."""
    node = view.producer.get(x)
    if node is None or node.domain not in ("", "ai.onnx"):
        return "mul", None, None
    if node.op_type == "LayerNormalization" and node.output[0] == x and view.attr(node, "axis", -1) in (-1, None) \
            and not any(o for o in node.output[1:]) and len(node.input) >= 2 and _vector(view, node.input[1], k) \
            and _sole_use(view, node.input[1], node):
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is None or (_vector(view, bias, k) and _sole_use(view, bias, node)):
            return "layernorm", view.node_name(node), bias
        return "mul", None, None
    while node.op_type in HOMOGENEOUS and len(node.input) == 1 and view.sole_consumer(node.input[0]) is node:
        node = view.producer.get(node.input[0])  # Relu(y / s) = Relu(y) / s: fold through it
        if node is None or node.domain not in ("", "ai.onnx"):
            return "mul", None, None
    bias = None
    if node.op_type == "Add":
        consts = [i for i in node.input if view.is_initializer(i)]
        acts = [i for i in node.input if not view.is_initializer(i)]
        if len(consts) != 1 or len(acts) != 1 or not _vector(view, consts[0], k) or not _sole_use(view, consts[0], node):
            return "mul", None, None
        bias, y = consts[0], acts[0]
        node = view.producer.get(y)
        if node is None or view.sole_consumer(y) is None:
            return "mul", None, None
    if node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx"):
        found = _layer_weight(view, node, node.input[0])
        gemm_bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        if found is not None and view.shape(found[0])[0 if found[1] else 1] == k and (
                gemm_bias is None or (_vector(view, gemm_bias, k) and _sole_use(view, gemm_bias, node))):
            if bias is None or gemm_bias is None:
                return "linear", view.node_name(node), bias or gemm_bias
    return "mul", None, None


def candidates(model: onnx.ModelProto) -> list[Candidate]:
    """Every float activation read by at least one MatMul/Gemm with a constant weight of its own."""
    view = GraphView(model)
    out = []
    for x, users in view.consumers.items():
        if view.is_initializer(x) or not view.is_float(x):
            continue
        found = [(n, _layer_weight(view, n, x)) for n in users]
        found = [(n, w) for n, w in found if w is not None]
        if not found:
            continue
        ks = {view.shape(w)[1 if t else 0] for _, (w, t) in found}
        if len(ks) != 1:
            continue
        k = ks.pop()
        whole = len(found) == len(users) and x not in view.graph_outputs
        fold, producer, bias = _fold(view, x, k) if whole else ("mul", None, None)
        out.append(Candidate(x, tuple(view.node_name(n) for n, _ in found), tuple(w for _, (w, _) in found),
                             tuple(t for _, (_, t) in found), fold, producer, bias))
    return out


# --------------------------------------------------------------------------- the record

@dataclass(frozen=True)
class Smoothing:
    """What calibration chose: per smoothed activation X, ``alpha``, X's per-channel absmax over the
    calibration data (pass 1, unsmoothed model), the summed gain in dB and each layer's."""

    groups: dict = field(default_factory=dict)  # x -> {"alpha", "absmax", "gain_db", "nodes": {node: dB}}
    grid: tuple[float, ...] = GRID
    rows: int = ROWS
    tried: int = 0  # candidates measured
    simulated: str = ""  # the integer grids the choice simulated (Grids.label)

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "rows": self.rows, "tried": self.tried, "simulated": self.simulated,
                "groups": {x: {"alpha": g["alpha"], "gain_db": g["gain_db"], "nodes": dict(g["nodes"]),
                               "absmax": list(g["absmax"])} for x, g in self.groups.items()}}

    @classmethod
    def from_dict(cls, d) -> "Smoothing":
        """Parse; a ValueError names the field that is wrong."""
        if not isinstance(d, dict):
            raise ValueError("must be an object {grid, rows, tried, groups}")
        grid = d.get("grid", list(GRID))
        if not isinstance(grid, list) or not all(_number(a) and 0 <= a <= 1 for a in grid):
            raise ValueError(f"grid must be a list of numbers in [0, 1], got {grid!r}")
        groups = d.get("groups")
        if not isinstance(groups, dict):
            raise ValueError("groups must be an object {activation: {alpha, absmax, gain_db, nodes}}")
        parsed = {}
        for x, g in groups.items():
            if not isinstance(g, dict):
                raise ValueError(f"groups[{x!r}] must be an object")
            alpha, absmax, gain, nodes = g.get("alpha"), g.get("absmax"), g.get("gain_db"), g.get("nodes", {})
            if not _number(alpha) or not 0 <= alpha <= 1:
                raise ValueError(f"groups[{x!r}].alpha must be a number in [0, 1], got {alpha!r}")
            if not isinstance(absmax, list) or not absmax or not all(_number(a) and a >= 0 for a in absmax):
                raise ValueError(f"groups[{x!r}].absmax must be a non-empty list of finite numbers >= 0")
            if not _number(gain):
                raise ValueError(f"groups[{x!r}].gain_db must be a finite number, got {gain!r}")
            if not isinstance(nodes, dict) or not all(_number(v) for v in nodes.values()):
                raise ValueError(f"groups[{x!r}].nodes must be an object {{node: gain in dB}}")
            parsed[str(x)] = {"alpha": float(alpha), "absmax": [float(a) for a in absmax], "gain_db": float(gain),
                              "nodes": {str(k): float(v) for k, v in nodes.items()}}
        rows, tried = d.get("rows", ROWS), d.get("tried", len(parsed))
        for key, v in (("rows", rows), ("tried", tried)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {v!r}")
        simulated = d.get("simulated", "")
        if not isinstance(simulated, str):
            raise ValueError(f"simulated must be a string, got {simulated!r}")
        return cls(parsed, tuple(float(a) for a in grid), rows, tried, simulated)

    def applied(self) -> dict[str, float]:
        """For ``Plan.applied["smoothquant"]``: each smoothed layer's measured gain in dB."""
        return {node: gain for g in self.groups.values() for node, gain in g["nodes"].items()}


@dataclass(frozen=True)
class Grids:
    """The integer grids the plan will use for a smoothed layer, which the choice of alpha simulates:
    the activation's precision and symmetry, the weight's precision and bounds (a 7-bit int8 grid on
    x86-64 CPUs without VNNI, where the plan reduces MatMul weights: there migrating range into the
    weights costs twice as much)."""

    act: Precision = Precision.UINT8
    act_symmetric: bool = False
    weight: Precision = Precision.INT8
    weight_bounds: tuple[int, int] | None = None
    per_channel: bool = True  # weight scales per output channel (--per-channel), else one per weight

    @classmethod
    def for_options(cls, options) -> "Grids":
        from ..planner import _weight_precision
        from ..types import cpu_saturates_u8s8
        act = Precision.parse(options.activation_type)
        saturates = options.target == "cpu" and act.bits == 8 and cpu_saturates_u8s8()
        weight = _weight_precision(options.weight_type, saturates, act, "MatMul")
        bounds = reduced_bounds(weight) if saturates and weight is Precision.INT8 else None
        return cls(act, options.activation_symmetric, weight, bounds, options.per_channel)

    @property
    def label(self) -> str:
        w = f"{self.weight.label} (7-bit grid)" if self.weight_bounds else self.weight.label
        w += "" if self.per_channel else " per tensor"
        return f"{self.act.label} {'symmetric' if self.act_symmetric else 'asymmetric'} activations, {w} weights"


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


# --------------------------------------------------------------------------- smoothing the model

def scales(absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^a / max|W_j|^(1-a), W_j over every weight's row j; 1 where either is 0.

    >>> scales(np.array([8.0, 1.0]), [np.array([[0.5], [2.0]])], 0.5).tolist()
    [4.0, 0.7071067811865476]
    """
    w = np.max([np.abs(m).max(axis=1) for m in weights], axis=0)
    a = np.asarray(absmax, np.float64)
    ok = (a > _EPS) & (w > _EPS)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s


def smooth(model: onnx.ModelProto, record: Smoothing) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with each group of ``record`` smoothed, and notes. The float output is
    unchanged up to float32 rounding. A record that does not fit the model is a ValueError."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    found = {c.x: c for c in candidates(out)}
    view = GraphView(out)
    inits = {}
    done: dict[str, int] = {"layernorm": 0, "linear": 0, "mul": 0}
    plans = []
    for x, g in record.groups.items():
        c = found.get(x)
        if c is None or set(c.nodes) != set(g["nodes"]) or len(g["absmax"]) != c.matrices(view)[0].shape[0]:
            raise ValueError(f"the smoothquant record does not fit this model at {x!r} (its layers or width "
                             "differ): calibrate again with --algorithms smoothquant")
        plans.append((c, scales(np.asarray(g["absmax"]), c.matrices(view), g["alpha"])))
    for c, s in plans:  # every s from the original weights first, then all edits
        for w, t in zip(c.weights, c.transposed):
            arr = inits.get(w, view.array(w).astype(np.float64))
            inits[w] = arr * (s[None, :] if t else s[:, None])
        if c.fold == "mul":
            _insert_mul(out, view, c, s)
        else:
            _fold_into_producer(view, c, s, inits)
        done[c.fold] += 1
    index = {t.name: i for i, t in enumerate(out.graph.initializer)}
    for name, arr in inits.items():
        out.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    return out, _notes(record, done)


def _fold_into_producer(view: GraphView, c: Candidate, s: np.ndarray, inits: dict) -> None:
    node = view.by_name[c.producer]
    if c.fold == "layernorm":
        names = [node.input[1]] + ([c.bias] if c.bias else [])
    else:
        w, t = _layer_weight(view, node, node.input[0])
        arr = inits.get(w, view.array(w).astype(np.float64))
        inits[w] = arr / (s[:, None] if t else s[None, :])
        names = [c.bias] if c.bias else []
    for name in names:
        arr = inits.get(name, view.array(name).astype(np.float64))
        inits[name] = arr / s.reshape(arr.shape)


def _insert_mul(model: onnx.ModelProto, view: GraphView, c: Candidate, s: np.ndarray) -> None:
    """X -> Mul(X, 1/s) -> the group's layers; X's other readers unchanged."""
    graph = model.graph
    taken = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | \
        {i.name for i in graph.input}
    base, k = f"{c.x}_smoothed", 0
    while base + ("" if k == 0 else f"_{k}") in taken or base + ("" if k == 0 else f"_{k}") + "_inv" in taken:
        k += 1
    y = base + ("" if k == 0 else f"_{k}")
    graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), y + "_inv"))
    mul = onnx.helper.make_node("Mul", [c.x, y + "_inv"], [y], name=f"smoothquant/{y}")
    members = set(c.nodes)
    first = None
    for i, node in enumerate(graph.node):
        if view.node_name(node) in members:
            first = i if first is None else first
            node.input[0] = y
    graph.node.insert(first, mul)
    vi = view.value_info.get(c.x)
    if vi is not None:
        new = onnx.ValueInfoProto()
        new.CopyFrom(vi)
        new.name = y
        graph.value_info.append(new)
    else:
        graph.value_info.append(onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None))


def _notes(record: Smoothing, done: dict[str, int]) -> list[str]:
    gains = sorted(g["gain_db"] for g in record.groups.values())
    n = len(gains)
    if not n:
        return [f"smoothquant: none of {record.tried} MatMul/Gemm inputs measured better smoothed; "
                "the model is unchanged"]
    alphas = sorted(g["alpha"] for g in record.groups.values())
    how = ", ".join(f"{v} {k}" for k, v in (("folded into a LayerNormalization", done["layernorm"]),
                                            ("folded into the producing MatMul/Gemm", done["linear"]),
                                            ("by an inserted Mul", done["mul"])) if v)
    return [f"smoothquant: {n} of {record.tried} MatMul/Gemm inputs smoothed ({how}), alpha "
            f"{alphas[0]:g}..{alphas[-1]:g}, median layer gain {gains[n // 2]:+.2f} dB (min {gains[0]:+.2f})"]


# --------------------------------------------------------------------------- measuring alpha

class SampleObserver:
    """Per-channel min/max along the last axis over all rows, and ``rows`` rows sampled uniformly
    (each row draws a random key; the smallest keys are kept), in flat memory."""

    def __init__(self, rows: int = ROWS, seed: int = 0):
        from ..calib.channels import ChannelObserver
        self.channels = ChannelObserver(None, -1)
        self.rows = rows
        self.rng = np.random.default_rng(seed)
        self.kept = np.zeros((0, 0), np.float32)
        self.keys = np.zeros(0)

    def update(self, x: np.ndarray) -> None:
        self.channels.update(x)
        if x.size == 0 or x.ndim == 0:
            return
        flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
        keys = self.rng.random(len(flat))
        if self.kept.size == 0:
            self.kept = np.zeros((0, flat.shape[1]), np.float32)
        if flat.shape[1] != self.kept.shape[1]:
            return
        allk = np.concatenate([self.keys, keys])
        keep = np.argsort(allk, kind="stable")[:self.rows]
        self.kept = np.concatenate([self.kept, flat])[keep]
        self.keys = allk[keep]


def _sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> list[float]:
    out = []
    for r, g in zip(ref, got):
        err = float(((r - g) ** 2).sum())
        out.append(10 * math.log10(float((r ** 2).sum()) / err) if err > 0 else 200.0)
    return out


def _simulate(rows: np.ndarray, mn: np.ndarray, mx: np.ndarray, weights: list[np.ndarray],
              s: np.ndarray, grids: Grids) -> list[np.ndarray]:
    """Each layer's output with X/s quantized per tensor (its range: the smoothed min/max, exact for
    minmax calibration) and s W symmetric per output channel (per tensor without ``grids.per_channel``),
    on ``grids``."""
    xs = (rows / s).astype(np.float32)
    scale, zp = choose_qparams(float((mn / s).min()), float((mx / s).max()), grids.act, grids.act_symmetric)
    xq = fake_quantize(xs, scale, zp, grids.act)
    out = []
    for w in weights:
        ws = (w * s[:, None]).astype(np.float32)
        axis = 1 if grids.per_channel else None
        wscale, wzp = weight_qparams(ws, grids.weight, PerAxis(1) if axis else PerTensor(), True, grids.weight_bounds)
        wq = fake_quantize(ws, wscale, wzp, grids.weight, axis)
        out.append(xq.astype(np.float64) @ wq.astype(np.float64))
    return out


def choose(c: Candidate, view: GraphView, obs: SampleObserver, grid=GRID,
           grids: Grids = Grids()) -> tuple[float, float, dict] | None:
    """(alpha, summed gain in dB, {node: gain}) of the best alpha, or None where none beats s = 1."""
    rec = obs.channels
    if rec.min is None or obs.kept.size == 0:
        return None
    weights = c.matrices(view)
    rows = obs.kept.astype(np.float64)
    ref = [rows @ w for w in weights]
    absmax = np.maximum(-rec.min, rec.max)

    whole_ref = np.concatenate([r.ravel() for r in ref])

    def measure(s):
        got = _simulate(rows, rec.min, rec.max, weights, s, grids)
        return _sqnr([whole_ref], [np.concatenate([g.ravel() for g in got])])[0], _sqnr(ref, got)
    from ..calib.channels import rounded
    base, base_per = measure(np.ones_like(absmax))
    best = None
    for alpha in grid:
        s = scales(np.asarray(rounded(absmax)), weights, alpha)
        whole, per = measure(s)
        if best is None or whole > best[1]:
            best = (alpha, whole, per)
    if best is None or best[1] - base <= 0:
        return None
    alpha, whole, per = best
    return alpha, whole - base, {n: round(p - b, 3) for n, p, b in zip(c.nodes, per, base_per)}


def calibrate(model: onnx.ModelProto, run, grids: Grids = Grids(), grid=GRID) -> Smoothing:
    """Pass 1: ``run(model, tensors, make_observer)`` streams the calibration data through the
    unsmoothed ``model`` (qtool.calib.collect); then each candidate's alpha is chosen (see
    :func:`choose`) and the groups that gain are recorded."""
    from ..calib.channels import rounded
    found = candidates(model)
    observers = run(model, [c.x for c in found], lambda name: SampleObserver()) if found else {}
    view = GraphView(model)
    groups = {}
    for c in found:
        obs = observers.get(c.x)
        chosen = choose(c, view, obs, grid, grids) if obs is not None else None
        if chosen is None:
            continue
        alpha, gain, per_node = chosen
        rec = obs.channels
        groups[c.x] = {"alpha": alpha, "gain_db": round(gain, 3), "nodes": per_node,
                       "absmax": rounded(np.maximum(-rec.min, rec.max))}
    return Smoothing(groups, tuple(grid), ROWS, len(found), grids.label)
