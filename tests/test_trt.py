"""--target trt: int8 Q/DQ placed the way TensorRT builds an explicitly quantized engine.

Each placement rule on a small graph (residual Add, Concat's shared scale, narrow Convs and
the multiple-of-8 exception, GEMMs with K or N < 16, GEMV, symmetric int8 everywhere, no
QOperator/dynamic/uint8), then end to end on onnxruntime's CPU EP: the written model passes
onnx's full check, runs, and stays close to fp32. No TensorRT here: its engine build is not
tested, only the placement it reads.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import models
import qtool
from qtool.cli import main
from qtool.config import QuantizeOptions
from qtool.errors import ConfigError
from qtool.plans import Action, Role
from qtool.prepare import prepare
from qtool.types import Precision, Target

from plan_asserts import assert_model_matches_plan

TRT = QuantizeOptions(target="trt")
HEAD = '<ir_version: 8, opset_import: ["" : 17]>'


def _model(body: str, weights: dict) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return models._with_weights(HEAD + body, {k: rng.normal(0, s, shape) for k, (shape, s) in weights.items()})


def _conv_w(out_ch, in_ch, k=3, scale=0.2):
    return (out_ch, in_ch, k, k), scale


def _quantize(tmp_path, m, options=TRT, n=32, name="m"):
    path = models.save(m, tmp_path / f"{name}.onnx")
    np.savez(tmp_path / f"{name}.npz", **models.random_inputs(m, n, seed=3))
    out = tmp_path / f"{name}.{options.target}.onnx"
    result = qtool.quantize(path, out, data=tmp_path / f"{name}.npz", options=options)
    return result.plan, onnx.load(out), path, out


def _decide(tmp_path, m, options=TRT, name="m"):
    """Decisions only (no calibration): what the rules say."""
    return qtool.plan(models.save(m, tmp_path / f"{name}.onnx"), options=options)


def _node(plan, name):
    found = plan.node(name)
    assert found is not None, name
    return found


def _run(path, feeds, optimise: bool = True):
    """onnxruntime's CPU EP; ``optimise=False``: no graph optimisation, so every Q/DQ pair runs as
    written (the numbers TensorRT approximates). Optimised, this EP fuses some DQ -> Conv -> Q into
    QLinearConv, which on x86-64 without VNNI saturates with full 8-bit int8 weights (see
    qtool.types.cpu_saturates_u8s8): an artefact of this EP, not of the placement."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if not optimise:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


# -- residual Add ---------------------------------------------------------------------------------
RESIDUAL = """
res (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) {
    h0 = Conv <pads = [1, 1, 1, 1]> (x, w0, b0)
    h = Relu (h0)
    a = Conv <pads = [1, 1, 1, 1]> (h, w1, b1)
    ar = Relu (a)
    c = Conv <pads = [1, 1, 1, 1]> (ar, w2, b2)
    s = Add (SKIP_FIRST)
    y = Relu (s)
}
"""
RESIDUAL_W = {"w0": _conv_w(16, 16), "b0": ((16,), 0.1), "w1": _conv_w(16, 16), "b1": ((16,), 0.1),
              "w2": _conv_w(16, 16), "b2": ((16,), 0.1)}


@pytest.mark.parametrize("order", ["h, c", "c, h"])
def test_residual_add_quantizes_the_skip_input_only(tmp_path, order):
    """The Conv-branch input (c) stays float so TensorRT fuses the Add into that Conv; the skip (h)
    carries the Q/DQ, whichever side of the Add it is on."""
    m = _model(RESIDUAL.replace("SKIP_FIRST", order), RESIDUAL_W)
    plan, q, _, _ = _quantize(tmp_path, m)
    add = _node(plan, "Add(s)")
    assert add.quantized and add.inputs == ("h",)
    assert "skip input h only" in add.reason and "Conv(c)" in add.reason and "TensorRT" in add.reason
    assert plan.tensors["h"].action is Action.QUANTIZE
    assert plan.tensors["c"].action is Action.SKIP  # the Conv branch: float into the Add
    skip_index = order.split(", ").index("h")
    add_node = next(n for n in q.graph.node if n.op_type == "Add")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    assert producers[add_node.input[skip_index]] == "DequantizeLinear"
    assert producers[add_node.input[1 - skip_index]] == "Conv"


