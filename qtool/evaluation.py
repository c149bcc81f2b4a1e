"""Side-by-side evaluation of a reference and a candidate model: metrics, gates, report.

A report is a frozen record with a JSON round trip, so it can be saved and
re-judged against new thresholds (:func:`judge`) without running inference again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import numpy as np

REPORT_FORMAT_VERSION = 1


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
        self.classifier = False

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref = ref.astype(np.float64)
        err = cand.astype(np.float64) - ref
        if err.size:
            self.max_abs = max(self.max_abs, float(np.abs(err).max()))
        self.sum_abs += float(np.abs(err).sum())
        self.count += err.size
        self.signal += float((ref * ref).sum())
        self.noise += float((err * err).sum())
        a, b = ref.reshape(len(ref), -1), cand.astype(np.float64).reshape(len(ref), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1), 1.0)
        self.cos_sum += float(cos.sum())
        self.rows += len(ref)
        if ref.ndim == 2 and ref.shape[1] > 1:
            self.classifier = True
            self.agree += int((ref.argmax(1) == cand.argmax(1)).sum())

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
    format_version: int = REPORT_FORMAT_VERSION

    @property
    def size_ratio(self) -> float:
        return self.size_candidate / self.size_reference

    @property
    def speedup(self) -> float | None:
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
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = "qtool.eval"
        d["size_ratio"], d["speedup"], d["accuracy_drop"] = self.size_ratio, self.speedup, self.accuracy_drop
        d["task_drop"] = self.task_drop
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["outputs"] = tuple(OutputMetrics(**o) for o in d["outputs"])
        d["gates"] = tuple(Gate(**g) for g in d.get("gates", ()))
        d["notes"] = tuple(d.get("notes", ()))
        for key in ("latency_reference", "latency_candidate"):
            d[key] = Latency(**d[key]) if d.get(key) else None
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@dataclass(frozen=True)
class Thresholds:
    """max_drop is absolute, in the metric's own units: 0.003 = 0.3 points of accuracy."""

    max_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    max_task_drop: float | None = None


def judge(report: Report, t: Thresholds) -> Report:
    """Check the thresholds; each failed gate says by how much and what would pass."""
    cosine = min(o.cosine for o in report.outputs) if report.outputs else None
    checks = [  # name, threshold, value, upper bound?, what, flag, why a missing value fails
        ("max_drop", t.max_drop, report.accuracy_drop, True, "accuracy drop", "--max-drop",
         "max-drop needs labels (a 'labels' array in the data or --labels)"),
        ("min_agreement", t.min_agreement, report.agreement, False, "top-1 agreement", "--min-agreement",
         "min-agreement needs a classifier-shaped output [batch, classes]"),
        ("max_task_drop", t.max_task_drop, report.task_drop, True, f"{report.task} drop", "--max-task-drop",
         "max-task-drop needs a task file (--task)"),
        ("min_cosine", t.min_cosine, cosine, False, "cosine similarity", "--min-cosine", "no outputs to compare"),
    ]
    gates = []
    for name, threshold, value, upper, what, flag, missing in checks:
        if threshold is None:
            continue
        if value is None:
            gates.append(Gate(name, float("nan"), threshold, False, missing))
            continue
        passed = value <= threshold + 1e-12 if upper else value >= threshold
        gates.append(_gate(name, value, threshold, passed, what, flag))
    return replace(report, gates=tuple(gates))


def _gate(name, value, threshold, passed, what, flag) -> Gate:
    if passed:
        return Gate(name, value, threshold, True, f"{what} {value:.4f} within {flag} {threshold:g}")
    return Gate(name, value, threshold, False,
                f"{what} {value:.4f} misses {flag} {threshold:g} by {abs(value - threshold):.4f}; "
                f"{flag} {_round_out(value, name):g} would have passed")


def _round_out(value: float, name: str) -> float:
    """The nearest 4-decimal threshold on the passing side of ``value``."""
    scaled = value * 10000
    return (np.ceil(scaled) if name.startswith("max") else np.floor(scaled)) / 10000


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
        rows.append((f"latency median (batch {lr.batch})", f"{lr.median_ms:.3f} ms", f"{lc.median_ms:.3f} ms",
                     f"speedup {r.speedup:.2f}x"))
        rows.append(("latency p90", f"{lr.p90_ms:.3f} ms", f"{lc.p90_ms:.3f} ms", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    lines.append(f"outputs ({r.samples} samples, provider {r.provider}"
                 + (f", {r.threads} threads" if r.threads else "") + "):")
    for o in r.outputs:
        agree = f"  top-1 agreement {o.top1_agreement:.4f}" if o.top1_agreement is not None else ""
        lines.append(f"  {o.name}: max|err| {o.max_abs_error:.4g}  mean|err| {o.mean_abs_error:.4g}  "
                     f"cosine {o.cosine:.5f}  SNR {o.snr_db:.1f} dB{agree}")
    for note in r.notes:
        lines.append(f"note: {note}")
    for g in r.gates:
        lines.append(f"{'PASS' if g.passed else 'FAIL'} {g.name}: {g.message}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
