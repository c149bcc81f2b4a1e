"""Weight-only int4 (--weights int4): packing and parameters against onnxruntime's own
MatMulNBits/GatherBlockQuantized kernels and quantizer, the error-minimising methods on real
weights, and the plan as the whole contract (saved, re-applied: the same bytes)."""

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import models
import qtool
from qtool import int4
from qtool.cli import main
from qtool.config import CalibrateOptions, QuantizeOptions
from qtool.errors import PlanError, QtoolError
from qtool.prepare import prepare
from qtool.weight_only import blocks_of, plan_int4, rows_of

MINILM = Path.home() / ".cache" / "qtool" / "minilm" / "model.onnx"


def session(path_or_model):
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def one_matmul(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def net(seed: int = 0) -> onnx.ModelProto:
    """An embedding table (40x96: 3 blocks of 32 per row), a MatMul (K 96, N 80), a transB Gemm
    with a bias (K 80: a short last block), a 48x48 MatMul the tests keep float by name, a
    MatMul too narrow for int4 (N 8) and one of two activations."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (int64[B, 6] ids) => (float[N, 8] y, float[B, 6, 6] att) {
        e = Gather (table, ids)
        h = MatMul (e, w1)
        hb = Add (h, b1)
        hr = Relu (hb)
        t = Transpose <perm = [0, 2, 1]> (hr)
        att = MatMul (hr, t)
        shape = Constant <value = int64[2] {-1, 80}> ()
        f = Reshape (hr, shape)
        g = Gemm <transB = 1> (f, w2, b2)
        k = MatMul (g, w4)
        y = MatMul (k, w3)
    }
    """
    w = {"table": rng.normal(0, 1.0, (40, 96)), "w1": rng.normal(0, 0.1, (96, 80)), "b1": rng.normal(0, 0.1, 80),
         "w2": rng.normal(0, 0.1, (48, 80)), "b2": rng.normal(0, 0.1, 48), "w4": rng.normal(0, 0.15, (48, 48)),
         "w3": rng.normal(0, 0.15, (48, 8))}
    return models._with_weights(text, w)


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("int4")
    path = models.save(net(), d / "net.onnx")
    rng = np.random.default_rng(3)
    np.savez(d / "calib.npz", ids=rng.integers(0, 40, (64, 6)).astype(np.int64))
    np.savez(d / "eval.npz", ids=rng.integers(0, 40, (32, 6)).astype(np.int64))
    return {"dir": d, "model": Path(path), "calib": d / "calib.npz", "eval": d / "eval.npz"}


# --------------------------------------------------------------------------- numbers and packing

def test_worked_example_and_roundf():
    q = int4.rtn(np.array([[-0.3, 0.0, 0.9]], np.float32), 16, symmetric=False)
    assert q.scales[0, 0] == np.float32(1.2) / np.float32(15) and q.zero_points[0, 0] == 4
    assert q.codes.tolist() == [[0, 4, 15]]
    np.testing.assert_allclose(q.dequantize(), [[-0.32, 0.0, 0.88]], rtol=1e-6)
    # C's roundf: halves away from zero, exact next to a half
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4999998], np.float32)
    assert int4.roundf(x).tolist() == [1, 2, 3, -1, -3, 0, 2]
    assert int4.quantize_codes(np.array([[0.5, 1.5, 2.5, 0.49999997]], np.float32), np.ones((1, 1), np.float32),
                               np.zeros((1, 1), np.uint8), 16).tolist() == [[1, 2, 3, 0]]


def test_symmetric_puts_the_extreme_on_code_zero_with_its_sign():
    m = np.array([[0.8, -0.7, 0.1] + [0.0] * 13, [-0.8, 0.7, 0.1] + [0.0] * 13], np.float32)
    q = int4.rtn(m, 16, symmetric=True)
    assert q.scales[0, 0] == np.float32(-0.1) and q.scales[1, 0] == np.float32(0.1)
    assert (q.zero_points == 8).all()
    assert q.codes[:, 0].tolist() == [0, 0] and q.codes[:, 1].tolist() == [15, 15]  # -8 and +7 both used
    np.testing.assert_allclose(q.dequantize()[:, :2], m[:, :2], rtol=1e-6)


