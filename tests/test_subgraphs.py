"""Nodes inside If branches and Loop/Scan bodies are planned, calibrated through the outer
graph's runs, and quantized (issue 9); what cannot be calibrated stays float with the reason."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from qtool.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def if_model(seed=0):
    """cond = mean(x) > 0; then: Conv(w1)-Relu-Conv(w2)-Relu; else: Conv(w3)-Relu-Conv(w2)-Relu
    (w2 shared, read from the outer graph); then GlobalAveragePool-Flatten-Gemm."""
    rng = np.random.default_rng(seed)
    vi = h.make_tensor_value_info

    def branch(tag, w):
        return h.make_graph([h.make_node("Conv", ["x", w, f"b{tag}"], [f"c{tag}"], pads=[1, 1, 1, 1], name=f"conv_{tag}"),
                             h.make_node("Relu", [f"c{tag}"], [f"r{tag}"], name=f"relu_{tag}"),
                             h.make_node("Conv", [f"r{tag}", "w2", "b2"], [f"d{tag}"], pads=[1, 1, 1, 1],
                                         name=f"conv2_{tag}"),
                             h.make_node("Relu", [f"d{tag}"], [f"o{tag}"], name=f"relu2_{tag}")],
                            f"branch_{tag}", [], [vi(f"o{tag}", T.FLOAT, None)])
    nodes = [h.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
             h.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             h.make_node("If", ["cond"], ["y"], then_branch=branch("a", "w1"), else_branch=branch("b", "w3"), name="if"),
             h.make_node("GlobalAveragePool", ["y"], ["p"], name="gap"),
             h.make_node("Flatten", ["p"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "w4", "b4"], ["logits"], name="head")]
    w = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "w3": rng.normal(0, 0.3, (8, 3, 3, 3)),
         "w2": rng.normal(0, 0.2, (8, 8, 3, 3)), "w4": rng.normal(0, 0.3, (8, 4)),
         "ba": rng.normal(0, 0.1, 8), "bb": rng.normal(0, 0.1, 8), "b2": rng.normal(0, 0.1, 8),
         "b4": rng.normal(0, 0.1, 4), "zero": np.float32(0)}
    inits = [nh.from_array(np.asarray(v, np.float32), k) for k, v in w.items()]
    g = h.make_graph(nodes, "ifnet", [vi("x", T.FLOAT, ["N", 3, 8, 8])], [vi("logits", T.FLOAT, ["N", 4])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def loop_model(seed=0, steps=3):
    """h = relu(x @ w_in); repeat 3 times: h = tanh(h @ w_cell + b) + h (w_cell read from outside); y = h @ w_out."""
    rng = np.random.default_rng(seed)
    vi = h.make_tensor_value_info
    body = h.make_graph([h.make_node("MatMul", ["h_in", "w_cell"], ["mm"], name="cell_matmul"),
                         h.make_node("Add", ["mm", "b_cell"], ["pre"], name="cell_add"),
                         h.make_node("Tanh", ["pre"], ["t"], name="cell_tanh"),
                         h.make_node("Add", ["t", "h_in"], ["h_out"], name="residual"),
                         h.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
                        "body", [vi("i", T.INT64, []), vi("cond_in", T.BOOL, []), vi("h_in", T.FLOAT, ["N", 32])],
                        [vi("cond_out", T.BOOL, []), vi("h_out", T.FLOAT, ["N", 32])])
    nodes = [h.make_node("MatMul", ["x", "w_in"], ["a"], name="in_matmul"),
             h.make_node("Relu", ["a"], ["h0"], name="in_relu"),
             h.make_node("Loop", ["trips", "", "h0"], ["h"], body=body, name="loop"),
             h.make_node("MatMul", ["h", "w_out"], ["y"], name="out_matmul")]
    w = {"w_in": rng.normal(0, 0.3, (16, 32)), "w_cell": rng.normal(0, 0.15, (32, 32)),
         "b_cell": rng.normal(0, 0.1, 32), "w_out": rng.normal(0, 0.3, (32, 5))}
    inits = [nh.from_array(np.asarray(v, np.float32), k) for k, v in w.items()]
    inits.append(nh.from_array(np.array(steps, np.int64), "trips"))
    g = h.make_graph(nodes, "loopnet", [vi("x", T.FLOAT, ["N", 16])], [vi("y", T.FLOAT, ["N", 5])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def snr_db(ref, got):
    return 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum())


def body_ops(path):
    m = onnx.load(str(path))
    return {f"{n.name}/{a.name}": [k.op_type for k in a.g.node] for n in m.graph.node for a in n.attribute
            if a.type == onnx.AttributeProto.GRAPH}


@pytest.fixture
def if_files(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(if_model(), src)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3, 8, 8)).astype(np.float32)
    x[:16] += 0.5  # batches of 8: the first two take the then branch, the last two the else branch
    x[16:] -= 0.5
    np.savez(tmp_path / "d.npz", x=x)
    return src, x


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_if_branches_are_calibrated_and_quantized(if_files, tmp_path, fmt):
    src, x = if_files
    table = tmp_path / "t.json"
    r = cli("calibrate", src, "--data", tmp_path / "d.npz", "--batch-size", 8, "-o", table)
    assert r.exit_code == 0, r.output
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--table", table, "-o", out, "--format", fmt, "--save-plan", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(out), full_check=True)
    ops = body_ops(out)
    for key in ("if/then_branch", "if/else_branch"):  # both branches ran, both are quantized
        assert any(op in ("DequantizeLinear", "QLinearConv") for op in ops[key]), (key, ops[key])
    assert snr_db(run(src, {"x": x}), run(out, {"x": x})) > 25
    inspect = cli("inspect", src).output
    n = r.output.split(": ")[1].split(" of ")[0]
    assert f"quantizable {n} of" in inspect  # inspect counts the branches' nodes as quantize does
    again = tmp_path / "again.onnx"
    r = cli("quantize", src, "--plan", tmp_path / "p.json", "-o", again)
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()


def test_branch_never_taken_stays_float_with_the_reason(if_files, tmp_path):
    src, x = if_files
    np.savez(tmp_path / "pos.npz", x=np.abs(x) + 0.1)  # every batch takes the then branch
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "pos.npz", "-o", out, "--explain")
    assert r.exit_code == 0, r.output
    assert "never ran on the calibration data" in r.output
    ops = body_ops(out)
    assert "DequantizeLinear" in ops["if/then_branch"] and "DequantizeLinear" not in ops["if/else_branch"]
    assert snr_db(run(src, {"x": x}), run(out, {"x": x})) > 25


def test_exclude_names_a_node_inside_a_branch(if_files, tmp_path):
    src, _ = if_files
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out, "--exclude", "conv_a", "--explain")
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.strip().startswith("conv_a "))
    assert "kept float on request" in line
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out, "--exclude", "conv_zz")
    assert r.exit_code == 2 and "matches no node name" in r.output


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_loop_body_is_quantized(tmp_path, mode):
    src = tmp_path / "loop.onnx"
    onnx.save(loop_model(), src)
    x = np.random.default_rng(2).normal(size=(32, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "q.onnx"
    args = ["--data", tmp_path / "d.npz"] if mode == "static" else ["--mode", "dynamic"]
    r = cli("quantize", src, "-o", out, *args)
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(out), full_check=True)
    body = body_ops(out)["loop/body"]
    wanted = "DequantizeLinear" if mode == "static" else "DynamicQuantizeMatMul"
    assert wanted in body, body
    assert snr_db(run(src, {"x": x}), run(out, {"x": x})) > 25
    # the weight the body read from the outer graph is stored once, as 8-bit, not also as float
    q = onnx.load(str(out))
    assert "w_cell" not in {t.name for t in q.graph.initializer}


def test_scan_body_is_quantized(tmp_path):
    """Scan over the sequence axis with a MatMul cell: calibrated through the Scan's stacked outputs."""
    rng = np.random.default_rng(3)
    vi = h.make_tensor_value_info
    body = h.make_graph([h.make_node("MatMul", ["x_t", "w"], ["m"], name="scan_matmul"),
                         h.make_node("Add", ["m", "s_in"], ["s_out"], name="scan_add"),
                         h.make_node("Relu", ["s_out"], ["y_t"], name="scan_relu")],
                        "body", [vi("s_in", T.FLOAT, ["N", 8]), vi("x_t", T.FLOAT, ["N", 12])],
                        [vi("s_out", T.FLOAT, ["N", 8]), vi("y_t", T.FLOAT, ["N", 8])])
    g = h.make_graph([h.make_node("Scan", ["s0", "x"], ["s", "ys"], body=body, num_scan_inputs=1,
                                  scan_input_axes=[1], scan_output_axes=[1], name="scan")], "scannet",
                     [vi("s0", T.FLOAT, ["N", 8]), vi("x", T.FLOAT, ["N", 5, 12])],
                     [vi("s", T.FLOAT, ["N", 8]), vi("ys", T.FLOAT, ["N", 5, 8])],
                     [nh.from_array(rng.normal(0, 0.3, (12, 8)).astype(np.float32), "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    src = tmp_path / "scan.onnx"
    onnx.save(m, src)
    feeds = {"s0": np.zeros((16, 8), np.float32), "x": rng.normal(size=(16, 5, 12)).astype(np.float32)}
    np.savez(tmp_path / "d.npz", **feeds)
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--data", tmp_path / "d.npz", "-o", out)
    assert r.exit_code == 0, r.output
    onnx.checker.check_model(str(out), full_check=True)
    assert "DequantizeLinear" in body_ops(out)["scan/body"]
    assert snr_db(run(src, feeds), run(out, feeds)) > 25


def test_loop_whose_state_grows_is_calibrated_without_its_body(tmp_path):
    """A Loop whose carried tensor grows each iteration (a decoder appending to its output):
    its stacked per-iteration tensors cannot be exposed, so calibration runs without them,
    says so, and the body stays float with the reason."""
    rng = np.random.default_rng(4)
    vi = h.make_tensor_value_info
    body = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="step_matmul"),
                         h.make_node("Concat", ["h_in", "y"], ["h_out"], axis=1, name="append"),
                         h.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going")],
                        "body", [vi("i", T.INT64, []), vi("cond_in", T.BOOL, []), vi("h_in", T.FLOAT, ["N", None])],
                        [vi("cond_out", T.BOOL, []), vi("h_out", T.FLOAT, ["N", None])])
    nodes = [h.make_node("MatMul", ["x", "w0"], ["h0"], name="first"),
             h.make_node("Loop", ["trips", "", "h0"], ["h"], body=body, name="loop"),
             h.make_node("MatMul", ["h", "w_out"], ["out"], name="head")]
    inits = [nh.from_array(rng.normal(0, 0.3, (16, 4)).astype(np.float32), "w"),
             nh.from_array(rng.normal(0, 0.3, (16, 4)).astype(np.float32), "w0"),
             nh.from_array(rng.normal(0, 0.3, (16, 3)).astype(np.float32), "w_out"),
             nh.from_array(np.array(3, np.int64), "trips")]
    g = h.make_graph(nodes, "grow", [vi("x", T.FLOAT, ["N", 16])], [vi("out", T.FLOAT, ["N", 3])], inits)
    src = tmp_path / "grow.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), src)
    x = rng.normal(size=(16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    table = tmp_path / "t.json"
    r = cli("calibrate", src, "--data", tmp_path / "d.npz", "-o", table)
    assert r.exit_code == 0, r.output
    import json
    notes = json.loads(table.read_text())["notes"]
    assert any("subgraphs' tensors exposed" in n for n in notes), notes
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "--table", table, "-o", out, "--explain")
    assert r.exit_code == 0, r.output
    assert "could not be observed" in r.output
    assert snr_db(run(src, {"x": x}), run(out, {"x": x})) > 25


def test_sibling_bodies_reusing_names_get_their_own_statistics(tmp_path):
    """Two Loops whose bodies reuse tensor names (legal in ONNX), the second on values 1000x
    larger, and an If whose branches both name their output 'o': every body is calibrated
    and quantized with its own ranges."""
    rng = np.random.default_rng(5)
    vi = h.make_tensor_value_info

    def body(w):
        return h.make_graph([h.make_node("MatMul", ["h_in", w], ["mm"]), h.make_node("Relu", ["mm"], ["h_out"]),
                             h.make_node("Identity", ["c_in"], ["c_out"])], "body",
                            [vi("i", T.INT64, []), vi("c_in", T.BOOL, []), vi("h_in", T.FLOAT, ["N", 8])],
                            [vi("c_out", T.BOOL, []), vi("h_out", T.FLOAT, ["N", 8])])

    def branch(w, name):
        return h.make_graph([h.make_node("MatMul", ["x", w], ["o"], name=name)], name, [], [vi("o", T.FLOAT, None)])
    nodes = [h.make_node("Loop", ["trips", "", "x"], ["h1"], body=body("w1"), name="loop1"),
             h.make_node("Mul", ["x", "big"], ["xb"], name="scale"),
             h.make_node("Loop", ["trips", "", "xb"], ["h2"], body=body("w2"), name="loop2"),
             h.make_node("ReduceMean", ["x"], ["m"], keepdims=0, name="mean"),
             h.make_node("Greater", ["m", "zero"], ["cond"], name="gt"),
             h.make_node("If", ["cond"], ["h3"], then_branch=branch("w1", "then_mm"),
                         else_branch=branch("w2", "else_mm"), name="if"),
             h.make_node("Concat", ["h1", "h2", "h3"], ["out"], axis=1, name="cat")]
    inits = [nh.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "w1"),
             nh.from_array(rng.normal(0, 0.4, (8, 8)).astype(np.float32), "w2"),
             nh.from_array(np.float32(1000), "big"), nh.from_array(np.float32(0), "zero"),
             nh.from_array(np.array(2, np.int64), "trips")]
    g = h.make_graph(nodes, "siblings", [vi("x", T.FLOAT, ["N", 8])], [vi("out", T.FLOAT, ["N", 24])], inits)
    src = tmp_path / "s.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), src)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    x[:16] += 0.5
    x[16:] -= 0.5
    np.savez(tmp_path / "d.npz", x=x)
    ref = run(src, {"x": x})
    for fmt in ("qdq", "qoperator"):
        table = tmp_path / f"{fmt}.json"
        assert cli("calibrate", src, "--data", tmp_path / "d.npz", "--batch-size", 8, "-o", table).exit_code == 0
        out = tmp_path / f"{fmt}.onnx"
        r = cli("quantize", src, "--table", table, "-o", out, "--format", fmt)
        assert r.exit_code == 0, r.output
        onnx.checker.check_model(str(out), full_check=True)
        got = run(out, {"x": x})
        for part in range(3):  # each Loop's and the If's output on its own
            cols = slice(8 * part, 8 * part + 8)
            assert snr_db(ref[:, cols], got[:, cols]) > 25, (fmt, part)
