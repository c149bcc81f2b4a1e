"""The only module that imports onnxruntime: sessions, providers, timing, kernel counts."""

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
from .evaluation import Kernels, count_kernels

from .types import Target

PROVIDERS = {t.label: t.provider for t in Target}


@dataclass(frozen=True)
class ProviderChoice:
    """``requested``: the target's label; ``used``: the EP sessions are given first (the
    target's own, or the CPU EP when it cannot be created); ``note``: why it fell back."""

    requested: str
    used: str
    note: str | None


def version() -> str:
    return ort.__version__


def pick_provider(name: str | Target) -> ProviderChoice:
    """The EP for a target (cpu, cuda, trt); the CPU EP, with a one-line note naming what is
    missing, when onnxruntime cannot create the target's EP here."""
    target = Target.parse(name.label if isinstance(name, Target) else name)
    if target is Target.CPU:
        return ProviderChoice("cpu", PROVIDERS["cpu"], None)
    why = unavailable(target.provider)
    if why is None:
        return ProviderChoice(target.label, target.provider, None)
    return ProviderChoice(target.label, PROVIDERS["cpu"], f"{target.provider} unavailable ({why}); running on "
                                                          "the CPU EP instead")


_UNAVAILABLE: dict[str, str | None] = {}
PROVIDER_LIBRARIES = {"CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
                      "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so"}


def unavailable(provider: str) -> str | None:
    """Why onnxruntime cannot run ``provider`` here, or None when it can (cached per process).

    onnxruntime-gpu lists the CUDA and TensorRT EPs among its available providers whether or
    not their libraries or a GPU exist, and a session silently falls back to the CPU EP. So:
    the build must list it; its provider library must load (the dynamic loader names the
    missing CUDA/cuDNN/TensorRT library); and a session on a one-node model must keep it."""
    if provider not in _UNAVAILABLE:
        _UNAVAILABLE[provider] = _probe(provider)
    return _UNAVAILABLE[provider]


def _probe(provider: str) -> str | None:
    if provider not in ort.get_available_providers():
        return f"this onnxruntime ({ort.__version__}) was built without it; install onnxruntime-gpu"
    library = PROVIDER_LIBRARIES.get(provider)
    if library:
        missing = _load_library(os.path.join(os.path.dirname(ort.__file__), "capi", library))
        if missing:
            return missing
    probe = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)])
    probe.ir_version = 8
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), sess_options=session_options(),
                                    providers=provider_list(provider))
    except Exception as exc:
        return f"onnxruntime could not create it: {' '.join(str(exc).split())[:160]}"
    if provider not in sess.get_providers():
        return "its library loads but onnxruntime could not create it (no usable GPU or driver)"
    return None


def _load_library(path: str) -> str | None:
    """None when the shared library at ``path`` loads; else what the loader says is missing."""
    import ctypes
    if not os.path.exists(path):
        return f"{os.path.basename(path)} is not part of this onnxruntime install"
    try:
        ctypes.CDLL(path)
    except OSError as exc:
        text = str(exc)
        found = re.search(r"([\w.+-]+\.so[\w.]*): cannot open shared object file", text)
        return f"missing library {found.group(1)}" if found else f"cannot load {os.path.basename(path)}: {text[:160]}"
    return None


def provider_options(provider: str, model=None) -> dict:
    """Options an EP needs: the TensorRT EP builds an int8 engine from Q/DQ only with
    trt_int8_enable (onnxruntime #13381)."""
    if provider == PROVIDERS["trt"] and model is not None and _has_qdq(model):
        return {"trt_int8_enable": "True"}
    return {}


def _has_qdq(model) -> bool:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


#: onnxruntime's CPU-only QDQ rewrites (qdq_selector_action_transformer.cc, qdq_s8_to_u8.cc). Off, the CPU
#: EP computes each Q/DQ pair as written, in float, as TensorRT's int8 kernels compute them exactly.
QDQ_FUSIONS = ("QDQSelectorActionTransformer", "QDQS8ToU8Transformer")


