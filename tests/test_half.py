"""fp16 and bf16 models (issue 9): computed in float32 inside, quantized so that
onnxruntime fuses integer kernels, interface and storage kept in the half type."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import models
from qtool.cli import main

HALF = {"fp16": (TensorProto.FLOAT16, np.float16), "bf16": (TensorProto.BFLOAT16, None)}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def to_half(m: onnx.ModelProto, kind: str) -> onnx.ModelProto:
    """What a half-precision export looks like: half weights, inputs and outputs."""
    elem, dtype = HALF[kind]
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        value = numpy_helper.to_array(t)
        half = numpy_helper.from_array(value.astype(dtype), t.name) if dtype is not None else \
            helper.make_tensor(t.name, elem, value.shape, value.ravel().tolist())
        t.CopyFrom(half)
    for vi in list(out.graph.input) + list(out.graph.output):
        vi.type.tensor_type.elem_type = elem
    del out.graph.value_info[:]
    return out


def run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def snr_db(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return 10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30))


def float_weights(path):
    """float32 initializers that float nodes read (scales, read by Q/DQ and QLinear kernels, are float32)."""
    m = onnx.load(str(path))
    integer = {i for n in m.graph.node if "quantize" in n.op_type.lower() or "QLinear" in n.op_type
               or "Integer" in n.op_type or n.op_type == "QGemm" for i in n.input}
    return [t.name for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and t.name not in integer]


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_fp16_cnn_quantizes_and_keeps_its_interface(tmp_path, fmt):
    src32 = models.save(models.small_cnn(), tmp_path / "f32.onnx")
    src = models.save(to_half(models.small_cnn(), "fp16"), tmp_path / "f16.onnx")
    x = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x.astype(np.float16))
    inspect = cli("inspect", src)
    assert inspect.exit_code == 0, inspect.output
    assert "fp16 model: computed in float32 inside" in inspect.output
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out, "--format", fmt)
    assert r.exit_code == 0, r.output
    quantized = r.output.split("wrote ")[1].split(" nodes quantized")[0].split(": ")[1]
    assert quantized.split(" of ")[0] != "0"
    assert f"quantizable {quantized.split(' of ')[0]} of" in inspect.output  # inspect agrees with quantize
    onnx.checker.check_model(str(out), full_check=True)
    q = onnx.load(str(out))
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert not float_weights(out)  # weights left float are stored fp16 again
    got = run(out, {"x": x.astype(np.float16)})[0]
    assert got.dtype == np.float16
    ref = run(src32, {"x": x})[0]
    assert snr_db(ref, got) > 25
    assert out.stat().st_size < 0.7 * os.path.getsize(src)  # int8 weights, half of fp16


def test_fp16_mlp_dynamic_and_calibrate(tmp_path):
    src = models.save(to_half(models.matmul_mlp(), "fp16"), tmp_path / "f16.onnx")
    x = np.random.default_rng(0).normal(size=(16, 4, 16)).astype(np.float16)
    np.savez(tmp_path / "d.npz", x=x)
    r = cli("calibrate", src, "--data", tmp_path / "d.npz", "-o", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--table", tmp_path / "t.json", "-o", out)
    assert r.exit_code == 0, r.output
    ref = run(src, {"x": x})[0]
    assert snr_db(ref, run(out, {"x": x})[0]) > 20
    dyn = tmp_path / "dyn.onnx"
    r = cli("quantize", src, "--mode", "dynamic", "-o", dyn)
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(dyn), full_check=True)
    kinds = {n.op_type for n in onnx.load(str(dyn)).graph.node}
    assert kinds & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}, kinds
    got = run(dyn, {"x": x})[0]
    assert got.dtype == np.float16 and snr_db(ref, got) > 20


def test_bf16_model_quantizes(tmp_path):
    """A bf16 model with a float32 interface (Casts to and from bf16 inside, bf16 weights):
    onnxruntime's CPU EP cannot run its bf16 Conv; the quantized one runs, close to the
    float32 model the bf16 weights came from."""
    f32 = models.small_cnn()
    src32 = models.save(f32, tmp_path / "f32.onnx")
    m = to_half(f32, "bf16")
    g = m.graph
    for vi in list(g.input) + list(g.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for n in g.node:
        n.input[:] = ["x_bf16" if i == "x" else i for i in n.input]
        n.output[:] = ["logits_bf16" if o == "logits" else o for o in n.output]
    nodes = [helper.make_node("Cast", ["x"], ["x_bf16"], to=TensorProto.BFLOAT16)] + list(g.node) + \
        [helper.make_node("Cast", ["logits_bf16"], ["logits"], to=TensorProto.FLOAT)]
    del g.node[:]
    g.node.extend(nodes)
    src = models.save(m, tmp_path / "b16.onnx")
    x = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out)
    assert r.exit_code == 0, r.output
    assert not float_weights(out)
    onnx.checker.check_model(str(out), full_check=True)
    q = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 4
    assert snr_db(run(src32, {"x": x})[0], run(out, {"x": x})[0]) > 20


def test_float32_constants_of_an_fp16_model_keep_their_precision(tmp_path):
    """Resize scales (always float32) and a float32 constant beyond fp16's range stay float32."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["z"], mode="nearest"),
             helper.make_node("Cast", ["z"], ["z32"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["z32", "big"], ["zb"]),
             helper.make_node("Div", ["zb", "big"], ["y32"]),
             helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT16)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float16), "w"),
             numpy_helper.from_array(np.array([1, 1, 4 / 3, 4 / 3], np.float32), "scales"),
             numpy_helper.from_array(np.array(1e5, np.float32), "big")]
    g = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT16, [1, 3, 3, 3])],
                          [vi("y", TensorProto.FLOAT16, None)], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), src)
    x = rng.normal(size=(8, 1, 3, 3, 3)).astype(np.float16)
    feeds = {"x": x[0]}
    np.savez(tmp_path / "d.npz", x=x[0])
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out)
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(out), full_check=True)
    ref, got = run(src, feeds)[0], run(out, feeds)[0]
    assert got.shape == ref.shape == (1, 4, 4, 4) and np.isfinite(got).all()
    assert snr_db(ref, got) > 20


def test_fp16_model_at_ir3_with_weights_as_inputs(tmp_path):
    m = to_half(models.small_cnn(), "fp16")
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    src = tmp_path / "ir3.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float16)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out)
    assert r.exit_code == 0, r.output
    assert snr_db(run(src, {"x": x})[0], run(out, {"x": x})[0]) > 25
