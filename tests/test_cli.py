"""The CLI through click's CliRunner, bad inputs included: one line, non-zero exit, no output left."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import models
from qtool.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def one_line_error(result, code=2, *needles):
    assert result.exit_code == code, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    lines = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, text
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_help_is_fast_and_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("inspect", "calibrate", "quantize", "eval"):
        assert cmd in r.output
        assert invoke(cmd, "--help").exit_code == 0


def test_help_imports_no_heavy_modules():
    import subprocess
    import sys
    code = ("import sys; from qtool.cli import main; from click.testing import CliRunner; "
            "CliRunner().invoke(main, ['quantize', '--help']); "
            "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_end_to_end(cnn_files, tmp_path):
    f = cnn_files
    r = invoke("inspect", f["model"])
    assert r.exit_code == 0 and "MACs" in r.output and "quantizable" in r.output
    table = tmp_path / "t.json"
    r = invoke("calibrate", f["model"], "--data", f["calib"], "-o", table, "--batch-size", 16)
    assert r.exit_code == 0, r.output
    data = json.loads(table.read_text())
    assert data["format_version"] == 1 and data["samples"] == 48 and data["method"] == "minmax"
    out = tmp_path / "q.onnx"
    r = invoke("quantize", f["model"], "--table", table, "-o", out, "--explain")
    assert r.exit_code == 0, r.output
    assert "fused into" in r.output and out.exists()
    report = tmp_path / "r.json"
    r = invoke("eval", f["model"], out, "--data", f["eval"], "--json", report, "--repeats", 3,
               "--min-cosine", 0.99)
    assert r.exit_code == 0, r.output
    assert "speedup" in r.output and json.loads(report.read_text())["passed"] is True


def test_gate_failure_exit_1_names_threshold(cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    assert invoke("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", out).exit_code == 0
    r = invoke("eval", cnn_files["model"], out, "--data", cnn_files["eval"], "--repeats", 2,
               "--min-cosine", 1.0, "--max-drop", -0.5)
    assert r.exit_code == 1
    assert "FAIL min_cosine" in r.output and "would have passed" in r.output
    assert "FAIL max_drop" in r.output


def test_quantize_from_data_with_preset(cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    r = invoke("quantize", cnn_files["model"], "--data", cnn_files["calib"], "-o", out,
               "--config", "configs/per-tensor-uint8.toml")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("content", [b"", b"hello, I am text\n", "truncate"])
def test_not_an_onnx_file(cnn_files, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    if content == "truncate":
        content = cnn_files["model"].read_bytes()[:200]
    bad.write_bytes(content)
    out = tmp_path / "q.onnx"
    for args in (("inspect", bad), ("calibrate", bad, "--data", cnn_files["calib"], "-o", tmp_path / "t.json"),
                 ("quantize", bad, "--data", cnn_files["calib"], "-o", out)):
        one_line_error(invoke(*args), 2, str(bad))
    assert not out.exists() and not (tmp_path / "t.json").exists()


def test_missing_paths(cnn_files, tmp_path):
    one_line_error(invoke("inspect", tmp_path / "nope.onnx"), 2, "no such file")
    one_line_error(invoke("quantize", cnn_files["model"], "--data", tmp_path / "nope.npz", "-o", tmp_path / "q.onnx"),
                   2, "no such file")
    one_line_error(invoke("quantize", cnn_files["model"], "--table", cnn_files["table"],
                          "-o", tmp_path / "missing" / "q.onnx"), 2, "does not exist")


def test_output_equal_to_input(cnn_files):
    before = cnn_files["model"].read_bytes()
    one_line_error(invoke("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", cnn_files["model"]),
                   2, "input")
    assert cnn_files["model"].read_bytes() == before


def _data(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "no array for model input 'x'"),
    ("extra", "'z' is not a model input"),
    ("shape", "[4, 3, 8, 8]"),
    ("rank", "rank 3"),
    ("dtype", "float64"),
    ("nan", "NaN"),
    ("inf", "Inf"),
    ("empty", "empty"),
])
def test_bad_data(cnn_files, tmp_path, case, needle):
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    arrays = {
        "missing": {"y": x},
        "extra": {"x": x, "z": x},
        "shape": {"x": x[:, :, :8, :8]},
        "rank": {"x": x[:, 0]},
        "dtype": {"x": x.astype(np.float64)},
        "nan": {"x": np.where(x > 2, np.nan, x).astype(np.float32)},
        "inf": {"x": np.where(x > 2, np.inf, x).astype(np.float32)},
        "empty": {"x": x[:0]},
    }[case]
    data = _data(tmp_path, **arrays)
    out, table = tmp_path / "q.onnx", tmp_path / "t.json"
    one_line_error(invoke("calibrate", cnn_files["model"], "--data", data, "-o", table), 2, needle)
    one_line_error(invoke("quantize", cnn_files["model"], "--data", data, "-o", out), 2, needle)
    assert not out.exists() and not table.exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_table_for_another_model(cnn_files, tmp_path):
    other = models.save(models.small_cnn(seed=9), tmp_path / "other.onnx")
    one_line_error(invoke("quantize", other, "--table", cnn_files["table"], "-o", tmp_path / "q.onnx"),
                   2, "another model")


def test_bad_table_and_preset(cnn_files, tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    one_line_error(invoke("quantize", cnn_files["model"], "--table", bad, "-o", tmp_path / "q.onnx"), 2, "not JSON")
    preset = tmp_path / "p.toml"
    preset.write_text("[quantize]\nper_chanel = true\n")
    one_line_error(invoke("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", tmp_path / "q.onnx",
                          "--config", preset), 2, "per_chanel")


def test_bad_shape_option(cnn_files):
    one_line_error(invoke("inspect", cnn_files["model"], "--shape", "x:1xfoo"), 2, "--shape")


def test_task_hook_and_gate(cnn_files, tmp_path):
    task = tmp_path / "task.py"
    task.write_text(
        "import numpy as np\n"
        "NAME = 'mean logit'\n"
        "def reduce(outputs, batch):\n    return outputs['logits'].mean(axis=1)\n"
        "def score(rows):\n    return float(rows.mean())\n")
    out = tmp_path / "q.onnx"
    assert invoke("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", out).exit_code == 0
    r = invoke("eval", cnn_files["model"], out, "--data", cnn_files["eval"], "--repeats", 2, "--task", task,
               "--max-task-drop", -100)
    assert r.exit_code == 1 and "mean logit" in r.output and "FAIL max_task_drop" in r.output
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    one_line_error(invoke("eval", cnn_files["model"], out, "--data", cnn_files["eval"], "--task", bad), 2, "reduce")


def test_cuda_request_is_honest(cnn_files, tmp_path):
    out = tmp_path / "q.onnx"
    assert invoke("quantize", cnn_files["model"], "--table", cnn_files["table"], "-o", out).exit_code == 0
    r = invoke("eval", cnn_files["model"], out, "--data", cnn_files["eval"], "--repeats", 2, "--provider", "cuda")
    assert r.exit_code == 0, r.output
    assert "CUDA EP has no QDQ fusion" in r.output
    from qtool import runtime
    if runtime.unavailable("CUDAExecutionProvider"):
        assert "running on the CPU EP instead" in r.output and "provider CPUExecutionProvider" in r.output
