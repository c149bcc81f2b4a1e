"""qtool vs onnxruntime.quantization vs NNCF on real models, measured side by side in one run.

For each model one table: fp32; qtool static QDQ (minmax default, percentile), qtool QOperator,
qtool dynamic; ORT ``quantize_static`` (QDQ, per-channel, QUInt8 activations, QInt8 weights)
with each of MinMax / Percentile / Entropy, the best of them by the task metric also with QInt8
activations; ORT ``quantize_dynamic`` (QInt8 weights); NNCF ``nncf.quantize`` on the ONNX model.

Columns: task metric vs fp32, size (bytes and ratio), latency median as ratio to fp32 (one
interleaved round-robin over all sessions, warm-up first, 2 intra-op threads), quantize wall
time, peak RSS of the quantize step, and how many Conv/MatMul/Gemm onnxruntime ran as integer
kernels (from the graph ORT saves at ORT_ENABLE_ALL: ``SessionOptions.optimized_model_filepath``).

Every quantizer runs in its own subprocess (``--worker JSON``) under RLIMIT_AS (16 GiB by
default) plus an RSS watchdog and a timeout; a crash, an out-of-memory or a timeout is reported
as such in the table. Peak RSS is the worker's VmHWM (peak resident set of its own address
space; ``ru_maxrss`` would also count the parent's RSS at fork, which Linux carries across exec).
It includes the interpreter, numpy/onnxruntime (and for NNCF, nncf) imports: "base" below.

    python benchmarks/real_models.py [--models effnet,minilm] [--quick] [--keep DIR]

Models (built outside the repository, nothing downloaded at run time):
  effnet  ~/.cache/qtool/efficientnet-lite0  (python calibration/efficientnet-lite0/make.py)
          metric: top-1 agreement and top-5 overlap with fp32 on eval.npz; latency at batch 8
  minilm  ~/.cache/qtool/minilm              (python calibration/minilm/make.py)
          metric: retrieval top-1 and mean cosine to fp32 embeddings (calibration/minilm/task.py);
          latency on bench.npz (16x128)
NNCF is a benchmark-only dependency (``pip install nncf``); without it its row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402
from harness import (GiB, killed_by_signal, mem_available, ok, pin_ort_threads, spawn, status_kib,  # noqa: E402
                     worker_env)

CACHE = Path.home() / ".cache" / "qtool"
THREADS = 2

INT_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul",
           "MatMulInteger", "ConvInteger", "QAttention", "QOrderedMatMul", "MatMulNBits")
FLOAT_OPS = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Attention",
             "MultiHeadAttention", "NhwcFusedConv", "ConvTranspose")

ORT_CALIBRATORS = ("MinMax", "Percentile", "Entropy")


# ------------------------------------------------------------------------------------------
# workers: one quantizer in one subprocess
# ------------------------------------------------------------------------------------------

def _batches(data: str, batch: int) -> list[dict]:
    """The calibration batches every tool sees: an .npz sliced in ``batch`` rows, or one batch
    per file of a directory of .npz (files are never mixed, as in qtool)."""
    import numpy as np
    p = Path(data)
    files = sorted(p.glob("*.npz")) if p.is_dir() else [p]
    out = []
    for f in files:
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files if k != "labels"}
        n = len(next(iter(arrays.values())))
        step = n if p.is_dir() else batch
        for i in range(0, n, step):
            out.append({k: v[i:i + step] for k, v in arrays.items()})
    return out


def _ort_reader(batches: list[dict]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """In-memory batches; __len__/set_range make it usable with CalibStridedMinMax."""

        def __init__(self):
            self.start, self.end = 0, len(batches)
            self.i = 0

        def __len__(self):
            return len(batches)

        def set_range(self, start_index: int, end_index: int):
            self.start, self.end, self.i = start_index, end_index, start_index

        def get_next(self):
            if self.i >= self.end:
                return None
            self.i += 1
            return batches[self.i - 1]

    return Reader()


def work_qtool(spec: dict) -> dict:
    import qtool
    import qtool.api, qtool.planner, qtool.prepare, qtool.calib.collect  # noqa: E401,F401
    from qtool.config import CalibrateOptions, QuantizeOptions
    opts = QuantizeOptions(**spec["options"])
    copts = CalibrateOptions(**spec.get("calibrate", {}))
    base = status_kib("VmRSS") / 1024
    t0 = time.perf_counter()
    qtool.quantize(spec["model"], spec["out"], data=None if opts.mode == "dynamic" else spec["data"],
                            options=opts, calibrate_options=copts)
    return {"seconds": time.perf_counter() - t0, "base_mib": base}


def work_ort_static(spec: dict) -> dict:
    import numpy as np  # noqa: F401
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    pin_ort_threads(THREADS)
    base = status_kib("VmRSS") / 1024
    t0 = time.perf_counter()
    batches = _batches(spec["data"], spec["batch"])
    extra = {}
    if spec.get("strided"):
        extra["CalibStridedMinMax"] = spec["strided"]
    quantize_static(spec["model"], spec["out"], _ort_reader(batches), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=getattr(QuantType, spec["activation_type"]),
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, spec["calibrator"]), extra_options=extra,
                    calibration_cache_path=spec.get("cache"))
    return {"seconds": time.perf_counter() - t0, "base_mib": base}


def work_ort_dynamic(spec: dict) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    base = status_kib("VmRSS") / 1024
    t0 = time.perf_counter()
    quantize_dynamic(spec["model"], spec["out"], weight_type=QuantType.QInt8)
    return {"seconds": time.perf_counter() - t0, "base_mib": base}


def work_nncf(spec: dict) -> dict:
    import numpy as np  # noqa: F401
    import onnx
    try:
        import nncf
    except ImportError as exc:
        return {"status": f"skipped: nncf not importable ({exc}); pip install nncf"}
    base = status_kib("VmRSS") / 1024
    t0 = time.perf_counter()
    batches = _batches(spec["data"], spec["batch"])
    # one sample per item, so that subset_size counts samples
    items = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]
    model = onnx.load(spec["model"])
    kwargs = {"subset_size": min(spec["subset_size"], len(items))}
    if spec.get("model_type") == "transformer":
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    q = nncf.quantize(model, nncf.Dataset(items), **kwargs)
    onnx.save(q, spec["out"])
    return {"seconds": time.perf_counter() - t0, "base_mib": base, "samples": kwargs["subset_size"]}


WORKERS = {"qtool": work_qtool, "ort_static": work_ort_static, "ort_dynamic": work_ort_dynamic,
           "nncf": work_nncf}


def worker_main(spec_json: str) -> None:
    harness.worker_main(spec_json, WORKERS, key="tool", memory_error="out of memory (MemoryError under RLIMIT_AS)",
                        over_prefix="out of memory: ", over_words=("bad_alloc", "allocat", "memory"),
                        peak_always=True, traceback_env="QTOOL_DEBUG")


# ------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------

class Runner:
    """Runs one worker under RLIMIT_AS, an RSS watchdog and a timeout; logs go to ``logdir``."""

    def __init__(self, as_limit: int, rss_limit: int, timeout: float, logdir: Path):
        self.as_limit, self.rss_limit, self.timeout, self.logdir = as_limit, rss_limit, timeout, logdir
        self.env = worker_env(THREADS, PYTHONWARNINGS="ignore")

    def run(self, spec: dict, label: str) -> dict:
        spec = dict(spec, as_limit=self.as_limit)
        log = self.logdir / (label.replace(" ", "_").replace("/", "_") + ".log")
        env = self.env
        if spec.get("tool") == "qtool":  # qtool picks its own BLAS threads (one: see qtool/__init__.py)
            env = {k: v for k, v in env.items() if k != "OPENBLAS_NUM_THREADS"}
        sp = spawn(__file__, spec, env=env, cwd=ROOT, rss_limit=self.rss_limit, timeout=self.timeout,
                   poll=0.1, log=log, new_session=True)
        res, wall = sp.result, sp.wall
        err = sp.stderr.strip().splitlines()
        if sp.killed.get("rss"):
            res = {"status": f"out of memory (RSS {sp.killed['rss'] / GiB:.1f} GiB > {self.rss_limit / GiB:.1f} GiB, "
                             "killed)"}
        elif sp.killed.get("timeout"):
            res = {"status": f"timeout (> {self.timeout:.0f} s, killed)"}
        elif res is None:
            tail = " | ".join(err[-2:])[:300]
            res = {"status": f"crashed (exit {sp.returncode}): {tail}"}
            if killed_by_signal(sp.returncode):
                res["status"] = f"crashed (signal {-sp.returncode}, likely out of memory): {tail}"
        res["wall_s"] = wall
        res["log"] = str(log)
        brief = res["status"] if res["status"] != "ok" else (
            f"ok {res['seconds']:.1f}s, peak {res.get('vmhwm_mib', 0):.0f} MiB")
        print(f"  [{label}] {brief}  ({wall:.0f}s wall)", file=sys.stderr, flush=True)
        return res


def model_bytes(path: Path) -> int:
    """The model file plus external data files it names (none for these models)."""
    import onnx
    total = os.path.getsize(path)
    m = onnx.load(str(path), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum(os.path.getsize(path.parent / loc) for loc in locs if (path.parent / loc).exists())


def kernel_counts(path: Path, tmp: Path) -> dict:
    """Op histogram of the graph onnxruntime actually runs (ORT_ENABLE_ALL, saved to a file)."""
    import onnx
    import onnxruntime as ort
    opt = tmp / (path.stem + ".ortopt.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(opt), load_external_data=False)
    hist: dict[str, int] = {}
    floats: dict[str, list[str]] = {}
    for n in m.graph.node:
        key = n.op_type + ("(nchwc)" if n.domain == "com.microsoft.nchwc" else "")
        hist[key] = hist.get(key, 0) + 1
        if n.op_type in FLOAT_OPS:
            floats.setdefault(key, []).append(n.name)
    for f in [opt] + list(tmp.glob(opt.name + "*.data")):
        f.unlink(missing_ok=True)
    ints = {k: v for k, v in hist.items() if k in INT_OPS}
    flt = {k: len(v) for k, v in floats.items()}
    return {"int": ints, "float": flt, "float_names": floats, "nodes": len(m.graph.node)}


def kernel_cell(kc: dict | None) -> str:
    if not kc:
        return "-"
    n_int, n_flt = sum(kc["int"].values()), sum(kc["float"].values())
    return f"{n_int}/{n_int + n_flt}"


def kernel_detail(kc: dict) -> str:
    ints = ", ".join(f"{k} {v}" for k, v in sorted(kc["int"].items(), key=lambda x: -x[1])) or "none"
    flts = ", ".join(f"{k} {v}" for k, v in sorted(kc["float"].items(), key=lambda x: -x[1])) or "none"
    return f"int: {ints} | float: {flts}"


def huge_ranges(cache: Path) -> list[str]:
    """Tensors whose range in an ORT calibration cache reaches |x| > 1e30."""
    def numbers(v):
        if isinstance(v, bool):
            return []
        if isinstance(v, (int, float)):
            return [float(v)]
        if isinstance(v, dict):
            return numbers(v.get("data", []))
        if isinstance(v, list):
            return [x for item in v for x in numbers(item)]
        return []

    data = json.loads(cache.read_text()).get("data", {})
    out = []
    for name, v in (data.items() if isinstance(data, dict) else []):
        vals = numbers(v.get("lowest")) + numbers(v.get("highest")) if isinstance(v, dict) else []
        if vals and max(abs(x) for x in vals) > 1e30:
            out.append(name)
    return sorted(out)


def print_table(rows: list[tuple], header: tuple) -> None:
    harness.print_table(rows, header, right_align=False, rule=True)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------

class EffNet:
    key = "effnet"
    title = "EfficientNet-Lite0 (4.6M params, 49 Conv + 1 Gemm)"
    dir = CACHE / "efficientnet-lite0"
    build = "python calibration/efficientnet-lite0/make.py"
    transformer = False
    calib_batch = 32
    repeats = 30
    metric_names = ("top-1 agree", "top-5 overlap")

    def __init__(self, args):
        self.model = self.dir / "model.onnx"
        self.calib = self.dir / "calib.npz"
        self.eval_n = 128 if args.quick else 512
        self.batch = 8
        self.latency_desc = f"batch {self.batch} (first {self.batch} eval crops)"

    def missing(self) -> list[Path]:
        return [p for p in (self.model, self.calib, self.dir / "eval.npz") if not p.exists()]

    def calib_samples(self) -> int:
        import numpy as np
        with np.load(self.calib) as z:
            return len(z["input"])

    def load_eval(self):
        import numpy as np
        with np.load(self.dir / "eval.npz") as z:
            self.x = z["input"][:self.eval_n]
        self.feeds = {"input": self.x[:self.batch]}
        self.eval_desc = f"{len(self.x)} eval crops (eval.npz), agreement with fp32 logits"

    def outputs(self, path: Path):
        import numpy as np
        sys.path.insert(0, str(HERE))
        from common import session
        s = session(path)
        return np.concatenate([s.run(None, {"input": self.x[i:i + 32]})[0] for i in range(0, len(self.x), 32)])

    def metrics(self, out, ref) -> tuple[float, float]:
        import numpy as np
        top1 = float((out.argmax(1) == ref.argmax(1)).mean())
        t5o, t5r = np.argsort(-out, 1)[:, :5], np.argsort(-ref, 1)[:, :5]
        overlap = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5o, t5r)]))
        return top1, overlap

    def fmt(self, m) -> tuple[str, str]:
        return f"{m[0]:.4f}", f"{m[1]:.4f}"


class MiniLM:
    key = "minilm"
    title = "all-MiniLM-L6-v2 (22.6M params, 6 layers, 48 MatMul)"
    dir = CACHE / "minilm"
    build = "python calibration/minilm/make.py"
    transformer = True
    calib_batch = 16
    repeats = 20
    metric_names = ("retrieval top-1", "mean cos")

    def __init__(self, args):
        self.model = self.dir / "model.onnx"
        self.calib = self.dir / "calib"
        self.latency_desc = "bench.npz (16x128)"

    def missing(self) -> list[Path]:
        need = [self.model, self.calib, self.dir / "eval", self.dir / "eval_meta.json", self.dir / "bench.npz",
                ROOT / "calibration" / "minilm" / "task.py"]
        return [p for p in need if not p.exists()]

    def calib_samples(self) -> int:
        import numpy as np
        n = 0
        for f in sorted(self.calib.glob("*.npz")):
            with np.load(f) as z:
                n += len(z[z.files[0]])
        return n

    def load_eval(self):
        import importlib.util
        import numpy as np
        spec = importlib.util.spec_from_file_location("minilm_task", ROOT / "calibration" / "minilm" / "task.py")
        self.task = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.task)
        self.meta = self.task.load_meta(self.dir)
        with np.load(self.dir / "bench.npz") as z:
            self.feeds = {k: z[k] for k in z.files}
        n = len(self.meta["rows"])
        q = sum(r["kind"] == "description" for r in self.meta["rows"])
        self.eval_desc = (f"{n} texts (calibration/minilm/task.py: {q} description->name retrievals); "
                          "mean cos = mean cosine of sentence embeddings to fp32's")

    def outputs(self, path: Path):
        return self.task.embed(path, self.dir, THREADS, self.meta)

    def metrics(self, out, ref) -> tuple[float, float]:
        top1, _, _ = self.task.retrieval_top1(out, self.meta)
        return top1, float((out * ref).sum(1).mean())

    def fmt(self, m) -> tuple[str, str]:
        return f"{m[0]:.4f}", f"{m[1]:.5f}"


MODELS = {"effnet": EffNet, "minilm": MiniLM}


def formats_rows() -> list[tuple[str, str, dict, dict]]:
    """qtool's formats and modes (``--rows formats``, the default)."""
    q = [("qtool static QDQ minmax (default)", "qtool_minmax", {}, {}),
         ("qtool static QDQ percentile", "qtool_pct", {}, {"method": "percentile"}),
         ("qtool QOperator", "qtool_qop", {"format": "qoperator"}, {}),
         ("qtool dynamic", "qtool_dyn", {"mode": "dynamic"}, {})]
    from qtool.types import cpu_saturates_u8s8
    if cpu_saturates_u8s8():  # the default picked uint8 weights: measure the 7-bit int8 alternative too
        q += [("qtool static QDQ minmax, int8 weights (7-bit)", "qtool_w7", {"weight_type": "int8"}, {}),
              ("qtool dynamic, int8 weights (7-bit)", "qtool_dyn_w7", {"mode": "dynamic", "weight_type": "int8"}, {})]
    return q


