"""Calibration end to end: histogram methods in the table, re-derivation, shard merging,
batches of different shapes, degenerate and non-finite tensors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import models
import onnx
import qtool
from qtool.calib.merge import merge_tables
from qtool.calib.table import CalibrationTable
from qtool.cli import main
from qtool.config import CalibrateOptions
from qtool.errors import DataError, TableError


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def dyn(tmp_path_factory):
    d = tmp_path_factory.mktemp("dyn")
    m = models.dynamic_conv()
    path = models.save(m, d / "dyn.onnx")
    rng = np.random.default_rng(0)
    data = d / "data"
    data.mkdir()
    sizes = [(5, 16, 16), (3, 12, 20), (7, 9, 9), (1, 30, 8)]  # batch, H, W per file
    for i, (n, h, w) in enumerate(sizes):
        x = rng.standard_t(3, size=(n, 3, h, w)).astype(np.float32)
        np.savez(data / f"part{i}.npz", x=x)
    return {"model": path, "data": data, "dir": d}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "mse"])
def test_batches_of_different_shapes(dyn, method):
    table = qtool.calibrate(dyn["model"], dyn["data"], CalibrateOptions(method=method, batch_size=4))
    assert table.samples == 16 and table.batches == 6  # 4+1, 3, 4+3, 1
    stats = table.tensors["x"]
    lo, hi = stats.range
    assert stats.min <= lo < hi <= stats.max
    if method != "minmax":
        assert stats.histogram is not None and stats.histogram["count"] == stats.count
        assert (lo, hi) != (stats.min, stats.max)  # heavy-tailed Student-t input: clipped


def test_table_keeps_histograms_and_rederives(dyn, tmp_path):
    table = qtool.calibrate(dyn["model"], dyn["data"], CalibrateOptions(method="entropy"))
    path = tmp_path / "t.json"
    table.save(path)
    again = CalibrationTable.load(path)
    assert again == table
    p_entropy = qtool.plan(dyn["model"], path)
    p_pct = qtool.plan(dyn["model"], path, method="percentile")
    p_minmax = qtool.plan(dyn["model"], path, method="minmax")
    assert p_minmax.tensors["x"].range == (table.tensors["x"].min, table.tensors["x"].max)
    assert p_pct.tensors["x"].range != p_entropy.tensors["x"].range
    out = tmp_path / "q.onnx"
    r = cli("quantize", dyn["model"], "--table", path, "--method", "mse", "-o", out)
    assert r.exit_code == 0, r.output


def test_minmax_table_cannot_derive_histogram_methods(dyn, tmp_path):
    table = qtool.calibrate(dyn["model"], dyn["data"])
    with pytest.raises(TableError, match="no histograms"):
        qtool.plan(dyn["model"], table, method="percentile")


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_shard_then_merge_equals_one_pass(dyn, tmp_path, method):
    files = sorted(dyn["data"].glob("*.npz"))
    whole = qtool.calibrate(dyn["model"], dyn["data"], CalibrateOptions(method=method))
    paths = []
    for i, part in enumerate((files[:2], files[2:])):
        shard = tmp_path / f"shard{i}"
        shard.mkdir()
        for f in part:
            (shard / f.name).write_bytes(f.read_bytes())
        t = qtool.calibrate(dyn["model"], shard, CalibrateOptions(method=method))
        paths.append(tmp_path / f"t{i}.json")
        t.save(paths[-1])
    out = tmp_path / "merged.json"
    r = cli("calibrate", "--merge", paths[0], "--merge", paths[1], "-o", out)
    assert r.exit_code == 0, r.output
    merged = CalibrationTable.load(out)
    assert merged.samples == whole.samples
    for name, stats in whole.tensors.items():
        assert merged.tensors[name].range == stats.range
        assert merged.tensors[name].histogram == stats.histogram


def test_merge_refuses_mismatched_tables(dyn, cnn_files):
    a = qtool.calibrate(dyn["model"], dyn["data"])
    b = qtool.calibrate(dyn["model"], dyn["data"], CalibrateOptions(method="entropy"))
    with pytest.raises(TableError, match="different methods"):
        merge_tables([a, b])
    with pytest.raises(TableError, match="different models"):
        merge_tables([a, CalibrationTable.load(cnn_files["table"])])


def test_constant_tensor_gets_range_and_note(tmp_path):
    m = models.log_then_conv()
    path = models.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).uniform(0.5, 2, (8, 2, 4, 4)).astype(np.float32))
    for method in ("minmax", "entropy"):
        table = qtool.calibrate(path, tmp_path / "d.npz", CalibrateOptions(method=method))
        z = table.tensors["z"]
        assert z.range == (0.0, 0.0) and any("constant" in n for n in z.notes)
    qtool.quantize(path, tmp_path / "q.onnx", table=table)


def test_nan_in_activation_names_tensor_and_batch(tmp_path):
    m = models.log_then_conv()
    path = models.save(m, tmp_path / "m.onnx")
    x = np.random.default_rng(0).uniform(0.5, 2, (8, 2, 4, 4)).astype(np.float32)
    x[5, 0, 0, 0] = -1.0  # Log(-1) = NaN in batch 1 (batch size 4), first seen in l = Log(x)
    np.savez(tmp_path / "d.npz", x=x)
    with pytest.raises(DataError, match=r"tensor 'l' holds NaN or Inf in batch 1"):
        qtool.calibrate(path, tmp_path / "d.npz", CalibrateOptions(batch_size=4))


def test_cli_method_options(dyn, tmp_path):
    out = tmp_path / "t.json"
    r = cli("calibrate", dyn["model"], "--data", dyn["data"], "-o", out, "--method", "percentile",
            "--percentile", "99.9", "--bins", "512", "--symmetric")
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["params"]["percentile"] == 99.9 and d["params"]["bins"] == 512 and d["params"]["symmetric"]
    lo, hi = d["tensors"]["x"]["range"]
    assert lo == -hi


def test_model_with_a_batch_of_one_fixed_inside_is_calibrated_sample_by_sample(tmp_path):
    """A Reshape that bakes in batch 1 (common in exports): calibration runs one sample at a
    time, says so, and the statistics equal those of one batch per sample."""
    from onnx import parser
    m = parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    r (float[N, 4] x) => (float[1, 4] y) {
        s = Constant <value = int64[2] {1, 4}> ()
        h = Reshape (x, s)
        y = MatMul (h, w)
    }
    """)
    m.graph.initializer.append(onnx.numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), "w"))
    path = models.save(m, tmp_path / "r.onnx")
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    table = qtool.calibrate(path, tmp_path / "d.npz", CalibrateOptions(batch_size=4))
    assert any("one sample at a time" in n for n in table.notes)
    one = qtool.calibrate(path, tmp_path / "d.npz", CalibrateOptions(batch_size=1))
    assert table.samples == one.samples == 10
    assert {k: (v.min, v.max) for k, v in table.tensors.items()} == {k: (v.min, v.max) for k, v in one.tensors.items()}
