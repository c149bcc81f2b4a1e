"""Excluding EfficientNet-Lite0's depthwise Convs: top-1 agreement with fp32, default vs excluded.

    python benchmarks/effnet_exclude.py [--calib 128] [--eval 512]

Needs the recipe's model (python calibration/efficientnet-lite0/make.py). A node kept float reads
float inputs, so excluding a layer must not lower agreement (it did when onnxruntime's
WeightBiasQuantization quantized the excluded Conv's weights per tensor behind the plan's back).
It also checks every int32 bias of the default model against its float value.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import qtool  # noqa: E402
from plan_asserts import assert_model_matches_plan  # noqa: E402
from qtool.config import CalibrateOptions, QuantizeOptions  # noqa: E402
from qtool.prepare import prepare  # noqa: E402

EFFNET = Path.home() / ".cache" / "qtool" / "efficientnet-lite0"


def agreement(reference: str, candidate: str, x: np.ndarray) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    run = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
           for p in (reference, candidate)]
    return float((run[0].argmax(1) == run[1].argmax(1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=512)
    args = ap.parse_args()
    model = str(EFFNET / "model.onnx")
    x = np.load(EFFNET / "eval.npz")["input"][:args.eval]
    prepared = prepare(model).model
    depthwise = tuple(n.name for n in prepared.graph.node if n.op_type == "Conv"
                      and any(a.name == "group" and a.i > 1 for a in n.attribute))
    with tempfile.TemporaryDirectory() as d:
        table = qtool.calibrate(model, EFFNET / "calib.npz", CalibrateOptions(limit=args.calib))
        for label, options in (("default", QuantizeOptions()), (f"{len(depthwise)} depthwise Convs excluded",
                                                                 QuantizeOptions(exclude=depthwise))):
            out = str(Path(d) / "q.onnx")
            result = qtool.quantize(model, out, table=table, options=options)
            if label == "default":
                assert_model_matches_plan(onnx.load(out), result.plan, prepared)
                raised = [t for t in result.plan.tensors.values() if "raised so that" in t.reason]
                print(f"biases: all within half a step of their float values; weight scales raised in "
                      f"{len(raised)} weights")
            print(f"{label:<32} top-1 agreement {agreement(model, out, x):.4f} ({args.eval} crops), "
                  f"{len(result.plan.quantized_nodes())} of {len(result.plan.nodes)} nodes quantized")


if __name__ == "__main__":
    main()