def test_nibble_packing_order():
    assert int4.pack_nibbles(np.array([1, 2, 3], np.uint8)).tolist() == [0x21, 0x03]
    assert int4.packed_zero_points(np.array([[1, 2, 3]], np.uint8)).tolist() == [[0x21, 0x83]]  # unused nibble: 8
    codes = np.arange(40, dtype=np.uint8).reshape(2, 20) % 16
    b = int4.matmul_nbits_b(codes, 16)  # K 20: two blocks of 16, the second padded with code 0
    assert b.shape == (2, 2, 8) and b[0, 0, 0] == 0x10 and b[0, 1, 2] == 0 and b[0, 1, 1] == (3 << 4 | 2)
    assert (int4.unpack_nibbles(int4.pack_nibbles(codes), 20) == codes).all()


@pytest.mark.parametrize("k,n,block", [(384, 96, 32), (100, 64, 32), (300, 32, 128), (64, 48, 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_is_onnxruntime_quantizer_byte_for_byte(k, n, block, symmetric):
    """Same packed B, scales and zero points as onnxruntime's MatMulNBitsQuantizer (its C++
    BlockwiseQuantizer) on the same weights, short last blocks and all-zero blocks included."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    w = (np.random.default_rng(k + n).standard_normal((k, n)) * 0.05).astype(np.float32)
    w[:block, 0] = 0.0
    quantizer = MatMulNBitsQuantizer(one_matmul(w), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=symmetric))
    quantizer.process()
    graph = quantizer.model.model.graph
    node = next(nd for nd in graph.node if nd.op_type == "MatMulNBits")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    mine = int4.rtn(w.T, block, symmetric)
    assert np.array_equal(inits[node.input[1]], int4.matmul_nbits_b(mine.codes, block))
    assert np.array_equal(inits[node.input[2]].reshape(n, -1), mine.scales)
    if symmetric:
        assert len(node.input) < 4 or not node.input[3]
    else:
        assert np.array_equal(inits[node.input[3]].reshape(n, -1), int4.packed_zero_points(mine.zero_points))


# --------------------------------------------------------------------------- onnxruntime's kernels

def dequantized_weights(plan, model_path) -> dict[str, np.ndarray]:
    """Each quantized weight as the plan says it dequantizes, in its stored shape."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model_path)).graph.initializer}
    out = {}
    for name, t in plan.tensors.items():
        deq = blocks_of(t, inits[name]).dequantize()
        out[name] = rows_of(deq, t.granularity.axis)  # rows_of is its own inverse (a transpose or not)
    return out


@pytest.mark.parametrize("k,block", [(96, 32), (80, 32), (300, 128), (64, 16)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_computes_our_weights_bit_for_bit(tmp_path, k, block, symmetric):
    """One-hot rows of A read the weight back: MatMulNBits (CPU EP, accuracy_level 0) returns
    exactly the plan's dequantized weight, so packing, scales and zero points agree."""
    w = np.random.default_rng(k).normal(0, 0.05, (k, 48)).astype(np.float32)
    src = models.save(one_matmul(w), tmp_path / "mm.onnx")
    r = qtool.quantize(src, tmp_path / "mm4.onnx", options=QuantizeOptions(
        weights="int4", block_size=block, int4_symmetric=symmetric))
    assert ops(r.output) == {"MatMulNBits": 1}
    y = session(r.output).run(None, {"a": np.eye(k, dtype=np.float32)})[0]
    assert np.array_equal(y, dequantized_weights(r.plan, src)["w"])


def test_gather_block_quantized_returns_our_rows_bit_for_bit(tmp_path, net_files):
    r = qtool.quantize(net_files["model"], tmp_path / "n4.onnx", options=QuantizeOptions(weights="int4"))
    table = dequantized_weights(r.plan, net_files["model"])["table"]
    m = onnx.load(str(r.output))
    gbq = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    probe = helper.make_model(helper.make_graph(
        [gbq], "probe", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 6])],
        [helper.make_tensor_value_info(gbq.output[0], TensorProto.FLOAT, None)],
        [t for t in m.graph.initializer if t.name in gbq.input]), opset_imports=m.opset_import)
    probe.ir_version = 8
    ids = np.arange(36, dtype=np.int64).reshape(6, 6) % 40
    assert np.array_equal(session(probe).run(None, {"ids": ids})[0], table[ids])


# --------------------------------------------------------------------------- real weights

@pytest.fixture(scope="module")
def digits_mlp():
    """A 64-128-128-10 MLP trained (numpy, Adam) on scikit-learn's handwritten digits: real
    weights and real activations, always available. Returns weights and per-layer inputs."""
    from sklearn.datasets import load_digits
    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.data))
    x, y = (d.data[order] / 16.0).astype(np.float32), d.target[order]
    sizes = [64, 128, 128, 10]
    ws = [rng.normal(0, np.sqrt(2 / a), (a, b)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    params = ws + bs
    mom, var = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]

    def forward(inp):
        hs = [inp]
        for i, (w, b) in enumerate(zip(ws, bs)):
            inp = inp @ w + b
            inp = np.maximum(inp, 0) if i < len(ws) - 1 else inp
            hs.append(inp)
        return hs
    for step in range(1, 301):
        hs = forward(x[:1200])
        p = np.exp(hs[-1] - hs[-1].max(1, keepdims=True))
        g = p / p.sum(1, keepdims=True)
        g[np.arange(1200), y[:1200]] -= 1
        g /= 1200
        grads = [None] * 6
        for i in reversed(range(3)):
            grads[i], grads[3 + i] = hs[i].T @ g, g.sum(0)
            g = (g @ ws[i].T) * (hs[i] > 0) if i else g
        for j, (param, grad) in enumerate(zip(params, grads)):
            mom[j] = 0.9 * mom[j] + 0.1 * grad
            var[j] = 0.999 * var[j] + 0.001 * grad * grad
            param -= 0.01 * (mom[j] / (1 - 0.9 ** step)) / (np.sqrt(var[j] / (1 - 0.999 ** step)) + 1e-8)
    assert (forward(x[1200:])[-1].argmax(1) == y[1200:]).mean() > 0.95
    train, held = forward(x[:1200]), forward(x[1200:])
    return [(ws[i], train[i], held[i]) for i in range(2)]  # the two layers with K, N >= 16


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hqq_and_gptq_beat_round_to_nearest_on_trained_weights(digits_mlp, block, symmetric):
    """HQQ lowers the weights' reconstruction error; GPTQ, given the layer's training inputs,
    lowers its output error on held-out digits."""
    for w, x_train, x_held in digits_mlp:
        h = x_train.astype(np.float64).T @ x_train
        rtn, hqq, gptq = (int4.quantize(w.T, block, symmetric, m, h).dequantize().T for m in ("rtn", "hqq", "gptq"))

        def out_err(deq):
            return np.linalg.norm(x_held @ (deq - w)) / np.linalg.norm(x_held @ w)
        assert ((hqq - w) ** 2).mean() < 0.98 * ((rtn - w) ** 2).mean()
        assert out_err(gptq) < 0.8 * out_err(rtn)


@pytest.mark.skipif(not MINILM.exists(), reason="MiniLM is built by calibration/minilm/make.py")
def test_hqq_beats_round_to_nearest_on_minilm_weights():
    inits = {t.name: t for t in onnx.load(str(MINILM), load_external_data=False).graph.initializer}
    for name in ("encoder.layer.2.output.dense.weight", "encoder.layer.0.attention.self.query.weight"):
        w = numpy_helper.to_array(inits[name]).astype(np.float32).T
        rtn, hqq = int4.rtn(w, 32, False).dequantize(), int4.hqq(w, 32, False).dequantize()
        assert ((hqq - w) ** 2).mean() < 0.97 * ((rtn - w) ** 2).mean()


# --------------------------------------------------------------------------- the recipe end to end

def run_all(path, data):
    feeds = {"ids": np.load(data)["ids"]}
    return session(path).run(None, feeds)


def with_weights(path, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    return m


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_int4_model_kernels_checker_and_closeness(tmp_path, net_files, method):
    options = QuantizeOptions(weights="int4", int4_method=method, exclude=("MatMul(k)",))
    r = qtool.quantize(net_files["model"], tmp_path / "q.onnx", options=options,
                       data=net_files["calib"] if method == "gptq" else None)
    counts = ops(r.output)
    # w1 and the Gemm as MatMulNBits (+ the Gemm's bias Add); table as GatherBlockQuantized;
    # the excluded MatMul, the narrow one and the activation MatMul stay MatMul
    assert counts["MatMulNBits"] == 2 and counts["GatherBlockQuantized"] == 1 and counts["MatMul"] == 3
    assert counts["Add"] == 2 and "Gemm" not in counts and "Gather" not in counts
    m = onnx.load(str(r.output))
    onnx.checker.check_model(m, full_check=True)
    assert not {"table", "w1", "w2"} & {t.name for t in m.graph.initializer}  # float originals dropped
    reasons = {n.name: n.reason for n in r.plan.nodes}
    assert "kept float on request" in reasons["MatMul(k)"] and "at least 16" in reasons["MatMul(y)"]
    assert "no constant weight" in reasons["MatMul(att)"]
    # the model computes exactly the plan's dequantized weights (float reference with them) ...
    ref = with_weights(net_files["model"], dequantized_weights(r.plan, net_files["model"]))
    for got, want in zip(run_all(r.output, net_files["eval"]), run_all(ref, net_files["eval"])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # ... and stays close to fp32
    for got, want in zip(run_all(r.output, net_files["eval"]), run_all(net_files["model"], net_files["eval"])):
        cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
        assert cos > 0.98, cos


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_saved_plan_rebuilds_the_same_bytes(tmp_path, net_files, method):
    data = net_files["calib"] if method == "gptq" else None
    r = qtool.quantize(net_files["model"], tmp_path / "a.onnx", data=data,
                       options=QuantizeOptions(weights="int4", int4_method=method, block_size=16))
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(r.plan.to_json())
    again = qtool.quantize(net_files["model"], tmp_path / "b.onnx", plan=plan_path)
    assert sha(r.output) == sha(again.output)
    saved = json.loads(plan_path.read_text())
    weights = {t["name"]: t for t in saved["tensors"]}
    assert saved["mode"] == "weight-only" and set(weights) == {"table", "w1", "w2", "w4"}
    assert ("codes" in weights["w1"]) == (method == "gptq") and "codes" not in weights["table"]
    assert weights["w1"]["granularity"] == {"kind": "per-block", "axis": 0, "size": 16}
    assert weights["w2"]["granularity"] == {"kind": "per-block", "axis": 1, "size": 16}  # transB: K is axis 1
    assert weights["table"]["granularity"]["axis"] == 1


def test_gptq_codes_are_not_round_to_nearest_of_its_scales(tmp_path, net_files):
    """GPTQ moves values across rounding boundaries: its plan must carry the codes."""
    r = qtool.quantize(net_files["model"], tmp_path / "g.onnx", data=net_files["calib"],
                       options=QuantizeOptions(weights="int4", int4_method="gptq"))
    t = r.plan.tensors["w1"]
    w = numpy_helper.to_array(next(i for i in onnx.load(str(net_files["model"])).graph.initializer if i.name == "w1"))
    carried = blocks_of(t, w).codes
    from dataclasses import replace
    rounded = blocks_of(replace(t, codes=None), w).codes
    assert (carried != rounded).mean() > 0.05
    assert len(base64.b64decode(t.codes)) == w.size // 2


def test_cli_int4_save_plan_and_apply_it(tmp_path, net_files):
    runner = CliRunner()
    out, again, plan = tmp_path / "c.onnx", tmp_path / "d.onnx", tmp_path / "p.json"
    res = runner.invoke(main, ["quantize", str(net_files["model"]), "-o", str(out), "--weights", "int4",
                               "--int4-method", "hqq", "--block-size", "16", "--int4-symmetric",
                               "--save-plan", str(plan)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["quantize", str(net_files["model"]), "-o", str(again), "--plan", str(plan)])
    assert res.exit_code == 0, res.output
    assert sha(out) == sha(again)
    assert {t["precision"] for t in json.loads(plan.read_text())["tensors"]} == {"int4"}


def test_gptq_without_data_says_it_needs_data(tmp_path, net_files):
    with pytest.raises(QtoolError, match="gptq needs --data.*table"):
        qtool.quantize(net_files["model"], tmp_path / "x.onnx",
                       options=QuantizeOptions(weights="int4", int4_method="gptq"))
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["tensors"][0].update(scale=d["tensors"][0]["scale"][:-1]), "scales"),
    (lambda d: d["tensors"][0].update(zero_point=[16] * len(d["tensors"][0]["zero_point"])), "zero points"),
    (lambda d: d["tensors"][0].update(codes="AAAA"), "codes hold"),
    (lambda d: d["tensors"][0].update(granularity={"kind": "per-block", "axis": 0, "size": 24}), "per-block"),
    (lambda d: next(n for n in d["nodes"] if n["kernel"]).update(kernel="QLinearMatMul"), "only as"),
    (lambda d: next(n for n in d["nodes"] if n["op_type"] == "Gemm").update(bias=""), "bias"),
    (lambda d: d["nodes"].append(dict(d["nodes"][1])), "'MatMul\\(h\\)' is listed twice"),
])
def test_edited_plan_is_refused_with_the_reason(tmp_path, net_files, edit, message):
    r = qtool.quantize(net_files["model"], tmp_path / "a.onnx", options=QuantizeOptions(weights="int4"))
    d = r.plan.to_dict()
    edit(d)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=message):
        qtool.quantize(net_files["model"], tmp_path / "b.onnx", plan=path)


