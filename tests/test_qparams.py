"""Scale/zero-point math: properties (hypothesis), worked examples, and bit-for-bit
agreement with onnxruntime's own QuantizeLinear/DequantizeLinear."""

from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from qtool.qparams import (
    PerAxis, PerTensor, Precision, choose_qparams, dequantize, quantize, quantize_bias,
    reduced_bounds, symmetric_bounds, weight_qparams,
)

FAST = settings(max_examples=100, deadline=None)
SLOW = settings(max_examples=30, deadline=None)


def f32(v: float) -> float:
    """``v`` rounded to float32, as hypothesis wants for width-32 bounds."""
    return float(np.float32(v))


F32_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32

QTYPES = [Precision.INT8, Precision.UINT8, Precision.INT16, Precision.UINT16]
qtypes = st.sampled_from(QTYPES)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Ranges whose scale stays far enough from F32_MAX that q * scale cannot overflow.
moderate32 = st.floats(-f32(1e38), f32(1e38), width=32)


def float_arrays(elements=finite32, max_dims=3, max_side=6):
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=1, max_side=max_side)
    return hnp.arrays(np.float32, shapes, elements=elements)


def widened(rmin, rmax):
    return min(rmin, 0.0), max(rmax, 0.0)


# --- properties ------------------------------------------------------------------------


@FAST
@given(qtypes, st.booleans(), finite32, finite32, float_arrays())
@example(Precision.INT8, False, -1e-44, 1e-44, np.zeros(3, np.float32))  # scale underflowed to 0
def test_qparams_are_usable_and_q_saturates_monotonically(qtype, symmetric, a, b, x):
    rmin, rmax = sorted((a, b))
    scale, zp = choose_qparams(rmin, rmax, qtype, symmetric)
    assert scale.dtype == np.float32 and zp.dtype == qtype.dtype
    assert np.isfinite(scale) and scale >= TINY
    assert qtype.qmin <= int(zp) <= qtype.qmax

    q = quantize(x, scale, zp, qtype)
    assert q.dtype == qtype.dtype and q.shape == x.shape
    assert np.all(q >= qtype.qmin) and np.all(q <= qtype.qmax)
    # No wrap-around: saturation keeps q monotone in x.
    order = np.argsort(x.ravel(), kind="stable")
    assert np.all(np.diff(q.ravel()[order].astype(np.int64)) >= 0)


@FAST
@given(qtypes, st.booleans(), finite32, finite32)
@example(Precision.INT8, False, -1e-44, 1e-44)
@example(Precision.UINT8, True, 0.0, 1e-45)
def test_zero_is_exactly_representable(qtype, symmetric, a, b):
    rmin, rmax = sorted((a, b))
    scale, zp = choose_qparams(rmin, rmax, qtype, symmetric)
    zeros = np.array([0.0, -0.0], np.float32)
    assert np.array_equal(quantize(zeros, scale, zp, qtype), np.full(2, zp, qtype.dtype))
    back = dequantize(np.asarray(zp, qtype.dtype), scale, zp)
    assert back == 0.0 and back.dtype == np.float32


@FAST
@given(qtypes, st.booleans(), moderate32, moderate32,
       st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16))
@example(Precision.INT8, False, -1e-42, 1e-42, [1.0])  # would be a subnormal scale
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(qtype, symmetric, a, b, ts):
    lo, hi = widened(*sorted((a, b)))
    scale, zp = choose_qparams(lo, hi, qtype, symmetric)
    t = np.array(ts)
    x = np.clip((lo + t * (hi - lo)).astype(np.float32), lo, hi)
    x = np.concatenate([x, np.array([lo, hi, 0.0], np.float32)])
    back = dequantize(quantize(x, scale, zp, qtype), scale, zp)
    err = np.abs(back.astype(np.float64) - x.astype(np.float64))
    s = float(scale)
    # float32 scale carries a relative error of 2**-24 over up to (qmax - qmin) steps,
    # plus one rounding of x / scale and of (q - zp) * scale.
    ulp = float(np.spacing(np.float32(max(-lo, hi))))
    tol = s / 2 + s * (qtype.qmax - qtype.qmin) * 2.0**-23 + 2 * ulp
    assert np.all(err <= tol), (x, back, err, s, int(zp))


