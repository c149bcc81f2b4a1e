"""The data contract: streamed .npz files and directories, checked against the model."""

import numpy as np
import pytest

from qtool.data import Dataset, InputSpec, check_against_model
from qtool.errors import DataError


def test_batches_stream_rows_in_order(tmp_path):
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    np.savez_compressed(tmp_path / "a.npz", x=x, labels=np.arange(10))
    ds = Dataset(tmp_path / "a.npz")
    batches = list(ds.batches(4))
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    assert np.array_equal(np.concatenate([b["x"] for b in batches]), x)
    assert np.array_equal(ds.labels(), np.arange(10))
    assert [len(b["x"]) for b in ds.batches(4, limit=5)] == [4, 1]


def test_directory_of_files_with_different_lengths(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.ones((3, 7), np.int64))
    np.savez(tmp_path / "b.npz", ids=np.ones((2, 11), np.int64))
    ds = Dataset(tmp_path)
    assert ds.num_samples == 5
    shapes = [b["ids"].shape for b in ds.batches(8)]
    assert shapes == [(3, 7), (2, 11)]
    check_against_model(ds, [InputSpec("ids", ("batch", "seq"), np.dtype(np.int64))])


def test_fortran_order_arrays(tmp_path):
    x = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    np.savez(tmp_path / "f.npz", x=x)
    got = np.concatenate([b["x"] for b in Dataset(tmp_path / "f.npz").batches(3)])
    assert np.array_equal(got, x)


def test_streaming_reads_only_what_is_asked(tmp_path):
    """A batch of 2 rows from a large file must not materialise the whole array."""
    x = np.zeros((20000, 1000), dtype=np.float32)  # 80 MB
    np.savez(tmp_path / "big.npz", x=x)
    import tracemalloc
    tracemalloc.start()
    ds = Dataset(tmp_path / "big.npz")
    first = next(iter(ds.batches(2)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first["x"].shape == (2, 1000)
    assert peak < 5e6


def test_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        Dataset(tmp_path / "none.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npz"):
        Dataset(tmp_path / "empty")
    (tmp_path / "t.npz").write_text("text")
    with pytest.raises(DataError, match="not a readable"):
        Dataset(tmp_path / "t.npz")
    np.savez(tmp_path / "u.npz", x=np.zeros((3, 2)), labels=np.zeros(4))
    with pytest.raises(DataError, match="disagree"):
        Dataset(tmp_path / "u.npz")


def test_fixed_dims_checked(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 5), np.float32))
    ds = Dataset(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"input 'x': data shape \[2, 3, 5\] does not match model shape \[N, 3, 4\]"):
        check_against_model(ds, [InputSpec("x", ("N", 3, 4), np.dtype(np.float32))])
