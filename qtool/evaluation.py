"""Side-by-side evaluation of a reference and a candidate model: metrics, gates, report.

A report is a frozen record with a JSON round trip, so it can be saved and
re-judged against new thresholds (:func:`judge`, ``qtool eval --from REPORT.json``)
without running inference again.

Speed is measured as paired, interleaved runs (``runtime.time_pair``): each pair
runs both models back to back, alternating which goes first, and gives one ratio
reference_ms / candidate_ms. :class:`Speedup` holds the median of those per-pair
ratios and their p10-p90 spread; ``Report.speedup`` is that median. The spread is
"too wide to call" (a ``warning:`` line in the table and ``Report.warnings``) when
(p90 - p10) / median exceeds :data:`SPREAD_LIMIT`, or when the p10-p90 interval
contains the value a verdict depends on: the ``--min-speedup`` threshold when that
gate is set, else 1.0 (faster or slower cannot be told apart).

Report format 2 added ``paired_speedup``, ``kernels_reference``/``kernels_candidate``
and ``warnings``; a format-1 report still loads (its speedup is the ratio of the
median latencies, without a spread).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import QtoolError

REPORT_FORMAT = "qtool.eval"
REPORT_FORMAT_VERSION = 3  # 3: target and per-EP kernel placement
SPREAD_LIMIT = 0.5  # (p90 - p10) / median of the per-pair speedups above this: too wide to call

# output names that mark a regression head, not class scores (see is_classifier_output)
_NOT_CLASSES = re.compile(r"box|coord|regress|landmark|anchor|offset|delta|keypoint", re.IGNORECASE)


class ReportError(QtoolError):
    """A saved report (``--from``) is unreadable, malformed or not a qtool.eval report."""


def is_classifier_output(name: str, value: np.ndarray) -> bool:
    """Whether an output holds class scores, so that its argmax is a predicted class.

    Classifier-shaped means: a floating-point tensor of shape [batch, classes] or
    [batch, 1, classes] with classes >= 2, whose name does not mark a regression head
    (it contains none of box, coord, regress, landmark, anchor, offset, delta,
    keypoint, case-insensitive). [batch, 1] (a single score or a sigmoid), higher
    ranks (feature maps, sequences, [batch, N, 4] boxes) and integer outputs are
    not. Only such outputs get top-1 agreement, and accuracy against labels is
    read from the first of them.
    """
    if not np.issubdtype(value.dtype, np.floating):
        return False
    shape = value.shape
    if len(shape) == 3 and shape[1] == 1:
        shape = (shape[0], shape[2])
    return len(shape) == 2 and shape[1] >= 2 and not _NOT_CLASSES.search(name)


def class_scores(value: np.ndarray) -> np.ndarray:
    """A classifier-shaped output as [batch, classes]."""
    return value.reshape(len(value), -1)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row pair of two [rows, n] arrays: two zero rows agree (1), a zero row
    against a non-zero one does not (0)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1),
                    np.where((na == 0) & (nb == 0), 1.0, 0.0))


class OutputStats:
    """Streaming error statistics of one output (candidate vs reference)."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.signal = 0.0
        self.noise = 0.0
        self.cos_sum = 0.0
        self.rows = 0
        self.agree = 0
        self.classifier: bool | None = None  # decided by every batch (see is_classifier_output)

    def update(self, ref: np.ndarray, cand: np.ndarray, batch: int | None = None) -> None:
        """Add one batch. ``batch``: its number of samples (default: the output's first dimension).
        An output whose first dimension is not the batch (a scalar, a pooled statistic) counts as
        one row for the cosine and gets no top-1 agreement."""
        if batch is None:
            batch = len(ref) if ref.ndim else 1
        per_sample = ref.ndim > 0 and len(ref) == batch
        classifier = per_sample and is_classifier_output(self.name, ref)
        self.classifier = classifier if self.classifier is None else self.classifier and classifier
        ref64 = ref.astype(np.float64)
        err = cand.astype(np.float64) - ref64
        if err.size:
            self.max_abs = max(self.max_abs, float(np.abs(err).max()))
        self.sum_abs += float(np.abs(err).sum())
        self.count += err.size
        self.signal += float((ref64 * ref64).sum())
        self.noise += float((err * err).sum())
        rows = len(ref) if per_sample else 1
        cos = row_cosines(ref64.reshape(rows, -1), cand.astype(np.float64).reshape(rows, -1))
        self.cos_sum += float(cos.sum())
        self.rows += rows
        if self.classifier:
            self.agree += int((class_scores(ref).argmax(1) == class_scores(cand).argmax(1)).sum())

    def result(self) -> "OutputMetrics":
        snr = float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
        return OutputMetrics(self.name, self.max_abs, self.sum_abs / max(self.count, 1),
                             self.cos_sum / max(self.rows, 1), float(snr),
                             self.agree / self.rows if self.classifier and self.rows else None)


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    snr_db: float
    top1_agreement: float | None


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    batch: int


