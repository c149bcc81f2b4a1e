"""The error contract: bad input is one `error:` line, exit 2, and no output file; nothing is lost."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from qtool import model as model_io
from qtool.cli import main
from qtool.config import load_preset
from qtool.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "calibration" / "fashion-mnist"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(r, out: Path, needle: str):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert needle in r.output, r.output
    assert not out.exists()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("t")
    r = cli("calibrate", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "-o", d / "t.json")
    assert r.exit_code == 0, r.output
    return json.loads((d / "t.json").read_text())


def first_tensor(d):
    return next(iter(d["tensors"].values()))


@pytest.mark.parametrize("edit, needle", [
    (lambda d: first_tensor(d).update(range=[float("nan"), 1.0]), "finite number"),
    (lambda d: first_tensor(d).update(range=[0.0, float("inf")]), "finite number"),
    (lambda d: first_tensor(d).update(range=[2.0, 1.0]), "inverted range"),
    (lambda d: first_tensor(d).update(range=[0.0]), "range must be [lo, hi]"),
    (lambda d: first_tensor(d).update(range=["0", "1"]), "finite number"),
    (lambda d: first_tensor(d).update(min=True), "finite number"),
    (lambda d: d.update(format_version="1"), "format_version must be a positive integer"),
    (lambda d: d.update(format_version=0), "format_version must be a positive integer"),
    (lambda d: d.update(tensors=list(d["tensors"].values())), "not a list"),
    (lambda d: d.update(method="kl"), "unknown method 'kl'"),
    (lambda d: first_tensor(d).pop("count"), "missing 'count'"),
])
def test_malformed_table_is_a_clear_error(table, tmp_path, edit, needle):
    data = json.loads(json.dumps(table))
    edit(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    out = tmp_path / "q.onnx"
    assert_user_error(cli("quantize", SAMPLE / "model.onnx", "--table", tmp_path / "bad.json", "-o", out), out, needle)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_table_never_crashes(table, tmp_path_factory, data):
    """Random corruptions of a valid table: exit 0 or 2, never a traceback, never exit 3."""
    text = json.dumps(table)
    cut = data.draw(st.integers(0, len(text) - 1))
    junk = data.draw(st.sampled_from(["", "0", "-1", "null", "[]", "{}", "\"x\"", "1e999", "NaN", "true", ","]))
    width = data.draw(st.integers(0, 8))
    d = tmp_path_factory.mktemp("fuzz")
    (d / "t.json").write_text(text[:cut] + junk + text[cut + width:])
    out = d / "q.onnx"
    r = cli("quantize", SAMPLE / "model.onnx", "--table", d / "t.json", "-o", out)
    assert r.exit_code in (0, 2), r.output
    assert r.exit_code == 0 or (not out.exists() and r.output.startswith("error: "))


def test_output_that_is_a_directory(tmp_path):
    r = cli("quantize", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "-o", tmp_path)
    assert r.exit_code == 2 and "is a directory" in r.output


def test_save_plan_onto_the_input_model(tmp_path):
    out = tmp_path / "q.onnx"
    r = cli("quantize", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "-o", out,
            "--save-plan", SAMPLE / "model.onnx")
    assert_user_error(r, out, "is the input file")


def test_table_with_dynamic_mode(table, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(table))
    out = tmp_path / "q.onnx"
    r = cli("quantize", SAMPLE / "model.onnx", "--mode", "dynamic", "--table", tmp_path / "t.json", "-o", out)
    assert_user_error(r, out, "uses no calibration")


def test_dynamic_mode_with_nothing_to_quantize(tmp_path):
    src = models.save(models.log_then_conv(), tmp_path / "conv.onnx")
    out = tmp_path / "q.onnx"
    assert_user_error(cli("quantize", src, "--mode", "dynamic", "-o", out), out, "static mode")


def test_preset_with_zero_threads(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[eval]\nthreads = 0\n")
    with pytest.raises(ConfigError, match="eval.threads"):
        load_preset(p)


def test_outputs_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "q.onnx"
        r = cli("quantize", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "-o", out, "--save-plan",
                tmp_path / "p.json")
        assert r.exit_code == 0, r.output
        for f in (out, tmp_path / "p.json"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, oct(f.stat().st_mode)
    finally:
        os.umask(old)


def test_interrupted_write_leaves_no_temporary_and_keeps_the_old_output(monkeypatch, tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    real = os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt  # what SIGTERM becomes under the CLI's handler

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model_io.atomic_write_bytes(out, b"new")
    monkeypatch.setattr(os, "replace", real)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_killed_writes_leave_recognisable_temporaries_that_the_next_write_removes(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: never a running process
    stale = tmp_path / f"{model_io.TEMP_PREFIX}{dead}-q.onnx.abc.tmp"
    stale.write_bytes(b"partial")
    stale_dir = tmp_path / f"{model_io.TEMP_PREFIX}{dead}-xyz"
    stale_dir.mkdir()
    (stale_dir / "q.onnx.data").write_bytes(b"partial")
    live = tmp_path / f"{model_io.TEMP_PREFIX}{os.getppid()}-other.onnx.abc.tmp"  # a write still running
    live.write_bytes(b"in progress")
    model_io.atomic_write_bytes(tmp_path / "table.json", b"{}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["table.json", live.name]), names


@pytest.mark.parametrize("shape, needle", [("nope:1x1x28x28", "no input of that name"),
                                           ("input:1x1x28", "rank 3"), ("input:1x3x28x28", "dim 1 is fixed at 1")])
def test_bad_shape_for_inspect(shape, needle):
    r = cli("inspect", SAMPLE / "model.onnx", "--shape", shape)
    assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output


@pytest.mark.parametrize("labels, needle", [(np.linspace(0, 9, 64), "integer class indices"),
                                            (np.arange(64) - 1, ">= 0"), (np.arange(64) + 5, "outside the model's 10")])
def test_bad_labels(labels, needle, tmp_path):
    x = np.load(SAMPLE / "eval.npz")["input"][:64]
    np.savez(tmp_path / "d.npz", input=x, labels=labels)
    report = tmp_path / "r.json"
    r = cli("eval", SAMPLE / "model.onnx", SAMPLE / "model.onnx", "--data", tmp_path / "d.npz", "--json", report)
    assert_user_error(r, report, needle)


def test_pickled_or_forged_npz_members(tmp_path):
    import struct
    import zipfile
    np.savez(tmp_path / "pickle.npz", input=np.array([{"a": 1}] * 4, dtype=object))
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 1, 28, 28), }"
    header = header + " " * (118 - len(header)) + "\n"
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("input.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64))
    for name, needle in (("pickle.npz", "Python objects"), ("bomb.npz", "truncated or forged")):
        out = tmp_path / "t.json"
        assert_user_error(cli("calibrate", SAMPLE / "model.onnx", "--data", tmp_path / name, "-o", out), out, needle)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_npz_never_crashes(tmp_path_factory, data):
    """Random byte corruptions of a valid .npz: exit 0 or 2, never a traceback, never exit 3."""
    d = tmp_path_factory.mktemp("npz")
    x = np.load(SAMPLE / "calib.npz")["input"][:8]
    np.savez(d / "ok.npz", input=x)
    raw = bytearray((d / "ok.npz").read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(raw) // 2, len(raw)))
    (d / "bad.npz").write_bytes(bytes(raw[:cut]))
    out = d / "t.json"
    r = cli("calibrate", SAMPLE / "model.onnx", "--data", d / "bad.npz", "-o", out)
    assert r.exit_code in (0, 2), r.output
    assert r.exit_code == 0 or (not out.exists() and r.output.startswith("error: "))


def test_onnxruntime_failure_names_the_node(tmp_path):
    """A model that cannot run on the data, not even one sample at a time: one line naming the node."""
    from onnx import parser
    m = parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    r (float[N, 4] x) => (float[M] y) {
        s = Constant <value = int64[1] {5}> ()
        y = Reshape (x, s)
    }
    """)
    src = models.save(m, tmp_path / "r.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((8, 4), np.float32))
    out = tmp_path / "t.json"
    r = cli("calibrate", src, "--data", tmp_path / "d.npz", "-o", out)
    assert_user_error(r, out, "Reshape node")
    assert "cannot be reshaped" in r.output and ".cc:" not in r.output and ".h:" not in r.output


def test_a_model_qtool_writes_wrong_is_exit_3(monkeypatch, tmp_path):
    """onnx's checker rejecting qtool's own output is qtool's bug: exit 3, and no file is written."""
    from qtool.rewrite import qdq
    real = qdq.apply

    def broken(model, plan):
        out = real(model, plan)
        out.graph.node.reverse()  # no longer topologically sorted
        return out

    monkeypatch.setattr(qdq, "apply", broken)
    out = tmp_path / "q.onnx"
    r = cli("quantize", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "-o", out)
    assert r.exit_code == 3 and "fails onnx.checker" in r.output and not out.exists(), r.output


def test_blocked_ops_are_named_with_their_reason(tmp_path):
    """ConvTranspose, Einsum (and LSTM/GRU, control flow): inspect and --explain say why they stay float."""
    from onnx import parser
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    b (float[N, 4, 8, 8] x) => (float[N, 4, 16, 16] y, float[N, 4] e) {
        y = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (x, w)
        e = Einsum <equation = "bchw,bchw->bc"> (x, x)
    }
    """
    src = models.save(models._with_weights(text, {"w": np.random.default_rng(0).normal(size=(4, 4, 2, 2))}),
                      tmp_path / "b.onnx")
    r = cli("inspect", src)
    assert r.exit_code == 0, r.output
    assert "1 ConvTranspose node(s) stay float (ConvTranspose(y)): onnxruntime 1.31's CPU EP fuses no QDQ " \
        "ConvTranspose" in r.output
    assert "1 Einsum node(s) stay float (Einsum(e)): no integer Einsum kernel" in r.output
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).normal(size=(4, 4, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out)
    assert_user_error(r, out, "nothing to quantize")
    assert "fuses no QDQ ConvTranspose" in r.output and "no integer Einsum kernel" in r.output
