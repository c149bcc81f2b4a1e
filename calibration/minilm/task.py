#!/usr/bin/env python3
"""Score an all-MiniLM-L6-v2 ONNX model (fp32 or quantized) on the MiniLM retrieval task.

The task: embed every ImageNet class description and every class name (mean
pooling over the attention mask, then L2 normalisation) and, for each
description, retrieve the nearest name by cosine similarity. Top-1 is the share
of descriptions whose nearest name is the name of their own class. A few classes
share the same name text (e.g. two "missile" classes); retrieving any row with
the right name text counts as a hit, so the score never depends on how exact
ties between identical texts are broken.

Usage:
  python calibration/minilm/task.py MODEL.onnx [--ref FP32.onnx] [--data DIR] [--threads 2] [--json]

DIR is the folder written by make.py (default ~/.cache/qtool/minilm); it holds
``eval/*.npz`` (one padded batch per file) and ``eval_meta.json`` (which row is
a description and which a name, the class of each row, and its text).

With --ref, the reference model runs on the same batches and the mean (and
minimum) cosine similarity between the two models' sentence embeddings is
printed as well.

Needs numpy and onnxruntime only. Importable: ``evaluate(model, data_dir, ref=None)``,
``embed(model, data_dir)``, ``retrieval_top1(embeddings, meta)``.

Also a task file for ``qtool eval --task``: ``NAME``, ``reduce`` and ``score``
below. qtool passes the rows only, so ``score`` reads eval_meta.json from
$QTOOL_MINILM_DATA (default ~/.cache/qtool/minilm) and needs every eval row
(no --limit):
  qtool eval FP32.onnx INT8.onnx --data ~/.cache/qtool/minilm/eval --task calibration/minilm/task.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path.home() / ".cache" / "qtool" / "minilm"
META_NAME = "eval_meta.json"
EVAL_DIR = "eval"
OUTPUT_NAME = "last_hidden_state"


# --------------------------------------------------------------------------- data

def load_meta(data_dir: str | Path) -> dict:
    """Read eval_meta.json; check that it agrees with the files in eval/."""
    data_dir = Path(data_dir)
    meta_path = data_dir / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found; build it with: python calibration/minilm/make.py --out {data_dir}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    listed = [f["file"] for f in meta["files"]]
    present = sorted(p.name for p in (data_dir / EVAL_DIR).glob("*.npz"))
    if listed != present:
        raise ValueError(f"{data_dir / EVAL_DIR}: files {present[:3]}... do not match {META_NAME} "
                         f"({len(present)} vs {len(listed)} files); rebuild with make.py")
    if sum(f["rows"] for f in meta["files"]) != len(meta["rows"]):
        raise ValueError(f"{meta_path}: row count does not match the per-file counts")
    return meta


def iter_batches(data_dir: str | Path, meta: dict):
    """Yield the eval batches (dict of int64 arrays) in row order."""
    for f in meta["files"]:
        with np.load(Path(data_dir) / EVAL_DIR / f["file"]) as z:
            yield {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- model

def make_session(model_path: str | Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean over the tokens whose mask is 1, then L2 normalisation: [B,S,H] -> [B,H]."""
    mask = attention_mask.astype(np.float32)[:, :, None]
    summed = (hidden.astype(np.float32) * mask).sum(axis=1)
    counts = np.clip(mask.sum(axis=1), 1e-9, None)
    emb = summed / counts
    norms = np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    return (emb / norms).astype(np.float32)


def embed_batches(sess, batches) -> np.ndarray:
    """Run ``sess`` on each batch and return the pooled, normalised embeddings [N,H]."""
    input_names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    out_name = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
    parts = []
    for batch in batches:
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise KeyError(f"model input {missing[0]!r} is not in the data (keys: {', '.join(batch)})")
        hidden = sess.run([out_name], {n: batch[n] for n in input_names})[0]
        parts.append(mean_pool(hidden, batch["attention_mask"]))
    return np.concatenate(parts)


def embed(model_path: str | Path, data_dir: str | Path = DEFAULT_DATA, threads: int = 2,
          meta: dict | None = None) -> np.ndarray:
    meta = meta or load_meta(data_dir)
    return embed_batches(make_session(model_path, threads), iter_batches(data_dir, meta))


# --------------------------------------------------------------------------- metric