def algorithm_rows() -> list[tuple[str, str, dict, dict]]:
    """qtool's static int8 default, then each accuracy algorithm alone, then all of them where they
    measurably help (``--rows algorithms``): no float fallback in any row."""
    q = [("qtool static (default)", "qtool_default", {}, {})]
    for name in ("cle", "smoothquant", "bias_correction", "rounding"):
        q.append((f"qtool static + {name}", f"qtool_{name}", {"algorithms": [name]}, {}))
    q += [("qtool static --method auto", "qtool_mauto", {}, {"method": "auto"}),
          ("qtool static --algorithms auto", "qtool_auto", {"algorithms": ["auto"]}, {})]
    return q


ROWS = {"formats": formats_rows, "algorithms": algorithm_rows}


def plan_rows(M, tmp: Path, calib_n: int, nncf_ok: bool, which: str = "formats") -> list[dict]:
    """Every row: label, worker spec (None for fp32), notes."""
    model, calib = str(M.model), str(M.calib)

    def out(name):
        return str(tmp / f"{M.key}.{name}.onnx")

    rows = [{"label": "fp32", "spec": None, "path": M.model}]
    q = ROWS[which]()
    for label, name, opts, copts in q:
        rows.append({"label": label, "path": Path(out(name)), "spec": {
            "tool": "qtool", "model": model, "out": out(name), "data": calib, "options": opts, "calibrate": copts}})
    for cal in ORT_CALIBRATORS:
        name = f"ort_u8_{cal.lower()}"
        rows.append({"label": f"ORT static QDQ u8 {cal}", "path": Path(out(name)), "ort_cal": cal, "spec": {
            "tool": "ort_static", "model": model, "out": out(name), "data": calib, "batch": M.calib_batch,
            "calibrator": cal, "activation_type": "QUInt8", "cache": str(tmp / f"{M.key}.{name}.ranges.json")}})
    rows.append({"label": "ORT static QDQ s8 (best calibrator)", "path": Path(out("ort_s8")), "spec": None,
                 "deferred": True})
    rows.append({"label": "ORT dynamic", "path": Path(out("ort_dyn")), "spec": {
        "tool": "ort_dynamic", "model": model, "out": out("ort_dyn")}})
    nn = {"label": "NNCF" + (" (TRANSFORMER)" if M.transformer else ""), "path": Path(out("nncf")), "spec": {
        "tool": "nncf", "model": model, "out": out("nncf"), "data": calib, "batch": M.calib_batch,
        "subset_size": min(300, calib_n), "model_type": "transformer" if M.transformer else None}}
    if not nncf_ok:
        nn["spec"] = None
        nn["result"] = {"status": "skipped: nncf not installed (pip install nncf)"}
    rows.append(nn)
    return rows


