"""Graphs people ship (tests/make_corpus.py, exported with torch): each is quantized through the
CLI (static QDQ with its .npz as calibration data; dynamic where MatMul/Gemm/recurrent layers
carry the work; QOperator for the CNNs) and must give a model that passes onnx's full check,
runs in onnxruntime on the CPU, stays close to fp32 (SNR over the .npz inputs), keeps its
inputs' and outputs' names and types, and holds quantized nodes (inside If branches and Loop
bodies too). ``qtool quantize --explain`` and ``qtool inspect`` name every ConvTranspose,
Einsum, LSTM, GRU, If and Loop node that stays float, with a reason.

The corpus is built once into $QTOOL_CACHE/corpus (default ~/.cache/qtool/corpus) and rebuilt
when tests/make_corpus.py changes; without torch these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import make_corpus
from plan_asserts import assert_model_matches_plan
from qtool.cli import main
from qtool.plans import Plan

FLOAT_OPS = ("ConvTranspose", "Einsum", "LSTM", "GRU", "If", "Loop")   # named when they stay float
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QGemm",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QAttention"}


@dataclass(frozen=True)
class Case:
    kind: str                 # cnn, mlp: SNR >= 20 dB; recurrent, control flow, attention: >= 15 dB
    dynamic: bool = False     # also --mode dynamic (MatMul/Gemm/recurrent layers carry the work)
    qoperator: bool = False   # also --format qoperator (the CNNs)
    subgraphs: bool = False   # quantized nodes must appear inside If branches / Loop bodies

    @property
    def min_snr(self) -> float:
        return 20.0 if self.kind in ("cnn", "mlp") else 15.0


CASES = {
    "if_cond": Case("control flow", qoperator=True, subgraphs=True),
    "loop": Case("control flow", dynamic=True, subgraphs=True),
    "fp16_cnn": Case("cnn", qoperator=True),
    "grouped_conv": Case("cnn", qoperator=True),
    "conv_transpose": Case("cnn", qoperator=True),
    "lstm": Case("recurrent", dynamic=True),
    "gru": Case("recurrent", dynamic=True),
    "einsum": Case("attention", dynamic=True),
    "multi_io": Case("cnn", qoperator=True),
    "cnn_opset11": Case("cnn", qoperator=True),
    "cnn_opset17": Case("cnn", qoperator=True),
    "mlp_dynamo": Case("mlp", dynamic=True),
    "mlp_torchscript": Case("mlp", dynamic=True),
}
RUNS = [(name, mode) for name, case in CASES.items()
        for mode in ("static",) + (("dynamic",) if case.dynamic else ()) + (("qoperator",) if case.qoperator else ())]
MODE_ARGS = {"static": (), "dynamic": ("--mode", "dynamic"), "qoperator": ("--format", "qoperator")}


def test_cases_cover_the_corpus():
    assert set(CASES) == set(make_corpus.MODELS)


# ------------------------------------------------------------------------------------------
# the corpus, built once
# ------------------------------------------------------------------------------------------

def _fresh(d: Path) -> dict | None:
    """The manifest when ``d`` holds a corpus built by this version of make_corpus.py, else None."""
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("script_sha256") != make_corpus.script_hash():
        return None
    if manifest.get("skipped") and importlib.util.find_spec("onnxscript") is not None:
        return None  # built before onnxscript was installed: the dynamo exports can be made now
    for name in manifest.get("models", {}):
        if not ((d / f"{name}.onnx").exists() and (d / f"{name}.npz").exists()):
            return None
    return manifest


@pytest.fixture(scope="session")
def corpus() -> tuple[Path, dict]:
    d = make_corpus.default_dir()
    manifest = _fresh(d)
    if manifest is None:
        if importlib.util.find_spec("torch") is None:
            pytest.skip(f"no corpus in {d} and torch is not installed to export it: "
                        "python3 -m pip install torch==2.13.0 onnxscript==0.7.2, then python3 tests/make_corpus.py")
        proc = subprocess.run([sys.executable, str(make_corpus.SCRIPT), "--out", str(d)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"make_corpus.py failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        print(proc.stdout)
        manifest = _fresh(d)
        assert manifest is not None, f"make_corpus.py left no complete corpus in {d}"
    return d, manifest


def _model(corpus, name: str) -> tuple[Path, Path]:
    d, manifest = corpus
    if name in manifest["skipped"]:
        pytest.skip(f"{name} was not exported: {manifest['skipped'][name]}")
    return d / f"{name}.onnx", d / f"{name}.npz"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def all_nodes(graph, depth: int = 0):
    return make_corpus.all_nodes(graph, depth)


def is_quantized_op(op: str) -> bool:
    return op in QUANT_OPS or op.startswith("QLinear")


def fixed_batch(path: Path) -> int | None:
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))


def io_types(path) -> tuple:
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return (tuple((i.name, i.type.tensor_type.elem_type) for i in g.input if i.name not in inits),
            tuple((o.name, o.type.tensor_type.elem_type) for o in g.output))


_RESULTS: dict = {}


def quantized(corpus, tmp_path_factory, name: str, mode: str) -> dict:
    """Quantize once per (model, mode) through the CLI, with --explain and --save-plan."""
    key = (name, mode)
    if key not in _RESULTS:
        src, data = _model(corpus, name)
        d = tmp_path_factory.mktemp(f"{name}-{mode}")
        out, plan = d / "q.onnx", d / "plan.json"
        args = ["quantize", src, "-o", out, "--explain", "--save-plan", plan, *MODE_ARGS[mode]]
        if mode != "dynamic":
            args += ["--data", data]
        r = invoke(*args)
        _RESULTS[key] = {"src": src, "data": data, "out": out, "exit_code": r.exit_code, "output": r.output,
                         "plan": Plan.from_dict(json.loads(plan.read_text())) if r.exit_code == 0 else None,
                         "command": "qtool " + " ".join(str(a) for a in args)}
    res = _RESULTS[key]
    assert res["exit_code"] == 0, f"{res['command']} exited {res['exit_code']}:\n{res['output'][-3000:]}"
    return res


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------

def test_corpus_is_small_and_runs(corpus):
    d, manifest = corpus
    assert not manifest["skipped"] or set(manifest["skipped"]) <= {"if_cond", "mlp_dynamo"}, manifest["skipped"]
    for name, info in manifest["models"].items():
        assert (d / f"{name}.onnx").stat().st_size < 200_000, name
        assert not list(d.glob(f"{name}.onnx.data")), f"{name}: weights must be inside the .onnx"
    ops = {name: {**info["ops"], **info["subgraph_ops"]} for name, info in manifest["models"].items()}
    expected = {"if_cond": "If", "loop": "Loop", "conv_transpose": "ConvTranspose", "lstm": "LSTM", "gru": "GRU",
                "einsum": "Einsum"}
    for name, op in expected.items():
        assert name not in ops or op in ops[name], (name, ops[name])
    if "if_cond" in ops:
        assert {"Conv", "Gemm"} <= set(manifest["models"]["if_cond"]["subgraph_ops"])
    assert {"Gemm", "MatMul"} <= set(manifest["models"]["loop"]["subgraph_ops"])
    assert manifest["models"]["cnn_opset11"]["opset"] == 11 and manifest["models"]["cnn_opset17"]["opset"] == 17


@pytest.mark.parametrize("name, mode", RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_quantize_is_valid_and_close(corpus, tmp_path_factory, name, mode):
    case = CASES[name]
    res = quantized(corpus, tmp_path_factory, name, mode)
    src, out = res["src"], res["out"]
    onnx.checker.check_model(str(out), full_check=True)
    assert io_types(out) == io_types(src), "inputs/outputs changed name or type"

    q = onnx.load(str(out))
    nodes = list(all_nodes(q.graph))
    total = sum(1 for n, _ in nodes if is_quantized_op(n.op_type))
    inner = sum(1 for n, depth in nodes if depth > 0 and is_quantized_op(n.op_type))
    inputs = dict(np.load(res["data"]))
    batch = fixed_batch(src)
    ref = make_corpus.run_ort(src, inputs, batch)
    got = make_corpus.run_ort(out, inputs, batch)
    snrs = [snr_db(r, g) for r, g in zip(ref, got)]
    counted = re.search(r"(\d+ of \d+) nodes quantized", res["output"])
    print(f"{name} {mode}: {counted.group(1) if counted else '?'} nodes quantized, "
          f"{total} quantized ops ({inner} in subgraphs), SNR " + ", ".join(f"{s:.1f}" for s in snrs) + " dB")

    failures = [f"output {o.name}: SNR {s:.1f} dB < {case.min_snr} dB" for o, s in zip(q.graph.output, snrs)
                if s < case.min_snr]
    if total == 0:
        failures.append("no quantized node in the written model")
    if case.subgraphs and inner == 0:
        failures.append("nothing quantized inside its If/Loop subgraphs (the Conv/Gemm/MatMul there stay float)")
    assert not failures, f"{res['command']}: " + "; ".join(failures)
    if "com.microsoft" not in {n.domain for n, _ in nodes}:  # the contrib kernels' tensors are not plan-checked
        from qtool.prepare import prepare
        assert_model_matches_plan(q, res["plan"], prepare(src).model)


def test_fp16_keeps_its_interface(corpus, tmp_path_factory):
    res = quantized(corpus, tmp_path_factory, "fp16_cnn", "static")
    fp16 = onnx.TensorProto.FLOAT16
    assert all(t == fp16 for _, t in io_types(res["out"])[0] + io_types(res["out"])[1])
    assert len(res["plan"].quantized_nodes()) > 0


def test_matmul_shaped_einsum_with_weights_is_quantized(corpus, tmp_path_factory):
    for mode in ("static", "dynamic"):
        res = quantized(corpus, tmp_path_factory, "einsum", mode)
        src = onnx.load(str(res["src"]))
        inits = {t.name for t in src.graph.initializer}
        weighted = [n.name for n in src.graph.node if n.op_type == "Einsum" and set(n.input) & inits]
        assert len(weighted) == 4, weighted
        plan = {n.name: n for n in res["plan"].nodes}  # the einsums are in the main graph
        for name in weighted:
            assert name in plan and plan[name].quantized, \
                f"{mode}: Einsum {name} with a weight stays float: {plan[name].reason if name in plan else 'not planned'}"


def _float_nodes(res) -> dict[str, tuple[str, str]]:
    """Nodes of the source model with an op in FLOAT_OPS that the plan keeps float: name -> (op, reason)."""
    src = onnx.load(str(res["src"]), load_external_data=False)
    watched = {n.name for n, _ in all_nodes(src.graph) if n.op_type in FLOAT_OPS}
    plan = {n.name: n for n in (res["plan"].all_nodes() if hasattr(res["plan"], "all_nodes") else res["plan"].nodes)}
    missing = sorted(watched - set(plan))
    assert not missing, f"nodes of the model missing from the plan: {missing}"
    return {k: (plan[k].op_type, plan[k].reason) for k in sorted(watched) if not plan[k].quantized}


@pytest.mark.parametrize("name", list(CASES))
def test_explain_names_float_nodes(corpus, tmp_path_factory, name):
    res = quantized(corpus, tmp_path_factory, name, "static")
    lines = res["output"].splitlines()
    for node, (op, reason) in _float_nodes(res).items():
        assert reason.strip(), f"{node} ({op}) stays float without a reason"
        hits = [ln for ln in lines if ln.split()[:2] == [node, op]]
        assert hits and reason in hits[0] and " float " in hits[0], f"--explain does not name {node} ({op}) float"


def _inspect(res) -> str:
    r = invoke("inspect", res["src"])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_says_which_ops_stay_float_and_why(corpus, tmp_path_factory, name):
    """One note per op type and reason: "N OP node(s) stay float (names): reason", N agreeing with the plan."""
    res = quantized(corpus, tmp_path_factory, name, "static")
    text = _inspect(res)
    floats = {k: v for k, v in _float_nodes(res).items() if v[0] in FLOAT_OPS}  # not those rewritten (Einsum -> MatMul)
    notes = [(m.group(2), int(m.group(1)), m.group(3)) for m in
             re.finditer(r"^note: (\d+) (\w+) node\(s\) stay float(?: \(.*?\))?: (.+)$", text, re.M)]
    for op in sorted({op for op, _ in floats.values()}):
        count = sum(1 for o, _ in floats.values() if o == op)
        said = [(n, why) for o, n, why in notes if o == op]
        assert sum(n for n, _ in said) == count and all(why.strip() for _, why in said), \
            f"inspect does not say that {count} {op} node(s) stay float, and why:\n{text}"
        reasons = {r for o, r in floats.values() if o == op}
        for _, why in said:
            assert why in reasons, f"inspect and quantize --explain give {op} different reasons: {why!r} vs {sorted(reasons)}"


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_names_float_nodes(corpus, tmp_path_factory, name):
    """Every ConvTranspose/Einsum/LSTM/GRU/If/Loop node that stays float is named by inspect."""
    res = quantized(corpus, tmp_path_factory, name, "static")
    text = _inspect(res)
    for node, (op, _) in _float_nodes(res).items():
        if op in FLOAT_OPS:
            assert node in text, f"inspect does not name {node} ({op}), which stays float:\n{text}"
