"""SmoothQuant (--algorithms smoothquant) and the per-channel statistics it is built on: the
calibration table's optional ``channels`` field, the smoothing itself (float output unchanged on
a transformer block and on the exported tiny encoder), its record in the table and plan, and
int8 error that improves where it was measured to."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper, parser

import models
import qtool
from qtool.algorithms.smoothquant import Smoothing, candidates, smooth
from qtool.calib.table import CalibrationTable
from qtool.cli import main
from qtool.config import CalibrateOptions, QuantizeOptions
from qtool.errors import ConfigError, TableError

DATA = Path(__file__).resolve().parent / "data"
SQ = QuantizeOptions(algorithms=("smoothquant",))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def block(seed: int = 0, d: int = 16, ff: int = 32) -> onnx.ModelProto:
    """A transformer block with outlier channels (LayerNorm scales 30x on 3 channels): LayerNorm ->
    Q, K, V (one X, read only by them: folded into the LayerNorm), attention -> O (X from a
    MatMul of two activations: a Mul), residual -> LayerNorm read by the residual too (a Mul) ->
    MatMul + Add -> MatMul (folded into the first's columns and bias) -> Relu -> MatMul (a Mul)
    -> Reshape -> Gemm transB."""
    rng = np.random.default_rng(seed)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    block (float[B, T, {d}] x) => (float[N, {d}] y) {{
        ln = LayerNormalization <axis = -1> (x, g1, be1)
        q = MatMul (ln, wq)
        qb = Add (q, bq)
        k = MatMul (ln, wk)
        v = MatMul (ln, wv)
        kt = Transpose <perm = [0, 2, 1]> (k)
        sc = MatMul (qb, kt)
        p = Softmax <axis = -1> (sc)
        c = MatMul (p, v)
        o = MatMul (c, wo)
        ob = Add (o, bo)
        r = Add (x, ob)
        ln2 = LayerNormalization <axis = -1> (r, g2, be2)
        f1 = MatMul (ln2, w1)
        f1b = Add (f1, b1)
        f2 = MatMul (f1b, w2)
        a = Relu (f2)
        f3 = MatMul (a, w3)
        r2 = Add (ln2, f3)
        flat = Reshape (r2, shape)
        y = Gemm <transB = 1> (flat, w4, b4)
    }}
    """
    g = np.ones(d)
    g[[1, 5, 11]] = 30.0
    w = {"g1": g * rng.uniform(0.8, 1.2, d), "be1": rng.normal(0, 0.5, d) * (g / 3),
         "wq": rng.normal(0, 0.2, (d, d)), "bq": rng.normal(0, 0.1, d), "wk": rng.normal(0, 0.2, (d, d)),
         "wv": rng.normal(0, 0.2, (d, d)), "wo": rng.normal(0, 0.2, (d, d)), "bo": rng.normal(0, 0.1, d),
         "g2": g[::-1] * rng.uniform(0.8, 1.2, d), "be2": rng.normal(0, 0.1, d),
         "w1": rng.normal(0, 0.2, (d, ff)), "b1": rng.normal(0, 0.1, ff), "w2": rng.normal(0, 0.2, (ff, ff)),
         "w3": rng.normal(0, 0.2, (ff, d)), "w4": rng.normal(0, 0.2, (d, d)), "b4": rng.normal(0, 0.1, d)}
    model = parser.parse_model(text)
    for name, value in w.items():
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, d], np.int64), "shape"))
    onnx.checker.check_model(model, full_check=True)
    return model


def run(m, feeds):
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def sqnr(ref, got) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sq")
    path = models.save(block(), d / "block.onnx")
    rng = np.random.default_rng(1)
    np.savez(d / "calib.npz", x=rng.normal(0, 1, (32, 12, 16)).astype(np.float32))
    x = rng.normal(0, 1, (32, 12, 16)).astype(np.float32)
    np.savez(d / "eval.npz", x=x)
    # uint8 weights: exact u8 x u8 kernels and an 8-bit weight grid on every CPU (int8 weights get a 7-bit
    # grid on x86-64 without VNNI), so the figures below do not depend on the machine
    opts = QuantizeOptions(algorithms=("smoothquant",), weight_type="uint8")
    table = qtool.calibrate(path, d / "calib.npz", quantize_options=opts)
    table.save(d / "table.json")
    return {"dir": d, "model": path, "calib": d / "calib.npz", "x": x, "table": d / "table.json", "opts": opts}


# --------------------------------------------------------------------------- per-channel statistics

