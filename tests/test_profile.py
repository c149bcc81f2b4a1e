"""qtool.profile: every planned group gets its measured time, onnxruntime's nodes mapped back.

No assertion says which side is faster: these machines are noisy."""

import numpy as np
import pytest

import models
from qtool import profile
from qtool.api import _apply, _plan_for
from qtool.config import CalibrateOptions, QuantizeOptions
from qtool.profile import UNATTRIBUTED, NodeCost


def _costs(cnn_files, **options):
    plan, p, _ = _plan_for(cnn_files["model"], cnn_files["table"], None, QuantizeOptions(**options),
                           CalibrateOptions(), None, None)
    candidate = _apply(plan, p.model)
    feeds = models.random_inputs(p.model, 2, seed=3)
    return plan, profile.node_costs(p.model, candidate, plan, feeds, threads=1, runs=3, warmup=1)


def _covered(plan, costs):
    """Every quantized plan node heads a NodeCost or is fused into one."""
    named = {c.node for c in costs} | {m for c in costs for m in c.members}
    return [n.name for n in plan.quantized_nodes() if n.name not in named]


def test_every_quantized_group_is_measured(cnn_files):
    plan, costs = _costs(cnn_files)
    assert _covered(plan, costs) == []
    assert all(c.float_ms >= 0 and c.int8_ms >= 0 for c in costs)
    # everything onnxruntime ran for this CNN maps back to a plan node: no unattributed bucket
    assert UNATTRIBUTED not in {c.node for c in costs}
    by_node = {c.node: c for c in costs}
    conv2 = by_node["Conv(c2)"]
    assert conv2.quantized and "Relu(r2)" in conv2.members
    assert "QLinearConv" in conv2.detail and "Conv" in conv2.float_detail
    gemm = by_node["Gemm(g1)"]
    assert "QGemm" in gemm.detail and "Gemm" in gemm.float_detail
    # the first Conv's group holds the input's QuantizeLinear (nothing else quantizes the input)
    assert "QuantizeLinear" in by_node["Conv(c1)"].detail
    assert sum(c.int8_ms for c in costs) > 0 and sum(c.float_ms for c in costs) > 0


def test_unfused_group_gets_its_q_and_dq(cnn_files):
    """int16 has no integer Conv on the CPU EP: onnxruntime runs DQ -> float Conv -> Q, all three
    attributed to that Conv's group."""
    plan, costs = _costs(cnn_files, precision=("Conv(c2)=int16",))
    assert plan.node("Conv(c2)").precision.bits == 16
    assert _covered(plan, costs) == []
    c2 = next(c for c in costs if c.node == "Conv(c2)")
    assert "DequantizeLinear" in c2.detail and "QuantizeLinear" in c2.detail
    assert "Conv[float]" in c2.detail or "FusedConv[float]" in c2.detail
    assert UNATTRIBUTED not in {c.node for c in costs}


def test_float_groups_are_reported_too(cnn_files):
    plan, costs = _costs(cnn_files, precision=("Conv(c1)=fp32",))
    c1 = next(c for c in costs if c.node == "Conv(c1)")
    assert not c1.quantized and c1.float_ms > 0 and c1.int8_ms > 0
    assert _covered(plan, costs) == []


def test_name_keys_follow_onnxruntime_naming():
    assert profile._name_keys("/conv1/Conv_token_12") == ["/conv1/Conv_token_12", "/conv1/Conv"]
    assert profile._name_keys("/relu1/Relu_output_0_nchwc") == ["/relu1/Relu_output_0_nchwc",
                                                                 "/relu1/Relu_output_0"]
    assert profile._name_keys("fused /fc1/Gemm") == ["fused /fc1/Gemm", "/fc1/Gemm"]
    assert profile._name_keys("Conv(c1)") == ["Conv(c1)"]
    assert [profile._base_op(o) for o in ("QLinearConv", "NhwcMaxPool", "FusedConv", "QGemm", "Gemm",
                                          "QuantizeLinear")] == ["Conv", "MaxPool", "Conv", "Gemm", "Gemm",
                                                                 "QuantizeLinear"]


def test_slower_groups_needs_a_margin_beyond_noise():
    def cost(name, f, q, lo, quantized=True):
        return NodeCost(name, "Conv", f, q, "", quantized, (), "", lo, lo + 0.01)
    costs = [cost("slow", 0.10, 0.20, 0.08), cost("noisy", 0.10, 0.20, -0.01), cost("close", 0.10, 0.105, 0.004),
             cost("fast", 0.20, 0.10, -0.11), cost("float", 0.01, 0.05, 0.03, quantized=False),
             cost("slower", 0.10, 0.40, 0.25), cost(UNATTRIBUTED, 0.0, 0.1, 0.09, quantized=False)]
    assert [c.node for c in profile.slower_groups(costs)] == ["slower", "slow"]
    assert [c.node for c in profile.slower_groups(costs, include_float=True)] == ["slower", "slow", "float"]


def test_paired_speedup_is_a_ratio_band(cnn_files):
    plan, p, _ = _plan_for(cnn_files["model"], cnn_files["table"], None, QuantizeOptions(), CalibrateOptions(),
                           None, None)
    candidate = _apply(plan, p.model)
    median, p10, p90 = profile.paired_speedup(p.model, candidate, models.random_inputs(p.model, 1),
                                              threads=1, pairs=6, warmup=1)
    assert 0 < p10 <= median <= p90 and np.isfinite(p90)