def bench_model(M, args, runner: Runner, tmp: Path, nncf_ok: bool) -> None:
    t_model = time.perf_counter()
    print(f"\n=== {M.title}: {M.model}")
    calib_n = M.calib_samples()
    rows = plan_rows(M, tmp, calib_n, nncf_ok, args.rows)

    # 1. quantize, each in its own subprocess
    for r in rows:
        if r.get("spec", {}) and r["spec"].get("cache"):
            Path(r["spec"]["cache"]).unlink(missing_ok=True)   # ORT would skip calibration on a stale cache
        if r.get("spec"):
            r["result"] = runner.run(r["spec"], f"{M.key} {r['label']}")
            if r.get("ort_cal") and not ok(r["result"]) and not r["result"]["status"].startswith("timeout"):
                # ORT's histogram calibrators keep every batch's outputs and stack them; retry with
                # its documented memory option, one batch per collect_data
                r["crash"] = r["result"]["status"]
                r["result"] = runner.run(dict(r["spec"], strided=1), f"{M.key} {r['label']} strided")
                r["label"] += " [CalibStridedMinMax=1]"

    # 2. task metrics vs fp32
    M.load_eval()
    ref = M.outputs(M.model)
    rows[0]["result"] = {"status": "ok"}
    rows[0]["metrics"] = M.metrics(ref, ref)

    def evaluate(r):
        if ok(r.get("result")):
            try:
                r["metrics"] = M.metrics(M.outputs(r["path"]), ref)
            except Exception as exc:  # noqa: BLE001
                r["result"]["status"] = f"runs but eval failed: {type(exc).__name__}: {str(exc)[:200]}"

    for r in rows[1:]:
        if not r.get("deferred"):
            evaluate(r)

    # 3. the best ORT calibrator (first metric, then second), again with int8 activations
    ort_rows = [r for r in rows if r.get("ort_cal") and r.get("metrics")]
    best = max(ort_rows, key=lambda r: r["metrics"]) if ort_rows else None
    s8 = next(r for r in rows if r.get("deferred"))
    if best is not None:
        best["label"] += " *"
        cal = best["ort_cal"]
        s8["label"] = f"ORT static QDQ s8 {cal} (cached ranges)"
        # same ranges as the u8 run (ORT's calibration_cache_path): the time is quantization only
        s8["spec"] = dict(best["spec"], activation_type="QInt8", out=str(s8["path"]))
        s8["result"] = runner.run(s8["spec"], f"{M.key} {s8['label']}")
        evaluate(s8)
    else:
        s8["result"] = {"status": "skipped: no ORT static model"}

    # 4. what ORT runs as integer kernels
    for r in rows:
        if ok(r.get("result")):
            try:
                r["kernels"] = kernel_counts(r["path"], tmp)
            except Exception as exc:  # noqa: BLE001
                r["kernels"] = None
                r["result"]["status"] = f"ORT cannot load: {type(exc).__name__}: {str(exc)[:200]}"
            r["bytes"] = model_bytes(r["path"])

    # 5. latency: one interleaved round-robin over every session
    sys.path.insert(0, str(HERE))
    from common import interleaved_latency, session
    live = [r for r in rows if ok(r.get("result"))]
    sessions = {r["label"]: session(r["path"]) for r in live}
    repeats = args.repeats or (10 if args.quick else M.repeats)
    la0 = load_avg()
    lat = interleaved_latency(sessions, M.feeds, warmup=args.warmup, repeats=repeats)
    la1 = load_avg()
    del sessions

    # 6. the table
    fp = rows[0]
    print(f"metric: {M.eval_desc}")
    print(f"latency: {M.latency_desc}, {THREADS} intra-op threads, median of {repeats} interleaved "
          f"round-robin runs over {len(live)} sessions after {args.warmup} warm-up rounds; "
          f"fp32 median {lat['fp32']:.1f} ms; load average before {la0}, after {la1}")
    print(f"calibration: {calib_n} samples ({M.calib}) for every static quantizer")
    header = ("model",) + M.metric_names + ("bytes", "size/fp32", "lat/fp32", "quantize s", "peak RSS MiB",
                                            "int kernels", "status")
    table = []
    for r in rows:
        res = r.get("result") or {"status": "not run"}
        good = ok(res)
        m = M.fmt(r["metrics"]) if good and r.get("metrics") else ("-", "-")
        table.append((r["label"],) + m + (
            f"{r['bytes']:,}" if good else "-",
            f"{r['bytes'] / fp['bytes']:.3f}" if good else "-",
            f"{lat[r['label']] / lat['fp32']:.3f}" if good and r["label"] in lat else "-",
            f"{res['seconds']:.1f}" if good and "seconds" in res else "-",
            f"{res['vmhwm_mib']:.0f}" if good and "vmhwm_mib" in res else "-",
            kernel_cell(r.get("kernels")) if good else "-",
            "ok" if good else res["status"]))
    print_table(table, header)
    if s8.get("spec"):
        print(f"{s8['label']}: ranges from the u8 {s8['spec']['calibrator']} run's calibration_cache_path, "
              "so its quantize s excludes calibration")
    print("int kernels = Conv/MatMul/Gemm-type nodes onnxruntime runs as integer kernels / all such nodes, "
          "in the graph it saves at ORT_ENABLE_ALL. * = best ORT calibrator by "
          f"{M.metric_names[0]} (then {M.metric_names[1]}).")
    bases = [r["result"]["base_mib"] for r in rows if ok(r.get("result")) and "base_mib" in r["result"]]
    if bases:
        print(f"peak RSS = VmHWM of the quantizing process; its RSS after imports, before the step: "
              f"{min(bases):.0f}-{max(bases):.0f} MiB")
    print("kernels in ORT's optimized graph:")
    for r in rows:
        if r.get("kernels"):
            print(f"  {r['label']}: {kernel_detail(r['kernels'])}")
    for r in rows:
        if r.get("crash"):
            print(f"  note: {r['label']}: first try without CalibStridedMinMax: {r['crash']}")
        res = r.get("result") or {}
        if not ok(res) and res.get("log") and args.keep:
            print(f"  note: {r['label']}: log {res['log']}")
    dyn = next((r for r in rows if r["label"] == "qtool dynamic" and r.get("kernels")), None)
    if dyn and not M.transformer:
        n = sum(dyn["kernels"]["int"].values())
        print(f"  note: qtool dynamic quantizes MatMul/Gemm weights only, never Conv; on this CNN that is at most "
              f"the classifier Gemm, and ORT ran {n} integer kernel(s)")
    for r in rows:
        cache = (r.get("spec") or {}).get("cache")
        if r.get("ort_cal") and ok(r.get("result")) and cache and Path(cache).is_file():
            huge = huge_ranges(Path(cache))
            if huge:
                print(f"  note: {r['label']}: {len(huge)} calibrated ranges reach |x| > 1e30 (the attention-mask "
                      f"fill value -FLT_MAX), quantized with that range: {', '.join(huge[:4])}"
                      f"{' ...' if len(huge) > 4 else ''}")
    slow = [r for r in rows if r["label"].startswith("qtool") and ok(r.get("result")) and r["label"] in lat
            and lat[r["label"]] > lat["fp32"]]
    for r in slow:
        names = {k: v for k, v in r["kernels"]["float_names"].items()}
        listed = "; ".join(f"{k} x{len(v)}: {', '.join(v[:12])}{' ...' if len(v) > 12 else ''}"
                           for k, v in names.items()) or "none"
        print(f"  SLOWER THAN FP32: {r['label']} ({lat[r['label']] / lat['fp32']:.3f}x); float nodes left: {listed}")
    print(f"({M.key} done in {time.perf_counter() - t_model:.0f} s)")


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import qtool
    v = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
         "numpy": numpy.__version__, "qtool": qtool.__version__}
    try:
        out = subprocess.run([sys.executable, "-c", "import nncf; print(nncf.__version__)"], capture_output=True,
                             text=True, timeout=120)
        v["nncf"] = out.stdout.strip() if out.returncode == 0 else "not installed"
    except subprocess.TimeoutExpired:
        v["nncf"] = "import timed out"
    return v


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="effnet,minilm", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="fewer eval samples and latency repeats")
    ap.add_argument("--repeats", type=int, help="latency repeats (default effnet 30, minilm 20; --quick 10)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up rounds before timing (default 3)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per quantizer (default 600)")
    ap.add_argument("--as-limit-gib", type=float, default=16, help="RLIMIT_AS per quantizer (default 16)")
    ap.add_argument("--keep", type=Path, help="keep quantized models and logs in this folder")
    ap.add_argument("--rows", choices=sorted(ROWS), default="formats",
                    help="qtool's rows: formats (formats and modes) or algorithms (issue 12's accuracy "
                         "algorithms, each alone and auto)")
    args = ap.parse_args()
    # per model unless given: effnet 30, minilm 20 (a fp32 MiniLM run is ~15x an EffNet batch of 8)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODELS]
    if bad:
        ap.error(f"unknown model {bad[0]!r} (known: {', '.join(MODELS)})")

    t_start = time.perf_counter()
    v = versions()
    rss_limit = int(min(args.as_limit_gib * GiB - 2 * GiB, mem_available() - 1.5 * GiB))
    print("reproduce: python benchmarks/real_models.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(f"machine: {os.cpu_count()} CPUs, load average {load_avg()}; "
          f"each quantizer in its own process, RLIMIT_AS {args.as_limit_gib:g} GiB, killed above "
          f"{rss_limit / GiB:.1f} GiB RSS or {args.timeout:.0f} s")
    print("options:")
    print("  qtool:  qtool.quantize(model, out, data=CALIB) with default QuantizeOptions (static, qdq, per_channel, "
          "uint8 activations, weight_type auto: int8, or on CPUs without VNNI uint8 Conv and 7-bit int8 MatMul/Gemm weights) and CalibrateOptions (minmax, batch 32);")
    print("          percentile: calibrate_options=CalibrateOptions(method='percentile') (99.999);")
    print("          QOperator: QuantizeOptions(format='qoperator'); dynamic: QuantizeOptions(mode='dynamic'), no data")
    if args.rows == "algorithms":
        print("          + name: QuantizeOptions(algorithms=(name,)) with the same data (the weight algorithms "
              "measure each layer on it); --method auto: CalibrateOptions(method='auto'); --algorithms auto: "
              "QuantizeOptions(algorithms=('auto',)); no float fallback in any qtool row")
    print("  ORT static:  quantize_static(model, out, reader, quant_format=QDQ, per_channel=True, "
          "activation_type=QUInt8 (s8: QInt8), weight_type=QInt8, calibrate_method=MinMax|Percentile|Entropy), "
          "no other extra_options (retried with CalibStridedMinMax=1 where a calibrator fails), no "
          "quant_pre_process; same batches (effnet 32 crops, minilm one file of 16 texts); calibration "
          "session pinned to 2 threads")
    print("  ORT dynamic: quantize_dynamic(model, out, weight_type=QInt8) (per_channel=False, its default op types)")
    print("  NNCF:   nncf.quantize(onnx.load(model), nncf.Dataset(one sample per item), subset_size=min(300, calib), "
          "model_type=TRANSFORMER for minilm), other defaults (preset PERFORMANCE, fast bias correction)")

    tmp_ctx = None
    if args.keep:
        tmp = args.keep
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="qtool-real-")
        tmp = Path(tmp_ctx.name)
    (tmp / "logs").mkdir(exist_ok=True)
    runner = Runner(int(args.as_limit_gib * GiB), rss_limit, args.timeout, tmp / "logs")
    nncf_ok = v["nncf"] not in ("not installed", "import timed out")
    try:
        for k in keys:
            M = MODELS[k](args)
            missing = M.missing()
            if missing:
                print(f"\n=== {M.title}: skipped, {missing[0]} missing; build it with: {M.build}")
                continue
            bench_model(M, args, runner, tmp, nncf_ok)
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end {load_avg()}")


if __name__ == "__main__":
    main()