@FAST
@given(qtypes, finite32, finite32)
def test_symmetric_has_centred_zero_point(qtype, a, b):
    rmin, rmax = sorted((a, b))
    _, zp = choose_qparams(rmin, rmax, qtype, True)
    expected = 0 if qtype.qmin < 0 else (qtype.qmax + 1) // 2
    assert int(zp) == expected


@FAST
@given(st.sampled_from([Precision.INT8, Precision.INT16]), moderate32, moderate32,
       st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16))
def test_symmetric_signed_stays_in_symmetric_bounds_inside_the_range(qtype, a, b, ts):
    lo, hi = widened(*sorted((a, b)))
    scale, zp = choose_qparams(lo, hi, qtype, True)
    absmax = max(-lo, hi)
    x = (np.array([-1.0, 1.0] + [2 * t - 1 for t in ts]) * absmax).astype(np.float32)
    x = np.clip(x, -absmax, absmax)
    q = quantize(x, scale, zp, qtype).astype(np.int64)
    qmin, qmax = symmetric_bounds(qtype)
    assert qmin == -qtype.qmax
    assert np.all(q >= qmin) and np.all(q <= qmax)


@st.composite
def axis_cases(draw):
    shapes = hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4)
    w = draw(hnp.arrays(np.float32, shapes, elements=st.floats(-f32(1e30), f32(1e30), width=32)))
    axis = draw(st.sampled_from([0, 1, w.ndim - 1, -1]))
    return w, axis


@FAST
@given(qtypes, st.booleans(), axis_cases())
def test_per_axis_equals_per_tensor_slice_by_slice(qtype, symmetric, case):
    w, axis = case
    scale, zp = weight_qparams(w, qtype, PerAxis(axis), symmetric)
    assert scale.shape == zp.shape == (w.shape[axis],)
    q = quantize(w, scale, zp, qtype, axis=axis)
    back = dequantize(q, scale, zp, axis=axis)
    for c in range(w.shape[axis]):
        sl = np.take(w, c, axis=axis)
        s_c, z_c = weight_qparams(sl, qtype, PerTensor(), symmetric)
        assert scale[c] == s_c and zp[c] == z_c
        q_c = quantize(sl, scale[c], zp[c], qtype)
        assert np.array_equal(np.take(q, c, axis=axis), q_c)
        assert np.array_equal(np.take(back, c, axis=axis), dequantize(q_c, scale[c], zp[c]))


# --- bit-for-bit agreement with onnxruntime ----------------------------------------------

ORT_CASES = [(qt, opset, axis)
             for qt, opsets in [(Precision.INT8, (13, 19, 21)), (Precision.UINT8, (13, 19, 21)),
                                (Precision.INT16, (21,)), (Precision.UINT16, (21,))]
             for opset in opsets for axis in (None, 0, 1, -1)]


