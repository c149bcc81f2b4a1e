"""Export, with torch, small models of the graph kinds people ship, each with an .npz of
16 representative inputs (keyed by input name, leading batch dimension: what ``--data`` takes).
A test-data recipe: torch (and onnxscript, for the dynamo exporter) are needed to build the
corpus, not to run qtool. tests/test_corpus.py runs it when the corpus is missing.

Run: python3 tests/make_corpus.py [--out DIR] [--only NAME,NAME]
(default DIR: $QTOOL_CACHE/corpus, else ~/.cache/qtool/corpus). Writes DIR/NAME.onnx,
DIR/NAME.npz and DIR/manifest.json (this script's sha256, versions, per-model summary), and
prints one line per model: nodes, op types (those inside If/Loop bodies in braces), size.

Every model is checked after export: onnxruntime (CPU) runs it on its .npz and agrees with
torch. Seeds are fixed; sizes are small (each file < 200 KB, each run a few ms).

- if_cond.onnx: torch.cond (dynamo exporter, opset 18) on the image's mean brightness, so the
  graph has an ONNX If whose two branches each hold a Conv and a Gemm reading outer-scope
  weights ("day" and "night" heads). Exported with a fixed batch of 1: the predicate is one
  scalar per run, so a batch holds one branch; at batch 1 (qtool calibrates such a model one
  sample at a time) the 16 inputs, brightened or darkened alternately, take both branches.
- loop.onnx: a hand-written RNN cell (Linear on x_t + Linear on h, tanh) in a torch.jit.script
  for-loop over the sequence, TorchScript exporter, opset 17: an ONNX Loop whose body holds a
  Gemm and a MatMul with weights; a Gemm head after the loop. Dynamic batch and sequence.
- fp16_cnn.onnx: a small CNN (Conv, BatchNorm folded, ReLU, MaxPool, GlobalAveragePool, Gemm)
  exported after model.half(): fp16 weights, inputs and outputs, opset 17. onnxruntime 1.31's
  CPU EP runs it as is (checked here), so no conversion tool is involved.
- grouped_conv.onnx: Conv groups=4 and a depthwise Conv (groups=channels), then pointwise.
- conv_transpose.onnx: an encoder (strided Convs) and a decoder of two ConvTranspose (stride 2)
  each followed by a Conv: an image-to-image model.
- lstm.onnx, gru.onnx: nn.LSTM / nn.GRU (batch_first, 1 layer, hidden 32) over a sequence, then
  a two-layer Linear head on the last step. Dynamic batch and sequence.
- einsum.onnx: one attention block written with torch.einsum only: projections
  "bsd,de->bse" with weights (MatMul-shaped), scores "bhqd,bhkd->bhqk", the batched product
  "bij,bjk->bik" over (batch*heads), and an output projection "bsd,de->bse"; opset 17.
- multi_io.onnx: inputs "image" [N,3,16,16] and "meta" [N,4], a shared conv trunk, outputs
  "logits" [N,10] and "box" [N,4].
- cnn_opset11.onnx, cnn_opset17.onnx: the same CNN (BatchNorm, residual Add, MaxPool) at
  opsets 11 and 17 (TorchScript exporter; opset 11 has Unsqueeze/Squeeze/Clip in their old forms).
- mlp_dynamo.onnx, mlp_torchscript.onnx: the same 3-layer MLP (GELU, LayerNorm) exported with
  dynamo=True (opset 18, onnxscript's optimizer) and dynamo=False (opset 18).

Exports that cannot be made are listed in the manifest's "skipped" with the reason (for instance
dynamo=True without onnxscript installed); none are faked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLES = 16
SCRIPT = Path(__file__).resolve()


def default_dir() -> Path:
    cache = os.environ.get("QTOOL_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "qtool") / "corpus"


def script_hash() -> str:
    return hashlib.sha256(SCRIPT.read_bytes()).hexdigest()


@dataclass
class Export:
    module: object                     # torch.nn.Module (or a scripted one)
    inputs: dict[str, np.ndarray]      # SAMPLES rows each
    outputs: list[str]
    opset: int = 17
    dynamo: bool = False
    batch: int | None = None           # a fixed batch size, None for a dynamic batch
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # extra dynamic axes (input name -> axis -> name)


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------

def _torch():
    import torch
    from torch import nn
    return torch, nn


def _bn_stats(module, seed: int) -> None:
    """Give every BatchNorm non-trivial running statistics (a fresh one is the identity)."""
    torch, nn = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


def _images(seed: int, n: int = SAMPLES, c: int = 3, hw: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c, hw, hw)).astype(np.float32)


def if_cond() -> Export:
    torch, nn = _torch()

    class DayNight(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.day = nn.Conv2d(16, 32, 3, padding=1)
            self.night = nn.Conv2d(16, 32, 3, padding=1)
            self.day_fc = nn.Linear(32, 10)
            self.night_fc = nn.Linear(32, 10)

        def forward(self, x):
            h = torch.relu(self.stem(x))

            def day(h):
                return self.day_fc(torch.relu(self.day(h)).mean((2, 3)))

            def night(h):
                return self.night_fc(torch.relu(self.night(h)).mean((2, 3)))

            return torch.cond(x.mean() > 0, day, night, (h,))  # a bright or a dark image

    torch.manual_seed(1)
    x = _images(1)
    x += np.where(np.arange(SAMPLES) % 2 == 0, 0.5, -0.5).astype(np.float32)[:, None, None, None]
    return Export(DayNight().eval(), {"x": x}, ["logits"], opset=18, dynamo=True, batch=1)


def loop() -> Export:
    torch, nn = _torch()

    class Rnn(nn.Module):
        def __init__(self, d: int = 16, hidden: int = 32):
            super().__init__()
            self.wx = nn.Linear(d, hidden)
            self.wh = nn.Linear(hidden, hidden, bias=False)
            self.head = nn.Linear(hidden, 8)
            self.hidden = hidden

        def forward(self, x):
            h = torch.zeros(x.size(0), self.hidden, dtype=x.dtype)
            for t in range(x.size(1)):
                h = torch.tanh(self.wx(x[:, t]) + self.wh(h))
            return self.head(h)

    torch.manual_seed(2)
    x = np.random.default_rng(2).normal(size=(SAMPLES, 10, 16)).astype(np.float32)
    return Export(torch.jit.script(Rnn().eval()), {"x": x}, ["y"], dynamic={"x": {1: "seq"}})


def _small_cnn():
    torch, nn = _torch()
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def fp16_cnn() -> Export:
    torch, nn = _torch()
    torch.manual_seed(3)
    m = _small_cnn()
    _bn_stats(m, 3)
    return Export(m.eval().half(), {"x": _images(3).astype(np.float16)}, ["logits"])


def grouped_conv() -> Export:
    torch, nn = _torch()
    torch.manual_seed(4)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(),        # grouped
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),       # depthwise
        nn.Conv2d(32, 32, 1), nn.ReLU(),                             # pointwise
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return Export(m.eval(), {"x": _images(4)}, ["logits"])


def conv_transpose() -> Export:
    torch, nn = _torch()

    class AutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
            self.dec = nn.Sequential(nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, 3, 3, padding=1))

        def forward(self, x):
            return self.dec(self.enc(x))

    torch.manual_seed(5)
    return Export(AutoEncoder().eval(), {"x": _images(5)}, ["y"])


def _recurrent(cell: str, seed: int) -> Export:
    torch, nn = _torch()

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, cell)(16, 32, batch_first=True)
            self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.head(y[:, -1])

    torch.manual_seed(seed)
    x = np.random.default_rng(seed).normal(size=(SAMPLES, 12, 16)).astype(np.float32)
    return Export(Seq().eval(), {"x": x}, ["y"], dynamic={"x": {1: "seq"}})


def lstm() -> Export:
    return _recurrent("LSTM", 6)


def gru() -> Export:
    return _recurrent("GRU", 7)


def einsum() -> Export:
    torch, nn = _torch()

    class EinsumAttention(nn.Module):
        def __init__(self, d: int = 32, heads: int = 4):
            super().__init__()
            self.heads = heads
            g = torch.Generator().manual_seed(8)
            self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(d, d, generator=g) / d ** 0.5)
                                                  for _ in range(4))

        def forward(self, x):
            b, s, d = x.shape
            h = self.heads
            q, k, v = (torch.einsum("bsd,de->bse", x, w) for w in (self.wq, self.wk, self.wv))
            q, k, v = (t.reshape(b, s, h, d // h).permute(0, 2, 1, 3) for t in (q, k, v))
            att = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / (d // h) ** 0.5, dim=-1)
            y = torch.einsum("bij,bjk->bik", att.reshape(b * h, s, s), v.reshape(b * h, s, d // h))
            y = y.reshape(b, h, s, d // h).permute(0, 2, 1, 3).reshape(b, s, d)
            return torch.einsum("bsd,de->bse", y, self.wo)

    torch.manual_seed(8)
    x = np.random.default_rng(8).normal(size=(SAMPLES, 8, 32)).astype(np.float32)
    return Export(EinsumAttention().eval(), {"x": x}, ["y"])


def multi_io() -> Export:
    torch, nn = _torch()

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                       nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.meta = nn.Linear(4, 32)
            self.shared = nn.Linear(64, 64)
            self.cls = nn.Linear(64, 10)
            self.box = nn.Linear(64, 4)

        def forward(self, image, meta):
            f = torch.relu(self.shared(torch.cat([self.trunk(image), torch.relu(self.meta(meta))], dim=1)))
            return self.cls(f), torch.sigmoid(self.box(f))

    torch.manual_seed(9)
    meta = np.random.default_rng(9).normal(size=(SAMPLES, 4)).astype(np.float32)
    return Export(TwoHeads().eval(), {"image": _images(9), "meta": meta}, ["logits", "box"])


def _cnn(opset: int) -> Export:
    torch, nn = _torch()

    class ResCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
            self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU6())
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.block(x))
            return self.fc(torch.flatten(self.down(x).mean((2, 3), keepdim=True), 1))

    torch.manual_seed(10)
    m = ResCnn()
    _bn_stats(m, 10)
    return Export(m.eval(), {"x": _images(10)}, ["logits"], opset=opset)


def cnn_opset11() -> Export:
    return _cnn(11)


def cnn_opset17() -> Export:
    return _cnn(17)


def _mlp(dynamo: bool) -> Export:
    torch, nn = _torch()
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU(),
                      nn.Linear(128, 10))
    x = np.random.default_rng(11).normal(size=(SAMPLES, 64)).astype(np.float32)
    return Export(m.eval(), {"x": x}, ["logits"], opset=18, dynamo=dynamo)


def mlp_dynamo() -> Export:
    return _mlp(True)


def mlp_torchscript() -> Export:
    return _mlp(False)


MODELS = {f.__name__: f for f in (if_cond, loop, fp16_cnn, grouped_conv, conv_transpose, lstm, gru, einsum, multi_io,
                                  cnn_opset11, cnn_opset17, mlp_dynamo, mlp_torchscript)}


# ------------------------------------------------------------------------------------------
# export and check
# ------------------------------------------------------------------------------------------

class Skipped(Exception):
    """An export this torch cannot make here; the message says why."""


def export(spec: Export, path: Path) -> None:
    torch, _ = _torch()
    names = list(spec.inputs)
    n = spec.batch or 2
    args = tuple(torch.from_numpy(spec.inputs[k][:n]) for k in names)
    if spec.dynamo:
        try:
            import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
        except ImportError:
            raise Skipped("torch.onnx.export(dynamo=True) needs onnxscript: pip install onnxscript") from None
        shapes = None
        if spec.batch is None:
            batch = torch.export.Dim("batch")
            shapes = tuple({0: batch, **{a: torch.export.Dim(d) for a, d in spec.dynamic.get(k, {}).items()}}
                           for k in names)
        torch.onnx.export(spec.module, args, str(path), dynamo=True, opset_version=spec.opset, input_names=names,
                          output_names=spec.outputs, dynamic_shapes=shapes, external_data=False, verbose=False)
    else:
        axes = {}
        if spec.batch is None:
            axes = {k: {0: "batch", **spec.dynamic.get(k, {})} for k in names}
            axes.update({k: {0: "batch"} for k in spec.outputs})
        torch.onnx.export(spec.module, args, str(path), dynamo=False, opset_version=spec.opset, input_names=names,
                          output_names=spec.outputs, dynamic_axes=axes)


def all_nodes(graph, depth: int = 0):
    """(node, depth) for every node, subgraphs (If branches, Loop bodies) included."""
    import onnx
    for node in graph.node:
        yield node, depth
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g, depth + 1)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_nodes(g, depth + 1)


def run_ort(path: Path, inputs: dict[str, np.ndarray], batch: int | None) -> list[np.ndarray]:
    """Outputs over all rows, ``batch`` rows per run (all at once when None)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    n = len(next(iter(inputs.values())))
    step = batch or n
    parts = [sess.run(None, {k: v[i:i + step] for k, v in inputs.items()}) for i in range(0, n, step)]
    return [np.concatenate(p) for p in zip(*parts)]


