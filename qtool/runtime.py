"""The only module that imports onnxruntime: sessions, providers, timing."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from . import model as model_io
from .errors import ModelError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class ProviderChoice:
    requested: str
    used: str
    note: str | None


def version() -> str:
    return ort.__version__


def pick_provider(name: str) -> ProviderChoice:
    """Map ``cpu``/``cuda`` to an EP; fall back to CPU with a note when CUDA is absent."""
    if name == "cpu":
        return ProviderChoice("cpu", PROVIDERS["cpu"], None)
    if PROVIDERS["cuda"] in ort.get_available_providers():
        return ProviderChoice("cuda", PROVIDERS["cuda"], None)
    return ProviderChoice("cuda", PROVIDERS["cpu"],
                          "CUDA execution provider not available in this onnxruntime; falling back to CPU")


def session(model: onnx.ModelProto | str, provider: str = PROVIDERS["cpu"], threads: int | None = None,
            optimize: bool = True, optimized_path: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures come back as exceptions, reported in one line
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    providers = [provider] if provider == PROVIDERS["cpu"] else [provider, PROVIDERS["cpu"]]
    if not isinstance(model, str) and model_io.by_path(model):
        # weights on disk or over 2 GiB: onnxruntime reads a temporary file beside the data
        folder = model_io.data_folder(model)
        if (folder is not None and not os.access(folder, os.W_OK | os.X_OK)
                and model_io.inline_bytes(model) <= model_io.SERIALIZE_LIMIT):
            # a read-only folder: the graph alone from memory, the weights from the files there
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            return _session(model_io.skeleton(model, folder).SerializeToString(), opts, providers)
        with model_io.temp_model_file(model) as path:
            return _session(str(path), opts, providers)
    return _session(model if isinstance(model, str) else model.SerializeToString(), opts, providers)


def _session(source, opts, providers) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None


def used_providers(sess: ort.InferenceSession) -> list[str]:
    return sess.get_providers()


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run; onnxruntime's own failure (it names the node) becomes one ModelError line."""
    try:
        return sess.run(outputs, feeds)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.RuntimeException,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
        raise ModelError(f"onnxruntime failed to run the model: {_failure(str(exc))}; check that the data's "
                         "shapes and values suit the model") from None


def _failure(text: str) -> str:
    """'<Op> node <name>: <what went wrong>' from onnxruntime's message, without its C++ location."""
    text = " ".join(text.split())
    where = re.search(r"while running (\S+) node\. Name:'([^']*)'", text)
    what = text.split("Status Message:", 1)[-1]
    what = re.sub(r"^\s*\S+\.(?:h|cc):\d+ .*?\) (?:\S+ )*?was false\. ", "", what).strip()
    head = f"{where.group(1)} node {where.group(2)!r}: " if where else ""
    return (head + what)[:300]


def output_names(sess: ort.InferenceSession) -> list[str]:
    return [o.name for o in sess.get_outputs()]


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    runs: int


def time_session(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], warmup: int = 5,
                 repeats: int = 30) -> Timing:
    """Median and p90 wall time of ``sess.run`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
    arr = np.asarray(times)
    return Timing(float(np.median(arr)), float(np.percentile(arr, 90)), repeats)


def time_pair(sess_a, sess_b, feeds: dict[str, np.ndarray], warmup: int = 5, repeats: int = 30) -> tuple[Timing, Timing]:
    """Time two sessions interleaved run by run, so machine noise hits both alike."""
    for _ in range(warmup):
        sess_a.run(None, feeds)
        sess_b.run(None, feeds)
    ta, tb = [], []
    for _ in range(repeats):
        for sess, acc in ((sess_a, ta), (sess_b, tb)):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            acc.append((time.perf_counter() - t0) * 1000.0)
    return tuple(Timing(float(np.median(a)), float(np.percentile(a, 90)), repeats) for a in (np.asarray(ta), np.asarray(tb)))


def ort_dtype(type_str: str) -> np.dtype:
    """'tensor(float)' -> float32."""
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16}
    return np.dtype(table.get(type_str, np.float32))