@dataclass(frozen=True)
class Speedup:
    """Per-pair speedups (reference_ms / candidate_ms of one interleaved pair): median, p10, p90."""

    median: float
    p10: float
    p90: float
    pairs: int

    @classmethod
    def from_ratios(cls, ratios) -> "Speedup":
        r = np.asarray(ratios, dtype=np.float64)
        r = r[np.isfinite(r) & (r > 0)]
        if not r.size:
            raise ValueError("no finite per-pair ratios")
        return cls(float(np.median(r)), float(np.percentile(r, 10)), float(np.percentile(r, 90)), int(r.size))

    @property
    def relative_spread(self) -> float:
        return (self.p90 - self.p10) / self.median

    def spread(self) -> str:
        return f"p10-p90 {self.p10:.2f}-{self.p90:.2f}x over {self.pairs} pairs"

    def warning(self, threshold: float | None = None) -> str | None:
        """Why this measurement cannot decide, or None when it can (see the module docstring)."""
        at = 1.0 if threshold is None else threshold
        what = f"--min-speedup {threshold:g}" if threshold is not None else "1.0 (no speed-up)"
        if self.p10 < at < self.p90:
            return (f"speedup {self.median:.2f}x is too noisy to call: its {self.spread()} contains {what}; "
                    "pin --threads, raise --repeats or use a quieter machine")
        if self.relative_spread > SPREAD_LIMIT:
            return (f"speedup {self.median:.2f}x is too noisy to call: {self.spread()} spans "
                    f"{self.relative_spread:.0%} of the median (limit {SPREAD_LIMIT:.0%}); "
                    "pin --threads, raise --repeats or use a quieter machine")
        return None


# Integer kernels: node types (any domain) that compute on quantized data in onnxruntime's
# optimised graph. Besides these names, every op type starting with QLinear, NhwcQLinear or
# QOrdered counts. MatMulNBits is a weight-only (int4/int8 weights) kernel. Ops that ORT runs
# on uint8 after dropping their Q/DQ (MaxPool, Reshape, Transpose, ...) keep their float names
# and are not counted.
INTEGER_KERNELS = frozenset({
    "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLinear",
    "ConvInteger", "QGemm", "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeLSTM",
    "NhwcMaxPool", "MatMulNBits"})
_INTEGER_PREFIXES = ("QLinear", "NhwcQLinear", "QOrdered")


def is_integer_kernel(op_type: str) -> bool:
    return op_type in INTEGER_KERNELS or op_type.startswith(_INTEGER_PREFIXES)


@dataclass(frozen=True)
class Kernels:
    """What onnxruntime runs after its optimisations (counted in the optimised session graph).

    integer: integer kernels by op type (see :data:`INTEGER_KERNELS`). unfused_quantize /
    unfused_dequantize: QuantizeLinear/DequantizeLinear left around float ops, i.e. a
    Q whose every consumer is a DQ, and a DQ whose input is a Q's output or a constant
    (a weight dequantized for a float op). quantize / dequantize: all Q and DQ left,
    including the boundaries where the graph enters and leaves integer kernels.
    """

    integer: dict[str, int] = field(default_factory=dict)
    quantize: int = 0
    dequantize: int = 0
    unfused_quantize: int = 0
    unfused_dequantize: int = 0

    @property
    def integer_total(self) -> int:
        return sum(self.integer.values())

    def describe(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in self.integer.items())
        return (f"integer kernels: {self.integer_total}" + (f" ({ops})" if ops else "")
                + f"; Q/DQ left unfused: {self.unfused_quantize} Q, {self.unfused_dequantize} DQ"
                + (f" (boundaries: {self.quantize - self.unfused_quantize} Q, "
                   f"{self.dequantize - self.unfused_dequantize} DQ)"
                   if self.quantize + self.dequantize > self.unfused_quantize + self.unfused_dequantize else ""))


