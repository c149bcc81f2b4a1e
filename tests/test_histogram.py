"""StreamingHistogram: exact re-binning on the power-of-two grid, merging, JSON, edge cases."""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qtool.calib import histogram as histogram_module
from qtool.calib.histogram import StreamingHistogram, width_log2_for

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=64)
values = st.one_of(finite, st.sampled_from([0.0, -0.0, 1e-30, -1e-30, 5e-324, -5e-324, 1.0, -1.0]))
batch_lists = st.lists(st.lists(values, max_size=12), min_size=1, max_size=6)
bin_budgets = st.sampled_from([2, 3, 4, 7, 16, 64])


def one_pass(batches: list[list[float]], bins: int) -> StreamingHistogram:
    h = StreamingHistogram(bins)
    h.update(np.array([v for b in batches for v in b], dtype=np.float64))
    return h


def streamed(batches, bins: int) -> StreamingHistogram:
    h = StreamingHistogram(bins)
    for b in batches:
        h.update(np.array(b, dtype=np.float64))
    return h


def exact_counts(xs: list[float], h: StreamingHistogram) -> list[int]:
    """Reference binning in exact rational arithmetic: bin floor(x / w) - first."""
    w = Fraction(2) ** h.width_log2
    out = [0] * len(h.counts)
    for x in xs:
        out[math.floor(Fraction(x) / w) - h.first_bin_index] += 1
    return out


# -- the grid ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(batch_lists, bin_budgets)
def test_every_value_lands_in_its_exact_bin_and_no_mass_is_lost(batches, bins):
    h = streamed(batches, bins)
    xs = [v for b in batches for v in b]
    assert h.count == len(xs) == int(h.counts.sum())
    if not xs:
        assert h.width_log2 is None and len(h.counts) == 0
        return
    assert h.counts.tolist() == exact_counts(xs, h)
    assert (h.min, h.max) == (min(xs), max(xs))
    assert len(h.counts) <= bins and h.counts[0] > 0 and h.counts[-1] > 0
    e = h.edges()
    assert e[0] <= h.min < e[1] and e[-2] <= h.max < e[-1]


@settings(max_examples=150, deadline=None)
@given(batch_lists, bin_budgets)
@example(batches=[[0.0, 5e-324]], bins=3)  # subnormal: the floor is the smallest float width
def test_width_is_the_smallest_power_of_two_that_fits(batches, bins):
    h = streamed(batches, bins)
    if h.count == 0 or h.min == h.max:
        return
    k = h.width_log2
    assert h.width == 2.0 ** k

    def fits(kk: int) -> bool:
        w = Fraction(2) ** kk
        return math.floor(Fraction(h.max) / w) - math.floor(Fraction(h.min) / w) < bins

    assert fits(k)
    # the float32-resolution floor, itself floored at the smallest representable width (2**-1074)
    floor = max(math.frexp(max(abs(h.min), abs(h.max)))[1] - 24, histogram_module._MIN_WIDTH_LOG2)
    assert k == floor or not fits(k - 1)


# -- order independence -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(batch_lists, bin_budgets, st.randoms(use_true_random=False))
def test_one_pass_equals_any_batch_order_and_any_sharding(batches, bins, rnd):
    reference = one_pass(batches, bins)
    shuffled = list(batches)
    rnd.shuffle(shuffled)
    assert streamed(shuffled, bins) == reference
    shards = [[] for _ in range(rnd.randint(1, 3))]
    for b in batches:
        shards[rnd.randrange(len(shards))].append(b)
    merged = StreamingHistogram.merged(streamed(s, bins) for s in shards)
    assert merged == reference
    assert merged.batches == len(batches) == sum(streamed(s, bins).batches for s in shards)


def test_merge_is_new_and_leaves_inputs_alone():
    a, b = StreamingHistogram(8), StreamingHistogram(8)
    a.update(np.array([0.1, 0.2]))
    b.update(np.array([30.0]))
    before = a.to_dict()
    ab = a.merge(b)
    assert ab is not a and a.to_dict() == before
    assert ab == one_pass([[0.1, 0.2], [30.0]], 8)


def test_a_later_batch_far_outside_the_range_keeps_every_count():
    rng = np.random.default_rng(1)
    body = rng.uniform(0.0, 1.0, 10_000)
    h = StreamingHistogram(2048)
    h.update(body)
    fine = h.counts
    h.update(np.array([1e6, -3e5]))
    assert h.count == 10_002 and int(h.counts.sum()) == 10_002
    assert h == one_pass([body.tolist(), [1e6, -3e5]], 2048)
    assert h.width == 1024.0 and fine.sum() == 10_000  # everything in [0, 1] now shares bin 0
    assert h.counts[-h.first_bin_index] == 10_000


def test_docstring_example():
    h = StreamingHistogram(bins=4)
    h.update(np.array([0.3, 0.9]))
    assert (h.width, h.first_bin_index, h.counts.tolist()) == (0.25, 1, [1, 0, 1])
    h.update(np.array([2.5]))
    assert (h.width, h.first_bin_index, h.counts.tolist()) == (1.0, 0, [2, 0, 1])
    assert h.edges().tolist() == [0.0, 1.0, 2.0, 3.0] and h.origin == 0.0
    assert width_log2_for(0.3, 0.9, 4) == -2


