"""``--method auto``: each activation's range chosen among several methods by the error it
measurably causes at the model's outputs.

Why measure: every candidate range (``CANDIDATES``: minmax, percentile, mse, entropy) trades
clipping error against rounding error, and the histogram alone can only weigh them by their
mean squared error *at the tensor*, which ``mse`` minimises by construction. What matters is the
error at the outputs: clipping touches the few largest values, which can matter far more (or
less) downstream than the rounding noise on every value. So, per tensor and candidate, the
tensor alone is fake-quantized on the grid that candidate's range gives (the precision and
symmetry the plan gives it), the difference fed through the fp32 model
(:func:`qtool.debug.perturbed_model`, as ``qtool debug --impact`` does per node), and the
outputs' error measured: per output channel (axis 1) relative to that channel's fp32 energy,
averaged (:func:`output_snr`), so that a detector's sigmoid scores count as much as its box
coordinates in pixels.

Worked example (tests/test_method_auto.py): x -> Relu -> MatMul, 32x1024 |Laplace(0, 1)|
values with two outliers at 30 in feature 0; entropy clips at 10.7, mse at 29.5 (half a step
in). If the MatMul reads feature 0 the outliers carry the outputs: minmax 50.1 dB, mse 34.6,
entropy 3.8, and minmax stays. If the MatMul ignores feature 0 (the same histogram) entropy's
3x finer step wins, 40.4 dB against minmax's 31.3, and is chosen. A criterion computed from
the histogram cannot tell the two apart.

Rule: the candidate with the best output SNR, but a clipping candidate must beat minmax by
``MARGIN_DB``: clipping is a bet on values the calibration set saw, so it must pay
measurably. Candidates whose grids coincide (same scale and zero point) are measured once.

Cost (bounded): one fp32 run per batch plus one run of the perturbed model per (tensor,
distinct candidate grid) per batch, on the first ``auto_samples`` calibration samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..qparams import fake_quantize

CANDIDATES = ("minmax", "percentile", "mse", "entropy")
MARGIN_DB = 0.1  # a clipping candidate must beat minmax's output SNR by more than this (2.3 % less noise)


@dataclass(frozen=True)
class Choice:
    """What auto chose for one tensor and what it measured: the model outputs' SNR (dB) with only
    this tensor quantized, per candidate (empty: not measured, the tensor keeps minmax)."""

    method: str
    snr_db: dict

    def to_dict(self) -> dict:
        return {"method": self.method, "output_snr_db": {k: _finite(v) for k, v in self.snr_db.items()}}

    @classmethod
    def from_dict(cls, d) -> "Choice":
        if not isinstance(d, dict) or d.get("method") not in CANDIDATES:
            raise ValueError(f"auto must be {{\"method\": one of {', '.join(CANDIDATES)}, ...}}, got {d!r}")
        snr = d.get("output_snr_db", {})
        if not isinstance(snr, dict) or not all(k in CANDIDATES and _number(v) for k, v in snr.items()):
            raise ValueError(f"auto.output_snr_db must map candidate methods to numbers, got {snr!r}")
        return cls(d["method"], {k: float(v) for k, v in snr.items()})

    def gain_db(self) -> float:
        """The chosen range's output SNR minus minmax's (0 when minmax or not measured)."""
        if self.method == "minmax" or not self.snr_db:
            return 0.0
        return self.snr_db[self.method] - self.snr_db["minmax"]


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _finite(v: float) -> float:
    """JSON has no inf: a noise-free candidate is written as 999 dB."""
    return min(float(v), 999.0)


def candidate_ranges(hist: dict, params: dict) -> dict[str, tuple[float, float]]:
    """Every candidate's range from a table histogram (``params``: symmetric, percentile)."""
    from .methods import histogram_range
    return {m: histogram_range(hist, m, params) for m in CANDIDATES}


def grids(ranges: dict[str, tuple[float, float]], precision, symmetric: bool) -> dict[str, tuple]:
    """candidate -> (scale, zero point); candidates with the same grid share the first one's key."""
    from ..qparams import choose_qparams
    out = {}
    for m, (lo, hi) in ranges.items():
        s, z = choose_qparams(lo, hi, precision, symmetric)
        out[m] = (np.float32(s), int(z))
    return out


def pick(snr_db: dict[str, float]) -> str:
    """The candidate with the best output SNR; minmax unless another beats it by MARGIN_DB.
    {"minmax": 40.0, "percentile": 40.05, "mse": 43.0} -> "mse"; {"minmax": 40.0, "mse": 40.05} -> "minmax"."""
    best = max(snr_db, key=lambda m: (snr_db[m], -CANDIDATES.index(m)))
    return best if snr_db[best] > snr_db["minmax"] + MARGIN_DB else "minmax"


def _energy(arrays) -> np.ndarray:
    """Squared sums per output channel (axis 1; the whole tensor when of rank < 2), all outputs
    concatenated: a [2, 3, 4] output gives 3 numbers."""
    parts = []
    for a in arrays:
        a = np.square(np.asarray(a, dtype=np.float64))
        parts.append(a.reshape(a.shape[0], a.shape[1], -1).sum(axis=(0, 2)) if a.ndim >= 2 else a.sum(keepdims=True))
    return np.concatenate(parts)


def output_snr(signal: np.ndarray, noise: np.ndarray) -> float:
    """The outputs' SNR in dB, each output channel relative to its own energy and the ratios averaged:
    channels of different units (a detector's box pixels beside its sigmoid scores) count alike.
    A channel that is zero in fp32 is measured against the mean channel's energy."""
    floor = max(float(signal.mean()), 1e-300)
    nsr = float(np.mean(noise / np.where(signal > 0, signal, floor)))
    return float("inf") if nsr == 0 else float(-10 * np.log10(nsr))


