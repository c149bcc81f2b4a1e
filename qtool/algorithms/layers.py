"""The linear layers a weight algorithm works on, as matrices, and their inputs' statistics.

A quantized Conv, Gemm or MatMul with a constant weight computes, per group ``g`` of its
output channels, ``y[g, r] = W[g, r, :] . x[g, :] (+ b)`` over input rows ``x`` of length K:
for a MatMul/Gemm the input's last axis (``W[K, N]`` read as ``W.T``), for a Conv its im2col
patches (input channels of the group x kernel positions, in the weight's own order), so a
depthwise 3x3 Conv is C groups of one row and K = 9. One pass of the fp32 model over the
calibration data gives, per layer and group, ``H = X^T X`` (K x K), the patch sum ``s`` and
the row count ``n``; from them, without the data again, the squared output error of any
weight error E is ``sum_r E_r H E_r^T``, and the mean shift it adds to output channel r is
``E_r . s / n``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

from ..graph import GraphView
from ..plans import Action, Plan, Role, TensorPlan
from ..qparams import reduced_bounds, symmetric_bounds
from ..resolve import as_array, stored_weight
from ..types import PerAxis, PerTensor

PATCH_FLOATS = 1 << 23  # im2col in chunks of at most this many float32 values (32 MiB)


@dataclass(frozen=True)
class Conv2d:
    """A 2-D Conv's geometry: kernel (kh, kw), strides, dilations, pads (top, left, bottom, right),
    auto_pad, groups."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]
    auto_pad: str
    groups: int


@dataclass(frozen=True)
class Layer:
    """One quantized linear node: its input, output, weight and (int32) bias tensors;
    ``conv`` for a Conv (None: MatMul/Gemm rows along the input's last axis);
    ``rows_t``: a [K, N] weight (MatMul, Gemm without transB) is read transposed."""

    node: str
    op_type: str
    input: str
    output: str
    weight: str
    bias: str | None
    conv: Conv2d | None
    rows_t: bool

    @property
    def groups(self) -> int:
        return self.conv.groups if self.conv else 1

    @property
    def key(self) -> tuple:
        """Layers with the same key read the same rows (MiniLM's Q, K and V MatMuls)."""
        return (self.input, self.conv)


def find_layers(plan: Plan, view: GraphView) -> tuple[list[Layer], list[str]]:
    """The plan's quantized Conv/Gemm/MatMul nodes whose weight these algorithms can treat,
    and one reason per node left out. Readers are counted over the whole graph, float nodes and
    subgraphs included: a float node reads a quantized weight or bias through its DequantizeLinear,
    so codes fitted to one layer's input would reach it too."""
    readers = {name: len(users) for name, users in view.consumers.items()}
    layers, skipped = [], []
    for n in plan.quantized_nodes():
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.fused_into:
            continue
        layer, why = _layer(n.name, view.by_name[n.name], plan, view, readers)
        if layer is None:
            skipped.append(f"{n.name}: {why}")
        else:
            layers.append(layer)
    return layers, skipped


def _layer(name: str, node, plan: Plan, view: GraphView, readers: dict) -> tuple[Layer | None, str]:
    w = plan.tensors.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.role is not Role.WEIGHT or w.action is not Action.QUANTIZE or w.transpose:
        return None, "its weight is not a quantized constant"
    if readers.get(w.name, 0) > 1:
        return None, "its weight is shared with another node"
    b = plan.tensors.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    bias = b.name if b is not None and b.role is Role.BIAS and b.action is Action.DERIVE \
        and readers.get(b.name, 0) == 1 else None  # a shared bias is corrected for no one layer
    dims = tuple(view.initializers[w.name].dims)
    conv, rows_t = None, False
    if node.op_type == "Conv":
        if len(dims) != 4:
            return None, f"a {len(dims) - 2}-D Conv (2-D only)"
        conv = _conv2d(node, view, dims)
        out_axis = 0
    elif node.op_type == "Gemm":
        if view.attr(node, "transA", 0) or len(dims) != 2:
            return None, "a Gemm with transA"
        rows_t = not view.attr(node, "transB", 0)
        out_axis = 1 if rows_t else 0
    else:
        if len(dims) != 2:
            return None, "a MatMul whose weight is not 2-D"
        rows_t, out_axis = True, 1
    if not (isinstance(w.granularity, PerTensor) or w.granularity == PerAxis(out_axis)
            or w.granularity == PerAxis(out_axis - len(dims))):
        return None, f"its weight is quantized along axis {w.axis}, not its output channels"
    return Layer(name, node.op_type, node.input[0], node.output[0], w.name, bias, conv, rows_t), ""


