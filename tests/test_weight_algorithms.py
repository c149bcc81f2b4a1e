"""The weight algorithms (``--algorithms rounding,bias_correction``): GPTQ rounding lowers a layer's
output error below round to nearest's on real data, the im2col Hessian measures a Conv's output error
exactly, bias correction removes the per-channel mean shift, a saved plan re-applies byte for byte
without data, and missing data is one clear error."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.algorithms.layers import Conv2d, InputStats, output_error
from qtool.cli import main
from qtool.config import CalibrateOptions, QuantizeOptions
from qtool.errors import PlanError, QtoolError
from qtool.plans import Plan, Role
from qtool.qparams import dequantize

SAMPLE = Path(__file__).resolve().parent.parent / "calibration" / "fashion-mnist"
CALIB = CalibrateOptions(limit=64)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The sample quantized plain (API, 64 calibration images) and with both algorithms (the CLI, all 256
    images, --save-plan): (folder, plain plan, both plan)."""
    d = tmp_path_factory.mktemp("weights")
    plain = qtool.quantize(SAMPLE / "model.onnx", d / "plain.onnx", data=SAMPLE / "calib.npz", calibrate_options=CALIB)
    r = CliRunner().invoke(main, ["quantize", str(SAMPLE / "model.onnx"), "-o", str(d / "both.onnx"), "--data",
                                  str(SAMPLE / "calib.npz"), "--algorithms", "rounding,bias_correction",
                                  "--save-plan", str(d / "plan.json")])
    assert r.exit_code == 0, r.output
    return d, plain.plan, Plan.from_dict(json.loads((d / "plan.json").read_text()))


def _run(model, feeds, outputs):
    m = onnx.load(model) if isinstance(model, (str, Path)) else model
    for name in outputs:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, feeds)


def _calib(n=64):
    data = np.load(SAMPLE / "calib.npz")
    return {"input": data["input"][:n]}


def _weight(plan, name, model):
    """The weight the plan writes, dequantized (float32, as the DequantizeLinear computes it)."""
    from qtool.rewrite.weights import quantize_weight
    t = plan.tensors[name]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
    q, scale, zp = quantize_weight(w, t)
    return dequantize(q, scale, zp, axis=t.axis)


def test_rounding_lowers_each_layers_output_error_below_round_to_nearest(quantized):
    """On the calibration images, ||X W_q^T - X W^T|| of the Gemm fc1 (fp32 inputs X) and of both Convs
    (through onnxruntime) is smaller with GPTQ's codes than with round to nearest's."""
    _, plain, both = quantized
    m = onnx.load(SAMPLE / "model.onnx")
    assert set(both.applied["rounding"]) >= {"/fc1/Gemm", "/conv2/Conv"}
    assert all(g > 0 for g in both.applied["rounding"].values())
    feeds = _calib()
    x, = _run(SAMPLE / "model.onnx", feeds, ["/flatten/Flatten_output_0"])
    w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "fc1.weight"))
    err = {k: float(np.sum((x @ (_weight(r, "fc1.weight", m) - w).T) ** 2)) for k, r in
           (("rtn", plain), ("gptq", both))}
    assert err["gptq"] < 0.8 * err["rtn"]
    for conv, weight, source in (("/conv1/Conv", "conv1.weight", "input"),
                                 ("/conv2/Conv", "conv2.weight", "/pool1/MaxPool_output_0")):
        if conv not in both.applied["rounding"]:
            continue
        xin = feeds["input"] if source == "input" else _run(SAMPLE / "model.onnx", feeds, [source])[0]
        node = next(n for n in m.graph.node if n.name == conv)
        w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == weight))
        err = {k: _conv_energy(node, _weight(r, weight, m) - w, xin) for k, r in (("rtn", plain),
                                                                                         ("gptq", both))}
        assert err["gptq"] < err["rtn"], conv


