"""MatMul-shaped Einsum is rewritten as MatMul (exactly), and then quantized as one."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from qtool.cli import main
from qtool.preprocess.einsum import matmul_form, rewrite_einsum


def einsum_model(eq, sa, sb, const, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    inputs = [h.make_tensor_value_info("a", T.FLOAT, sa)]
    inits = [nh.from_array(b, "b")] if const else []
    if not const:
        inputs.append(h.make_tensor_value_info("b", T.FLOAT, sb))
    g = h.make_graph([h.make_node("Einsum", ["a", "b"], ["y"], equation=eq)], "g", inputs,
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m), ({"a": a} if const else {"a": a, "b": b}), np.einsum(eq, a, b)


CASES = [  # equation, shape a, shape b, b constant, rewritten
    ("bij,bjk->bik", (2, 3, 4), (2, 4, 5), False, True),
    ("bhqd,bhkd->bhqk", (2, 3, 4, 5), (2, 3, 6, 5), False, True),
    ("bsd,df->bsf", (2, 3, 4), (4, 5), True, True),
    ("bsd,fd->bsf", (2, 3, 4), (5, 4), True, True),
    ("...d,df->...f", (2, 3, 4), (4, 5), True, True),
    ("bqk,bkd->bdq", (2, 3, 4), (2, 4, 5), False, True),
    ("hbd,bdf->bhf", (2, 3, 4), (3, 4, 5), False, True),
    ("bij,bjk->bk", (2, 3, 4), (2, 4, 5), False, False),   # sums i away
    ("ii,ij->ij", (3, 3), (3, 3), False, False),            # a diagonal
    ("bchw,bchw->bc", (2, 3, 4, 5), (2, 3, 4, 5), False, False),  # two contracted letters
]


@pytest.mark.parametrize("eq,sa,sb,const,rewritten", CASES)
def test_rewrite_is_exact(eq, sa, sb, const, rewritten):
    m, feeds, ref = einsum_model(eq, sa, sb, const)
    r, note = rewrite_einsum(m)
    ops = [n.op_type for n in r.graph.node]
    assert ("Einsum" not in ops) == rewritten, ops
    onnx.checker.check_model(r, full_check=True)
    got = ort.InferenceSession(r.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    if const and rewritten:
        assert "Transpose" not in ops  # a constant operand is transposed in place


@settings(max_examples=40, deadline=None)
@given(st.permutations("bmkn"), st.permutations("bmk"), st.permutations("bkn"), st.booleans())
def test_random_matmul_shaped_equations(out, a, b, drop_batch):
    """Any letter order of a batched matmul is rewritten, and computes what np.einsum does."""
    a, b, out = "".join(a), "".join(b), "".join(c for c in out if c != "k")
    if drop_batch:
        a, b, out = a.replace("b", ""), b.replace("b", ""), out.replace("b", "")
    size = {"b": 2, "m": 3, "k": 4, "n": 5}
    eq = f"{a},{b}->{out}"
    assert matmul_form(eq, len(a), len(b)) is not None
    m, feeds, ref = einsum_model(eq, tuple(size[c] for c in a), tuple(size[c] for c in b), False)
    r, _ = rewrite_einsum(m)
    got = ort.InferenceSession(r.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_einsum_layer_is_quantized(tmp_path):
    """A linear layer written as Einsum ("bsd,fd->bsf") is quantized as a MatMul, close to float."""
    m, feeds, ref = einsum_model("bsd,fd->bsf", (16, 8, 32), (24, 32), True)
    src = tmp_path / "e.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "d.npz", **feeds)
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(main, ["quantize", str(src), "--data", str(tmp_path / "d.npz"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    q = onnx.load(str(out))
    assert "MatMul" in {n.op_type for n in q.graph.node} and "Einsum" not in {n.op_type for n in q.graph.node}
    assert any(t.data_type in (T.INT8, T.UINT8) and len(t.dims) == 2 for t in q.graph.initializer)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    snr = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
    assert snr > 25, snr


def test_rewrite_keeps_names_unique_and_shared_operands_exact():
    """A node already named like the Transpose the rewrite adds, and one constant read as
    both operands (a Gram matrix), which must not be transposed in place."""
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    g = h.make_graph([h.make_node("Einsum", ["a", "b"], ["t"], equation="ij,kj->ik", name="ein"),
                      h.make_node("Identity", ["t"], ["u"], name="ein_b_transposed"),
                      h.make_node("Einsum", ["w", "w"], ["gram"], equation="ij,kj->ik", name="gram"),
                      h.make_node("MatMul", ["u", "gram"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("a", T.FLOAT, [3, 4]), h.make_tensor_value_info("b", T.FLOAT, [3, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)
    r, _ = rewrite_einsum(m)
    names = [n.name for n in r.graph.node if n.name]
    assert len(names) == len(set(names)), names
    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal((3, 4)).astype(np.float32)}
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(r.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
