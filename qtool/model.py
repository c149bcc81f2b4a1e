"""Model I/O at the edge: load with clear errors, save atomically, hash, opsets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import ModelError, OutputError

MIN_QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # stay clear of protobuf's 2 GiB limit
#: A model with external data bigger than this (file + data) is loaded without its weights: they
#: stay on disk, read one tensor at a time, and every onnx/onnxruntime call goes by path (see
#: :func:`by_path`). Loaded whole, a model costs ~6x its size in memory (copies in shape
#: inference and pre-processing). Tests lower it to run that path on small models.
LARGE_MODEL_BYTES = 512 * 1024**2
#: A model held in memory with more tensor bytes than this goes by path too (protobuf cannot
#: serialize 2 GiB).
SERIALIZE_LIMIT = EXTERNAL_DATA_THRESHOLD


def load(path: str | os.PathLike, load_external: bool = True) -> onnx.ModelProto:
    """Read an ONNX model, or raise ModelError naming the file and the problem.

    A model over :data:`LARGE_MODEL_BYTES` with external data keeps its weights on disk:
    its tensors name their data file by absolute path, :func:`tensor_array` reads them one
    at a time, and :func:`temp_model_file` writes the graph back with relative paths for
    onnx and onnxruntime."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    if p.is_dir():
        raise ModelError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise ModelError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
        if load_external and has_external_data(model):
            if p.stat().st_size + external_bytes(model) > LARGE_MODEL_BYTES:
                _locate_external_data(model, p)
            else:
                from onnx.external_data_helper import load_external_data_for_model
                load_external_data_for_model(model, str(p.parent))
    except ModelError:
        raise
    except Exception as exc:  # protobuf raises DecodeError, others on truncation
        raise ModelError(f"{p}: not a readable ONNX model ({_short(exc)})") from None
    if not model.graph.node and not model.graph.input:
        raise ModelError(f"{p}: not an ONNX model (no graph found)")
    return model


# -- models whose weights stay on disk ---------------------------------------------------

def all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of ``graph``: initializers and tensor attributes, subgraphs included."""
    return (t for t, _ in _tensors(graph))


def _tensors(graph: onnx.GraphProto):
    """(tensor, is an initializer) for every tensor of ``graph``, subgraphs included."""
    for t in graph.initializer:
        yield t, True
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t, False
            for t in a.tensors:
                yield t, False
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in all_tensors(model.graph))


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model's tensors keep in external data files (from their lengths, else their shapes)."""
    total = 0
    for t in all_tensors(model.graph):
        if is_external(t):
            length = _external_info(t).get("length")
            total += int(length) if length else _nbytes(t)
    return total


