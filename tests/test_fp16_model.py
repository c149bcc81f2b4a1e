"""The fp16 model (``--weights fp16``, ``--target cuda``'s default): onnx's full check, runs on
the CPU EP, close to fp32, Casts only at the borders of the fp32 regions, the keep list by
request, by kernel and by measured error, and the plan round trip."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import models
from qtool.cli import main
from qtool.graph import node_name

vi = helper.make_tensor_value_info
HALF_NAME = "tensor(float16)"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run(path, feeds):
    """The model on the CPU EP, float32 feeds cast to fp16 where the model takes fp16."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[i.name].astype(np.float16) if i.type == HALF_NAME else feeds[i.name]
                           for i in sess.get_inputs()})


def min_cosine(ref, got):
    """Lowest cosine over samples (a zero or non-finite row counts as 0)."""
    a = np.asarray(ref, np.float64).reshape(len(ref), -1)
    b = np.asarray(got, np.float64).reshape(len(got), -1)
    with np.errstate(all="ignore"):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.nan_to_num(cos, nan=0.0).min())


def casts(m: onnx.ModelProto) -> list:
    return [n for n in m.graph.node if n.op_type == "Cast"]


def crossings(src, half: set[str], io_fp16: bool = False) -> int:
    """Border crossings the plan implies, counted on the fp32 source: float32 activations whose
    producer (an fp16 node, or a model input) has another type than one of their readers (a node,
    or a model output)."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    g = m.graph
    floats = {v.name for v in list(g.input) + list(g.value_info) + list(g.output)
              if v.type.tensor_type.elem_type == T.FLOAT} - {t.name for t in g.initializer}
    home = {i.name: io_fp16 for i in g.input}
    home.update({o: node_name(n) in half for n in g.node for o in n.output})
    readers: dict[str, set[bool]] = {}
    for n in g.node:
        for i in n.input:
            if i in floats and n.op_type not in ("Shape", "Size"):
                readers.setdefault(i, set()).add(node_name(n) in half)
    for o in g.output:
        readers.setdefault(o.name, set()).add(io_fp16)
    return sum(1 for t in floats if t in home and any(r != home[t] for r in readers.get(t, ())))


def no_round_trips(m: onnx.ModelProto) -> None:
    """No float Cast reads a float Cast (no fp16 -> fp32 -> fp16), no tensor is cast twice the same way."""
    floats = [c for c in casts(m) if c.attribute[0].i in (T.FLOAT, T.FLOAT16)]
    cast_outputs = {c.output[0] for c in floats}
    assert not [c for c in floats if c.input[0] in cast_outputs]
    pairs = [(c.input[0], c.attribute[0].i) for c in casts(m)]
    assert len(pairs) == len(set(pairs))


def weight_bytes(m: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)


def fp16_nodes(plan_path) -> set[str]:
    return {n["name"] for n in json.loads(plan_path.read_text())["nodes"] if n["precision"] == "fp16"}


@pytest.mark.parametrize("build", [models.small_cnn, models.matmul_mlp])
@pytest.mark.parametrize("keep_io", [True, False])
def test_fp16_model_casts_at_borders_only(tmp_path, build, keep_io):
    m = build()
    src = models.save(m, tmp_path / "m.onnx")
    feeds = models.random_inputs(m, 32)
    np.savez(tmp_path / "d.npz", **feeds)
    out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
    r = cli("quantize", src, "-o", out, "--weights", "fp16", "--data", tmp_path / "d.npz", "--save-plan", plan,
            "--keep-io-types", str(keep_io).lower())
    assert r.exit_code == 0, r.output
    h = onnx.load(str(out))
    onnx.checker.check_model(h, full_check=True)
    half = fp16_nodes(plan)
    assert half == {node_name(n) for n in m.graph.node}  # nothing here needs fp32
    assert len(casts(h)) == crossings(src, half, not keep_io) == (2 if keep_io else 0)
    no_round_trips(h)
    io_type = T.FLOAT if keep_io else T.FLOAT16
    assert {v.type.tensor_type.elem_type for v in list(h.graph.input) + list(h.graph.output)} == {io_type}
    assert {t.data_type for t in h.graph.initializer} == {T.FLOAT16}  # weights in fp16, no float32 left
    ref, got = run(src, feeds)[0], run(out, feeds)[0]
    assert got.dtype == (np.float32 if keep_io else np.float16)
    assert min_cosine(ref, got) >= 0.999
    assert weight_bytes(h) == weight_bytes(onnx.load(src)) // 2
    saved = json.loads(plan.read_text())
    assert saved["mode"] == "fp16" and saved.get("io_fp16", False) == (not keep_io)
    again = tmp_path / "again.onnx"
    r = cli("quantize", src, "-o", again, "--plan", plan)
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()


def test_keep_fp32_by_name_and_by_op_type(tmp_path):
    m = models.small_cnn()
    src = models.save(m, tmp_path / "m.onnx")
    feeds = models.random_inputs(m, 16)
    for keep, kept in ((["Gemm(g1)"], {"Gemm(g1)"}), (["Relu"], {"Relu(r1)", "Relu(r2)", "Relu(r3)"}),
                       (["Relu", "Conv(c1)"], {"Relu(r1)", "Relu(r2)", "Relu(r3)", "Conv(c1)"})):
        out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
        args = [a for k in keep for a in ("--keep-fp32", k)]
        r = cli("quantize", src, "-o", out, "--weights", "fp16", "--save-plan", plan, *args)
        assert r.exit_code == 0, r.output
        nodes = {n["name"]: n for n in json.loads(plan.read_text())["nodes"]}
        assert {k for k, n in nodes.items() if n["precision"] != "fp16"} == kept
        assert all("on request (--keep-fp32" in nodes[k]["reason"] for k in kept)
        h = onnx.load(str(out))
        onnx.checker.check_model(h, full_check=True)
        assert len(casts(h)) == crossings(src, fp16_nodes(plan)) > 2
        no_round_trips(h)
        assert min_cosine(run(src, feeds)[0], run(out, feeds)[0]) >= 0.999
    r = cli("quantize", src, "-o", tmp_path / "x.onnx", "--weights", "fp16", "--keep-fp32", "Gemm(g9)")
    assert r.exit_code == 2 and "closest: Gemm(g1)" in r.output
    assert not (tmp_path / "x.onnx").exists()


def _softmax_by_hand(scale: float) -> onnx.ModelProto:
    """x @ W -> Exp -> Concat -> ReduceSum -> Div -> @ W2: a softmax without its max subtraction,
    whose logits reach ``scale``·|x| (exp overflows fp16's 65504 above 11.09). The Concat has an
    fp16 kernel on the CPU EP, so there too the overflow is stored in fp16."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("Exp", ["h"], ["e"], name="exp"),
             helper.make_node("Concat", ["e", "e"], ["c"], name="concat", axis=-1),
             helper.make_node("ReduceSum", ["c", "axes"], ["s"], name="sum", keepdims=1),
             helper.make_node("Div", ["c", "s"], ["p"], name="div"),
             helper.make_node("MatMul", ["p", "W2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array((np.eye(16) * scale).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(rng.normal(0, 1, (32, 8)).astype(np.float32), "W2")]
    g = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, ["N", 16])], [vi("y", T.FLOAT, ["N", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _layernorm_by_hand() -> onnx.ModelProto:
    """x·300 -> ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div -> @ W: the variance of values of a few
    hundred overflows fp16 (|x - mean| above 256 squares past 65504)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Mul", ["x", "k"], ["xs"], name="scale"),
             helper.make_node("ReduceMean", ["xs", "axes"], ["mu"], name="mean"),
             helper.make_node("Sub", ["xs", "mu"], ["d"], name="sub"),
             helper.make_node("Pow", ["d", "two"], ["d2"], name="pow"),
             helper.make_node("ReduceMean", ["d2", "axes"], ["var"], name="var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="eps"),
             helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
             helper.make_node("Div", ["d", "std"], ["n"], name="norm"),
             helper.make_node("MatMul", ["n", "W"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(np.array(300, np.float32), "k"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(2, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(rng.normal(0, 1, (32, 8)).astype(np.float32), "W")]
    g = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, ["N", 32])], [vi("y", T.FLOAT, ["N", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("case", ["exp", "square"])
def test_overflowing_nodes_are_kept_fp32_by_measurement(tmp_path, case):
    m = _softmax_by_hand(4.0) if case == "exp" else _layernorm_by_hand()
    group = {"exp": {"exp", "concat", "sum", "div"}, "square": {"pow", "var", "eps", "sqrt"}}[case]
    src = models.save(m, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(0, 1.5, (64, m.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
    feeds = {"x": x.astype(np.float32)}
    np.savez(tmp_path / "d.npz", **feeds)
    ref = run(src, feeds)[0]
    assert np.isfinite(ref).all()

    # every node in fp16: inf/NaN or zeros where fp16 tensors are stored in fp16, as the CUDA EP
    # does (emulated: float32 rounded to fp16 wherever the fp16 model holds fp16; the CPU EP runs
    # this chain in float32 between its own Casts and would hide the overflow)
    from qtool.half_model import decide
    from qtool.half_search import emulated
    from qtool.plans import Plan
    from qtool.prepare import prepare
    p = prepare(src)
    nodes, _ = decide(p.model, frozenset(), None, static=False)
    onnx.save(emulated(Plan({}, tuple(nodes), mode="fp16", resolved=True), p.model), tmp_path / "all.onnx")
    bad = run(tmp_path / "all.onnx", feeds)[0]
    assert not np.isfinite(bad).all() or min_cosine(ref, bad) < 0.5

    for data, word in ((tmp_path / "d.npz", "by measurement"), (None, "by rule")):
        out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
        args = ["--data", data] if data else []
        r = cli("quantize", src, "-o", out, "--weights", "fp16", "--save-plan", plan, *args)
        assert r.exit_code == 0, r.output
        saved = {n["name"]: n for n in json.loads(plan.read_text())["nodes"]}
        kept = {k for k, n in saved.items() if n["precision"] != "fp16"}
        assert kept == group, (kept, [saved[k]["reason"] for k in kept])
        assert all(word in saved[k]["reason"] for k in kept)
        if data:
            reason = saved[sorted(group)[0]]["reason"]
            assert "inf/NaN" in reason or "SNR" in reason  # the measurement is in the reason
        h = onnx.load(str(out))
        onnx.checker.check_model(h, full_check=True)
        assert len(casts(h)) == crossings(src, fp16_nodes(plan))
        no_round_trips(h)
        got = run(out, feeds)[0]
        assert np.isfinite(got).all() and min_cosine(ref, got) >= 0.999


def test_typed_attributes_and_fixed_inputs(tmp_path):
    """Cast(to=FLOAT) inside the region becomes a Cast to fp16, ConstantOfShape's value fp16;
    Resize's roi and scales stay float32 (onnxruntime reads them as float), Reshape's shape and
    Gather's indices int64; the only Casts are the model input's and output's."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "roi", "scales"], ["r"], name="resize", mode="linear",
                              coordinate_transformation_mode="tf_crop_and_resize"),
             helper.make_node("Shape", ["x"], ["sx"], name="shape"),
             helper.make_node("Gather", ["sx", "zero"], ["n"], name="batch", axis=0),
             helper.make_node("Cast", ["n"], ["nf"], name="cast", to=T.FLOAT),
             helper.make_node("Div", ["r", "nf"], ["q"], name="div"),
             helper.make_node("Shape", ["q"], ["sq"], name="shape_q"),
             helper.make_node("ConstantOfShape", ["sq"], ["ones"], name="ones",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["q", "ones"], ["a"], name="add"),
             helper.make_node("Reshape", ["a", "shape"], ["f"], name="reshape"),
             helper.make_node("Gather", ["f", "idx"], ["y"], name="pick", axis=1)]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (3, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 0.1, 0.1, 1, 1, 0.9, 0.9], np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0, 768], np.int64), "shape"),
             numpy_helper.from_array(np.array([0, 5, 700], np.int64), "idx")]
    g = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, ["N", 2, 8, 8])], [vi("y", T.FLOAT, ["N", 3])], inits)
    src = models.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8),
                      tmp_path / "m.onnx")
    feeds = {"x": rng.normal(size=(4, 2, 8, 8)).astype(np.float32)}
    out = tmp_path / "h.onnx"
    r = cli("quantize", src, "-o", out, "--weights", "fp16", "--no-preprocess")
    assert r.exit_code == 0, r.output
    h = onnx.load(str(out))
    onnx.checker.check_model(h, full_check=True)
    types = {t.name: t.data_type for t in h.graph.initializer}
    by_name = {n.name: n for n in h.graph.node}
    assert types["roi"] == types["scales"] == T.FLOAT and list(by_name["resize"].input[1:]) == ["roi", "scales"]
    assert types["shape"] == types["idx"] == types["zero"] == T.INT64
    assert by_name["cast"].attribute[0].i == T.FLOAT16
    assert by_name["ones"].attribute[0].t.data_type == T.FLOAT16
    assert len(casts(h)) == 3 and {c.name for c in casts(h)} >= {"cast"}  # the model's own Cast, now to fp16
    no_round_trips(h)
    ref, got = run(src, feeds)[0], run(out, feeds)[0]
    assert got.shape == ref.shape == (4, 3) and min_cosine(ref, got) >= 0.999