def run_torch(spec: Export) -> list[np.ndarray]:
    torch, _ = _torch()
    with torch.no_grad():
        outs = []
        n, step = SAMPLES, spec.batch or SAMPLES
        for i in range(0, n, step):
            out = spec.module(*(torch.from_numpy(v[i:i + step]) for v in spec.inputs.values()))
            outs.append([o.numpy() for o in (out if isinstance(out, tuple) else (out,))])
    return [np.concatenate(p) for p in zip(*outs)]


def summary(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path))
    top = Counter(n.op_type for n, d in all_nodes(m.graph) if d == 0)
    inner = Counter(n.op_type for n, d in all_nodes(m.graph) if d > 0)
    return {"opset": next(i.version for i in m.opset_import if i.domain in ("", "ai.onnx")),
            "nodes": sum(top.values()), "ops": dict(top.most_common()), "subgraph_ops": dict(inner.most_common()),
            "bytes": path.stat().st_size}


def build(name: str, out: Path) -> dict:
    spec = MODELS[name]()
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(spec, path)
    seconds = time.perf_counter() - t0
    np.savez(out / f"{name}.npz", **spec.inputs)
    got, want = run_ort(path, spec.inputs, spec.batch), run_torch(spec)
    for g, w in zip(got, want):
        tol = 1e-2 if w.dtype == np.float16 else 1e-4
        err = float(np.abs(g.astype(np.float32) - w.astype(np.float32)).max())
        if err > tol * max(1.0, float(np.abs(w.astype(np.float32)).max())):
            raise RuntimeError(f"{name}: onnxruntime and torch disagree by {err:.3g}")
    info = summary(path)
    if info["bytes"] >= 200_000:
        raise RuntimeError(f"{name}: {info['bytes']} bytes, over the corpus' 200 KB")
    info.update(export_s=round(seconds, 2), dynamo=spec.dynamo, batch=spec.batch, inputs=list(spec.inputs),
                outputs=spec.outputs)
    return info


def describe(name: str, info: dict) -> str:
    ops = " ".join(f"{k}x{v}" for k, v in info["ops"].items())
    inner = " ".join(f"{k}x{v}" for k, v in info["subgraph_ops"].items())
    return (f"{name:<16} opset {info['opset']:<2} {info['nodes']:>3} nodes  {info['bytes'] / 1024:6.1f} KB  "
            f"{info['export_s']:5.2f} s  {ops}" + (f"  {{{inner}}}" if inner else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_dir())
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; models: {', '.join(MODELS)}")
    import torch
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = {"script_sha256": script_hash(), "torch": torch.__version__, "models": {}, "skipped": {}}
    if args.only and manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("script_sha256") == manifest["script_sha256"]:
            manifest = old
    for name in names:
        manifest["skipped"].pop(name, None)
        try:
            info = build(name, args.out)
        except Skipped as exc:
            manifest["models"].pop(name, None)
            manifest["skipped"][name] = str(exc)
            print(f"{name:<16} skipped: {exc}")
            continue
        manifest["models"][name] = info
        print(describe(name, info), flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
