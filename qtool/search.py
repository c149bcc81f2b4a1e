"""Accuracy-driven quantization: fall back the fewest, most sensitive nodes until the gates hold.

1. Quantize everything the planner quantizes and rank its nodes by sensitivity, computed once
   (:mod:`qtool.debug`): the model outputs' SNR against fp32 when that node alone is quantized
   (its inputs from fp32 through its own Q/DQ, kernel-exact), so that a node is ranked by what
   its error does to the outputs, not only by its local error.
2. Evaluate candidates against fp32 outputs computed once and cached: all int8 first; then
   the whole ranking at the fallback precision (if even that fails, the target cannot be met);
   then bisection over the ranking (falling back the top k) for the smallest k that passes,
   which assumes that falling back more sensitive nodes never hurts (near enough: a float node
   only removes error); then a greedy clean-up that returns nodes of the top k to int8, largest
   MAC share first, keeping each return that still passes, while the evaluation budget
   (2·log2(N) + 10 for N ranked nodes) lasts.
3. Speed: the result is timed against fp32 (paired, interleaved runs at batch 1). Where it is
   slower than asked (``--min-speedup``, or 1.0), onnxruntime's per-node profile of both models
   names the int8 groups that cost more than their float version; they are kept float when the
   paired timing confirms the model got faster and the gates still hold.

Every decision lands in the plan as the node's reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import onnx

from . import runtime
from .config import QuantizeOptions
from .comparison import Comparison, samples_in
from .errors import InternalError, ModelError
from .evaluation import Gate, Report, Speedup, Thresholds, judge
from .graph import node_name
from .plans import Plan
from .rules.movement import MOVEMENT_OPS

FALLBACKS = ("fp32", "fp16", "int16")
#: Ops whose isolated error is their input's (they share its parameters): never ranked.
NOT_RANKED = set(MOVEMENT_OPS) | {"Concat", "Split", "Identity"}


@dataclass(frozen=True)
class SearchOptions:
    thresholds: Thresholds
    fallback: str = "fp32"
    best_effort: bool = False
    provider: str = "cpu"
    threads: int | None = None
    batch_size: int = 32
    limit: int | None = None
    sensitivity_samples: int = 64
    max_evaluations: int | None = None
    timing_pairs: int = 30
    speed: bool = True  # time against fp32 and keep measured-slower groups float

    @property
    def accuracy_gates(self) -> Thresholds:
        return replace(self.thresholds, min_speedup=None)

    @property
    def min_speedup(self) -> float | None:
        return self.thresholds.min_speedup


@dataclass(frozen=True)
class Step:
    index: int
    what: str
    fallback: tuple[str, ...]       # nodes at the fallback precision in this candidate
    gates: tuple[Gate, ...]
    passed: bool
    int8_mac_share: float
    speed: Speedup | None = None
    float_ranked: int = 0           # ranked nodes not at 8 bits (the planner keeps some neighbours float)
    extra: tuple[str, ...] = ()     # further --precision overrides of this candidate (int8 float patterns)
    plan: Plan | None = field(default=None, repr=False, compare=False)

    def line(self) -> str:
        gates = "  ".join(f"{g.name} {g.value:.4g}{'' if g.passed else '!'}" for g in self.gates)
        sp = (f"  speed-up {self.speed.median:.2f}x (p10-p90 {self.speed.p10:.2f}-{self.speed.p90:.2f})"
              if self.speed else "")
        return (f"step {self.index:>2}: {self.what:<38} float {self.float_ranked:>3}  int8 MACs "
                f"{self.int8_mac_share * 100:5.1f}%  {gates}{sp}  {'PASS' if self.passed else 'fail'}")


@dataclass(frozen=True)
class SearchResult:
    plan: Plan
    passed: bool
    trail: tuple[Step, ...]
    evaluations: int
    seconds: float
    ranking: tuple[tuple[str, float], ...]  # (node, outputs' SNR dB with only it quantized), most sensitive first
    final: Step
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        def step(s: Step) -> dict:
            d = {"step": s.index, "what": s.what, "fallback": list(s.fallback), "overrides": list(s.extra),
                 "passed": s.passed,
                 "int8_mac_share": s.int8_mac_share, "float_ranked": s.float_ranked,
                 "gates": [{"name": g.name, "value": g.value, "threshold": g.threshold, "passed": g.passed}
                           for g in s.gates]}
            if s.speed is not None:
                d["speedup"] = {"median": s.speed.median, "p10": s.speed.p10, "p90": s.speed.p90,
                                "pairs": s.speed.pairs}
            return d
        from .debug import _finite_json
        return _finite_json({"format": "qtool.search", "passed": self.passed, "evaluations": self.evaluations,
                "seconds": self.seconds, "final": step(self.final), "notes": list(self.notes),
                "ranking": [{"node": n, "output_snr": v} for n, v in self.ranking],
                "trail": [step(s) for s in self.trail]})

    @property
    def miss(self) -> str:
        return "; ".join(g.message for g in self.final.gates if not g.passed)


class Reference:
    """The fp32 model's outputs on the evaluation data, computed once and kept; candidates are
    compared with them by ``qtool eval``'s own :class:`qtool.comparison.Comparison`."""

    def __init__(self, path, ds, labels, task, options: SearchOptions, batch_size: int | None = None):
        self.ds, self.labels, self.task, self.options = ds, labels, task, options
        self.batch_size = batch_size or options.batch_size
        self.session = runtime.target_session(str(path), runtime.pick_provider(options.provider), options.threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.names = runtime.output_names(self.session)
        self.outputs = [runtime.run(self.session, {k: b[k] for k in self.inputs}) for b in self._batches()]
        cached = iter(self.outputs)
        self._compare(lambda feeds: next(cached))  # labels that do not fit the model fail here, not mid-search
        self.feed1 = {k: v[:1] for k, v in next(iter(self._batches())).items() if k in self.inputs}

    def _batches(self):
        return self.ds.batches(self.batch_size, self.options.limit)

    def _compare(self, run: Callable[[dict], list]) -> dict:
        """Report fields of ``run`` (a candidate's outputs for one batch's feeds) against the cached
        outputs, streamed batch by batch."""
        comparison = Comparison(self.names, self.labels, self.task)
        for batch, ref in zip(self._batches(), self.outputs):
            feeds = {k: batch[k] for k in self.inputs}
            comparison.update(batch, ref, run(feeds), samples_in(feeds))
        return comparison.fields()

    def judge(self, model: onnx.ModelProto, gates: Thresholds):
        """Evaluate a candidate model (in memory) against the cached outputs: (report, its session)."""
        try:
            sess = runtime.target_session(model, runtime.pick_provider(self.options.provider), self.options.threads)
        except ModelError as exc:  # a candidate qtool wrote that onnxruntime cannot load: qtool's bug
            raise InternalError(f"internal error: a search candidate does not load ({exc}); please report it "
                                "with the model") from None
        report = Report(reference="fp32", candidate="candidate", provider=self.options.provider, size_reference=0,
                        size_candidate=0, latency_reference=None, latency_candidate=None,
                        threads=self.options.threads, **self._compare(lambda feeds: runtime.run(sess, feeds)))
        return judge(report, gates), sess

    def speed(self, sess, pairs: int) -> Speedup:
        """Paired, interleaved timing at batch 1: fp32 ms / candidate ms per pair."""
        _, _, ratios = runtime.time_pair(self.session, sess, self.feed1, warmup=3, repeats=pairs)
        return Speedup.from_ratios(ratios)


def budget(n: int) -> int:
    """The most evaluations a search over ``n`` ranked nodes may use: 2·log2(n) + 10."""
    return int(2 * math.log2(max(n, 2))) + 10


def fallback_options(options: QuantizeOptions, nodes, precision: str, op_types: dict[str, str] | None = None
                     ) -> QuantizeOptions:
    """``options`` with ``nodes`` at the fallback precision (fp16 only where the op runs in fp16, else fp32)."""
    from .rewrite.half_nodes import HALF_OPS

    def of(n):
        return "fp32" if precision == "fp16" and (op_types or {}).get(n) not in HALF_OPS else precision
    return replace(options, precision=tuple(options.precision) + tuple(f"{n}={of(n)}" for n in nodes))


def search(model_path, prepared, table, options: QuantizeOptions, method, eval_data, labels, task,
           sopts: SearchOptions, log: Callable[[str], None] = lambda s: None,
           treat: Callable[[Plan], Plan] | None = None) -> SearchResult:
    """Find the plan with the fewest fallback nodes that passes the gates (see the module doc).
    ``treat``: what turns a resolved plan into the one written (the weight algorithms), run on the
    base plan before the ranking and on every candidate."""
    treat = treat or (lambda plan: plan)
    from . import api
    from .debug import measure, output_sensitivity
    from .inspection import macs_by_node, static_view
    started = time.perf_counter()
    batch_size = api._batch_size(prepared.model, sopts.batch_size)
    ref = Reference(model_path, eval_data, labels, task, sopts, batch_size)
    # MACs at the shapes of the data (batch 1): dynamic sequence lengths would otherwise stay unknown
    macs = macs_by_node(static_view(prepared.model, {k: tuple(v.shape) for k, v in ref.feed1.items()})[0],
                        unknown_as_one=True)
    total_macs = sum(macs.values()) or 1
    gates = sopts.accuracy_gates
    trail: list[Step] = []
    cache: dict[frozenset, Step] = {}  # by every node's precision, and by what was asked
    op_types = {node_name(n): n.op_type for n in prepared.model.graph.node}

    def resolved(nodes, extra=()) -> Plan:
        opts = replace(options, precision=tuple(options.precision) + tuple(extra))
        return api._resolved_plan(prepared, fallback_options(opts, nodes, sopts.fallback, op_types), table, method)

    def build(nodes, extra=()) -> tuple[Plan, onnx.ModelProto]:
        plan = treat(resolved(nodes, extra))
        return plan, _candidate(api, plan, prepared)

    def evaluate(nodes, what, extra=()) -> Step:
        asked = (frozenset(nodes), tuple(extra))
        if asked in cache:
            return cache[asked]
        plan = resolved(nodes, extra)
        # what the planner made of it (it may keep neighbours float): every node's precision
        actual = frozenset((n.name, n.precision.label) for n in plan.nodes)
        if actual in cache:
            cache[asked] = cache[actual]
            return cache[actual]
        plan = treat(plan)
        report, sess = ref.judge(_candidate(api, plan, prepared), gates)
        share = sum(macs.get(n.name, 0) for n in plan.nodes if n.precision.bits == 8) / total_macs
        moved = {n.name for n in plan.nodes if n.precision.bits != 8} & ranked
        speed = ref.speed(sess, sopts.timing_pairs) if sopts.speed else None
        step = Step(len(trail) + 1, what, tuple(nodes), report.gates, report.passed, share, speed,
                    len(moved), tuple(extra), plan)
        trail.append(step)
        cache[actual] = cache[asked] = step
        log(step.line())
        return step

    base_plan = treat(api._resolved_plan(prepared, options, table, method))
    qdq = _candidate(api, replace(base_plan, format="qdq"), prepared, restore=False)
    limit = sopts.sensitivity_samples
    sample = lambda: eval_data.batches(min(batch_size, 16), limit)  # noqa: E731
    sens = measure(prepared.model, qdq, sample(), macs, threads=sopts.threads)
    at_output = output_sensitivity(prepared.model, qdq, sample(), sopts.threads)
    quantized = {n.name for n in base_plan.quantized_nodes()}
    isolated = {e.name: e.isolated_sqnr for e in sens.nodes}
    ranking = sorted(((e.name, at_output.get(e.name, float("inf"))) for e in sens.nodes
                      if e.op_type not in NOT_RANKED and e.name in quantized), key=lambda x: x[1])
    names = [n for n, _ in ranking]
    ranked = set(names)
    n = len(names)
    cap = sopts.max_evaluations or budget(n)
    inside = sum(len(sub.quantized_nodes()) for sub in base_plan.subgraphs.values())
    if inside:
        log(f"note: {inside} quantized nodes inside If/Loop/Scan bodies are not ranked and stay as planned")
    log(f"ranked {n} nodes by the outputs' SNR with only that node quantized (worst: "
        + ", ".join(f"{a} {b:.1f} dB" for a, b in ranking[:3]) + f"); at most {cap} evaluations")

    first = evaluate([], "all int8")
    chosen: list[str] = []
    passed = first.passed
    needed_for: dict[str, str] = {}
    if not passed and n:
        everything = evaluate(names, f"all {n} ranked nodes {sopts.fallback}")
        if everything.passed:
            lo, hi = 0, n
            failing = first
            while hi - lo > 1 and len(trail) < cap:
                mid = (lo + hi) // 2
                step = evaluate(names[:mid], f"top {mid} {sopts.fallback}")
                if step.passed:
                    hi = mid
                else:
                    lo, failing = mid, step
            chosen = names[:hi]
            needed_for[chosen[-1]] = _failed(failing)
            passed = True
            for node in sorted(chosen[:-1], key=lambda x: -macs.get(x, 0)):
                if len(trail) >= cap:
                    break
                trial = [c for c in chosen if c != node]
                before = len(trail)
                step = evaluate(trial, f"{node} back to int8")
                if len(trail) == before and step is evaluate(chosen, ""):
                    # the planner keeps it float with its neighbours: nothing to try
                    needed_for[node] = "nothing alone: back to int8 by itself it stays float beside its float " \
                                       "neighbours (a float reader makes its producer float)"
                    continue
                if step.passed:
                    chosen = trial
                else:
                    needed_for[node] = _failed(step)
    final_nodes = list(chosen)
    final = evaluate(final_nodes, "")
    notes: list[str] = []
    if not passed:
        final = _best(trail)
        final_nodes = list(final.fallback)
    untried = f"kept with the top {len(chosen)} that pass {_gate_flags(gates)} (the evaluation budget ended before it was tried alone)"
    reasons = {node: (f"{sopts.fallback}: alone it leaves the outputs at {dict(ranking)[node]:.1f} dB SNR "
                      f"(isolated SQNR {isolated[node]:.1f} dB at its output), rank {names.index(node) + 1} of {n}, "
                      + (needed_for[node].replace("nothing alone: ", "") if needed_for.get(node, "").startswith(
                          "nothing alone") else f"needed for {needed_for[node]}" if node in needed_for else untried))
               for node in final_nodes}
    if sopts.speed and passed:
        final_nodes, final, extra = _speed_phase(prepared, ref, final_nodes, final, build, evaluate, sopts,
                                                 log, len(trail) < cap + 4)
        reasons.update(extra)
        if final.speed is not None:
            # the verdict on speed is timed again, longer: 30 pairs choose between candidates, these decide
            model = _candidate(api, final.plan, prepared)
            sess = runtime.target_session(model, runtime.pick_provider(sopts.provider), sopts.threads)
            final = replace(final, speed=ref.speed(sess, sopts.timing_pairs * 4))
            log(f"final timing: {final.speed.median:.2f}x fp32's speed (p10-p90 {final.speed.p10:.2f}-"
                f"{final.speed.p90:.2f}, {final.speed.pairs} pairs at batch 1)")
        if final.speed is not None and sopts.min_speedup is not None and final.speed.median < sopts.min_speedup:
            passed = False
            notes.append(f"the best plan runs at {final.speed.median:.2f}x fp32's speed (p10-p90 "
                         f"{final.speed.p10:.2f}-{final.speed.p90:.2f}), below --min-speedup {sopts.min_speedup:g}")
        elif final.speed is not None and final.speed.median < 1.0:
            notes.append(f"the quantized model is slower than fp32 here: {final.speed.median:.2f}x (p10-p90 "
                         f"{final.speed.p10:.2f}-{final.speed.p90:.2f}) at batch 1")
    plan = _with_reasons(final.plan, reasons)
    if not options.precision:  # the note would be about the search's own overrides, not the user's
        plan = replace(plan, notes=tuple(n for n in plan.notes if not n.startswith("--precision not applied")))
    return SearchResult(plan, passed, tuple(trail), len(trail), time.perf_counter() - started,
                        tuple(ranking), final, tuple(notes))


def _candidate(api, plan: Plan, prepared, restore: bool = True) -> onnx.ModelProto:
    model = api._apply(plan, prepared.model)
    if restore and prepared.half is not None:
        from .preprocess.half import restore_storage
        model, _ = restore_storage(model, prepared.half)
    return model


def _speed_phase(prepared, ref, nodes, final, build, evaluate, sopts, log, allowed, rounds: int = 3):
    """Make the result faster by measurement, never by guess.

    First, where the plan keeps float patterns float (SiLU, GELU, HardSwish: a rule's guess
    that their small ops lose accuracy), one candidate quantizes them (QLinearSigmoid,
    QLinearMul, ...: fewer Q/DQ boundaries around every activation). Then each round profiles
    the current candidate (a group turns slow or fast with its neighbours: a float Conv makes
    onnxruntime move its output's Q above the pool after it, which then runs on uint8 in the
    NCHW kernel), moves the groups measured slower than their float version to fp32 and
    evaluates that; a round that is not faster is still followed (its new neighbours may be what
    is slow). The fastest candidate that passes the gates is kept.
    """
    from .profile import node_costs, slower_groups
    want = sopts.min_speedup if sopts.min_speedup is not None else 1.0
    provider = runtime.pick_provider(sopts.provider).used
    best, cur, extra = final, list(nodes), final.extra
    why: dict[str, str] = {}
    if not allowed or final.speed is None or final.speed.median >= want:
        return nodes, final, {}
    patterns = [n for n in final.plan.nodes if not n.quantized and n.reason.startswith("part of a ")]
    if patterns:
        act = ref_activation(final.plan)
        trial_extra = extra + tuple(f"{n.name}={act}" for n in patterns)
        step = evaluate(cur, f"{len(patterns)} float-pattern nodes int8", trial_extra)
        if step.passed and step.speed is not None and step.speed.median > best.speed.median:
            for n in patterns:
                if not step.plan.node(n.name).quantized:
                    continue  # the planner still keeps it float (e.g. after a float Conv)
                why[n.name] = (f"{act}: quantized although a {n.reason.split('part of a ')[1].split(' pattern')[0]} "
                               f"pattern (fewer Q/DQ boundaries): measured {best.speed.median:.2f}x -> "
                               f"{step.speed.median:.2f}x fp32's speed with the gates holding")
            best, extra = step, trial_extra
        else:
            log(f"kept the float patterns float: {'a gate fails' if not step.passed else 'not faster'} with them int8")
    if provider == runtime.PROVIDERS["trt"] and best.speed.median < want:
        # onnxruntime cannot save (nor profile per node) the graph TensorRT compiles into engines
        log("profile: none on the TensorRT EP (it compiles the graph into engines: no per-node kernel times)")
        rounds = 0
    for _ in range(rounds):
        if best.speed.median >= want:
            break
        plan, model = build(cur, extra)
        costs = node_costs(prepared.model, model, plan, ref.feed1, provider, sopts.threads or 2)
        moved = {}
        done = set(cur) | {e.rsplit("=", 1)[0] for e in extra}
        for c in slower_groups(costs, include_float=True):
            if c.quantized and c.node not in done:
                moved[c.node] = (f"fp32: its int8 group measured {c.int8_ms:.3f} ms vs {c.float_ms:.3f} ms float "
                                 f"at batch 1 ({c.detail})")
            elif not c.quantized and any(f"{c.op_type}[{t}]" in c.detail for t in ("uint8", "int8")):
                # a float node run on integers: onnxruntime moved a quantized reader's Q above it
                for reader in _quantized_readers(prepared.model, plan, c.node):
                    if reader not in done:
                        moved.setdefault(reader, f"fp32: onnxruntime moved its input's QuantizeLinear above the float "
                                                 f"{c.node}, which then ran at {c.int8_ms:.3f} ms instead of "
                                                 f"{c.float_ms:.3f} ms at batch 1 ({c.detail})")
        if not moved:
            log("profile: no int8 group costs more than its float version")
            break
        log("profile: slower than in fp32: " + "; ".join(f"{n}: {r.split(' at batch 1')[0].removeprefix('fp32: ')}"
                                                        for n, r in moved.items()))
        why.update(moved)
        extra = extra + tuple(f"{n}=fp32" for n in moved)  # fp32 whatever the accuracy fallback is
        step = evaluate(cur, f"{len(moved)} slower int8 groups fp32", extra)
        if not step.passed:
            log("a gate fails without them: stop")
            break
        if step.speed is not None and step.speed.median > best.speed.median:
            best = step
    if best is final:
        if why:
            log("kept the plan before the speed rounds: none was faster")
        return nodes, final, {}
    chosen = set(best.fallback) | {e.rsplit("=", 1)[0] for e in best.extra}
    reasons = {n: f"{why[n]}; the model runs at {best.speed.median:.2f}x fp32's speed (was {final.speed.median:.2f}x)"
               if not why[n].startswith(("uint8", "int8")) else why[n] for n in chosen if n in why}
    return list(best.fallback), best, reasons


def ref_activation(plan: Plan) -> str:
    """The activation precision the plan uses (uint8 or int8)."""
    for t in plan.tensors.values():
        if t.quantized and t.precision.label in ("uint8", "int8") and t.role.value == "activation":
            return t.precision.label
    return "uint8"


def _quantized_readers(model: onnx.ModelProto, plan: Plan, node: str) -> list[str]:
    """The quantized nodes that read ``node``'s outputs, through data-movement nodes."""
    from .graph import GraphView
    view = GraphView(model)
    start = view.by_name.get(node)
    found, todo, seen = [], list(start.output) if start is not None else [], set()
    while todo:
        tensor = todo.pop()
        for reader in view.consumers.get(tensor, []):
            name = view.node_name(reader)
            if name in seen:
                continue
            seen.add(name)
            decided = plan.node(name)
            if decided is not None and decided.quantized and reader.op_type not in NOT_RANKED:
                found.append(name)
            elif reader.op_type in NOT_RANKED:
                todo.extend(reader.output)
    return found


def _failed(step: Step) -> str:
    return ", ".join(f"--{g.name.replace('_', '-')} {g.threshold:g}" for g in step.gates if not g.passed) \
        or "the gates"


def _gate_flags(gates: Thresholds) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in vars(gates).items() if v is not None)


