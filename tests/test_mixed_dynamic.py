"""Static or dynamic per node (--dynamic auto|NODES): inside a static int8 model, a MatMul whose
calibrated input range fits its runs badly is quantized at run time (DynamicQuantizeMatMul),
chosen by the error measured on the calibration data, recorded in the plan, re-applied byte
for byte, and run by onnxruntime next to the static integer kernels."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
import qtool
from plan_asserts import assert_model_matches_plan, optimized_ops
from qtool.config import QuantizeOptions
from qtool.errors import ConfigError, PlanError, QtoolError
from qtool.mixed import MARGIN_DB
from qtool.prepare import prepare

# h's input x comes in runs whose ranges differ 100x (one calibration run stretches the static
# range); y's input is a Tanh, bounded in every run
TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 8] y) {
    h = MatMul (x, w1)
    hb = Add (h, b1)
    t = Tanh (hb)
    y = MatMul (t, w2)
}
"""


def _runs(rng, scales):
    return [(rng.normal(size=(8, 16)) * s).astype(np.float32) for s in scales]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(16, 32)) * 0.3, "b1": rng.normal(size=32) * 0.1,
               "w2": rng.normal(size=(32, 8))}
    src = models.save(models._with_weights(TEXT, weights), d / "m.onnx")
    calib = d / "calib"
    calib.mkdir()
    for i, x in enumerate(_runs(rng, [100.0, 1.0, 1.0, 1.0, 1.0, 1.0])):  # one file = one run
        np.savez(calib / f"{i}.npz", x=x)
    return src, calib, _runs(np.random.default_rng(9), [1.0] * 4)


def _error(path, runs, ref):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.mean([np.square(s.run(None, {"x": x})[0] - r).mean() for x, r in zip(runs, ref)]))


def test_auto_picks_the_node_whose_runs_the_static_range_fits_badly(mlp, tmp_path):
    src, calib, runs = mlp
    mixed, static = tmp_path / "mixed.onnx", tmp_path / "static.onnx"
    result = qtool.quantize(src, mixed, data=calib, options=QuantizeOptions(dynamic=("auto",)))
    qtool.quantize(src, static, data=calib)
    plan = result.plan
    assert plan.node("MatMul(h)").kernel == "DynamicQuantizeMatMul"
    assert plan.node("Add(hb)").fused_into == "MatMul(h)" and plan.node("MatMul(h)").bias == "b1"
    assert plan.node("MatMul(y)").kernel == "MatMul"  # QDQ: onnxruntime fuses it
    gains = plan.applied["dynamic"]
    assert list(gains) == ["MatMul(h)"] and gains["MatMul(h)"] >= MARGIN_DB
    assert "dB dynamic: static" in plan.node("MatMul(y)").reason
    assert any(n.startswith("dynamic auto: 1 of 2 MatMul/Gemm") for n in plan.notes)
    assert_model_matches_plan(onnx.load(mixed), plan, prepare(src).model)
    ops = optimized_ops(mixed, tmp_path)
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0, ops
    # the model's own error on ordinary runs: the measured choice pays off end to end
    ref = [ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for x in runs]
    assert _error(mixed, runs, ref) < _error(static, runs, ref) / 2


def test_saved_plan_reapplies_byte_for_byte(mlp, tmp_path):
    src, calib, _ = mlp
    result = qtool.quantize(src, tmp_path / "a.onnx", data=calib, options=QuantizeOptions(dynamic=("auto",)))
    (tmp_path / "p.json").write_text(result.plan.to_json())
    qtool.quantize(src, tmp_path / "b.onnx", plan=tmp_path / "p.json")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    data = json.loads((tmp_path / "p.json").read_text())
    node = next(n for n in data["nodes"] if n["name"] == "MatMul(h)")
    node["kernel"] = "QLinearMatMul"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="kernel 'QLinearMatMul'"):
        qtool.quantize(src, tmp_path / "c.onnx", plan=tmp_path / "bad.json")


SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 8] y, float[N, 8] z) {
    y = MatMul (x, w1)
    z = MatMul (x, w2)
}
"""


def test_named_node_reads_the_float_input_its_static_neighbour_reads_quantized(tmp_path):
    rng = np.random.default_rng(1)
    src = models.save(models._with_weights(SHARED, {"w1": rng.normal(size=(16, 8)), "w2": rng.normal(size=(16, 8))}),
                      tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(32, 16)).astype(np.float32))
    out = tmp_path / "q.onnx"
    plan = qtool.quantize(src, out, data=tmp_path / "c.npz", options=QuantizeOptions(dynamic=("MatMul(y)",))).plan
    y, z = plan.node("MatMul(y)"), plan.node("MatMul(z)")
    assert y.kernel == "DynamicQuantizeMatMul" and y.float_inputs == ("x",) and z.kernel == "MatMul"
    assert plan.tensors["x"].action.value == "quantize"  # still, for MatMul(z)
    m = onnx.load(out)
    dyn = next(n for n in m.graph.node if n.op_type == "DynamicQuantizeMatMul")
    assert dyn.input[0] == "x"
    assert optimized_ops(out, tmp_path)["MatMulIntegerToFloat"] == 1
    x = rng.normal(size=(4, 16)).astype(np.float32)
    ref = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for r, g in zip(ref, got):
        assert np.abs(r - g).max() < 0.05 * np.abs(r).max()
    assert "dynamic" not in plan.applied  # named, not measured


def test_refusals(mlp, tmp_path):
    src, calib, _ = mlp
    table = qtool.calibrate(src, calib)
    with pytest.raises(QtoolError, match="give --data"):
        qtool.quantize(src, tmp_path / "q.onnx", table=table, options=QuantizeOptions(dynamic=("auto",)))
    with pytest.raises(ConfigError, match="static QDQ"):
        QuantizeOptions(mode="dynamic", dynamic=("auto",))
    with pytest.raises(ConfigError, match="matches no node"):
        qtool.quantize(src, tmp_path / "q.onnx", table=table, options=QuantizeOptions(dynamic=("MatMul(hh)",)))