def count_kernels(nodes) -> Kernels:
    """Count the nodes of an optimised graph as :class:`Kernels`.

    ``nodes``: ``(op_type, inputs, outputs, constants)`` per node, where ``constants`` is
    the set of names that are initializers or Constant outputs in the node's scope.
    """
    nodes = list(nodes)
    producer = {o: op for op, _, outs, _ in nodes for o in outs}
    consumers: dict[str, list[str]] = {}
    for op, ins, _, _ in nodes:
        for i in ins:
            consumers.setdefault(i, []).append(op)
    integer: dict[str, int] = {}
    q = dq = uq = udq = 0
    for op, ins, outs, constants in nodes:
        if is_integer_kernel(op):
            integer[op] = integer.get(op, 0) + 1
        elif op == "QuantizeLinear":
            q += 1
            users = [c for o in outs for c in consumers.get(o, ())]
            uq += bool(users) and all(c == "DequantizeLinear" for c in users)
        elif op == "DequantizeLinear":
            dq += 1
            src = ins[0] if ins else ""
            udq += src in constants or producer.get(src) == "QuantizeLinear"
    ordered = dict(sorted(integer.items(), key=lambda kv: (-kv[1], kv[0])))
    return Kernels(ordered, q, dq, uq, udq)


@dataclass(frozen=True)
class Gate:
    name: str
    value: float
    threshold: float
    passed: bool
    message: str


@dataclass(frozen=True)
class Report:
    reference: str
    candidate: str
    samples: int
    provider: str
    outputs: tuple[OutputMetrics, ...]
    size_reference: int
    size_candidate: int
    latency_reference: Latency | None
    latency_candidate: Latency | None
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    threads: int | None = None
    gates: tuple[Gate, ...] = ()
    notes: tuple[str, ...] = ()
    task: str | None = None
    task_reference: float | None = None
    task_candidate: float | None = None
    paired_speedup: Speedup | None = None
    kernels_reference: Kernels | None = None
    kernels_candidate: Kernels | None = None
    warnings: tuple[str, ...] = ()
    format_version: int = REPORT_FORMAT_VERSION
    target: str = "cpu"
    placement_reference: dict | None = None
    placement_candidate: dict | None = None

    @property
    def size_ratio(self) -> float:
        return self.size_candidate / self.size_reference

    @property
    def speedup(self) -> float | None:
        """The median per-pair speedup; for a format-1 report, the ratio of the median latencies."""
        if self.paired_speedup is not None:
            return self.paired_speedup.median
        if not self.latency_reference or not self.latency_candidate:
            return None
        return self.latency_reference.median_ms / self.latency_candidate.median_ms

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_reference is None or self.accuracy_candidate is None:
            return None
        return self.accuracy_reference - self.accuracy_candidate

    @property
    def task_drop(self) -> float | None:
        if self.task_reference is None or self.task_candidate is None:
            return None
        return self.task_reference - self.task_candidate

    @property
    def agreement(self) -> float | None:
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return values[0] if values else None

    @property
    def min_snr_db(self) -> float | None:
        return _lowest(o.snr_db for o in self.outputs)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict:
        """Strict-JSON-ready: non-finite floats (an exact output's SNR, a NaN metric) become the
        strings "inf", "-inf" and "nan", which :meth:`from_dict` reads back as floats."""
        d = asdict(self)
        d["format"] = REPORT_FORMAT
        d["size_ratio"], d["speedup"], d["accuracy_drop"] = self.size_ratio, self.speedup, self.accuracy_drop
        d["task_drop"] = self.task_drop
        d["passed"] = self.passed
        return _json_safe(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """A report from :meth:`to_dict` (format 1 or 2); derived keys are recomputed."""
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("accuracy_reference", "accuracy_candidate", "task_reference", "task_candidate"):
            if key in d:
                d[key] = _float_in(d[key])
        d["outputs"] = tuple(OutputMetrics(**_floats_in(o, "max_abs_error", "mean_abs_error", "cosine", "snr_db",
                                                        "top1_agreement")) for o in d["outputs"])
        d["gates"] = tuple(Gate(**_floats_in(g, "value", "threshold")) for g in d.get("gates", ()))
        d["notes"] = tuple(d.get("notes", ()))
        d["warnings"] = tuple(d.get("warnings", ()))
        for key in ("latency_reference", "latency_candidate"):
            d[key] = Latency(**_floats_in(d[key], "median_ms", "p90_ms")) if d.get(key) else None
        d["paired_speedup"] = (Speedup(**_floats_in(d["paired_speedup"], "median", "p10", "p90"))
                               if d.get("paired_speedup") else None)
        for key in ("kernels_reference", "kernels_candidate"):
            d[key] = Kernels(**d[key]) if d.get(key) else None
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)