def _best(trail: list[Step]) -> Step:
    """The candidate closest to passing: most gates passed, then the smallest relative miss."""
    def miss(step):
        total = 0.0
        for g in step.gates:
            if not g.passed and not math.isnan(g.value):
                total += abs(g.value - g.threshold) / max(abs(g.threshold), 1e-9)
            elif not g.passed:
                total += 1e9
        return (-sum(g.passed for g in step.gates), total)
    return min(trail, key=miss)


def _with_reasons(plan: Plan, reasons: dict[str, str]) -> Plan:
    if not reasons:
        return plan
    nodes = tuple(replace(n, reason=reasons[n.name]) if n.name in reasons else n for n in plan.nodes)
    return replace(plan, nodes=nodes)


def quantize_search(model, output, table, data, options: QuantizeOptions, calibrate_options, method, eval_data,
                    labels, task, sopts: SearchOptions, log: Callable[[str], None] = lambda s: None,
                    on_batch=None):
    """``qtool quantize ... --eval-data``: calibrate if asked, search, and write the model only when
    the gates hold (or ``best_effort``). Returns (QuantizeResult or None, SearchResult)."""
    from . import api
    from . import model as model_io
    from .errors import QtoolError
    from .planner import analyse
    if options.mode != "static":
        raise QtoolError("the accuracy search (--eval-data) needs static mode: drop --mode dynamic")
    if options.dynamic:  # its candidates are planned without Facts.dynamic: the nodes would silently stay static
        raise QtoolError("--dynamic is not combined with the accuracy search (--eval-data and the gates) yet: "
                         "quantize with --dynamic alone, or search without it")
    if sopts.fallback not in FALLBACKS:
        raise QtoolError(f"--fallback must be one of {', '.join(FALLBACKS)}")
    if sopts.fallback == "int16" and options.format == "qoperator":
        raise QtoolError("--fallback int16 exists only as QDQ: use --format qdq or --fallback fp32")
    model_io.check_output_path(output, model)
    if table is None and data is None:
        raise QtoolError("static quantization needs a calibration table (--table) or data (--data)")
    options, table = api.with_algorithms(model, options, data, table)  # auto made concrete, as quantize does
    api._check_weight_algorithms(options, data)
    p, table = api._prepare_for(model, options, table, data, calibrate_options)
    ds = api.open_data(eval_data, p.model)
    if table is None:
        table = api._calibrate_prepared(p, data, calibrate_options, options, on_batch,
                                        facts=analyse(p.model, options))
    table = api._load_table(table, p, options)
    result = search(model, p, table, options, method, ds, labels, task, sopts, log,
                    _weight_algorithms(api, p, data, options, calibrate_options))
    if not result.passed and not sopts.best_effort:
        return None, result
    written = api.quantize(model, output, options=options, plan=result.plan)
    return written, result


def _weight_algorithms(api, p, data, options: QuantizeOptions, calibrate_options) -> Callable[[Plan], Plan] | None:
    """The weight algorithms asked for, as the search's ``treat``: one fp32 pass over the calibration
    data gives every layer's input statistics, and a layer quantized as in an earlier candidate
    takes that candidate's codes (:class:`qtool.algorithms.weights.Reuse`)."""
    from .algorithms import weight_algorithms
    if not weight_algorithms(options.algorithms) or data is None:
        return None
    from .algorithms.weights import Reuse, apply
    ds, reuse = api.open_data(data, p.model), Reuse()
    size = api._batch_size(p.model, calibrate_options.batch_size)
    return lambda plan: apply(plan, p.model, ds, size, calibrate_options.limit, options.algorithms, reuse)
