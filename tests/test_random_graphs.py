"""Random small graphs from the supported op set, quantized with random options: always a valid
model that onnxruntime runs, that re-applies from its saved plan, and that stays close to fp32."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qtool
from plan_asserts import assert_model_matches_plan
from qtool.config import QuantizeOptions
from qtool.errors import QtoolError
from qtool.prepare import prepare

BLOCKS = ["conv", "conv_relu", "conv_clip", "relu", "sigmoid", "leaky", "maxpool", "avgpool", "residual", "swish",
          "concat", "transpose"]


class Builder:
    def __init__(self, rng):
        self.rng, self.nodes, self.inits, self.k = rng, [], [], 0

    def name(self, base):
        self.k += 1
        return f"{base}{self.k}"

    def weight(self, shape, scale):
        name = self.name("w")
        self.inits.append(numpy_helper.from_array((self.rng.normal(size=shape) * scale).astype(np.float32), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        return out

    def conv(self, x, c_in, c_out, bias=True):
        w = self.weight((c_out, c_in, 3, 3), 1.0 / np.sqrt(9 * c_in))
        inputs = [x, w] + ([self.weight((c_out,), 0.1)] if bias else [])
        return self.node("Conv", inputs, pads=[1, 1, 1, 1])


def build(blocks, seed):
    """x [N, 3, 16, 16] -> blocks -> GlobalAveragePool -> Flatten -> Gemm(10)."""
    b = Builder(np.random.default_rng(seed))
    x, c, hw = "x", 3, 16
    for kind in blocks:
        if kind.startswith("conv"):
            c_out = int(b.rng.integers(4, 12))
            x, c = b.conv(x, c, c_out, bias=bool(b.rng.integers(0, 2))), c_out
            if kind == "conv_relu":
                x = b.node("Relu", [x])
            elif kind == "conv_clip":
                lo, hi = b.name("lo"), b.name("hi")
                b.inits += [numpy_helper.from_array(np.float32(0), lo), numpy_helper.from_array(np.float32(6), hi)]
                x = b.node("Clip", [x, lo, hi])
        elif kind in ("relu", "sigmoid"):
            x = b.node(kind.capitalize(), [x])
        elif kind == "leaky":
            x = b.node("LeakyRelu", [x], alpha=0.1)
        elif kind in ("maxpool", "avgpool") and hw >= 4:
            x = b.node("MaxPool" if kind == "maxpool" else "AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
            hw //= 2
        elif kind == "residual":
            x = b.node("Add", [x, b.conv(b.node("Relu", [x]), c, c)])
        elif kind == "swish":
            x = b.node("Mul", [x, b.node("Sigmoid", [x])])
        elif kind == "concat":
            x = b.node("Concat", [b.conv(x, c, c), b.conv(x, c, c)], axis=1)
            c *= 2
        elif kind == "transpose":
            x = b.node("Transpose", [b.node("Transpose", [x], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    w, bias = b.weight((10, c), 1.0 / np.sqrt(c)), b.weight((10,), 0.1)
    b.nodes.append(helper.make_node("Gemm", [flat, w, bias], ["logits"], name="/head/Gemm", transB=1))
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def snr_db(ref, got):
    return 10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["qdq", "qoperator"]), per_channel=st.booleans(),
       act=st.sampled_from(["uint8", "int8"]), weights=st.sampled_from(["auto", "int8", "uint8"]),
       method=st.sampled_from(["minmax", "percentile", "mse"]))
def test_random_graph_quantizes_validly(tmp_path_factory, blocks, seed, fmt, per_channel, act, weights, method):
    d = tmp_path_factory.mktemp("rg")
    model = build(blocks, seed)
    onnx.save(model, d / "m.onnx")
    rng = np.random.default_rng(seed)
    np.savez(d / "c.npz", x=rng.normal(size=(32, 3, 16, 16)).astype(np.float32))
    from qtool.config import CalibrateOptions
    options = QuantizeOptions(format=fmt, per_channel=per_channel, activation_type=act, weight_type=weights)
    try:
        result = qtool.quantize(d / "m.onnx", d / "q.onnx", data=d / "c.npz", options=options,
                                calibrate_options=CalibrateOptions(method=method))
    except QtoolError as exc:
        assert "nothing to quantize" in str(exc), exc  # e.g. only the tiny head Gemm, kept float
        return
    q = onnx.load(d / "q.onnx")
    onnx.checker.check_model(q, full_check=not any(n.domain == "com.microsoft" for n in q.graph.node))
    assert_model_matches_plan(q, result.plan, prepare(d / "m.onnx").model)
    (d / "p.json").write_text(result.plan.to_json())
    qtool.quantize(d / "m.onnx", d / "again.onnx", plan=d / "p.json")
    assert (d / "again.onnx").read_bytes() == (d / "q.onnx").read_bytes()
    x = {"x": rng.normal(size=(8, 3, 16, 16)).astype(np.float32)}
    ref = ort.InferenceSession(str(d / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(d / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    quantized = Counter(n.op_type for n in result.plan.quantized_nodes())
    assert np.isfinite(got).all()
    assert snr_db(ref, got) > 15, (snr_db(ref, got), blocks, dict(quantized))