def _nbytes(t: onnx.TensorProto) -> int:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        itemsize = 4
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _locate_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Point every external tensor at its data file by absolute path, after checking that the
    file exists and holds the tensor's bytes."""
    folder = path.resolve().parent
    for t in all_tensors(model.graph):
        if not is_external(t):
            continue
        info = _external_info(t)
        loc = info.get("location", "")
        target = (folder / loc).resolve()
        if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise ModelError(f"{path}: tensor {t.name!r} names its external data {loc!r}, not a file beside the model")
        end = int(info.get("offset") or 0) + int(info.get("length") or _nbytes(t))
        if not target.is_file() or target.stat().st_size < end:
            raise ModelError(f"{path}: external data {loc!r} of tensor {t.name!r} is missing or shorter than "
                             f"{end:,} bytes; keep the .data file beside the model")
        for e in t.external_data:
            if e.key == "location":
                e.value = str(target)


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's value, read from its data file when the weights stay on disk
    (never loaded into ``t``)."""
    from onnx import numpy_helper
    if not is_external(t):
        return numpy_helper.to_array(t)
    info = _external_info(t)
    loc, offset = info["location"], int(info.get("offset") or 0)
    length = int(info["length"]) if info.get("length") else _nbytes(t)
    shape = tuple(t.dims)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except Exception:
        dtype = None
    if dtype is not None and dtype.kind in "biuf" and dtype.itemsize * int(np.prod(shape, dtype=np.int64)) == length:
        return np.fromfile(loc, dtype=dtype.newbyteorder("<"), count=length // dtype.itemsize,
                           offset=offset).astype(dtype, copy=False).reshape(shape)
    copy = onnx.TensorProto()  # bf16, float8, 4-bit...: let onnx decode the bytes
    copy.CopyFrom(t)
    del copy.external_data[:]
    copy.data_location = onnx.TensorProto.DEFAULT
    with open(loc, "rb") as f:
        f.seek(offset)
        copy.raw_data = f.read(length)
    return numpy_helper.to_array(copy)


def inline_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the proto itself (what serializing it would copy)."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
               for t in all_tensors(model.graph) if not is_external(t))


def by_path(model: onnx.ModelProto) -> bool:
    """Whether onnx and onnxruntime must read this model from a file: its weights stay on
    disk, or it holds more than :data:`SERIALIZE_LIMIT` in memory."""
    return has_external_data(model) or inline_bytes(model) > SERIALIZE_LIMIT


def data_folder(model: onnx.ModelProto) -> Path | None:
    """The folder holding every external data file of a model loaded by :func:`load`."""
    folders = {str(Path(_external_info(t)["location"]).parent) for t in all_tensors(model.graph) if is_external(t)}
    return Path(os.path.commonpath(sorted(folders))) if folders else None


INLINE_LIMIT = 1024**2  # in a temporary model file, tensors held in memory above this size go to a data file


def skeleton(model: onnx.ModelProto, folder: Path, data: Path | None = None, with_data: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` to be written in ``folder``: its tensors on disk name their data
    relative to it; tensors held in memory above :data:`INLINE_LIMIT` go to ``data`` when the
    proto would be too big to serialize, or, ``with_data=False`` (shape inference, which reads
    only types and shapes), are marked external without writing their bytes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in all_tensors(out.graph):
        if is_external(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = os.path.relpath(e.value, folder)
    if not with_data:
        _externalize(out, None)
    elif inline_bytes(out) > SERIALIZE_LIMIT:
        if data is None:
            raise ModelError("the model holds too much in memory to hand to onnxruntime without a data file")
        _externalize(out, data)
    return out


@contextlib.contextmanager
def temp_model_file(model: onnx.ModelProto, folder: str | os.PathLike | None = None, with_data: bool = True):
    """Write ``model`` to a temporary ``.onnx`` file (:func:`skeleton`) and yield its path;
    removed on exit (and on Ctrl-C or SIGTERM; after a SIGKILL by the next write to that folder).

    The file goes in the folder of the model's external data (onnxruntime only reads data
    files inside the model's folder; not with ``with_data=False``), else in ``folder`` or
    the system's temporary folder."""
    home = data_folder(model) if with_data else None
    where = Path(home or folder or tempfile.gettempdir())
    if not os.access(where, os.W_OK | os.X_OK):
        raise ModelError(f"{where}: not writable; qtool hands a model whose weights stay on disk to onnxruntime "
                         "as a temporary file beside its data: copy the model to a writable folder")
    remove_stale_temporaries(where)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".onnx", dir=where)
    os.close(fd)
    tmp = Path(tmp)
    data = tmp.with_name(tmp.name + ".data")
    try:
        with open(tmp, "wb") as f:
            f.write(skeleton(model, where, data, with_data).SerializeToString())
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        data.unlink(missing_ok=True)


