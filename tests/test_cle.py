"""Cross-layer equalisation (qtool.algorithms.cle, ``--algorithms cle``): the fp32 output is
unchanged, per-channel weight ranges even out, ReLU6 chains are left alone, per-tensor int8 gets
closer to fp32, and tables/plans made with other algorithms are refused."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qtool
from qtool.algorithms.cle import equalize
from qtool.cli import main
from qtool.config import QuantizeOptions
from qtool.errors import ConfigError, PlanError, TableError


def chain_model(seed: int = 0) -> onnx.ModelProto:
    """Conv->Relu->MaxPool->Conv(1x1)->Relu->depthwise->Relu->pointwise->Clip(0,6)->Conv->GAP: three
    equalisable pairs (pointwise->depthwise, depthwise->pointwise among them) and one ReLU6 pair.
    The weights are a well-balanced net's, un-equalised as folded BatchNorms leave real ones: each
    Relu pair's channel i is multiplied by f_i (over three decades) before it and by 1/f_i after."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (out_c, in_c, k) in (("c0", (16, 3, 3)), ("c1", (16, 16, 1)), ("dw", (16, 1, 3)),
                                   ("pw", (8, 16, 1)), ("c4", (8, 8, 1))):
        weights[f"{name}.w"] = (rng.normal(size=(out_c, in_c, k, k)) / np.sqrt(in_c * k * k)).astype(np.float32)
        weights[f"{name}.b"] = (rng.normal(size=out_c) * 0.1).astype(np.float32)
    for first, second, depthwise in (("c0", "c1", False), ("c1", "dw", True), ("dw", "pw", False)):
        f = (10.0 ** rng.uniform(-2, 1, size=16)).astype(np.float32)
        weights[f"{first}.w"] *= f.reshape(-1, 1, 1, 1)
        weights[f"{first}.b"] *= f
        weights[f"{second}.w"] /= f.reshape(-1, 1, 1, 1) if depthwise else f.reshape(1, -1, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "c0.w", "c0.b"], ["y0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y0"], ["r0"], name="relu0"),
        helper.make_node("MaxPool", ["r0"], ["a0"], name="pool0", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["a0", "c1.w", "c1.b"], ["y1"], name="conv1"),
        helper.make_node("Relu", ["y1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "dw.w", "dw.b"], ["y2"], name="dw", pads=[1, 1, 1, 1], group=16),
        helper.make_node("Relu", ["y2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "pw.w", "pw.b"], ["y3"], name="pw"),
        helper.make_node("Clip", ["y3", "zero", "six"], ["a3"], name="relu6"),
        helper.make_node("Conv", ["a3", "c4.w", "c4.b"], ["y4"], name="conv4"),
        helper.make_node("GlobalAveragePool", ["y4"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["out"], name="flat"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    graph = helper.make_graph(nodes, "cle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _inits(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _spread(r):
    return r.max() / r.min()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cle")
    m = chain_model()
    onnx.save(m, d / "m.onnx")
    rng = np.random.default_rng(1)
    np.savez(d / "calib.npz", x=rng.normal(size=(32, 3, 12, 12)).astype(np.float32))
    x = rng.normal(size=(32, 3, 12, 12)).astype(np.float32)
    return {"dir": d, "model": d / "m.onnx", "calib": d / "calib.npz", "x": x, "fp32": _run(m, x)}


def test_float_output_unchanged_and_ranges_even_out(files):
    m = onnx.load(files["model"])
    original = m.SerializeToString()
    eq, notes = equalize(m)
    assert m.SerializeToString() == original  # the input is untouched
    got = _run(eq, files["x"])
    ref = files["fp32"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    before, after = _inits(m), _inits(eq)
    for name in ("c0.w", "dw.w"):  # the two spread first convs: their per-output-channel ranges even out
        r0 = np.abs(before[name].reshape(16, -1)).max(1)
        r1 = np.abs(after[name].reshape(16, -1)).max(1)
        assert _spread(r1) < _spread(r0) / 10, name
    assert "equalised 3 chain(s)" in notes[0] + " ".join(notes)
    assert any("conv0 -> Relu (relu0) -> MaxPool (pool0) -> conv1" in n for n in notes)
    assert any("dw -> Relu (relu2) -> pw" in n for n in notes)
    assert any("conv1 -> Relu (relu1) -> dw" in n for n in notes)


def test_relu6_chain_left_alone(files):
    m = onnx.load(files["model"])
    eq, notes = equalize(m)
    before, after = _inits(m), _inits(eq)
    np.testing.assert_array_equal(before["c4.w"], after["c4.w"])
    np.testing.assert_array_equal(before["pw.b"], after["pw.b"])  # pw's outputs (into the Clip) not rescaled
    assert any("left alone" in n and "pw -> Clip (relu6) -> conv4" in n for n in notes)
    # an unbounded Clip(0, None) is a ReLU: that chain is equalised
    relu_like = onnx.load(files["model"])
    clip = next(n for n in relu_like.graph.node if n.op_type == "Clip")
    del clip.input[2]
    eq2, notes2 = equalize(relu_like)
    assert any("pw -> Clip (relu6) -> conv4" in n and "left alone" not in n for n in notes2)
    x = files["x"]
    ref = _run(relu_like, x)
    assert np.abs(_run(eq2, x) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bundled_sample_float_output_unchanged():
    from conftest import SAMPLE
    m = onnx.load(SAMPLE / "model.onnx")
    eq, notes = equalize(m)
    assert notes[0].startswith("cle: equalised 1 chain(s)")  # Conv -> Relu -> MaxPool -> Conv
    x = np.load(SAMPLE / "eval.npz")
    feeds = {k: x[k][:64] for k in x.files if k != "labels"}
    run = [ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
           for g in (m, eq)]
    assert np.abs(run[1] - run[0]).max() <= 1e-5 * np.abs(run[0]).max()


def test_no_chain_leaves_the_model_alone():
    import models
    m = models.matmul_mlp()
    eq, notes = equalize(m)
    assert eq.SerializeToString() == m.SerializeToString()
    assert notes == ["cle: no equalisable Conv->(Relu|identity)->Conv chain found; the model is unchanged"]


def _quantize(files, out, *extra):
    r = CliRunner().invoke(main, ["quantize", str(files["model"]), "-o", str(out), "--data", str(files["calib"]),
                                  "--per-tensor", *map(str, extra)])
    assert r.exit_code == 0, r.output
    return out


def _err(files, q):
    ref = files["fp32"]
    return float(np.mean((_run(onnx.load(q), files["x"]) - ref) ** 2) / np.mean(ref ** 2))


def test_int8_closer_with_cle_and_plan_round_trip(files):
    d = files["dir"]
    plain = _quantize(files, d / "plain.onnx", "--save-plan", d / "plain.json")
    cle = _quantize(files, d / "cle.onnx", "--algorithms", "cle", "--save-plan", d / "cle.json")
    e_plain, e_cle = _err(files, plain), _err(files, cle)
    assert e_cle < e_plain / 2, (e_cle, e_plain)
    saved = json.loads((d / "cle.json").read_text())
    assert saved["algorithms"] == ["cle"]
    assert "algorithms" not in json.loads((d / "plain.json").read_text())
    again = CliRunner().invoke(main, ["quantize", str(files["model"]), "-o", str(d / "again.onnx"),
                                      "--plan", str(d / "cle.json")])
    assert again.exit_code == 0, again.output
    assert (d / "again.onnx").read_bytes() == cle.read_bytes()
    # "none" is the default: the same bytes, plan and model
    none = _quantize(files, d / "none.onnx", "--algorithms", "none", "--save-plan", d / "none.json")
    assert none.read_bytes() == plain.read_bytes()
    assert (d / "none.json").read_bytes() == (d / "plain.json").read_bytes()
    # the plan carries its algorithms: a different --algorithms beside it is refused
    r = CliRunner().invoke(main, ["quantize", str(files["model"]), "-o", str(d / "x.onnx"), "--plan",
                                  str(d / "cle.json"), "--algorithms", "cle"])
    assert r.exit_code == 2 and "--algorithms" in r.output
    with pytest.raises(PlanError, match="algorithms"):
        qtool.quantize(files["model"], d / "y.onnx", plan=d / "plain.json",
                       options=QuantizeOptions(algorithms=("cle",)))


def test_table_made_without_cle_is_refused(files):
    d = files["dir"]
    plain = qtool.calibrate(files["model"], files["calib"])
    with pytest.raises(TableError, match="algorithms"):
        qtool.quantize(files["model"], d / "t.onnx", table=plain, options=QuantizeOptions(algorithms=("cle",)))
    with_cle = qtool.calibrate(files["model"], files["calib"], quantize_options=QuantizeOptions(algorithms=("cle",)))
    assert with_cle.params["algorithms"] == ["cle"] and "algorithms" not in plain.params
    with pytest.raises(TableError, match="algorithms"):
        qtool.quantize(files["model"], d / "t.onnx", table=with_cle)
    qtool.quantize(files["model"], d / "t.onnx", table=with_cle, options=QuantizeOptions(algorithms=("cle",)))
    # the CLI's calibrate takes --algorithms too, and the table serves the matching quantize
    r = CliRunner().invoke(main, ["calibrate", str(files["model"]), "--data", str(files["calib"]), "-o",
                                  str(d / "t.json"), "--algorithms", "cle"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["quantize", str(files["model"]), "-o", str(d / "t2.onnx"), "--table",
                                  str(d / "t.json")])
    assert r.exit_code == 2 and "algorithms" in r.output


def test_unknown_algorithm_and_hand_edited_plan(files):
    with pytest.raises(ConfigError, match="known: cle"):
        QuantizeOptions(algorithms=("adaround",))
    r = CliRunner().invoke(main, ["quantize", str(files["model"]), "-o", str(files["dir"] / "u.onnx"),
                                  "--data", str(files["calib"]), "--algorithms", "cle,bogus"])
    assert r.exit_code == 2 and "bogus" in r.output
    d = files["dir"]
    _quantize(files, d / "p.onnx", "--algorithms", "cle", "--save-plan", d / "p.json")
    data = json.loads((d / "p.json").read_text())
    data["algorithms"] = ["bogus"]
    (d / "bad.json").write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["quantize", str(files["model"]), "-o", str(d / "b.onnx"), "--plan",
                                  str(d / "bad.json")])
    assert r.exit_code == 2 and "bogus" in r.output
