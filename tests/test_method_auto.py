"""--method auto: per-tensor ranges chosen by the error measured at the model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qtool
from qtool.api import TableRanges
from qtool.calib.auto import CANDIDATES, Choice, output_snr, pick
from qtool.calib.methods import derive_range
from qtool.calib.table import CalibrationTable, TensorStats
from qtool.cli import main
from qtool.config import CalibrateOptions
from qtool.errors import TableError
from qtool.types import Precision

from models import _with_weights, save

SAMPLE = Path(__file__).resolve().parent.parent / "calibration" / "fashion-mnist"


def test_pick_needs_a_measurable_gain_over_minmax():
    assert pick({"minmax": 40.0, "percentile": 40.05, "mse": 43.0, "entropy": 42.0}) == "mse"
    assert pick({"minmax": 40.0, "percentile": 40.05, "mse": 40.09, "entropy": 39.0}) == "minmax"
    assert pick({"minmax": 40.0, "percentile": 41.0, "mse": 41.0, "entropy": 30.0}) == "percentile"  # tie: order


def test_output_snr_weighs_each_output_channel_alike():
    # channel 0 in pixels (energy 1e4), channel 1 a score (energy 1): the same relative error on either
    # channel gives the same SNR, so an error on the small channel is not drowned by the big one
    signal = np.array([1e4, 1.0])
    assert output_snr(signal, np.array([1.0, 0.0])) == pytest.approx(output_snr(signal, np.array([0.0, 1e-4])))
    assert output_snr(signal, np.array([0.0, 0.0])) == float("inf")
    assert output_snr(np.array([4.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(-10 * np.log10(0.5))


def _outlier_model(reaches_output: bool) -> onnx.ModelProto:
    """x -> Relu -> MatMul(W) -> y. Feature 0 holds rare outliers; W reads it (the outliers carry the
    output) or ignores it (they are incidental). The Relu output's histogram is the same either way."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.01, (1024, 4))
    w[0] = 1.0 if reaches_output else 0.0
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 1024] x) => (float[N, 4] y) { r = Relu (x)  y = MatMul (r, w) }"""
    return _with_weights(text, {"w": w})


def _outlier_data(path: Path) -> Path:
    rng = np.random.default_rng(1)
    x = np.abs(rng.laplace(0, 1, (32, 1024))).astype(np.float32)
    x[[0, 5], 0] = 30.0
    np.savez(path, x=x)
    return path


@pytest.mark.parametrize("reaches_output", [True, False])
def test_auto_chooses_by_the_outputs_not_by_the_histogram(tmp_path, reaches_output):
    model = save(_outlier_model(reaches_output), tmp_path / "m.onnx")
    data = _outlier_data(tmp_path / "x.npz")
    table = qtool.calibrate(model, data, CalibrateOptions(method="auto", batch_size=8))
    r = table.tensors["r"]
    snr = r.auto["output_snr_db"]
    assert set(snr) == set(CANDIDATES)
    if reaches_output:  # clipping the outliers destroys the outputs that depend on them
        assert r.auto["method"] == "minmax" and r.range == (r.min, r.max)
        assert snr["minmax"] > max(snr["mse"], snr["entropy"]) + 3  # the two that clip the outliers here
    else:  # they never reach the outputs: a clipping range wins by its finer step
        assert r.auto["method"] != "minmax" and r.range[1] < 0.9 * r.max
        assert snr[r.auto["method"]] > snr["minmax"] + 3
    assert table.method == "auto" and table.params["auto_samples"] == 16


def test_table_round_trip_and_malformed_choice(tmp_path):
    s = TensorStats(0.0, 4.0, 10, (0.0, 3.0), (), None, auto={"method": "mse", "output_snr_db": {"minmax": 30.0}})
    t = CalibrationTable("abc", "auto", {}, 1, 1, {"a": s})
    t.save(tmp_path / "t.json")
    back = CalibrationTable.load(tmp_path / "t.json")
    assert back.tensors["a"].auto == {"method": "mse", "output_snr_db": {"minmax": 30.0}}
    plain = json.loads((tmp_path / "t.json").read_text())
    del plain["tensors"]["a"]["auto"]
    assert CalibrationTable.from_dict(plain).tensors["a"].auto is None  # optional: old tables load
    for bad in ({"method": "median"}, {"method": "mse", "output_snr_db": {"mse": "high"}}, "mse"):
        d = json.loads((tmp_path / "t.json").read_text())
        d["tensors"]["a"]["auto"] = bad
        with pytest.raises(TableError, match="auto"):
            CalibrationTable.from_dict(d)


def test_wider_grids_rederive_the_chosen_method():
    # entropy's KL search models 8-bit grids only: a 16-bit tensor whose chosen method is entropy takes
    # min/max, as --method entropy does (mse would search the 16-bit grid: slow for a test)
    from qtool.calib.histogram import StreamingHistogram
    h = StreamingHistogram()
    h.update(np.random.default_rng(0).laplace(0, 1, 100_000))
    params = {"symmetric": False, "percentile": 99.999}
    bare = TensorStats(h.min, h.max, h.count, (h.min, h.max), (), h.to_dict())
    stats = TensorStats(h.min, h.max, h.count, derive_range(bare, "entropy", params), (), h.to_dict(),
                        auto={"method": "entropy", "output_snr_db": {}})
    table = CalibrationTable("x", "auto", params, 1, 1, {"t": stats})
    ranges = TableRanges(table, None)
    assert ranges("t", Precision.UINT8) == stats.range and stats.range[1] < 0.95 * h.max
    assert ranges("t", Precision.INT16) == (h.min, h.max)
    with pytest.raises(TableError, match="calibrate with --method auto"):
        TableRanges(CalibrationTable("x", "mse", params, 1, 1, {"t": bare}), "auto")


def test_sample_end_to_end_explain_plan_and_errors(tmp_path):
    runner = CliRunner()
    model, calib = str(SAMPLE / "model.onnx"), str(SAMPLE / "calib.npz")
    table = tmp_path / "auto.json"
    r = runner.invoke(main, ["calibrate", model, "--data", calib, "--method", "auto", "--limit", "256",
                             "--auto-samples", "8", "-o", str(table)])
    assert r.exit_code == 0, r.output
    t = CalibrationTable.load(table)
    assert any("auto:" in n for n in t.notes) and t.params["auto_samples"] == 8
    plan = tmp_path / "plan.json"
    r = runner.invoke(main, ["quantize", model, "-o", str(tmp_path / "q.onnx"), "--table", str(table),
                             "--explain", "--save-plan", str(plan)])
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())
    acts = [x for x in saved["tensors"] if x["role"] == "activation" and x["action"] == "quantize"]
    assert acts and all("(auto: outputs" in x["reason"] for x in acts)
    for x in acts:  # the plan's range is the one its reason names
        chosen = t.tensors[x["name"]].auto["method"]
        assert f"range {chosen} (auto" in x["reason"] and x["name"] in r.output
        assert tuple(x["range"]) == pytest.approx(t.tensors[x["name"]].range)
    assert saved.get("applied", {}).get("method_auto", {}) == {
        x["name"]: pytest.approx(Choice.from_dict(t.tensors[x["name"]].auto).gain_db(), abs=1e-3)
        for x in acts if t.tensors[x["name"]].auto["method"] != "minmax"}
    # a table of another method cannot say what auto would choose: one line, exit 2
    mse = tmp_path / "mse.json"
    assert runner.invoke(main, ["calibrate", model, "--data", calib, "--method", "mse", "--limit", "64",
                                "-o", str(mse)]).exit_code == 0
    r = runner.invoke(main, ["quantize", model, "-o", str(tmp_path / "q2.onnx"), "--table", str(mse),
                             "--method", "auto"])
    assert r.exit_code == 2 and "calibrate with --method auto" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["calibrate", "--merge", str(table), str(table), "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "cannot be merged" in r.output
    # the other methods still derive from an auto table's histograms
    assert runner.invoke(main, ["quantize", model, "-o", str(tmp_path / "q3.onnx"), "--table", str(table),
                                "--method", "percentile"]).exit_code == 0
