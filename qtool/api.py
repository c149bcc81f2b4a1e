"""The public Python API; the CLI is a thin layer over these functions.

    report = qtool.inspect("model.onnx")
    table = qtool.calibrate("model.onnx", "calib.npz")
    result = qtool.quantize("model.onnx", "model.int8.onnx", table=table)
    report = qtool.evaluate("model.onnx", "model.int8.onnx", "eval.npz")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from . import model as model_io
from .calib.table import CalibrationTable
from .config import CalibrateOptions, EvalOptions, QuantizeOptions
from .data import Dataset, InputSpec, check_against_model
from .errors import DataError, ModelError, QtoolError, TableError
from .plans import Plan
from .prepare import Prepared, prepare
from .types import Precision


def inspect(model: str | Path, shapes: dict[str, tuple[int, ...]] | None = None, target: str | None = None):
    """Describe a model: IO, opsets, parameters, size, MACs, what would be quantized; with
    ``target`` (cpu, cuda, trt), what that EP would run for each node an int8 plan quantizes."""
    from .inspection import inspect_model
    from .planner import analyse, plan as make_plan
    p = prepare(model)
    raw = model_io.load(model, load_external=False)
    size = _size_on_disk(model, raw)
    from dataclasses import replace
    from .subgraphs import body_plans
    options = QuantizeOptions(target=target or "cpu", weights="int8")
    facts, notes = analyse(p.model, options)
    the_plan = replace(make_plan(facts), subgraphs=body_plans(p.model, options))
    on_target = None
    if target is not None:
        from .targets import on_target as node_targets
        on_target = node_targets(the_plan, facts.view, options.target_enum)
    return inspect_model(raw, str(model), size, the_plan, shapes, p.notes + notes, p.model, on_target)


def _size_on_disk(path, m=None) -> int:
    """Model file plus its external data files (``m``: the model, loaded without its data)."""
    p = Path(path)
    m = m if m is not None else model_io.load(p, load_external=False)
    total = p.stat().st_size
    locations = set()
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for loc in locations:
        f = p.parent / loc
        if f.exists():
            total += f.stat().st_size
    return total


def model_inputs(m) -> list[InputSpec]:
    from onnx import helper
    from .graph import GraphView, tensor_shape
    view = GraphView(m)
    specs = []
    for name in view.graph_inputs:
        vi = view.value_info[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        specs.append(InputSpec(name, tensor_shape(vi) or (), dtype))
    return specs


def open_data(data, m) -> Dataset:
    ds = data if isinstance(data, Dataset) else Dataset(data)
    check_against_model(ds, model_inputs(m))
    return ds


def plan(model: str | Path, table: CalibrationTable | str | Path | None = None,
         options: QuantizeOptions = QuantizeOptions(), method: str | None = None) -> Plan:
    """The quantization plan. Without a table (static mode): decisions only; with
    a table, or in dynamic mode, resolved: every scale, zero point and kernel."""
    from dataclasses import replace
    from .planner import analyse, plan as make_plan
    if table is not None and not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    if "auto" in options.algorithms and table is None:  # without statistics: what needs none
        options = replace(options, algorithms=tuple(a for a in with_algorithms(model, options, None, None)[0].algorithms
                                                    if a != "smoothquant"))
    options, table = with_algorithms(model, options, None, table)
    p = prepare(model, options.preprocess, options.algorithms, table.smoothquant if table is not None else None)
    if table is None and options.mode == "static":
        from .subgraphs import body_plans
        facts, notes = analyse(p.model, options)
        return _tie(replace(make_plan(facts, p.notes + notes), subgraphs=body_plans(p.model, options)), p, options)
    return _resolved_plan(p, options, table and _load_table(table, p, options), method)


def _tie(the_plan: Plan, p: Prepared, options: QuantizeOptions) -> Plan:
    """Bind a plan to the model file and pre-processing it was made for."""
    from dataclasses import replace
    smoothed = {}
    if p.smoothing is not None:
        smoothed = dict(smoothquant=p.smoothing.to_dict(), applied={**the_plan.applied,
                                                                   "smoothquant": p.smoothing.applied()})
    return replace(the_plan, model_sha256=p.sha256, preprocess=options.preprocess, algorithms=options.algorithms,
                   **smoothed)


def _resolved_plan(p: Prepared, options: QuantizeOptions, table: CalibrationTable | None,
                   method: str | None, facts=None) -> Plan:
    """Plan (with calibrated ranges for the range-dependent rules) and resolve."""
    from dataclasses import replace
    from .planner import analyse, plan as make_plan
    from .resolve import resolve
    ranges = TableRanges(table, method) if table is not None else TableRanges.empty()
    if facts is None:
        facts, notes = analyse(p.model, options, ranges.base)
    else:
        facts, notes = replace(facts[0], ranges=ranges.base), facts[1]
    from .subgraphs import body_plans
    decided = make_plan(facts, p.notes + notes)
    resolved = replace(resolve(decided, facts.view, ranges), subgraphs=body_plans(p.model, options, ranges))
    if ranges.method == "auto":
        from .calib.auto import explain_choices
        resolved = explain_choices(resolved, table)
    return _tie(resolved, p, options)


def _load_table(table, p: Prepared, options: QuantizeOptions) -> CalibrationTable:
    if not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    if table.model_sha256 != p.sha256:
        raise TableError("calibration table was made for another model (sha256 differs); calibrate this model again")
    if table.params.get("preprocess", True) != options.preprocess:
        raise TableError("calibration table was made with pre-processing "
                         f"{'on' if table.params.get('preprocess', True) else 'off'}; quantize the same way "
                         "(--no-preprocess must match) or calibrate again")
    from .algorithms import model_algorithms
    made, wanted = tuple(table.params.get("algorithms", ())), model_algorithms(options.algorithms)
    if made != wanted:
        raise TableError(f"calibration table was made with --algorithms {','.join(made) or 'none'}, which change the "
                         f"weights; quantize with the same (not {','.join(wanted) or 'none'}) or "
                         "calibrate again")
    return table


def table_ranges(table: CalibrationTable, method: str | None = None) -> dict[str, tuple[float, float]]:
    """Ranges from the table, or re-derived from its histograms for another method."""
    if method is None or method == table.method:
        return table.ranges()
    from .calib.methods import derive_range
    return {name: derive_range(stats, method, table.params) for name, stats in table.tensors.items()}


class TableRanges:
    """A table's activation ranges for the resolve step: ``(name, precision) -> (lo, hi)``.
    8-bit tensors take the method's range; wider ones re-derive it for their grid
    (see :func:`qtool.calib.methods.derive_range`)."""

    def __init__(self, table: CalibrationTable | None, method: str | None):
        self.table = table
        self.method = method or (table.method if table is not None else None)
        self.base = table_ranges(table, method) if table is not None else {}

    @classmethod
    def empty(cls) -> "TableRanges":
        return cls(None, None)

    def __call__(self, name: str, precision) -> tuple[float, float]:
        if precision.bits <= 8 or self.method not in ("mse", "entropy", "auto"):
            return self.base[name]
        from .calib.methods import derive_range
        return derive_range(self.table.tensors[name], self.method, self.table.params, precision.bits)


def calibrate(model: str | Path, data, options: CalibrateOptions = CalibrateOptions(),
              quantize_options: QuantizeOptions = QuantizeOptions(),
              on_batch: Callable[[int], None] | None = None, threads: int | None = None) -> CalibrationTable:
    """Stream ``data`` through the model and reduce the tensors the planner will quantize.

    Besides the tensors of this plan, the inputs of every node that a rule could
    quantize are collected, so that a later ``--exclude`` (which can turn a
    shared tensor into one with its own range) works from the same table.
    """
    quantize_options, _ = with_algorithms(model, quantize_options, data, None)
    p = prepare(model, quantize_options.preprocess, quantize_options.algorithms,
                measure=smoothing_measure(data, options, quantize_options, threads))
    return _calibrate_prepared(p, data, options, quantize_options, on_batch, threads)


def smoothing_measure(data, options: CalibrateOptions, quantize_options: QuantizeOptions,
                      threads: int | None = None):
    """SmoothQuant's pass 1 for :func:`prepare`: stream ``data`` through the model as it stands
    before smoothing and choose each layer's alpha on the integer grids ``quantize_options`` give
    (qtool.algorithms.smoothquant.calibrate)."""
    def measure(m):
        from .algorithms.smoothquant import Grids, calibrate as smoothquant_pass
        from .calib.collect import collect
        ds = open_data(data, m)
        size = _batch_size(m, options.batch_size)
        return smoothquant_pass(m, lambda model, names, make: collect(
            model, names, ds.batches(size, options.limit), make, None, threads)[0],
            Grids.for_options(quantize_options))
    return measure


def with_algorithms(model, options: QuantizeOptions, data, table) -> tuple[QuantizeOptions, CalibrationTable | None]:
    """``--algorithms auto`` made concrete for this call (qtool.algorithms.choose): a given table
    (loaded here) fixes the model algorithms, data allows the weight ones, the model's ops say
    whether it is a transformer. Other lists pass as given."""
    from dataclasses import replace
    from .algorithms import AUTO, choose, is_transformer
    if AUTO not in options.algorithms:
        return options, table
    if table is not None and not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    made = tuple(table.params.get("algorithms", ())) if table is not None else None
    transformer = made is None and is_transformer(model_io.load(model, load_external=False).graph)
    return replace(options, algorithms=choose(options, data=data is not None, table_algorithms=made,
                                              transformer=transformer)), table


def _prepare_for(model, options: QuantizeOptions, table, data, calibrate_options: CalibrateOptions,
                 threads: int | None = None) -> tuple[Prepared, CalibrationTable | None]:
    """:func:`prepare` for quantize: a table (loaded here) brings its SmoothQuant record; data, the
    pass that measures one."""
    if table is not None and not isinstance(table, CalibrationTable):
        table = CalibrationTable.load(table)
    if "smoothquant" in options.algorithms and (options.mode != "static" or options.recipe != "int8"):
        raise QtoolError("--algorithms smoothquant smooths the activations of static int8 MatMul/Gemm: not for "
                         f"--mode {options.mode} / --weights {options.recipe}")
    measure = smoothing_measure(data, calibrate_options, options, threads) if data is not None and table is None \
        else None
    return prepare(model, options.preprocess, options.algorithms, table.smoothquant if table is not None else None,
                   measure), table


def _calibrate_prepared(p: Prepared, data, options: CalibrateOptions, quantize_options: QuantizeOptions,
                        on_batch: Callable[[int], None] | None = None, threads: int | None = None,
                        facts=None) -> CalibrationTable:
    """:func:`calibrate` on a model already loaded, pre-processed and (``facts``) analysed."""
    from .calib.collect import collect
    from .calib.methods import finish
    from .calib.observers import make_observer
    from .planner import analyse, calibration_tensors
    from .subgraphs import calibration_plan, expose
    ds = open_data(data, p.model)
    facts = (facts or analyse(p.model, quantize_options))[0]
    tensors = calibration_tensors(facts)
    outer, inner = calibration_plan(p.model, quantize_options, facts.view)
    tensors += [t for t in outer if t not in tensors]
    run_model, fetch = expose(p.model, inner)
    tensors += [t for t in fetch if t not in tensors]
    batch_size = _batch_size(p.model, options.batch_size)
    from .calib.channels import ChannelObserver, channel_axes
    axes = channel_axes(facts.view)

    def observer(name):
        return ChannelObserver(make_observer(options), axes[name]) if name in axes else make_observer(options)

    def run(m, names, exposed):
        return collect(m, names, ds.batches(batch_size, options.limit), observer, on_batch, threads, exposed)
    try:
        observers, samples, batches, run_notes = run(run_model, tensors, fetch)
    except ModelError as exc:
        if not fetch:
            raise
        # e.g. a Loop whose carried tensor grows: its stacked scan outputs differ in shape per iteration
        observers, samples, batches, run_notes = run(p.model, [t for t in tensors if t not in fetch], {})
        run_notes += (f"the model fails with its subgraphs' tensors exposed as outputs ({str(exc)[:200]}): "
                      "calibrated without them, so the nodes inside its subgraphs stay float",)
    stats = {name: finish(obs, options) for name, obs in observers.items()}
    if options.method == "auto":
        from .calib.auto import choose
        size = 1 if any(n.startswith("the model fails on batches") for n in run_notes) else \
            _batch_size(p.model, min(batch_size, 8))
        stats, more = choose(p.model, stats, facts, _method_params(options),
                             lambda: ds.batches(size, options.auto_samples), threads)
        run_notes += more
    params = dict(_method_params(options), preprocess=quantize_options.preprocess)
    from .algorithms import model_algorithms
    if model_algorithms(quantize_options.algorithms):  # weight algorithms run after resolve: no table depends on them
        params["algorithms"] = list(model_algorithms(quantize_options.algorithms))
    return CalibrationTable(p.sha256, options.method, params, samples, batches, stats,
                            __version__, notes=p.notes + run_notes,
                            smoothquant=p.smoothing.to_dict() if p.smoothing is not None else None)


def _method_params(o: CalibrateOptions) -> dict:
    params = {"symmetric": o.symmetric, "batch_size": o.batch_size}
    if o.method == "minmax":
        params.update(moving_average=o.moving_average, averaging_constant=o.averaging_constant)
    else:
        params.update(bins=o.bins, percentile=o.percentile)
    if o.method == "auto":
        params.update(auto_samples=o.auto_samples)
    return params


def _batch_size(m, wanted: int) -> int:
    """A model with a fixed batch dimension gets batches of exactly that size."""
    for spec in model_inputs(m):
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
            return spec.shape[0]
    return wanted


@dataclass(frozen=True)
class QuantizeResult:
    output: Path
    plan: Plan
    table: CalibrationTable | None
    notes: tuple[str, ...]


def quantize(model: str | Path, output: str | Path, table: CalibrationTable | str | Path | None = None,
             data=None, options: QuantizeOptions = QuantizeOptions(),
             calibrate_options: CalibrateOptions = CalibrateOptions(), method: str | None = None,
             on_batch: Callable[[int], None] | None = None, plan: Plan | str | Path | None = None) -> QuantizeResult:
    """Quantize: plan, resolve, rewrite (QDQ, QOperator or dynamic), check, save atomically.

    Static mode needs a calibration ``table`` or ``data`` to calibrate on;
    dynamic mode needs neither. ``plan``: apply a saved (possibly hand-edited)
    resolved plan instead; it must belong to ``model`` and be self-consistent.
    """
    from .check import check_quantized
    out = model_io.check_output_path(output, model)
    if plan is not None:
        the_plan, p = _saved_plan(model, plan)
        if options.algorithms and tuple(options.algorithms) != the_plan.algorithms:
            from .errors import PlanError
            raise PlanError(f"the plan was made with --algorithms {','.join(the_plan.algorithms) or 'none'}, "
                            f"not {','.join(options.algorithms)}: the plan carries them, drop the option")
    else:
        options, table = with_algorithms(model, options, data, table)
        the_plan, p, table = _plan_for(model, table, data, options, calibrate_options, method, on_batch)
    result = _apply(the_plan, p.model)
    if p.half is not None:
        from .preprocess.half import restore_storage
        result, _ = restore_storage(result, p.half)
    if model_io.by_path(result):  # weights still on disk, or over 2 GiB: written first, checked by path
        model_io.save(result, out, external_data=options.external_data,
                      check=lambda path: check_quantized(result, path))
    else:
        check_quantized(result)
        model_io.save(result, out, external_data=options.external_data)
    return QuantizeResult(out, the_plan, table if the_plan.mode == "static" else None, p.notes)


def _apply(the_plan: Plan, model):
    """Rewrite each subgraph with its own plan, then the main graph."""
    from .rewrite import half_nodes
    rewriter = _rewriter(the_plan)

    def changes(sub: Plan) -> bool:
        return bool(sub.quantized_nodes() or half_nodes.half_nodes(sub))
    if any(changes(sub) for sub in the_plan.subgraphs.values()):
        import onnx
        from .subgraphs import all_names, bodies, lift, put_back
        m = onnx.ModelProto()
        m.CopyFrom(model)
        used = all_names(m)
        planned = [(b, the_plan.subgraphs[b.key]) for b in bodies(model)
                   if b.key in the_plan.subgraphs and changes(the_plan.subgraphs[b.key])]
        lifted = {b.key: lift(model, b) for b, _ in planned}  # all from the model the plans were made on
        for b, sub in planned:
            put_back(m, b, half_nodes.apply(rewriter.apply(lifted[b.key], sub), sub), used)
        model = m
    return half_nodes.apply(rewriter.apply(model, the_plan), the_plan)


def _plan_for(model, table, data, options: QuantizeOptions, calibrate_options: CalibrateOptions, method,
              on_batch) -> tuple[Plan, Prepared, CalibrationTable | None]:
    """Prepare and analyse once; calibrate when asked; plan and resolve."""
    from .planner import analyse
    if options.mode == "dynamic" and (table is not None or data is not None):
        raise QtoolError("--mode dynamic quantizes activations at run time and uses no calibration: "
                         "drop --table/--data, or quantize in static mode")
    _check_weight_algorithms(options, data)
    p, table = _prepare_for(model, options, table, data, calibrate_options)
    if options.recipe != "int8":
        return _float_recipe_plan(p, table, data, options, calibrate_options), p, None
    facts = analyse(p.model, options)
    if options.mode == "dynamic":
        the_plan = _resolved_plan(p, options, None, None, facts)
        if not any(n.kernel for n in the_plan.all_quantized_nodes()):
            raise QtoolError("--mode dynamic found nothing to quantize (it quantizes MatMul/Gemm weights and "
                             "embedding tables; none here qualifies, see --explain reasons via static mode): "
                             "quantize in static mode (--table or --data)")
        return the_plan, p, None
    if table is None and data is None:
        raise QtoolError("static quantization needs a calibration table (--table) or data (--data); "
                         "or use --mode dynamic")
    if table is None:
        table = _calibrate_prepared(p, data, calibrate_options, options, on_batch, facts=facts)
    table = _load_table(table, p, options)
    the_plan = _resolved_plan(p, options, table, method, facts)
    if options.dynamic:  # before the weight algorithms: a dynamic node's weight is laid out anew
        from dataclasses import replace
        from .mixed import choose
        the_plan = choose(the_plan, p.model, options.dynamic, lambda nodes: _resolved_plan(
            p, options, table, method, (replace(facts[0], dynamic=nodes), facts[1])), data is not None and (
            lambda: open_data(data, p.model).batches(_batch_size(p.model, calibrate_options.batch_size))) or None)
    if data is not None:
        from .algorithms.weights import apply as weight_algorithms
        the_plan = weight_algorithms(the_plan, p.model, open_data(data, p.model),
                                     _batch_size(p.model, calibrate_options.batch_size), calibrate_options.limit,
                                     options.algorithms)
    if not the_plan.all_quantized_nodes() and not any(n.precision is Precision.FP16 for n in the_plan.all_nodes()):
        reasons = dict.fromkeys(f"{n.op_type}: {n.reason}" for n in the_plan.all_nodes())
        raise QtoolError("nothing to quantize, every node stays float (" + "; ".join(list(reasons)[:3])
                         + ("; ..." if len(reasons) > 3 else "") + ")")
    return the_plan, p, table


def _check_weight_algorithms(options: QuantizeOptions, data) -> None:
    """The weight algorithms (rounding, bias_correction) treat static int8 plans, on calibration data."""
    from .algorithms import weight_algorithms
    names = weight_algorithms(options.algorithms)
    if not names:
        return
    if options.recipe != "int8" or options.mode != "static":
        raise QtoolError(f"--algorithms {','.join(names)} treat static int8 weights, not --mode {options.mode} / "
                         f"--weights {options.recipe}")
    if data is None:
        from .algorithms.weights import needs_data_error
        raise needs_data_error(names)


def _float_recipe_plan(p: Prepared, table, data, options: QuantizeOptions,
                       calibrate_options: CalibrateOptions) -> Plan:
    """--weights int4 (weight-only block-wise MatMulNBits) and/or fp16: no activation ranges; data
    only for what measures (gptq's activations, fp16's keep list)."""
    if table is not None:
        raise QtoolError(f"--weights {options.recipe} uses no activation ranges: a calibration table cannot serve "
                         "it (give --data for " + ("gptq's activations" if options.recipe == "int4" else
                                                   "the measured fp32 keep list") + ", or neither)")
    ds = open_data(data, p.model) if data is not None else None
    the_plan = None
    if options.recipe == "int4":
        from .weight_only import plan_int4
        the_plan = plan_int4(p, options, ds, calibrate_options)
    if options.recipe == "fp16" or options.target == "cuda":
        from .half_model import plan_half
        the_plan = plan_half(p, options, the_plan, ds, calibrate_options)
    return _tie(the_plan, p, options)


def _saved_plan(model, plan) -> tuple[Plan, Prepared]:
    from .plan_check import check_plan, load_plan
    saved = plan if isinstance(plan, Plan) else load_plan(plan)
    p = prepare(model, saved.preprocess, saved.algorithms, saved.smoothquant)
    check_plan(saved, p)
    return saved, p


class _FloatOnly:
    """The rewriter of a plan that quantizes nothing (fp16 only: half_nodes does it all)."""

    @staticmethod
    def apply(model, the_plan: Plan):
        return model


def _rewriter(the_plan: Plan):
    from .rewrite import dynamic, qdq, qoperator
    from .resolve import runs_dynamic
    if the_plan.mode == "dynamic" or any(runs_dynamic(n, the_plan) for n in the_plan.nodes):
        return dynamic  # a static plan with --dynamic nodes: the QDQ rewrite, then the dynamic kernels
    if the_plan.mode == "weight-only":
        from .rewrite import nbits
        return nbits
    if the_plan.mode == "fp16":
        return _FloatOnly
    return qoperator if the_plan.format == "qoperator" else qdq


def evaluate(reference: str | Path, candidate: str | Path, data, labels: str | Path | None = None,
             options: EvalOptions = EvalOptions(), limit: int | None = None):
    """Run both models on the same data; metrics, sizes and latency side by side, then gates."""
    from .evaluation import Thresholds, judge
    from .comparison import run_pair
    # onnx parses each model once (without its weights: only inputs and sizes are read here);
    # onnxruntime reads the files itself
    ref = model_io.load(reference, load_external=False)
    cand = model_io.load(candidate, load_external=False)
    ds = open_data(data, ref)
    check_against_model(ds, model_inputs(cand), float_cast=True)
    label_array = _labels(ds, labels, limit)
    # gates that cannot be judged fail before any inference (judge would refuse them after it)
    if options.max_drop is not None and label_array is None:
        raise QtoolError("--max-drop cannot be checked: no accuracy: it needs labels (a 'labels' array in the "
                         "data or --labels)")
    if options.max_task_drop is not None and not options.task:
        raise QtoolError("--max-task-drop cannot be checked: no task metric: it needs a task file (--task)")
    task = None
    if options.task:
        from .task import load_task
        task = load_task(options.task)
    report = run_pair(reference, candidate, ds, label_array, options, limit,
                      _size_on_disk(reference, ref), _size_on_disk(candidate, cand), task,
                      labels_given=labels is not None)
    return judge(report, Thresholds.from_options(options))


def _labels(ds: Dataset, labels, limit) -> np.ndarray | None:
    if labels is None:
        return ds.labels(limit)
    try:
        arr = np.load(labels, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{labels}: cannot read labels ({exc})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr = arr["labels"] if "labels" in arr else arr[arr.files[0]]
    n = ds.num_samples if limit is None else min(limit, ds.num_samples)
    if arr.ndim != 1 or len(arr) < n:
        raise DataError(f"{labels}: expected 1-D labels for {n} samples, got shape {list(arr.shape)}")
    from .data import integer_labels
    return integer_labels(arr[:n], f"{labels}")
