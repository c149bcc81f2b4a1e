#!/usr/bin/env python3
"""Build qtool's detector sample: a small YOLO-style (anchor-free, YOLOv8-like
export) fp32 detector in ONNX, trained on synthetic scenes, plus calibration and
evaluation tensors.

Scenes: a random crop of a ``skimage.data`` photo (astronaut, coffee, chelsea,
rocket, ...; all bundled with scikit-image, no download), resized to 96x96 RGB,
with 1-4 filled shapes pasted on it in random colours and sizes. Three classes:
0 circle, 1 rectangle, 2 triangle. Boxes are the shapes' tight pixel boxes.

Model (79k parameters, 12.8M MACs per image): Conv+BN+SiLU blocks down to a stride-8 grid (12x12 = 144 cells); per
cell 4 box values and 3 class logits. Boxes are decoded inside the model
(anchor = cell centre, left/top/right/bottom distances = softplus * 8 px) into
cx, cy, w, h in input pixels, class scores go through a sigmoid, and both are
concatenated into ONE output ``output0`` [batch, 7, 144] (4 box rows, then 3
score rows), the layout of a YOLOv8 ONNX export. Input ``images`` [batch, 3, 96, 96]
float32 in [0, 1].

Like real YOLO exports, the stem's output has a few outlier channels: two of
the stem's 8 channels are trained as silu(24 z)/24 (a sharper SiLU on the usual
scale); for export the gain 24 moves into their BN (so into the folded Conv)
and 1/24 into the next conv's weights on them, which leaves the float function
unchanged (to ~1e-5) but makes those two channels ~10-16x wider than the
others. A per-tensor int8 range on the stem's output (the input of
``/down1/conv/Conv``) then spends most of its levels on them.
(``--outlier-gain 1`` builds the model without them.)

Outputs (in --out, default ~/.cache/qtool/detector):
  model.onnx  fp32 detector (opset 17, BN folded, dynamic batch axis)
  calib.npz   ``images`` float32 [128,3,96,96]
  eval.npz    ``images`` float32 [200,3,96,96] (other scenes, other seed)
  eval_gt.npz ground truth of eval.npz: ``boxes`` float32 [200,4,4] (x1,y1,x2,y2 px)
              and ``classes`` int64 [200,4], both padded with -1 (kept apart:
              ``qtool eval`` wants only model inputs in its data)

Rebuild:  pip install torch==2.13.0 scikit-image && python calibration/detector/make.py
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from recipe_common import check_and_write, ort_session, print_outputs, tidy_initializer_names  # noqa: E402
import task as det_task  # noqa: E402  (NMS, F1: the same code qtool's task hook runs)

SIZE = 96
STRIDE = 8
GRID = SIZE // STRIDE
NUM_CLASSES = 3
CLASS_NAMES = ("circle", "rectangle", "triangle")
MAX_OBJ = 4
N_TRAIN = 3000
N_CALIB = 128
N_EVAL = 200
OPSET = 17
TOL = 1e-4
INPUT_NAME = "images"
OUTPUT_NAME = "output0"
OUTLIER_CHANNELS = (2, 5)
DEFAULT_OUT = Path.home() / ".cache" / "qtool" / "detector"

# Photos without circles, boxes or triangles of their own (coins, colorwheel, retina,
# clock, text would be unlabelled look-alikes).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "camera", "moon", "grass", "gravel", "brick")

# --------------------------------------------------------------------------- data


def load_photos() -> list[np.ndarray]:
    """Bundled skimage.data photos as float32 RGB [H,W,3] in [0,1]."""
    try:
        import skimage.data as skd
    except ImportError:
        print("scikit-image is not installed; install it with: pip install scikit-image", file=sys.stderr)
        sys.exit(2)
    photos = []
    for name in PHOTOS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = np.asarray(getattr(skd, name)())
        except Exception:  # not bundled in this scikit-image version
            continue
        img = img.astype(np.float32) / np.float32(255.0)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(img[:, :, :3]))
    if len(photos) < 4:
        print(f"only {len(photos)} skimage.data photos load offline; need at least 4", file=sys.stderr)
        sys.exit(2)
    return photos


def resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """Plain bilinear resize of [H,W,3] to [size,size,3] (pixel centres aligned)."""
    h, w = img.shape[:2]
    ys = (np.arange(size, dtype=np.float32) + 0.5) * (h / size) - 0.5
    xs = (np.arange(size, dtype=np.float32) + 0.5) * (w / size) - 0.5
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return (top * (1 - wy) + bot * wy).astype(np.float32)


def shape_mask(kind: int, cx: float, cy: float, r: float, rng) -> np.ndarray:
    """Boolean [SIZE,SIZE] mask of one filled shape centred near (cx, cy), half-size ~r."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if kind == 0:  # circle
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == 1:  # axis-aligned rectangle, aspect 0.5-2
        a = rng.uniform(0.5, 1.0)
        hw, hh = (r, r * a) if rng.random() < 0.5 else (r * a, r)
        return (np.abs(xx - cx) <= hw) & (np.abs(yy - cy) <= hh)
    # triangle: three vertices on a circle of radius r, random rotation
    t0 = rng.uniform(0, 2 * np.pi)
    ang = t0 + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
    vx, vy = cx + r * np.cos(ang), cy + r * np.sin(ang)
    inside = np.ones_like(xx, dtype=bool)
    sign = None
    for i in range(3):
        j = (i + 1) % 3
        cross = (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
        s = np.sign((vx[j] - vx[i]) * (vy[(i + 2) % 3] - vy[i]) - (vy[j] - vy[i]) * (vx[(i + 2) % 3] - vx[i]))
        sign = s if sign is None else sign
        inside &= cross * s >= 0
    return inside


def make_scene(photos, rng):
    """One scene: ([3,SIZE,SIZE] float32 in [0,1], boxes [n,4] x1y1x2y2 px, classes [n])."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(96, h, w), min(h, w, 320) + 1))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    img = resize_bilinear(photo[y0:y0 + side, x0:x0 + side], SIZE)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    boxes, classes = [], []
    occupied = np.zeros((SIZE, SIZE), dtype=bool)
    n_obj = int(rng.integers(1, MAX_OBJ + 1))
    for _ in range(n_obj * 10):  # retries for overlap
        if len(boxes) == n_obj:
            break
        kind = int(rng.integers(NUM_CLASSES))
        r = float(rng.uniform(8, 20))
        cx = float(rng.uniform(r, SIZE - r))
        cy = float(rng.uniform(r, SIZE - r))
        m = shape_mask(kind, cx, cy, r, rng)
        if m.sum() < 40 or (m & occupied).sum() > 0.1 * m.sum():
            continue
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        # keep the shape visible: push its colour away from the background mean under it
        bg = img[m].mean(axis=0)
        if np.abs(colour - bg).max() < 0.35:
            colour = np.where(bg > 0.5, colour * 0.3, 0.7 + 0.3 * colour).astype(np.float32)
        img = img.copy()
        img[m] = colour
        occupied |= m
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        classes.append(kind)
    # later shapes may cover earlier ones a little; boxes stay the full shape's
    x = np.ascontiguousarray(np.clip(img, 0, 1).transpose(2, 0, 1), dtype=np.float32)
    return x, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64)


def make_set(photos, n, seed):
    rng = np.random.default_rng(seed)
    xs = np.empty((n, 3, SIZE, SIZE), np.float32)
    boxes = np.full((n, MAX_OBJ, 4), -1, np.float32)
    classes = np.full((n, MAX_OBJ), -1, np.int64)
    for i in range(n):
        x, b, c = make_scene(photos, rng)
        xs[i] = x
        boxes[i, :len(b)] = b
        classes[i, :len(c)] = c
    return xs, boxes, classes


# --------------------------------------------------------------------------- model


def build_model(torch, outlier_gain: float, outlier_channels=OUTLIER_CHANNELS):
    nn = torch.nn
    F = torch.nn.functional

    class ConvBNSiLU(nn.Module):
        def __init__(self, cin, cout, k=3, s=1):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.silu(self.bn(self.conv(x)))

    class Stem(ConvBNSiLU):
        """Conv+BN+SiLU whose output channels carry a fixed per-channel gain
        (a few channels x ``outlier_gain``): the outlier channels of real exports."""

        def __init__(self, cin, cout, gain):
            super().__init__(cin, cout, 3, 2)
            g = torch.ones(cout)
            g[list(outlier_channels)] = gain
            self.register_buffer("gain", g.view(1, -1, 1, 1))
            self.folded = False

        def forward(self, x):
            if self.folded:  # export layout: a plain Conv+BN+SiLU
                return super().forward(x)
            # Training: silu(g*z)/g on the outlier channels (a sharper SiLU, same scale as
            # the others). fold_outliers() moves g into the BN and 1/g into the next conv.
            return F.silu(self.bn(self.conv(x)) * self.gain) / self.gain

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Stem(3, 8, outlier_gain)                  # 48x48
            self.down1 = ConvBNSiLU(8, 32, 3, 2)                  # 24x24
            self.down2 = ConvBNSiLU(32, 48, 3, 2)                 # 12x12 (stride 8)
            self.block1 = ConvBNSiLU(48, 48, 3, 1)
            self.block2 = ConvBNSiLU(48, 48, 3, 1)
            self.head = ConvBNSiLU(48, 48, 3, 1)
            self.box_pred = nn.Conv2d(48, 4, 1)
            self.cls_pred = nn.Conv2d(48, NUM_CLASSES, 1)
            nn.init.constant_(self.cls_pred.bias, -4.0)
            ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
            anchors = torch.stack([xs.flatten(), ys.flatten()]).float().add(0.5).mul(STRIDE)
            self.register_buffer("anchors", anchors.view(1, 2, -1))  # [1,2,cells] px

        @torch.no_grad()
        def fold_outliers(self):
            """Same function, export layout: the stem's output channels become g*silu(g*z)/g
            = silu(g*z) (g folded into the BN's scale and shift, hence into the Conv), and
            the next conv's weights on them are divided by g."""
            g = self.stem.gain.flatten()
            self.stem.bn.weight.mul_(g)
            self.stem.bn.bias.mul_(g)
            self.down1.conv.weight.div_(g.view(1, -1, 1, 1))
            self.stem.folded = True

        def raw(self, x):
            f = self.stem(x)
            f = self.down2(self.down1(f))
            f = f + self.block2(self.block1(f))
            h = self.head(f)
            box = self.box_pred(h).flatten(2)                       # [B,4,cells]
            cls = self.cls_pred(h).flatten(2)                       # [B,C,cells]
            ltrb = F.softplus(box) * STRIDE
            return ltrb, cls

        def forward(self, x):
            ltrb, cls = self.raw(x)
            lt, rb = ltrb[:, :2], ltrb[:, 2:]
            xy1 = self.anchors - lt
            xy2 = self.anchors + rb
            return torch.cat([(xy1 + xy2) * 0.5, xy2 - xy1, cls.sigmoid()], dim=1)

    return Detector()


def seed_everything(seed: int, torch) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def assign_targets(boxes: np.ndarray, classes: np.ndarray):
    """Centre sampling: a cell is positive for a box when its centre lies inside the
    box and within 1.5 cells of the box centre (the cell holding the centre always).
    A cell claimed by several boxes goes to the smallest.
    Returns cls targets [N,C,cells], ltrb targets [N,4,cells] (px), positive mask [N,cells]."""
    n = len(boxes)
    cells = GRID * GRID
    c = (np.arange(GRID, dtype=np.float32) + 0.5) * STRIDE
    ax = np.tile(c, GRID)
    ay = np.repeat(c, GRID)
    cls_t = np.zeros((n, NUM_CLASSES, cells), np.float32)
    box_t = np.zeros((n, 4, cells), np.float32)
    pos = np.zeros((n, cells), bool)
    for i in range(n):
        best_area = np.full(cells, np.inf, np.float32)
        for b, k in zip(boxes[i], classes[i]):
            if k < 0:
                continue
            x1, y1, x2, y2 = b
            bcx, bcy = (x1 + x2) / 2, (y1 + y2) / 2
            inside = (ax > x1) & (ax < x2) & (ay > y1) & (ay < y2)
            near = (np.abs(ax - bcx) <= 1.5 * STRIDE) & (np.abs(ay - bcy) <= 1.5 * STRIDE)
            m = inside & near
            centre_cell = int(min(bcy // STRIDE, GRID - 1) * GRID + min(bcx // STRIDE, GRID - 1))
            m[centre_cell] = True
            area = (x2 - x1) * (y2 - y1)
            m &= area < best_area
            best_area[m] = area
            pos[i, m] = True
            cls_t[i, :, m] = 0
            cls_t[i, k, m] = 1
            box_t[i, :, m] = np.stack([ax[m] - x1, ay[m] - y1, x2 - ax[m], y2 - ay[m]], axis=1)
    box_t = np.maximum(box_t, 0.5)
    return cls_t, box_t, pos


def iou_ltrb(torch, p, t):
    """IoU between ltrb distances from the same anchor, [K,4] each."""
    inter = ((torch.min(p[:, 0], t[:, 0]) + torch.min(p[:, 2], t[:, 2]))
             * (torch.min(p[:, 1], t[:, 1]) + torch.min(p[:, 3], t[:, 3])))
    union = (p[:, 0] + p[:, 2]) * (p[:, 1] + p[:, 3]) + (t[:, 0] + t[:, 2]) * (t[:, 1] + t[:, 3]) - inter
    return inter / union.clamp_min(1e-6)


def giou_loss(torch, p, t):
    """GIoU loss between ltrb distances from the same anchor, [K,4] each."""
    pl, pt, pr, pb = p.unbind(1)
    tl, tt, tr, tb = t.unbind(1)
    inter = (torch.min(pl, tl) + torch.min(pr, tr)) * (torch.min(pt, tt) + torch.min(pb, tb))
    ap = (pl + pr) * (pt + pb)
    at = (tl + tr) * (tt + tb)
    union = ap + at - inter
    iou = inter / union.clamp_min(1e-6)
    enc = (torch.max(pl, tl) + torch.max(pr, tr)) * (torch.max(pt, tt) + torch.max(pb, tb))
    giou = iou - (enc - union) / enc.clamp_min(1e-6)
    return (1 - giou)


def train(model, x, cls_t, box_t, pos, *, epochs, batch_size, lr, seed, torch):
    F = torch.nn.functional
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        sums = np.zeros(2)
        nb = 0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            ltrb, logits = model.raw(x[idx])
            ct, bt, pm = cls_t[idx], box_t[idx], pos[idx]
            npos = pm.sum().clamp_min(1)
            pt = ltrb.permute(0, 2, 1)[pm]
            tt = bt.permute(0, 2, 1)[pm]
            giou_l = giou_loss(torch, pt, tt)
            # IoU-aware score target (as YOLOv8's task-aligned one): a badly placed box
            # should score low, so a score threshold keeps only the good ones
            with torch.no_grad():
                ct = ct.clone()
                q = iou_ltrb(torch, pt, tt).clamp(0.05, 1.0)
                ct_pos = ct.permute(0, 2, 1)[pm] * q[:, None]
                ct.permute(0, 2, 1)[pm] = ct_pos
            # focal-ish BCE: down-weights the many easy background cells
            bce = F.binary_cross_entropy_with_logits(logits, ct, reduction="none")
            p = logits.sigmoid()
            w = (ct - p).abs().pow(1.5)
            l_cls = (bce * w).sum() / npos
            l_box = giou_l.sum() / npos + 0.1 * (pt - tt).abs().sum() / STRIDE / npos
            loss = l_cls + 2.0 * l_box
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += [l_cls.item(), l_box.item()]
            nb += 1
        print(f"epoch {epoch + 1}/{epochs}: cls loss {sums[0] / nb:.4f}  box loss {sums[1] / nb:.4f}  "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)


# --------------------------------------------------------------------------- export


def export_onnx(model, path: Path, torch):
    import onnx

    model.eval()
    dummy = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), buf,
            dynamo=False, do_constant_folding=True, export_params=True,
            opset_version=OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = m.producer_name or "pytorch"
    tidy_initializer_names(m.graph)
    m.doc_string = ("qtool sample: YOLO-style detector (fp32); input images [batch,3,96,96] in [0,1]; "
                    "output0 [batch,7,144] = cx,cy,w,h (px), sigmoid scores circle,rectangle,triangle")
    op_types = check_and_write(m, path)
    return m, op_types


def run_ort(sess, x: np.ndarray, batch: int = 100) -> np.ndarray:
    return np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def gt_rows(boxes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Ground truth in the task's row layout [N,MAX_DET,6] (score 1)."""
    rows = np.full((len(boxes), det_task.MAX_DET, 6), -1, np.float32)
    for i in range(len(boxes)):
        k = classes[i] >= 0
        n = int(k.sum())
        rows[i, :n, :4] = boxes[i][k]
        rows[i, :n, 4] = 1.0
        rows[i, :n, 5] = classes[i][k]
    return rows


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--train", type=int, default=N_TRAIN, help="training scenes (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--outlier-gain", type=float, default=24.0,
                    help="gain on two stem channels (1 = no outlier channels; default: %(default)s)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    photos = load_photos()  # exits 2 without scikit-image

    import torch

    seed_everything(args.seed, torch)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    x_train, b_train, c_train = make_set(photos, args.train, args.seed * 3 + 1)
    x_calib, _, _ = make_set(photos, N_CALIB, args.seed * 3 + 2)
    x_eval, b_eval, c_eval = make_set(photos, N_EVAL, args.seed * 3 + 3)
    print(f"{len(photos)} photos; scenes: {args.train} train, {N_CALIB} calib, {N_EVAL} eval "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    np.savez_compressed(args.out / "calib.npz", **{INPUT_NAME: x_calib})
    np.savez_compressed(args.out / "eval.npz", **{INPUT_NAME: x_eval})
    np.savez_compressed(args.out / "eval_gt.npz", boxes=b_eval, classes=c_eval)

    cls_t, box_t, pos = assign_targets(b_train, c_train)
    model = build_model(torch, args.outlier_gain)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in model.parameters())} params, epochs={args.epochs} "
          f"batch={args.batch_size} lr={args.lr} seed={args.seed} outlier gain={args.outlier_gain}", flush=True)
    t_train = time.perf_counter()
    train(model, torch.from_numpy(x_train), torch.from_numpy(cls_t), torch.from_numpy(box_t),
          torch.from_numpy(pos), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
          seed=args.seed, torch=torch)
    print(f"training: {time.perf_counter() - t_train:.1f}s")

    model.eval()
    with torch.no_grad():
        before = model(torch.from_numpy(x_eval[:50]))
        model.fold_outliers()
        after = model(torch.from_numpy(x_eval[:50]))
    print(f"outlier folding changes the outputs by at most {float((before - after).abs().max()):.2e}")

    model_path = args.out / "model.onnx"
    _, op_types = export_onnx(model, model_path, torch)
    print("onnx ops:", ", ".join(f"{k} x{v}" for k, v in op_types.items()))

    sess = ort_session(model_path)
    out_ort = run_ort(sess, x_eval)
    model.eval()
    with torch.no_grad():
        out_pt = model(torch.from_numpy(x_eval)).numpy()
    max_diff = float(np.abs(out_ort - out_pt).max())
    print(f"max |onnxruntime - torch| over eval outputs: {max_diff:.2e}")
    if max_diff > TOL * max(1.0, float(np.abs(out_pt).max()) / 10):
        raise RuntimeError(f"onnxruntime and torch disagree by {max_diff:.2e}")

    # Stem outliers: per-channel range of the stem's output on the calibration set.
    with torch.no_grad():
        s = model.stem(torch.from_numpy(x_calib)).numpy()
    ch_max = np.abs(s).max(axis=(0, 2, 3))
    print("stem output |max| per channel:", " ".join(f"{v:.1f}" for v in ch_max),
          f"(median {np.median(ch_max):.2f})")

    dets = det_task.reduce({OUTPUT_NAME: out_ort}, {INPUT_NAME: x_eval})
    gt = gt_rows(b_eval, c_eval)
    p, r, f1 = det_task.precision_recall_f1(gt, dets)
    print(f"fp32 detections vs ground truth on eval.npz ({N_EVAL} scenes, {int((c_eval >= 0).sum())} objects; "
          f"score >= {det_task.SCORE_THRESHOLD}, NMS @{det_task.NMS_IOU}, match @IoU {det_task.MATCH_IOU}): "
          f"precision {p:.4f} recall {r:.4f} F1 {f1:.4f}; {det_task.score(dets):.2f} detections/image")
    print_outputs(args.out, t_start, ("model.onnx", "calib.npz", "eval.npz", "eval_gt.npz"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
