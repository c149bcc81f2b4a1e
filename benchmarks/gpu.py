"""The GPU path, measured: fp32, fp16, int8 QDQ, int4 weights (and TensorRT int8) side by side.

For the bundled sample (Fashion-MNIST CNN), EfficientNet-Lite0 and all-MiniLM-L6-v2, every
variant is made with qtool, then run on the chosen execution provider at batch 1, 8 and 64:

  fp32        the model as exported
  fp16        qtool quantize --target cuda                (half precision, fp32 where measured)
  int8-qdq    qtool quantize (static int8 QDQ, the CPU recipe; fake-quantized on the CUDA EP)
  int4        qtool quantize --target cuda --weights int4 --block-size 32  (fp16 + MatMulNBits, gptq)
  int4-cpu    qtool quantize --weights int4 --block-size 32                (fp32 + MatMulNBits, gptq)
  trt-int8    qtool quantize --target trt, run on the TensorRT EP (only when that EP is present)

Columns: the accuracy metric (sample: top-1 accuracy on its labels; EfficientNet: top-1
agreement with fp32 on natural-photo crops; MiniLM: mean cosine to fp32 embeddings and
retrieval top-1), size (ratio to fp32), and per batch size the latency ratio fp32 / variant
as the median of paired, order-alternating runs, with p10-p90 (qtool.runtime.time_pair).

With no usable GPU it runs everything on the CPU EP and says so in its first line: the
accuracy figures still hold (they are computed on the EP that ran), the speed figures are
then CPU figures.

    python benchmarks/gpu.py [--models sample,effnet,minilm] [--batches 1,8,64] [--repeats 10]
                             [--provider auto|cpu|cuda] [--json OUT.json] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "calibration" / "minilm"))

from qtool import api, runtime  # noqa: E402
from qtool.config import QuantizeOptions  # noqa: E402

CACHE = Path.home() / ".cache" / "qtool"
MODELS = {
    "sample": {"model": ROOT / "calibration/fashion-mnist/model.onnx", "calib": ROOT / "calibration/fashion-mnist/calib.npz",
               "eval": ROOT / "calibration/fashion-mnist/eval.npz"},
    "effnet": {"model": CACHE / "efficientnet-lite0/model.onnx", "calib": CACHE / "efficientnet-lite0/calib.npz",
               "eval": CACHE / "efficientnet-lite0/eval.npz"},
    "minilm": {"model": CACHE / "minilm/model.onnx", "calib": CACHE / "minilm/calib",
               "eval": CACHE / "minilm/bench.npz"},
}
VARIANTS = {
    "fp16": dict(target="cuda"),
    "int8-qdq": dict(),
    "int4": dict(target="cuda", weights="int4", block_size=32),
    "int4-cpu": dict(weights="int4", block_size=32),
    "trt-int8": dict(target="trt"),
}


def make_variant(name: str, key: str, work: Path) -> Path:
    spec = MODELS[key]
    out = work / f"{key}.{name}.onnx"
    # every recipe reads the calibration data: int8 ranges, fp16's measured keep list, int4's gptq
    api.quantize(spec["model"], out, data=spec["calib"], options=QuantizeOptions(**VARIANTS[name]))
    return out


def feeds_at(key: str, batch: int) -> dict[str, np.ndarray]:
    """``batch`` rows of the model's evaluation inputs (rows repeated when there are fewer)."""
    with np.load(MODELS[key]["eval"]) as z:
        arrays = {k: z[k] for k in z.files if k != "labels"}
    out = {}
    for k, v in arrays.items():
        idx = np.arange(batch) % len(v)
        out[k] = np.ascontiguousarray(v[idx])
    return out


_REF_EMBEDDINGS: dict = {}