def _externalize(model: onnx.ModelProto, data: Path | None) -> None:
    """Move initializers held in memory above :data:`INLINE_LIMIT` to ``data`` (None: mark
    them external without writing their bytes, for onnx's shape inference)."""
    name = data.name if data is not None else "absent.data"
    f = open(data, "ab") if data is not None else None
    try:
        for t in all_tensors(model.graph):
            if is_external(t) or not t.HasField("raw_data") or len(t.raw_data) <= INLINE_LIMIT:
                continue
            offset = f.tell() if f is not None else 0
            if f is not None:
                f.write(t.raw_data)
            _set_external(t, name, offset, len(t.raw_data))
            t.ClearField("raw_data")
    finally:
        if f is not None:
            f.close()


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse, before any work, an output that is a folder, would overwrite an input, or
    lands in a missing or unwritable folder."""
    out_p = Path(out)
    parent = out_p.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"{out_p}: directory {parent} does not exist")
    if out_p.is_dir():
        raise OutputError(f"{out_p}: is a directory; give a file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out_p}: directory {parent} is not writable")
    for src in inputs:
        if src is not None and Path(src).exists() and out_p.exists() and out_p.samefile(src):
            raise OutputError(f"{out_p}: output path is the input file; choose another name")
        if src is not None and out_p.resolve() == Path(src).resolve():
            raise OutputError(f"{out_p}: output path is the input file; choose another name")
    return out_p


TEMP_PREFIX = ".qtool-tmp-"  # + "<pid>-": a temporary file of a write in progress (or killed)


def _file_mode() -> int:
    """What a new file gets under the user's umask (mkstemp would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files and folders left by a qtool process that no longer runs (SIGKILL)."""
    for p in folder.glob(TEMP_PREFIX + "*"):
        pid = p.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if p.is_dir():
            for child in p.glob("*"):
                child.unlink(missing_ok=True)
            p.rmdir()
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename over it; the result has
    the permissions any new file gets, and an interrupted write leaves nothing."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text_file(path: str | os.PathLike, parse, error, kind: str, syntax: str, parse_errors=()):
    """``parse`` the text of a small input file; a missing, unreadable or unparsable file is
    ``error`` with one line ("no such <kind> file", "not <syntax> (...)")."""
    p = Path(path)
    try:
        return parse(p.read_text())
    except FileNotFoundError:
        raise error(f"{p}: no such {kind} file") from None
    except (OSError, UnicodeDecodeError, *parse_errors) as exc:
        raise error(f"{p}: not {syntax} ({exc})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
         check=None) -> None:
    """Save atomically; weights go to ``<name>.data`` beside it when the model is
    too big for one protobuf (or when ``external_data`` is True). ``check(path)`` runs on
    the written file before it is renamed into place (a model whose weights stay on disk
    is checked by path). Tensors written to the data file leave ``model`` holding
    references to it, as onnx's own save does."""
    path = Path(path)
    if external_data is None:
        external_data = inline_bytes(model) + external_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data and not has_external_data(model) and check is None:
        atomic_write_bytes(path, model.SerializeToString())
        return
    remove_stale_temporaries(path.parent)
    tmpdir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=path.parent))
    try:
        data_name = path.name + ".data"
        if external_data and not has_external_data(model):
            onnx.save_model(model, str(tmpdir / path.name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        elif external_data:
            _stream_save(model, tmpdir / path.name, data_name)
        else:
            for t in all_tensors(model.graph):
                if is_external(t):
                    _load_into(t)
            (tmpdir / path.name).write_bytes(model.SerializeToString())
        for written in tmpdir.glob("*"):
            written.chmod(_file_mode())
        if check is not None:
            check(tmpdir / path.name)
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _load_into(t: onnx.TensorProto) -> None:
    """Bring a tensor's bytes from its data file into the proto, as onnx's load does."""
    info = _external_info(t)
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset") or 0))
        t.raw_data = f.read(int(info.get("length") or _nbytes(t)))
    t.data_location = onnx.TensorProto.DEFAULT
    del t.external_data[:]


def _stream_save(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write ``model`` with its tensors' data in ``data_name`` beside ``path``, one tensor at
    a time, in onnx's order: bytes still on disk are copied across in chunks, and initializers
    held in memory (1 KiB or more, as onnx's save does) are written and dropped from the
    proto; nothing is held twice."""
    with open(path.parent / data_name, "wb") as out:
        for t, initializer in _tensors(model.graph):
            start = out.tell()
            if is_external(t) and (not initializer or int(_external_info(t).get("length") or _nbytes(t)) + 33 < 1024):
                _load_into(t)  # an attribute, or too small: onnx's save keeps it inline, so does this
            if is_external(t):
                info = _external_info(t)
                offset, length = int(info.get("offset") or 0), int(info.get("length") or _nbytes(t))
                with open(info["location"], "rb") as src:
                    src.seek(offset)
                    remaining = length
                    while remaining:
                        chunk = src.read(min(remaining, 64 * 1024**2))
                        if not chunk:
                            raise ModelError(f"{info['location']}: ends before tensor {t.name!r}'s data")
                        out.write(chunk)
                        remaining -= len(chunk)
                _set_external(t, data_name, start, length)
            elif initializer and t.HasField("raw_data"):
                raw = t.raw_data
                if len(raw) + 33 < 1024:  # onnx's size_threshold counts sys.getsizeof(bytes)
                    continue
                out.write(raw)
                _set_external(t, data_name, start, len(raw))
                t.ClearField("raw_data")
                del raw
    path.write_bytes(model.SerializeToString())


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Point ``t`` at its bytes in ``location`` (the entries onnx's set_external_data writes)."""
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("model imports no default-domain opset")


def ensure_opset(model: onnx.ModelProto, minimum: int = MIN_QDQ_OPSET) -> tuple[onnx.ModelProto, str | None]:
    """Return the model at opset >= ``minimum`` and a note when it was upgraded."""
    current = default_opset(model)
    if current >= minimum:
        return _ir_at_least(model, 7)
    try:
        upgraded = onnx.version_converter.convert_version(model, minimum)
    except Exception as exc:
        raise ModelError(
            f"opset {current} is below {minimum} and onnx's version converter failed ({_short(exc)}); "
            f"re-export the model at opset {minimum} or later") from None
    upgraded, note = _ir_at_least(upgraded, 7)
    return upgraded, f"upgraded opset {current} -> {minimum} with onnx's version converter" + (f"; {note}" if note else "")


def _ir_at_least(model: onnx.ModelProto, ir: int) -> tuple[onnx.ModelProto, str | None]:
    """Opset 13 needs IR version 7; older files also list every weight as an input."""
    if model.ir_version >= ir:
        return model, None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    old = out.ir_version
    out.ir_version = ir
    return out, f"raised IR version {old} -> {ir}"
