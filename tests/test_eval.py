"""qtool eval as a CI gate: paired speedup and its spread, min_speedup/min_snr gates, --from
re-judging, format-1 reports, kernel counts, classifier-shaped outputs, task compare hook.
No timing assertions beyond structure: machines are noisy."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import models
import qtool
from qtool import runtime
from qtool.cli import main
from qtool.config import EvalOptions
from qtool.errors import QtoolError
from qtool.evaluation import (SPREAD_LIMIT, Kernels, Latency, OutputMetrics, OutputStats, Report, ReportError,
                              Speedup, Thresholds, count_kernels, format_table, is_classifier_output, judge,
                              load_report)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "calibration" / "fashion-mnist"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def synthetic(speedup=Speedup(1.5, 1.4, 1.6, 30), snr=(30.0, 25.0)) -> Report:
    outputs = tuple(OutputMetrics(f"o{i}", 0.1, 0.01, 0.999, s, 0.99 if i == 0 else None) for i, s in enumerate(snr))
    return Report("ref.onnx", "cand.onnx", 100, "CPUExecutionProvider", outputs, 4000, 1000,
                  Latency(3.0, 3.3, 30, 8), Latency(2.0, 2.2, 30, 8), 0.9, 0.89, 2,
                  paired_speedup=speedup, kernels_reference=Kernels(),
                  kernels_candidate=Kernels({"QLinearConv": 2, "QGemm": 1}, 1, 1, 0, 0))


@pytest.fixture(scope="module")
def quantized(cnn_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q.onnx"
    qtool.quantize(cnn_files["model"], out, table=cnn_files["table"])
    return out


@pytest.fixture(scope="module")
def saved_report(cnn_files, quantized, tmp_path_factory):
    path = tmp_path_factory.mktemp("r") / "report.json"
    r = cli("eval", cnn_files["model"], quantized, "--data", cnn_files["eval"], "--repeats", 4,
            "--min-cosine", 0.9, "--json", path)
    assert r.exit_code == 0, r.output
    return path


# -- paired speedup -------------------------------------------------------------------------------

def test_speedup_stats_from_synthetic_pairs():
    ratios = np.r_[np.linspace(1.0, 2.0, 11), np.inf, 0.0, np.nan]  # non-finite and zero ratios dropped
    s = Speedup.from_ratios(ratios)
    assert s.pairs == 11 and s.median == pytest.approx(1.5)
    assert s.p10 == pytest.approx(1.1) and s.p90 == pytest.approx(1.9)
    assert s.relative_spread == pytest.approx(0.8 / 1.5)
    with pytest.raises(ValueError):
        Speedup.from_ratios([np.nan])


def test_speedup_warnings():
    tight = Speedup(1.5, 1.45, 1.55, 30)
    assert tight.warning() is None and tight.warning(1.2) is None
    straddles_one = Speedup(1.05, 0.95, 1.15, 30)
    assert "contains 1.0" in straddles_one.warning()
    assert straddles_one.warning(0.5) is None  # the gate is far from the noise
    straddles_gate = Speedup(1.5, 1.4, 1.6, 30)
    assert "contains --min-speedup 1.45" in straddles_gate.warning(1.45)
    wide = Speedup(2.0, 1.2, 2.0 + SPREAD_LIMIT * 2.0, 30)
    assert "spans" in wide.warning() and "limit 50%" in wide.warning()
    report = judge(synthetic(straddles_one), Thresholds())
    assert report.warnings and "warning: speedup 1.05x is too noisy" in format_table(report)


class FakeSession:
    def __init__(self, name, log, ms=0.0):
        self.name, self.log, self.ms = name, log, ms

    def run(self, outputs, feeds):
        self.log.append(self.name)
        if self.ms:
            import time
            time.sleep(self.ms / 1000)


def test_time_pair_alternates_order_and_returns_per_pair_ratios():
    log = []
    a, b = FakeSession("a", log, 3.0), FakeSession("b", log, 3.0)
    ta, tb, ratios = runtime.time_pair(a, b, {}, warmup=1, repeats=4)
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert ta.runs == tb.runs == 4 and len(ratios) == 4 and np.all(ratios > 0)


def test_time_pair_times_fast_models_in_blocks():
    """A model far below MIN_SAMPLE_MS is timed over blocks of consecutive runs (per-run times)."""
    log = []
    a, b = FakeSession("a", log), FakeSession("b", log)
    runtime.time_pair(a, b, {}, warmup=1, repeats=2)
    block = (len(log) - 2) // 4
    assert block > 1 and log[2:] == ["a"] * block + ["b"] * block + ["b"] * block + ["a"] * block


def test_report_speedup_is_median_of_pairs_and_round_trips():
    r = synthetic(Speedup(1.2, 1.1, 1.3, 30))
    assert r.speedup == 1.2  # not 3.0 / 2.0, the ratio of the medians
    d = json.loads(r.to_json())
    assert d["format_version"] == 3 and d["speedup"] == 1.2 and d["paired_speedup"]["p10"] == 1.1
    assert Report.from_dict(d) == r


# -- gates ----------------------------------------------------------------------------------------

def test_thresholds_frozen_with_defaults_none():
    t = Thresholds()
    assert all(getattr(t, f) is None for f in t.__dataclass_fields__)
    assert {"min_speedup", "min_snr"} <= set(t.__dataclass_fields__)
    with pytest.raises(FrozenInstanceError):
        t.min_snr = 1.0
    opts = EvalOptions(min_speedup=1.3, min_snr=20.0, max_drop=0.01)
    assert Thresholds.from_options(opts) == Thresholds(max_drop=0.01, min_speedup=1.3, min_snr=20.0)


def test_min_speedup_gate_messages():
    r = synthetic()
    ok = judge(r, Thresholds(min_speedup=1.2))
    assert ok.passed and "p10-p90 1.40-1.60x over 30 pairs" in ok.gates[0].message
    bad = judge(r, Thresholds(min_speedup=2.0))
    g = bad.gates[0]
    assert not bad.passed and g.name == "min_speedup" and g.value == 1.5
    assert "p10-p90 1.40-1.60x" in g.message and "--min-speedup 1.5 would have passed" in g.message
    with pytest.raises(QtoolError, match="--min-speedup cannot be checked: no latency"):
        judge(replace(r, paired_speedup=None, latency_reference=None, latency_candidate=None),
              Thresholds(min_speedup=1.0))


def test_min_snr_gate_uses_lowest_output():
    r = synthetic(snr=(30.0, 25.0))
    assert judge(r, Thresholds(min_snr=24.0)).passed
    bad = judge(r, Thresholds(min_snr=28.0))
    assert not bad.passed and bad.gates[0].value == 25.0
    assert "misses --min-snr 28" in bad.gates[0].message and "--min-snr 25 would have passed" in bad.gates[0].message


def test_eval_options_reject_nonpositive_speedup():
    with pytest.raises(QtoolError, match="min_speedup"):
        EvalOptions(min_speedup=0.0)


# -- --from ---------------------------------------------------------------------------------------

def test_from_rejudges_without_inference(saved_report, tmp_path):
    saved = json.loads(saved_report.read_text())
    assert saved["format_version"] == 3 and saved["paired_speedup"]["pairs"] == 4
    assert saved["kernels_candidate"]["integer"] and not saved["kernels_reference"]["integer"]
    r = cli("eval", "--from", saved_report, "--min-snr", 0)
    assert r.exit_code == 0 and "PASS min_snr" in r.output and "min_cosine" not in r.output  # new gates only
    out = tmp_path / "rejudged.json"
    r = cli("eval", "--from", saved_report, "--min-snr", 1000, "--min-speedup", 1000, "--json", out)
    assert r.exit_code == 1 and "FAIL min_snr" in r.output and "would have passed" in r.output
    assert "FAIL min_speedup" in r.output and "p10-p90" in r.output
    again = json.loads(out.read_text())
    assert again["passed"] is False and {g["name"] for g in again["gates"]} == {"min_snr", "min_speedup"}
    preset = tmp_path / "p.toml"
    preset.write_text("[eval]\nmin_snr = 1000.0\n")
    assert cli("eval", "--from", saved_report, "--config", preset).exit_code == 1


@pytest.mark.parametrize("args, needle", [
    (("MODEL",), "cannot be combined"), (("--data", "x.npz"), "--data cannot be combined"),
    (("--repeats", 3), "--repeats cannot be combined"),
])
def test_from_rejects_run_arguments(saved_report, args, needle):
    args = tuple(saved_report if a == "MODEL" else a for a in args)
    r = cli("eval", "--from", saved_report, *args)
    assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output


def test_eval_without_models_or_from(cnn_files):
    for args in ((), (cnn_files["model"],), (cnn_files["model"], cnn_files["model"])):
        r = cli("eval", *args)
        assert r.exit_code == 2 and "--from REPORT.json" in r.output, r.output


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not a JSON report"), ('{"a": 1}', "not a qtool eval report"), ("[1, 2]", "not a qtool eval report"),
    ('{"format": "qtool.eval", "format_version": 99}', "format_version 99"),
    ('{"format": "qtool.eval", "format_version": 2, "outputs": 3}', "malformed"),
    (None, "no such report file"),
])
def test_from_bad_reports_one_line_exit_2(tmp_path, content, needle):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    r = cli("eval", "--from", path)
    assert r.exit_code == 2 and r.output.startswith("error: ") and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    with pytest.raises(ReportError):
        load_report(path)


def test_version_1_report_still_loads(saved_report, tmp_path):
    d = json.loads(saved_report.read_text())
    for key in ("paired_speedup", "kernels_reference", "kernels_candidate", "warnings"):
        del d[key]
    d["format_version"] = 1
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(d))
    r = load_report(v1)
    assert r.paired_speedup is None and r.kernels_candidate is None
    assert r.speedup == pytest.approx(d["latency_reference"]["median_ms"] / d["latency_candidate"]["median_ms"])
    out = cli("eval", "--from", v1, "--min-speedup", 1000)
    assert out.exit_code == 1 and "ratio of medians" in out.output


# -- kernel counts --------------------------------------------------------------------------------

def test_kernel_counts_quantized_vs_fp32(cnn_files, quantized):
    fp32, note = runtime.kernel_counts(str(cnn_files["model"]))
    assert note is None and fp32.integer_total == 0 and fp32.quantize == fp32.dequantize == 0
    q, note = runtime.kernel_counts(str(quantized))
    assert note is None and q.integer_total > 0
    assert "integer kernels:" in q.describe() and "Q/DQ left unfused" in q.describe()


def test_kernel_counts_failure_is_a_note(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    counts, note = runtime.kernel_counts(str(bad))
    assert counts is None and "kernel counts unavailable" in note


def test_kernel_counts_on_the_bundled_sample(tmp_path):
    out = tmp_path / "s.onnx"
    r = cli("quantize", SAMPLE / "model.onnx", "--data", SAMPLE / "calib.npz", "-o", out, "--config",
            ROOT / "configs" / "cnn-cpu.toml")
    assert r.exit_code == 0, r.output
    k, _ = runtime.kernel_counts(str(out))
    assert k.integer_total >= 4 and k.unfused_quantize == k.unfused_dequantize == 0
    assert runtime.kernel_counts(str(SAMPLE / "model.onnx"))[0].integer_total == 0


def test_kernel_counts_skipped_for_big_models(cnn_files, quantized, monkeypatch):
    from qtool import comparison
    monkeypatch.setattr(comparison, "KERNEL_COUNT_MAX_BYTES", 0)
    report = qtool.evaluate(cnn_files["model"], quantized, cnn_files["eval"], options=EvalOptions(repeats=1))
    assert report.kernels_reference is None and report.kernels_candidate is None
    assert sum("kernel counts skipped" in n for n in report.notes) == 2
    assert "integer kernels" not in format_table(report)


def test_count_kernels_classifies_unfused_qdq():
    w = frozenset({"w_q", "s", "z"})
    nodes = [
        ("QuantizeLinear", ["x", "s", "z"], ["xq"], w),          # boundary: feeds an integer kernel
        ("QLinearConv", ["xq", "s", "z", "w_q"], ["y"], w),
        ("DequantizeLinear", ["y", "s", "z"], ["yf"], w),         # boundary: leaves an integer kernel
        ("QuantizeLinear", ["yf", "s", "z"], ["a"], w),           # unfused pair around a float op
        ("DequantizeLinear", ["a", "s", "z"], ["af"], w),
        ("DequantizeLinear", ["w_q", "s", "z"], ["wf"], w),       # constant weight for a float op
        ("Conv", ["af", "wf"], ["out"], w),
        ("QGemm", ["out"], ["g"], w),
    ]
    k = count_kernels(nodes)
    assert k.integer == {"QGemm": 1, "QLinearConv": 1}
    assert (k.quantize, k.dequantize, k.unfused_quantize, k.unfused_dequantize) == (2, 3, 1, 2)
    assert "integer kernels: 2 (QGemm 1, QLinearConv 1); Q/DQ left unfused: 1 Q, 2 DQ" in k.describe()


# -- classifier-shaped outputs --------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, dtype, expected", [
    ("logits", (8, 10), np.float32, True), ("probs", (8, 1, 10), np.float32, True),
    ("score", (8, 1), np.float32, False), ("features", (8, 4, 4), np.float32, False),
    ("boxes", (8, 4), np.float32, False), ("bbox_deltas", (8, 16), np.float32, False),
    ("labels", (8, 10), np.int64, False), ("fmap", (8, 10, 1, 1), np.float32, False),
])
def test_classifier_shaped(name, shape, dtype, expected):
    x = np.zeros(shape, dtype)
    assert is_classifier_output(name, x) is expected
    s = OutputStats(name)
    s.update(x, x)
    assert (s.result().top1_agreement is not None) is expected


def test_labels_need_a_classifier_output(tmp_path):
    m = models.matmul_mlp()  # output y: [B, 4, 4]
    path = models.save(m, tmp_path / "mlp.onnx")
    x = models.random_inputs(m, 8)
    np.savez(tmp_path / "d.npz", labels=np.arange(8) % 4, **x)
    np.save(tmp_path / "l.npy", np.arange(8) % 4)
    report = qtool.evaluate(path, path, tmp_path / "d.npz", options=EvalOptions(repeats=1))
    assert report.accuracy_reference is None and report.agreement is None
    assert any("labels were not used" in n for n in report.notes)
    r = cli("eval", path, path, "--data", tmp_path / "d.npz", "--labels", tmp_path / "l.npy", "--repeats", 1)
    assert r.exit_code == 2 and "classifier-shaped" in r.output, r.output


# -- task hooks -----------------------------------------------------------------------------------

COMPARE_TASK = '''
import numpy as np
NAME = "argmax match"
def reduce(outputs, batch):
    rows = np.empty(len(batch["x"]), dtype=object)   # variable-length rows as an object array
    for i, row in enumerate(outputs["logits"]):
        rows[i] = np.argsort(row)[-1:]
    return rows
def compare(reference_rows, candidate_rows):
    return float(np.mean([r[0] == c[0] for r, c in zip(reference_rows, candidate_rows)]))
'''


def test_task_compare_hook(cnn_files, quantized, tmp_path):
    task = tmp_path / "task.py"
    task.write_text(COMPARE_TASK)
    report = qtool.evaluate(cnn_files["model"], quantized, cnn_files["eval"],
                            options=EvalOptions(repeats=1, task=str(task), max_task_drop=1.0))
    assert report.task == "argmax match" and report.task_reference == 1.0
    assert report.task_candidate == pytest.approx(report.agreement)
    assert report.task_drop == pytest.approx(1.0 - report.agreement) and report.passed


def test_task_needs_score_or_compare(tmp_path):
    from qtool.task import load_task
    p = tmp_path / "t.py"
    p.write_text("def reduce(o, b):\n    return o\n")
    with pytest.raises(QtoolError, match=r"score\(\) or compare\(\)"):
        load_task(p)
    p.write_text("def reduce(o, b):\n    return o\ndef compare(a, b):\n    return 1.0\n")
    t = load_task(p)
    assert t.score is None and t.compare is not None
    p.write_text("def reduce(o, b):\n    return o\ndef score(r):\n    raise RuntimeError('boom')\n")
    with pytest.raises(QtoolError, match=r"score\(\) failed \(RuntimeError: boom\)"):
        load_task(p).evaluate([np.zeros(2)], [np.zeros(2)])


# -- reviewer regressions -------------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["labels", "task", "config"])
def test_json_never_overwrites_labels_task_or_preset(cnn_files, tmp_path, victim):
    files = {"labels": tmp_path / "l.npy", "task": tmp_path / "task.py", "config": tmp_path / "p.toml"}
    np.save(files["labels"], np.arange(40) % 10)
    files["task"].write_text(COMPARE_TASK)
    files["config"].write_text("[eval]\nrepeats = 1\n")
    before = files[victim].read_bytes()
    r = cli("eval", cnn_files["model"], cnn_files["model"], "--data", cnn_files["eval"], "--repeats", 1,
            "--labels", files["labels"], "--task", files["task"], "--config", files["config"],
            "--json", files[victim])
    assert r.exit_code == 2 and "output path is the input file" in r.output, r.output
    assert files[victim].read_bytes() == before


def test_json_from_never_overwrites_preset(saved_report, tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[eval]\nmin_snr = 0.0\n")
    r = cli("eval", "--from", saved_report, "--config", preset, "--json", preset)
    assert r.exit_code == 2 and "output path is the input file" in r.output, r.output
    assert preset.read_text() == "[eval]\nmin_snr = 0.0\n"
    task = tmp_path / "task.py"
    task.write_text(COMPARE_TASK)
    preset.write_text(f"[eval]\ntask = \"{task}\"\n")
    r = cli("eval", "--from", saved_report, "--config", preset, "--json", task)
    assert r.exit_code == 2 and "output path is the input file" in r.output, r.output
    assert task.read_text() == COMPARE_TASK


def _text_model(text, path):
    from onnx import parser
    m = parser.parse_model(text)
    return models.save(m, path)


def test_scalar_and_non_batch_outputs(tmp_path):
    path = _text_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] logits, float total, float[4, N] t) {
        logits = Relu (x)
        total = ReduceSum <keepdims = 0> (x)
        t = Transpose <perm = [1, 0]> (x)
    }
    """, tmp_path / "s.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32),
             labels=np.arange(10) % 4)
    r = cli("eval", path, path, "--data", tmp_path / "d.npz", "--batch-size", 4, "--repeats", 1,
            "--min-cosine", 0.99, "--max-drop", 0)
    assert r.exit_code == 0, r.output
    report = qtool.evaluate(path, path, tmp_path / "d.npz", options=EvalOptions(batch_size=4, repeats=1))
    assert report.samples == 10 and report.accuracy_reference is not None
    by_name = {o.name: o for o in report.outputs}
    assert by_name["logits"].top1_agreement == 1.0
    assert by_name["total"].top1_agreement is None and by_name["total"].cosine == pytest.approx(1.0)
    assert by_name["t"].top1_agreement is None  # [4, N]: its first dimension is not the batch
    s = OutputStats("x")
    s.update(np.float32(2.0), np.float32(2.0))  # a bare scalar, as search.py passes outputs
    assert s.result().cosine == pytest.approx(1.0) and s.rows == 1