def accuracy(key: str, path: Path, reference: Path, provider: str, threads: int, disabled: tuple = ()) -> dict:
    """The model's metric on the EP that runs it (``disabled``: onnxruntime transformers left out of the
    variant's session, see ``qtool.runtime.target_session``)."""
    sess = runtime.session(str(path), provider, threads, disabled=disabled)
    if key == "minilm":
        import task as minilm
        data = CACHE / "minilm"
        meta = minilm.load_meta(data)
        emb = minilm.embed_batches(sess, minilm.iter_batches(data, meta))
        if (reference, provider) not in _REF_EMBEDDINGS:
            _REF_EMBEDDINGS[(reference, provider)] = minilm.embed_batches(
                runtime.session(str(reference), provider, threads), minilm.iter_batches(data, meta))
        ref = _REF_EMBEDDINGS[(reference, provider)]
        cos = (emb * ref).sum(axis=1)
        return {"retrieval_top1": minilm.retrieval_top1(emb, meta)[0], "mean_cosine": float(cos.mean()),
                "min_cosine": float(cos.min())}
    with np.load(MODELS[key]["eval"]) as z:
        x = z[z.files[0]] if "input" not in z.files else z["input"]
        labels = z["labels"] if "labels" in z.files else None
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    if labels is not None:
        return {"accuracy": float((logits.argmax(1) == labels).mean())}
    ref_sess = runtime.session(str(reference), provider, threads)
    ref_logits = np.concatenate([ref_sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return {"agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean())}


def size(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sample,effnet,minilm")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--work")
    args = ap.parse_args()

    choice = runtime.pick_provider("cpu" if args.provider == "cpu" else "cuda")
    provider = choice.used
    gpu = provider != "CPUExecutionProvider"
    trt = runtime.pick_provider("trt")
    print(f"onnxruntime {runtime.version()}; provider {provider}"
          + ("" if gpu else f" -- NO GPU: every figure below is from the CPU EP ({choice.note or 'asked for cpu'})"))
    variants = [v for v in args.variants.split(",") if v]
    if "trt-int8" in variants and trt.note:
        print(f"trt-int8 runs on {trt.used} with its QDQ fusions off (Q/DQ computed as written, as TensorRT does; "
              f"no TensorRT timing): {trt.note}")
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qtool-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"provider": provider, "gpu": gpu, "onnxruntime": runtime.version(), "threads": args.threads,
               "batches": batches, "models": {}}
    for key in [m for m in args.models.split(",") if m]:
        spec = MODELS[key]
        if not Path(spec["model"]).exists():
            print(f"\n{key}: {spec['model']} missing (build it with calibration/{key}/make.py); skipped")
            continue
        ref = Path(spec["model"])
        rows = {"fp32": {"size": size(ref), "metric": accuracy(key, ref, ref, provider, args.threads)}}
        for name in variants:
            t0 = time.perf_counter()
            try:
                path = make_variant(name, key, work)
            except Exception as exc:  # a benchmark reports a failing variant and goes on
                rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                continue
            ep = trt.used if name == "trt-int8" else provider
            # TensorRT absent: its placement is judged as eval judges it, Q/DQ computed as written
            disabled = runtime.disabled_for(trt) if name == "trt-int8" else ()
            rows[name] = {"path": str(path), "size": size(path), "quantize_s": round(time.perf_counter() - t0, 1),
                          "metric": accuracy(key, path, ref, ep, args.threads, disabled), "ep": ep,
                          "disabled": list(disabled)}
        for batch in batches:
            feeds = feeds_at(key, batch)
            sess_ref = runtime.session(str(ref), provider, args.threads)
            for name, row in rows.items():
                if name == "fp32" or "error" in row:
                    continue
                sess = runtime.session(row["path"], row["ep"], args.threads, disabled=tuple(row["disabled"]))
                ta, tb, ratios = runtime.time_pair(sess_ref, sess, feeds, warmup=3, repeats=args.repeats)
                row.setdefault("latency", {})[str(batch)] = {
                    "fp32_ms": ta.median_ms, "ms": tb.median_ms, "speedup": float(np.median(ratios)),
                    "p10": float(np.percentile(ratios, 10)), "p90": float(np.percentile(ratios, 90))}
        results["models"][key] = rows
        print_model(key, rows, batches, provider)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1))
    return 0


def print_model(key: str, rows: dict, batches: list[int], provider: str) -> None:
    print(f"\n{key} ({provider}; speed-up = fp32 ms / variant ms, median of paired runs, p10-p90)")
    head = ["variant", "metric", "size"] + [f"batch {b}" for b in batches]
    table = [head]
    base = rows["fp32"]["size"]
    for name, row in rows.items():
        if "error" in row:
            table.append([name, row["error"]] + [""] * (len(head) - 2))
            continue
        metric = ", ".join(f"{k} {v:.4f}" for k, v in row["metric"].items())
        cells = [name, metric, f"{row['size'] / 1e6:.2f} MB ({row['size'] / base:.2f})"]
        for b in batches:
            lat = row.get("latency", {}).get(str(b))
            cells.append("1.00" if name == "fp32" else
                         f"{lat['speedup']:.2f}x ({lat['p10']:.2f}-{lat['p90']:.2f})" if lat else "")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
