"""Models whose weights stay on disk (over 2 GB, external data): everything goes by path.

The fast tests lower ``qtool.model.LARGE_MODEL_BYTES`` (or ``SERIALIZE_LIMIT``) so that a small
model takes the path a 2 GB one takes, and require the same bytes as the in-memory path. The
slow test builds a 2.28 GB model (benchmarks/make_large_model.py) and runs the CLI on it.
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import models
import qtool
from qtool import model as model_io
from qtool import runtime
from qtool.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import make_large_model  # noqa: E402


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The 2 GB model's graph at width 32: 2 blocks, 4 MatMuls, every weight in model.onnx.data."""
    d = tmp_path_factory.mktemp("large")
    return make_large_model.build(d, dim=32, blocks=2, seq=4)


def run_all(model: Path, out: Path) -> dict[str, str]:
    """calibrate, quantize (QDQ, QOperator, dynamic, QDQ with external data) and eval through the CLI."""
    out.mkdir()
    d = model.parent
    steps = [("calibrate", model, "--data", d / "calib.npz", "-o", out / "t.json"),
             ("quantize", model, "--table", out / "t.json", "-o", out / "qdq.onnx", "--save-plan", out / "p.json"),
             ("quantize", model, "--table", out / "t.json", "--format", "qoperator", "-o", out / "qop.onnx"),
             ("quantize", model, "--mode", "dynamic", "-o", out / "dyn.onnx"),
             ("quantize", model, "--table", out / "t.json", "--external-data", "-o", out / "ext.onnx"),
             ("quantize", model, "--plan", out / "p.json", "-o", out / "again.onnx"),
             ("eval", model, out / "qdq.onnx", "--data", d / "eval.npz", "--repeats", "1")]
    for step in steps:
        r = cli(*step)
        assert r.exit_code == 0, (step, r.output)
    return {p.name: digest(p) for p in sorted(out.iterdir())}


def test_weights_stay_on_disk_and_everything_goes_by_path(small, tmp_path, monkeypatch):
    """Same table and same bytes as the in-memory path; onnx never gets a model proto to
    serialize (shape inference by path), onnxruntime never gets bytes, nothing left behind."""
    expected = run_all(small, tmp_path / "in-memory")
    monkeypatch.setattr(model_io, "LARGE_MODEL_BYTES", 0)
    loaded = model_io.load(small)
    assert model_io.has_external_data(loaded) and model_io.by_path(loaded)
    assert model_io.inline_bytes(loaded) < 64  # only the three GELU constants are held in memory

    def in_memory(*a, **k):
        raise AssertionError("shape inference on a proto: must go by path")

    real_session, real_path = ort.InferenceSession, onnx.shape_inference.infer_shapes_path
    sources, inferred = [], []

    def session(source, *a, **k):
        sources.append(source)
        return real_session(source, *a, **k)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", in_memory)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", lambda *a, **k: inferred.append(a) or real_path(*a, **k))
    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    got = run_all(small, tmp_path / "by-path")
    assert got == expected
    assert inferred and sources and all(isinstance(s, str) for s in sources)
    assert any(Path(s).parent == small.parent and Path(s).name.startswith(model_io.TEMP_PREFIX) for s in sources)
    assert not list(small.parent.glob(model_io.TEMP_PREFIX + "*"))
    assert not list(Path(tempfile.gettempdir()).glob(f"{model_io.TEMP_PREFIX}{os.getpid()}-*"))


def test_plan_of_a_model_on_disk(small, monkeypatch):
    """Shapes are known, so every MatMul is planned as on a model held in memory."""
    from qtool.config import QuantizeOptions
    monkeypatch.setattr(model_io, "LARGE_MODEL_BYTES", 0)
    for options in (QuantizeOptions(), QuantizeOptions(mode="dynamic")):
        plan = qtool.plan(small, options=options)
        matmuls = [n for n in plan.nodes if n.op_type == "MatMul"]
        assert len(matmuls) == 4 and all(n.quantized for n in matmuls), [n.reason for n in matmuls]
        assert not any("float32" in n.reason for n in plan.nodes)


