"""SmoothQuant's choice of alpha simulates the weight grid the plan will use: per output channel,
or one scale per weight with --no-per-channel (where migrating range into a weight row costs
every other row precision)."""

import numpy as np

from qtool.algorithms.smoothquant import Grids, _simulate
from qtool.config import QuantizeOptions
from qtool.types import Precision


def test_grids_follow_per_channel():
    assert Grids.for_options(QuantizeOptions()).per_channel
    grids = Grids.for_options(QuantizeOptions(per_channel=False))
    assert not grids.per_channel and "per tensor" in grids.label


def test_simulated_weights_per_tensor_use_one_scale():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(64, 8))
    w = rng.normal(size=(8, 4)) * np.array([1.0, 1.0, 1.0, 40.0])  # one large output column
    s = np.ones(8)
    mn, mx = rows.min(axis=0), rows.max(axis=0)
    grids = Grids(Precision.UINT8, False, Precision.INT8, None, per_channel=False)
    got, = _simulate(rows, mn, mx, [w], s, grids)
    per_axis, = _simulate(rows, mn, mx, [w], s, Grids(Precision.UINT8, False, Precision.INT8, None))
    scale = np.float32(np.abs(w).max() / 127)  # symmetric int8, one scale for the whole weight
    wq = np.clip(np.rint(w.astype(np.float32) / scale), -127, 127) * scale
    x_scale = np.float32((mx.max() - min(mn.min(), 0)) / 255)
    zp = np.rint(-min(mn.min(), 0) / x_scale)
    xq = (np.clip(np.rint(rows.astype(np.float32) / x_scale) + zp, 0, 255) - zp) * x_scale
    np.testing.assert_allclose(got, xq @ wq, rtol=1e-5, atol=1e-5)
    ref = rows @ w
    # the small columns lose precision per tensor: the two simulations differ, per axis is closer
    assert np.sum((got - ref)[:, :3] ** 2) > 10 * np.sum((per_axis - ref)[:, :3] ** 2)


def test_a_plan_with_a_record_but_without_the_algorithm_is_refused(tmp_path):
    """A hand-edited plan whose smoothquant record its algorithms do not name: one line, exit 2, not
    a model quietly written without the smoothing the record describes."""
    import json
    from pathlib import Path

    from click.testing import CliRunner

    import qtool
    from qtool.cli import main
    from qtool.config import CalibrateOptions
    sample = Path(__file__).resolve().parent.parent / "calibration" / "fashion-mnist"
    r = qtool.quantize(sample / "model.onnx", tmp_path / "q.onnx", data=sample / "calib.npz",
                       calibrate_options=CalibrateOptions(limit=16))
    plan = json.loads(r.plan.to_json())
    plan["smoothquant"] = {"groups": {"/flatten/Flatten_output_0": {"alpha": 0.5, "absmax": [1.0] * 1568,
                                                                    "gain_db": 1.0}}}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    out = CliRunner().invoke(main, ["quantize", str(sample / "model.onnx"), "-o", str(tmp_path / "x.onnx"),
                                    "--plan", str(tmp_path / "p.json")])
    assert out.exit_code == 2 and "smoothquant record" in out.output and "Traceback" not in out.output, out.output
    assert not (tmp_path / "x.onnx").exists()