_NON_FINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _json_safe(value):
    """JSON has no Infinity or NaN: non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _float_in(x):
    """A number read back from :func:`_json_safe`; anything else is left for the checks."""
    return _NON_FINITE[x] if isinstance(x, str) and x in _NON_FINITE else x


def _floats_in(d: dict, *keys) -> dict:
    if not isinstance(d, dict):
        raise TypeError(f"expected an object, got {d!r}")
    return {k: _float_in(v) if k in keys else v for k, v in d.items()}


def load_report(path: str | Path) -> Report:
    """Read a report written by ``qtool eval --json``; anything else is a one-line ReportError."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ReportError(f"{p}: no such report file") from None
    except IsADirectoryError:
        raise ReportError(f"{p}: is a folder, not a report file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"{p}: not a JSON report ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ReportError(f"{p}: not a qtool eval report (no \"format\": \"{REPORT_FORMAT}\"); "
                          "write one with qtool eval ... --json REPORT.json")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= REPORT_FORMAT_VERSION:
        raise ReportError(f"{p}: report format_version {version!r} is not one this qtool reads "
                          f"(1..{REPORT_FORMAT_VERSION}); upgrade qtool or re-run qtool eval")
    try:
        report = Report.from_dict(data)
        _check_report(report)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"{p}: malformed qtool eval report ({type(exc).__name__}: {str(exc)[:120]})") from None
    return report


def describe_placement(placed: dict) -> str:
    """'CPUExecutionProvider 12 kernels (Conv 2, QLinearConv 10); ...', the EP with most kernels first."""
    parts = []
    for ep, ops in sorted(placed.items(), key=lambda kv: -sum(kv[1].values())):
        top = sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{op} {n}" for op, n in top[:8]) + (", ..." if len(top) > 8 else "")
        parts.append(f"{ep} {sum(ops.values())} kernels ({shown})")
    return "; ".join(parts)


def _check_placement(placed) -> None:
    if placed is None:
        return
    if not isinstance(placed, dict) or not all(
            isinstance(ep, str) and isinstance(ops, dict) and all(
                isinstance(op, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
                for op, n in ops.items()) for ep, ops in placed.items()):
        raise TypeError("placement must be an object of provider -> op type -> count")


def _check_report(r: Report) -> None:
    """Raise TypeError/ValueError (a ReportError to the caller) for values no qtool eval writes."""
    def number(x, optional=True):
        if x is None and optional:
            return
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"expected a number, got {x!r}")

    def count(x, what):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise TypeError(f"{what} must be a non-negative integer, got {x!r}")

    for x in (r.accuracy_reference, r.accuracy_candidate, r.task_reference, r.task_candidate):
        number(x)
    for a, b, what in (("accuracy_reference", "accuracy_candidate", "accuracy"),
                       ("task_reference", "task_candidate", "task")):
        if (getattr(r, a) is None) != (getattr(r, b) is None):
            raise ValueError(f"{a} and {b} go together: this report has only "
                             f"{a if getattr(r, a) is not None else b}")
    if r.task_reference is not None and (not isinstance(r.task, str) or not r.task):
        raise ValueError("task_reference/task_candidate need the task's name in \"task\"")
    _check_placement(r.placement_reference)
    _check_placement(r.placement_candidate)
    if not isinstance(r.target, str):
        raise TypeError(f"target must be a string, got {r.target!r}")
    number(r.size_reference, False)
    number(r.size_candidate, False)
    if r.size_reference <= 0:
        raise ValueError("size_reference must be positive")
    for o in r.outputs:
        for x in (o.max_abs_error, o.mean_abs_error, o.cosine, o.snr_db):
            number(x, False)
        number(o.top1_agreement)
    for key in ("latency_reference", "latency_candidate"):
        lat = getattr(r, key)
        if lat is not None:
            number(lat.median_ms, False)
            number(lat.p90_ms, False)
            if not (math.isfinite(lat.median_ms) and lat.median_ms > 0):
                raise ValueError(f"{key}.median_ms must be a positive number, got {lat.median_ms!r}")
    if r.paired_speedup is not None:
        sp = r.paired_speedup
        for x in (sp.median, sp.p10, sp.p90):
            number(x, False)
        count(sp.pairs, "paired_speedup.pairs")
        if not (0 < sp.p10 <= sp.median <= sp.p90 and math.isfinite(sp.p90)):
            raise ValueError(f"paired_speedup needs 0 < p10 <= median <= p90 (finite), got "
                             f"p10 {sp.p10!r}, median {sp.median!r}, p90 {sp.p90!r}")
    for key in ("kernels_reference", "kernels_candidate"):
        k = getattr(r, key)
        if k is None:
            continue
        if not isinstance(k.integer, dict):
            raise TypeError("kernels.integer must be an object of op type -> count")
        for op, n in k.integer.items():
            count(n, f"{key}.integer[{op!r}]")
        for f in ("quantize", "dequantize", "unfused_quantize", "unfused_dequantize"):
            count(getattr(k, f), f"{key}.{f}")