def measure(model, tensors: dict[str, dict], batches, precision, symmetric: bool,
            threads: int | None = None) -> dict[str, Choice]:
    """``tensors``: name -> {candidate: (lo, hi)} for float tensors of ``model``'s main graph.
    Returns each tensor's Choice, measured on ``batches``."""
    from .. import runtime
    from ..debug import perturbed_model
    from .collect import augment
    outputs = [o.name for o in model.graph.output]
    names = list(tensors)
    inner = [t for t in names if t not in outputs]
    pert, deltas = perturbed_model(model, inner)
    delta_of = dict(zip(inner, deltas))
    params = {t: grids(r, precision, symmetric) for t, r in tensors.items()}
    distinct = {t: list(dict.fromkeys(g.values())) for t, g in params.items()}
    sess_f = runtime.session(augment(model, names), threads=threads)
    sess_p = runtime.session(pert, threads=threads)
    inputs = [i.name for i in sess_f.get_inputs()]
    signal, noise = 0.0, {t: [0.0] * len(distinct[t]) for t in names}
    for batch in batches:
        feeds = {k: batch[k] for k in inputs}
        values = dict(zip(names, runtime.run(sess_f, feeds, names)))
        zeros = {d: np.zeros_like(values[t]) for t, d in delta_of.items()}
        ref = runtime.run(sess_p, {**feeds, **zeros}, outputs)
        signal = signal + _energy(ref)
        for t in names:
            x = values[t]
            for k, (s, z) in enumerate(distinct[t]):
                err = fake_quantize(x, s, z, precision) - x
                if t in delta_of:
                    out = runtime.run(sess_p, {**feeds, **zeros, delta_of[t]: err}, outputs)
                    noise[t][k] = noise[t][k] + _energy([o.astype(np.float64) - r for o, r in zip(out, ref)])
                else:  # a model output: its own error is the outputs' error
                    noise[t][k] = noise[t][k] + _energy([err if o == t else np.zeros_like(r)
                                                         for o, r in zip(outputs, ref)])
        values = zeros = ref = None
    result = {}
    for t in names:
        snr = {m: output_snr(signal, noise[t][distinct[t].index(g)]) for m, g in params[t].items()}
        result[t] = Choice(pick(snr), snr)
    return result


def choose(model, stats: dict, facts, params: dict, batches, threads: int | None = None
           ) -> tuple[dict, tuple[str, ...]]:
    """Stats whose ranges auto chose: each activation the plan quantizes measured (:func:`measure`);
    the rest (read only after an --exclude, or inside subgraphs) keep minmax, noted as not measured.
    Returns (stats, notes)."""
    from dataclasses import replace
    from ..debug import float_tensors
    from ..plans import Action, Role
    from ..planner import plan as make_plan
    from .methods import derive_range, histogram_range
    minmax = {t: s.range for t, s in stats.items()}
    decided = make_plan(replace(facts, ranges=minmax))
    floats = float_tensors(model)
    wanted = {t.name: t for t in decided.tensors.values()
              if t.role is Role.ACTIVATION and t.action is Action.QUANTIZE and t.name in stats
              and t.name in floats and stats[t.name].count and stats[t.name].min < stats[t.name].max}
    candidates = {}
    for name, t in wanted.items():
        s, bits = stats[name], t.precision.bits
        candidates[name] = {m: histogram_range(s.histogram, m, params) if m == "minmax" or bits <= 8
                            else derive_range(s, m, params, bits) for m in CANDIDATES}
    by_kind: dict[tuple, dict] = {}
    for name, t in wanted.items():
        by_kind.setdefault((t.precision, t.symmetric), {})[name] = candidates[name]
    chosen: dict[str, Choice] = {}
    for (precision, symmetric), group in by_kind.items():
        chosen.update(measure(model, group, batches(), precision, symmetric, threads))
    out = {}
    for name, s in stats.items():
        c = chosen.get(name, Choice("minmax", {}))
        rng = histogram_range(s.histogram, c.method, params) if s.histogram is not None and s.count else s.range
        out[name] = replace(s, range=rng, auto=c.to_dict())
    counts = {m: sum(c.method == m for c in chosen.values()) for m in CANDIDATES}
    notes = (f"auto: {len(chosen)} activations measured at the outputs: "
             + ", ".join(f"{m} {n}" for m, n in counts.items())
             + (f"; {len(stats) - len(chosen)} other tensors keep minmax (not quantized by this plan, "
                "constant, or inside a subgraph)" if len(stats) > len(chosen) else ""),)
    return out, notes


def explain_choices(plan, table):
    """The plan with each quantized activation's reason saying which range auto chose and what it
    measured, and ``applied["method_auto"]``: {tensor: output SNR gain over minmax, dB} where a
    clipping range was chosen."""
    from dataclasses import replace
    from ..plans import Action, Role
    tensors, gains = dict(plan.tensors), {}
    for name, t in plan.tensors.items():
        stats = table.tensors.get(name)
        if t.role is not Role.ACTIVATION or t.action is not Action.QUANTIZE or stats is None or stats.auto is None:
            continue
        c = Choice.from_dict(stats.auto)
        if not c.snr_db:
            why = "minmax (auto: not measured)"
        else:
            why = f"{c.method} (auto: outputs {c.snr_db[c.method]:.1f} dB with only this tensor quantized, " + \
                ", ".join(f"{m} {v:.1f}" for m, v in c.snr_db.items() if m != c.method) + ")"
        tensors[name] = replace(t, reason=f"{t.reason}; range {why}")
        if c.method != "minmax":
            gains[name] = round(c.gain_db(), 4)
    applied = dict(plan.applied, method_auto=gains) if gains else plan.applied
    return replace(plan, tensors=tensors, applied=applied)