def test_cuda_target_names_the_matmuls_that_miss_the_fast_gemm(net_files):
    p = prepare(net_files["model"])
    plan = plan_int4(p, QuantizeOptions(target="cuda", weights="int4"), None, CalibrateOptions())
    reasons = {n.name: n.reason for n in plan.nodes}
    assert "N=80 is not a multiple of 64" in reasons["MatMul(h)"]
    assert "K=80 is not a multiple of the block size" in reasons["Gemm(g)"]
    assert any("miss CUDA's fpA_intB" in note for note in plan.notes)
    # 96 columns = 3 blocks per row: odd, so the table is stored symmetric on cuda (no zero points)
    assert plan.tensors["table"].symmetric and not plan.tensors["w1"].symmetric
    cpu = plan_int4(p, QuantizeOptions(weights="int4"), None, CalibrateOptions())
    assert not cpu.tensors["table"].symmetric and "fpA_intB" not in cpu.node_index["MatMul(h)"].reason


@pytest.mark.skipif(not MINILM.exists(), reason="MiniLM is built by calibration/minilm/make.py")
def test_minilm_int4_size_and_kernels(tmp_path):
    r = qtool.quantize(MINILM, tmp_path / "m4.onnx", options=QuantizeOptions(weights="int4", block_size=32))
    assert r.output.stat().st_size <= 0.35 * MINILM.stat().st_size
    counts = ops(r.output)
    assert counts["MatMulNBits"] == 36 and counts["GatherBlockQuantized"] == 2  # word + position tables
    with np.load(MINILM.parent / "bench.npz") as z:
        feeds = {k: z[k][:4] for k in z.files}
    got, want = session(r.output).run(None, feeds)[0], session(MINILM).run(None, feeds)[0]
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.mean() > 0.95


