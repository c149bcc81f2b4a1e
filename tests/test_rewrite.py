"""Every rewrite: op-type counts, onnx's full checker, closeness to fp32 through onnxruntime."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

import models
import qtool
from plan_asserts import assert_model_matches_plan
from qtool.config import QuantizeOptions
from qtool.prepare import prepare


def ops(model):
    return Counter(n.op_type for n in model.graph.node)


def run(path_or_model, feeds):
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def optimized_ops(path, tmp_path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ops(onnx.load(so.optimized_model_filepath))


def quantize(model, tmp_path, n=48, options=QuantizeOptions(), **dims):
    src = models.save(model, tmp_path / "fp32.onnx")
    np.savez(tmp_path / "calib.npz", **models.random_inputs(model, n, seed=1, **dims))
    out = tmp_path / "int8.onnx"
    result = qtool.quantize(src, out, data=tmp_path / "calib.npz", options=options)
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert_model_matches_plan(q, result.plan, prepare(src, options.preprocess).model)
    return src, out, q, result


def close(a, b, rel):
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= rel * scale, (np.abs(a - b).max(), scale)


def test_cnn_per_channel(tmp_path):
    m = models.small_cnn()
    src, out, q, result = quantize(m, tmp_path)
    counts = ops(q)
    # x, r1, p1, r2, f, r3 activations; 4 weights + 4 biases behind DequantizeLinear
    assert counts["QuantizeLinear"] == 6
    assert counts["DequantizeLinear"] == 6 + 8
    assert counts["Conv"] == 2 and counts["Gemm"] == 2
    w1 = {i.name: i for i in q.graph.initializer}["w1_quantized"]
    assert w1.data_type == result.plan.tensors["w1"].precision.onnx_type  # int8, or uint8 on CPUs without VNNI
    b1 = {i.name: i for i in q.graph.initializer}["b1_quantized"]
    assert b1.data_type == onnx.TensorProto.INT32
    dq_axes = {n.input[0]: [a.i for a in n.attribute if a.name == "axis"] for n in q.graph.node
               if n.op_type == "DequantizeLinear"}
    assert dq_axes["w1_quantized"] == [0] and dq_axes["w3_quantized"] == [0] and dq_axes["w4_quantized"] == [1]
    feeds = models.random_inputs(m, 16, seed=7)
    close(run(src, feeds)[0], run(str(out), feeds)[0], 0.05)
    fused = optimized_ops(out, tmp_path)
    assert fused["QLinearConv"] == 2 and fused["QGemm"] == 2
    assert "Conv" not in fused and "Gemm" not in fused and "Relu" not in fused


def test_cnn_per_tensor_uint8(tmp_path):
    m = models.small_cnn()
    opts = QuantizeOptions(per_channel=False, activation_type="uint8")
    src, out, q, _ = quantize(m, tmp_path, options=opts)
    assert all(not any(a.name == "axis" for a in n.attribute) for n in q.graph.node if n.op_type == "DequantizeLinear"
               and not n.input[0].startswith("b"))
    zps = [i for i in q.graph.initializer if i.name == "x_zero_point"]
    assert zps[0].data_type == onnx.TensorProto.UINT8
    feeds = models.random_inputs(m, 16, seed=7)
    close(run(src, feeds)[0], run(str(out), feeds)[0], 0.08)


def test_matmul_weights_and_activations(tmp_path):
    m = models.matmul_mlp()
    src, out, q, result = quantize(m, tmp_path)
    counts = ops(q)
    assert counts["MatMul"] == 3
    assert sum(n.quantized for n in result.plan.nodes if n.op_type == "MatMul") == 3
    assert not any(n.quantized for n in result.plan.nodes if n.op_type in ("Add", "Relu"))
    t = result.plan.tensors
    assert t["h"].action.value == "skip"  # first MatMul: float output, its consumer (bias Add) is float
    assert t["h2"].action.value == "quantize" and t["t"].action.value == "share"
    assert counts["QuantizeLinear"] == 4  # x, hr, h2, t
    feeds = models.random_inputs(m, 16, seed=7)
    ref, got = run(src, feeds), run(str(out), feeds)
    for a, b in zip(ref, got):
        close(a, b, 0.05)


def test_exclude_by_name_and_op_type(tmp_path):
    m = models.small_cnn()
    opts = QuantizeOptions(exclude=("Gemm",))
    _, out, q, result = quantize(m, tmp_path, options=opts)
    reasons = {n.op_type: n.reason for n in result.plan.nodes if not n.quantized}
    assert reasons["Gemm"].startswith("kept float on request")
    assert ops(q)["DequantizeLinear"] - ops(q)["QuantizeLinear"] == 4  # only the two Conv weights+biases


def test_input_model_unchanged(tmp_path):
    m = models.small_cnn()
    src = models.save(m, tmp_path / "fp32.onnx")
    before = open(src, "rb").read()
    np.savez(tmp_path / "calib.npz", **models.random_inputs(m, 8))
    qtool.quantize(src, tmp_path / "q.onnx", data=tmp_path / "calib.npz")
    assert open(src, "rb").read() == before


def test_old_opset_is_upgraded(tmp_path):
    m = models.small_cnn()
    old = models.small_cnn(opset=11)
    assert old.opset_import[0].version == 11
    src, out, q, result = quantize(old, tmp_path)
    assert q.opset_import[0].version >= 13
    assert any("upgraded opset 11" in n for n in result.notes)
    feeds = models.random_inputs(m, 4, seed=3)
    close(run(src, feeds)[0], run(str(out), feeds)[0], 0.05)


def test_initializers_listed_as_inputs(tmp_path):
    """IR 3 style: weights also appear as graph inputs; replaced ones must vanish from inputs."""
    m = models.small_cnn()
    m.ir_version = 3
    for init in m.graph.initializer:
        m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    src, out, q, _ = quantize(m, tmp_path)
    names = {i.name for i in q.graph.input}
    assert "w1" not in names and "x" in names
    feeds = models.random_inputs(m, 4, seed=3)
    close(run(src, feeds)[0], run(str(out), feeds)[0], 0.05)


def test_plan_json_round_trip(cnn_files):
    plan = qtool.plan(cnn_files["model"], cnn_files["table"])
    from qtool.plans import Plan
    again = Plan.from_dict(plan.to_dict())
    assert again == plan
    assert "fused into" in plan.explain()


def test_cheap_first_layer_on_raw_input_stays_float(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    deep (float[N, 3, 16, 16] x) => (float[N, 64, 16, 16] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1)
        r = Relu (a)
        b = Conv <pads = [1, 1, 1, 1]> (r, w2)
        r2 = Relu (b)
        y = Conv <pads = [1, 1, 1, 1]> (r2, w3)
    }
    """
    rng = np.random.default_rng(0)
    m = models._with_weights(text, {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "w2": rng.normal(0, 0.1, (64, 8, 3, 3)),
                                    "w3": rng.normal(0, 0.05, (64, 64, 3, 3))})
    src, out, q, result = quantize(m, tmp_path, n=8)
    first = result.plan.nodes[0]
    assert not first.quantized and "first layer on the raw input" in first.reason
    assert "x" not in result.plan.tensors  # the model input is not quantized
    assert result.plan.nodes[2].quantized  # the next Conv is