def _conv2d(node, view: GraphView, dims) -> Conv2d:
    kernel = tuple(view.attr(node, "kernel_shape", list(dims[2:])))
    pads = tuple(view.attr(node, "pads", [0, 0, 0, 0]))
    return Conv2d(kernel, tuple(view.attr(node, "strides", [1, 1])), tuple(view.attr(node, "dilations", [1, 1])),
                  pads, _text(view.attr(node, "auto_pad", "NOTSET")), int(view.attr(node, "group", 1)))


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------- weights as rows

def rows(layer: Layer, w: np.ndarray) -> np.ndarray:
    """A weight (as stored) -> [g, r, K]."""
    m = w.T if layer.rows_t else w
    return np.ascontiguousarray(m).reshape(layer.groups, m.shape[0] // layer.groups, -1)


def unrows(layer: Layer, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`rows`: [g, r, K] -> the stored weight's shape."""
    if layer.rows_t:
        return np.ascontiguousarray(m.reshape(shape[1], shape[0]).T)
    return m.reshape(shape)


def row_params(layer: Layer, t: TensorPlan, w_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row, [g, r] (float64, int64)."""
    shape = w_rows.shape[:2]
    scale = np.broadcast_to(as_array(t.scale, np.float32).astype(np.float64).reshape(-1), (int(np.prod(shape)),))
    zp = np.broadcast_to(as_array(t.zero_point, np.int64).reshape(-1), (int(np.prod(shape)),))
    return scale.reshape(shape), zp.reshape(shape)


def grid(t: TensorPlan) -> tuple[int, int]:
    """The integer codes a weight may take: its reduced 7-bit grid, the symmetric grid, or the whole type."""
    if t.reduce_range:
        return reduced_bounds(t.precision)
    return symmetric_bounds(t.precision) if t.symmetric else (t.precision.qmin, t.precision.qmax)


def weight_codes(t: TensorPlan, view: GraphView) -> np.ndarray:
    """The codes the rewriter writes for a weight: the plan's own, or round to nearest."""
    from ..rewrite.weights import quantize_weight
    return quantize_weight(stored_weight(t, view), t)[0]


def encode(codes: np.ndarray) -> str:
    """Codes as the plan stores them: base64 of the little-endian values in storage order."""
    return base64.b64encode(np.ascontiguousarray(codes).astype(codes.dtype.newbyteorder("<")).tobytes()).decode()


def decode(text: str, dtype, shape) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    dtype = np.dtype(dtype).newbyteorder("<")
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"codes hold {len(raw)} bytes; {int(np.prod(shape))} {np.dtype(dtype).name} values need "
                         f"{int(np.prod(shape)) * dtype.itemsize}")
    return np.frombuffer(raw, dtype).astype(np.dtype(dtype).newbyteorder("=")).reshape(shape)


# --------------------------------------------------------------------------- input statistics

def conv_patches(x: np.ndarray, c: Conv2d) -> np.ndarray:
    """im2col of a [B, C, H, W] input: [g, B * oh * ow, C/g * kh * kw] in the weight's (c, kh, kw) order."""
    kh, kw = c.kernel
    dh, dw = c.dilations
    sh, sw = c.strides
    top, left, bottom, right = _pads(x.shape[2:], c)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]
    b, ch, oh, ow = win.shape[:4]
    g = c.groups
    win = win.reshape(b, g, ch // g, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    return win.reshape(g, b * oh * ow, ch // g * kh * kw)


def _pads(size, c: Conv2d) -> tuple[int, int, int, int]:
    if c.auto_pad in ("NOTSET", ""):
        return c.pads
    if c.auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for n, k, s, d in zip(size, c.kernel, c.strides, c.dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begin.append(small if c.auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return (begin[0], begin[1], end[0], end[1])


class InputStats:
    """``H = X^T X`` [g, K, K], patch sum ``s`` [g, K] and row count ``n`` of a layer's input rows
    (float64 totals of float32 per-chunk products)."""

    def __init__(self, conv: Conv2d | None):
        self.conv = conv
        self.h = self.s = None
        self.n = 0

    def update(self, value: np.ndarray) -> None:
        value = np.asarray(value, np.float32)
        if self.conv is None:
            self._add(value.reshape(1, -1, value.shape[-1]))
            return
        per_sample = max(1, int(np.prod(value.shape[1:])) * self.conv.kernel[0] * self.conv.kernel[1])
        step = max(1, PATCH_FLOATS // per_sample)
        for i in range(0, len(value), step):
            self._add(conv_patches(value[i:i + step], self.conv))

    def _add(self, x: np.ndarray) -> None:
        h = np.matmul(x.transpose(0, 2, 1), x).astype(np.float64)
        s = x.sum(axis=1, dtype=np.float64)
        self.h = h if self.h is None else self.h + h
        self.s = s if self.s is None else self.s + s
        self.n += x.shape[1]


class _Stats:
    """One tensor's observer for ``collect``: the statistics of every distinct way layers read it."""

    def __init__(self, convs):
        self.by_conv = {c: InputStats(c) for c in convs}

    def update(self, value: np.ndarray) -> None:
        for s in self.by_conv.values():
            s.update(value)


def input_stats(model, layers: list[Layer], data, batch_size: int, limit: int | None
                ) -> tuple[dict[str, InputStats], int]:
    """One fp32 pass: each layer's :class:`InputStats` (shared between layers reading the same rows),
    and the number of samples."""
    from ..calib.collect import collect
    tensors = list(dict.fromkeys(l.input for l in layers))
    convs = {t: list(dict.fromkeys(l.conv for l in layers if l.input == t)) for t in tensors}
    order = iter(tensors)  # collect makes one observer per tensor, in this order

    def make(name=None):
        return _Stats(convs[name if name is not None else next(order)])
    observers, samples, _, _ = collect(model, tensors, data.batches(batch_size, limit), make)
    out = {}
    for l in layers:
        stats = observers.get(l.input)
        if stats is not None and stats.by_conv[l.conv].h is not None:
            out[l.node] = stats.by_conv[l.conv]
    return out, samples


def output_error(e: np.ndarray, stats: InputStats) -> np.ndarray:
    """Squared output error per row [g, r] of a weight error ``e`` [g, r, K] over the rows seen."""
    return np.einsum("grk,grk->gr", np.matmul(e, stats.h), e)


def db(before: float, after: float) -> float:
    """Gain in dB of an error going from ``before`` to ``after`` (the SQNR after minus before)."""
    if after <= 0:
        return 99.0 if before > 0 else 0.0
    return float(10.0 * np.log10(before / after)) if before > 0 else 0.0


def check_codes(t: TensorPlan, view: GraphView) -> str | None:
    """Why a saved plan's int8 weight or int32 bias ``codes`` cannot be written (None: they can):
    one value per element of the stored tensor, a weight's inside its grid."""
    shape = tuple(view.initializers[t.name].dims)
    try:
        codes = decode(t.codes, t.precision.dtype, shape)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        return f"codes: {exc}" if "codes hold" in str(exc) else "codes is not base64"
    if t.role is Role.WEIGHT:
        lo, hi = grid(t)
        if codes.size and (codes.min() < lo or codes.max() > hi):
            return f"codes outside the weight's grid [{lo}, {hi}]"
    return None
