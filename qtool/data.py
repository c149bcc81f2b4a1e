"""The one data contract: a DATA path -> an iterable of ``dict[str, np.ndarray]``.

DATA is an ``.npz`` file or a directory of them. Every array is keyed by a model
input name and has a leading batch dimension; an optional ``labels`` array holds
integer labels. Arrays are streamed straight out of the zip archive a batch at a
time (the ``.npy`` header tells shape and dtype, then rows are read as needed),
so memory stays flat however many samples a file holds.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import DataError

LABELS_KEY = "labels"


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one stored array, read from its header only."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of one input: dims are ints, names or None."""

    name: str
    shape: tuple
    dtype: np.dtype


def _read_header(fh) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) from an .npy stream positioned at its start."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)


def _checked_header(zf: zipfile.ZipFile, member: str, path: Path) -> tuple[tuple, np.dtype]:
    """Shape and dtype of a member, refusing pickles and headers that promise more data
    than the member holds (a forged shape would make reads fail or allocate wildly)."""
    info = zf.getinfo(member)
    try:
        with zf.open(member) as fh:
            shape, _, dtype = _read_header(fh)
            offset = fh.tell()
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: {member} is not a readable .npy array ({str(exc).splitlines()[0][:120]})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: {member} holds Python objects (a pickle); qtool reads numeric arrays only")
    needed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if needed > info.file_size - offset:
        raise DataError(f"{path}: {member} declares shape {list(shape)} ({needed:,} bytes) but holds "
                        f"{info.file_size - offset:,} bytes: truncated or forged")
    return tuple(shape), dtype


class _NpyStream:
    """Reads rows of one ``.npy`` member of a zip file sequentially."""

    def __init__(self, zf: zipfile.ZipFile, member: str):
        self.member = member
        self._f = zf.open(member)
        shape, fortran, dtype = _read_header(self._f)
        if dtype.hasobject:
            raise DataError(f"{member}: object arrays are not supported")
        self.shape, self.fortran, self.dtype = tuple(shape), fortran, dtype
        self.row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        self._full = None
        if fortran and len(shape) > 1:  # rows are not contiguous: read it whole
            data = np.frombuffer(self._f.read(), dtype=dtype, count=int(np.prod(shape)))
            self._full = data.reshape(shape, order="F")
        self._pos = 0

    def read(self, rows: int) -> np.ndarray:
        """The next ``rows`` rows; a corrupt or short member is a DataError."""
        try:
            return self._read(rows)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            raise DataError(f"{self.member}: corrupt or truncated array data "
                            f"({str(exc).splitlines()[0][:120]})") from None

    def _read(self, rows: int) -> np.ndarray:
        rows = min(rows, self.shape[0] - self._pos)
        if self._full is not None:
            out = np.ascontiguousarray(self._full[self._pos:self._pos + rows])
        else:
            nbytes = rows * self.row_items * self.dtype.itemsize
            buf = self._f.read(nbytes)
            out = np.frombuffer(buf, dtype=self.dtype).reshape((rows,) + self.shape[1:]).copy()
        self._pos += rows
        return out

    def close(self):
        self._f.close()


def _members(zf: zipfile.ZipFile, path: Path) -> dict[str, str]:
    names = {}
    for info in zf.infolist():
        if info.filename.endswith(".npy"):
            names[info.filename[:-4]] = info.filename
    if not names:
        raise DataError(f"{path}: holds no arrays")
    return names


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