def test_read_only_folder(small, tmp_path, monkeypatch):
    """A folder qtool may not write into: onnxruntime gets the graph alone from memory and reads
    the weights from that folder."""
    monkeypatch.setattr(model_io, "LARGE_MODEL_BYTES", 0)
    real = os.access
    folder = small.parent.resolve()
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p).resolve() == folder else real(p, mode, **k))
    real_session, sources = ort.InferenceSession, []
    monkeypatch.setattr(runtime.ort, "InferenceSession", lambda src, *a, **k: sources.append(src) or real_session(src, *a, **k))
    r = cli("calibrate", small, "--data", small.parent / "calib.npz", "-o", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    assert len(sources) == 1 and isinstance(sources[0], bytes) and len(sources[0]) < 64 * 1024  # the graph alone
    assert not list(small.parent.glob(model_io.TEMP_PREFIX + "*"))


def test_interrupted_session_leaves_no_temporary(small, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "LARGE_MODEL_BYTES", 0)

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # what SIGTERM becomes under the CLI's handler

    monkeypatch.setattr(runtime.ort, "InferenceSession", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qtool.calibrate(small, small.parent / "calib.npz")
    assert not list(small.parent.glob(model_io.TEMP_PREFIX + "*"))


def test_failed_check_by_path_writes_nothing(small, tmp_path, monkeypatch):
    """The checker runs on the written file before it is renamed into place."""
    from qtool import check
    monkeypatch.setattr(model_io, "LARGE_MODEL_BYTES", 0)
    seen = []

    def failing(model, path=None):
        seen.append(path)
        raise check.InternalError("internal error: checker says no")

    monkeypatch.setattr(check, "check_quantized", failing)
    out = tmp_path / "q.onnx"
    r = cli("quantize", small, "--mode", "dynamic", "--external-data", "-o", out)
    assert r.exit_code == 3, r.output
    assert seen and seen[0] is not None and Path(seen[0]).name == "q.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("on_disk", [True, False])
def test_missing_or_short_data_file(tmp_path, monkeypatch, on_disk):
    model = make_large_model.build(tmp_path / "m", dim=32, blocks=1, seq=4)
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    if on_disk:
        monkeypatch.setattr(model_io, "LARGE_MODEL_BYTES", 0)
    out = tmp_path / "q.onnx"
    r = cli("quantize", model, "--mode", "dynamic", "-o", out)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and "model.onnx" in r.output and not out.exists()


def test_model_over_the_serialize_limit_held_in_memory(tmp_path, monkeypatch):
    """A model whose weights sit in the proto but are too big to serialize: shape inference
    sees them as external (no bytes written), onnxruntime reads them from a temporary data
    file, the result is checked by path; the same bytes as the ordinary path."""
    m = models.small_cnn()
    path = models.save(m, tmp_path / "cnn.onnx")
    np.savez(tmp_path / "c.npz", **models.random_inputs(m, 16, seed=1))
    expected = qtool.calibrate(path, tmp_path / "c.npz")
    qtool.quantize(path, tmp_path / "a.onnx", table=expected)
    monkeypatch.setattr(model_io, "SERIALIZE_LIMIT", 0)
    monkeypatch.setattr(model_io, "INLINE_LIMIT", 256)
    assert model_io.by_path(model_io.load(path))
    got = qtool.calibrate(path, tmp_path / "c.npz")
    assert json.dumps(got.ranges(), sort_keys=True) == json.dumps(expected.ranges(), sort_keys=True)
    qtool.quantize(path, tmp_path / "b.onnx", table=got)
    assert digest(tmp_path / "a.onnx") == digest(tmp_path / "b.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "c.npz", "cnn.onnx"]


# -- the real thing ---------------------------------------------------------------------------

def _step(args: list, budget: float | None, size: int) -> str:
    """Run ``qtool *args`` in its own process; return its output; check its peak RSS against
    ``budget`` x the model's size."""
    proc = subprocess.Popen([sys.executable, "-c", "from qtool.cli import main; main()", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (args, out)
    peak = usage.ru_maxrss * 1024
    if budget is not None:
        assert peak < budget * size, f"{args[0]}: peak RSS {peak / size:.2f}x the model's size"
    return out


@pytest.mark.slow
def test_model_over_2gb_end_to_end():
    """2.28 GB of float32 weights in external data (34 MatMuls): calibrate, quantize static
    (QDQ, QOperator) and dynamic, eval; every MatMul quantized; quantize under 2.5x the model's
    size in memory; outputs close to fp32 in onnxruntime. ~2 minutes and ~4 GB of disk here."""
    with tempfile.TemporaryDirectory(prefix="qtool-large-") as tmp:
        tmp = Path(tmp)
        model = make_large_model.build(tmp / "model")
        size = make_large_model.model_bytes(model)
        assert size > 2 * 1024**3
        d = model.parent
        _step(["calibrate", model, "--data", d / "calib.npz", "-o", tmp / "t.json"], None, size)
        out = _step(["quantize", model, "--table", tmp / "t.json", "-o", tmp / "qdq.onnx",
                     "--save-plan", tmp / "p.json"], 2.5, size)
        assert "34 of 188 nodes quantized" in out, out
        plan = json.loads((tmp / "p.json").read_text())
        matmuls = [n for n in plan["nodes"] if n["op_type"] == "MatMul"]
        assert len(matmuls) == 34 and all(n["precision"] != "float" for n in matmuls), \
            [n["reason"] for n in matmuls][:3]
        assert "not float32" not in (tmp / "p.json").read_text()
        _step(["quantize", model, "--table", tmp / "t.json", "--format", "qoperator", "-o", tmp / "qop.onnx"], 2.5, size)
        out = _step(["quantize", model, "--mode", "dynamic", "-o", tmp / "dyn.onnx"], 2.5, size)
        assert "68 of 188 nodes quantized" in out, out
        out = _step(["eval", model, tmp / "qdq.onnx", "--data", d / "eval.npz", "--batch-size", "1",
                     "--repeats", "2"], None, size)
        assert "cosine" in out, out
        assert not list(d.glob(model_io.TEMP_PREFIX + "*")) and not list(tmp.glob(model_io.TEMP_PREFIX + "*"))
        x = np.load(d / "eval.npz")["x"][:2]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        ref = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        for name in ("qdq.onnx", "qop.onnx", "dyn.onnx"):
            got = ort.InferenceSession(str(tmp / name), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
            assert cos > 0.99 and np.abs(got - ref).max() < 0.1 * np.abs(ref).max(), (name, cos)