def test_bundled_sample_and_target_cuda_default(tmp_path):
    """The real-weight sample (Fashion-MNIST CNN): --target cuda means fp16; close to fp32."""
    import pathlib
    s = pathlib.Path(__file__).resolve().parent.parent / "calibration" / "fashion-mnist"
    out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
    r = cli("quantize", s / "model.onnx", "-o", out, "--target", "cuda", "--data", s / "calib.npz",
            "--save-plan", plan)
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())
    assert saved["mode"] == "fp16" and saved["target"] == "cuda"
    assert any("measured on" in n for n in saved["notes"])
    h = onnx.load(str(out))
    onnx.checker.check_model(h, full_check=True)
    no_round_trips(h)
    eval_data = np.load(s / "eval.npz")
    name = ort.InferenceSession(str(s / "model.onnx"), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    feeds = {name: eval_data[name][:256]}
    ref, got = run(s / "model.onnx", feeds)[0], run(out, feeds)[0]
    assert min_cosine(ref, got) >= 0.999
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99
    assert out.stat().st_size < 0.55 * (s / "model.onnx").stat().st_size


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript exporter, still the one for opset 17
def test_torch_transformer_block(tmp_path):
    """A small pre-norm transformer block exported by torch: LayerNormalization, attention
    Softmax, erf GELU, all fp16 and close to fp32; Casts only at the model's input and output."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d=64, heads=4):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    torch.manual_seed(0)
    block = Block().eval()
    x = np.random.default_rng(4).normal(size=(16, 12, 64)).astype(np.float32)
    src = tmp_path / "block.onnx"
    torch.onnx.export(block, (torch.from_numpy(x[:2]),), str(src), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "d.npz", x=x)
    out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
    r = cli("quantize", src, "-o", out, "--weights", "fp16", "--data", tmp_path / "d.npz", "--save-plan", plan)
    assert r.exit_code == 0, r.output
    h = onnx.load(str(out))
    onnx.checker.check_model(h, full_check=True)
    ops = {n.op_type for n in h.graph.node}
    assert {"LayerNormalization", "Softmax", "Erf"} <= ops
    saved = {n["name"]: n for n in json.loads(plan.read_text())["nodes"]}
    assert all(n["precision"] == "fp16" for n in saved.values()
               if n["op_type"] in ("LayerNormalization", "Softmax", "Erf", "MatMul"))
    own = {c.name: c.attribute[0].i for c in casts(onnx.load(str(src)))}  # torch's Casts (head size to float)
    assert T.FLOAT in own.values()
    assert all(c.attribute[0].i == (T.FLOAT16 if own[c.name] == T.FLOAT else own[c.name])
               for c in casts(h) if c.name in own)
    assert len([c for c in casts(h) if c.name not in own]) == 2
    no_round_trips(h)
    ref, got = run(src, {"x": x})[0], run(out, {"x": x})[0]
    assert min_cosine(ref, got) >= 0.999


def test_fp16_source_model_stays_fp16_without_casts(tmp_path):
    """An fp16 model (computed in float32 inside by qtool's pre-processing): the fp16 recipe
    gives it back in fp16, interface kept, no Cast left (the upcast's Casts became no-ops)."""
    from test_half import to_half
    f32 = models.small_cnn()
    src32 = models.save(f32, tmp_path / "f32.onnx")
    src = models.save(to_half(f32, "fp16"), tmp_path / "f16.onnx")
    x = np.random.default_rng(5).normal(size=(16, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x.astype(np.float16))
    for args in ([], ["--data", tmp_path / "d.npz"]):
        out = tmp_path / "h.onnx"
        r = cli("quantize", src, "-o", out, "--weights", "fp16", *args)
        assert r.exit_code == 0, r.output
        h = onnx.load(str(out))
        onnx.checker.check_model(h, full_check=True)
        assert not casts(h)
        assert h.graph.input[0].type.tensor_type.elem_type == T.FLOAT16
        assert {t.data_type for t in h.graph.initializer} == {T.FLOAT16}
        assert min_cosine(run(src32, {"x": x})[0], run(out, {"x": x})[0]) >= 0.999


def _if_model() -> onnx.ModelProto:
    """Conv -> Relu, then an If on the input's mean whose branches read the Relu from outside."""
    rng = np.random.default_rng(6)
    w = lambda *s: numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32))  # noqa: E731

    def branch(name, act):
        nodes = [helper.make_node("Conv", ["r", f"{name}_w"], [f"{name}_c"], pads=[1, 1, 1, 1], name=f"{name}_conv"),
                 helper.make_node(act, [f"{name}_c"], [f"{name}_y"], name=f"{name}_act")]
        return helper.make_graph(nodes, name, [], [vi(f"{name}_y", T.FLOAT, None)])
    inits = [w(4, 2, 3, 3), w(4, 4, 3, 3), w(4, 4, 3, 3), numpy_helper.from_array(np.zeros((), np.float32))]
    for t, n in zip(inits, ("w", "then_w", "else_w", "zero")):
        t.name = n
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
             helper.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["b"], name="if", then_branch=branch("then", "Relu"),
                              else_branch=branch("else", "Sigmoid")),
             helper.make_node("Flatten", ["b"], ["y"], name="flat")]
    g = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, [1, 2, 6, 6])], [vi("y", T.FLOAT, [1, 144])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_if_bodies_run_fp16_inside(tmp_path):
    m = _if_model()
    src = models.save(m, tmp_path / "m.onnx")
    shift = np.repeat([1.0, -1.0], 8).reshape(16, 1, 1, 1, 1)  # both branches taken
    x = (np.random.default_rng(7).normal(size=(16, 1, 2, 6, 6)) + shift).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x[:, 0])
    out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
    r = cli("quantize", src, "-o", out, "--weights", "fp16", "--data", tmp_path / "d.npz", "--save-plan", plan)
    assert r.exit_code == 0, r.output
    h = onnx.load(str(out))
    onnx.checker.check_model(h, full_check=True)
    saved = json.loads(plan.read_text())
    for key in ("if/then_branch", "if/else_branch"):
        body = {n["name"]: n["precision"] for n in saved["subgraphs"][key]["nodes"]}
        assert body[key.split("/")[1].split("_")[0] + "_conv"] == "fp16"
    node = next(n for n in h.graph.node if n.op_type == "If")
    for a in node.attribute:
        body_casts = [n for n in a.g.node if n.op_type == "Cast"]
        # the outer Relu's fp16 output is read as it is; only the body's float32 output is cast
        assert len(body_casts) == 1 and body_casts[0].attribute[0].i == T.FLOAT
        assert {t.data_type for t in a.g.initializer} == {T.FLOAT16}
    assert not {t.name for t in h.graph.initializer} & {"then_w", "else_w"}  # float32 originals dropped
    # input cast, If output back to fp16 for Flatten, output cast: the If's float32 interface costs one
    assert len(casts(h)) == 3
    for i in (0, 15):
        feeds = {"x": x[i]}
        assert min_cosine(run(src, feeds)[0], run(out, feeds)[0]) >= 0.999
    again = tmp_path / "again.onnx"
    assert cli("quantize", src, "-o", again, "--plan", plan).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_int4_nodes_take_fp16_on_cuda(tmp_path):
    """The agreed rule: on cuda a MatMulNBits node (kept under its plan name) reads fp16
    activations and scales; on cpu it stays float32. Runs on the CPU EP either way."""
    from qtool.plans import NodePlan, Plan
    from qtool.rewrite import half_nodes
    from qtool.types import Precision, Target
    rng = np.random.default_rng(8)
    k, n, block = 64, 16, 32
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.05, (n, k // block)).astype(np.float32)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, k // block, block // 2)
    weight = ((q.astype(np.float32) - 8) * np.repeat(scales, block, axis=1)).T  # [K, N]
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "s"], ["h"], name="mm", domain="com.microsoft",
                              K=k, N=n, bits=4, block_size=block),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, ["N", k])], [vi("y", T.FLOAT, ["N", n])],
                          [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.ravel(), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=8)
    x = rng.normal(size=(8, k)).astype(np.float32)
    ref = np.maximum(x @ weight, 0)
    for target, relu in ((Target.CUDA, Precision.FP16), (Target.CPU, Precision.FLOAT)):
        plan = Plan({}, (NodePlan("mm", "MatMul", Precision.INT4, "int4", kernel="MatMulNBits"),
                         NodePlan("relu", "Relu", relu, "")), mode="weight-only", target=target, resolved=True)
        h = half_nodes.apply(m, plan)
        types = {t.name: t.data_type for t in h.graph.initializer}
        mm = next(nd for nd in h.graph.node if nd.name == "mm")
        if target is Target.CUDA:
            assert types[mm.input[2]] == T.FLOAT16 and len(casts(h)) == 2 and types["B"] == T.UINT8
            assert next(nd for nd in h.graph.node if nd.name == "relu").input[0] == mm.output[0]  # no Cast between
        else:
            assert h is m
        onnx.checker.check_model(h)
        path = tmp_path / f"{target.label}.onnx"
        onnx.save(h, path)
        got = run(path, {"x": x})[0]
        assert min_cosine(ref, got) >= 0.999


