"""--algorithms auto: the accuracy algorithms that apply to the recipe and the inputs given, each
kept only where it measured a gain (Plan.applied), on the bundled sample."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import onnx

from qtool.algorithms import choose, is_transformer
from qtool.cli import main
from qtool.config import ConfigError, QuantizeOptions

SAMPLE = Path(__file__).resolve().parent.parent / "calibration" / "fashion-mnist"
MODEL, CALIB = SAMPLE / "model.onnx", SAMPLE / "calib.npz"
ENCODER = Path(__file__).resolve().parent / "data" / "tiny_encoder.onnx"  # torch-exported, LayerNorm decomposed


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_auto_chooses_by_recipe_inputs_and_table():
    static = QuantizeOptions(algorithms=("auto",))
    assert choose(static, data=True) == ("smoothquant", "rounding", "bias_correction")
    assert choose(static, data=True, transformer=False) == ("rounding", "bias_correction")
    assert choose(static, data=False) == ("smoothquant",)
    assert choose(QuantizeOptions(algorithms=("auto",), per_channel=False), data=True)[:2] == ("cle", "smoothquant")
    assert choose(static, data=True, table_algorithms=()) == ("rounding", "bias_correction")
    assert choose(QuantizeOptions(algorithms=("auto",), mode="dynamic"), data=False) == ()
    assert choose(QuantizeOptions(algorithms=("auto",), weights="int4"), data=True) == ()
    assert choose(QuantizeOptions(algorithms=("rounding",)), data=False) == ("rounding",)  # lists pass as given
    with pytest.raises(ConfigError, match="give it alone"):
        QuantizeOptions(algorithms=("auto", "cle"))


def test_transformers_are_told_from_cnns():
    """SmoothQuant is for transformers (auto smooths only them): a LayerNormalization-type op, or
    attention decomposed into a Softmax and a MatMul of two computed tensors."""
    assert is_transformer(onnx.load(ENCODER).graph)
    assert not is_transformer(onnx.load(MODEL).graph)
    assert not is_transformer(onnx.load(Path(__file__).parent / "data" / "tiny_resnet.onnx").graph)


def test_quantize_auto_with_data_records_what_ran_where_and_replays(tmp_path):
    out, plan = tmp_path / "q.onnx", tmp_path / "plan.json"
    r = run("quantize", MODEL, "--data", CALIB, "--algorithms", "auto", "-o", out, "--save-plan", plan)
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())
    assert saved["algorithms"] == ["rounding", "bias_correction"]  # a CNN: no smoothquant
    quantized = {n["name"] for n in saved["nodes"] if n["precision"] != "float"}
    for algorithm in ("rounding",):
        gains = saved["applied"][algorithm]
        assert gains and set(gains) <= quantized and all(g > 0 for g in gains.values()), (algorithm, gains)
    again = tmp_path / "again.onnx"
    assert run("quantize", MODEL, "--plan", plan, "-o", again).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def encoder_data(tmp_path):
    import numpy as np
    m = onnx.load(ENCODER)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in m.graph.input:
        shape = [d.dim_value or 8 for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = (rng.standard_normal(shape).astype(np.float32) if i.type.tensor_type.elem_type == 1
                         else rng.integers(0, 8, shape).astype(np.int64))
    np.savez(tmp_path / "enc.npz", **feeds)
    return tmp_path / "enc.npz"


def test_auto_follows_the_table(tmp_path):
    table, out, plan = tmp_path / "t.json", tmp_path / "q.onnx", tmp_path / "plan.json"
    r = run("calibrate", ENCODER, "--data", encoder_data(tmp_path), "--algorithms", "auto", "-o", table)
    assert r.exit_code == 0, r.output
    assert json.loads(table.read_text())["params"]["algorithms"] == ["smoothquant"]
    # the table fixes the model algorithms; without --data the weight ones cannot run
    r = run("quantize", ENCODER, "--table", table, "--algorithms", "auto", "-o", out, "--save-plan", plan)
    assert r.exit_code == 0, r.output
    assert json.loads(plan.read_text())["algorithms"] == ["smoothquant"]
    # a plain table under auto: no model algorithm
    plain = tmp_path / "plain.json"
    assert run("calibrate", MODEL, "--data", CALIB, "-o", plain).exit_code == 0
    r = run("quantize", MODEL, "--table", plain, "--algorithms", "auto", "-o", out, "--save-plan", plan)
    assert r.exit_code == 0, r.output
    assert "algorithms" not in json.loads(plan.read_text())
    # the smoothed table with no --algorithms is refused, in one line
    r = run("quantize", ENCODER, "--table", table, "-o", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "smoothquant" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_auto_alongside_another_name_is_refused(tmp_path):
    r = run("quantize", MODEL, "--data", CALIB, "--algorithms", "auto,cle", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "alone" in r.output
