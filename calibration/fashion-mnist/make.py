#!/usr/bin/env python3
"""Build qtool's bundled Fashion-MNIST sample: a small fp32 CNN in ONNX plus
calibration and evaluation tensors.

Data comes from Debian's ``dataset-fashion-mnist`` package (idx gz files in
/usr/share/datasets/fashion-mnist/). The model is trained on CPU with torch,
deterministically, and exported with the classic TorchScript ONNX exporter
(opset 17, BatchNorm folded into Conv, dynamic batch axis).

Outputs (in --out, default: this folder):
  model.onnx  fp32 model, input ``input`` [batch,1,28,28] float32, output ``logits`` [batch,10]
  calib.npz   ``input`` float32 [256,1,28,28] drawn (seeded) from the training set, ``labels`` int64 [256]
  eval.npz    ``input`` float32 [2000,1,28,28] = first 2,000 test images, ``labels`` int64 [2000]

Inputs are pixel/255 normalised with mean 0.2860 and std 0.3530; the
normalisation is applied to the data, not inside the model.

Rebuild:  pip install torch==2.13.0 && python calibration/fashion-mnist/make.py
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recipe_common import check_and_write, ort_session, print_outputs, tidy_initializer_names  # noqa: E402


DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN = 0.2860
STD = 0.3530
N_CALIB = 256
N_EVAL = 2000
OPSET = 17
TOL = 1e-4


# --------------------------------------------------------------------------- data

def read_idx(path: Path) -> np.ndarray:
    """Parse a gzip'd idx file (unsigned-byte payload) into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: payload size {data.size} does not match shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(data_dir: Path):
    missing = [n for n in FILES.values() if not (data_dir / n).is_file()]
    if missing:
        print(f"Fashion-MNIST not found in {data_dir} (missing {', '.join(missing)}); "
              "install it with: sudo apt-get install dataset-fashion-mnist", file=sys.stderr)
        sys.exit(2)
    arrays = {k: read_idx(data_dir / n) for k, n in FILES.items()}
    assert arrays["train_images"].shape == (60000, 28, 28)
    assert arrays["test_images"].shape == (10000, 28, 28)
    return arrays


def normalise(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 NCHW [N,1,28,28], (x/255 - mean)/std."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


# --------------------------------------------------------------------------- model

def build_model(nn):
    # Module names become ONNX node names (/conv1/Conv, /fc1/Gemm, ...).
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("bn1", nn.BatchNorm2d(16)),
        ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("bn2", nn.BatchNorm2d(32)),
        ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 7 * 7, 128)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(128, 10)),
    ]))


def seed_everything(seed: int, torch) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def train(model, x_train, y_train, *, epochs, batch_size, lr, seed, torch):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            total += len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f}  "
              f"train acc {correct / total:.4f}  ({time.perf_counter() - t0:.1f}s)")


# --------------------------------------------------------------------------- export

def export_onnx(model, path: Path, torch):
    import onnx

    model.eval()
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.float32)
    buf = io.BytesIO()
    try:
        # Classic TorchScript exporter: folds eval-mode BatchNorm into Conv.
        # (torch >= 2.9 flags it with a DeprecationWarning; silence just that.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (dummy,), buf,
                dynamo=False, do_constant_folding=True, export_params=True,
                opset_version=OPSET, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as e:  # pragma: no cover - exporter missing in some future torch
        print(f"classic exporter failed ({type(e).__name__}: {e}); "
              "falling back to explicit Conv+BN fusion + dynamo exporter", file=sys.stderr)
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        layers = list(model)
        fused = []
        i = 0
        while i < len(layers):
            if (isinstance(layers[i], torch.nn.Conv2d) and i + 1 < len(layers)
                    and isinstance(layers[i + 1], torch.nn.BatchNorm2d)):
                fused.append(fuse_conv_bn_eval(layers[i], layers[i + 1]))
                i += 2
            else:
                fused.append(layers[i])
                i += 1
        fmodel = torch.nn.Sequential(*fused).eval()
        batch = torch.export.Dim("batch", min=1)
        prog = torch.onnx.export(
            fmodel, (dummy,), dynamo=True, external_data=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: batch},),
        )
        buf = io.BytesIO(prog.model_proto.SerializeToString())

    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = m.producer_name or "pytorch"
    tidy_initializer_names(m.graph)
    m.doc_string = "qtool sample: Fashion-MNIST CNN (fp32); input = (pixel/255 - 0.2860) / 0.3530"
    op_types = check_and_write(m, path)
    return m, op_types


def ort_logits(sess, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=here, help="output folder (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    data = load_fashion_mnist(args.data_dir)  # exits 2 if the package is missing

    import torch

    seed_everything(args.seed, torch)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train = normalise(data["train_images"])
    y_train = data["train_labels"].astype(np.int64)
    x_test = normalise(data["test_images"])
    y_test = data["test_labels"].astype(np.int64)

    # Calibration / eval tensors.
    rng = np.random.default_rng(args.seed)
    calib_idx = np.sort(rng.choice(len(x_train), size=N_CALIB, replace=False))
    np.savez_compressed(args.out / "calib.npz", input=x_train[calib_idx], labels=y_train[calib_idx])
    np.savez_compressed(args.out / "eval.npz", input=x_test[:N_EVAL], labels=y_test[:N_EVAL])

    # Train.
    model = build_model(torch.nn)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in model.parameters())} params, "
          f"epochs={args.epochs} batch={args.batch_size} lr={args.lr} seed={args.seed}")
    train(model, torch.from_numpy(x_train), torch.from_numpy(y_train),
          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, torch=torch)

    # Export + checks.
    model_path = args.out / "model.onnx"
    _, op_types = export_onnx(model, model_path, torch)
    print("onnx ops:", ", ".join(f"{k} x{v}" for k, v in op_types.items()))

    sess = ort_session(model_path)
    logits_ort = ort_logits(sess, x_test)
    model.eval()
    with torch.no_grad():
        logits_pt = torch.cat([model(torch.from_numpy(x_test[i:i + 1000]))
                               for i in range(0, len(x_test), 1000)]).numpy()
    max_diff = float(np.abs(logits_ort - logits_pt).max())
    print(f"max |onnxruntime - torch| over 10k test logits: {max_diff:.2e}")
    if max_diff > TOL:
        raise RuntimeError(f"onnxruntime and torch disagree by {max_diff:.2e} > {TOL}")
    pred = logits_ort.argmax(1)
    acc_eval = float((pred[:N_EVAL] == y_test[:N_EVAL]).mean())
    acc_full = float((pred == y_test).mean())
    print(f"fp32 accuracy (onnxruntime) on eval.npz ({N_EVAL} images): {acc_eval:.4f}")
    print(f"fp32 accuracy (onnxruntime) on full test set ({len(y_test)} images): {acc_full:.4f}")

    print_outputs(args.out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
