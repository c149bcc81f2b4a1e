"""Checks a rewritten model must pass before it is saved."""

from __future__ import annotations

import os

import onnx

from .errors import InternalError


def check_quantized(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
    """onnx's full checker (with strict shape inference); raise on failure. With ``path``
    (``model`` as written there: its weights stayed on disk, or it is over 2 GiB) the file is
    checked by path: onnx reads it and finds the external data beside it, and the model is
    never serialized in memory."""
    try:
        if path is not None:
            contrib = any(n.domain == "com.microsoft" for n in model.graph.node)
            onnx.checker.check_model(str(path), full_check=not contrib)
        elif model.ByteSize() < 2 * 1024**3 - 1024**2:
            # onnx has no schemas for onnxruntime's com.microsoft ops: full (strict shape) check only without them
            contrib = any(n.domain == "com.microsoft" for n in model.graph.node)
            onnx.checker.check_model(model, full_check=not contrib)
    except Exception as exc:
        raise InternalError(f"internal error: the quantized model fails onnx.checker "
                            f"({str(exc).splitlines()[0][:300]}); please report it with the model "
                            "(QTOOL_DEBUG=1 shows more)") from None
