"""The public Python API is pinned: names and signatures mirror the CLI."""

import inspect as pyinspect

import numpy as np

import qtool


def params(fn):
    return list(pyinspect.signature(fn).parameters)


def test_public_names():
    assert set(qtool.__all__) == {"inspect", "calibrate", "plan", "quantize", "evaluate", "__version__"}


def test_signatures():
    assert params(qtool.inspect) == ["model", "shapes", "target"]
    assert params(qtool.calibrate) == ["model", "data", "options", "quantize_options", "on_batch", "threads"]
    assert params(qtool.plan) == ["model", "table", "options", "method"]
    assert params(qtool.quantize) == ["model", "output", "table", "data", "options", "calibrate_options",
                                      "method", "on_batch", "plan"]
    assert params(qtool.evaluate) == ["reference", "candidate", "data", "labels", "options", "limit"]


def test_library_never_imports_cli():
    import subprocess
    import sys
    code = "import sys, qtool; qtool.plan; print('qtool.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_inspect_counts_macs(cnn_files):
    r = qtool.inspect(cnn_files["model"])
    # conv1: 8x16x16 outputs x 3*3*3; conv2: 16x8x8 x 8*3*3; gemm 32 x 1024; gemm 10 x 32 (batch 1)
    assert r.macs == {"Conv": 8 * 256 * 27 + 16 * 64 * 72, "Gemm": 32 * 1024 + 10 * 32}
    assert r.inputs[0].shape == ("N", 3, 16, 16)
    assert r.parameters == 8 * 27 + 8 + 16 * 72 + 16 + 32 * 1024 + 32 + 320 + 10
    assert r.quantizable_nodes == 9
    r4 = qtool.inspect(cnn_files["model"], {"x": (4, 3, 16, 16)})
    assert r4.total_macs == 4 * r.total_macs


def test_evaluate_report_round_trip(cnn_files, tmp_path):
    from qtool.config import EvalOptions
    from qtool.evaluation import Report, Thresholds, judge
    out = tmp_path / "q.onnx"
    qtool.quantize(cnn_files["model"], out, table=cnn_files["table"])
    report = qtool.evaluate(cnn_files["model"], out, cnn_files["eval"], options=EvalOptions(repeats=2))
    assert report.samples == 40 and report.accuracy_reference is not None
    assert 0.2 < report.size_ratio < 0.35
    again = Report.from_dict(report.to_dict())
    assert again == report
    rejudged = judge(again, Thresholds(min_agreement=1.01))
    assert not rejudged.passed and "would have passed" in rejudged.gates[0].message
    assert np.isfinite(report.outputs[0].snr_db)