def test_eval_uses_the_models_fixed_batch(tmp_path):
    path = _text_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4, 8] x) => (float[4, 8] y) {
        y = Relu (x)
    }
    """, tmp_path / "f.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32))
    r = cli("eval", path, path, "--data", tmp_path / "d.npz", "--repeats", 1, "--batch-size", 64)
    assert r.exit_code == 0, r.output
    report = qtool.evaluate(path, path, tmp_path / "d.npz", options=EvalOptions(repeats=1))
    assert report.samples == 12 and report.latency_reference.batch == 4


def _set(d, path, value):
    *keys, last = path.split(".")
    for k in keys:
        d = d[k]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value


_DELETE = object()


@pytest.mark.parametrize("changes", [
    {"latency_reference.median_ms": 0}, {"latency_candidate.median_ms": -1.0},
    {"paired_speedup.p10": 0.0}, {"paired_speedup.p10": 5.0, "paired_speedup.median": 1.0},
    {"paired_speedup.median": 9.0, "paired_speedup.p90": 1.0}, {"paired_speedup.pairs": 2.5},
    {"kernels_candidate.integer": {"QLinearConv": 1.5}}, {"kernels_candidate.integer": {"QLinearConv": "2"}},
    {"kernels_reference.quantize": True}, {"kernels_reference.dequantize": -1},
    {"accuracy_reference": 0.9, "accuracy_candidate": None},
    {"accuracy_reference": _DELETE, "accuracy_candidate": 0.8},
    {"task": "mAP", "task_reference": 0.5, "task_candidate": None},
    {"task": None, "task_reference": 0.5, "task_candidate": 0.4},
])
def test_from_implausible_reports_exit_2(saved_report, tmp_path, changes):
    d = json.loads(saved_report.read_text())
    for path, value in changes.items():
        _set(d, path, value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    r = cli("eval", "--from", bad, "--min-snr", 0)
    assert r.exit_code == 2 and r.output.startswith("error: ") and "malformed" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def _suggested(message, flag):
    import re
    return re.search(re.escape(flag) + r" (\S+) would have passed", message).group(1)


@pytest.mark.parametrize("snr", [123.45678, 25.0, 0.58, float(np.nextafter(0.58, 0)), 1e-5, 99.99999, -3.00001])
def test_suggested_threshold_passes_when_used(snr):
    r = synthetic(snr=(snr + 100, snr))
    bad = judge(r, Thresholds(min_snr=snr + 1))
    text = _suggested(bad.gates[0].message, "--min-snr")
    assert judge(r, Thresholds(min_snr=float(text))).passed, text
    drop = replace(r, accuracy_reference=0.5 + snr / 1000, accuracy_candidate=0.5)
    bad = judge(drop, Thresholds(max_drop=-1.0))
    text = _suggested(bad.gates[0].message, "--max-drop")
    assert judge(drop, Thresholds(max_drop=float(text))).passed, text


def test_suggested_threshold_printed_exactly_and_rerun_passes(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(synthetic(snr=(200.0, 123.45678)).to_json())
    r = cli("eval", "--from", path, "--min-snr", 130)
    assert r.exit_code == 1 and "--min-snr 123.4567 would have passed" in r.output, r.output
    r = cli("eval", "--from", path, "--min-snr", _suggested(r.output, "--min-snr"))
    assert r.exit_code == 0, r.output


def test_nan_metric_fails_every_threshold_and_inf_snr_passes():
    nan = judge(synthetic(snr=(30.0, float("nan"))), Thresholds(min_snr=-1000.0))
    g = nan.gates[0]
    assert not nan.passed and "lowest output SNR is NaN; no threshold passes" in g.message
    assert "nan" not in g.message and "would have passed" not in g.message
    drop = judge(replace(synthetic(), accuracy_candidate=float("nan")), Thresholds(max_drop=1.0))
    assert not drop.passed and "accuracy drop is NaN; no threshold passes" in drop.gates[0].message
    exact = judge(synthetic(snr=(float("inf"), float("inf"))), Thresholds(min_snr=1e9))
    assert exact.passed and "inf" in exact.gates[0].message


def test_gate_without_its_value_is_bad_input(cnn_files, saved_report, tmp_path):
    np.savez(tmp_path / "nolabels.npz", **models.random_inputs(models.small_cnn(), 8))
    r = cli("eval", cnn_files["model"], cnn_files["model"], "--data", tmp_path / "nolabels.npz", "--repeats", 1,
            "--max-drop", 0.01)
    assert r.exit_code == 2 and r.output.startswith("error: --max-drop cannot be checked") and "labels" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    r = cli("eval", cnn_files["model"], cnn_files["model"], "--data", cnn_files["eval"], "--repeats", 1,
            "--max-task-drop", 0.01)
    assert r.exit_code == 2 and "--max-task-drop cannot be checked" in r.output and "--task" in r.output, r.output
    d = json.loads(saved_report.read_text())
    d["accuracy_reference"] = d["accuracy_candidate"] = None
    no_acc = tmp_path / "noacc.json"
    no_acc.write_text(json.dumps(d))
    for gate in ("--max-drop", "--max-task-drop"):
        r = cli("eval", "--from", no_acc, gate, 0.01)
        assert r.exit_code == 2 and f"error: {gate} cannot be checked" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert cli("eval", "--from", no_acc, "--min-snr", 0).exit_code == 0


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_report_json_is_strict_and_round_trips_non_finite(tmp_path):
    r = judge(synthetic(snr=(float("inf"), float("nan"))), Thresholds(min_snr=10.0, min_cosine=0.5))
    text = r.to_json()
    d = _strict(text)
    assert d["outputs"][0]["snr_db"] == "inf" and d["outputs"][1]["snr_db"] == "nan"
    assert d["gates"][1]["name"] == "min_snr" and d["gates"][1]["value"] == "nan"
    back = Report.from_dict(d)
    assert back.outputs[0].snr_db == float("inf") and np.isnan(back.outputs[1].snr_db)
    assert back.to_json() == text
    path = tmp_path / "r.json"
    path.write_text(text)
    assert load_report(path).to_json() == text
    out = tmp_path / "again.json"
    res = cli("eval", "--from", path, "--min-snr", 1, "--json", out)
    assert res.exit_code == 1 and "lowest output SNR is NaN; no threshold passes" in res.output, res.output
    assert _strict(out.read_text())["outputs"][0]["snr_db"] == "inf"
    d["outputs"][0]["snr_db"] = "loud"
    path.write_text(json.dumps(d))
    res = cli("eval", "--from", path)
    assert res.exit_code == 2 and "malformed" in res.output, res.output


def test_eval_json_of_identical_models_is_strict(cnn_files, tmp_path):
    out = tmp_path / "same.json"
    r = cli("eval", cnn_files["model"], cnn_files["model"], "--data", cnn_files["eval"], "--repeats", 1,
            "--min-snr", 100, "--json", out)
    assert r.exit_code == 0, r.output
    d = _strict(out.read_text())
    assert all(o["snr_db"] == "inf" for o in d["outputs"]) and d["gates"][0]["passed"]
    assert load_report(out).min_snr_db == float("inf")