def test_residual_add_with_a_projection_shortcut(tmp_path):
    """Both inputs come out of Convs: the longer path from their common ancestor is the branch
    TensorRT fuses into (float); the shortcut Conv's output is the quantized residual."""
    body = """
    proj (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
        h = Relu (x)
        a = Conv <pads = [1, 1, 1, 1]> (h, w1, b1)
        ar = Relu (a)
        c = Conv <pads = [1, 1, 1, 1]> (ar, w2, b2)
        sc = Conv (h, ws, bs)
        y = Add (sc, c)
    }
    """
    m = _model(body, {"w1": _conv_w(32, 16), "b1": ((32,), 0.1), "w2": _conv_w(32, 32), "b2": ((32,), 0.1),
                      "ws": _conv_w(32, 16, 1), "bs": ((32,), 0.1)})
    plan = _decide(tmp_path, m)
    add = _node(plan, "Add(y)")
    assert add.inputs == ("sc",) and "Conv(c)" in add.reason
    assert plan.tensors["c"].action is Action.SKIP and plan.tensors["sc"].action is Action.QUANTIZE


def test_conv_feeding_both_sides_is_not_a_residual_and_a_model_input_can_be_the_skip(tmp_path):
    """A Conv that is itself the closest common ancestor of both inputs (its output also reaches
    the other side, as in ConvNeXt) is not a residual: both inputs Q/DQ. A model input as the skip
    is a residual like any other (ModelOpt skips Adds on model inputs; nothing in TensorRT's fusion
    needs a producer there)."""
    body = """
    gate (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y, float[N, 16, 8, 8] z) {
        r = Relu (x)
        c = Conv <pads = [1, 1, 1, 1]> (r, w, b)
        g = Sigmoid (c)
        y = Add (c, g)
        d = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        z = Add (d, x)
    }
    """
    plan = _decide(tmp_path, _model(body, {"w": _conv_w(16, 16), "b": ((16,), 0.1)}))
    assert _node(plan, "Add(y)").inputs == ("c", "g") and "not a Conv residual" in _node(plan, "Add(y)").reason
    assert _node(plan, "Add(z)").inputs == ("x",) and "skip input x only" in _node(plan, "Add(z)").reason


def test_add_without_a_conv_branch_quantizes_both_inputs(tmp_path):
    """Not a residual (no Conv feeds either side): an int8 element-wise Add, both inputs Q/DQ;
    a bias Add (constant input) stays float, fused by TensorRT into its producer."""
    body = """
    plain (float[N, 16, 8, 8] x, float[N, 16, 8, 8] z) => (float[N, 16, 8, 8] y) {
        s = Add (x, z)
        t = Add (s, bias)
        y = Conv <pads = [1, 1, 1, 1]> (t, w, b)
    }
    """
    m = _model(body, {"bias": ((16, 1, 1), 0.1), "w": _conv_w(16, 16), "b": ((16,), 0.1)})
    plan = _decide(tmp_path, m)
    assert _node(plan, "Add(s)").inputs == ("x", "z")
    assert not _node(plan, "Add(t)").quantized and "bias" in _node(plan, "Add(t)").reason


