import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402

SAMPLE = ROOT / "calibration" / "fashion-mnist"


@pytest.fixture(scope="session")
def cnn_files(tmp_path_factory):
    """A small CNN, its calibration data and a calibrated table, built once."""
    import qtool
    d = tmp_path_factory.mktemp("cnn")
    m = models.small_cnn()
    path = models.save(m, d / "cnn.onnx")
    np.savez(d / "calib.npz", **models.random_inputs(m, 48, seed=1))
    x = models.random_inputs(m, 40, seed=2)
    np.savez(d / "eval.npz", labels=np.arange(40) % 10, **x)
    table = qtool.calibrate(path, d / "calib.npz")
    table.save(d / "table.json")
    return {"dir": d, "model": Path(path), "calib": d / "calib.npz", "eval": d / "eval.npz",
            "table": d / "table.json"}
