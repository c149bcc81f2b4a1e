"""Check a written model against its resolved plan, and the plan against first principles.

Every number the rewriter wrote must be the plan's (scales, zero points, the
quantized values computed from them, the kernels), and the plan's numbers must
be right on their own: an activation's scale follows from its calibrated range,
a weight's dequantized values are within half a step of the float weight, and a
dequantized int32 bias is within half a step of the float bias (so a bias that
is 30% wrong fails, whatever the plan says).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from qtool.plans import Action, Plan, Role
from qtool.qparams import choose_qparams, dequantize, expand_blocks
from qtool.types import PerBlock

DYNAMIC_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")


def _arr(value, dtype):
    return np.asarray(list(value) if isinstance(value, tuple) else value, dtype=dtype)


def assert_model_matches_plan(q: onnx.ModelProto, plan: Plan, fp32: onnx.ModelProto) -> None:
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    floats = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in fp32.graph.initializer}
    for t in plan.tensors.values():
        if t.action in (Action.SKIP, Action.DYNAMIC):
            continue
        assert t.has_params, f"{t.name}: quantized without parameters in the resolved plan"
        scale, zp = _arr(t.scale, np.float32), _arr(t.zero_point, t.precision.dtype)
        if t.role is Role.ACTIVATION:
            if t.action is Action.QUANTIZE:
                want_s, want_z = choose_qparams(*t.range, t.precision, t.symmetric)
                assert (np.float32(want_s), int(want_z)) == (scale, int(zp)), f"{t.name}: scale not from its range"
            if f"{t.name}_scale" in inits:
                np.testing.assert_array_equal(inits[f"{t.name}_scale"], scale, err_msg=t.name)
                np.testing.assert_array_equal(inits[f"{t.name}_zero_point"], zp, err_msg=t.name)
                assert inits[f"{t.name}_zero_point"].dtype == t.precision.dtype, t.name
            continue
        w = floats[t.name].T if t.transpose else floats[t.name]
        q_name = f"{t.name}_quantized"
        assert q_name in inits, f"{t.name}: no quantized initializer written"
        if isinstance(t.granularity, PerBlock):  # a table read by GatherBlockQuantized: parameters [V, D / block]
            scale, zp = scale.reshape(inits[f"{t.name}_scale"].shape), zp.reshape(inits[f"{t.name}_scale"].shape)
            full_s, full_z = (expand_blocks(p, t.granularity) for p in (scale, zp))
            back = dequantize(inits[q_name], full_s, full_z)
            assert inits[q_name].dtype == t.precision.dtype and scale.shape[1] * t.granularity.size == w.shape[1]
            assert np.all(np.abs(back - w) <= full_s / 2 * 1.0001 + 1e-12), f"{t.name}: table off its plan's grid"
            np.testing.assert_array_equal(inits[f"{t.name}_scale"], scale, err_msg=t.name)
            np.testing.assert_array_equal(inits[f"{t.name}_zero_point"], zp, err_msg=t.name)
            continue
        axis = t.axis if np.ndim(scale) else None
        if t.role is Role.WEIGHT:
            got = inits[q_name]
            assert got.dtype == t.precision.dtype, (t.name, got.dtype)
            back = dequantize(got, scale, zp, axis)
            step = scale if axis is None else np.expand_dims(scale, [d for d in range(w.ndim) if d != axis])
            assert np.all(np.abs(back - w) <= step / 2 * 1.0001 + 1e-12), f"{t.name}: weight off its plan's grid"
        else:
            got = inits[q_name]
            assert got.dtype == np.int32, t.name
            back = got.astype(np.float64) * scale.astype(np.float64)
            assert np.all(np.abs(back - w) <= scale.astype(np.float64) / 2 * 1.0001 + 1e-12), \
                f"{t.name}: int32 bias does not give back the float bias (saturated or wrong scale)"
            s_x, s_w = plan.tensors[t.source].scale, _arr(plan.tensors[t.weight].scale, np.float32)
            np.testing.assert_array_equal(np.broadcast_to(np.float32(s_x) * s_w, scale.shape), scale,
                                          err_msg=f"{t.name}: bias scale is not s_x * s_w")
        if f"{t.name}_scale" not in inits:  # QOperator: an int32 bias alone; a gathered table's rows share it
            assert t.role is Role.BIAS or any(s.source == t.name for s in plan.tensors.values()), t.name
            continue
        np.testing.assert_array_equal(inits[f"{t.name}_scale"], scale, err_msg=t.name)
        np.testing.assert_array_equal(inits[f"{t.name}_zero_point"], zp, err_msg=t.name)
    _assert_kernels(q, plan)


def _assert_kernels(q: onnx.ModelProto, plan: Plan) -> None:
    written = {n.name: n.op_type for n in q.graph.node}
    counts = Counter(n.op_type for n in q.graph.node)
    for n in plan.nodes:
        if not n.quantized:
            assert not n.kernel and n.name not in written or written[n.name] == n.op_type, n.name
            continue
        if n.fused_into:
            assert n.name not in written or plan.format == "qdq", f"{n.name}: fused, yet written on its own"
            continue
        assert n.kernel, f"{n.name}: quantized node without a kernel"
        if plan.mode == "dynamic" and n.kernel in DYNAMIC_KERNELS:
            assert counts[n.kernel] > 0 and f"{n.name}_dynamic" in written, n.name
            assert written[f"{n.name}_dynamic"] == n.kernel, n.name
        elif n.name in written:
            assert written[n.name] == n.kernel, (n.name, written[n.name], n.kernel)


def optimized_ops(path, tmp_path):
    """Op counts of the graph onnxruntime's CPU EP optimises ``path`` into (ORT_ENABLE_ALL)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