def test_cpu_half_kernel_list_matches_onnxruntime():
    """The plan says which fp16 ops the CPU EP runs through its own Casts: checked on
    onnxruntime itself for a few ops of each kind (the optimised graph gains Casts or not)."""
    import tempfile
    from qtool.rewrite.half_ops import CPU_HALF_KERNELS
    for op, extra in (("Relu", {}), ("Sigmoid", {}), ("Concat", {"axis": 1}), ("Transpose", {}), ("Flatten", {})):
        g = helper.make_graph([helper.make_node(op, ["x"] * (2 if op == "Concat" else 1), ["y"], **extra)], "g",
                              [vi("x", T.FLOAT16, [2, 3])], [vi("y", T.FLOAT16, None)])
        with tempfile.TemporaryDirectory() as d:
            so = ort.SessionOptions()
            so.optimized_model_filepath = f"{d}/o.onnx"
            ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)],
                                                   ir_version=8).SerializeToString(), so,
                                 providers=["CPUExecutionProvider"])
            inserted = any(n.op_type == "Cast" for n in onnx.load(f"{d}/o.onnx").graph.node)
        assert inserted == (op not in CPU_HALF_KERNELS), op


def test_measured_keep_list_keeps_only_the_group_that_needs_it(tmp_path):
    """Four hand-built softmaxes, only the first with logits that overflow fp16: the exp kind is
    tried fp32 as a whole, then bisected, and only the first group stays fp32."""
    nodes, inits, outs = [], [numpy_helper.from_array(np.array([-1], np.int64), "axes")], []
    for i, scale in enumerate((4.0, 0.25, 0.25, 0.25)):
        nodes += [helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"], name=f"mm{i}"),
                  helper.make_node("Exp", [f"h{i}"], [f"e{i}"], name=f"exp{i}"),
                  helper.make_node("ReduceSum", [f"e{i}", "axes"], [f"s{i}"], name=f"sum{i}", keepdims=1),
                  helper.make_node("Div", [f"e{i}", f"s{i}"], [f"p{i}"], name=f"div{i}")]
        inits.append(numpy_helper.from_array((np.eye(16) * scale).astype(np.float32), f"W{i}"))
        outs.append(f"p{i}")
    nodes.append(helper.make_node("Concat", outs, ["y"], name="cat", axis=-1))
    g = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, ["N", 16])], [vi("y", T.FLOAT, ["N", 64])], inits)
    src = models.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                      tmp_path / "m.onnx")
    feeds = {"x": np.random.default_rng(9).normal(0, 1.5, (64, 16)).astype(np.float32)}
    np.savez(tmp_path / "d.npz", **feeds)
    out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
    r = cli("quantize", src, "-o", out, "--weights", "fp16", "--data", tmp_path / "d.npz", "--save-plan", plan)
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())
    kept = {n["name"] for n in saved["nodes"] if n["precision"] != "fp16"}
    assert kept == {"exp0", "sum0", "div0"}
    note = next(n for n in saved["notes"] if "measured on" in n)
    assert "all-fp16 inf/NaN outputs" in note and "kept fp32: 3 nodes (exp)" in note
    evaluations = int(note.split(" evaluations")[0].rsplit("(", 1)[1])
    assert 2 < evaluations <= 12  # the kind, then halves handed back
    h = onnx.load(str(out))
    onnx.checker.check_model(h, full_check=True)
    assert len(casts(h)) == crossings(src, fp16_nodes(plan))
    got = run(out, feeds)[0]
    assert np.isfinite(got).all() and min_cosine(run(src, feeds)[0], got) >= 0.999


