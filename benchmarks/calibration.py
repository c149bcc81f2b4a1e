"""qtool calibration vs onnxruntime.quantization calibration, side by side in one run.

For each model and method (minmax, entropy, percentile, mse) this measures

1. calibration wall time: ``qtool.calibrate`` vs ORT's ``create_calibrator`` + ``collect_data``
   + ``compute_data``, on the same data, in batches of the same size;
2. peak RSS of calibration at 64 and 1,024 samples (ORT on EfficientNet-Lite0: 32 and 64
   samples, 1,024 extrapolated), the 1,024-sample set streamed from a directory of .npz files;
3. the int8 model each method gives: ``qtool.quantize(table=...)`` vs ORT ``quantize_static``
   (QDQ, per-channel, int8 activations and weights, same method), evaluated on the eval set
   (EfficientNet-Lite0: the first 256 eval crops by default, ``--effnet-eval``). On EfficientNet
   quantize_static gets the timing run's ranges through ``calibration_cache_path`` rather than
   calibrating a second time (``--ort-accuracy-calib``).

Every measurement runs in its own subprocess (``--worker``), so that its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the parent imports only the standard library
(its RSS is inherited into a child's ru_maxrss across fork/exec) and keeps every worker under a
memory limit (RLIMIT_AS in the worker plus an RSS watchdog here). onnxruntime runs on 2 intra-op
threads in every worker.

    python benchmarks/calibration.py [--models cnn,effnet] [--methods minmax,entropy,percentile,mse]
                                     [--skip-rss] [--effnet-eval 256] [--repeats 3]

EfficientNet-Lite0 comes from ``calibration/efficientnet-lite0/make.py`` (files in
``~/.cache/qtool/efficientnet-lite0/``); without them that model is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from harness import (GiB, killed_by_signal, mem_available, ok, peak_mib, pin_ort_threads,  # noqa: E402
                     print_table, spawn, status_kib, worker_env)
from harness import worker_main as _worker_main  # noqa: E402

THREADS = 2

MODELS = {
    "cnn": {
        "title": "Fashion-MNIST CNN (bundled sample, 207k params)",
        "dir": ROOT / "calibration" / "fashion-mnist",
        "batch": 32,
        "shift": 2,      # pixels, for the augmented 1,024-sample set
        "noise": 0.05,   # std of added noise, in normalised units
        "ort_rss_samples": (64, 1024),
    },
    "effnet": {
        "title": "EfficientNet-Lite0 (5M params)",
        "dir": Path.home() / ".cache" / "qtool" / "efficientnet-lite0",
        "batch": 16,
        "shift": 8,
        "noise": 0.0,
        "ort_rss_samples": (32, 64),  # ORT at 1,024 would need ~80 GB: extrapolated instead
    },
}
METHODS = ("minmax", "entropy", "percentile", "mse")
ORT_METHOD = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "mse": None}
# What create_calibrator uses when quantize_static passes no Calib* extra options: the defaults a
# quantize_static user gets. Passed explicitly so that the output can state them.
ORT_EXTRA = {
    "minmax": {"symmetric": False, "moving_average": False},
    "entropy": {"num_bins": 128, "num_quantized_bins": 128, "symmetric": False},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
}
QTOOL_DEFAULTS = "CalibrateOptions defaults: bins=2048 (histogram methods), percentile=99.999, symmetric=False"
RSS_SAMPLES = (64, 1024)


# ------------------------------------------------------------------------------------------
# workers (run in a subprocess: ``calibration.py --worker JSON``)
# ------------------------------------------------------------------------------------------


def _dir_batches(path: str, batch: int):
    """Yield input batches from a directory of .npz files, one file in memory at a time."""
    import numpy as np
    for f in sorted(Path(path).glob("*.npz")):
        with np.load(f) as z:
            arrays = {k: z[k] for k in z.files if k != "labels"}
        n = len(next(iter(arrays.values())))
        for i in range(0, n, batch):
            yield {k: v[i:i + batch] for k, v in arrays.items()}
        del arrays


def _ort_reader(path: str, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class DirReader(CalibrationDataReader):
        """Streams the same .npz files qtool reads; holds one file (= one batch) at a time."""

        def __init__(self):
            self._it = _dir_batches(path, batch)

        def get_next(self):
            return next(self._it, None)

    return DirReader()


def worker_prep(spec: dict) -> dict:
    """Write the calibration sets as directories of batch-sized .npz files, and the eval subset."""
    import numpy as np
    src, out, batch = Path(spec["dir"]), Path(spec["out"]), spec["batch"]
    with np.load(src / "calib.npz") as z:
        calib = z["input"]
    if spec.get("calib_limit"):
        calib = calib[:spec["calib_limit"]]
    rng = np.random.default_rng(0)

    def write(name: str, n: int) -> None:
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for start in range(0, n, batch):
            idx = np.arange(start, min(start + batch, n))
            x = np.stack([_augment(calib, int(i), spec, rng) for i in idx]).astype(np.float32)
            np.savez(d / f"{start // batch:05d}.npz", input=x)

    write("calib", len(calib))
    for n in spec["sizes"]:
        write(f"n{n}", n)
    info = {"calib_samples": len(calib), "calib_shape": list(calib.shape)}
    if spec["kind"] == "effnet":
        with np.load(src / "eval.npz") as z:
            ev = z["input"]
        info["eval_available"] = len(ev)
        ev = ev[:spec["eval_limit"]] if spec.get("eval_limit") else ev
        np.savez(out / "eval.npz", input=ev)
        info["eval_samples"] = len(ev)
    return info


def _augment(calib, i: int, spec: dict, rng):
    """Sample i of an augmented set: the calibration images first as they are, then again with
    a random flip, a random shift of up to ``shift`` pixels (edge padded) and optional noise."""
    import numpy as np
    x = calib[i % len(calib)]
    if i < len(calib):
        return x
    if rng.random() < 0.5:
        x = x[..., ::-1]
    s = spec["shift"]
    dy, dx = (int(v) for v in rng.integers(-s, s + 1, size=2))
    h, w = x.shape[-2:]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(s, s), (s, s)], mode="edge")
    x = padded[..., s + dy:s + dy + h, s + dx:s + dx + w]
    if spec["noise"]:
        x = x + rng.normal(0.0, spec["noise"], size=x.shape).astype(np.float32)
    return x


def worker_calib(spec: dict) -> dict:
    """Time one calibration and report its peak RSS."""
    import numpy as np  # noqa: F401  (import cost outside the timed part, for both tools)
    import onnxruntime  # noqa: F401
    base = status_kib("VmRSS") / 1024
    tool, method, batch, data = spec["tool"], spec["method"], spec["batch"], spec["data"]
    res: dict = {}
    if tool == "qtool":
        import importlib
        import pkgutil
        import qtool
        # qtool's own modules (calibrate imports some lazily) are imported before the clock starts,
        # as ORT's quantization package is; third-party imports qtool makes while calibrating
        # (onnx.reference for constant folding) stay in its time
        for mod in pkgutil.walk_packages(qtool.__path__, "qtool."):
            if not (mod.name.startswith("qtool.cli") or mod.name.endswith("__main__")):
                importlib.import_module(mod.name)
        from qtool.config import CalibrateOptions
        marks: list[float] = []
        base = status_kib("VmRSS") / 1024
        t0 = time.perf_counter()
        table = qtool.calibrate(spec["model"], data, CalibrateOptions(method=method, batch_size=batch),
                                on_batch=lambda n: marks.append(time.perf_counter()), threads=THREADS)
        t1 = time.perf_counter()
        res["seconds"] = t1 - t0
        if len(marks) > 1:
            per_batch = (marks[-1] - marks[0]) / (len(marks) - 1)
            res["phases"] = {"setup": marks[0] - t0 - per_batch, "batches": marks[-1] - marks[0] + per_batch,
                             "finish": t1 - marks[-1]}
        res["samples"], res["tensors"] = table.samples, len(table.tensors)
        if spec.get("save"):
            table.save(spec["save"])
    else:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
        pin_ort_threads(THREADS)
        reader = _ort_reader(data, batch)
        base = status_kib("VmRSS") / 1024
        t0 = time.perf_counter()
        cal = create_calibrator(spec["model"], None, augmented_model_path=spec["augmented"],
                                calibrate_method=getattr(CalibrationMethod, ORT_METHOD[method]),
                                extra_options=dict(ORT_EXTRA[method]))
        t1 = time.perf_counter()
        cal.collect_data(reader)
        t2 = time.perf_counter()
        ranges = cal.compute_data()
        t3 = time.perf_counter()
        res["seconds"] = t3 - t0
        res["phases"] = {"create": t1 - t0, "collect": t2 - t1, "compute": t3 - t2}
        res["tensors"] = len(ranges.data)
        res["intra_op_threads"] = cal.infer_session.get_session_options().intra_op_num_threads
        if spec.get("save"):
            from onnxruntime.quantization.calibrate import save_tensors_data
            save_tensors_data(ranges, spec["save"])
    res.update(peak_mib())
    res["base_rss_mib"] = base
    return res


def worker_accuracy(spec: dict) -> dict:
    """Quantize with one tool/method (fp32: none) and evaluate on the eval set, 2 threads."""
    import numpy as np
    import onnxruntime as ort
    tool, out = spec["tool"], spec.get("out")
    t0 = time.perf_counter()
    if tool == "qtool":
        import qtool
        qtool.quantize(spec["model"], out, table=spec["table"])
        path = out
    elif tool == "ort":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        pin_ort_threads(THREADS)
        quantize_static(spec["model"], out, _ort_reader(spec["calib"], spec["batch"]),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, ORT_METHOD[spec["method"]]),
                        calibration_cache_path=spec.get("cache"))
        path = out
    else:
        path = spec["model"]
    quant_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    with np.load(spec["eval"]) as z:
        x = z["input"]
        labels = z["labels"] if "labels" in z.files else None
    t1 = time.perf_counter()
    logits = np.concatenate([sess.run(None, {name: x[i:i + spec["eval_batch"]]})[0]
                             for i in range(0, len(x), spec["eval_batch"])])
    res = {"quantize_s": quant_s, "eval_s": time.perf_counter() - t1, "n": len(x)}
    if labels is not None:
        res["top1"] = float((logits.argmax(1) == labels[:len(x)]).mean())
    if tool == "fp32" and spec.get("ref"):
        np.save(spec["ref"], logits)
    elif spec.get("ref"):
        ref = np.load(spec["ref"])
        res["agree"] = float((logits.argmax(1) == ref.argmax(1)).mean())
        top5 = np.argsort(-logits, axis=1)[:, :5]
        ref5 = np.argsort(-ref, axis=1)[:, :5]
        res["top5_overlap"] = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5, ref5)]))
    res.update(peak_mib())
    return res


WORKERS = {"prep": worker_prep, "calib": worker_calib, "accuracy": worker_accuracy}


def worker_main(spec_json: str) -> None:
    _worker_main(spec_json, WORKERS, key="worker", memory_error="over limit (MemoryError under RLIMIT_AS)",
                 over_prefix="over limit: ", over_words=("alloc", "memory"))


# ------------------------------------------------------------------------------------------
# parent: standard library only
# ------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, rss_limit: int, verbose: bool):
        self.rss_limit = rss_limit
        self.verbose = verbose
        self.env = worker_env(THREADS)

    def run(self, spec: dict, label: str) -> dict:
        spec = dict(spec, as_limit=self.rss_limit + 3 * GiB)
        sp = spawn(__file__, spec, env=self.env, cwd=ROOT, rss_limit=self.rss_limit, poll=0.05)
        res, wall = sp.result, sp.wall
        if sp.killed:
            res = {"status": f"over limit (RSS {sp.killed['rss'] / GiB:.1f} GiB > {self.rss_limit / GiB:.1f} GiB, "
                             f"killed after {wall:.0f} s)"}
        elif res is None:
            tail = " | ".join(sp.stderr.strip().splitlines()[-3:])[:400]
            res = {"status": f"crashed (exit {sp.returncode}): {tail}"}
            if killed_by_signal(sp.returncode):
                res["status"] = f"over limit? (killed by signal {-sp.returncode}): {tail}"
        res["wall_s"] = wall
        if self.verbose or res.get("status") != "ok":
            print(f"  [{label}] {_brief(res)}", flush=True)
        return res


def _brief(res: dict) -> str:
    parts = [res.get("status", "?")]
    for k in ("seconds", "ru_maxrss_mib", "top1", "agree", "top5_overlap"):
        if k in res:
            parts.append(f"{k}={res[k]:.4g}")
    parts.append(f"wall={res['wall_s']:.1f}s")
    return " ".join(parts)


def wait_for(paths: list[Path], minutes: int) -> bool:
    deadline = time.time() + minutes * 60
    announced = False
    while True:
        if all(p.is_file() for p in paths):
            time.sleep(5)  # let a writer finish the last file
            return True
        if time.time() >= deadline:
            return False
        if not announced:
            print(f"waiting up to {minutes} min for {', '.join(str(p) for p in paths)} (polling every minute)",
                  flush=True)
            announced = True
        time.sleep(60)


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def fmt_rss(res: dict | None) -> str:
    if res is None:
        return "-"
    if not ok(res):
        return "OOM/over limit" if "over limit" in res["status"] else "error"
    return f"{res['ru_maxrss_mib']:.0f}"


def bench_model(key: str, args, runner: Runner, tmp: Path) -> dict:
    cfg = MODELS[key]
    model = cfg["dir"] / "model.onnx"
    work = tmp / key
    work.mkdir()
    batch = cfg["batch"]
    methods = args.methods
    do_rss = not args.skip_rss
    sizes = sorted(set(RSS_SAMPLES) | set(cfg["ort_rss_samples"])) if do_rss else [64]
    print(f"\n== {cfg['title']}: preparing data", flush=True)
    prep = runner.run({"worker": "prep", "kind": key, "dir": str(cfg["dir"]), "out": str(work), "batch": batch,
                       "sizes": sizes, "shift": cfg["shift"], "noise": cfg["noise"],
                       "calib_limit": args.effnet_calib if key == "effnet" else None,
                       "eval_limit": args.effnet_eval if key == "effnet" else None}, f"{key} prep")
    if not ok(prep):
        return {"key": key, "error": prep["status"]}
    out = {"key": key, "prep": prep, "time": {}, "rss": {}, "acc": {}}

    # 1. calibration wall time, qtool and ORT interleaved, on the whole calibration set
    repeats = args.repeats if key == "cnn" else args.effnet_repeats
    for method in methods:
        for r in range(repeats):
            for tool in ("qtool", "ort"):
                if tool == "ort" and ORT_METHOD[method] is None:
                    continue
                save = str(work / f"{tool}-{method}.{'json' if tool == 'qtool' else 'ortcache.json'}")
                res = runner.run({"worker": "calib", "tool": tool, "method": method, "batch": batch,
                                  "model": str(model), "data": str(work / "calib"),
                                  "augmented": str(work / f"augmented-{method}-{r}.onnx"),
                                  "save": save if r == 0 else None},
                                 f"{key} time {tool} {method} #{r + 1}")
                out["time"].setdefault((tool, method), []).append(res)

    # 2. peak RSS at 64 / 1,024 samples (ORT on EfficientNet: 32 / 64)
    if do_rss:
        for method in methods:
            for tool in ("qtool", "ort"):
                if tool == "ort" and ORT_METHOD[method] is None:
                    continue
                for n in (RSS_SAMPLES if tool == "qtool" else cfg["ort_rss_samples"]):
                    res = runner.run({"worker": "calib", "tool": tool, "method": method, "batch": batch,
                                      "model": str(model), "data": str(work / f"n{n}"),
                                      "augmented": str(work / f"augmented-rss-{method}-{n}.onnx"),
                                      "save": str(work / f"ort-{method}-n64.ortcache.json")
                                      if (tool, n) == ("ort", 64) else None},
                                     f"{key} rss {tool} {method} n={n}")
                    out["rss"][(tool, method, n)] = res

    # 3. accuracy of the int8 models
    if not args.skip_accuracy:
        ev = cfg["dir"] / "eval.npz" if key == "cnn" else work / "eval.npz"
        ref = str(work / "ref_logits.npy") if key == "effnet" else None
        common = {"worker": "accuracy", "model": str(model), "eval": str(ev), "ref": ref, "batch": batch,
                  "eval_batch": 250 if key == "cnn" else 16, "calib": str(work / "calib")}
        out["acc"]["fp32"] = runner.run(dict(common, tool="fp32"), f"{key} eval fp32")
        for method in methods:
            table = work / f"qtool-{method}.json"
            if table.is_file():
                out["acc"][("qtool", method)] = runner.run(
                    dict(common, tool="qtool", method=method, table=str(table),
                         out=str(work / f"qtool-{method}.int8.onnx")), f"{key} eval qtool {method}")
            if ORT_METHOD[method] is not None:
                out["acc"][("ort", method)] = ort_accuracy(runner, common, work, key, method,
                                                           ort_calib_mode(args, key), out["time"])
    return out


def ort_calib_mode(args, key: str) -> str:
    if args.ort_accuracy_calib != "auto":
        return args.ort_accuracy_calib
    return "rerun" if key == "cnn" else "cache"


def ort_accuracy(runner: Runner, common: dict, work: Path, key: str, method: str, mode: str, timing: dict) -> dict:
    """ORT's int8 model for ``method``: quantize_static calibrating on the calibration set itself
    (rerun), or fed the timing run's ranges through calibration_cache_path (cache: the same
    calibrator, data and options, computed once). When the whole set is over the memory limit,
    the first 64 calibration images are used instead (res["fallback"])."""
    cache, small = work / f"ort-{method}.ortcache.json", work / "n64"
    timed = timing.get(("ort", method), [{}])[0]
    if mode == "cache" and cache.is_file():
        res = runner.run(dict(common, tool="ort", method=method, cache=str(cache),
                              out=str(work / f"ort-{method}.int8.onnx")), f"{key} eval ort {method} (cache)")
    elif mode == "cache" and "over limit" in timed.get("status", ""):
        res = {"status": "over limit (the timing run on the whole calibration set was; not repeated)"}
    else:
        res = runner.run(dict(common, tool="ort", method=method, cache=None,
                              out=str(work / f"ort-{method}.int8.onnx")), f"{key} eval ort {method}")
    if not ok(res) and "over limit" in res["status"]:
        small_cache = work / f"ort-{method}-n64.ortcache.json"
        use = mode == "cache" and small_cache.is_file()
        res["fallback"] = runner.run(dict(common, tool="ort", method=method, calib=str(small),
                                          cache=str(small_cache) if use else None,
                                          out=str(work / f"ort-{method}-64.int8.onnx")),
                                     f"{key} eval ort {method} (64 calibration images)")
    return res


def metric(res: dict | None, key: str) -> str:
    if res is None:
        return "-"
    if not ok(res):
        text = "OOM/over limit" if "over limit" in res["status"] else "error"
        if ok(res.get("fallback")):
            text += f"; {metric(res['fallback'], key)} @64"
        return text
    if key == "cnn":
        return f"{res['top1']:.4f}"
    return f"{res['agree']:.3f}/{res['top5_overlap']:.3f}"


def report(out: dict, args) -> None:
    key = out["key"]
    cfg = MODELS[key]
    print(f"\n=== {cfg['title']} ===")
    if "error" in out:
        print(f"failed to prepare data: {out['error']}")
        return
    prep = out["prep"]
    batch = cfg["batch"]
    if key == "cnn":
        ev = "2,000 eval images with labels; metric = top-1 accuracy"
    else:
        ev = (f"{prep['eval_samples']} of {prep['eval_available']} eval images (no labels); metric = top-1 "
              "agreement with fp32 / mean top-5 overlap with fp32")
    fp32 = out["acc"].get("fp32")
    if key == "cnn" and ok(fp32):
        ev += f"; fp32 top-1 {fp32['top1']:.4f}"
    print(f"calibration set: {prep['calib_samples']} samples {prep['calib_shape'][1:]}, batch {batch}; "
          f"eval: {ev}")
    ort_n = cfg["ort_rss_samples"]
    rows = []
    slopes = {}
    for method in args.methods:
        qt = [r for r in out["time"].get(("qtool", method), []) if ok(r)]
        ot = [r for r in out["time"].get(("ort", method), []) if ok(r)]
        q_s = median([r["seconds"] for r in qt]) if qt else None
        o_s = median([r["seconds"] for r in ot]) if ot else None
        has_ort = ORT_METHOD[method] is not None
        q_s_txt = f"{q_s:.2f}" if q_s is not None else "error"
        if not has_ort:
            o_s_txt, speed = "n/a", "n/a"
        elif o_s is None:
            bad = out["time"].get(("ort", method), [{}])[0]
            o_s_txt, speed = ("OOM/over limit" if "over limit" in bad.get("status", "") else "error"), "-"
        else:
            o_s_txt = f"{o_s:.2f}"
            speed = f"{o_s / q_s:.2f}x" if q_s else "-"
        rss = out["rss"]
        q64, q1k = rss.get(("qtool", method, 64)), rss.get(("qtool", method, 1024))
        ratio = f"{q1k['ru_maxrss_mib'] / q64['ru_maxrss_mib']:.2f}" if ok(q64) and ok(q1k) else "-"
        if not has_ort:
            o64 = o1k = "n/a"
        elif ort_n == (64, 1024):
            o64, o1k = fmt_rss(rss.get(("ort", method, 64))), fmt_rss(rss.get(("ort", method, 1024)))
        else:
            a, b = rss.get(("ort", method, ort_n[0])), rss.get(("ort", method, ort_n[1]))
            o64 = fmt_rss(b)
            if ok(a) and ok(b):
                slope = (b["ru_maxrss_mib"] - a["ru_maxrss_mib"]) / (ort_n[1] - ort_n[0])
                slopes[method] = (slope, a["ru_maxrss_mib"], b["ru_maxrss_mib"])
                o1k = f"~{b['ru_maxrss_mib'] + slope * (1024 - ort_n[1]):.0f} (extrap.)"
            else:
                o1k = "-" if a is None and b is None else "n/a (no fit)"
        rows.append((method, q_s_txt, o_s_txt, speed, fmt_rss(q64), fmt_rss(q1k), ratio, o64, o1k,
                     metric(out["acc"].get(("qtool", method)), key),
                     "n/a" if not has_ort else metric(out["acc"].get(("ort", method)), key)))
    mname = "top-1" if key == "cnn" else "agree/top5"
    print_table(rows, ("method", "qtool s", "ORT s", "speedup", "qtool RSS@64", "RSS@1024", "ratio",
                       "ORT RSS@64", "ORT RSS@1024", f"qtool {mname}", f"ORT {mname}"))
    print("  s: calibration wall time, median of "
          f"{args.repeats if key == 'cnn' else args.effnet_repeats} run(s), each in a fresh process; "
          "speedup = ORT s / qtool s. RSS: peak ru_maxrss in MiB of a process that only calibrates "
          "(python + numpy + onnxruntime imported: "
          f"~{_base_rss(out):.0f} MiB before calibrating). mse: ORT has no MSE calibrator (n/a).")
    if not args.skip_rss:
        print(f"  RSS sets: the first 64 calibration images; 1,024 = calibration images repeated with random "
              f"flip + shift <= {cfg['shift']} px" + (f" + N(0, {cfg['noise']}) noise" if cfg["noise"] else "")
              + f", streamed from a directory of {batch}-sample .npz files (qtool: the directory; "
              "ORT: a CalibrationDataReader reading one file at a time).")
    for method in args.methods:
        q, o = out["rss"].get(("qtool", method, 64)), out["rss"].get(("ort", method, 64))
        t = out["time"].get(("ort", method))
        if ok(q) and ok(o) and t and not ok(t[0]):
            print(f"  {method} at 64 samples (the RSS runs): qtool {q['seconds']:.2f} s, ORT {o['seconds']:.2f} s, "
                  f"speedup {o['seconds'] / q['seconds']:.2f}x")
    for method, (slope, a, b) in slopes.items():
        print(f"  ORT {method}: RSS {a:.0f} MiB @{ort_n[0]}, {b:.0f} MiB @{ort_n[1]} -> {slope:.1f} MiB/sample; "
              f"RSS@1024 EXTRAPOLATED linearly (ORT not run at 1,024 samples on this model)")
    if key == "cnn" and "rss" in out:
        for method in args.methods:
            a, b = out["rss"].get(("ort", method, 64)), out["rss"].get(("ort", method, 1024))
            if ok(a) and ok(b):
                print(f"  ORT {method}: {(b['ru_maxrss_mib'] - a['ru_maxrss_mib']) / 960:.3f} MiB/sample "
                      "growth between 64 and 1,024 samples")
    # targets
    for method in args.methods:
        q64, q1k = out["rss"].get(("qtool", method, 64)), out["rss"].get(("qtool", method, 1024))
        if ok(q64) and ok(q1k):
            o = out["rss"].get(("ort", method, 1024))
            o_val = o["ru_maxrss_mib"] if ok(o) else (slopes[method][2] + slopes[method][0] * (1024 - ort_n[1])
                                                      if method in slopes else None)
            below = "n/a (no ORT)" if ORT_METHOD[method] is None else (
                str(q1k["ru_maxrss_mib"] < o_val) if o_val is not None else
                ("True (ORT over limit)" if o and "over limit" in o.get("status", "") else "-"))
            print(f"  target {method}: qtool RSS@1024 <= 1.2x RSS@64: "
                  f"{q1k['ru_maxrss_mib'] <= 1.2 * q64['ru_maxrss_mib']}; below ORT's: {below}")
    # phases
    print("  phases (first timing run): ", end="")
    parts = []
    for method in args.methods:
        for tool in ("qtool", "ort"):
            rs = out["time"].get((tool, method))
            if rs and ok(rs[0]) and "phases" in rs[0]:
                ph = " ".join(f"{k} {v:.2f}" for k, v in rs[0]["phases"].items())
                parts.append(f"{tool} {method} [{ph}; {rs[0].get('tensors')} tensors]")
    print("; ".join(parts))
    if len(next(iter(out["time"].values()), [])) > 1:
        spread = []
        for (tool, method), rs in out["time"].items():
            vals = [f"{r['seconds']:.2f}" for r in rs if ok(r)]
            spread.append(f"{tool} {method}: {', '.join(vals)}")
        print("  all timing runs (s): " + "; ".join(spread))
    problems = [(k, r["status"]) for d in ("time", "rss", "acc") for k, rs in out[d].items()
                for r in (rs if isinstance(rs, list) else [rs]) if not ok(r)]
    for k, status in problems:
        print(f"  NOTE {k}: {status}")
    if any(isinstance(r, dict) and "fallback" in r for r in out["acc"].values()):
        print("  '... @64': quantize_static over the memory limit on the whole calibration set; the metric after "
              "it is quantize_static on the first 64 calibration images (in cache mode, fed the ranges of the 64-sample "
              "RSS run)")
    if ort_calib_mode(args, key) == "cache":
        print("  ORT metric: quantize_static(..., calibration_cache_path=C) where C holds the TensorsData of the "
              "timing run above (save_tensors_data; same calibrator, data and method, so ORT's calibration is not "
              "run a second time)")
    else:
        print("  ORT metric: quantize_static calibrating itself on the calibration set (its op types: the "
              "quantizable ones)")


def _base_rss(out: dict) -> float:
    vals = [r["base_rss_mib"] for rs in out["time"].values() for r in rs if ok(r) and "base_rss_mib" in r]
    return min(vals) if vals else float("nan")


def git_state() -> str:
    """HEAD and whether qtool/ has uncommitted changes (others edit it while benchmarks run)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qtool"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {head}" + (f" + uncommitted changes in {len(dirty)} qtool/ path(s)" if dirty else " (clean)")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,effnet", help="comma-separated: cnn, effnet")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    ap.add_argument("--skip-rss", action="store_true", help="skip the 64/1,024-sample peak RSS runs")
    ap.add_argument("--skip-accuracy", action="store_true", help="skip quantize + eval")
    ap.add_argument("--repeats", type=int, default=3, help="timing runs per tool and method on the CNN (median)")
    ap.add_argument("--effnet-repeats", type=int, default=1, help="timing runs per tool and method on EfficientNet")
    ap.add_argument("--effnet-eval", type=int, default=256, help="EfficientNet eval images used (0: all)")
    ap.add_argument("--effnet-calib", type=int, default=0, help="EfficientNet calibration images used (0: all)")
    ap.add_argument("--ort-accuracy-calib", choices=("auto", "rerun", "cache"), default="auto",
                    help="ORT int8 models: quantize_static calibrates again (rerun) or reads the timing run's "
                         "ranges through calibration_cache_path (cache); auto: rerun on the CNN, cache on "
                         "EfficientNet (calibrating it takes minutes)")
    ap.add_argument("--mem-limit-gib", type=float, default=0.0,
                    help="RSS limit per worker (default: min(14, MemAvailable - 3) GiB)")
    ap.add_argument("--effnet-dir", type=Path, default=MODELS["effnet"]["dir"],
                    help="where model.onnx, calib.npz and eval.npz of EfficientNet-Lite0 are (default: %(default)s)")
    ap.add_argument("--wait-minutes", type=int, default=30, help="how long to wait for the EfficientNet files")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every worker's result as it ends")
    args = ap.parse_args()
    MODELS["effnet"]["dir"] = args.effnet_dir.expanduser().resolve()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}")
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}")
    limit = int(args.mem_limit_gib * GiB) if args.mem_limit_gib else int(min(14 * GiB, mem_available() - 3 * GiB))
    versions = subprocess.run([sys.executable, "-c", "import onnxruntime, onnx, numpy, qtool; print(onnxruntime.__version__, "
                               "onnx.__version__, numpy.__version__, qtool.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    start = time.perf_counter()
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1]]
                                 + [os.path.relpath(__file__, ROOT)] + sys.argv[1:]))
    print(f"onnxruntime {versions[0]}, onnx {versions[1]}, numpy {versions[2]}, qtool {versions[3]}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("qtool source: " + git_state())
    print(f"threads: onnxruntime intra_op_num_threads={THREADS} (inter_op 1) in every worker -- qtool via "
          f"calibrate(threads={THREADS}); ORT by replacing CalibraterBase.create_inference_session with the same "
          "session it builds (ORT_DISABLE_ALL) plus the thread settings; OMP/OPENBLAS/MKL_NUM_THREADS=2")
    print("ORT calibration: create_calibrator(model, op_types_to_calibrate=None (all float tensors), "
          "augmented_model_path=tmp, calibrate_method=X, extra_options=defaults) + collect_data + compute_data; "
          + "; ".join(f"{ORT_METHOD[m]} {o}" for m, o in ORT_EXTRA.items()))
    print("ORT quantize_static: quant_format=QDQ, per_channel=True, activation_type=QInt8, weight_type=QInt8, "
          "calibrate_method=same")
    print(f"qtool: calibrate(model, data, CalibrateOptions(method=X, batch_size=B), threads=2) ({QTOOL_DEFAULTS}); "
          "quantize(model, out, table=...) with QuantizeOptions defaults (QDQ, per-channel int8 weights, "
          "asymmetric int8 activations)")
    print(f"memory guard: each worker RLIMIT_AS {(limit + 3 * GiB) / GiB:.1f} GiB and killed above "
          f"{limit / GiB:.1f} GiB RSS", flush=True)
    runner = Runner(limit, args.verbose)
    results = []
    with tempfile.TemporaryDirectory(prefix="qtool-calib-bench.") as tmp:
        for key in models:
            cfg = MODELS[key]
            need = [cfg["dir"] / f for f in ("model.onnx", "calib.npz", "eval.npz")]
            if key == "effnet" and not all(p.is_file() for p in need) and not wait_for(need, args.wait_minutes):
                print(f"\n=== {cfg['title']}: skipped -- {cfg['dir']} has no model.onnx/calib.npz/eval.npz "
                      f"after {args.wait_minutes} min (run calibration/efficientnet-lite0/make.py)")
                continue
            results.append(bench_model(key, args, runner, Path(tmp)))
    for out in results:
        report(out, args)
    print(f"\ntotal run time {time.perf_counter() - start:.0f} s; load average at end "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