@dataclass(frozen=True)
class Thresholds:
    """Gates; None is not checked. max_drop is absolute, in the metric's own units: 0.003 = 0.3
    points of accuracy. min_speedup gates the median per-pair speedup (reference_ms /
    candidate_ms); min_snr is in dB and gates the lowest SNR over the outputs."""

    max_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    max_task_drop: float | None = None
    min_speedup: float | None = None
    min_snr: float | None = None

    @classmethod
    def from_options(cls, options) -> "Thresholds":
        """The gates a ``qtool.config.EvalOptions`` sets."""
        return cls(**{f: getattr(options, f) for f in cls.__dataclass_fields__})


def judge(report: Report, t: Thresholds) -> Report:
    """Check the thresholds (they replace the report's gates); each failed gate says by how much
    and what would pass. Also recomputes ``warnings`` (a speedup too noisy to call).

    A gate on a value the report lacks (--max-drop without labels, --max-task-drop without a
    task, --min-speedup without latency...) cannot be judged: a one-line QtoolError, not a
    failed gate. A NaN value fails its gate whatever the threshold."""
    cosine = _lowest(o.cosine for o in report.outputs)
    sp = report.paired_speedup
    spread = f" ({sp.spread()})" if sp else " (ratio of medians; no per-pair spread in this report)"
    checks = [  # name, threshold, value, upper bound?, what, flag, why the value is missing, unit
        ("max_drop", t.max_drop, report.accuracy_drop, True, "accuracy drop", "--max-drop",
         "no accuracy: it needs labels (a 'labels' array in the data or --labels) and a classifier-shaped output",
         ""),
        ("min_agreement", t.min_agreement, report.agreement, False, "top-1 agreement", "--min-agreement",
         "no top-1 agreement: it needs a classifier-shaped output [batch, classes]", ""),
        ("max_task_drop", t.max_task_drop, report.task_drop, True, f"{report.task} drop", "--max-task-drop",
         "no task metric: it needs a task file (--task)", ""),
        ("min_cosine", t.min_cosine, cosine, False, "cosine similarity", "--min-cosine", "no outputs to compare", ""),
        ("min_snr", t.min_snr, report.min_snr_db, False, "lowest output SNR", "--min-snr",
         "no outputs to compare", " dB"),
        ("min_speedup", t.min_speedup, report.speedup, False, "median per-pair speedup", "--min-speedup",
         "no latency in this report", "x" + spread),
    ]
    gates = []
    for name, threshold, value, upper, what, flag, missing, unit in checks:
        if threshold is None:
            continue
        if value is None:
            raise QtoolError(f"{flag} cannot be checked: {missing}")
        gates.append(_gate(name, value, threshold, _passes(value, threshold, upper), what, flag, unit))
    warnings = []
    if sp is not None:
        w = sp.warning(t.min_speedup)
        if w:
            warnings.append(w)
    return replace(report, gates=tuple(gates), warnings=tuple(warnings))


