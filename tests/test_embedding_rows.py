"""Embedding tables per row: a Gather of a constant table becomes onnxruntime's
GatherBlockQuantized (uint8, bits 8, one scale and zero point per row, or per power-of-two
block of a row), which dequantizes only the gathered rows; where it cannot, the table keeps
one 8-bit scale and its rows are gathered as 8-bit."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import models
import qtool
from plan_asserts import assert_model_matches_plan
from qtool.config import QuantizeOptions
from qtool.errors import PlanError
from qtool.plans import Action
from qtool.prepare import prepare
from qtool.rules.movement import row_block
from qtool.types import PerBlock, PerTensor

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[B, S] ids, int64[B, S] pos) => (float[B, S, 4] y) {
    e = Gather (words, ids)
    p = Gather (positions, pos)
    s = Add (e, p)
    y = MatMul (s, w)
}
"""


def _tables(rng):
    # rows whose magnitudes differ 1000x: one scale for the table leaves the small rows a few codes
    words = rng.normal(size=(64, 48)) * np.logspace(-3, 0, 64)[:, None]
    return {"words": words, "positions": rng.normal(size=(16, 32)) * 0.01, "w": rng.normal(size=(48, 4))}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    weights = _tables(rng)
    weights["positions"] = rng.normal(size=(16, 48)) * 0.01
    src = models.save(models._with_weights(TEXT, weights), d / "m.onnx")
    np.savez(d / "c.npz", ids=rng.integers(0, 64, (32, 16)), pos=np.tile(np.arange(16), (32, 1)))
    return src, d


def _rows(path, ids, pos):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [o.name for o in s.get_outputs()]
    return s.run(outs, {"ids": ids, "pos": pos})[0]


def test_row_block():
    assert [row_block(d) for d in (8, 16, 24, 32, 48, 384, 768, 1000)] == [None, 16, None, 32, 16, 128, 256, None]