# -- degenerate input -------------------------------------------------------------------------


def test_constant_tensor_gets_one_tiny_bin_at_float32_resolution():
    h = StreamingHistogram()
    h.update(np.full((3, 4), 5.0, dtype=np.float32))
    assert h.counts.tolist() == [12] and h.width == 2.0 ** -21
    assert h.edges()[0] <= 5.0 < h.edges()[1] and (h.min, h.max) == (5.0, 5.0)


def test_all_zeros_then_a_tiny_value_refines_the_grid_exactly():
    h = StreamingHistogram()
    h.update(np.zeros(7))
    assert h.counts.tolist() == [7] and h.width == 2.0 ** -24 and h.origin == 0.0
    h.update(np.array([1e-30]))
    assert h.width < 1e-32 and h.counts[0] == 7 and h.counts[-1] == 1 and h.count == 8
    assert h == one_pass([[0.0] * 7, [1e-30]], 2048)


def test_single_negative_value_and_extension():
    h = StreamingHistogram(16)
    h.update(np.array([-3.0]))
    assert h.counts.tolist() == [1] and h.edges()[0] <= -3.0 < h.edges()[1]
    h.update(np.array([-2.0, 4.0]))
    assert h == one_pass([[-3.0, -2.0, 4.0]], 16) and h.count == 3


def test_empty_batches_count_as_seen_but_add_nothing():
    h = StreamingHistogram()
    h.update(np.zeros((0, 3), dtype=np.float32))
    assert (h.count, h.batches, h.width_log2, len(h.counts)) == (0, 1, None, 0)
    assert h.min == math.inf and h.max == -math.inf and math.isnan(h.width)
    h.update(np.array([1.5]))
    h.update(np.array([]))
    assert (h.count, h.batches) == (1, 3) and h == one_pass([[1.5]], 2048)


def test_tiny_negative_float64_does_not_underflow_into_bin_zero():
    h = StreamingHistogram(16)
    h.update(np.array([-1e-320, 1000.0]))  # width 128: -1e-320 / 128 underflows to -0.0
    assert h.first_bin_index == -1 and h.counts.tolist() == exact_counts([-1e-320, 1000.0], h)


def test_other_dtypes_and_shapes():
    h = StreamingHistogram(64)
    h.update(np.arange(12, dtype=np.int32).reshape(3, 4))
    h.update(np.array([0.5, 2.5], dtype=np.float16))
    assert h == one_pass([list(range(12)), [0.5, 2.5]], 64)


def test_bad_input_is_refused():
    h = StreamingHistogram()
    for bad in ([1.0, np.nan], [np.inf, 0.0]):
        with pytest.raises(ValueError, match="finite"):
            h.update(np.array(bad))
    assert h.count == 0 and h.batches == 0
    with pytest.raises(TypeError):
        h.update(np.array([1j]))
    for bins in (0, 1, 2.5, True):
        with pytest.raises(ValueError):
            StreamingHistogram(bins)
    with pytest.raises(ValueError, match="different bin budgets"):
        StreamingHistogram(8).merge(StreamingHistogram(16))


# -- JSON -------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(batch_lists, bin_budgets)
def test_json_round_trip_is_exact(batches, bins):
    h = streamed(batches, bins)
    record = json.loads(json.dumps(h.to_dict()))
    back = StreamingHistogram.from_dict(record)
    assert back == h and back.batches == h.batches and back.to_dict() == h.to_dict()


def test_json_record_is_compact():
    h = StreamingHistogram()
    h.update(np.random.default_rng(0).standard_normal(100_000).astype(np.float32))
    d = h.to_dict()
    assert set(d) == {"version", "bins", "count", "batches", "min", "max", "width_log2",
                      "first_bin_index", "counts"}
    assert d["width_log2"] == h.width_log2 and d["first_bin_index"] == h.first_bin_index
    assert len(json.dumps(d)) < 8 * len(h.counts)  # well under the raw 8 bytes per bin


def test_inconsistent_records_are_refused():
    h = StreamingHistogram(16)
    h.update(np.array([0.0, 1.0, 3.0]))
    good = h.to_dict()
    broken = [
        {**good, "count": 4},
        {**good, "width_log2": good["width_log2"] - 1},
        {**good, "first_bin_index": good["first_bin_index"] + 1},
        {**good, "max": 100.0},
        {**good, "version": 99},
        {**good, "colour": "red"},
        {**good, "min": math.nan},
        {k: v for k, v in good.items() if k != "counts"},
    ]
    for record in broken:
        with pytest.raises(ValueError):
            StreamingHistogram.from_dict(record)


# -- speed ------------------------------------------------------------------------------------


def test_ten_million_float32_values_bin_well_under_a_second():
    x = np.random.default_rng(0).standard_normal(10_000_000).astype(np.float32)
    h = StreamingHistogram()
    start = time.perf_counter()
    h.update(x)
    elapsed = time.perf_counter() - start
    assert h.count == 10_000_000
    assert elapsed < 1.0, f"{elapsed:.2f} s"
