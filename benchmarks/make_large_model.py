"""Build a transformer-like float32 ONNX model over 2 GB, with its weights in external data.

    python benchmarks/make_large_model.py [--out DIR] [--dim 2048] [--blocks 17] [--force]

17 feed-forward blocks (LayerNormalization -> MatMul d x 4d + bias -> GELU written as
Div/Erf/Add/Mul/Mul -> MatMul 4d x d + bias -> residual Add), a final LayerNormalization:
34 MatMuls with constant weights. Input ``x`` is float32 [batch, seq, dim] with a dynamic
batch. At the default dim 2048 the weights take 2,282,360,832 bytes (2.13 GiB), more than
protobuf's 2 GiB limit, so the model only exists with external data.

Files (default folder ``~/.cache/qtool/large/``, never the repository): ``model.onnx``,
``model.onnx.data`` (each tensor written as it is drawn, so only one weight matrix is ever in
memory, page-aligned), ``calib.npz`` and ``eval.npz`` (float32 inputs, a leading batch
dimension, as ``qtool calibrate/eval --data`` read them). The model file is renamed into place
last: a folder holding ``model.onnx`` holds a complete model. numpy and onnx only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

DEFAULT_DIR = Path.home() / ".cache" / "qtool" / "large"
ALIGN = 4096  # page-aligned offsets: onnxruntime can map each tensor straight from the file


def _external(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def build(out_dir: str | os.PathLike = DEFAULT_DIR, dim: int = 2048, blocks: int = 17, seq: int = 16,
          calib_samples: int = 8, eval_samples: int = 4, seed: int = 0, inline_below: int = 0) -> Path:
    """Write model.onnx (+ .data), calib.npz and eval.npz into ``out_dir``; return the model path.

    ``inline_below``: tensors with fewer bytes stay inside model.onnx (0: every initializer goes
    to the data file, as the 2 GB model needs)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model_path, data_name = out / "model.onnx", "model.onnx.data"
    tmp_data = out / (data_name + ".partial")
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    hidden = 4 * dim
    with open(tmp_data, "wb") as f:
        def add(name: str, value: np.ndarray) -> None:
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.nbytes < inline_below:
                inits.append(onnx.numpy_helper.from_array(value, name))
                return
            offset = -f.tell() % ALIGN + f.tell()
            f.seek(offset)
            value.tofile(f)
            inits.append(_external(name, value.shape, data_name, offset, value.nbytes))

        nodes = []
        x = "x"
        for b in range(blocks):
            p = f"b{b}"
            add(f"{p}.ln.gamma", 1.0 + 0.05 * rng.standard_normal(dim, dtype=np.float32))
            add(f"{p}.ln.beta", 0.05 * rng.standard_normal(dim, dtype=np.float32))
            w1 = rng.standard_normal((dim, hidden), dtype=np.float32)
            w1 *= np.float32(1.0 / np.sqrt(dim))
            add(f"{p}.fc1.weight", w1)
            del w1
            add(f"{p}.fc1.bias", 0.02 * rng.standard_normal(hidden, dtype=np.float32))
            w2 = rng.standard_normal((hidden, dim), dtype=np.float32)
            w2 *= np.float32(1.0 / np.sqrt(hidden))
            add(f"{p}.fc2.weight", w2)
            del w2
            add(f"{p}.fc2.bias", 0.02 * rng.standard_normal(dim, dtype=np.float32))
            nodes += [
                helper.make_node("LayerNormalization", [x, f"{p}.ln.gamma", f"{p}.ln.beta"], [f"{p}/ln"],
                                 name=f"{p}/LayerNorm", axis=-1, epsilon=1e-5),
                helper.make_node("MatMul", [f"{p}/ln", f"{p}.fc1.weight"], [f"{p}/fc1/mm"], name=f"{p}/fc1/MatMul"),
                helper.make_node("Add", [f"{p}/fc1/mm", f"{p}.fc1.bias"], [f"{p}/fc1"], name=f"{p}/fc1/Add"),
                # GELU as exporters write it: x * 0.5 * (1 + erf(x / sqrt(2)))
                helper.make_node("Div", [f"{p}/fc1", "sqrt2"], [f"{p}/gelu/div"], name=f"{p}/gelu/Div"),
                helper.make_node("Erf", [f"{p}/gelu/div"], [f"{p}/gelu/erf"], name=f"{p}/gelu/Erf"),
                helper.make_node("Add", [f"{p}/gelu/erf", "one"], [f"{p}/gelu/add"], name=f"{p}/gelu/Add"),
                helper.make_node("Mul", [f"{p}/fc1", f"{p}/gelu/add"], [f"{p}/gelu/mul"], name=f"{p}/gelu/Mul"),
                helper.make_node("Mul", [f"{p}/gelu/mul", "half"], [f"{p}/gelu"], name=f"{p}/gelu/Mul_1"),
                helper.make_node("MatMul", [f"{p}/gelu", f"{p}.fc2.weight"], [f"{p}/fc2/mm"], name=f"{p}/fc2/MatMul"),
                helper.make_node("Add", [f"{p}/fc2/mm", f"{p}.fc2.bias"], [f"{p}/fc2"], name=f"{p}/fc2/Add"),
                helper.make_node("Add", [x, f"{p}/fc2"], [f"{p}/out"], name=f"{p}/residual"),
            ]
            x = f"{p}/out"
        add("final.ln.gamma", np.ones(dim, np.float32))
        add("final.ln.beta", np.zeros(dim, np.float32))
        nodes.append(helper.make_node("LayerNormalization", [x, "final.ln.gamma", "final.ln.beta"], ["y"],
                                      name="final/LayerNorm", axis=-1, epsilon=1e-5))
        f.truncate()
    consts = [onnx.numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    graph = helper.make_graph(nodes, "large_ffn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, dim])],
                              initializer=consts + inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qtool-benchmarks",
                              ir_version=8)
    data_rng = np.random.default_rng(seed + 1)
    np.savez(out / "calib.npz", x=data_rng.standard_normal((calib_samples, seq, dim), dtype=np.float32))
    np.savez(out / "eval.npz", x=data_rng.standard_normal((eval_samples, seq, dim), dtype=np.float32))
    os.replace(tmp_data, out / data_name)
    tmp_model = out / "model.onnx.partial"
    onnx.save_model(model, str(tmp_model))
    onnx.checker.check_model(str(tmp_model))  # by path: the data file is found beside it
    os.replace(tmp_model, model_path)
    return model_path


def model_bytes(model_path: str | os.PathLike) -> int:
    """The model file plus its data file."""
    p = Path(model_path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def ensure(out_dir: str | os.PathLike = DEFAULT_DIR, **kwargs) -> Path:
    """The model in ``out_dir``, built first if it is missing."""
    path = Path(out_dir).expanduser() / "model.onnx"
    if not path.exists() or not path.with_name("model.onnx.data").exists():
        build(out_dir, **kwargs)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_DIR), help="folder to write into (default %(default)s)")
    ap.add_argument("--dim", type=int, default=2048, help="model width; MatMuls are dim x 4dim and 4dim x dim")
    ap.add_argument("--blocks", type=int, default=17, help="feed-forward blocks (2 MatMuls each)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--force", action="store_true", help="rebuild even if the model exists")
    args = ap.parse_args(argv)
    path = (build if args.force else ensure)(args.out, dim=args.dim, blocks=args.blocks, seq=args.seq)
    print(f"{path}: {model_bytes(path):,} bytes with its data file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
