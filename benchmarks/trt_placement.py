"""--target trt against --target cpu on onnxruntime's CPU EP: accuracy and Q/DQ placement.

The TensorRT-placed model (symmetric int8, Q/DQ on the inputs of the ops TensorRT runs in
int8, see qtool/rules/trt.py) is run on the CPU EP with graph optimisations off ("ref"), so
every Q/DQ pair runs as written: the numbers TensorRT approximates. It is also run optimised
("ort-all"), as the CPU EP would deploy it: there onnxruntime fuses some DQ -> Conv -> Q into
QLinearConv, which on x86-64 without VNNI saturates with full 8-bit int8 weights, an artefact
of this EP. The cpu target row is its deployment (optimised). This measures what the placement
costs in accuracy and how many Q/DQ pairs it writes, not TensorRT's speed (no TensorRT here).

The cpu row and the first trt row share one minmax table; the trt rows after it use
percentile and entropy tables (ModelOpt's int8 default is entropy).

    python benchmarks/trt_placement.py [--models sample,effnet] [--eval-n 512]

Models: the bundled sample (calibration/fashion-mnist: accuracy on eval.npz's labels) and
EfficientNet-Lite0 (~/.cache/qtool/efficientnet-lite0, built by
calibration/efficientnet-lite0/make.py: top-1 agreement / top-5 overlap with fp32).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import session  # noqa: E402

MODELS = {
    "sample": (ROOT / "calibration" / "fashion-mnist", "model.onnx", "calib.npz", "eval.npz"),
    "effnet": (Path.home() / ".cache" / "qtool" / "efficientnet-lite0", "model.onnx", "calib.npz", "eval.npz"),
}


def outputs(path, x, name="input", batch=32, optimise=True) -> np.ndarray:
    s = session(path)
    if not optimise:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 2, 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def placement(q: onnx.ModelProto, plan) -> dict:
    counts = Counter(n.op_type for n in q.graph.node)
    inits = {i.name for i in q.graph.initializer}
    act_dq = sum(1 for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits)
    return {"Q (activation pairs)": counts["QuantizeLinear"], "activation DQ": act_dq,
            "weight DQ": counts["DequantizeLinear"] - act_dq,
            "quantized nodes": len(plan.all_quantized_nodes()),
            "int8 ops": dict(Counter(n.op_type for n in plan.all_quantized_nodes() if not n.fused_into))}


def metrics(out, ref, labels) -> dict:
    top1 = float((out.argmax(1) == ref.argmax(1)).mean())
    t5o, t5r = np.argsort(-out, 1)[:, :5], np.argsort(-ref, 1)[:, :5]
    m = {"top-1 agreement": top1,
         "top-5 overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5o, t5r)])),
         "cosine": float(np.mean(np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))))}
    if labels is not None:
        m["accuracy"] = float((out.argmax(1) == labels).mean())
    return m


def run(key: str, eval_n: int, tmp: Path) -> None:
    import qtool
    from qtool.config import CalibrateOptions, QuantizeOptions
    folder, model, calib, evals = MODELS[key]
    model = folder / model
    if not model.exists():
        print(f"{key}: {model} missing (build it first); skipped")
        return
    with np.load(folder / evals) as z:
        x = z["input"][:eval_n]
        labels = z["labels"][:eval_n] if "labels" in z.files else None
    ref = outputs(model, x)
    rows = {"fp32": metrics(ref, ref, labels)}
    for method in ("minmax", "percentile", "entropy"):
        table = qtool.calibrate(model, folder / calib, options=CalibrateOptions(method=method))
        for target in (("cpu", "trt") if method == "minmax" else ("trt",)):
            out = tmp / f"{key}.{target}.{method}.onnx"
            result = qtool.quantize(model, out, table=table, options=QuantizeOptions(target=target))
            where = placement(onnx.load(out), result.plan)
            if target == "cpu":
                rows[f"cpu {method} ort-all"] = {**metrics(outputs(out, x), ref, labels), **where}
                continue
            rows[f"trt {method} ref"] = {**metrics(outputs(out, x, optimise=False), ref, labels), **where}
            if method == "minmax":
                rows[f"trt {method} ort-all"] = metrics(outputs(out, x), ref, labels)
    print(f"\n{key}: {model} ({len(x)} eval samples, tables from {calib}); CPU EP, 2 threads")
    for name, row in rows.items():
        print(f"  {name:22s} " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in row.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sample,effnet")
    ap.add_argument("--eval-n", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for key in args.models.split(","):
            run(key, args.eval_n, Path(d))
    print("\nNo TensorRT here: the trt rows are the TensorRT placement run on onnxruntime's CPU EP "
          "(accuracy only; no TensorRT timing).")


if __name__ == "__main__":
    main()