def test_tables_are_gathered_per_row(model, tmp_path):
    src, d = model
    out = tmp_path / "q.onnx"
    result = qtool.quantize(src, out, data=d / "c.npz")
    plan = result.plan
    words, positions = plan.tensors["words"], plan.tensors["positions"]
    assert words.granularity == PerBlock(1, 16) and positions.granularity == PerBlock(1, 16)
    assert len(words.scale) == 64 * 3 and plan.node("Gather(e)").kernel == "GatherBlockQuantized"
    assert plan.tensors["e"].action is Action.SKIP  # float rows: the Add reads float
    q = onnx.load(out)
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["GatherBlockQuantized"] == 2 and ops["Gather"] == 0, ops
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: helper.get_attribute_value(a) for a in gbq.attribute} == \
        {"bits": 8, "block_size": 16, "gather_axis": 0, "quantize_axis": 1}
    assert_model_matches_plan(q, plan, prepare(src).model)
    onnx.checker.check_model(q)
    # every gathered row is within half a step of its own scale: the small rows keep their digits
    rng = np.random.default_rng(5)
    ids, pos = rng.integers(0, 64, (2, 16)), np.tile(np.arange(16), (2, 1))
    table = numpy_helper.to_array(next(t for t in onnx.load(src).graph.initializer if t.name == "words"))
    probe = helper.make_graph([n for n in q.graph.node if n.op_type == "GatherBlockQuantized"][:1], "p",
                              [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 16])],
                              [helper.make_tensor_value_info(gbq.output[0], onnx.TensorProto.FLOAT, None)],
                              [t for t in q.graph.initializer if t.name in gbq.input])
    pm = helper.make_model(probe, opset_imports=list(q.opset_import), ir_version=q.ir_version)
    got = ort.InferenceSession(pm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    err = np.abs(got - table[ids]).max(axis=-1)
    row_range = np.ptp(table, axis=1)[ids]
    assert np.all(err <= row_range / 255 * 0.51 + 1e-9)
    per_tensor_step = np.ptp(table) / 255
    small = row_range < per_tensor_step * 4
    assert small.any() and np.all(err[small] < per_tensor_step / 20)


def test_more_accurate_than_one_scale(model, tmp_path):
    """The summed embeddings themselves (the model's output here), per row against one scale."""
    _, d = model
    text = TEXT.replace("float[B, S, 4] y", "float[B, S, 48] s").replace("    y = MatMul (s, w)\n", "")
    rng = np.random.default_rng(0)
    weights = _tables(rng)
    weights["positions"] = rng.normal(size=(16, 48)) * 0.01
    del weights["w"]
    src = models.save(models._with_weights(text, weights), tmp_path / "m.onnx")
    per_row = tmp_path / "rows.onnx"
    qtool.quantize(src, per_row, data=d / "c.npz")
    one = tmp_path / "one.onnx"
    plan = qtool.quantize(src, one, data=d / "c.npz", options=QuantizeOptions(format="qoperator")).plan
    assert plan.tensors["words"].granularity == PerTensor() and plan.node("Gather(e)").kernel == "Gather"
    rng = np.random.default_rng(7)
    ids, pos = rng.integers(0, 64, (8, 16)), np.tile(np.arange(16), (8, 1))
    ref = _rows(src, ids, pos)
    err_rows, err_one = (np.abs(_rows(p, ids, pos) - ref).mean() for p in (per_row, one))
    assert err_rows < err_one / 2, (err_rows, err_one)


def test_saved_plan_reapplies_byte_for_byte_and_is_checked(model, tmp_path):
    src, d = model
    first = tmp_path / "a.onnx"
    qtool.quantize(src, first, data=d / "c.npz")
    result = qtool.quantize(src, first, data=d / "c.npz")
    (tmp_path / "p.json").write_text(result.plan.to_json())
    qtool.quantize(src, tmp_path / "b.onnx", plan=tmp_path / "p.json")
    assert first.read_bytes() == (tmp_path / "b.onnx").read_bytes()
    data = json.loads((tmp_path / "p.json").read_text())
    t = next(t for t in data["tensors"] if t["name"] == "words")
    t["scale"], t["zero_point"] = t["scale"][:-1], t["zero_point"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="per block of 16 needs 192 scales"):
        qtool.quantize(src, tmp_path / "c.onnx", plan=tmp_path / "bad.json")


@pytest.mark.parametrize("case", ["narrow", "tied"])
def test_one_scale_where_the_kernel_cannot_serve(tmp_path, case):
    """A row of 24 has no power-of-two block of 16 or more; a table a MatMul reads too keeps one layout."""
    rng = np.random.default_rng(2)
    if case == "narrow":
        text = TEXT
        weights = {"words": rng.normal(size=(64, 24)), "positions": rng.normal(size=(16, 24)),
                   "w": rng.normal(size=(24, 4))}
    else:  # the table is also a MatMul's weight (a tied output projection)
        text = TEXT.replace("int64[B, S] pos)", "int64[B, S] pos, float[N, 64] x)")
        text = text.replace("float[B, S, 4] y)", "float[B, S, 4] y, float[N, 32] u)")
        text = text.replace("y = MatMul (s, w)", "y = MatMul (s, w)\n    u = MatMul (x, words)")
        weights = {"words": rng.normal(size=(64, 32)), "positions": rng.normal(size=(16, 32)),
                   "w": rng.normal(size=(32, 4))}
    src = models.save(models._with_weights(text, weights), tmp_path / "m.onnx")
    feeds = {"ids": rng.integers(0, 64, (8, 16)), "pos": np.tile(np.arange(16), (8, 1))}
    if case == "tied":
        feeds["x"] = rng.normal(size=(8, 64)).astype(np.float32)
    np.savez(tmp_path / "c.npz", **feeds)
    plan = qtool.quantize(src, tmp_path / "q.onnx", data=tmp_path / "c.npz").plan
    node = plan.node("Gather(e)")
    if case == "narrow":
        assert node.kernel == "Gather" and plan.tensors["words"].granularity == PerTensor()
        assert plan.node("Gather(p)").kernel == "Gather"
    else:
        assert not node.quantized and "tied" in node.reason  # was: an internal error (a shared per-axis weight)
        assert plan.tensors["words"].granularity.axis == 1 and plan.node("MatMul(u)").quantized
        assert plan.node("Gather(p)").kernel == "GatherBlockQuantized"  # its table is read by Gathers only


def _dq_gather(axis_scales: bool):
    """DequantizeLinear (per row, axis 0) -> Gather, or GatherBlockQuantized, on a 256 x 64 table."""
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, (256, 64)).astype(np.uint8)
    s = (rng.random(256) + 0.5).astype(np.float32)
    z = rng.integers(0, 256, 256).astype(np.uint8)
    ids = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    if axis_scales:
        nodes = [helper.make_node("DequantizeLinear", ["t", "s", "z"], ["f"], axis=0),
                 helper.make_node("Gather", ["f", "ids"], ["y"])]
        inits = [numpy_helper.from_array(q, "t"), numpy_helper.from_array(s, "s"), numpy_helper.from_array(z, "z")]
        opsets = [helper.make_opsetid("", 17)]
    else:
        nodes = [helper.make_node("GatherBlockQuantized", ["t", "ids", "s", "z"], ["y"], domain="com.microsoft",
                                  bits=8, block_size=64, gather_axis=0, quantize_axis=1)]
        inits = [numpy_helper.from_array(q, "t"), numpy_helper.from_array(s[:, None], "s"),
                 numpy_helper.from_array(z[:, None], "z")]
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    m = helper.make_model(helper.make_graph(nodes, "g", [ids], [y], inits), opset_imports=opsets, ir_version=8)
    want = ((q.astype(np.float32) - z[:, None]) * s[:, None])
    return m, want


def test_onnxruntime_runs_uint8_gather_block_quantized_and_keeps_a_per_axis_dq(tmp_path):
    """What the choice rests on (onnxruntime 1.31, CPU EP): GatherBlockQuantized with bits 8 runs
    and dequantizes exactly; a per-axis DequantizeLinear before a Gather is not folded (its
    DropQDQNodes rule for Gather needs DQ -> Gather -> Q with one scale), so the optimised graph
    dequantizes the whole table on every run."""
    ids = np.array([0, 7, 255, 7])
    for axis_scales in (False, True):
        m, want = _dq_gather(axis_scales)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt{axis_scales}.onnx")
        so.log_severity_level = 3
        got = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"ids": ids})[0]
        np.testing.assert_array_equal(got, want[ids])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        if axis_scales:
            assert ops["DequantizeLinear"] == 1 and ops["Gather"] == 1, ops
        else:
            assert ops == Counter({"GatherBlockQuantized": 1}), ops