def test_conv_relu_output_stays_float_and_only_inputs_are_quantized(tmp_path):
    """Conv -> Relu -> Conv: Q/DQ sit on the Convs' inputs; between a Conv and its Relu nothing
    (TensorRT fuses conv + bias + relu); biases stay float; no output is quantized for its own sake."""
    m = _model(RESIDUAL.replace("SKIP_FIRST", "h, c"), RESIDUAL_W)
    plan, q, _, _ = _quantize(tmp_path, m)
    for conv_out in ("h0", "a", "c"):
        assert plan.tensors[conv_out].action is Action.SKIP, conv_out
    assert not _node(plan, "Relu(h)").quantized and "fuses it into Conv(h0)" in _node(plan, "Relu(h)").reason
    assert "y" not in plan.tensors or plan.tensors["y"].action is Action.SKIP
    assert not any(t.role is Role.BIAS for t in plan.tensors.values())
    assert all(i.data_type == onnx.TensorProto.FLOAT for i in q.graph.initializer if i.name.startswith("b"))
    counts = Counter(n.op_type for n in q.graph.node)
    # x (Conv(h0)), h (Conv(a) and the Add's skip: one shared pair), ar (Conv(c)): 3 activation pairs
    # and 3 weight DequantizeLinear
    assert counts["QuantizeLinear"] == 3 and counts["DequantizeLinear"] == 6


# -- Concat --------------------------------------------------------------------------------------
CONCAT = """
cat (float[N, 16, 8, 8] x) => (float[N, 16, 8, 8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
    ar = Relu (a)
    b = Conv <pads = [1, 1, 1, 1]> (x, wb, bb)
    c = Concat <axis = 1> (ar, b)
    y = Conv (c, wc, bc)
}
"""
CONCAT_W = {"wa": _conv_w(16, 16, scale=0.5), "ba": ((16,), 0.1), "wb": _conv_w(16, 16, scale=0.05),
            "bb": ((16,), 0.1), "wc": _conv_w(16, 32, 1), "bc": ((16,), 0.1)}


def test_concat_inputs_and_output_share_one_scale(tmp_path):
    m = _model(CONCAT, CONCAT_W)
    plan, q, path, _ = _quantize(tmp_path, m)
    cat = plan.tensors["c"]
    assert cat.action is Action.QUANTIZE and cat.precision is Precision.INT8 and cat.zero_point == 0
    for t in ("ar", "b"):
        assert plan.tensors[t].action is Action.SHARE and plan.tensors[t].source == "c", t
        assert (plan.tensors[t].scale, plan.tensors[t].zero_point) == (cat.scale, 0), t
    assert _node(plan, "Concat(c)").inputs == ("ar", "b") and "one scale" in _node(plan, "Concat(c)").reason
    # the one range is the union of the inputs' ranges: wa is 10x wider than wb
    feeds = models.random_inputs(m, 32, seed=3)
    probe = onnx.load(path)
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                               for t in ("ar", "b")])
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    _, ar, b = sess.run(None, feeds)
    union = (min(ar.min(), b.min()), max(ar.max(), b.max()))
    np.testing.assert_allclose(cat.range, union, rtol=1e-6)
    assert abs(b).max() < abs(ar).max() / 3  # the ranges differ, yet one scale
    scales = {numpy_scale(q, t) for t in ("ar", "b", "c")}
    assert len(scales) == 1


def numpy_scale(q: onnx.ModelProto, tensor: str) -> float:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    return float(inits[f"{tensor}_scale"])


def test_concat_read_by_no_quantized_node_stays_float(tmp_path):
    body = """
    cat (float[N, 16, 8, 8] x) => (float[N, 32, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        b = Conv <pads = [1, 1, 1, 1]> (x, wb, bb)
        y = Concat <axis = 1> (a, b)
    }
    """
    m = _model(body, {k: v for k, v in CONCAT_W.items() if k[1] in "ab"})
    plan = _decide(tmp_path, m)
    assert not _node(plan, "Concat(y)").quantized
    assert plan.tensors["a"].action is Action.SKIP and plan.tensors["b"].action is Action.SKIP


