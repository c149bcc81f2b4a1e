"""The corpus of graphs people ship (tests/make_corpus.py), quantized the ways tests/test_corpus.py
does: static QDQ on every model, dynamic where MatMul/Gemm/recurrent layers carry the work,
QOperator on the CNNs. Per model and mode it prints the nodes qtool quantizes (of all planned),
the integer/Q/DQ ops in the written graph (inside If/Loop bodies in brackets), the SNR against
fp32 over the model's .npz inputs (worst output), and latency: fp32 and quantized run in pairs,
interleaved, order alternating, 2 intra-op threads, and the ratio quantized/fp32 of each pair
gives the median and the p10-p90 spread (a timed block repeats a run for ~2 ms, so that
sub-millisecond models are not timed one timer tick at a time). A ratio below 1 is a speed-up.

    python benchmarks/corpus.py [--corpus DIR] [--models a,b] [--repeats 200] [--threads 2] [--keep DIR]

The corpus is read from $QTOOL_CACHE/corpus (default ~/.cache/qtool/corpus) and built there
first with tests/make_corpus.py (needs torch) when missing. Absolute milliseconds on this shared
2-core machine are noisy; the paired ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import THREADS, session  # noqa: E402
from harness import print_table  # noqa: E402

import make_corpus  # noqa: E402

# model -> extra modes besides static QDQ (the same as tests/test_corpus.py's CASES)
MODES = {
    "if_cond": ("qoperator",), "loop": ("dynamic",), "fp16_cnn": ("qoperator",), "grouped_conv": ("qoperator",),
    "conv_transpose": ("qoperator",), "lstm": ("dynamic",), "gru": ("dynamic",), "einsum": ("dynamic",),
    "multi_io": ("qoperator",), "cnn_opset11": ("qoperator",), "cnn_opset17": ("qoperator",),
    "mlp_dynamo": ("dynamic",), "mlp_torchscript": ("dynamic",),
}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QGemm",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QAttention"}


def ensure_corpus(d: Path) -> dict:
    manifest = d / "manifest.json"
    fresh = manifest.exists() and json.loads(manifest.read_text()).get("script_sha256") == make_corpus.script_hash()
    if not fresh:
        print(f"building the corpus in {d} (tests/make_corpus.py) ...", flush=True)
        subprocess.run([sys.executable, str(make_corpus.SCRIPT), "--out", str(d)], check=True)
    return json.loads(manifest.read_text())


def quantize(src: Path, data: Path, out: Path, mode: str):
    import qtool
    from qtool.config import QuantizeOptions
    options = QuantizeOptions(mode="dynamic") if mode == "dynamic" else \
        QuantizeOptions(format="qoperator" if mode == "qoperator" else "qdq")
    return qtool.quantize(src, out, data=None if mode == "dynamic" else data, options=options)


def quant_ops(path: Path) -> tuple[int, int]:
    """(integer, Q/DQ and contrib quantized ops in all, those inside subgraphs)."""
    import onnx
    nodes = list(make_corpus.all_nodes(onnx.load(str(path)).graph))
    hit = [(n, d) for n, d in nodes if n.op_type in QUANT_OPS or n.op_type.startswith("QLinear")]
    return len(hit), sum(1 for _, d in hit if d > 0)


def snr_db(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The worst output's SNR."""
    out = []
    for r, g in zip(ref, got):
        r, g = r.astype(np.float64), g.astype(np.float64)
        out.append(10 * np.log10((r ** 2).sum() / max(((r - g) ** 2).sum(), 1e-30)))
    return float(min(out))


def feeds(inputs: dict[str, np.ndarray], batch: int | None) -> list[dict]:
    """The whole .npz as one batch, or one feed per ``batch`` rows for a model with a fixed batch."""
    if batch is None:
        return [inputs]
    n = len(next(iter(inputs.values())))
    return [{k: v[i:i + batch] for k, v in inputs.items()} for i in range(0, n, batch)]


def _block(sess, feeds_: list[dict], start: int, inner: int) -> float:
    """Seconds for ``inner`` runs over consecutive feeds."""
    t0 = time.perf_counter()
    for j in range(inner):
        sess.run(None, feeds_[(start + j) % len(feeds_)])
    return time.perf_counter() - t0


