"""Target sessions where no GPU can check them: what eval, debug and the search ask of
onnxruntime on the TensorRT EP (which compiles the graph into engines, so onnxruntime cannot save
its optimised graph), a session that onnxruntime moves to the CPU EP during the runs, and a
TensorRT target emulated on the CPU EP, whose kernel counts and placement describe the graph
that really ran (QDQ fusions off)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import models
from qtool import runtime
from qtool.cli import main

SAMPLE = "calibration/fashion-mnist/"
TRT = "TensorrtExecutionProvider"


@pytest.fixture(autouse=True)
def fresh_probe():
    runtime._UNAVAILABLE.clear()
    yield
    runtime._UNAVAILABLE.clear()


def test_placement_profile_saves_no_optimised_graph(monkeypatch):
    """onnxruntime fails a session that is asked to save a graph with compiled nodes ('Unable to
    serialize model as it contains compiled nodes', inference_session.cc): on the TensorRT EP eval's
    placement profile would exit 2. It needs the profile only, and forwards the disabled fusions."""
    from qtool.profile import node_placement
    seen = []
    real = runtime._session

    def spy(source, opts, providers, disabled=()):
        seen.append((opts.optimized_model_filepath, tuple(disabled)))
        return real(source, opts, providers, disabled)
    monkeypatch.setattr(runtime, "_session", spy)
    m = models.small_cnn()
    feeds = {m.graph.input[0].name: np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)}
    placed = node_placement(m, "CPUExecutionProvider", feeds, disabled=runtime.QDQ_FUSIONS)
    assert seen == [("", runtime.QDQ_FUSIONS)]
    assert list(placed) == ["CPUExecutionProvider"]


def test_kernel_counts_on_tensorrt_builds_no_engine(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("a session was built")
    monkeypatch.setattr(ort, "InferenceSession", refuse)
    path = models.save(models.small_cnn(), tmp_path / "m.onnx")
    counts, note = runtime.kernel_counts(path, TRT)
    assert counts is None and "TensorRT" in note and "\n" not in note


def test_search_does_not_profile_nodes_on_tensorrt(monkeypatch):
    """The speed rounds profile each node with its optimised graph saved: not on the TensorRT EP."""
    from qtool import profile, search
    monkeypatch.setattr(runtime, "pick_provider", lambda name: runtime.ProviderChoice("trt", TRT, None))

    def refuse(*a, **k):
        raise AssertionError("node_costs called on the TensorRT EP")
    monkeypatch.setattr(profile, "node_costs", refuse)
    final = SimpleNamespace(speed=SimpleNamespace(median=0.5), extra=(), plan=SimpleNamespace(nodes=()))
    sopts = search.SearchOptions(search.Thresholds(min_speedup=1.2), provider="trt")
    lines = []
    nodes, best, reasons = search._speed_phase(None, None, ["a"], final, None, None, sopts, lines.append, True)
    assert best is final and nodes == ["a"] and reasons == {}
    assert any("TensorRT" in line for line in lines)


class _Switching:
    """A real CPU session that says it is on CUDA until its first run, then on the CPU EP, as
    onnxruntime's Python API reports a session it moved to its fallback providers after an EP failure."""

    def __init__(self, sess):
        self.sess, self.ran = sess, False

    def get_providers(self):
        return ["CPUExecutionProvider"] if self.ran else ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run(self, *a, **k):
        self.ran = True
        return self.sess.run(*a, **k)

    def __getattr__(self, name):
        return getattr(self.sess, name)


def test_eval_reports_the_ep_a_session_finished_on(monkeypatch, cnn_files, tmp_path):
    import qtool
    from qtool.config import EvalOptions
    real, cpu = runtime.target_session, runtime.ProviderChoice("cpu", "CPUExecutionProvider", None)
    monkeypatch.setattr(runtime, "pick_provider",
                        lambda name: runtime.ProviderChoice("cuda", "CUDAExecutionProvider", None))
    monkeypatch.setattr(runtime, "target_session",
                        lambda model, choice, threads=None: _Switching(real(model, cpu, threads)))
    report = qtool.evaluate(cnn_files["model"], cnn_files["model"], cnn_files["eval"],
                            options=EvalOptions(provider="cuda", repeats=2), limit=16)
    assert report.provider == "CPUExecutionProvider"
    assert any("left CUDAExecutionProvider during the runs" in n and "finished on CPUExecutionProvider" in n
               for n in report.notes)


def test_emulated_tensorrt_counts_the_graph_that_ran(tmp_path):
    """A TensorRT target on the CPU EP runs with the CPU QDQ fusions off; the kernel counts and the
    placement in the report are of that graph (the Q/DQ around the sample's MaxPools stay), not of the
    fused one the CPU target would run."""
    if not runtime.unavailable(TRT):
        pytest.skip("TensorRT is usable here")
    out = tmp_path / "trt.onnx"
    cli = CliRunner()
    r = cli.invoke(main, ["quantize", SAMPLE + "model.onnx", "--target", "trt", "--data", SAMPLE + "calib.npz",
                          "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = tmp_path / "r.json"
    r = cli.invoke(main, ["eval", SAMPLE + "model.onnx", str(out), "--data", SAMPLE + "eval.npz", "--limit", "64",
                          "--repeats", "2", "--target", "trt", "--json", str(report)])
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())

    def optimised(disabled):
        opts = runtime.session_options(1, True, str(tmp_path / "opt.onnx"))
        ort.InferenceSession(str(out), sess_options=opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(disabled))
        return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    ran, fused = optimised(runtime.QDQ_FUSIONS), optimised(())
    assert ran.count("QuantizeLinear") != fused.count("QuantizeLinear")  # the two graphs differ here
    placed = data["placement_candidate"]["CPUExecutionProvider"]
    assert placed["QuantizeLinear"] == ran.count("QuantizeLinear")
    assert placed["DequantizeLinear"] == ran.count("DequantizeLinear")
    assert data["kernels_candidate"]["quantize"] == ran.count("QuantizeLinear")


def test_debug_sessions_take_the_emulations_disabled_fusions(monkeypatch, cnn_files, tmp_path):
    """debug --target trt without TensorRT measures as eval does (the CLI passes runtime.QDQ_FUSIONS
    when runtime.emulates the choice): every measuring session leaves them out."""
    import qtool
    from qtool import debug
    q = tmp_path / "q.onnx"
    qtool.quantize(cnn_files["model"], q, table=cnn_files["table"])
    seen = []
    real = runtime.session

    def spy(model, provider=runtime.PROVIDERS["cpu"], threads=None, optimize=True, optimized_path=None, disabled=()):
        seen.append(tuple(disabled))
        return real(model, provider, threads, optimize, optimized_path, disabled)
    monkeypatch.setattr(runtime, "session", spy)
    report = debug.run(cnn_files["model"], q, cnn_files["eval"], limit=8, impact=True, disabled=runtime.QDQ_FUSIONS)
    assert report.nodes and len(seen) >= 4 and set(seen) == {runtime.QDQ_FUSIONS}
