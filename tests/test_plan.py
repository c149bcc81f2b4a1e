"""The plan is the contract: saved, edited and re-applied; per-node precision; bias fitting."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
import qtool
from plan_asserts import assert_model_matches_plan
from qtool.cli import main
from qtool.config import QuantizeOptions
from qtool.errors import ConfigError, PlanError, QtoolError
from qtool.plans import Action, Role
from qtool.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "calibration" / "fashion-mnist"
DATA = Path(__file__).resolve().parent / "data"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def producers(model):
    return {o: n for n in model.graph.node for o in n.output}


@pytest.fixture(scope="module")
def sample_table(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    table = qtool.calibrate(SAMPLE / "model.onnx", SAMPLE / "calib.npz")
    table.save(d / "table.json")
    return d / "table.json"


def test_saved_plan_reapplies_byte_for_byte(sample_table, tmp_path):
    q, q2, p = tmp_path / "q.onnx", tmp_path / "q2.onnx", tmp_path / "p.json"
    r = cli("quantize", SAMPLE / "model.onnx", "--table", sample_table, "-o", q, "--save-plan", p)
    assert r.exit_code == 0, r.output
    r = cli("quantize", SAMPLE / "model.onnx", "--plan", p, "-o", q2)
    assert r.exit_code == 0, r.output
    assert q.read_bytes() == q2.read_bytes()
    saved = json.loads(p.read_text())
    constants = [t for t in saved["tensors"] if t["role"] in ("weight", "bias")]
    assert len(constants) == 8 and all(t["scale"] is not None and t["zero_point"] is not None for t in constants)
    assert all(n["kernel"] for n in saved["nodes"] if n["precision"] != "float" and not n["fused_into"])


@pytest.mark.parametrize("options", [QuantizeOptions(format="qoperator"), QuantizeOptions(mode="dynamic"),
                                     QuantizeOptions(per_channel=False, activation_type="int8")])
def test_other_formats_reapply_byte_for_byte(options, tmp_path):
    src = DATA / "tiny_encoder.onnx" if options.mode == "dynamic" else DATA / "tiny_resnet.onnx"
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32))
    data = None if options.mode == "dynamic" else tmp_path / "c.npz"
    first = qtool.quantize(src, tmp_path / "a.onnx", data=data, options=options)
    (tmp_path / "p.json").write_text(first.plan.to_json())
    qtool.quantize(src, tmp_path / "b.onnx", plan=tmp_path / "p.json")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_precision_fp32_keeps_conv_weight_and_input_float(sample_table, tmp_path):
    out = tmp_path / "q.onnx"
    result = qtool.quantize(SAMPLE / "model.onnx", out, table=sample_table,
                            options=QuantizeOptions(precision=("/conv2/Conv=fp32",)))
    q = onnx.load(out)
    conv2 = next(n for n in q.graph.node if n.name == "/conv2/Conv")
    weight = {t.name: t for t in q.graph.initializer}[conv2.input[1]]
    assert weight.data_type == onnx.TensorProto.FLOAT
    assert producers(q)[conv2.input[0]].op_type != "DequantizeLinear"
    assert "on request" in result.plan.node("/conv2/Conv").reason
    # onnxruntime runs it as a float Conv: its WeightBiasQuantization does not touch it
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(tmp_path / "opt.onnx")
    assert Counter(n.op_type for n in opt.graph.node)["QLinearConv"] == 1
    # (WeightBiasQuantization would add "<node>_weight_q"/"_weight_scale" tensors for /conv2/Conv)
    assert not any(i.startswith("/conv2/Conv_weight") for n in opt.graph.node for i in n.input)
    assert_model_matches_plan(q, result.plan, prepare(SAMPLE / "model.onnx").model)


def test_qoperator_with_excluded_relu_writes_a_valid_model(tmp_path):
    """Regression: the Relu was dropped as 'fused' into a Conv, then KeyError: None (exit 3)."""
    out = tmp_path / "q.onnx"
    r = cli("quantize", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "--exclude", "/relu1/Relu",
            "--format", "qoperator", "-o", out, "--explain")
    assert r.exit_code == 0, r.output
    q = onnx.load(out)
    onnx.checker.check_model(q)
    assert any(n.op_type == "Relu" for n in q.graph.node)
    x = np.load(SAMPLE / "eval.npz")["input"][:64]
    ref = ort.InferenceSession(str(SAMPLE / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert (ref[0].argmax(1) == got[0].argmax(1)).mean() > 0.95


def test_fusion_recorded_only_when_both_sides_final(sample_table):
    """Regression: the plan said a Relu was fused into conv1 while conv1 stayed float."""
    plan = qtool.plan(SAMPLE / "model.onnx", sample_table, QuantizeOptions(exclude=("/conv1/Conv",)))
    relu = plan.node("/relu1/Relu")
    assert not plan.node("/conv1/Conv").quantized
    assert not relu.quantized and not relu.fused_into and "fused" not in relu.reason


def test_precision_override_errors():
    with pytest.raises(ConfigError, match="closest: /conv2/Conv"):
        qtool.plan(SAMPLE / "model.onnx", options=QuantizeOptions(precision=("/conv2/Cnv=fp32",)))
    with pytest.raises(ConfigError, match="precision must be one of"):
        QuantizeOptions(precision=("Conv=int3",))
    with pytest.raises(ConfigError, match="QDQ"):
        QuantizeOptions(precision=("Conv=int16",), format="qoperator")
    r = cli("quantize", SAMPLE / "model.onnx", "--mode", "dynamic", "-o", "/tmp/x.onnx", "--exclude", "Conv2d")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "matches no node" in r.output


@pytest.mark.parametrize("opset, domain", [(17, "com.microsoft"), (21, "")])
def test_int16_activations(opset, domain, tmp_path):
    m = models.small_cnn(opset=opset)
    src = models.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **models.random_inputs(m, 32, seed=1))
    out = tmp_path / "q.onnx"
    result = qtool.quantize(src, out, data=tmp_path / "c.npz", options=QuantizeOptions(precision=("Conv=int16",)))
    x16 = [t for t in result.plan.tensors.values() if t.role is Role.ACTIVATION and t.precision.bits == 16]
    assert {t.name for t in x16} >= {"x", "r1"} and all(t.qdq_domain == domain for t in x16)
    q = onnx.load(out)
    wide = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.domain == domain
            and n.input[0] in {t.name for t in x16}]
    assert len(wide) >= 2
    assert_model_matches_plan(q, result.plan, prepare(src).model)
    feeds = models.random_inputs(m, 8, seed=5)
    ref = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def bn_folded_cnn(seed=0):
    """A Conv whose channels 0-3 have near-zero weights (as BatchNorm folding leaves
    them) but a large bias: s_x * s_w is so small that the int32 bias would saturate."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.2, (8, 3, 3, 3))
    w[:4] *= 1e-7
    b = rng.normal(0, 0.1, 8)
    b[:4] = [0.739, -1.5, 2.0, 0.9]
    w[3] = 0.0  # an all-zero channel
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    bn (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        r = Relu (c)
        y = Conv (r, w2, b2)
    }
    """
    return models._with_weights(text, {"w": w, "b": b, "w2": rng.normal(0, 0.2, (4, 8, 1, 1)),
                                       "b2": rng.normal(0, 0.1, 4)})


def test_int32_bias_never_saturates(tmp_path):
    m = bn_folded_cnn()
    src = models.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **models.random_inputs(m, 16, seed=1))
    out = tmp_path / "q.onnx"
    result = qtool.quantize(src, out, data=tmp_path / "c.npz")
    w = result.plan.tensors["w"]
    assert "raised so that the int32 bias fits" in w.reason and "3 channel(s)" in w.reason
    q = onnx.load(out)
    assert_model_matches_plan(q, result.plan, prepare(src).model)  # every bias within half a step
    feeds = models.random_inputs(m, 4, seed=2)
    ref = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def _edited(plan_path, tmp_path, edit):
    data = json.loads(plan_path.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def _tensor(data, name):
    return next(t for t in data["tensors"] if t["name"] == name)


@pytest.fixture(scope="module")
def saved_plan(sample_table, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    r = cli("quantize", SAMPLE / "model.onnx", "--table", sample_table, "-o", d / "q.onnx", "--save-plan",
            d / "p.json")
    assert r.exit_code == 0, r.output
    return d / "p.json"


@pytest.mark.parametrize("edit, message", [
    (lambda d: _tensor(d, "input").update(scale=0.05), "'conv1.bias'.*s_x \\* s_w"),
    (lambda d: _tensor(d, "input").update(zero_point=300), "'input'.*zero point outside the uint8"),
    (lambda d: _tensor(d, "conv1.weight").update(scale=[0.1, 0.2]), "'conv1.weight'.*2 scale.*16 zero point"),
    (lambda d: _tensor(d, "conv1.weight").update(scale=[0.1, 0.2], zero_point=_tensor(d, "conv1.weight")
                                                 ["zero_point"][:2]), "'conv1.weight'.*needs 16 scales"),
    (lambda d: _tensor(d, "conv1.weight").update(zero_point=[5] * 16), "'conv1.weight'.*symmetric"),
    (lambda d: _tensor(d, "conv1.weight").update(action="derive"), "reads 'conv1.weight' quantized, but"),
    (lambda d: _tensor(d, "conv1.weight").update(precision="int4"), "'conv1.weight'.*int4 is not one"),
    (lambda d: _tensor(d, "input").update(precision="int16", zero_point=0), "'input'.*com.microsoft"),
    (lambda d: [n.update(precision="float", kernel="") for n in d["nodes"] if n["name"] == "/conv1/Conv"],
     "'/conv1/Conv'.*float, so it can have no"),
    (lambda d: [n.update(precision="float", kernel="", inputs=[]) for n in d["nodes"]
                if n["name"] == "/conv1/Conv"], "'/relu1/Relu'.*fused into '/conv1/Conv'"),
    (lambda d: d["tensors"].insert(0, 5), "tensors\\[0\\].*JSON object"),
    (lambda d: _tensor(d, "input").update(zero_point=1e20), "'input'.*integer zero point"),
    (lambda d: _tensor(d, "input").update(symmetric="no"), "'input'.*true or false"),
    (lambda d: d.update(notes=5), "notes must be a list"),
    (lambda d: _tensor(d, "conv1.weight").update(scale=-1.0), "'conv1.weight'"),
    (lambda d: _tensor(d, "/pool1/MaxPool_output_0").update(scale=0.5), "MaxPool_output_0'.*shares"),
    (lambda d: d["tensors"].append(dict(_tensor(d, "input"), name="nope")), "'nope'.*not a tensor of this model"),
    (lambda d: d["nodes"].pop(0), "'/conv1/Conv'.*not in the plan"),
    (lambda d: d["nodes"][0].update(kernel="QLinearConv"), "'/conv1/Conv'.*kernel 'QLinearConv'"),
    (lambda d: d.update(model_sha256="0" * 64), "another model"),
    (lambda d: d.update(format_version=1), "format_version 1"),
    (lambda d: d.update(resolved=False), "decisions only"),
])
def test_inconsistent_hand_edit_is_one_clear_error(saved_plan, tmp_path, edit, message):
    edited = _edited(saved_plan, tmp_path, edit)
    out = tmp_path / "q.onnx"
    r = cli("quantize", SAMPLE / "model.onnx", "--plan", edited, "-o", out)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1
    import re
    assert re.search(message, r.output), r.output
    assert not out.exists()


def test_consistent_hand_edit_is_applied(saved_plan, tmp_path):
    """Edit an activation scale together with the bias scale that derives from it."""
    def edit(d):
        act = _tensor(d, "input")
        act["scale"] = float(np.float32(act["scale"] * 1.25))
        bias = _tensor(d, "conv1.bias")
        w = _tensor(d, "conv1.weight")["scale"]
        bias["scale"] = [float(np.float32(act["scale"]) * np.float32(s)) for s in w]
    edited = _edited(saved_plan, tmp_path, edit)
    out = tmp_path / "q.onnx"
    assert qtool.quantize(SAMPLE / "model.onnx", out, plan=edited)
    scale = {t.name: t for t in onnx.load(out).graph.initializer}["input_scale"]
    assert onnx.numpy_helper.to_array(scale) == np.float32(_tensor(json.loads(edited.read_text()), "input")["scale"])


def test_plan_option_conflicts_and_bad_files(saved_plan, tmp_path):
    r = cli("quantize", SAMPLE / "model.onnx", "--plan", saved_plan, "--format", "qoperator", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "--format cannot be combined" in r.output
    (tmp_path / "bad.json").write_text("{not json")
    r = cli("quantize", SAMPLE / "model.onnx", "--plan", tmp_path / "bad.json", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "not a JSON plan" in r.output
    r = cli("quantize", SAMPLE / "model.onnx", "--plan", tmp_path / "missing.json", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "no such plan file" in r.output
    with pytest.raises(PlanError):
        qtool.quantize(DATA / "tiny_resnet.onnx", tmp_path / "q.onnx", plan=saved_plan)


def test_analysed_and_planned_once(monkeypatch, tmp_path):
    """quantize --data: one plan, shape inference once for the model and once for MAC counts."""
    import onnx.shape_inference
    from qtool import planner
    calls = Counter()
    infer, make_plan = onnx.shape_inference.infer_shapes, planner.plan
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", lambda *a, **k: calls.update(["infer"]) or infer(*a, **k))
    monkeypatch.setattr(planner, "plan", lambda *a, **k: calls.update(["plan"]) or make_plan(*a, **k))
    qtool.quantize(SAMPLE / "model.onnx", tmp_path / "q.onnx", data=SAMPLE / "calib.npz")
    assert calls == Counter({"plan": 1, "infer": 2}), calls


# -- random overrides: always a valid model that runs, and a plan that re-applies ---------------------

MODELS = {"sample": SAMPLE / "model.onnx", "resnet": DATA / "tiny_resnet.onnx", "encoder": DATA / "tiny_encoder.onnx"}


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(0)
    np.savez(d / "resnet.npz", x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32))
    np.savez(d / "encoder.npz", ids=rng.integers(0, 50, (8, 7)).astype(np.int64))
    data = {"sample": SAMPLE / "calib.npz", "resnet": d / "resnet.npz", "encoder": d / "encoder.npz"}
    out = {}
    for key, path in MODELS.items():
        out[key] = (d / f"{key}.json", data[key])
        qtool.calibrate(path, data[key]).save(out[key][0])
    return out


def _choices(path):
    m = prepare(path).model
    names = [n.name for n in m.graph.node if n.name]
    return sorted(set(names) | {n.op_type for n in m.graph.node})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), key=st.sampled_from(sorted(MODELS)), fmt=st.sampled_from(["qdq", "qoperator", "dynamic"]))
def test_random_overrides_give_valid_models_and_plans_that_reapply(tables, tmp_path_factory, data, key, fmt):
    path = MODELS[key]
    table, calib = tables[key]
    precisions = ["fp32", "int8", "uint8"] + (["int16", "uint16"] if fmt == "qdq" else [])
    keys = data.draw(st.lists(st.sampled_from(_choices(path)), max_size=4, unique=True))
    overrides = tuple(f"{k}={data.draw(st.sampled_from(precisions))}" for k in keys)
    d = tmp_path_factory.mktemp("case")
    options = QuantizeOptions(mode="dynamic", precision=overrides) if fmt == "dynamic" else \
        QuantizeOptions(format=fmt, precision=overrides)
    try:
        result = qtool.quantize(path, d / "q.onnx", table=table if fmt != "dynamic" else None, options=options)
    except QtoolError as exc:  # the overrides kept every quantizable node float: nothing to do
        assert "nothing to quantize" in str(exc) and not (d / "q.onnx").exists()
        assert fmt == "dynamic" or any(o.endswith("=fp32") for o in overrides)
        return
    plan = result.plan
    q = onnx.load(d / "q.onnx")
    contrib = any(n.domain == "com.microsoft" for n in q.graph.node)
    onnx.checker.check_model(q, full_check=not contrib)  # onnx has no schemas for onnxruntime's contrib ops
    assert_model_matches_plan(q, plan, prepare(path).model)
    for n in plan.nodes:  # a fusion is recorded only with both sides quantized
        assert not n.fused_into or (n.quantized and plan.node(n.fused_into).quantized), n
    made = producers(q)
    for n in q.graph.node:  # a node kept float on request reads no DequantizeLinear output
        decided = plan.node(n.name) if n.name else None
        if decided is not None and "on request" in decided.reason and fmt == "qdq":
            assert all(made[i].op_type != "DequantizeLinear" for i in n.input if i in made), n.name
    (d / "p.json").write_text(plan.to_json())
    qtool.quantize(path, d / "again.onnx", plan=d / "p.json")
    assert (d / "q.onnx").read_bytes() == (d / "again.onnx").read_bytes()
    feeds = {}
    for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs():
        with np.load(calib) as z:
            feeds[i.name] = z[i.name][:4]
    outs = ort.InferenceSession(str(d / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(np.isfinite(o).all() for o in outs)
    assert all(t.has_params for t in plan.tensors.values() if t.action in (Action.QUANTIZE, Action.SHARE,
                                                                            Action.DERIVE))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_uint8_weights_are_symmetric_around_128_and_fuse(mode, cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    options = QuantizeOptions(weight_type="uint8", mode=mode)
    result = qtool.quantize(cnn_files["model"], out, table=cnn_files["table"] if mode == "static" else None,
                            options=options)
    weights = [t for t in result.plan.tensors.values() if t.role is Role.WEIGHT and t.action is Action.QUANTIZE]
    assert weights and all(t.precision.label == "uint8" and not t.reduce_range and set(t.zero_point) == {128}
                           for t in weights)
    q = onnx.load(out)
    assert_model_matches_plan(q, result.plan, prepare(cnn_files["model"]).model)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    if mode == "static":
        assert fused["QLinearConv"] == 2 and fused["QGemm"] == 2, fused
    else:
        assert fused["DynamicQuantizeMatMul"] == 1, fused
    feeds = models.random_inputs(models.small_cnn(), 8, seed=4)
    ref = ort.InferenceSession(str(cnn_files["model"]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(ref - sess.run(None, feeds)[0]).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("saturates", [True, False])
def test_weights_follow_the_cpu(saturates, monkeypatch, cnn_files, tmp_path):
    """x86-64 without VNNI: auto -> uint8 Conv and 7-bit int8 Gemm weights, int8 -> a 7-bit grid;
    elsewhere plain int8."""
    from qtool import planner
    monkeypatch.setattr(planner, "cpu_saturates_u8s8", lambda: saturates)
    for weight_type in ("auto", "int8"):
        out = tmp_path / f"{weight_type}.onnx"
        plan = qtool.quantize(cnn_files["model"], out, table=cnn_files["table"],
                              options=QuantizeOptions(weight_type=weight_type)).plan
        w = plan.tensors["w2"]
        q = onnx.numpy_helper.to_array({t.name: t for t in onnx.load(out).graph.initializer}["w2_quantized"])
        if weight_type == "auto" and saturates:
            assert w.precision.label == "uint8" and not w.reduce_range and np.abs(q.astype(int) - 128).max() in (127, 128)
        else:
            assert w.precision.label == "int8" and w.reduce_range == saturates
            assert np.abs(q.astype(int)).max() == (64 if saturates else 127)
        assert any("without VNNI" in n for n in plan.notes) == saturates
        gemm = plan.tensors["w3"]
        assert gemm.precision.label == "int8" and gemm.reduce_range == saturates


@pytest.fixture(scope="module")
def dynamic_plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("dyn")
    result = qtool.quantize(DATA / "tiny_encoder.onnx", d / "q.onnx", options=QuantizeOptions(mode="dynamic"))
    (d / "p.json").write_text(result.plan.to_json())
    return d / "p.json"


def _node(data, name):
    return next(n for n in data["nodes"] if n["name"] == name)


@pytest.mark.parametrize("edit, message", [
    (lambda d: _node(d, "/qkv/Add").update(fused_into="", precision="float"), "fuses no bias Add"),
    (lambda d: _node(d, "/qkv/MatMul").update(bias=""), "folds bias 'none'.*qkv.bias"),
    (lambda d: _node(d, "/qkv/MatMul").update(bias="proj.bias"), "folds bias 'proj.bias'"),
    (lambda d: _node(d, "/qkv/MatMul").update(precision="float", kernel="", inputs=[], bias=""),
     "fused into '/qkv/MatMul'"),
    (lambda d: _tensor(d, _node(d, "/qkv/MatMul")["inputs"][1]).update(
        granularity={"kind": "per-axis", "axis": 0}), "per tensor or per axis 1"),
])
def test_dynamic_plan_edits_are_checked(dynamic_plan, tmp_path, edit, message):
    import re
    edited = _edited(dynamic_plan, tmp_path, edit)
    with pytest.raises(PlanError) as info:
        qtool.quantize(DATA / "tiny_encoder.onnx", tmp_path / "q.onnx", plan=edited)
    assert re.search(message, str(info.value)), str(info.value)
    assert not (tmp_path / "q.onnx").exists()


def test_gathered_rows_feeding_a_biased_gemm(tmp_path):
    """Regression: a bias whose input shares an embedding table's parameters (resolved too late: exit 3)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[N] ids) => (float[N, 4] y) {
        e = Gather (emb, ids)
        y = Gemm <transB = 1> (e, w, b)
    }
    """
    rng = np.random.default_rng(0)
    m = models._with_weights(text, {"emb": rng.normal(size=(20, 8)), "w": rng.normal(size=(4, 8)),
                                    "b": rng.normal(size=4)})
    src = models.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, 20, 16).astype(np.int64))
    result = qtool.quantize(src, tmp_path / "q.onnx", data=tmp_path / "c.npz")
    assert result.plan.tensors["e"].action is Action.SHARE and result.plan.tensors["b"].has_params
    assert_model_matches_plan(onnx.load(tmp_path / "q.onnx"), result.plan, prepare(src).model)
    ids = {"ids": np.arange(10, dtype=np.int64)}
    ref = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, ids)[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    assert np.abs(ref - got).max() < 0.03 * np.abs(ref).max()


def test_qoperator_matmul_with_fused_relu(tmp_path):
    """QLinearMatMul when the int8 output is the fused Relu's (MatMulIntegerToFloat would drop the Relu)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    mr (float[N, 8] x) => (float[N, 4] y) {
        h = MatMul (x, w1)
        r = Relu (h)
        y = MatMul (r, w2)
    }
    """
    rng = np.random.default_rng(1)
    m = models._with_weights(text, {"w1": rng.normal(size=(8, 16)), "w2": rng.normal(size=(16, 4))})
    src = models.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(32, 8)).astype(np.float32))
    result = qtool.quantize(src, tmp_path / "q.onnx", data=tmp_path / "c.npz",
                            options=QuantizeOptions(format="qoperator"))
    assert result.plan.node("MatMul(h)").kernel == "QLinearMatMul"
    assert result.plan.node("MatMul(y)").kernel == "MatMulIntegerToFloat"
    x = {"x": rng.normal(size=(5, 8)).astype(np.float32)}
    ref = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_int16_reaches_a_shared_input_and_unapplied_overrides_are_noted(sample_table):
    plan = qtool.plan(SAMPLE / "model.onnx", sample_table,
                      QuantizeOptions(precision=("/conv2/Conv=int16", "/relu1/Relu=int16", "/pool1/MaxPool=int8")))
    # conv2 reads the MaxPool output, which shares relu1's parameters: the root widens
    assert plan.tensors["/relu1/Relu_output_0"].precision.label == "int16"
    assert plan.tensors["/pool1/MaxPool_output_0"].precision.label == "int16"
    note = next(n for n in plan.notes if n.startswith("--precision not applied"))
    assert "/relu1/Relu=int16" in note and "fused into /conv1/Conv" in note
    assert "/pool1/MaxPool=int8" in note and "shares its parameters" in note


EFFNET = Path.home() / ".cache" / "qtool" / "efficientnet-lite0"


@pytest.mark.slow
@pytest.mark.skipif(not (EFFNET / "model.onnx").exists(),
                    reason="EfficientNet-Lite0 not built (python calibration/efficientnet-lite0/make.py)")
def test_efficientnet_biases_never_saturate(tmp_path):
    """81 channels of 27 Convs have near-zero weights after BatchNorm folding: every int32 bias
    must still give back its float value within half a step."""
    from qtool.config import CalibrateOptions
    out = tmp_path / "q.onnx"
    result = qtool.quantize(EFFNET / "model.onnx", out, data=EFFNET / "calib.npz",
                            calibrate_options=CalibrateOptions(limit=16))
    assert any("raised so that the int32 bias fits" in t.reason for t in result.plan.tensors.values())
    assert_model_matches_plan(onnx.load(out), result.plan, prepare(EFFNET / "model.onnx").model)


def test_evaluate_parses_each_model_once(monkeypatch, cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    qtool.quantize(cnn_files["model"], out, table=cnn_files["table"])
    loads = Counter()
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda path, *a, **k: loads.update([str(path)]) or real(path, *a, **k))
    qtool.evaluate(cnn_files["model"], out, cnn_files["eval"])
    # the optimised graphs onnxruntime writes (for the kernel counts) are read once each; the models once
    optimized = {p for p in loads if "qtool-opt-" in p}
    assert len(optimized) == 2 and all(loads[p] == 1 for p in optimized), loads
    assert Counter({p: n for p, n in loads.items() if p not in optimized}) == Counter(
        {str(cnn_files["model"]): 1, str(out): 1}), loads