def paired_ratios(fp32, quant, batches: list[dict], repeats: int, block_ms: float,
                  warmup: int = 10) -> tuple[float, int, np.ndarray]:
    """(median fp32 ms per run, runs per block, per-pair ratios quantized/fp32). A pair times one
    block of each model on the same feeds back to back, the order alternating from pair to pair;
    a block repeats a run until it lasts about ``block_ms`` so that timer and scheduler noise on
    sub-millisecond models do not dominate the ratio."""
    for i in range(warmup):
        for s in (fp32, quant):
            s.run(None, batches[i % len(batches)])
    single = np.median([_block(fp32, batches, i, 1) for i in range(5)])
    inner = max(1, int(round(block_ms / 1000 / max(single, 1e-6))))
    t_ref, ratios = [], []
    for i in range(repeats):
        start = i * inner
        if i % 2 == 0:
            a = _block(fp32, batches, start, inner)
            b = _block(quant, batches, start, inner)
        else:
            b = _block(quant, batches, start, inner)
            a = _block(fp32, batches, start, inner)
        t_ref.append(a / inner)
        ratios.append(b / a)
    return float(np.median(t_ref) * 1000), inner, np.asarray(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=make_corpus.default_dir())
    parser.add_argument("--models", help="comma-separated (default: all)")
    parser.add_argument("--repeats", type=int, default=200, help="timed pairs per model and mode")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--block-ms", type=float, default=2.0, help="a timed block repeats a run for about this long")
    parser.add_argument("--keep", type=Path, help="keep the quantized models in this folder")
    args = parser.parse_args()
    manifest = ensure_corpus(args.corpus)
    names = args.models.split(",") if args.models else list(MODES)
    for name, why in manifest["skipped"].items():
        print(f"{name}: not in the corpus ({why})")
    work = args.keep or Path(tempfile.mkdtemp(prefix="qtool-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        if name not in manifest["models"]:
            continue
        src, data = args.corpus / f"{name}.onnx", args.corpus / f"{name}.npz"
        inputs = dict(np.load(data))
        batch = manifest["models"][name]["batch"]
        ref_sess = session(src, args.threads)
        batches = feeds(inputs, batch)
        ref = [np.concatenate(p) for p in zip(*(ref_sess.run(None, f) for f in batches))]
        for mode in ("static",) + MODES[name]:
            out = work / f"{name}.{mode}.onnx"
            label = "static qdq" if mode == "static" else mode
            try:
                result = quantize(src, data, out, mode)
            except Exception as exc:  # noqa: BLE001 - a row says what failed
                text = str(exc).strip().splitlines()
                rows.append((name, label, "-", "-", "-", "-", "-", "-",
                             f"{type(exc).__name__}: {(text[0] if text else '')[:100]}"))
                continue
            q_sess = session(out, args.threads)
            got = [np.concatenate(p) for p in zip(*(q_sess.run(None, f) for f in batches))]
            total, in_sub = quant_ops(out)
            ms, inner, ratios = paired_ratios(ref_sess, q_sess, batches, args.repeats, args.block_ms)
            p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
            planned = result.plan.all_nodes() if hasattr(result.plan, "all_nodes") else list(result.plan.nodes)
            n_quant = sum(1 for n in planned if n.quantized)
            rows.append((name, label, f"{n_quant}/{len(planned)}",
                         f"{total}" + (f" [{in_sub}]" if in_sub else ""), f"{snr_db(ref, got):.1f}", f"{ms:.3f} x{inner}",
                         f"{p50:.2f}", f"{p10:.2f}-{p90:.2f}", "ok"))
            print(f"  {name} {label}: done", file=sys.stderr, flush=True)
    import onnxruntime
    print(f"\n{len(rows)} runs, {args.repeats} interleaved pairs each, {args.threads} threads, "
          f"onnxruntime {onnxruntime.__version__}, batch: the 16 .npz rows at once (1 row per run for a fixed batch)")
    print("fp32 ms: median per run; ratio q/fp32: median of the pairs' ratios, p10-p90 their spread")
    print_table(rows, ("model", "mode", "quantized/nodes", "q ops [in subgraphs]", "SNR dB", "fp32 ms x runs/block",
                       "ratio q/fp32", "p10-p90", "status"), rule=True)


if __name__ == "__main__":
    main()
