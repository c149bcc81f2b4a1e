"""SmoothQuant (--algorithms smoothquant): static int8 with and without it, on MiniLM (mean and
minimum cosine of sentence embeddings to fp32's, retrieval top-1, calibration/minilm/task.py), the
bundled sample and EfficientNet-Lite0 (top-1 agreement with fp32).

    python benchmarks/smoothquant_agreement.py [--models minilm,sample,effnet] [--weight-type auto]
                                               [--calib 128] [--eval 512]

MiniLM and EfficientNet-Lite0 need their recipes' data (calibration/minilm/make.py,
calibration/efficientnet-lite0/make.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qtool
from qtool.config import CalibrateOptions, QuantizeOptions

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "qtool"
IMAGES = {"sample": ROOT / "calibration" / "fashion-mnist", "effnet": CACHE / "efficientnet-lite0"}
THREADS = 2


def outputs(path, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def quantized(model, data, algorithms, weight_type, limit, tmp):
    t0 = time.perf_counter()
    options = QuantizeOptions(algorithms=algorithms, weight_type=weight_type)
    table = qtool.calibrate(model, data, CalibrateOptions(limit=limit), options, threads=THREADS)
    seconds = time.perf_counter() - t0
    out = Path(tmp) / f"q{'_'.join(algorithms)}.onnx"
    result = qtool.quantize(model, out, table=table, options=options)
    notes = [n for n in result.plan.notes if n.startswith("smoothquant")]
    return out, seconds, notes[0] if notes else ""


def images(label, d, args):
    data = np.load(d / "eval.npz")
    feeds = {k: data[k][:args.eval] for k in data.files if k != "labels"}
    ref = outputs(d / "model.onnx", feeds).argmax(1)
    for algorithms in ((), ("smoothquant",)):
        with tempfile.TemporaryDirectory() as tmp:
            out, seconds, note = quantized(d / "model.onnx", d / "calib.npz", algorithms, args.weight_type,
                                           args.calib, tmp)
            got = outputs(out, feeds).argmax(1)
        print(f"{label:8s} {'smoothquant' if algorithms else 'none':11s} agreement {float((got == ref).mean()):.4f}"
              f"  calibrate {seconds:.0f} s  {note}", flush=True)


def minilm(args):
    d = CACHE / "minilm"
    spec = importlib.util.spec_from_file_location("minilm_task", ROOT / "calibration" / "minilm" / "task.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    meta = task.load_meta(d)
    ref = task.embed(d / "model.onnx", d, THREADS, meta)
    print(f"minilm   fp32        retrieval top-1 {task.retrieval_top1(ref, meta)[0]:.4f}", flush=True)
    for algorithms in ((), ("smoothquant",)):
        with tempfile.TemporaryDirectory() as tmp:
            out, seconds, note = quantized(d / "model.onnx", d / "calib", algorithms, args.weight_type, None, tmp)
            emb = task.embed(out, d, THREADS, meta)
        cos = (emb * ref).sum(1)
        print(f"minilm   {'smoothquant' if algorithms else 'none':11s} mean cos {cos.mean():.5f}  min cos "
              f"{cos.min():.5f}  retrieval top-1 {task.retrieval_top1(emb, meta)[0]:.4f}  calibrate {seconds:.0f} s  "
              f"{note}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,sample,effnet")
    ap.add_argument("--weight-type", default="auto", choices=("auto", "int8", "uint8"))
    ap.add_argument("--calib", type=int, default=128, help="image models: calibration samples")
    ap.add_argument("--eval", type=int, default=512, help="image models: evaluation samples")
    args = ap.parse_args()
    for name in args.models.split(","):
        if name == "minilm":
            minilm(args)
        elif (IMAGES[name] / "model.onnx").exists():
            images(name, IMAGES[name], args)
        else:
            print(f"{name}: {IMAGES[name] / 'model.onnx'} missing, skipped")


if __name__ == "__main__":
    main()
