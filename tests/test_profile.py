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