# -- pooling ----------------------------------------------------------------------------------------
def test_pooling_is_quantized_beside_a_quantized_neighbour_only(tmp_path):
    """MaxPool before a quantized Conv and GlobalAveragePool before Flatten -> Gemm (a reader found
    through data movement): Q/DQ on their inputs; a pool between float ops stays float."""
    body = """
    pools (float[N, 16, 8, 8] x) => (float[N, 32] y, float[N, 16, 4, 4] z) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        r = Relu (c)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
        c2 = Conv <pads = [1, 1, 1, 1]> (p, w2, b2)
        g = GlobalAveragePool (c2)
        f = Flatten (g)
        y = Gemm <transB = 1> (f, wg, bg)
        s = Sigmoid (x)
        q = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (s)
        z = Sigmoid (q)
    }
    """
    m = _model(body, {"w": _conv_w(16, 16), "b": ((16,), 0.1), "w2": _conv_w(16, 16), "b2": ((16,), 0.1),
                      "wg": ((32, 16), 0.3), "bg": ((32,), 0.1)})
    plan = _decide(tmp_path, m)
    assert _node(plan, "MaxPool(p)").inputs == ("r",) and "Conv(c2)" in _node(plan, "MaxPool(p)").reason
    assert _node(plan, "GlobalAveragePool(g)").inputs == ("c2",)
    assert "Gemm(y)" in _node(plan, "GlobalAveragePool(g)").reason
    assert not _node(plan, "AveragePool(q)").quantized and not _node(plan, "Flatten(f)").quantized