def retrieval_top1(embeddings: np.ndarray, meta: dict) -> tuple[float, int, int]:
    """Description -> name top-1 by cosine. Returns (top1, hits, queries)."""
    rows = meta["rows"]
    if len(rows) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for {len(rows)} rows")
    desc = [i for i, r in enumerate(rows) if r["kind"] == "description"]
    names = [i for i, r in enumerate(rows) if r["kind"] == "name"]
    name_row_of_class = {rows[i]["class"]: k for k, i in enumerate(names)}
    name_text = [rows[i]["text"] for i in names]
    sims = embeddings[desc] @ embeddings[names].T          # unit vectors: cosine
    pred = sims.argmax(axis=1)
    hits = 0
    for q, p in zip(desc, pred):
        target = name_row_of_class[rows[q]["class"]]
        hits += name_text[int(p)] == name_text[target]
    return hits / len(desc), int(hits), len(desc)


def retrieval_top1_fn(embeddings_fn, data_dir: str | Path = DEFAULT_DATA) -> tuple[float, int, int]:
    """Top-1 for any ``embeddings_fn(batch: dict[str, ndarray]) -> [B,H]`` unit-norm embeddings."""
    meta = load_meta(data_dir)
    emb = np.concatenate([embeddings_fn(b) for b in iter_batches(data_dir, meta)])
    return retrieval_top1(emb, meta)


def evaluate(model_path: str | Path, data_dir: str | Path = DEFAULT_DATA, ref: str | Path | None = None,
             threads: int = 2) -> dict:
    meta = load_meta(data_dir)
    t0 = time.perf_counter()
    emb = embed(model_path, data_dir, threads, meta)
    result = {"model": str(model_path), "seconds": round(time.perf_counter() - t0, 2)}
    top1, hits, n = retrieval_top1(emb, meta)
    result.update(top1=top1, hits=hits, queries=n, texts=len(emb))
    if ref is not None:
        ref_emb = embed(ref, data_dir, threads, meta)
        cos = (emb * ref_emb).sum(axis=1)
        ref_top1, ref_hits, _ = retrieval_top1(ref_emb, meta)
        result.update(ref=str(ref), ref_top1=ref_top1, ref_hits=ref_hits,
                      mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))
    return result


# --------------------------------------------------------------------------- qtool eval --task hooks

NAME = "retrieval top-1"


def reduce(outputs: dict, batch: dict) -> np.ndarray:
    """Per batch: the mean-pooled, L2-normalised sentence embeddings [B,384]."""
    hidden = outputs[OUTPUT_NAME] if OUTPUT_NAME in outputs else next(iter(outputs.values()))
    return mean_pool(hidden, batch["attention_mask"])


def score(rows: np.ndarray) -> float:
    """Once, on every eval row's embedding in file order: retrieval top-1."""
    data_dir = Path(os.environ.get("QTOOL_MINILM_DATA", DEFAULT_DATA)).expanduser()
    meta = load_meta(data_dir)
    if len(rows) != len(meta["rows"]):
        raise ValueError(f"got {len(rows)} rows but {data_dir / META_NAME} describes {len(meta['rows'])}; "
                         "run on the whole eval/ folder (no --limit) or set QTOOL_MINILM_DATA")
    return retrieval_top1(np.asarray(rows, dtype=np.float32), meta)[0]


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="ONNX model to score")
    ap.add_argument("--ref", type=Path, help="reference (fp32) ONNX model for the embedding cosine")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder written by make.py (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)

    for p in [args.model] + ([args.ref] if args.ref else []):
        if not p.is_file():
            print(f"{p}: no such model file", file=sys.stderr)
            return 2
    if not (args.data / META_NAME).is_file():
        print(f"{args.data / META_NAME} not found; build it with: python calibration/minilm/make.py --out {args.data}",
              file=sys.stderr)
        return 2
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed; install it with: pip install onnxruntime", file=sys.stderr)
        return 2

    r = evaluate(args.model, args.data, args.ref, args.threads)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['model']}: retrieval top-1 {r['top1']:.4f} ({r['hits']}/{r['queries']} descriptions, "
          f"{r['texts']} texts embedded in {r['seconds']:.1f}s)")
    if args.ref is not None:
        print(f"{r['ref']}: retrieval top-1 {r['ref_top1']:.4f} ({r['ref_hits']}/{r['queries']})")
        print(f"embedding cosine to ref: mean {r['mean_cosine']:.6f}, min {r['min_cosine']:.6f} "
              f"over {r['texts']} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
