"""--method auto against minmax, percentile and mse (and optionally entropy) on four models.

One calibration per model with ``--method auto`` (it collects histograms and measures its
per-tensor choices); the other methods' ranges are derived from the same table's histograms
(``quantize --table T --method M``), so every row sees the same calibration data.

    python benchmarks/method_auto.py [--models sample,effnet,minilm,detector] [--methods ...]
                                     [--auto-samples 16] [--keep DIR]

Metrics against the fp32 model:
  sample    calibration/fashion-mnist: top-1 agreement with fp32 and accuracy on eval.npz (2000)
  effnet    ~/.cache/qtool/efficientnet-lite0: 128 calibration crops, top-1 agreement on 512 eval crops
  minilm    ~/.cache/qtool/minilm: calibration/minilm/task.py mean cosine to fp32 and retrieval top-1
  detector  ~/.cache/qtool/detector: F1 of the detections vs fp32's (calibration/detector/task.py) on eval.npz
Timing: wall seconds of the auto calibration and of an mse calibration of the same data (their
difference is auto's measuring), 2 onnxruntime threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import qtool
from qtool.calib.auto import CANDIDATES
from qtool.config import CalibrateOptions, QuantizeOptions

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "qtool"
THREADS = 2


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Classifier:
    """Top-1 agreement with fp32 (and accuracy when labels exist) on the first ``n`` eval samples."""

    def __init__(self, d: Path, calib_limit: int | None, n: int | None, key: str = "input"):
        self.model, self.calib, self.limit = d / "model.onnx", d / "calib.npz", calib_limit
        with np.load(d / "eval.npz") as z:
            self.x = z[key][:n]
            self.labels = z["labels"][:n] if "labels" in z.files else None
        self.key = key
        self.ref = self.logits(self.model)

    def logits(self, path):
        s = _session(path)
        return np.concatenate([s.run(None, {self.key: self.x[i:i + 32]})[0] for i in range(0, len(self.x), 32)])

    def score(self, path) -> dict:
        out = self.logits(path).argmax(1)
        r = {"agreement": float((out == self.ref.argmax(1)).mean())}
        if self.labels is not None:
            r["accuracy"] = float((out == self.labels).mean())
        return r


class MiniLM:
    def __init__(self):
        self.dir = CACHE / "minilm"
        self.model, self.calib, self.limit = self.dir / "model.onnx", self.dir / "calib", None
        self.task = _load(ROOT / "calibration" / "minilm" / "task.py", "minilm_task")
        self.meta = self.task.load_meta(self.dir)
        self.ref = self.task.embed(self.model, self.dir, THREADS, self.meta)

    def score(self, path) -> dict:
        emb = self.task.embed(path, self.dir, THREADS, self.meta)
        return {"mean_cosine": float((emb * self.ref).sum(1).mean()),
                "retrieval": self.task.retrieval_top1(emb, self.meta)[0]}


class Detector:
    def __init__(self):
        d = CACHE / "detector"
        self.model, self.calib, self.limit = d / "model.onnx", d / "calib.npz", None
        self.task = _load(ROOT / "calibration" / "detector" / "task.py", "detector_task")
        with np.load(d / "eval.npz") as z:
            self.x = z["images"]
        self.ref = self.detections(self.model)

    def detections(self, path):
        s = _session(path)
        return np.concatenate([self.task.detect(s.run(None, {"images": self.x[i:i + 16]})[0])
                               for i in range(0, len(self.x), 16)])

    def score(self, path) -> dict:
        return {"f1": self.task.compare(self.ref, self.detections(path))}


MODELS = {
    "sample": lambda: Classifier(ROOT / "calibration" / "fashion-mnist", None, None),
    "effnet": lambda: Classifier(CACHE / "efficientnet-lite0", 128, 512),
    "minilm": MiniLM,
    "detector": Detector,
}


def run(key: str, methods: list[str], auto_samples: int, keep: Path | None) -> dict:
    m = MODELS[key]()
    t0 = time.perf_counter()
    qtool.calibrate(m.model, m.calib, CalibrateOptions(method="mse", limit=m.limit), threads=THREADS)
    t1 = time.perf_counter()
    table = qtool.calibrate(m.model, m.calib, CalibrateOptions(method="auto", limit=m.limit,
                                                               auto_samples=auto_samples), threads=THREADS)
    t2 = time.perf_counter()
    chosen = {k: sum(1 for s in table.tensors.values() if s.auto and s.auto["output_snr_db"]
                     and s.auto["method"] == k) for k in CANDIDATES}
    row = {"model": key, "calibrate_mse_s": round(t1 - t0, 1), "calibrate_auto_s": round(t2 - t1, 1),
           "auto_samples": auto_samples, "chosen": chosen}
    print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if keep:
            table.save(folder / f"{key}_auto_table.json")
        for method in methods:
            out = folder / f"{key}_{method}.onnx"
            qtool.quantize(m.model, out, table=table, method=method, options=QuantizeOptions())
            result = {"model": key, "method": method, **m.score(out)}
            print(json.dumps(result), flush=True)
            row[method] = result
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sample,effnet,minilm,detector")
    ap.add_argument("--methods", default="minmax,percentile,mse,auto")
    ap.add_argument("--auto-samples", type=int, default=CalibrateOptions().auto_samples)
    ap.add_argument("--keep", type=Path, help="keep the tables and models here")
    args = ap.parse_args()
    for key in args.models.split(","):
        run(key, args.methods.split(","), args.auto_samples, args.keep)


if __name__ == "__main__":
    main()
