"""The bundled Fashion-MNIST sample end to end: accuracy is kept, the model shrinks, it fuses."""

from collections import Counter

import onnx
import onnxruntime as ort
import pytest

import qtool
from plan_asserts import assert_model_matches_plan
from qtool.prepare import prepare
from conftest import SAMPLE
from qtool.config import EvalOptions

pytestmark = pytest.mark.skipif(not (SAMPLE / "model.onnx").exists(), reason="sample not built")


@pytest.fixture(scope="module")
def sample_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "model.int8.onnx"
    result = qtool.quantize(SAMPLE / "model.onnx", out, data=SAMPLE / "calib.npz")
    assert_model_matches_plan(onnx.load(out), result.plan, prepare(SAMPLE / "model.onnx").model)
    return out, result


def test_sample_accuracy_and_size(sample_int8):
    out, _ = sample_int8
    report = qtool.evaluate(SAMPLE / "model.onnx", out, SAMPLE / "eval.npz", options=EvalOptions(repeats=3))
    assert report.samples >= 2000
    assert report.accuracy_drop <= 0.003, report.accuracy_drop
    assert report.size_ratio <= 0.30
    assert report.agreement >= 0.98


def test_sample_runs_as_integer_kernels(sample_int8, tmp_path):
    out, result = sample_int8
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2, ops
    assert not {"Conv", "Gemm", "MatMul"} & set(ops), ops


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "mse"])
def test_sample_each_method_within_half_a_point(method, tmp_path):
    from qtool.config import CalibrateOptions
    out = tmp_path / "q.onnx"
    qtool.quantize(SAMPLE / "model.onnx", out, data=SAMPLE / "calib.npz",
                   calibrate_options=CalibrateOptions(method=method))
    report = qtool.evaluate(SAMPLE / "model.onnx", out, SAMPLE / "eval.npz", options=EvalOptions(repeats=2))
    assert report.accuracy_drop <= 0.005, (method, report.accuracy_drop)
