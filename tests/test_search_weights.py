"""The accuracy search with the weight algorithms (``quantize --eval-data ... --algorithms
rounding,bias_correction``): every candidate is judged with the codes it would be written with,
the written model is the searched plan with its codes (the same bytes as quantizing with the
search's fallbacks directly, and as ``--plan`` again), the layers' fp32 input statistics come
from one pass and each layer is rounded once per quantization, and on the bundled sample's real
images the algorithms meet a gate with fewer float nodes than without them."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import qtool
import qtool.algorithms.rounding as rounding
import qtool.algorithms.weights as weights
from qtool.cli import main
from qtool.config import CalibrateOptions, QuantizeOptions

SAMPLE = Path(__file__).resolve().parent.parent / "calibration" / "fashion-mnist"
BOTH = "rounding,bias_correction"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def search(d: Path, name: str, snr: float, algorithms: str, *more):
    """The search on the sample at ``--min-snr snr``: (result, trail, plan path, output path)."""
    out, trail, plan = d / f"{name}.onnx", d / f"{name}.trail.json", d / f"{name}.plan.json"
    r = run("quantize", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "--eval-data", SAMPLE / "eval.npz",
            "--min-snr", snr, "--no-speed", "--threads", 1, "--algorithms", algorithms, "-o", out, "--trail", trail,
            "--save-plan", plan, *more)
    return r, (json.loads(trail.read_text()) if trail.exists() else None), plan, out


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The search at --min-snr 46 with both algorithms, counting the fp32 statistics passes and
    the GPTQ solves: (folder, trail, plan path, output, stats calls, rounded layers)."""
    d = tmp_path_factory.mktemp("search_weights")
    calls, solved = [], []
    stats, solve = weights.input_stats, rounding.round_layer

    def counted_stats(model, layers, *args):
        calls.append([l.node for l in layers])
        return stats(model, layers, *args)

    def counted_solve(layer, *args):
        solved.append(layer.node)
        return solve(layer, *args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights, "input_stats", counted_stats)
        mp.setattr(rounding, "round_layer", counted_solve)
        r, trail, plan, out = search(d, "both", 46, BOTH)
    assert r.exit_code == 0, r.output
    return d, trail, plan, out, calls, solved


def test_candidates_share_one_statistics_pass_and_each_layers_rounding(searched):
    """Several candidates, one fp32 pass (for the base plan's four layers) and one GPTQ solve per layer."""
    _, trail, _, _, calls, solved = searched
    assert trail["evaluations"] >= 3
    assert len(calls) == 1 and sorted(calls[0]) == ["/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"]
    assert sorted(solved) == sorted(set(solved)) and set(solved) <= set(calls[0])


def test_the_written_model_is_the_searched_plan_with_its_codes(searched, tmp_path):
    d, trail, plan_path, out, _, _ = searched
    saved = json.loads(plan_path.read_text())
    fallback = trail["final"]["fallback"]
    assert fallback and trail["passed"]
    assert saved["algorithms"] == ["rounding", "bias_correction"]
    assert saved["applied"]["rounding"] and saved["applied"]["bias_correction"]
    int8 = {n["name"] for n in saved["nodes"] if n["precision"] != "float"}
    assert set(saved["applied"]["rounding"]) <= int8  # only the layers the final plan quantizes
    assert any(t.get("codes") for t in saved["tensors"])
    assert any(n.startswith("rounding: ") for n in saved["notes"])
    # the same bytes as quantizing directly with the search's fallbacks and the algorithms (nothing reused
    # there), and as applying the saved plan without data
    direct = qtool.quantize(SAMPLE / "model.onnx", tmp_path / "direct.onnx", data=SAMPLE / "calib.npz",
                            options=QuantizeOptions(algorithms=("rounding", "bias_correction"),
                                                    precision=tuple(f"{n}=fp32" for n in fallback)))
    assert direct.plan.applied == saved["applied"]
    assert (tmp_path / "direct.onnx").read_bytes() == out.read_bytes()
    r = run("quantize", SAMPLE / "model.onnx", "-o", tmp_path / "again.onnx", "--plan", plan_path)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.onnx").read_bytes() == out.read_bytes()


def test_the_algorithms_meet_the_gate_with_fewer_float_nodes(tmp_path):
    """--min-snr 40 on the sample's real images: one node must fall back without the algorithms
    (all int8 gives 39.5 dB), none with rounding and bias correction."""
    plain, t_plain, _, _ = search(tmp_path, "plain", 40, "none")
    both, t_both, _, _ = search(tmp_path, "both", 40, BOTH)
    assert plain.exit_code == 0 and both.exit_code == 0, plain.output + both.output
    assert len(t_plain["final"]["fallback"]) >= 1 and not t_plain["trail"][0]["passed"]
    assert t_both["final"]["fallback"] == [] and t_both["trail"][0]["passed"]
    assert t_both["final"]["int8_mac_share"] > t_plain["final"]["int8_mac_share"]


def test_a_table_alone_cannot_serve_the_weight_algorithms(tmp_path):
    table = qtool.calibrate(SAMPLE / "model.onnx", SAMPLE / "calib.npz", CalibrateOptions(limit=64))
    table.save(tmp_path / "t.json")
    r = run("quantize", SAMPLE / "model.onnx", "--table", tmp_path / "t.json", "--eval-data", SAMPLE / "eval.npz",
            "--min-snr", 30, "--no-speed", "--algorithms", "rounding", "-o", tmp_path / "q.onnx")
    assert r.exit_code == 2 and "give --data" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "q.onnx").exists()