def test_channel_statistics_match_numpy_and_round_trip(tmp_path):
    m = models.matmul_mlp()
    path = models.save(m, tmp_path / "mlp.onnx")
    x = models.random_inputs(m, 40, seed=3)["x"] * np.linspace(0.1, 20, 16, dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    table = qtool.calibrate(path, tmp_path / "d.npz", CalibrateOptions(batch_size=7))
    ch = table.tensors["x"].channels
    flat = x.reshape(-1, 16).astype(np.float64)
    assert ch["axis"] == -1
    np.testing.assert_allclose(ch["max"], flat.max(0), rtol=1e-6)
    np.testing.assert_allclose(ch["min"], flat.min(0), rtol=1e-6)
    np.testing.assert_allclose(ch["mean"], flat.mean(0), rtol=1e-5, atol=1e-6)
    assert table.tensors["hr"].channels is not None and len(table.tensors["hr"].channels["max"]) == 32
    assert table.tensors["hb"].channels is None  # read by Relu only: no linear layer's input
    table.save(tmp_path / "t.json")
    assert CalibrationTable.load(tmp_path / "t.json") == table
    raw = json.loads((tmp_path / "t.json").read_text())
    for stats in raw["tensors"].values():  # a table from before the field loads as before
        stats.pop("channels", None)
    (tmp_path / "old.json").write_text(json.dumps(raw))
    old = CalibrationTable.load(tmp_path / "old.json")
    assert old.tensors["x"].channels is None and old.ranges() == table.ranges()
    raw["tensors"]["x"]["channels"] = dict(ch, max=ch["max"][:-1] + ["big"])
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(TableError, match=r"tensor 'x': channels.max\[15\] must be a finite number"):
        CalibrationTable.load(tmp_path / "bad.json")
    raw["tensors"]["x"]["channels"] = dict(ch, min=[v + 1e6 for v in ch["min"]])
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(TableError, match=r"channels: min\[0\] > max\[0\]"):
        CalibrationTable.load(tmp_path / "bad.json")


def test_merged_shards_keep_channel_statistics(tmp_path):
    from qtool.calib.merge import merge_tables
    m = models.matmul_mlp()
    path = models.save(m, tmp_path / "mlp.onnx")
    x = models.random_inputs(m, 30, seed=4)["x"]
    parts = []
    for i, rows in enumerate((x[:11], x[11:])):
        np.savez(tmp_path / f"p{i}.npz", x=rows)
        parts.append(qtool.calibrate(path, tmp_path / f"p{i}.npz"))
    np.savez(tmp_path / "all.npz", x=x)
    whole = qtool.calibrate(path, tmp_path / "all.npz").tensors["hr"].channels
    merged = merge_tables(parts).tensors["hr"].channels
    assert merged["max"] == whole["max"] and merged["min"] == whole["min"]
    np.testing.assert_allclose(merged["mean"], whole["mean"], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- the smoothing

def _record(model, seed=0) -> Smoothing:
    """Every candidate smoothed at alpha 0.5 with made-up (but wide-spread) activation maxima."""
    from qtool.graph import GraphView
    view, rng = GraphView(model), np.random.default_rng(seed)
    groups = {c.x: {"alpha": 0.5, "gain_db": 1.0, "nodes": {n: 1.0 for n in c.nodes},
                    "absmax": rng.uniform(0.01, 80, c.matrices(view)[0].shape[0]).tolist()}
              for c in candidates(model)}
    return Smoothing(groups, tried=len(groups))


def test_block_float_output_unchanged_each_fold(files):
    from qtool.prepare import prepare
    m = prepare(files["model"]).model
    kinds = {c.x: c.fold for c in candidates(m)}
    assert kinds == {"ln": "layernorm", "c": "mul", "ln2": "mul", "f1b": "linear", "a": "linear", "flat": "mul"}
    record = _record(m)
    out, notes = smooth(m, record)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Mul") == 3 and len(ops) == len(m.graph.node) + 3
    assert "1 folded into a LayerNormalization, 2 folded into the producing MatMul/Gemm, 3 by an inserted Mul" \
        in notes[0]
    a, b = run(m, {"x": files["x"]}), run(out, {"x": files["x"]})
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    before, after = ({t.name: numpy_helper.to_array(t) for t in g.graph.initializer} for g in (m, out))
    s = after["g1"] / before["g1"]  # the LayerNorm scale is divided by s, Q's rows multiplied by it
    np.testing.assert_allclose(after["wq"], before["wq"] / s[:, None], rtol=1e-5)
    assert np.ptp(s) > 1  # not all one


def test_exported_encoder_float_output_unchanged(tmp_path):
    """The torch-exported tiny encoder (decomposed LayerNorm: every smoothing is a Mul), with a record
    calibrated on it."""
    src = DATA / "tiny_encoder.onnx"
    ids = np.random.default_rng(0).integers(0, 50, (16, 10)).astype(np.int64)
    np.savez(tmp_path / "d.npz", ids=ids)
    table = qtool.calibrate(src, tmp_path / "d.npz", quantize_options=QuantizeOptions(algorithms=("smoothquant",)))
    assert table.smoothquant["tried"] >= 4
    from qtool.prepare import prepare
    plain = prepare(src).model
    out, _ = smooth(plain, _record(plain, seed=1))
    ref, got = run(plain, {"ids": ids}), run(out, {"ids": ids})
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()
    smoothed = prepare(src, algorithms=("smoothquant",), smoothing=table.smoothquant).model
    got = run(smoothed, {"ids": ids})
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


# --------------------------------------------------------------------------- calibration, table, plan

def test_table_rebuilds_the_model_and_int8_improves(files, tmp_path):
    table = CalibrationTable.load(files["table"])
    groups = table.smoothquant["groups"]
    assert groups and all(g["gain_db"] > 0 and 0.3 <= g["alpha"] <= 0.9 for g in groups.values())
    ref = run(onnx.load(files["model"]), {"x": files["x"]})
    r_table = qtool.quantize(files["model"], tmp_path / "t.onnx", table=files["table"], options=files["opts"])
    r_data = qtool.quantize(files["model"], tmp_path / "d.onnx", data=files["calib"], options=files["opts"])
    assert (tmp_path / "t.onnx").read_bytes() == (tmp_path / "d.onnx").read_bytes()
    plain = QuantizeOptions(weight_type="uint8")
    qtool.quantize(files["model"], tmp_path / "p.onnx", data=files["calib"], options=plain)
    smoothed = sqnr(ref, run(onnx.load(tmp_path / "t.onnx"), {"x": files["x"]}))
    unsmoothed = sqnr(ref, run(onnx.load(tmp_path / "p.onnx"), {"x": files["x"]}))
    assert smoothed > unsmoothed + 3, (smoothed, unsmoothed)
    applied = r_table.plan.applied["smoothquant"]
    assert set(applied) == {n for g in groups.values() for n in g["nodes"]}
    assert r_table.plan.smoothquant == table.smoothquant and r_data.plan.applied == r_table.plan.applied
    # the saved plan alone rebuilds the same model
    (tmp_path / "plan.json").write_text(r_table.plan.to_json())
    r = cli("quantize", files["model"], "--plan", tmp_path / "plan.json", "-o", tmp_path / "again.onnx")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "t.onnx").read_bytes()
    ops = [n.op_type for n in onnx.load(tmp_path / "t.onnx").graph.node]
    assert ops.count("Mul") == sum(1 for g in groups if g in ("c", "ln2", "flat"))


def test_refusals_name_the_problem(files, tmp_path):
    with pytest.raises(ConfigError, match="smoothquant needs calibration statistics"):
        qtool.plan(files["model"], options=SQ)
    plain = qtool.calibrate(files["model"], files["calib"])
    with pytest.raises(ConfigError, match="smoothquant needs calibration statistics"):
        qtool.quantize(files["model"], tmp_path / "q.onnx", table=plain, options=SQ)
    with pytest.raises(TableError, match="made with --algorithms smoothquant"):
        qtool.quantize(files["model"], tmp_path / "q.onnx", table=files["table"], options=QuantizeOptions())
    raw = json.loads(files["table"].read_text())
    x = next(iter(raw["smoothquant"]["groups"]))
    raw["smoothquant"]["groups"][x]["alpha"] = 2
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    r = cli("quantize", files["model"], "--table", tmp_path / "bad.json", "--algorithms", "smoothquant",
            "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and f"smoothquant: groups['{x}'].alpha must be a number in [0, 1]" in r.output
    raw["smoothquant"]["groups"][x].update(alpha=0.5, absmax=[1.0, 2.0])
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    r = cli("quantize", files["model"], "--table", tmp_path / "bad.json", "--algorithms", "smoothquant",
            "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "does not fit this model" in r.output, r.output
    r = cli("quantize", files["model"], "--mode", "dynamic", "--algorithms", "smoothquant", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "static int8" in r.output, r.output


def test_cli_calibrate_then_quantize(files, tmp_path):
    r = cli("calibrate", files["model"], "--data", files["calib"], "--algorithms", "smoothquant",
            "-o", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "t.json").read_text())["smoothquant"]["groups"]
    r = cli("quantize", files["model"], "--table", tmp_path / "t.json", "--algorithms", "smoothquant",
            "-o", tmp_path / "q.onnx", "--explain")
    assert r.exit_code == 0, r.output
    assert "note: smoothquant:" in r.output