# -- narrow Convs ----------------------------------------------------------------------------------
def _conv_chain(channels: list[int], group_last: int = 1):
    """x (channels[0]) -> Relu -> Conv -> Relu -> Conv ... so that no Conv reads the model input."""
    lines, weights = ["r0 = Relu (x)"], {}
    for i, (cin, cout) in enumerate(zip(channels, channels[1:]), 1):
        g = group_last if i == len(channels) - 1 else 1
        attrs = f"<pads = [1, 1, 1, 1], group = {g}>" if g > 1 else "<pads = [1, 1, 1, 1]>"
        lines.append(f"c{i} = Conv {attrs} (r{i - 1}, w{i}, b{i})")
        lines.append(f"r{i} = Relu (c{i})")
        weights[f"w{i}"] = _conv_w(cout, cin // g)
        weights[f"b{i}"] = ((cout,), 0.1)
    n = len(channels) - 1
    lines[-1] = f"y = Relu (c{n})"
    body = (f"chain (float[N, {channels[0]}, 8, 8] x) => (float[N, {channels[-1]}, 8, 8] y) {{\n"
            + "\n".join(lines) + "\n}")
    return _model(body, weights)


def test_narrow_convs_stay_float_unless_a_multiple_of_8(tmp_path):
    """ModelOpt's int8 Conv rule: < 16 channels stays float; a count that is a multiple of 8
    passes when the other count is >= 16; 8 -> 8 deep in the model does not."""
    plan = _decide(tmp_path, _conv_chain([32, 12, 20, 8, 8, 32]))
    decisions = {f"c{i}": _node(plan, f"Conv(c{i})") for i in range(1, 6)}
    assert decisions["c1"].quantized                              # 32 -> 12: 32 is a multiple of 8 and >= 16
    assert not decisions["c2"].quantized                          # 12 -> 20: neither a multiple of 8
    assert "12 input / 20 output channels" in decisions["c2"].reason and "multiple of 8" in decisions["c2"].reason
    assert decisions["c3"].quantized                              # 20 -> 8: 8 is, and 20 >= 16
    assert not decisions["c4"].quantized                          # 8 -> 8: no count >= 16 (not on the input)
    assert decisions["c5"].quantized                              # 8 -> 32


def test_a_linear_op_kept_float_reads_float_inputs(tmp_path):
    """r feeds a quantized Conv and a narrow one kept float: the narrow Conv reads r itself, not its
    Q/DQ (ModelOpt: no Q/DQ in front of a weighted op that stays float); same for a small MatMul."""
    body = """
    two (float[N, 12, 8, 8] x) => (float[N, 32, 8, 8] y, float[N, 20, 8, 8] z, float[N, 12, 8, 12] u,
                                   float[N, 8, 12, 8] t) {
        r = Relu (x)
        y = Conv <pads = [1, 1, 1, 1]> (r, wa, ba)
        z = Conv <pads = [1, 1, 1, 1]> (r, wb, bb)
        u = MatMul (r, wm)
        t = Transpose <perm = [0, 2, 1, 3]> (r)
    }
    """
    m = _model(body, {"wa": _conv_w(32, 12), "ba": ((32,), 0.1), "wb": _conv_w(20, 12), "bb": ((20,), 0.1),
                      "wm": ((8, 12), 0.3)})
    plan, q, path, out = _quantize(tmp_path, m)
    assert _node(plan, "Conv(y)").inputs == ("r", "wa")
    narrow, small = _node(plan, "Conv(z)"), _node(plan, "MatMul(u)")
    assert not narrow.quantized and narrow.float_inputs == ("r",)
    assert not small.quantized and "K = 8 and N = 12 < 16" in small.reason and small.float_inputs == ("r",)
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    first_input = {n.output[0]: producers.get(n.input[0], "input") for n in q.graph.node}
    assert first_input["y"] == "DequantizeLinear" and first_input["z"] == "Relu" and first_input["u"] == "Relu"
    # any other float reader takes the dequantized tensor, as onnxruntime's quantizer (which ModelOpt
    # drives, DedicatedQDQPair off) rewires every consumer of a quantized tensor
    assert first_input["t"] == "DequantizeLinear"


def test_convs_with_16_channels_or_more_are_quantized(tmp_path):
    plan = _decide(tmp_path, _conv_chain([16, 16, 24]))
    assert all(_node(plan, f"Conv(c{i})").quantized for i in (1, 2))


def test_grouped_narrow_conv_needs_output_multiple_of_8_and_kernel_3(tmp_path):
    plan = _decide(tmp_path, _conv_chain([16, 16, 8], group_last=8))  # 16 -> 8 in 8 groups, 3x3
    assert _node(plan, "Conv(c2)").quantized
    plan = _decide(tmp_path, _conv_chain([16, 16, 12], group_last=4), name="g12")  # 12: not a multiple of 8
    assert not _node(plan, "Conv(c2)").quantized


def test_override_quantizes_a_narrow_conv(tmp_path):
    plan = _decide(tmp_path, _conv_chain([32, 12, 20, 32]), QuantizeOptions(target="trt",
                                                                             precision=("Conv(c2)=int8",)))
    assert _node(plan, "Conv(c2)").quantized


# -- GEMM / GEMV ------------------------------------------------------------------------------------
def _matmul_model(k: int, n: int, m_dim="B"):
    body = f"""
    mm (float[{m_dim}, 4, {k}] x) => (float[{m_dim}, 4, {n}] y) {{
        h = Relu (x)
        y = MatMul (h, w)
    }}
    """
    return _model(body, {"w": ((k, n), 0.2)})


@pytest.mark.parametrize("k,n,quantized,why", [
    (32, 32, True, None),
    (32, 8, False, "N = 8 < 16"),
    (8, 32, False, "K = 8 < 16"),
    (32, 1, False, "GEMV, N = 1"),
    (1, 32, False, "GEMV, K = 1"),
])
def test_gemm_size_rules(tmp_path, k, n, quantized, why):
    plan = _decide(tmp_path, _matmul_model(k, n))
    node = _node(plan, "MatMul(y)")
    assert node.quantized is quantized, node.reason
    assert ("h" in plan.tensors and plan.tensors["h"].action is Action.QUANTIZE) is quantized
    if why:
        assert why in node.reason and "TensorRT" in node.reason


def test_gemm_with_a_fixed_batch_of_one_is_a_gemv(tmp_path):
    body = """
    g (float[1, 64] x) => (float[1, 32] y) {
        h = Relu (x)
        y = Gemm <transB = 1> (h, w, b)
    }
    """
    plan = _decide(tmp_path, _model(body, {"w": ((32, 64), 0.2), "b": ((32,), 0.1)}))
    assert not _node(plan, "Gemm(y)").quantized and "GEMV, M = 1" in _node(plan, "Gemm(y)").reason


def test_matmul_of_two_activations(tmp_path):
    """Attention-like MatMul of two activations: both inputs Q/DQ when K and N >= 16."""
    body = """
    att (float[B, 32, 64] q, float[B, 64, 32] k) => (float[B, 32, 32] y) {
        y = MatMul (q, k)
    }
    """
    plan = _decide(tmp_path, _model(body, {}))
    assert _node(plan, "MatMul(y)").inputs == ("q", "k")
    small = _decide(tmp_path, _model(body.replace("32] y", "8] y").replace("64, 32] k", "64, 8] k"), {}), name="n8")
    assert not _node(small, "MatMul(y)").quantized and "N = 8 < 16" in _node(small, "MatMul(y)").reason


# -- symmetric int8, no uint8, options refused --------------------------------------------------------
def test_symmetric_int8_everywhere(tmp_path):
    """Whatever the CPU defaults would pick here (uint8 activations, uint8 or 7-bit weights on an
    x86-64 CPU without VNNI): int8, zero point 0, full 8-bit weights per channel."""
    m = models.small_cnn()
    plan, q, path, _ = _quantize(tmp_path, m, QuantizeOptions(target="trt", weight_type="auto",
                                                               activation_type="uint8"))
    assert plan.target is Target.TRT
    quantized = [t for t in plan.tensors.values() if t.quantized]
    assert quantized
    for t in quantized:
        assert t.precision is Precision.INT8 and t.symmetric and not t.reduce_range, t.name
        assert np.all(np.asarray(t.zero_point) == 0), t.name
    weights = [t for t in quantized if t.role is Role.WEIGHT]
    assert weights and all(t.axis is not None for t in weights)
    for init in q.graph.initializer:
        assert init.data_type != onnx.TensorProto.UINT8, init.name
    assert_model_matches_plan(q, plan, prepare(path).model)


def test_plan_round_trips_with_target_trt(tmp_path):
    plan, _, path, out = _quantize(tmp_path, models.small_cnn())
    saved = tmp_path / "plan.json"
    saved.write_text(plan.to_json())
    again = tmp_path / "again.onnx"
    result = qtool.quantize(path, again, plan=saved)
    assert result.plan.target is Target.TRT
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("kwargs,message", [
    (dict(format="qoperator"), "TensorRT"),
    (dict(mode="dynamic"), "TensorRT"),
])
def test_qoperator_and_dynamic_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantizeOptions(target="trt", **kwargs)


def test_uint8_and_16_bit_requests_are_refused(tmp_path):
    path = models.save(models.small_cnn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **models.random_inputs(models.small_cnn(), 8))
    for options in (QuantizeOptions(target="trt", weight_type="uint8"),
                    QuantizeOptions(target="trt", precision=("Conv=uint8",)),
                    QuantizeOptions(target="trt", precision=("Gemm=int16",))):
        with pytest.raises(ConfigError, match="--target trt"):
            qtool.quantize(path, tmp_path / "o.onnx", data=tmp_path / "c.npz", options=options)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_refuses_qoperator_with_one_line(tmp_path):
    path = models.save(models.small_cnn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **models.random_inputs(models.small_cnn(), 8))
    r = CliRunner().invoke(main, ["quantize", path, "-o", str(tmp_path / "o.onnx"), "--data", str(tmp_path / "c.npz"),
                                  "--target", "trt", "--format", "qoperator"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Q/DQ" in lines[0]


def test_cpu_target_plan_is_unchanged_by_the_trt_rules(tmp_path):
    """The same model planned for cpu keeps the CPU placement (outputs quantized, fused Relu,
    uint8 activations by default), so the trt rules cannot leak into it."""
    m = _model(CONCAT, CONCAT_W)
    cpu, _, _, _ = _quantize(tmp_path, m, QuantizeOptions(), name="cpu")
    assert cpu.target is Target.CPU
    assert _node(cpu, "Relu(ar)").fused_into == "Conv(a)"
    assert all(t.precision is not Precision.INT8 for t in cpu.tensors.values()
               if t.quantized and t.role is Role.ACTIVATION)


# -- end to end on the CPU EP -----------------------------------------------------------------------
def _close(ref, got):
    cos = float(np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got)))
    return cos


@pytest.mark.parametrize("build", ["small_cnn", "residual", "concat", "matmul_mlp"])
def test_end_to_end_on_the_cpu_ep(tmp_path, build):
    m = {"small_cnn": models.small_cnn, "matmul_mlp": models.matmul_mlp,
         "residual": lambda: _model(RESIDUAL.replace("SKIP_FIRST", "h, c"), RESIDUAL_W),
         "concat": lambda: _model(CONCAT, CONCAT_W)}[build]()
    plan, q, path, out = _quantize(tmp_path, m, n=64)
    onnx.checker.check_model(q, full_check=True)
    assert_model_matches_plan(q, plan, prepare(path).model)
    feeds = models.random_inputs(m, 32, seed=9)
    ref, got = _run(path, feeds), _run(out, feeds, optimise=False)
    assert _close(ref, got) > 0.995, build
    assert np.all(np.isfinite(_run(out, feeds)))  # and the optimised CPU EP session runs it
    counts = Counter(n.op_type for n in q.graph.node)
    acts = [t for t in plan.tensors.values() if t.role is Role.ACTIVATION and t.quantized]
    weights = [t for t in plan.tensors.values() if t.role is Role.WEIGHT and t.quantized]
    assert acts and weights
    assert counts["QuantizeLinear"] == len(acts) and counts["DequantizeLinear"] == len(acts) + len(weights)
    assert not any(i.data_type in (onnx.TensorProto.INT32, onnx.TensorProto.UINT8) for i in q.graph.initializer)


def test_sample_end_to_end_close_to_fp32_and_to_the_cpu_target(tmp_path):
    from conftest import SAMPLE
    out = tmp_path / "trt.onnx"
    result = qtool.quantize(SAMPLE / "model.onnx", out, data=SAMPLE / "calib.npz", options=TRT)
    q = onnx.load(out)
    onnx.checker.check_model(q, full_check=True)
    with np.load(SAMPLE / "eval.npz") as z:
        x, labels = z["input"][:1000], z["labels"][:1000]
    ref = _run(SAMPLE / "model.onnx", {"input": x})
    cpu_out = tmp_path / "cpu.onnx"
    qtool.quantize(SAMPLE / "model.onnx", cpu_out, data=SAMPLE / "calib.npz")
    accuracy = {}
    for name, got in (("fp32", ref), ("trt", _run(out, {"input": x}, optimise=False)),
                      ("cpu", _run(cpu_out, {"input": x}))):
        accuracy[name] = float(np.mean(got.argmax(1) == labels))
        assert float(np.mean(ref.argmax(1) == got.argmax(1))) > 0.97, name
    assert abs(accuracy["trt"] - accuracy["fp32"]) < 0.015 and abs(accuracy["trt"] - accuracy["cpu"]) < 0.015
    plan = result.plan
    assert not _node(plan, "/fc2/Gemm").quantized and "N = 10 < 16" in _node(plan, "/fc2/Gemm").reason
    assert _node(plan, "/conv2/Conv").quantized and _node(plan, "/fc1/Gemm").quantized