def _conv_energy(node, w, x) -> float:
    """sum of squares of Conv(x, w) (no bias) with ``node``'s attributes, through onnxruntime."""
    conv = helper.make_node("Conv", ["x", "w"], ["y"], **{a.name: helper.get_attribute_value(a)
                                                          for a in node.attribute})
    g = helper.make_graph([conv], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    y, = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return float(np.sum(y.astype(np.float64) ** 2))


@pytest.mark.parametrize("geometry", [
    dict(kernel=(3, 3), strides=(1, 1), dilations=(1, 1), pads=(1, 1, 1, 1), auto_pad="NOTSET", groups=1),
    dict(kernel=(3, 2), strides=(2, 1), dilations=(1, 2), pads=(0, 1, 2, 0), auto_pad="NOTSET", groups=2),
    dict(kernel=(3, 3), strides=(2, 2), dilations=(1, 1), pads=(0, 0, 0, 0), auto_pad="SAME_UPPER", groups=4),
])
def test_im2col_hessian_gives_a_convs_output_error_exactly(geometry):
    """e H e^T per row, from im2col patches (groups, strides, dilations, pads, auto_pad), equals the sum of
    squares of onnxruntime's Conv with weight e."""
    rng = np.random.default_rng(0)
    c = Conv2d(**geometry)
    x = rng.normal(size=(3, 4, 9, 8)).astype(np.float32)
    e = rng.normal(size=(8, 4 // c.groups, *c.kernel)).astype(np.float32)
    stats = InputStats(c)
    stats.update(x)
    rows = e.reshape(c.groups, 8 // c.groups, -1).astype(np.float64)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(c.kernel), strides=list(c.strides),
                            dilations=list(c.dilations), group=c.groups,
                            **({"pads": list(c.pads)} if c.auto_pad == "NOTSET" else {"auto_pad": c.auto_pad}))
    assert output_error(rows, stats).sum() == pytest.approx(_conv_energy(node, e, x), rel=1e-4)


def test_bias_correction_removes_the_mean_shift_per_channel(quantized):
    """With fp32 inputs (the calibration images), each layer's per-channel mean output error from its
    written weights and bias, E[W_q x + b_q] - E[W x + b], is nearly gone (int32 rounding remains)."""
    _, _, both = quantized
    # "before": the same (rounded) weights, the model's bias rounded to the int32 grid
    rounded = both.with_tensors({k: replace(t, codes=None) if t.role is Role.BIAS else t
                                 for k, t in both.tensors.items()})
    assert set(both.applied["bias_correction"]) == {"/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"}
    m = onnx.load(SAMPLE / "model.onnx")
    feeds = _calib(256)  # the images it corrected on
    for node in m.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        x = feeds["input"] if node.input[0] == "input" else _run(SAMPLE / "model.onnx", feeds, [node.input[0]])[0]
        ref = _layer(node, *(_initializer(m, n) for n in node.input[1:]), x)
        shift = {}
        for label, r in (("before", rounded), ("after", both)):
            y = _layer(node, _weight(r, node.input[1], m), _bias(r, node.input[2], m), x)
            shift[label] = np.abs((y - ref).mean(axis=(0, 2, 3) if y.ndim == 4 else 0))
        half_step = 0.5 * np.asarray(both.tensors[node.input[2]].scale)  # the int32 bias grid's
        assert np.all(shift["after"] <= half_step * 1.01 + 1e-7), node.name
        assert shift["after"].sum() < 0.5 * shift["before"].sum(), node.name


def _initializer(m, name):
    return numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == name))


def _bias(plan, name, model):
    from qtool.rewrite.weights import quantize_bias
    q, scale, _ = quantize_bias(_initializer(model, name), plan.tensors[name])
    return (q.astype(np.float64) * scale).astype(np.float32)


def _layer(node, w, b, x):
    """The node (Conv or Gemm) on ``x`` with weight ``w`` and bias ``b``, through onnxruntime."""
    op = helper.make_node(node.op_type, ["x", "w", "b"], ["y"], **{a.name: helper.get_attribute_value(a)
                                                                  for a in node.attribute})
    g = helper.make_graph([op], "l", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w.astype(np.float32), "w"),
                           numpy_helper.from_array(b.astype(np.float32), "b")])
    lm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    lm.ir_version = 8
    y, = ort.InferenceSession(lm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return y.astype(np.float64)


def test_saved_plan_reapplies_byte_for_byte_without_data(quantized):
    """--save-plan then --plan: the same model bytes, no data; the plan holds codes and what each measured."""
    d, plain, both = quantized
    plan_path = d / "plan.json"
    saved = json.loads(plan_path.read_text())
    assert set(saved["applied"]) == {"rounding", "bias_correction"}
    assert saved["algorithms"] == ["rounding", "bias_correction"]
    coded = {t["name"] for t in saved["tensors"] if t.get("codes")}
    assert {"fc1.weight", "fc1.bias"} <= coded
    assert any(n.startswith("rounding: ") for n in saved["notes"])
    r = CliRunner().invoke(main, ["quantize", str(SAMPLE / "model.onnx"), "-o", str(d / "again.onnx"), "--plan",
                                  str(plan_path)])
    assert r.exit_code == 0, r.output
    assert (d / "both.onnx").read_bytes() == (d / "again.onnx").read_bytes()
    assert (d / "both.onnx").read_bytes() != (d / "plain.onnx").read_bytes()


def test_edited_codes_are_refused(quantized, tmp_path):
    _, _, both = quantized
    data = json.loads(both.to_json())
    t = next(t for t in data["tensors"] if t["name"] == "fc1.weight")
    t["codes"] = t["codes"][:-8]
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="fc1.weight.*codes"):
        qtool.quantize(SAMPLE / "model.onnx", tmp_path / "x.onnx", plan=tmp_path / "p.json")