def test_format_costs_lists_every_group(cnn_files):
    plan, costs = _costs(cnn_files)
    table = profile.format_costs(costs)
    assert all(c.node in table for c in costs)


@pytest.mark.parametrize("op", ["QuantizeLinear", "Transpose"])
def test_generated_nodes_go_to_their_neighbours(op):
    """A node onnxruntime generated (no known name or tensor) joins the one group it feeds."""
    import onnx
    from onnx import helper
    from qtool.plans import NodePlan, Plan
    from qtool.types import Precision
    base = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]))
    plan = Plan({}, (NodePlan("conv", "Conv", Precision.parse("uint8"), ""),))
    opt = helper.make_model(helper.make_graph(
        [helper.make_node(op, ["x"], ["t0"], name=f"{op}_token_3"),
         helper.make_node("QLinearConv", ["t0"], ["y"], name="conv_token_4", domain="com.microsoft")], "g",
        [], []))
    owners = profile._optimized_owners(opt, profile._Base(base, plan, profile._groups(plan)))
    assert owners == {f"{op}_token_3": "conv", "conv_token_4": "conv"}


def test_groups_one_side_fuses_are_judged_together():
    """fp32 adds a residual Add into its NCHWc Conv, int8 runs QLinearConv + QLinearAdd: the Add alone
    looks infinitely slower; the pair is compared as a whole."""
    conv = NodeCost("conv", "Conv", 0.30, 0.20, "", True, (), "", -0.12, -0.08, ("add",))
    add = NodeCost("add", "Add", 0.0, 0.05, "", True, (), "", 0.04, 0.06, ("conv",))
    assert profile.slower_groups([conv, add]) == []
    slow_conv = NodeCost("conv", "Conv", 0.30, 0.40, "", True, (), "", 0.08, 0.12, ("add",))
    assert {c.node for c in profile.slower_groups([slow_conv, add])} == {"conv", "add"}


def _event(name, op, ts, dur, tid=1):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "tid": tid,
            "args": {"op_name": op}}


def test_control_flow_bodies_are_not_counted_twice():
    # onnxruntime's If event spans its body's kernels, which it reports too (see _outermost)
    kernels = [_event("mm", "MatMul", 100, 10), _event("body_mm", "MatMul", 125, 20), _event("body_sig", "Sigmoid", 150, 5),
               _event("branch", "If", 120, 40), _event("loop_if", "If", 210, 10), _event("loop_body", "Add", 212, 3),
               _event("loop", "Loop", 200, 50), _event("other_thread", "Add", 130, 5, tid=2)]
    owners = {"mm": "mm", "body_mm": "branch", "body_sig": "branch", "branch": "branch", "loop": "loop",
              "loop_if": "loop", "loop_body": "loop", "other_thread": "x"}
    totals, parts, n = profile._per_run(kernels, [(0, 1000)], 1, owners)
    assert n == 1 and totals["branch"][0] == pytest.approx(0.040) and totals["loop"][0] == pytest.approx(0.050)
    assert totals["mm"][0] == pytest.approx(0.010) and totals["x"][0] == pytest.approx(0.005)
    assert set(parts["branch"]) == {("If", "", "")}


def _if_model(path):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(size=(16, 16)).astype(np.float32), n) for n in ("w", "wt")]
    inits.append(nh.from_array(np.array(0, np.float32), "zero"))
    out = lambda n: [h.make_tensor_value_info(n, T.FLOAT, None)]  # noqa: E731
    then_g = h.make_graph([h.make_node("MatMul", ["m", "wt"], ["t0"], name="then_mm"),
                           h.make_node("Relu", ["t0"], ["t"], name="then_relu")], "then", [], out("t"))
    else_g = h.make_graph([h.make_node("MatMul", ["m", "w"], ["e0"], name="else_mm"),
                           h.make_node("Sigmoid", ["e0"], ["e"], name="else_sig")], "else", [], out("e"))
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             h.make_node("ReduceMean", ["x"], ["r"], name="mean", keepdims=0),
             h.make_node("Greater", ["r", "zero"], ["c"], name="gt"),
             h.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 16])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return str(path)


def test_if_group_time_is_the_if_event(tmp_path, monkeypatch):
    path = _if_model(tmp_path / "if.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32))
    plan, p, _ = _plan_for(path, None, tmp_path / "calib.npz", QuantizeOptions(), CalibrateOptions(), None, None)
    candidate = _apply(plan, p.model)
    seen = []
    events = profile._Profiled.events

    def spy(self):
        kernels, runs = events(self)
        seen.append((kernels, runs))
        return kernels, runs

    monkeypatch.setattr(profile._Profiled, "events", spy)
    feeds = {"x": np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)}
    costs = {c.node: c for c in profile.node_costs(p.model, candidate, plan, feeds, threads=1, runs=3, warmup=1)}
    branch = costs["branch"]
    for (kernels, runs), ms in zip(seen, (branch.float_ms, branch.int8_ms)):
        last = sorted(runs)[-3:]
        ifs = [e["dur"] / 1000.0 for e in kernels if e["args"].get("op_name") == "If"
               and any(a <= e["ts"] <= b for a, b in last)]
        assert len(ifs) == 3 and any(e["name"].startswith(("then_", "else_")) for e in kernels)
        assert ms <= float(np.median(ifs)) + 1e-9, (ms, ifs)