def emulates(choice: "ProviderChoice") -> bool:
    """A TensorRT target that fell back to the CPU EP: its Q/DQ placement is TensorRT's, and the CPU
    EP's fusions would turn the Conv chains it leaves into integer kernels with full 8-bit weights
    (which saturate on x86 without VNNI); so such sessions run with :data:`QDQ_FUSIONS` off."""
    return choice.requested == "trt" and choice.used == PROVIDERS["cpu"]


def disabled_for(choice: "ProviderChoice") -> tuple[str, ...]:
    """The onnxruntime transformers sessions for ``choice`` leave out (see :func:`emulates`)."""
    return QDQ_FUSIONS if emulates(choice) else ()


def target_session(model: onnx.ModelProto | str, choice: "ProviderChoice", threads: int | None = None
                   ) -> ort.InferenceSession:
    """A session on the EP ``choice`` picked for its target (see :func:`emulates`)."""
    return session(model, choice.used, threads, disabled=disabled_for(choice))


def session(model: onnx.ModelProto | str, provider: str = PROVIDERS["cpu"], threads: int | None = None,
            optimize: bool = True, optimized_path: str | None = None,
            disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    """``disabled``: onnxruntime graph transformers to leave out (by name)."""
    opts = session_options(threads, optimize, optimized_path)
    providers = provider_list(provider, model if provider == PROVIDERS["trt"] else None)
    if not isinstance(model, str) and model_io.by_path(model):
        # weights on disk or over 2 GiB: onnxruntime reads a temporary file beside the data
        folder = model_io.data_folder(model)
        if (folder is not None and not os.access(folder, os.W_OK | os.X_OK)
                and model_io.inline_bytes(model) <= model_io.SERIALIZE_LIMIT):
            # a read-only folder: the graph alone from memory, the weights from the files there
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            return _session(model_io.skeleton(model, folder).SerializeToString(), opts, providers, disabled)
        with model_io.temp_model_file(model) as path:
            return _session(str(path), opts, providers, disabled)
    return _session(model if isinstance(model, str) else model.SerializeToString(), opts, providers, disabled)


def session_options(threads: int | None = None, optimize: bool = True, optimized_path: str | None = None,
                    side_file: str | None = None) -> ort.SessionOptions:
    """Quiet options (failures come back as exceptions, reported in one line), ``threads`` pinned
    (inter-op 1), all optimisations unless ``optimize`` is False; with ``optimized_path`` the
    optimised graph is saved there, its weights over 1 KiB to ``side_file`` when given."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
        if side_file:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", side_file)
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                          "1024")
    return opts


def provider_list(provider: str, model=None) -> list:
    """``provider``, with the EPs behind it for the nodes it does not take (TensorRT: CUDA,
    then CPU; CUDA: CPU); an entry is ``(name, options)`` where the EP needs options."""
    target = next((t for t in Target if t.provider == provider), None)
    chain = list(target.providers) if target is not None else [provider, PROVIDERS["cpu"]]
    extra = provider_options(provider, model)
    return [(chain[0], extra)] + chain[1:] if extra else chain


def _session(source, opts, providers, disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    try:
        if disabled:
            return ort.InferenceSession(source, sess_options=opts, providers=providers,
                                        disabled_optimizers=list(disabled))
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


def typed_feeds(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with float arrays cast to the float type each input of ``sess`` declares (an fp16
    model with fp16 inputs takes the same float32 data as its fp32 reference); others as given."""
    out = dict(feeds)
    for i in getattr(sess, "get_inputs", list)():
        arr = out.get(i.name)
        if arr is None or arr.dtype.kind != "f":
            continue
        want = ort_dtype(i.type)
        if i.type in ("tensor(float)", "tensor(float16)", "tensor(double)") and arr.dtype != want:
            out[i.name] = arr.astype(want)
    return out


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


#: A timed sample lasts at least this long: a model that runs in 0.1 ms is timed over blocks of
#: consecutive runs, so that timer resolution and scheduler noise do not swamp it.
MIN_SAMPLE_MS = 2.0
MAX_BLOCK = 200


def time_pair(sess_a, sess_b, feeds: dict[str, np.ndarray], warmup: int = 5,
              repeats: int = 30) -> tuple[Timing, Timing, np.ndarray]:
    """Time two sessions as ``repeats`` interleaved pairs, so machine noise hits both alike.

    Each pair runs both sessions back to back; which one goes first alternates from pair
    to pair (A then B, B then A, ...), so neither always runs on a cache the other warmed.
    A sample is one run, or a block of consecutive runs for models faster than
    ``MIN_SAMPLE_MS`` (the block is chosen from the warm-up; times are per run).
    Returns each session's Timing and the per-pair ratios ``a_ms / b_ms`` (with A the
    reference and B the candidate, the speedup of each pair).
    """
    fa, fb = typed_feeds(sess_a, feeds), typed_feeds(sess_b, feeds)
    quickest = float("inf")
    for _ in range(max(warmup, 1)):
        for sess, f in ((sess_a, fa), (sess_b, fb)):
            t0 = time.perf_counter()
            sess.run(None, f)
            quickest = min(quickest, (time.perf_counter() - t0) * 1000.0)
    block = int(min(MAX_BLOCK, max(1, np.ceil(MIN_SAMPLE_MS / max(quickest, 1e-3)))))
    ta, tb = np.empty(repeats), np.empty(repeats)
    for i in range(repeats):
        order = ((sess_a, ta, fa), (sess_b, tb, fb)) if i % 2 == 0 else ((sess_b, tb, fb), (sess_a, ta, fa))
        for sess, acc, f in order:
            t0 = time.perf_counter()
            for _ in range(block):
                sess.run(None, f)
            acc[i] = (time.perf_counter() - t0) * 1000.0 / block
    timings = tuple(Timing(float(np.median(a)), float(np.percentile(a, 90)), repeats) for a in (ta, tb))
    return timings[0], timings[1], ta / np.maximum(tb, 1e-9)


def kernel_counts(model: str, provider: str = PROVIDERS["cpu"], threads: int | None = None,
                  disabled: tuple[str, ...] = ()) -> tuple[Kernels | None, str | None]:
    """What onnxruntime runs: integer kernels and Q/DQ left unfused in the optimised graph.

    A session is made with ORT_ENABLE_ALL on ``provider`` (the same as the timed session,
    ``disabled`` transformers left out as there) and its optimised graph saved into a
    temporary folder (weights to a side file, never read back), then its nodes, subgraphs
    included, are counted (:func:`qtool.evaluation.count_kernels`). Returns
    ``(Kernels, None)``, or ``(None, note)`` when onnxruntime cannot save the optimised
    graph (a graph over 2 GB, ...); on the TensorRT EP, whose engines onnxruntime cannot
    save (compiled nodes), without building one.
    """
    import tempfile
    if provider == PROVIDERS["trt"]:
        return None, (f"{os.path.basename(str(model))}: kernel counts unavailable on the TensorRT EP (it compiles "
                      "the graph into engines, which onnxruntime cannot save); see which EP ran each kernel")
    with tempfile.TemporaryDirectory(prefix="qtool-opt-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        try:
            opts = session_options(threads, True, out, "optimized.onnx.data")
            _session(str(model), opts, provider_list(provider), disabled)
            graph = onnx.load(out, load_external_data=False).graph
        except Exception as exc:
            text = " ".join(str(exc).split())[:200]
            return None, (f"{os.path.basename(str(model))}: kernel counts unavailable, onnxruntime could not save "
                          f"its optimised graph ({type(exc).__name__}: {text})")
    return count_kernels(_graph_nodes(graph)), None


def _graph_nodes(graph: onnx.GraphProto, outer: frozenset = frozenset()):
    """``(op_type, inputs, outputs, constants)`` of every node, subgraphs included."""
    constants = set(outer) | {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    frozen = frozenset(constants)
    for node in graph.node:
        yield node.op_type, list(node.input), list(node.output), frozen
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                        list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
                yield from _graph_nodes(sub, frozen)


def ort_dtype(type_str: str) -> np.dtype:
    """'tensor(float)' -> float32."""
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(int16)": np.int16}
    return np.dtype(table.get(type_str, np.float32))
