"""Exported (not hand-written) graphs: torch's LayerNorm/GELU/SiLU chains, Constant nodes,
BatchNorm, Pad, residuals. Checked through onnxruntime's optimised graph: what runs as
an integer kernel, and what stays float with which reason."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qtool
from plan_asserts import assert_model_matches_plan, optimized_ops
from qtool.prepare import prepare

DATA = Path(__file__).resolve().parent / "data"


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("enc")
    rng = np.random.default_rng(0)
    for i, seq in enumerate((8, 5, 12)):  # batches of different sequence lengths
        np.savez(d / f"calib{i}.npz", ids=rng.integers(0, 50, (6, seq)).astype(np.int64))
    out = d / "int8.onnx"
    result = qtool.quantize(DATA / "tiny_encoder.onnx", out, data=d)
    assert_model_matches_plan(onnx.load(out), result.plan, prepare(DATA / "tiny_encoder.onnx").model)
    return out, result, rng.integers(0, 50, (3, 10)).astype(np.int64)


def test_encoder_keeps_layernorm_and_gelu_chains_float(encoder):
    _, result, _ = encoder
    reasons = {n.name: n.reason for n in result.plan.nodes}
    ln = [k for k in reasons if k.startswith("/ln1/")]
    assert len(ln) == 9 and all("LayerNorm pattern" in reasons[k] for k in ln)
    gelu = [k for k in reasons if k.startswith("/act/")]
    assert len(gelu) == 5 and all("GELU (Erf) pattern" in reasons[k] for k in gelu)
    assert "Softmax" in reasons["/Softmax"]
    quantized = Counter(n.op_type for n in result.plan.nodes if n.quantized)
    assert quantized["MatMul"] == 4 and quantized["Gather"] == 2
    assert any("Constant nodes turned into initializers" in n for n in result.notes)


def test_encoder_runs_integer_kernels_and_stays_close(encoder, tmp_path):
    out, _, ids = encoder
    onnx.checker.check_model(onnx.load(out), full_check=True)
    ops = optimized_ops(out, tmp_path)
    assert ops["MatMulIntegerToFloat"] == 4, ops
    ref, got = run(DATA / "tiny_encoder.onnx", {"ids": ids}), run(out, {"ids": ids})
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.99


def test_resnet_preprocess_and_fusion(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "int8.onnx"
    result = qtool.quantize(DATA / "tiny_resnet.onnx", out, data=tmp_path / "c.npz")
    notes = " ".join(result.notes)
    assert "BatchNormalization" in notes and "Pad" in notes
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    assert_model_matches_plan(q, result.plan, prepare(DATA / "tiny_resnet.onnx").model)  # BN folded weights
    assert "BatchNormalization" not in {n.op_type for n in q.graph.node}
    reasons = {n.name: n.reason for n in result.plan.nodes}
    assert "Swish/SiLU" in reasons["/silu/Sigmoid"] and "GELU (Tanh)" in reasons["/gelu/Tanh"]
    assert reasons["/Add"].startswith("int8 Add")
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1, ops
    assert "Conv" not in ops
    x = rng.normal(size=(4, 3, 16, 16)).astype(np.float32)
    ref, got = run(DATA / "tiny_resnet.onnx", {"x": x}), run(out, {"x": x})
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_no_preprocess_keeps_batchnorm(tmp_path):
    from qtool.config import QuantizeOptions
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(4, 3, 16, 16)).astype(np.float32))
    result = qtool.quantize(DATA / "tiny_resnet.onnx", tmp_path / "q.onnx", data=tmp_path / "c.npz",
                            options=QuantizeOptions(preprocess=False))
    assert "BatchNormalization" in {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert not any("BatchNormalization" in n for n in result.notes)


def test_concat_of_mismatched_ranges_stays_float(tmp_path):
    """A detection-head-like Concat: boxes in pixels next to sigmoid scores."""
    import models
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    head (float[N, 4, 8] x) => (float[N, 8, 8] y) {
        a = Conv (x, wa, ba)
        b = Conv (x, wb, bb)
        c = Concat <axis = 1> (a, b)
        y = Conv (c, wc, bc)
    }
    """
    r = np.random.default_rng(0)
    w = {"wa": r.normal(0, 1, (4, 4, 1)), "ba": np.full(4, 300.0), "wb": r.normal(0, 0.01, (4, 4, 1)),
         "bb": np.zeros(4), "wc": r.normal(0, 0.1, (8, 8, 1)), "bc": np.zeros(8)}
    m = models._with_weights(text, w)
    src = models.save(m, tmp_path / "head.onnx")
    np.savez(tmp_path / "c.npz", x=r.normal(size=(8, 4, 8)).astype(np.float32))
    plan = qtool.quantize(src, tmp_path / "q.onnx", data=tmp_path / "c.npz").plan
    concat = next(n for n in plan.nodes if n.op_type == "Concat")
    assert not concat.quantized and "ranges differ" in concat.reason


def if_model():
    """Conv -> Relu -> Flatten, then an If whose branches read the outer 'f' and outer initializers."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    branch = [helper.make_graph([helper.make_node("MatMul", ["f", w], [y])], y, [],
                                [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 5])])
              for w, y in (("wa", "yt"), ("wb", "ye"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flat"),
             helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
             helper.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch[0], else_branch=branch[1], name="if")]
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in
             {"w1": rng.normal(size=(4, 3, 3, 3)), "wa": rng.normal(size=(256, 5)), "wb": rng.normal(size=(256, 5)),
              "zero": np.float32(0)}.items()]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_subgraphs_stay_valid(fmt, tmp_path):
    """Regression: initializers read only inside an If branch were dropped (checker failure, exit 3)."""
    from qtool.config import QuantizeOptions
    m = if_model()
    src = tmp_path / "if.onnx"
    onnx.save(m, src)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(16, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = qtool.quantize(src, out, data=tmp_path / "c.npz", options=QuantizeOptions(format=fmt))
    assert result.plan.node("conv").quantized and "control flow" in result.plan.node("if").reason
    q = onnx.load(out)
    onnx.checker.check_model(q)
    branches = {a.name: a.g for n in q.graph.node if n.op_type == "If" for a in n.attribute}
    taken = [g for g in branches.values() if any(n.op_type == "DequantizeLinear" or n.op_type.startswith("Q")
                                                  for n in g.node)]
    assert taken, "the branch the calibration data took is quantized inside"
    for g in branches.values():  # a weight is read from outside, or quantized inside the branch
        inner = {t.name for t in g.initializer}
        reads = {i for n in g.node for i in n.input} - {o for n in g.node for o in n.output} - inner
        assert reads <= {t.name for t in q.graph.initializer} | {n for m in q.graph.node for n in m.output}
    x = {"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
