"""qtool vs onnxruntime.quantization.quantize_static on the bundled Fashion-MNIST CNN.

Both quantize the same model with the same 256 calibration images: QDQ, per-channel int8
weights, int8 activations, MinMax. Prints accuracy on the 2,000 eval images, sizes, and
latency at batch 64 on 2 threads as ratios to fp32, all measured in this one run.

    python benchmarks/fashion_mnist.py [--repeats 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NpzReader, accuracy, interleaved_latency, print_table, session, size  # noqa: E402

import qtool  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "calibration" / "fashion-mnist"


def ort_version():
    import onnxruntime
    return onnxruntime.__version__


def ort_static(model, calib: dict, out) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    t0 = time.perf_counter()
    quantize_static(str(model), str(out), NpzReader(calib, 32), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - t0


def full_test_set():
    """The 10,000 Fashion-MNIST test images from Debian's package, when installed."""
    import gzip
    d = Path("/usr/share/datasets/fashion-mnist")
    if not (d / "t10k-images-idx3-ubyte.gz").exists():
        return None
    x = np.frombuffer(gzip.open(d / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    y = np.frombuffer(gzip.open(d / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    x = ((x.reshape(-1, 1, 28, 28).astype(np.float32) / 255) - 0.2860) / 0.3530
    return x, y.astype(np.int64)


def fidelity(sessions, x):
    """Top-1 agreement with fp32 and SNR (dB) of the logits, per model."""
    logits = {k: np.concatenate([s.run(None, {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])
              for k, s in sessions.items()}
    ref = logits["fp32"]
    out = {}
    for k, v in logits.items():
        noise = float(((v - ref) ** 2).sum())
        snr = float("inf") if noise == 0 else 10 * np.log10(float((ref ** 2).sum()) / noise)
        out[k] = (float((v.argmax(1) == ref.argmax(1)).mean()), snr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    model = SAMPLE / "model.onnx"
    calib = dict(np.load(SAMPLE / "calib.npz"))
    calib.pop("labels", None)
    ev = np.load(SAMPLE / "eval.npz")
    x, y = ev["input"], ev["labels"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        qtool.quantize(model, tmp / "qtool.onnx", data=SAMPLE / "calib.npz")
        t_qtool = time.perf_counter() - t0
        t_ort = ort_static(model, calib, tmp / "ort.onnx")
        paths = {"fp32": model, "qtool": tmp / "qtool.onnx", "ort": tmp / "ort.onnx"}
        sessions = {k: session(p) for k, p in paths.items()}
        acc = {k: accuracy(s, x, y, "input")[0] for k, s in sessions.items()}
        fid = fidelity(sessions, x)
        full = full_test_set()
        acc_full = {k: accuracy(s, full[0], full[1], "input")[0] for k, s in sessions.items()} if full else None
        feeds = {"input": x[:args.batch]}
        lat = interleaved_latency(sessions, feeds, repeats=args.repeats)
        sizes = {k: size(p) for k, p in paths.items()}
        rows = []
        for k in paths:
            rows.append((k, f"{acc[k]:.4f}", f"{(acc[k] - acc['fp32']) * 100:+.2f}",
                         f"{acc_full[k]:.4f}" if acc_full else "n/a", f"{fid[k][0]:.4f}", f"{fid[k][1]:.1f}",f"{sizes[k]:,}",
                         f"{sizes[k] / sizes['fp32']:.3f}", f"{lat[k]:.3f}", f"{lat[k] / lat['fp32']:.3f}",
                         {"fp32": "-", "qtool": f"{t_qtool:.2f}", "ort": f"{t_ort:.2f}"}[k]))
    print(f"Fashion-MNIST CNN, {len(y)} eval images (top-1 10k: the full test set from dataset-fashion-mnist; "
          "agree/SNR: logits vs fp32 on the eval images)")
    print(f"ORT: quantize_static QDQ, per_channel=True, QInt8 activations and weights, MinMax, same calib.npz; "
          f"onnxruntime {ort_version()}")
    print(f"Latency: batch {args.batch}, 2 threads, "
          f"median of {args.repeats} interleaved runs")
    print_table(rows, ("model", "top-1", "drop pts", "top-1 10k", "agree", "SNR dB", "bytes", "size/fp32", "ms", "lat/fp32", "quantize s"))
    print(f"qtool int8 latency / ORT int8 latency: {lat['qtool'] / lat['ort']:.3f}")
    print(f"targets: qtool drop <= 0.30 pts: {acc['fp32'] - acc['qtool'] <= 0.003}; "
          f"qtool >= ORT accuracy: {acc['qtool'] >= acc['ort']}; size <= 30%: {sizes['qtool'] <= 0.3 * sizes['fp32']}; "
          f"latency <= 1.05x ORT: {lat['qtool'] <= 1.05 * lat['ort']}")


if __name__ == "__main__":
    main()
