"""Targets: which EP a session really gets, the fallback when the CUDA/TensorRT EP cannot be
created, and which EP each kernel ran on."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import models
from qtool import runtime
from qtool.cli import main
from qtool.types import Target


@pytest.fixture(autouse=True)
def fresh_probe():
    runtime._UNAVAILABLE.clear()
    yield
    runtime._UNAVAILABLE.clear()


def cuda_really_runs() -> bool:
    """Independently of qtool's probe: does a session here keep the CUDA EP?"""
    import onnx
    from onnx import helper
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(m.SerializeToString(), opts,
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception:
        return False
    return "CUDAExecutionProvider" in sess.get_providers()


def test_cpu_target_needs_no_probe():
    choice = runtime.pick_provider("cpu")
    assert choice.used == "CPUExecutionProvider" and choice.note is None
    assert runtime._UNAVAILABLE == {}


def test_cuda_choice_matches_what_a_session_really_gets():
    """Fails if the fallback detection is removed: onnxruntime-gpu lists the CUDA EP among its
    available providers even where its libraries or the GPU are missing."""
    choice = runtime.pick_provider("cuda")
    if cuda_really_runs():
        assert choice.used == "CUDAExecutionProvider" and choice.note is None
    else:
        assert choice.used == "CPUExecutionProvider"
        assert choice.note and "CUDAExecutionProvider unavailable" in choice.note and "\n" not in choice.note


def test_provider_missing_from_the_build(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    choice = runtime.pick_provider("cuda")
    assert choice.used == "CPUExecutionProvider"
    assert "built without it" in choice.note and "onnxruntime-gpu" in choice.note


def test_missing_library_is_named(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    import ctypes

    def fake_cdll(path, *a, **k):
        raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")
    monkeypatch.setattr(ctypes, "CDLL", fake_cdll)
    monkeypatch.setattr(runtime.os.path, "exists", lambda p: True)
    choice = runtime.pick_provider(Target.CUDA)
    assert choice.used == "CPUExecutionProvider"
    assert "missing library libcudnn.so.9" in choice.note


def test_library_loads_but_session_drops_the_provider(monkeypatch):
    """A GPU-less machine with every library present: the session silently keeps only the CPU EP."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_load_library", lambda path: None)

    class FakeSession:
        def __init__(self, *a, **k):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    choice = runtime.pick_provider("cuda")
    assert choice.used == "CPUExecutionProvider" and "could not create it" in choice.note


def test_provider_chains():
    assert runtime.provider_list("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert runtime.provider_list("CUDAExecutionProvider") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.provider_list("TensorrtExecutionProvider") == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_trt_gets_int8_enabled_for_qdq_models_only(tmp_path):
    import onnx
    from onnx import helper, numpy_helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    qdq = helper.make_model(helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
                                              "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)])
    trt = "TensorrtExecutionProvider"
    assert runtime.provider_list(trt, qdq)[0] == (trt, {"trt_int8_enable": "True"})
    assert runtime.provider_list(trt, plain)[0] == trt
    path = tmp_path / "qdq.onnx"
    onnx.save(qdq, str(path))
    assert runtime.provider_list(trt, str(path))[0] == (trt, {"trt_int8_enable": "True"})


def test_placement_counts_every_kernel_on_its_provider():
    from qtool.profile import node_placement
    m = models.small_cnn()
    feeds = {m.graph.input[0].name: np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)}
    placed = node_placement(m, "CPUExecutionProvider", feeds)
    assert list(placed) == ["CPUExecutionProvider"]
    ops = placed["CPUExecutionProvider"]
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) == 2  # both convolutions, fused with Relu or not
    assert all(isinstance(n, int) and n > 0 for n in ops.values())


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_reports_target_and_placement(cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    r = cli("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", out)
    assert r.exit_code == 0, r.output
    report = tmp_path / "r.json"
    r = cli("eval", cnn_files["model"], out, "--data", cnn_files["eval"], "--repeats", 2, "--target", "cuda",
            "--json", report)
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert data["target"] == "cuda"
    ran = data["placement_candidate"]
    if not cuda_really_runs():
        assert data["provider"] == "CPUExecutionProvider" and list(ran) == ["CPUExecutionProvider"]
        assert "unavailable" in r.output and "running on the CPU EP" in r.output
    # the int8 kernels onnxruntime fused are listed where they ran
    assert any("QLinearConv" in ops or "QLinearMatMul" in ops or "QGemm" in ops for ops in ran.values())
    assert "candidate ran on:" in r.output
    # the saved report reads back, placement included
    r2 = cli("eval", "--from", report)
    assert r2.exit_code == 0 and "candidate ran on:" in r2.output
    both = cli("eval", cnn_files["model"], out, "--data", cnn_files["eval"], "--target", "cpu", "--provider", "cuda")
    assert both.exit_code == 2 and "disagree" in both.output


SAMPLE = "calibration/fashion-mnist/model.onnx"


def test_inspect_cuda_says_convs_are_fake_quantized_and_recommends_fp16():
    r = cli("inspect", SAMPLE, "--target", "cuda")
    assert r.exit_code == 0, r.output
    convs = [line for line in r.output.splitlines() if line.strip().startswith("/conv") and " Conv " in line]
    assert len(convs) == 2
    assert all("float Conv between Q/DQ" in line and line.rstrip().endswith("fp16") for line in convs)
    assert "0 of" in r.output and "recommend   --target cuda (fp16" in r.output


def test_inspect_cpu_prediction_matches_onnxruntimes_optimised_graph(tmp_path):
    """What inspect says fuses on the CPU EP is what onnxruntime's optimiser really fuses."""
    import onnx
    r = cli("inspect", SAMPLE, "--target", "cpu", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["target"]["nodes"]
    predicted = sum(1 for n in rows if n["int8"] == "fused QLinearConv")
    assert predicted == 2
    q = tmp_path / "q.onnx"
    assert cli("quantize", SAMPLE, "--data", "calibration/fashion-mnist/calib.npz", "-o", q).exit_code == 0
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == predicted
    assert ops.count("QGemm") == sum(1 for n in rows if n["int8"] == "fused QGemm")


def test_inspect_cuda_offers_int4_for_matmul_weights(tmp_path):
    path = models.save(models.matmul_mlp(), tmp_path / "mlp.onnx")
    r = cli("inspect", path, "--target", "cuda", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["target"]["nodes"]
    mm = {n["name"]: n for n in rows if n["op_type"] == "MatMul"}
    assert mm["MatMul(h)"]["choose"] == "int4 weights" and "MatMulNBits" in mm["MatMul(h)"]["why"]
    # what --weights int4 leaves float is not offered: w2 is 32 x 8 (N < 16), y reads two activations
    for name in ("MatMul(h2)", "MatMul(y)"):
        if name in mm:
            assert mm[name]["choose"] == "fp16", mm[name]
    q = cli("quantize", path, "--weights", "int4", "-o", tmp_path / "q4.onnx", "--save-plan", tmp_path / "p.json")
    assert q.exit_code == 0, q.output
    int4 = {n["name"] for n in json.loads((tmp_path / "p.json").read_text())["nodes"] if n["kernel"] == "MatMulNBits"}
    assert int4 == {n["name"] for n in rows if n["choose"] == "int4 weights"}
    assert "--weights int4" in json.loads(r.output)["target"]["recommendation"]
    plain = json.loads(cli("inspect", path, "--json").output)
    assert "target" not in plain


def test_debug_runs_on_the_target_or_says_it_fell_back(cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    assert cli("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", out).exit_code == 0
    r = cli("debug", cnn_files["model"], out, "--data", cnn_files["eval"], "--target", "cuda", "--limit", 8)
    assert r.exit_code == 0, r.output
    if not cuda_really_runs():
        assert "warning: CUDAExecutionProvider unavailable" in r.output


def test_eval_feeds_an_fp16_interface_candidate_the_fp32_data(tmp_path):
    """A model converted with --keep-io-types false takes fp16 inputs; eval casts the reference's
    float32 data for it instead of refusing the dtype."""
    import onnx
    from onnx import TensorProto, numpy_helper
    ref = models.small_cnn()
    half = onnx.ModelProto()
    half.CopyFrom(ref)
    for t in half.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for vi in list(half.graph.input) + list(half.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del half.graph.value_info[:]
    rp, hp = models.save(ref, tmp_path / "ref.onnx"), models.save(half, tmp_path / "half.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, **models.random_inputs(ref, 16))
    r = cli("eval", rp, hp, "--data", data, "--repeats", 2, "--min-cosine", 0.999)
    assert r.exit_code == 0, r.output
    assert "PASS min_cosine" in r.output


def test_search_refuses_float_recipes_and_runs_on_the_target(cnn_files, tmp_path):
    out = tmp_path / "s.onnx"
    r = cli("quantize", cnn_files["model"], "--data", cnn_files["calib"], "--eval-data", cnn_files["eval"],
            "--min-cosine", 0.9, "--weights", "int4", "-o", out)
    assert r.exit_code == 2 and "--weights int4" in r.output and not out.exists()
    r = cli("quantize", cnn_files["model"], "--data", cnn_files["calib"], "--eval-data", cnn_files["eval"],
            "--min-cosine", 0.5, "--target", "trt", "--no-speed", "-o", out)
    assert r.exit_code == 0, r.output
    if runtime.unavailable("TensorrtExecutionProvider"):
        assert "warning: TensorrtExecutionProvider unavailable" in r.output
    import onnx
    assert onnx.load(str(out)).graph.node  # written


def test_trt_rejects_qoperator_and_dynamic(cnn_files, tmp_path):
    for extra in (("--format", "qoperator"), ("--mode", "dynamic")):
        r = cli("quantize", cnn_files["model"], *(("--table", cnn_files["table"]) if extra[0] == "--format" else ()),
                "--target", "trt", *extra, "-o", tmp_path / "x.onnx")
        assert r.exit_code == 2 and "--target trt" in r.output, r.output


def test_trt_on_cpu_computes_qdq_as_written(tmp_path):
    """A TensorRT-placed model evaluated on the CPU EP (TensorRT absent): the CPU QDQ fusions are off, so
    the figure is the Q/DQ arithmetic TensorRT computes, not the CPU's fused kernels."""
    if not runtime.unavailable("TensorrtExecutionProvider"):
        pytest.skip("TensorRT is usable here")
    out = tmp_path / "trt.onnx"
    r = cli("quantize", SAMPLE, "--target", "trt", "--data", "calibration/fashion-mnist/calib.npz", "-o", out)
    assert r.exit_code == 0, r.output
    choice = runtime.pick_provider("trt")
    assert runtime.emulates(choice)
    sess = runtime.target_session(str(out), choice)
    plain = runtime.session(str(out))
    x = np.load("calibration/fashion-mnist/eval.npz")["input"][:64]
    name = sess.get_inputs()[0].name
    # by hand: Q/DQ as written on an unoptimised session gives the same numbers as the emulating session
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    written = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    emulated, fused = sess.run(None, {name: x})[0], plain.run(None, {name: x})[0]
    # other rewrites (Conv+Relu, Gemm) still run, so a value may land one quantization step away
    np.testing.assert_allclose(emulated, written, rtol=0.01, atol=0.05)
    assert np.abs(emulated - written).mean() <= np.abs(fused - written).mean()
    r = cli("eval", SAMPLE, out, "--data", "calibration/fashion-mnist/eval.npz", "--repeats", 2, "--target", "trt")
    assert r.exit_code == 0 and "CPU QDQ fusions off" in r.output, r.output
    r = cli("quantize", SAMPLE, "--target", "trt", "--data", "calibration/fashion-mnist/calib.npz", "--eval-data",
            "calibration/fashion-mnist/eval.npz", "--min-speedup", 1, "-o", tmp_path / "s.onnx")
    assert r.exit_code == 2 and "judged on the target's EP" in r.output


def test_cosine_of_a_zeroed_candidate_row_is_zero():
    from qtool.evaluation import OutputStats
    s = OutputStats("y")
    ref = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]], np.float32)
    cand = np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    s.update(ref, cand)
    assert s.result().cosine == pytest.approx(2 / 3)


def test_eval_refuses_a_speed_gate_on_a_fallen_back_target(cnn_files, tmp_path):
    if not runtime.unavailable("CUDAExecutionProvider"):
        pytest.skip("CUDA is usable here")
    out = tmp_path / "q.onnx"
    assert cli("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", out).exit_code == 0
    r = cli("eval", cnn_files["model"], out, "--data", cnn_files["eval"], "--target", "cuda", "--min-speedup", 1)
    assert r.exit_code == 2 and "judged on the target's EP" in r.output


def test_inspect_trt_offers_no_int4(tmp_path):
    path = models.save(models.matmul_mlp(), tmp_path / "mlp.onnx")
    rows = json.loads(cli("inspect", path, "--target", "trt", "--json").output)["target"]["nodes"]
    assert not any(n["choose"].startswith("int4") for n in rows)


@pytest.mark.parametrize("recipe", [("--weights", "int4"), ("--mode", "dynamic"), ("--target", "cuda")])
def test_nodes_out_of_topological_order_are_sorted(tmp_path, recipe):
    """Some converters (onnxruntime's fp16 converter among them) append nodes out of order;
    onnxruntime runs such models, and qtool must quantize them rather than report its own bug."""
    import onnx
    m = models.matmul_mlp()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    src = models.save(m, tmp_path / "unsorted.onnx")
    before = (tmp_path / "unsorted.onnx").read_bytes()
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, *recipe, "-o", out)
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert (tmp_path / "unsorted.onnx").read_bytes() == before
    feeds = models.random_inputs(models.matmul_mlp(), 4)
    want = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 0.2 * np.abs(want).max()


@pytest.mark.parametrize("args,flag", [
    (("--weights", "int4", "--keep-fp32", "Relu"), "--keep-fp32"),
    (("--weights", "int4", "--per-tensor"), "--per-channel"),
    (("--weights", "fp16", "--block-size", "64"), "--block-size"),
    (("--target", "cuda", "--int4-method", "hqq"), "--int4-method"),
    (("--weights", "int4", "--target", "trt"), "MatMulNBits is no TensorRT layer"),
    (("--data", "calibration/fashion-mnist/calib.npz", "--keep-io-types", "false"), "--keep-io-types"),
])
def test_flags_a_recipe_would_ignore_are_refused(tmp_path, args, flag):
    out = tmp_path / "x.onnx"
    r = cli("quantize", SAMPLE, *args, "-o", out)
    assert r.exit_code == 2 and flag in r.output and not out.exists(), r.output


def test_cuda_int4_takes_the_fp16_flags(tmp_path):
    r = cli("quantize", SAMPLE, "--target", "cuda", "--weights", "int4", "--keep-fp32", "Relu",
            "--keep-io-types", "false", "-o", tmp_path / "x.onnx")
    assert r.exit_code == 0 and "inputs and outputs fp16" in r.output, r.output
