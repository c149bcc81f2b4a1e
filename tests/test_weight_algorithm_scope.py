"""The weight algorithms touch only what one layer alone reads: a weight or bias that another
node also reads (a float node reads it through the same DequantizeLinear) keeps round to
nearest's codes, with the reason in the plan's notes."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.config import QuantizeOptions


def _shared(tmp_path, bias_only: bool = False):
    """Two Gemms on two inputs; they share the bias, and unless ``bias_only`` the weight too."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(32, 32)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.normal(size=32).astype(np.float32), "b")]
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y1"], name="g1"),
             helper.make_node("Gemm", ["x2", "W2" if bias_only else "W", "b"], ["y2"], name="g2")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 32]) for n in ("x", "x2", "y1", "y2")]
    g = helper.make_graph(nodes, "shared", io[:2], io[2:], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    x = rng.normal(size=(64, 32)).astype(np.float32)
    x[:, 0] *= 20  # an input mean and spread the algorithms would act on
    np.savez(tmp_path / "d.npz", x=x, x2=rng.normal(size=(64, 32)).astype(np.float32))
    return tmp_path / "m.onnx", tmp_path / "d.npz"


def test_a_weight_shared_with_a_float_node_is_left_alone(tmp_path):
    model, data = _shared(tmp_path)
    r = qtool.quantize(model, tmp_path / "q.onnx", data=data,
                       options=QuantizeOptions(algorithms=("rounding", "bias_correction"), exclude=("g2",)))
    assert [n.name for n in r.plan.nodes if n.quantized] == ["g1"]
    assert r.plan.tensors["W"].codes is None and r.plan.tensors["b"].codes is None
    assert not r.plan.applied
    assert any(n.startswith("rounding:") and "g1: its weight is shared" in n for n in r.plan.notes)


def test_a_shared_bias_is_not_corrected_for_one_layer(tmp_path):
    model, data = _shared(tmp_path, bias_only=True)
    r = qtool.quantize(model, tmp_path / "q.onnx", data=data,
                       options=QuantizeOptions(algorithms=("rounding", "bias_correction")))
    assert set(r.plan.applied.get("rounding", {})) == {"g1", "g2"}  # own weights: rounded
    assert r.plan.tensors["b"].codes is None and not r.plan.applied.get("bias_correction")