def _lowest(values) -> float | None:
    """The minimum; NaN when any value is NaN (min() would keep or drop it by position)."""
    values = [float(v) for v in values]
    if not values:
        return None
    return float("nan") if any(math.isnan(v) for v in values) else min(values)


def _passes(value: float, threshold: float, upper: bool) -> bool:
    """NaN never passes; +inf passes any lower bound (an exact match has infinite SNR)."""
    return value <= threshold + 1e-12 if upper else value >= threshold


def _gate(name, value, threshold, passed, what, flag, unit="") -> Gate:
    shown = f"{value:.4f}" if math.isfinite(value) else ("NaN" if math.isnan(value) else str(value))
    if passed:
        return Gate(name, value, threshold, True, f"{what} {shown}{unit} within {flag} {threshold:g}")
    if not math.isfinite(value):
        return Gate(name, value, threshold, False, f"{what} is {shown}; no threshold passes ({flag} {threshold:g})")
    return Gate(name, value, threshold, False,
                f"{what} {shown}{unit} misses {flag} {threshold:g} by {abs(value - threshold):.4f}; "
                f"{flag} {_round_out(value, name)} would have passed")


def _round_out(value: float, name: str) -> str:
    """The nearest 4-decimal threshold on the passing side of ``value``, as text that parses back
    to a threshold that passes (float rounding of value * 10000 can land on the failing side)."""
    upper = name.startswith("max")
    step = math.ceil if upper else math.floor
    k = step(value * 10000)
    for _ in range(3):
        text = f"{k / 10000:.4f}".rstrip("0").rstrip(".")
        if text == "-0":
            text = "0"
        if _passes(value, float(text), upper):
            return text
        k += 1 if upper else -1
    return text


def format_table(r: Report) -> str:
    """The plain-text side-by-side table ``qtool eval`` prints."""
    rows = [("", "reference", "candidate", "")]
    if r.accuracy_reference is not None:
        rows.append(("top-1 accuracy", f"{r.accuracy_reference:.4f}", f"{r.accuracy_candidate:.4f}",
                     f"drop {r.accuracy_drop * 100:+.2f} pts"))
    if r.task_reference is not None:
        rows.append((r.task, f"{r.task_reference:.4f}", f"{r.task_candidate:.4f}", f"drop {r.task_drop:+.4f}"))
    rows.append(("size", _mb(r.size_reference), _mb(r.size_candidate), f"ratio {r.size_ratio:.3f}"))
    if r.latency_reference and r.latency_candidate:
        lr, lc = r.latency_reference, r.latency_candidate
        sp = r.paired_speedup
        rows.append((f"latency median (batch {lr.batch})", f"{lr.median_ms:.3f} ms", f"{lc.median_ms:.3f} ms",
                     f"speedup {r.speedup:.2f}x" + (f" (paired, p10-p90 {sp.p10:.2f}-{sp.p90:.2f}x)" if sp
                                                    else " (ratio of medians)")))
        rows.append(("latency p90", f"{lr.p90_ms:.3f} ms", f"{lc.p90_ms:.3f} ms", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for label, k in (("reference", r.kernels_reference), ("candidate", r.kernels_candidate)):
        if k is not None:
            lines.append(f"{label} {k.describe()}")
    for label, placed in (("reference", r.placement_reference), ("candidate", r.placement_candidate)):
        if placed:
            lines.append(f"{label} ran on: {describe_placement(placed)}")
    lines.append("")
    lines.append(f"outputs ({r.samples} samples, provider {r.provider}"
                 + (f", {r.threads} threads" if r.threads else "") + "):")
    for o in r.outputs:
        agree = f"  top-1 agreement {o.top1_agreement:.4f}" if o.top1_agreement is not None else ""
        lines.append(f"  {o.name}: max|err| {o.max_abs_error:.4g}  mean|err| {o.mean_abs_error:.4g}  "
                     f"cosine {o.cosine:.5f}  SNR {o.snr_db:.1f} dB{agree}")
    for note in r.notes:
        lines.append(f"note: {note}")
    for warning in r.warnings:
        lines.append(f"warning: {warning}")
    for g in r.gates:
        lines.append(f"{'PASS' if g.passed else 'FAIL'} {g.name}: {g.message}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
