#!/usr/bin/env python3
"""The accuracy-driven search against issue 10's targets, side by side in one run.

For each model: ``qtool quantize --eval-data ... GATES`` (the search; its trail, evaluations and
wall time), then ``qtool eval`` of the written model against fp32 at batch 1 (paired, interleaved
timing, 2 threads), then what a user gets from ``onnxruntime.quantization.quantize_static`` (QDQ,
per-channel, u8 activations, s8 weights, MinMax) when excluding by hand the op types the search
moved to float, judged by the same ``qtool eval`` gates.

    python benchmarks/search.py [--only sample,efficientnet,minilm,detector] [--out DIR]

Models: the bundled Fashion-MNIST sample; EfficientNet-Lite0 and all-MiniLM-L6-v2 as built by
``calibration/efficientnet-lite0/make.py`` and ``calibration/minilm/make.py``; the detector from
``calibration/detector/make.py`` (all under ~/.cache/qtool). A missing model is reported and
skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QTOOL_CACHE", Path.home() / ".cache" / "qtool"))
THREADS = 2


def models() -> dict[str, dict]:
    s, e, m, d = ROOT / "calibration" / "fashion-mnist", CACHE / "efficientnet-lite0", CACHE / "minilm", \
        CACHE / "detector"
    return {
        "sample": dict(model=s / "model.onnx", calib=s / "calib.npz", eval=s / "eval.npz",
                       gates=["--max-drop", "0.003", "--min-speedup", "1.0"], extra=["--config", "configs/cnn-cpu.toml"],
                       target="accuracy drop <= 0.3 points and not slower than fp32 (or exit 1 saying why)"),
        "efficientnet": dict(model=e / "model.onnx", calib=e / "calib.npz", eval=e / "eval.npz",
                             gates=["--min-agreement", "0.95", "--min-speedup", "1.25"],
                             target="top-1 agreement >= 0.95, >= 80% MACs int8, latency <= 0.8x fp32"),
        "minilm": dict(model=m / "model.onnx", calib=m / "calib", eval=m / "eval",
                       gates=["--min-cosine", "0.995", "--task", str(ROOT / "calibration/minilm/task.py"),
                              "--max-task-drop", "0.003", "--min-speedup", "1.667"],
                       target="retrieval within 0.3 points, mean cosine >= 0.995, latency <= 0.6x fp32"),
        "detector": dict(model=d / "model.onnx", calib=d / "calib.npz", eval=d / "eval.npz",
                         gates=["--task", str(ROOT / "calibration/detector/task.py"), "--max-task-drop", "0.05",
                                "--min-speedup", "1.0"],
                         target="F1 vs fp32 >= 0.95, >= 80% MACs int8, latency <= 1.0x fp32"),
    }


def qtool(*args) -> tuple[int, str, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qtool.cli", *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def judge(spec, candidate: Path, out: Path, label: str) -> dict:
    gates = [g for g in spec["gates"]]
    rc, stdout, stderr, _ = qtool("eval", spec["model"], candidate, "--data", spec["eval"], "--batch-size", 1,
                                  "--threads", THREADS, "--repeats", 100, "--json", out / f"{label}.eval.json", *gates)
    if rc not in (0, 1):
        return {"error": stderr.strip()[-300:]}
    r = json.loads((out / f"{label}.eval.json").read_text())
    ps = r.get("paired_speedup") or {}
    outs = r["outputs"]
    return {"passed": r["passed"], "agreement": next((o["top1_agreement"] for o in outs
                                                      if o["top1_agreement"] is not None), None),
            "min_cosine": min(o["cosine"] for o in outs), "min_snr": min(o["snr_db"] for o in outs),
            "drop": r.get("accuracy_drop"), "task_drop": r.get("task_drop"),
            "speedup": ps.get("median"), "p10": ps.get("p10"), "p90": ps.get("p90"),
            "gates": [g["message"] for g in r["gates"]], "warnings": r.get("warnings", [])}


def ort_by_hand(spec, float_ops: set[str], out: Path, nodes: set[str] | None = None) -> Path | None:
    """onnxruntime's quantize_static with every node of the op types the search kept float excluded
    (or, with ``nodes``, exactly those nodes)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    sys.path.insert(0, str(ROOT))
    from qtool.data import Dataset
    model = onnx.load(str(spec["model"]), load_external_data=False)
    exclude = [n.name for n in model.graph.node if n.name and (n.name in nodes if nodes is not None
                                                               else n.op_type in float_ops)]
    names = {i.name for i in model.graph.input}
    batches = [{k: v for k, v in b.items() if k in names} for b in Dataset(spec["calib"]).batches(16)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    path = out / ("ort_nodes.onnx" if nodes is not None else "ort.onnx")
    quantize_static(str(spec["model"]), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    return path


def run_one(name: str, spec: dict, out: Path) -> None:
    print(f"\n=== {name}: target {spec['target']}", flush=True)
    missing = [k for k in ("model", "calib", "eval") if not Path(spec[k]).exists()]
    if missing:
        print(f"skipped: {', '.join(str(spec[k]) for k in missing)} missing (build it with its recipe)")
        return
    out.mkdir(parents=True, exist_ok=True)
    q = out / "search.onnx"
    if q.exists():
        q.unlink()
    rc, stdout, stderr, wall = qtool("quantize", spec["model"], "--data", spec["calib"], "-o", q,
                                     "--eval-data", spec["eval"], *spec["gates"], *spec.get("extra", []),
                                     "--threads", THREADS, "--trail", out / "trail.json",
                                     "--save-plan", out / "plan.json", "--best-effort")
    print(stdout.rstrip())
    if stderr.strip():
        print("stderr: " + stderr.strip().splitlines()[-1])
    print(f"search exit {rc}, wall {wall:.1f} s")
    trail = json.loads((out / "trail.json").read_text()) if (out / "trail.json").exists() else None
    if not q.exists():
        return
    plan = json.loads((out / "plan.json").read_text())
    moved = set(trail["final"]["fallback"]) if trail else set()
    moved |= {o.rsplit("=", 1)[0] for o in (trail or {}).get("final", {}).get("overrides", []) if o.endswith("=fp32")}
    float_ops = {n["op_type"] for n in plan["nodes"] if n["name"] in moved}
    ours = judge(spec, q, out, "search")
    base = out / "default.onnx"
    rc0, _, err0, _ = qtool("quantize", spec["model"], "--data", spec["calib"], "-o", base, *spec.get("extra", []))
    if rc0 == 0:
        print(f"default int8 (no search): {json.dumps(judge(spec, base, out, 'default'))}")
    print(f"search model: int8 MACs {trail['final']['int8_mac_share'] * 100:.1f}%, {len(moved)} nodes moved "
          f"({', '.join(sorted(float_ops)) or 'none'}); eval: {json.dumps(ours)}")
    floats = {n["name"] for n in plan["nodes"] if n["precision"] in ("float", "fp16")}
    for label, nodes in (("ort", None), ("ort_nodes", floats)):
        if not float_ops:
            break
        what = (f"the op types {', '.join(sorted(float_ops))}" if nodes is None
                else f"the same {len(floats)} float nodes by name")
        try:
            ort = ort_by_hand(spec, float_ops, out, nodes)
            theirs = judge(spec, ort, out, label)
            print(f"onnxruntime.quantization excluding {what}: {json.dumps(theirs)}")
        except Exception as exc:  # reported, not hidden
            print(f"onnxruntime.quantization excluding {what} failed: {type(exc).__name__}: {str(exc)[:200]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="sample,efficientnet,minilm,detector")
    ap.add_argument("--out", default=str(CACHE / "search-bench"))
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}; {THREADS} threads; numpy {np.__version__}")
    specs = models()
    for name in args.only.split(","):
        run_one(name, specs[name], Path(args.out) / name)


if __name__ == "__main__":
    main()