def cpu_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # tiny inputs
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@lru_cache(maxsize=None)
def qdq_session(qtype: Precision, opset: int, axis, rank: int):
    """x -> QuantizeLinear -> q -> DequantizeLinear -> r, and qin -> DequantizeLinear -> rin.

    Scale and zero point are graph inputs: scalars per tensor, [C] per axis.
    """
    attrs = {} if axis is None else {"axis": axis}
    dims = [f"d{i}" for i in range(rank)]
    pshape = [] if axis is None else ["C"]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["r"], **attrs),
        helper.make_node("DequantizeLinear", ["qin", "s", "z"], ["rin"], **attrs),
    ]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "qdq",
        [vi("x", TensorProto.FLOAT, dims), vi("qin", qtype.onnx_type, dims),
         vi("s", TensorProto.FLOAT, pshape), vi("z", qtype.onnx_type, pshape)],
        [vi("q", qtype.onnx_type, dims), vi("r", TensorProto.FLOAT, dims),
         vi("rin", TensorProto.FLOAT, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10 if opset >= 21 else 8)
    onnx.checker.check_model(model, full_check=True)
    return cpu_session(model)


SPECIALS = [0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 1e30, -1e30, F32_MAX, -F32_MAX, 3e9, -3e9,
            TINY, -TINY, 1e-45]
scales = st.one_of(
    st.integers(-30, 30).map(lambda e: 2.0**e),  # exact, so (k + 0.5) * scale is a true tie
    st.floats(f32(1e-44), f32(1e30), width=32),
)


@st.composite
def qdq_inputs(draw, qtype, axis):
    rank = draw(st.integers(1 if axis in (None, 0, -1) else 2, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    n_params = 1 if axis is None else shape[axis]
    s = np.array(draw(st.lists(scales, min_size=n_params, max_size=n_params)), np.float32)
    z = np.array(draw(st.lists(st.integers(qtype.qmin, qtype.qmax),
                               min_size=n_params, max_size=n_params)), qtype.dtype)
    if axis is None:
        s, z = s.reshape(()), z.reshape(())
    s_b = s if axis is None else s.reshape([-1 if i == axis % rank else 1 for i in range(rank)])
    elements = st.one_of(finite32, st.sampled_from(SPECIALS))
    x = draw(hnp.arrays(np.float32, shape, elements=elements))
    # Ties (k + 0.5) * scale, exercising round-half-to-even, where the mask says so.
    k = draw(hnp.arrays(np.int64, shape, elements=st.integers(-70000, 70000)))
    mask = draw(hnp.arrays(np.bool_, shape))
    ties = ((k + 0.5) * s_b).astype(np.float32)
    x = np.where(mask, ties, x).astype(np.float32)
    qin = draw(hnp.arrays(qtype.dtype, shape))
    return x, s, z, qin


@pytest.mark.parametrize("qtype,opset,axis", ORT_CASES,
                         ids=[f"{q.label}-op{o}-axis{a}" for q, o, a in ORT_CASES])
@SLOW
@given(data=st.data())
def test_matches_onnxruntime_bit_for_bit(qtype, opset, axis, data):
    x, s, z, qin = data.draw(qdq_inputs(qtype, axis))
    sess = qdq_session(qtype, opset, axis, x.ndim)
    q, r, rin = sess.run(None, {"x": x, "s": s, "z": z, "qin": qin})
    ours = quantize(x, s, z, qtype, axis=axis)
    assert ours.dtype == q.dtype and np.array_equal(ours, q), (x, s, z, ours, q)
    assert np.array_equal(dequantize(q, s, z, axis=axis), r)
    assert np.array_equal(dequantize(qin, s, z, axis=axis), rin)


# --- bias ---------------------------------------------------------------------------------

positive_scales = st.floats(f32(1e-6), 1e2, width=32)


@FAST
@given(positive_scales,
       st.one_of(positive_scales, st.lists(positive_scales, min_size=1, max_size=8)), st.data())
def test_quantize_bias(s_x, s_w, data):
    s_w = np.asarray(s_w, np.float32)
    n = s_w.shape[0] if s_w.ndim else data.draw(st.integers(1, 8))
    expected_scale = np.float32(s_x) * s_w
    u = data.draw(hnp.arrays(np.float64, n, elements=st.floats(-2.0**24, 2.0**24)))
    bias = (u * expected_scale).astype(np.float32)
    q, scale = quantize_bias(bias, s_x, s_w)
    assert q.dtype == np.int32 and scale.dtype == np.float32
    assert np.array_equal(scale, np.broadcast_to(expected_scale, scale.shape))
    assert scale.shape == (() if s_w.ndim == 0 else bias.shape)
    back = dequantize(q, scale, np.zeros(np.shape(scale), np.int32), axis=0 if scale.ndim else None)
    err = np.abs(back.astype(np.float64) - bias.astype(np.float64))
    tol = scale / 2 + np.spacing(np.abs(bias) + scale)
    assert np.all(err <= tol)


@lru_cache(maxsize=None)
def int32_dequantize_session(axis):
    attrs = {} if axis is None else {"axis": axis}
    vi = helper.make_tensor_value_info
    pshape = [] if axis is None else ["C"]
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["r"], **attrs)], "dq32",
        [vi("q", TensorProto.INT32, ["C"]), vi("s", TensorProto.FLOAT, pshape),
         vi("z", TensorProto.INT32, pshape)],
        [vi("r", TensorProto.FLOAT, ["C"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return cpu_session(model)


@FAST
@given(positive_scales, st.lists(positive_scales, min_size=1, max_size=8), st.booleans(), st.data())
def test_bias_dequantizes_like_onnxruntime(s_x, s_w, per_channel, data):
    s_w = np.array(s_w if per_channel else s_w[:1], np.float32).reshape(-1 if per_channel else ())
    n = s_w.size if per_channel else data.draw(st.integers(1, 8))
    bias = data.draw(hnp.arrays(np.float32, n, elements=st.floats(-f32(1e4), f32(1e4), width=32)))
    q, scale = quantize_bias(bias, s_x, s_w)
    axis = 0 if per_channel else None
    zero = np.zeros(np.shape(scale), np.int32)
    (r,) = int32_dequantize_session(axis).run(None, {"q": q, "s": scale, "z": zero})
    assert np.array_equal(dequantize(q, scale, zero, axis=axis), r)


def test_quantize_bias_saturates_instead_of_wrapping():
    q, _ = quantize_bias(np.array([1e30, -1e30, 0.0], np.float32), 1e-3, 1e-3)
    assert q.tolist() == [2**31 - 1, -(2**31), 0]


# --- worked examples ----------------------------------------------------------------------


def test_int8_asymmetric_minus1_to_3():
    scale, zp = choose_qparams(-1.0, 3.0, Precision.INT8, symmetric=False)
    assert scale == np.float32(4 / 255) and int(zp) == -64
    q = quantize(np.array([-1.0, 0.0, 3.0], np.float32), scale, zp, Precision.INT8)
    assert q.tolist() == [-128, -64, 127]


def test_uint8_asymmetric_and_symmetric():
    scale, zp = choose_qparams(-1.0, 3.0, Precision.UINT8, symmetric=False)
    assert scale == np.float32(4 / 255) and int(zp) == 64
    scale, zp = choose_qparams(-1.0, 3.0, Precision.UINT8, symmetric=True)
    assert scale == np.float32(6 / 255) and int(zp) == 128


@pytest.mark.parametrize("rmin,rmax", [(0.0, 0.0), (-1e-44, 1e-44), (0.0, 1e-40)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_degenerate_range_gets_scale_one(rmin, rmax, symmetric):
    # Before the fix, +-1e-44 gave a float32 scale of 0.0 and a garbage zero point.
    scale, zp = choose_qparams(rmin, rmax, Precision.INT8, symmetric)
    assert scale == 1.0
    assert quantize(np.float32(0.0), scale, zp, Precision.INT8) == zp


def test_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)
    assert quantize(x, 1.0, 0, Precision.INT8).tolist() == [0, 2, 2, 0, -2, -2]


def test_weight_qparams_docstring_example():
    w = np.array([[1, -2, 0.5], [0.1, 0.2, -0.4]], np.float32)
    scale, zp = weight_qparams(w, Precision.INT8, PerAxis(0))
    assert np.array_equal(scale, np.array([2 / 127, 0.4 / 127], np.float32))
    assert zp.tolist() == [0, 0]
    scale, zp = weight_qparams(w, Precision.INT8, PerTensor())
    assert scale == np.float32(2 / 127) and int(zp) == 0


def test_quantize_bias_docstring_example():
    q, scale = quantize_bias(np.array([0.5], np.float32), 0.1, 0.02)
    assert scale == np.float32(0.1) * np.float32(0.02)
    assert q.tolist() == [250]


def test_precision_parse():
    assert Precision.parse("int8") is Precision.INT8 and Precision.parse("uint16") is Precision.UINT16
    assert Precision.parse("int4").bits == 4 and not Precision.parse("fp16").is_integer
    with pytest.raises(ValueError):
        Precision.parse("int3")


def test_reduced_bounds_fit_avx2_pair_sums():
    """7-bit weights: two u8 x s8 products summed stay inside int16 (vpmaddubsw)."""
    lo, hi = reduced_bounds(Precision.INT8)
    assert (lo, hi) == (-64, 64) and 2 * 255 * hi <= 32767
    assert reduced_bounds(Precision.UINT8) == (0, 127)
    w = np.array([[1.0, -0.5], [0.25, 2.0]], np.float32)
    scale, zp = weight_qparams(w, Precision.INT8, PerAxis(0), True, (lo, hi))
    q = quantize(w, scale, zp, Precision.INT8, axis=0)
    assert np.abs(q).max() == 64 and scale.tolist() == [np.float32(1 / 64), np.float32(2 / 64)]
