"""The detector recipe's task hook (calibration/detector/task.py): NMS, packing, F1 vs fp32.

Training the detector takes minutes, so these tests build raw YOLOv8-layout outputs
by hand; one test makes a few scenes with the recipe's generator (needs scikit-image).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

DET_DIR = Path(__file__).resolve().parent.parent / "calibration" / "detector"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"detector_{name}", DET_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


task = _load("task")

CELLS = 144
NUM_CLASSES = 3


def raw_output(objects_per_image, seed=0):
    """[B, 4+3, CELLS]: background cells score 0.01; each object (cx, cy, w, h, cls, score)
    fills one cell plus a weaker duplicate in another cell that NMS must drop."""
    rng = np.random.default_rng(seed)
    raw = np.zeros((len(objects_per_image), 4 + NUM_CLASSES, CELLS), np.float32)
    raw[:, :4] = rng.uniform(10, 80, (len(objects_per_image), 4, CELLS)).astype(np.float32)
    raw[:, 4:] = 0.01
    for b, objects in enumerate(objects_per_image):
        for k, (cx, cy, w, h, cls, sc) in enumerate(objects):
            for cell, factor, shift in ((2 * k, 1.0, 0.0), (2 * k + 1, 0.8, 1.0)):
                raw[b, :4, cell] = (cx + shift, cy, w, h)
                raw[b, 4 + cls, cell] = sc * factor
    return raw


OBJECTS = [
    [(20, 20, 16, 16, 0, 0.9), (60, 60, 20, 10, 1, 0.7)],
    [],
    [(48, 30, 24, 24, 2, 0.6), (48, 70, 12, 12, 0, 0.5), (80, 80, 10, 20, 1, 0.95)],
]


def test_reduce_packs_post_nms_detections():
    rows = task.reduce({"output0": raw_output(OBJECTS)}, {"images": np.zeros((3, 3, 96, 96), np.float32)})
    assert rows.shape == (3, task.MAX_DET, 6) and rows.dtype == np.float32
    counts = (rows[:, :, 5] >= 0).sum(axis=1)
    assert counts.tolist() == [2, 0, 3]          # duplicates suppressed, background below 0.25
    first = rows[0, 0]
    np.testing.assert_allclose(first, [12, 12, 28, 28, 0.9, 0], atol=1e-5)
    assert (rows[1] == -1).all()
    assert task.score(rows) == pytest.approx(5 / 3)


def test_compare_is_one_on_itself_and_falls_when_boxes_move():
    ref = task.reduce({"output0": raw_output(OBJECTS)}, {})
    assert task.compare(ref, ref) == 1.0
    moved = ref.copy()
    valid = moved[:, :, 5] >= 0
    moved[valid, 0] += 12                        # shift x1, x2 by 12 px: IoU < 0.5 for small boxes
    moved[valid, 2] += 12
    f1 = task.compare(ref, moved)
    assert f1 < 1.0
    relabelled = ref.copy()
    relabelled[0, 0, 5] = (relabelled[0, 0, 5] + 1) % NUM_CLASSES
    assert task.compare(ref, relabelled) == pytest.approx(2 * 4 / 10)
    dropped = ref.copy()
    dropped[2, :] = -1
    assert task.compare(ref, dropped) == pytest.approx(2 * 2 / 7)


def test_compare_empty_and_shape_checks():
    empty = np.full((4, task.MAX_DET, 6), -1, np.float32)
    assert task.compare(empty, empty) == 1.0
    ref = task.reduce({"output0": raw_output(OBJECTS)}, {})
    assert task.compare(ref, np.full_like(ref, -1)) == 0.0
    with pytest.raises(ValueError):
        task.compare(ref, ref[:2])
    with pytest.raises(ValueError):
        task.detect(np.zeros((2, 4, 10), np.float32))


def test_recipe_scenes_are_seeded():
    pytest.importorskip("skimage")
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        make = _load("make")                     # imports recipe_common and task by path
    finally:
        sys.path[:] = saved_path
        for name in ("task", "recipe_common"):
            if name not in saved_modules:
                sys.modules.pop(name, None)
    photos = make.load_photos()
    x1, b1, c1 = make.make_set(photos, 4, seed=5)
    x2, b2, c2 = make.make_set(photos, 4, seed=5)
    assert x1.shape == (4, 3, make.SIZE, make.SIZE) and x1.dtype == np.float32
    assert 0.0 <= x1.min() and x1.max() <= 1.0
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(b1, b2)
    assert ((c1 >= 0).sum(axis=1) >= 1).all()
    gt = make.gt_rows(b1, c1)
    assert task.compare(gt, gt) == 1.0
