"""Same plan, other rewriters: QOperator and dynamic; external data in and out."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner

import models
import qtool
from plan_asserts import assert_model_matches_plan
from qtool.prepare import prepare
from qtool.cli import main
from qtool.config import QuantizeOptions

DATA = Path(__file__).resolve().parent / "data"


def ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_qoperator_cnn(cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    result = qtool.quantize(cnn_files["model"], out, table=cnn_files["table"],
                            options=QuantizeOptions(format="qoperator"))
    assert_model_matches_plan(onnx.load(out), result.plan, prepare(cnn_files["model"]).model)
    counts = ops(out)
    assert counts == Counter({"QLinearConv": 2, "QGemm": 2, "MaxPool": 1, "Flatten": 1, "QuantizeLinear": 1}), counts
    onnx.checker.check_model(onnx.load(out))
    feeds = models.random_inputs(models.small_cnn(), 8, seed=4)
    ref, got = run(cnn_files["model"], feeds), run(out, feeds)
    qdq = tmp_path / "qdq.onnx"
    qtool.quantize(cnn_files["model"], qdq, table=cnn_files["table"])
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
    assert np.abs(run(qdq, feeds) - got).max() < 0.02 * np.abs(ref).max()  # same plan, same numbers (up to rounding)


def test_qoperator_residual_graph(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = qtool.quantize(DATA / "tiny_resnet.onnx", out, data=tmp_path / "c.npz",
                            options=QuantizeOptions(format="qoperator"))
    assert_model_matches_plan(onnx.load(out), result.plan, prepare(DATA / "tiny_resnet.onnx").model)
    counts = ops(out)
    assert counts["QLinearConv"] == 5 and counts["QLinearAdd"] == 1 and counts["QGemm"] == 1
    assert "Conv" not in counts
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    ref, got = run(DATA / "tiny_resnet.onnx", {"x": x}), run(out, {"x": x})
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_dynamic_needs_no_data_and_folds_bias(tmp_path):
    out = tmp_path / "dyn.onnx"
    r = CliRunner().invoke(main, ["quantize", str(DATA / "tiny_encoder.onnx"), "-o", str(out), "--mode", "dynamic",
                                  "--explain"])
    assert r.exit_code == 0, r.output
    assert "DynamicQuantizeMatMul" in r.output and "bias folded into" in r.output
    plan = qtool.plan(DATA / "tiny_encoder.onnx", options=QuantizeOptions(mode="dynamic"))
    assert_model_matches_plan(onnx.load(out), plan, prepare(DATA / "tiny_encoder.onnx").model)
    counts = ops(out)
    assert counts["DynamicQuantizeMatMul"] == 4 and counts["MatMul"] == 2  # attention MatMuls stay float
    ids = np.random.default_rng(1).integers(0, 50, (3, 9)).astype(np.int64)
    ref, got = run(DATA / "tiny_encoder.onnx", {"ids": ids}), run(out, {"ids": ids})
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.995


def test_dynamic_gemm_with_transposed_weight(cnn_files, tmp_path):
    out = tmp_path / "dyn.onnx"
    result = qtool.quantize(cnn_files["model"], out, options=QuantizeOptions(mode="dynamic"))
    assert_model_matches_plan(onnx.load(out), result.plan, prepare(cnn_files["model"]).model)
    assert result.plan.tensors["w3"].transpose and result.plan.tensors["w3"].axis == 1
    assert ops(out)["DynamicQuantizeMatMul"] == 1  # the 32x1024 Gemm (transB=1)
    tiny = next(n for n in result.plan.nodes if n.name == "Gemm(logits)")
    assert not tiny.quantized and "of the model's MACs" in tiny.reason  # 32x10: too small to pay
    feeds = models.random_inputs(models.small_cnn(), 8, seed=4)
    ref, got = run(cnn_files["model"], feeds), run(out, feeds)
    assert np.abs(ref - got).max() < 0.02 * np.abs(ref).max()


def test_external_data_in_and_out(tmp_path):
    m = models.small_cnn()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save_model(m, str(src_dir / "fp32.onnx"), save_as_external_data=True, location="fp32.weights",
                    size_threshold=0)
    assert (src_dir / "fp32.weights").exists()
    np.savez(tmp_path / "c.npz", **models.random_inputs(m, 16))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    result = qtool.quantize(src_dir / "fp32.onnx", out, data=tmp_path / "c.npz",
                            options=QuantizeOptions(external_data=True))
    assert (tmp_path / "out" / "q.onnx.data").exists()
    assert_model_matches_plan(onnx.load(out), result.plan, prepare(src_dir / "fp32.onnx").model)
    again = tmp_path / "out" / "again.onnx"  # the saved plan re-applies: the same weight bytes
    (tmp_path / "p.json").write_text(result.plan.to_json())
    qtool.quantize(src_dir / "fp32.onnx", again, plan=tmp_path / "p.json", options=QuantizeOptions(external_data=True))
    assert (tmp_path / "out" / "again.onnx.data").read_bytes() == (tmp_path / "out" / "q.onnx.data").read_bytes()
    assert not list((tmp_path / "out").glob(".qtool-*"))
    feeds = models.random_inputs(m, 4, seed=9)
    ref, got = run(src_dir / "fp32.onnx", feeds), run(out, feeds)
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()
    report = qtool.evaluate(src_dir / "fp32.onnx", out, tmp_path / "c.npz")
    assert report.size_reference > (src_dir / "fp32.onnx").stat().st_size  # external data counted


def test_static_without_data_is_a_clear_error(cnn_files, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(cnn_files["model"]), "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 2 and "--mode dynamic" in r.output