def test_weight_algorithms_need_data_and_static_int8(tmp_path):
    table = qtool.calibrate(SAMPLE / "model.onnx", SAMPLE / "calib.npz", CALIB)
    with pytest.raises(QtoolError, match="give --data"):
        qtool.quantize(SAMPLE / "model.onnx", tmp_path / "q.onnx", table=table,
                       options=QuantizeOptions(algorithms=("rounding", "bias_correction")))
    with pytest.raises(QtoolError, match="static int8"):
        qtool.quantize(SAMPLE / "model.onnx", tmp_path / "q.onnx",
                       options=QuantizeOptions(mode="dynamic", algorithms=("rounding",)))
    table.save(tmp_path / "t.json")
    r = CliRunner().invoke(main, ["quantize", str(SAMPLE / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--table",
                                  str(tmp_path / "t.json"), "--algorithms", "bias_correction"])
    assert r.exit_code == 2 and "give --data" in r.output and "Traceback" not in r.output
    # a table is independent of the weight algorithms: with the data beside it, it serves them
    result = qtool.quantize(SAMPLE / "model.onnx", tmp_path / "q.onnx", table=table, data=SAMPLE / "calib.npz",
                            options=QuantizeOptions(algorithms=("bias_correction",)), calibrate_options=CALIB)
    assert result.plan.applied["bias_correction"]


def test_qoperator_writes_the_plans_codes(tmp_path):
    """The QOperator rewriter writes the corrected int32 biases (QLinearConv's input 8, QGemm's C) from the plan."""
    from qtool.algorithms.layers import decode
    r = qtool.quantize(SAMPLE / "model.onnx", tmp_path / "q.onnx", data=SAMPLE / "calib.npz", calibrate_options=CALIB,
                       options=QuantizeOptions(format="qoperator", algorithms=("bias_correction",)))
    m = onnx.load(tmp_path / "q.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    bias_input = {"QLinearConv": 8, "QGemm": 6}
    written = {n.name: inits[n.input[bias_input[n.op_type]]] for n in m.graph.node if n.op_type in bias_input}
    corrected = r.plan.applied["bias_correction"]
    assert set(corrected) <= set(written) and corrected
    for node in corrected:
        t = r.plan.tensors[next(n for n in onnx.load(SAMPLE / "model.onnx").graph.node if n.name == node).input[2]]
        assert np.array_equal(written[node], decode(t.codes, np.int32, written[node].shape))
