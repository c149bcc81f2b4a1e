"""Cross-layer equalisation (--algorithms cle): top-1 agreement with fp32, with and without it,
per-channel and per-tensor weights, on the bundled sample and EfficientNet-Lite0.

    python benchmarks/cle_agreement.py [--calib 128] [--eval 512]

EfficientNet-Lite0 needs the recipe's model (python calibration/efficientnet-lite0/make.py).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qtool
from qtool.config import CalibrateOptions, QuantizeOptions

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"sample": ROOT / "calibration" / "fashion-mnist",
          "efficientnet-lite0": Path.home() / ".cache" / "qtool" / "efficientnet-lite0"}


def outputs(path, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=512)
    args = ap.parse_args()
    for label, d in MODELS.items():
        if not (d / "model.onnx").exists():
            print(f"{label}: {d / 'model.onnx'} missing, skipped")
            continue
        data = np.load(d / "eval.npz")
        feeds = {k: data[k][:args.eval] for k in data.files if k != "labels"}
        ref = outputs(d / "model.onnx", feeds).argmax(1)
        for algorithms in ((), ("cle",)):
            table = qtool.calibrate(d / "model.onnx", d / "calib.npz", CalibrateOptions(limit=args.calib),
                                    QuantizeOptions(algorithms=algorithms))
            for per_channel in (True, False):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "q.onnx"
                    result = qtool.quantize(d / "model.onnx", out, table=table,
                                            options=QuantizeOptions(per_channel=per_channel, algorithms=algorithms))
                    got = outputs(out, feeds).argmax(1)
                chains = [n for n in result.notes if n.startswith("cle: equalised")]
                print(f"{label:20s} {'cle' if algorithms else 'none':5s} "
                      f"{'per-channel' if per_channel else 'per-tensor ':11s} "
                      f"agreement {float((got == ref).mean()):.4f}  {chains[0] if chains else ''}", flush=True)


if __name__ == "__main__":
    main()