def test_default_method_uses_the_data_when_given(tmp_path, net_files):
    """No --int4-method: gptq when there is data to minimise the error on, round-to-nearest without."""
    with_data = qtool.quantize(net_files["model"], tmp_path / "g.onnx", data=net_files["calib"],
                               options=QuantizeOptions(weights="int4", block_size=16))
    without = qtool.quantize(net_files["model"], tmp_path / "r.onnx", options=QuantizeOptions(weights="int4",
                                                                                               block_size=16))
    assert any(t.codes for t in with_data.plan.tensors.values())  # gptq's own codes
    assert not any(t.codes for t in without.plan.tensors.values())
    assert any("gptq" in n.reason for n in with_data.plan.nodes)
    assert any("rtn" in n.reason for n in without.plan.nodes)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tied_table_read_by_a_gemm_too(tmp_path, method):
    """Tied embeddings: one table gathered and read by a transB Gemm. Each kernel gets its own
    layout (MatMulNBits' B is [N, blocks, block/2], GatherBlockQuantized's data [V, D/2]), and
    gptq's Hessian comes from the Gemm's input only (the Gemm is read first here)."""
    rng = np.random.default_rng(4)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    net (float[B, 64] x, int64[B] ids) => (float[B, 64] y) {
        g = Gemm <transB = 1> (x, table)
        e = Gather (table, ids)
        y = Add (g, e)
    }
    """
    path = models.save(models._with_weights(text, {"table": rng.normal(0, 1, (64, 64))}), tmp_path / "tied.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(0, 1, (16, 64)).astype(np.float32),
             ids=rng.integers(0, 64, 16).astype(np.int64))
    r = qtool.quantize(path, tmp_path / "t.onnx", data=tmp_path / "d.npz" if method == "gptq" else None,
                       options=QuantizeOptions(weights="int4", int4_method=method))
    assert ops(r.output) == {"MatMulNBits": 1, "GatherBlockQuantized": 1, "Add": 1}
    feeds = {"x": rng.normal(0, 1, (8, 64)).astype(np.float32), "ids": rng.integers(0, 64, 8).astype(np.int64)}
    got, want = session(r.output).run(None, feeds)[0], session(path).run(None, feeds)[0]
    assert (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want) > 0.98
    plan = tmp_path / "p.json"
    plan.write_text(r.plan.to_json())
    assert sha(qtool.quantize(path, tmp_path / "again.onnx", plan=plan).output) == sha(r.output)


def if_model() -> onnx.ModelProto:
    """A 64x64 MatMul, then an If whose branches each hold one more MatMul."""
    rng = np.random.default_rng(6)

    def branch(name, w):
        return helper.make_graph([helper.make_node("MatMul", ["h", w], [f"{name}_o"], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_o", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
             helper.make_node("ReduceSum", ["s"], ["s2"], keepdims=0, name="rs2"),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.float32)),
                              name="c0"),
             helper.make_node("Greater", ["s2", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", "w1"),
                              else_branch=branch("else", "w2"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 64])],
                          [numpy_helper.from_array(rng.normal(0, .1, (64, 64)).astype(np.float32), n)
                           for n in ("w0", "w1", "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_cuda_int4_plan_with_fp16_bodies_reapplies(tmp_path):
    """--target cuda --weights int4 on a model with If bodies: the fp16 pass plans the bodies, and
    --plan takes that plan back (it refused any subgraphs) and rebuilds the same bytes; a body
    plan with an int4 node is refused (int4 plans the main graph only)."""
    path = models.save(if_model(), tmp_path / "if.onnx")
    r = qtool.quantize(path, tmp_path / "a.onnx", options=QuantizeOptions(target="cuda", weights="int4"))
    assert ops(r.output)["MatMulNBits"] == 1 and set(r.plan.subgraphs) == {"if/then_branch", "if/else_branch"}
    plan = tmp_path / "p.json"
    plan.write_text(r.plan.to_json())
    assert sha(qtool.quantize(path, tmp_path / "b.onnx", plan=plan).output) == sha(r.output)
    x = np.random.default_rng(7).normal(0, 1, (8, 64)).astype(np.float32)
    got, want = session(r.output).run(None, {"x": x})[0], session(path).run(None, {"x": x})[0]
    assert (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want) > 0.98
    d = json.loads(plan.read_text())
    d["subgraphs"]["if/then_branch"]["nodes"][0].update(precision="uint4", kernel="MatMulNBits", inputs=["w1"])
    plan.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="subgraph 'if/then_branch'.*main graph only"):
        qtool.quantize(path, tmp_path / "c.onnx", plan=plan)
    # a body's node named in --exclude is no error (int4 leaves bodies float; the fp16 pass keeps it fp32)
    r = qtool.quantize(path, tmp_path / "d.onnx", options=QuantizeOptions(target="cuda", weights="int4",
                                                                       exclude=("then_mm",)))
    assert r.plan.subgraphs["if/then_branch"].node("then_mm").precision.label == "float"