class Dataset:
    """A lazily read DATA path. Iterate with :meth:`batches`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or directory")
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.npz"))
            if not self.files:
                raise DataError(f"{self.path}: directory holds no .npz files")
        else:
            self.files = [self.path]
        self.file_specs: list[dict[str, ArraySpec]] = []
        self.specs = self._read_specs()

    def _read_specs(self) -> dict[str, ArraySpec]:
        """Merged specs over all files; each file's own specs go to ``file_specs``."""
        specs: dict[str, ArraySpec] = {}
        for f in self.files:
            with _open_zip(f) as zf:
                members = _members(zf, f)
                file_specs = {}
                for key, member in members.items():
                    shape, dtype = _checked_header(zf, member, f)
                    if len(shape) == 0:
                        raise DataError(f"{f}: array {key!r} is a scalar; need a leading batch dimension")
                    file_specs[key] = ArraySpec(key, tuple(shape), dtype)
            lengths = {s.shape[0] for s in file_specs.values()}
            if len(lengths) > 1:
                detail = ", ".join(f"{k}={s.shape[0]}" for k, s in file_specs.items())
                raise DataError(f"{f}: arrays disagree on the number of samples ({detail})")
            if specs and set(specs) != set(file_specs):
                raise DataError(f"{f}: keys {sorted(file_specs)} differ from {sorted(specs)} in {self.files[0]}")
            self.file_specs.append(file_specs)
            for key, s in file_specs.items():
                prev = specs.get(key)
                specs[key] = ArraySpec(key, s.shape if prev is None else (prev.shape[0] + s.shape[0],) + s.shape[1:], s.dtype)
        return specs

    @property
    def num_samples(self) -> int:
        return next(iter(self.specs.values())).shape[0]

    @property
    def input_names(self) -> list[str]:
        return [k for k in self.specs if k != LABELS_KEY]

    @property
    def has_labels(self) -> bool:
        return LABELS_KEY in self.specs

    def batches(self, batch_size: int = 32, limit: int | None = None,
                keys: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield dicts of arrays with at most ``batch_size`` rows, ``limit`` rows in all.

        Batches never span two files, so arrays of different trailing shapes in
        different files (e.g. sentences of other lengths) stay separate batches.
        """
        if batch_size < 1:
            raise DataError("batch size must be at least 1")
        remaining = self.num_samples if limit is None else min(limit, self.num_samples)
        for f in self.files:
            if remaining <= 0:
                return
            with _open_zip(f) as zf:
                members = _members(zf, f)
                wanted = [k for k in members if keys is None or k in keys]
                streams = {k: _NpyStream(zf, members[k]) for k in wanted}
                try:
                    n = next(iter(streams.values())).shape[0] if streams else 0
                    done = 0
                    while done < n and remaining > 0:
                        rows = min(batch_size, n - done, remaining)
                        yield {k: s.read(rows) for k, s in streams.items()}
                        done += rows
                        remaining -= rows
                finally:
                    for s in streams.values():
                        s.close()

    def labels(self, limit: int | None = None) -> np.ndarray | None:
        if not self.has_labels:
            return None
        parts = [b[LABELS_KEY] for b in self.batches(4096, limit, keys=[LABELS_KEY])]
        return integer_labels(np.concatenate(parts), f"{self.path}: labels")


def integer_labels(arr: np.ndarray, what: str) -> np.ndarray:
    """Class indices: integers, never negative (a float label would be silently truncated)."""
    if arr.dtype.kind not in "iu":
        raise DataError(f"{what} must be integer class indices, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{what} must be class indices >= 0, found {int(arr.min())}")
    return arr.astype(np.int64)


def check_against_model(dataset: Dataset, inputs: list[InputSpec], float_cast: bool = False) -> None:
    """Raise DataError, naming the input and both shapes, on any mismatch.

    Runs on the arrays' headers only, before any inference. ``float_cast``: float data may
    feed an input of another float type (the caller casts it: an fp16 model evaluated on its
    fp32 reference's data).
    """
    model_names = [i.name for i in inputs]
    missing = [n for n in model_names if n not in dataset.specs]
    if missing:
        raise DataError(f"data has no array for model input {missing[0]!r} "
                        f"(data keys: {', '.join(dataset.input_names) or 'none'})")
    extra = [k for k in dataset.input_names if k not in model_names]
    if extra:
        raise DataError(f"data array {extra[0]!r} is not a model input (inputs: {', '.join(model_names)})")
    if dataset.num_samples == 0:
        raise DataError(f"{dataset.path}: data set is empty (0 samples)")
    for spec in inputs:
        _check_one(dataset, spec, float_cast)


def _dims_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_one(dataset: Dataset, spec: InputSpec, float_cast: bool = False) -> None:
    for file_specs in dataset.file_specs:
        shape, dtype = file_specs[spec.name].shape, file_specs[spec.name].dtype
        if len(shape) != len(spec.shape):
            raise DataError(f"input {spec.name!r}: data has rank {len(shape)} {list(shape)}, "
                            f"model expects rank {len(spec.shape)} {_dims_text(spec.shape)}")
        for axis, (d, m) in enumerate(zip(shape, spec.shape)):
            if axis > 0 and isinstance(m, int) and m > 0 and d != m:
                raise DataError(f"input {spec.name!r}: data shape {list(shape)} does not match "
                                f"model shape {_dims_text(spec.shape)} at axis {axis}")
        both_float = np.dtype(dtype).kind == "f" and np.dtype(spec.dtype).kind == "f"
        if np.dtype(dtype) != np.dtype(spec.dtype) and not (float_cast and both_float):
            raise DataError(f"input {spec.name!r}: data dtype {np.dtype(dtype)} does not match "
                            f"model dtype {np.dtype(spec.dtype)}")
        batch_dim = spec.shape[0]
        if isinstance(batch_dim, int) and batch_dim > 0 and shape[0] % batch_dim:
            raise DataError(f"input {spec.name!r}: model has a fixed batch of {batch_dim} but the data holds {shape[0]} samples")


def check_finite(batch: dict[str, np.ndarray], index: int) -> None:
    for name, arr in batch.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise DataError(f"input {name!r} holds {bad} in batch {index}; calibration data must be finite")
