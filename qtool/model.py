"""Model I/O at the edge: load with clear errors, save atomically, hash, opsets."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx

from .errors import ModelError, OutputError

MIN_QDQ_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # stay clear of protobuf's 2 GiB limit


def load(path: str | os.PathLike, load_external: bool = True) -> onnx.ModelProto:
    """Read an ONNX model, or raise ModelError naming the file and the problem."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file")
    if p.is_dir():
        raise ModelError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise ModelError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=load_external)
    except Exception as exc:  # protobuf raises DecodeError, others on truncation
        raise ModelError(f"{p}: not a readable ONNX model ({_short(exc)})") from None
    if not model.graph.node and not model.graph.input:
        raise ModelError(f"{p}: not an ONNX model (no graph found)")
    return model


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


def save(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Save atomically; weights go to ``<name>.data`` beside it when the model is
    too big for one protobuf (or when ``external_data`` is True)."""
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        atomic_write_bytes(path, model.SerializeToString())
        return
    remove_stale_temporaries(path.parent)
    tmpdir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=path.parent))
    try:
        data_name = path.name + ".data"
        onnx.save_model(model, str(tmpdir / path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        for written in tmpdir.glob("*"):
            written.chmod(_file_mode())
        os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
    finally:
        for leftover in tmpdir.glob("*"):
            leftover.unlink()
        tmpdir.rmdir()


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
