"""A float node reads a float-produced tensor as it is, not through the DequantizeLinear that its
quantized readers share (the residual Adds of a transformer read the LayerNorm outputs that the next
MatMuls quantize). The error this saves is measured on MiniLM in docs/design.md (mean cosine
0.98746 -> 0.99181); here the structure: which reads are raw, and that quantized readers keep theirs."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner

from qtool.cli import main

DATA = Path(__file__).parent / "data"


def _outputs(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_float_readers_of_float_produced_tensors_read_them_unquantized(tmp_path):
    model = DATA / "tiny_encoder.onnx"
    m = onnx.load(model)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in m.graph.input:
        shape = [d.dim_value or 4 for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            feeds[i.name] = rng.integers(0, 8, shape).astype(np.int64)
    np.savez(tmp_path / "calib.npz", **feeds)
    q, plan = tmp_path / "q.onnx", tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["quantize", str(model), "-o", str(q), "--data", str(tmp_path / "calib.npz"),
                                  "--save-plan", str(plan)])
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())
    nodes = {n["name"]: n for n in saved["nodes"]}
    quantized = {t["name"] for t in saved["tensors"] if t.get("action") == "quantize" and t.get("role") == "activation"}
    producer = {o: n.name for n in m.graph.node for o in n.output}
    float_nodes = {name for name, n in nodes.items() if n["precision"] == "float"}
    expected = {(name, t) for name in float_nodes for t in next(n for n in m.graph.node if n.name == name).input
                if t in quantized and producer.get(t) in float_nodes}
    assert expected, "the encoder has float readers of float-produced quantized tensors (its residual Adds)"
    for name, t in expected:
        assert t in nodes[name].get("float_inputs", []), (name, t)
    written = onnx.load(q).graph.node
    qnodes = {n.name: n for n in written}
    for name, t in expected:
        assert t in qnodes[name].input, f"{name} reads {t} through a DequantizeLinear"
    # the quantized readers of the same tensors still read them quantized, and the model still runs
    made = {o: n.op_type for n in written for o in n.output}
    assert any(made.get(n.input[0]) == "DequantizeLinear" for n in written if n.op_type == "MatMul")
    assert np.isfinite(_outputs(q, feeds)).all()
