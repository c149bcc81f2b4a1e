"""The command line: parse, call qtool's API, print. The only place that exits.

Exit codes: 0 success, 1 an eval gate failed, 2 bad input or unsupported model,
3 an unexpected internal error (set QTOOL_DEBUG=1 for the traceback).
Heavy imports (numpy, onnx, onnxruntime) happen inside the commands so that
``--help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

METHODS = ["minmax", "entropy", "percentile", "mse", "auto"]


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn QtoolError into one line and exit 2; anything else into exit 3."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import QtoolError
        try:
            return fn(*args, **kwargs)
        except QtoolError as exc:
            _fail(str(exc).replace("\n", " "), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size", 2)
        except Exception as exc:  # a bug: still one line, traceback on request
            if os.environ.get("QTOOL_DEBUG"):
                raise
            text = str(exc).strip().splitlines()
            _fail(f"internal error: {type(exc).__name__}: {(text[0] if text else '')[:300]} "
                  "(set QTOOL_DEBUG=1 for a traceback)", 3)
    return wrapper


def _existing(path_type="file"):
    return click.Path(exists=False, dir_okay=(path_type != "file"), file_okay=True)


def _algorithms(value: str | None) -> tuple[str, ...] | None:
    """--algorithms LIST: comma-separated names, "none" for none (None: not given)."""
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    return () if names in ((), ("none",)) else names


def _preset(path):
    from .config import Preset, load_preset
    return load_preset(path) if path else Preset()


def _progress(total: int, desc: str):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, disable=None, leave=False)
    return bar


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds through the atomic writes, which remove their temporary files


def _given(pairs) -> list[str]:
    """The flags of ``(flag, value)`` pairs that were given (value neither None nor empty)."""
    return [flag for flag, value in pairs if value not in (None, ())]


def gate_options(fn):
    """The gates ``eval`` checks and the accuracy search of ``quantize`` must meet."""
    for option in reversed([
        click.option("--max-drop", type=float, default=None, help="Fail if accuracy drops more (0.003 = 0.3 points)."),
        click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
                     help="Fail below this top-1 agreement."),
        click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None,
                     help="Fail below this cosine similarity."),
        click.option("--min-snr", type=float, default=None, metavar="DB", help="Fail if any output's SNR is below DB."),
        click.option("--min-speedup", type=click.FloatRange(0, min_open=True), default=None, metavar="X",
                     help="Fail if the median per-pair speedup (reference ms / candidate ms) is below X."),
        click.option("--task", type=click.Path(),
                     help="Task-metric file (reduce/score or compare hooks; see qtool/task.py)."),
        click.option("--max-task-drop", type=float, default=None, help="Fail if the task metric drops more."),
    ]):
        fn = option(fn)
    return fn


TARGET_HELP = ("Where the model will run: cpu (onnxruntime's CPU EP, default), cuda (its CUDA EP: int8 QDQ is "
               "fake-quantized there, fp16 and int4 weights are the fast paths), trt (its TensorRT EP: int8 Q/DQ "
               "placed the way TensorRT builds its engine).")


def target_option(fn):
    return click.option("--target", type=click.Choice(["cpu", "cuda", "trt"]), default=None, help=TARGET_HELP)(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qtool", message="qtool %(version)s")
def main():
    """Post-training int8 quantization of ONNX models, checked on onnxruntime."""
    import signal
    signal.signal(signal.SIGTERM, _terminate)


@main.command()
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME:1x3x224x224",
              help="Concrete shape of an input for MAC counts (dynamic dims default to 1).")
@target_option
@handle_errors
def inspect(model, as_json, shapes, target):
    """Inputs, opsets, parameters, size, MACs and what can be quantized; with --target, what that EP
    would run for each node (integer kernel, float between Q/DQ, MatMulNBits) and what to choose."""
    from . import api
    from .inspection import format_report
    report = api.inspect(model, _parse_shapes(shapes), target)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else format_report(report))


def _parse_shapes(values) -> dict:
    from .errors import QtoolError
    shapes = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
            if not sep or not name or any(d < 1 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise QtoolError(f"--shape {value!r}: expected NAME:DIMxDIM..., e.g. input:1x3x224x224") from None
    return shapes


@main.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("--data", type=click.Path(), help="An .npz file or a directory of .npz files.")
@click.option("-o", "--output", type=click.Path(), required=True, help="Calibration table to write (JSON).")
@click.option("--method", type=click.Choice(METHODS), default=None, help="Range method (default minmax).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N samples.")
@click.option("--bins", type=click.IntRange(min=16), default=None, help="Histogram bins (default 2048).")
@click.option("--percentile", type=click.FloatRange(50, 100, min_open=True), default=None,
              help="Kept mass for --method percentile (default 99.999).")
@click.option("--symmetric/--asymmetric", default=None, help="Range symmetric around zero.")
@click.option("--moving-average", is_flag=True, default=None, help="minmax: average per-batch extremes.")
@click.option("--auto-samples", type=click.IntRange(min=1), default=None,
              help="auto: samples its output-error measurement runs on (default 16; time grows with it).")
@click.option("--preprocess/--no-preprocess", default=None, help="Must match the later quantize (default on).")
@click.option("--algorithms", default=None, metavar="LIST",
              help="cle, smoothquant (they change the model the table describes), auto, or none (default); the "
                   "later quantize must give the same, or auto.")
@click.option("--merge", "merge", multiple=True, type=click.Path(), help="Merge tables of data shards instead.")
@click.option("--config", "preset", type=click.Path(), help="TOML preset (its [calibrate] table).")
@handle_errors
def calibrate(model, data, output, method, batch_size, limit, bins, percentile, symmetric,
              moving_average, auto_samples, preprocess, algorithms, merge, preset):
    """Collect per-tensor statistics into a reusable calibration table."""
    from . import api
    from .config import override
    from .errors import QtoolError
    from .model import check_output_path
    if merge:
        return _merge(merge, model, output)
    if model is None or data is None:
        raise QtoolError("calibrate needs MODEL and --data (or --merge A.json B.json ...)")
    check_output_path(output, model, data)
    opts = override(_preset(preset).calibrate, method=method, batch_size=batch_size, limit=limit, bins=bins,
                    percentile=percentile, symmetric=symmetric, moving_average=moving_average,
                    auto_samples=auto_samples)
    ds = api.Dataset(data)
    total = ds.num_samples if opts.limit is None else min(opts.limit, ds.num_samples)
    with _progress(total, "calibrate") as bar:
        qopts = override(_preset(preset).quantize, preprocess=preprocess, algorithms=_algorithms(algorithms))
        table = api.calibrate(model, ds, opts, qopts, on_batch=bar.update)
    table.save(output)
    click.echo(f"wrote {output}: {len(table.tensors)} tensors, {table.samples} samples, method {table.method}")


def _merge(paths, model, output):
    from .calib.merge import merge_tables
    from .calib.table import CalibrationTable
    from .model import check_output_path
    inputs = list(paths) + ([model] if model else [])
    check_output_path(output, *inputs)
    merged = merge_tables([CalibrationTable.load(p) for p in inputs])
    merged.save(output)
    click.echo(f"wrote {output}: merged {len(inputs)} tables, {merged.samples} samples")


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="Quantized model to write.")
@click.option("--table", type=click.Path(), help="Calibration table from `qtool calibrate`.")
@click.option("--data", type=click.Path(), help="Calibrate on this data first (minmax unless --method).")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="Range method; with --table, derived from its histograms.")
@click.option("--mode", type=click.Choice(["static", "dynamic"]), default=None,
              help="static: activation ranges from calibration (default); dynamic: int8 weights, activations "
                   "quantized at run time, no data needed.")
@click.option("--format", "fmt", type=click.Choice(["qdq", "qoperator"]), default=None,
              help="qdq: Q/DQ pairs around float ops (default); qoperator: QLinearConv, QLinearMatMul, ...")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to OUT.onnx.data (default: only above 2 GB).")
@click.option("--per-channel/--per-tensor", default=None, help="Weight scales per output channel (default).")
@click.option("--activation-type", type=click.Choice(["int8", "uint8"]), default=None)
@click.option("--weight-type", type=click.Choice(["auto", "int8", "uint8"]), default=None,
              help="Symmetric weights. auto (default): int8; on x86-64 CPUs without VNNI, whose u8 x s8 kernels "
                   "saturate, uint8 for Conv and 7-bit int8 for MatMul/Gemm. int8 there means a 7-bit grid (faster, "
                   "less accurate), uint8 exact u8 x u8 kernels (slower).")
@click.option("--precision", "precision", multiple=True, metavar="NAME_OR_OPTYPE=P",
              help="Per-node precision: fp32 (kept float, reading float inputs), fp16 (kept float, run in half "
                   "precision between Casts), int8, uint8, int16 or uint16 (16-bit activations, QDQ only). A node "
                   "name beats an op type.")
@click.option("--exclude", multiple=True, metavar="NAME_OR_OPTYPE", help="Keep these nodes or op types float "
              "(same as --precision NAME=fp32).")
@click.option("--plan", "plan_path", type=click.Path(),
              help="Apply a saved (possibly hand-edited) plan from --save-plan: no table or data needed.")
@click.option("--preprocess/--no-preprocess", default=None,
              help="Constant folding, BatchNorm/Pad folding before planning (default on).")
@click.option("--explain", is_flag=True, help="Print the plan: node, decision, reason.")
@click.option("--save-plan", type=click.Path(), help="Also write the plan as JSON.")
@click.option("--config", "preset", type=click.Path(), help="TOML preset ([quantize] and [calibrate]).")
@target_option
@click.option("--weights", type=click.Choice(["int8", "int4", "fp16"]), default=None,
              help="The recipe. int8: integer kernels (default on cpu and trt); int4: weight-only block-wise 4-bit "
                   "MatMul weights (MatMulNBits) and embedding tables, activations float (fp16 on cuda); fp16: the "
                   "model in half precision, ops that need fp32 kept fp32 (default on cuda).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None,
              help="int4: weights per scale along K (default 32).")
@click.option("--int4-method", type=click.Choice(["rtn", "hqq", "gptq"]), default=None,
              help="int4 rounding: rtn (nearest), hqq (error-minimising, no data), gptq (error-minimising on the "
                   "calibration data, needs --data). Default: gptq with --data, rtn without.")
@click.option("--int4-symmetric/--int4-asymmetric", default=None,
              help="int4: zero point fixed at 8, or one per block (default asymmetric).")
@click.option("--keep-fp32", multiple=True, metavar="NAME_OR_OPTYPE",
              help="fp16: keep these nodes or op types in fp32 (besides those kept by rule or measurement).")
@click.option("--keep-io-types", type=bool, default=None, metavar="true|false",
              help="fp16: keep the model's inputs and outputs fp32 (default true).")
@click.option("--algorithms", default=None, metavar="LIST",
              help="Comma-separated accuracy algorithms: cle (cross-layer equalisation of Conv->Relu->Conv chains) "
                   "and smoothquant (activation outliers of MatMul/Gemm inputs moved into the weights), on the fp32 "
                   "model before calibration; rounding (GPTQ weight codes) and bias_correction (the mean shift of "
                   "quantized weights taken off the bias), on the resolved plan, need --data; auto (those that apply, "
                   "each kept only where it measured a gain: see the plan's 'applied'); none (default).")
@click.option("--dynamic", "dynamic", default=None, metavar="auto|LIST",
              help="Static int8 with some MatMul/Gemm quantized at run time (DynamicQuantizeMatMul): auto (those "
                   "whose output error on the --data is lower that way, by >= 1 dB) or node names / op types.")
@click.option("--eval-data", type=click.Path(),
              help="Search: evaluate candidates on this data against fp32 and fall back the most sensitive nodes "
                   "until the gates hold (exit 1, nothing written, if they cannot).")
@click.option("--labels", type=click.Path(), help="Search: integer labels (.npy) for --max-drop.")
@gate_options
@click.option("--fallback", type=click.Choice(["fp32", "fp16", "int16"]), default=None,
              help="Search: the precision sensitive nodes fall back to (default fp32; fp16 casts around the node, "
                   "the fast float path on GPUs, through Casts on the CPU EP; int16: 16-bit QDQ activations).")
@click.option("--best-effort", is_flag=True, help="Search: write the best model found even if a gate fails.")
@click.option("--speed/--no-speed", default=None,
              help="Search: time candidates against fp32 and keep float the int8 groups onnxruntime's profile "
                   "measures slower than float (default on).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Search: intra-op threads for evaluation and timing (default 2).")
@click.option("--max-evals", type=click.IntRange(min=2), default=None,
              help="Search: evaluation budget (default 2*log2(N)+10 for N ranked nodes).")
@click.option("--trail", "trail_path", type=click.Path(), help="Search: write the trail and ranking as JSON.")
@handle_errors
def quantize(model, output, table, data, method, mode, fmt, external_data, per_channel, activation_type, weight_type,
             precision, exclude, plan_path, preprocess, explain, save_plan, preset, target, weights, block_size,
             int4_method, int4_symmetric, keep_fp32, keep_io_types, algorithms, dynamic, eval_data, labels, max_drop,
             min_agreement, min_cosine, min_snr, min_speedup, task, max_task_drop, fallback, best_effort, speed,
             threads, max_evals, trail_path):
    """Quantize for a target: int8 (static QDQ or QOperator, or dynamic), int4 weights, fp16; or apply a saved plan."""
    from . import api
    from .config import override
    from .errors import QtoolError
    from .model import atomic_write_text, check_output_path
    if table and data:
        raise QtoolError("give either --table or --data, not both")
    if plan_path:
        given = _given((("--table", table), ("--data", data), ("--method", method), ("--mode", mode),
                        ("--format", fmt), ("--per-channel", per_channel), ("--activation-type", activation_type),
                        ("--weight-type", weight_type), ("--precision", precision), ("--exclude", exclude),
                        ("--preprocess", preprocess), ("--target", target), ("--weights", weights),
                        ("--block-size", block_size), ("--int4-method", int4_method),
                        ("--int4-symmetric", int4_symmetric), ("--keep-fp32", keep_fp32),
                        ("--keep-io-types", keep_io_types), ("--algorithms", algorithms), ("--dynamic", dynamic)))
        if given:
            raise QtoolError(f"--plan carries every decision; {given[0]} cannot be combined with it")
    check_output_path(output, model, table, data, plan_path)
    if save_plan:
        check_output_path(save_plan, model, table, data, plan_path, output)
    cfg = _preset(preset)
    qopts = override(cfg.quantize, mode=mode, format=fmt, external_data=external_data, per_channel=per_channel,
                     activation_type=activation_type, weight_type=weight_type, preprocess=preprocess,
                     precision=tuple(cfg.quantize.precision) + tuple(precision) if precision else None,
                     exclude=tuple(cfg.quantize.exclude) + tuple(exclude) if exclude else None,
                     target=target, weights=weights, block_size=int(block_size) if block_size else None,
                     int4_method=int4_method, int4_symmetric=int4_symmetric,
                     keep_fp32=tuple(cfg.quantize.keep_fp32) + tuple(keep_fp32) if keep_fp32 else None,
                     keep_io_types=keep_io_types, algorithms=_algorithms(algorithms),
                     dynamic=tuple(k.strip() for k in dynamic.split(",") if k.strip()) if dynamic else None)
    _check_recipe_flags(qopts, per_channel, block_size, int4_method, int4_symmetric, keep_fp32, keep_io_types,
                        activation_type, weight_type, method)
    copts = override(cfg.calibrate, method=method)
    gates = dict(max_drop=max_drop, min_agreement=min_agreement, min_cosine=min_cosine, min_snr=min_snr,
                 min_speedup=min_speedup, max_task_drop=max_task_drop)
    if eval_data or any(v is not None for v in gates.values()) or task:
        check_output_path(output, model, table, data, plan_path, eval_data, labels)
        qopts, table = api.with_algorithms(model, qopts, data, table)
        return _search(model, output, table, data, method, qopts, copts, eval_data, labels, task, gates, fallback,
                       best_effort, speed, threads, max_evals, trail_path, plan_path, explain, save_plan)
    stray = _given((("--labels", labels), ("--fallback", fallback), ("--best-effort", best_effort or None),
                    ("--speed/--no-speed", speed), ("--threads", threads), ("--max-evals", max_evals),
                    ("--trail", trail_path)))
    if stray:
        raise QtoolError(f"{stray[0]} applies to the accuracy search: give --eval-data and a gate, or drop it")
    bar = None
    if data:
        ds = api.Dataset(data)
        bar = _progress(ds.num_samples if copts.limit is None else min(copts.limit, ds.num_samples), "calibrate")
        data = ds
    try:
        result = api.quantize(model, output, table=table, data=data, options=qopts, calibrate_options=copts,
                              method=method if table else None, on_batch=bar.update if bar else None,
                              plan=plan_path)
    finally:
        if bar:
            bar.close()
    if qopts.target == "cuda" and qopts.recipe == "int8":
        click.echo("warning: --target cuda with int8: onnxruntime's CUDA EP has no integer Conv/MatMul kernels, so "
                   "int8 Q/DQ runs as float between real Q/DQ kernels (slower than fp32); --weights fp16 or int4 are "
                   "the fast paths there, --target trt for int8", err=True)
    if explain:
        click.echo(result.plan.explain())
    if save_plan:
        atomic_write_text(save_plan, result.plan.to_json())
    click.echo(f"wrote {output}: {_summary(result.plan)}")


def _summary(plan) -> str:
    """'9 of 10 nodes quantized', or for the float recipes what they made of the nodes."""
    from .types import Precision
    nodes = plan.all_nodes()
    int4 = sum(1 for n in nodes if n.kernel in ("MatMulNBits", "GatherBlockQuantized") and n.precision.bits == 4)
    half = sum(1 for n in nodes if n.precision is Precision.FP16)
    other = sum(1 for n in nodes if n.quantized) - int4
    if not (int4 or half):
        return f"{other} of {len(nodes)} nodes quantized"
    parts = [f"{k} {what}" for k, what in ((other, "quantized"), (int4, "with int4 weights"), (half, "in fp16")) if k]
    return (f"{', '.join(parts)}, of {len(nodes)} nodes"
            + (" (inputs and outputs fp16)" if getattr(plan, "io_fp16", False) else ""))


def _check_recipe_flags(qopts, per_channel, block_size, int4_method, int4_symmetric, keep_fp32, keep_io_types,
                        activation_type, weight_type, method) -> None:
    """Refuse flags the chosen recipe would silently ignore."""
    from .errors import QtoolError
    recipe = qopts.recipe
    half = recipe == "fp16" or (recipe == "int4" and qopts.target == "cuda")
    ignored = {
        "--block-size": block_size, "--int4-method": int4_method, "--int4-symmetric/--int4-asymmetric": int4_symmetric,
    } if recipe != "int4" else {}
    if not half:
        ignored.update({"--keep-fp32": keep_fp32, "--keep-io-types": keep_io_types})
    if recipe != "int8":
        ignored.update({"--per-channel/--per-tensor": per_channel, "--activation-type": activation_type,
                        "--weight-type": weight_type, "--method": method})
    given = _given(ignored.items())
    if given:
        what = {"int8": "int8 (the default on this target)", "int4": "int4 weights", "fp16": "fp16"}[recipe]
        raise QtoolError(f"{given[0]} does not apply to {what}" + (" on the cpu target (fp32 activations)"
                                                                   if recipe == "int4" and not half else ""))


def _search(model, output, table, data, method, qopts, copts, eval_data, labels, task, gates, fallback, best_effort,
            speed, threads, max_evals, trail_path, plan_path, explain, save_plan):
    """quantize --eval-data ... GATES: the accuracy-driven search (qtool.search)."""
    from . import api
    from .errors import QtoolError
    from .evaluation import Thresholds
    from .model import atomic_write_text, check_output_path
    from .search import SearchOptions, quantize_search
    if plan_path:
        raise QtoolError("--plan applies a saved plan as it is; the search (--eval-data and gates) cannot change it")
    if not eval_data:
        raise QtoolError("gates in quantize drive the accuracy search, which needs --eval-data")
    if all(v is None for v in gates.values()):
        raise QtoolError("--eval-data needs at least one gate (--max-drop, --min-agreement, --min-cosine, --min-snr, "
                         "--max-task-drop with --task, or --min-speedup)")
    if (gates["max_task_drop"] is None) != (task is None):
        raise QtoolError("--max-task-drop and --task go together")
    if gates["min_speedup"] is not None and speed is False:
        raise QtoolError("--min-speedup needs the timing that --no-speed turns off")
    for path in (trail_path, save_plan):
        if path:
            check_output_path(path, model, table, data, eval_data, labels, output)
    ds = api.Dataset(eval_data)
    # labels are read only when asked for: a 'labels' array in the data of a non-classifier is ignored
    label_array = api._labels(ds, labels, None) if labels or gates["max_drop"] is not None else None
    if gates["max_drop"] is not None and label_array is None:
        raise QtoolError("--max-drop needs labels (a 'labels' array in --eval-data or --labels)")
    task_obj = None
    if task:
        from .task import load_task
        task_obj = load_task(task)
    if qopts.recipe != "int8":
        raise QtoolError(f"the accuracy search moves int8 nodes to a fallback precision; --weights {qopts.recipe} "
                         "has none to move (quantize without gates, then check it with qtool eval)")
    from . import runtime
    choice = runtime.pick_provider(qopts.target)
    if choice.note:
        if gates["min_speedup"] is not None:
            raise QtoolError(f"--min-speedup is judged on the target's EP: {choice.note.split(';')[0]}")
        click.echo(f"warning: {choice.note}; candidates are judged for accuracy only (no timing)", err=True)
        speed = False
    sopts = SearchOptions(Thresholds(**gates), fallback=fallback or "fp32", best_effort=best_effort,
                          threads=threads or 2, max_evaluations=max_evals, speed=speed is not False,
                          provider=qopts.target)
    calib = api.Dataset(data) if data else None
    written, result = quantize_search(model, output, table, calib, qopts, copts, method, ds, label_array, task_obj,
                                      sopts, log=click.echo)
    click.echo(f"search: {result.evaluations} evaluations in {result.seconds:.1f} s")
    for note in result.notes:
        click.echo(f"note: {note}")
    if trail_path:
        atomic_write_text(trail_path, json.dumps(result.to_dict(), indent=1))
    if written is not None:
        if explain:
            click.echo(result.plan.explain())
        if save_plan:
            atomic_write_text(save_plan, result.plan.to_json())
        fallen = [n for n in result.plan.nodes if n.name in result.final.fallback]
        for n in fallen:
            click.echo(f"  {n.name}: {n.reason}")
        click.echo(f"wrote {output}: {len(result.plan.all_quantized_nodes())} of {len(result.plan.all_nodes())} "
                   f"nodes quantized, {result.final.int8_mac_share * 100:.1f}% of MACs int8")
    if not result.passed:
        what = (f"best effort written to {output}" if written is not None
                else "nothing written; --best-effort writes the best model found")
        _fail(f"target not met: {result.miss or '; '.join(result.notes)} ({what})", 1)


@main.command()
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@click.option("--data", type=click.Path(), required=True, help="An .npz file or a directory of .npz files.")
@click.option("--table", type=click.Path(), help="Calibration table: outlier ratios from its histograms.")
@click.option("--json", "json_path", type=click.Path(), help="Write the full ranking as JSON.")
@click.option("--plot", "plot_path", type=click.Path(), help="Draw the ranking (.png or .svg; needs qtool[plot]).")
@click.option("--top", type=click.IntRange(min=1), default=30, show_default=True, help="Rows to print.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Samples per run (default 8, "
              "or the model's fixed batch).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N samples.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--preprocess/--no-preprocess", default=True, help="As the quantize that made CANDIDATE (default on).")
@click.option("--plan", "plan_path", type=click.Path(), help="The plan quantize saved (--save-plan): its "
              "pre-processing, and only the nodes it quantizes.")
@click.option("--impact", is_flag=True, help="Also the model outputs' SNR with only each node quantized (what the "
              "search ranks by; one more run per node per batch).")
@target_option
@handle_errors
def debug(reference, candidate, data, table, json_path, plot_path, top, batch_size, limit, threads, preprocess,
          plan_path, impact, target):
    """Per-node error of a QDQ model against its fp32 model, worst first: accumulated and isolated SQNR,
    range use and MAC share."""
    from .debug import format_report, plot, run
    from .model import atomic_write_text, check_output_path
    for path in (json_path, plot_path):
        if path:
            check_output_path(path, reference, candidate, data, table, plan_path)
    if plot_path and not plot_path.lower().endswith((".png", ".svg")):
        from .errors import QtoolError
        raise QtoolError(f"--plot {plot_path}: give a .png or .svg path")
    if plot_path:
        from .debug import require_matplotlib
        require_matplotlib()
    from . import runtime
    choice = runtime.pick_provider(target or "cpu")
    if choice.note:
        click.echo(f"warning: {choice.note}", err=True)
    report = run(reference, candidate, data, table, preprocess, batch_size, limit, threads, impact, plan_path,
                 choice.used, runtime.disabled_for(choice))
    click.echo(format_report(report, top))
    if json_path:
        atomic_write_text(json_path, report.to_json())
    if plot_path:
        plot(report, plot_path)


@main.command(name="eval")
@click.argument("reference", type=click.Path(), required=False)
@click.argument("candidate", type=click.Path(), required=False)
@click.option("--data", type=click.Path(), help="An .npz file or a directory of .npz files (not with --from).")
@click.option("--from", "from_path", type=click.Path(), metavar="REPORT.json",
              help="Re-judge a report saved with --json against the gates given now (no inference).")
@click.option("--labels", type=click.Path(), help="Integer labels (.npy); default: the data's 'labels' array.")
@target_option
@click.option("--provider", type=click.Choice(["cpu", "cuda", "trt"]), default=None,
              help="Same as --target (kept for older scripts).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch for metrics and timing.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (pin when timing).")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed pairs (after warm-up); each runs both models, alternating which goes first.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N samples.")
@gate_options
@click.option("--json", "json_path", type=click.Path(), help="Write the report (re-judged, with --from) as JSON.")
@click.option("--config", "preset", type=click.Path(), help="TOML preset ([eval]).")
@handle_errors
def eval_cmd(reference, candidate, data, from_path, labels, target, provider, batch_size, threads, repeats, limit,
             max_drop, min_agreement, min_cosine, min_snr, min_speedup, task, max_task_drop, json_path, preset):
    """Accuracy, error, size, latency and kernels of two models side by side; gates for CI.

    With --from REPORT.json, no models run: the saved report is judged again against the gates
    given now (and the preset's [eval] gates) and printed. Exit 0 all gates passed, 1 a gate
    failed, 2 bad input.
    """
    from .config import override
    from .errors import QtoolError
    from .evaluation import Thresholds, format_table, judge
    from .model import atomic_write_text, check_output_path
    if target and provider and target != provider:
        raise QtoolError(f"--target {target} and --provider {provider} disagree: give one")
    provider = target or provider
    if from_path:
        given = _given((("REFERENCE", reference), ("CANDIDATE", candidate), ("--data", data),
                        ("--labels", labels), ("--target", provider), ("--batch-size", batch_size),
                        ("--threads", threads), ("--repeats", repeats), ("--limit", limit), ("--task", task)))
        if given:
            raise QtoolError(f"--from re-judges a saved report without running the models; "
                             f"{given[0]} cannot be combined with it")
    elif reference is None or candidate is None or data is None:
        raise QtoolError("eval needs REFERENCE CANDIDATE --data DATA (or --from REPORT.json to re-judge a report)")
    opts = override(_preset(preset).eval, provider=provider, batch_size=batch_size, threads=threads,
                    repeats=repeats, max_drop=max_drop, min_agreement=min_agreement, min_cosine=min_cosine,
                    task=task, max_task_drop=max_task_drop, min_speedup=min_speedup, min_snr=min_snr)
    if from_path:
        from .evaluation import load_report
        if json_path:
            check_output_path(json_path, from_path, preset, opts.task)
        report = judge(load_report(from_path), Thresholds.from_options(opts))
    else:
        from . import api
        if json_path:
            check_output_path(json_path, reference, candidate, data, labels, opts.task, preset)
        if opts.provider != "cpu":
            from . import runtime
            note = runtime.pick_provider(opts.provider).note
            if note and opts.min_speedup is not None:
                raise QtoolError(f"--min-speedup is judged on the target's EP: {note.split(';')[0]} (drop the "
                                 "speed gate, or run eval where that EP works)")
            if note:
                click.echo(f"warning: {note}", err=True)
        report = api.evaluate(reference, candidate, data, labels, opts, limit)
    click.echo(format_table(report))
    if json_path:
        atomic_write_text(json_path, report.to_json())
    if not report.passed:
        failed = [g for g in report.gates if not g.passed]
        click.echo("gate failed: " + "; ".join(g.message for g in failed), err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