def test_precision_and_exclude_keep_fp32_in_an_fp16_model(tmp_path):
    """--exclude and --precision NAME=fp32 keep a node fp32 in an fp16 model too (they were
    ignored: the node ran fp16), an integer request keeps it fp32 with its reason, a key that
    matches nothing is an error, and on --target cuda --weights int4 a node kept float by request
    stays float rather than becoming fp16."""
    m = models.small_cnn()
    src = models.save(m, tmp_path / "m.onnx")
    out, plan = tmp_path / "h.onnx", tmp_path / "plan.json"
    r = cli("quantize", src, "-o", out, "--weights", "fp16", "--save-plan", plan, "--exclude", "Relu",
            "--precision", "Conv(c1)=fp32", "--precision", "Gemm(g1)=int8")
    assert r.exit_code == 0, r.output
    nodes = {n["name"]: n for n in json.loads(plan.read_text())["nodes"]}
    kept = {"Relu(r1)", "Relu(r2)", "Relu(r3)", "Conv(c1)", "Gemm(g1)"}
    assert {k for k, n in nodes.items() if n["precision"] != "fp16"} == kept
    assert "on request" in nodes["Conv(c1)"]["reason"] and "int8 does not apply" in nodes["Gemm(g1)"]["reason"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    r = cli("quantize", src, "-o", tmp_path / "x.onnx", "--weights", "fp16", "--exclude", "Conv(c9)")
    assert r.exit_code == 2 and "matches no node" in r.output
    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                           helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")], "g",
                          [vi("x", T.FLOAT, ["N", 32])], [vi("y", T.FLOAT, ["N", 32])],
                          [numpy_helper.from_array(rng.normal(0, .2, (32, 32)).astype(np.float32), w)
                           for w in ("w1", "w2")])
    wsrc = models.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                       tmp_path / "w.onnx")
    r = cli("quantize", wsrc, "-o", tmp_path / "c.onnx", "--target", "cuda", "--weights", "int4",
            "--exclude", "mm1", "--save-plan", plan)
    assert r.exit_code == 0, r.output
    nodes = {n["name"]: n for n in json.loads(plan.read_text())["nodes"]}
    assert nodes["mm1"]["precision"] == "float" and nodes["mm2"]["kernel"] == "MatMulNBits"
