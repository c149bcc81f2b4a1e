"""The vocabulary every stage speaks: precisions, granularities and targets.

Small frozen values, not strings. A new precision or target is a new value
here, not a new code path through every module. Each has a JSON form that the
plan round-trips::

    Precision.parse("int8") is Precision.INT8
    granularity_from_json(granularity_to_json(PerAxis(0))) == PerAxis(0)
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np
import onnx

_T = onnx.TensorProto


MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (and its 16-bit Q/DQ below opset 21)


class Precision(Enum):
    """A tensor's number format. Integer members carry their grid
    (qmin..qmax); ``FLOAT`` means "the model's own float type" (kept float)."""

    INT8 = ("int8", -128, 127, _T.INT8)
    UINT8 = ("uint8", 0, 255, _T.UINT8)
    INT16 = ("int16", -32768, 32767, _T.INT16)
    UINT16 = ("uint16", 0, 65535, _T.UINT16)
    INT4 = ("int4", -8, 7, _T.INT4)
    UINT4 = ("uint4", 0, 15, _T.UINT4)
    INT32 = ("int32", -(2**31), 2**31 - 1, _T.INT32)
    FP16 = ("fp16", None, None, _T.FLOAT16)
    BF16 = ("bf16", None, None, _T.BFLOAT16)
    FP32 = ("fp32", None, None, _T.FLOAT)
    FLOAT = ("float", None, None, _T.UNDEFINED)

    def __init__(self, label, qmin, qmax, onnx_type):
        self.label = label
        # numpy storage type (int4 and bf16 through ml_dtypes, as onnx's numpy_helper expects)
        self.dtype = np.dtype(np.float32 if onnx_type == _T.UNDEFINED
                              else onnx.helper.tensor_dtype_to_np_dtype(onnx_type))
        self.qmin = qmin
        self.qmax = qmax
        self.onnx_type = onnx_type  # onnx.TensorProto enum value

    @property
    def is_integer(self) -> bool:
        return self.qmin is not None

    @property
    def bits(self) -> int | None:
        return None if self.qmin is None else int(self.qmax - self.qmin + 1).bit_length() - 1

    @classmethod
    def parse(cls, name) -> "Precision":
        if isinstance(name, Precision):
            return name
        for member in cls:
            if member.label == name:
                return member
        raise ValueError(f"unknown precision {name!r} (known: {', '.join(m.label for m in cls)})")


#: The precisions a node override (``--precision NAME=P``) may ask for.
NODE_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8, Precision.UINT8, Precision.INT16, Precision.UINT16)


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerAxis:
    """One scale per slice along ``axis`` (e.g. per output channel)."""

    axis: int


@dataclass(frozen=True)
class PerBlock:
    """One scale per ``size`` consecutive elements along ``axis`` (int4 weights)."""

    axis: int
    size: int


Granularity = PerTensor | PerAxis | PerBlock


def granularity_to_json(g: Granularity) -> dict:
    if isinstance(g, PerBlock):
        return {"kind": "per-block", "axis": g.axis, "size": g.size}
    if isinstance(g, PerAxis):
        return {"kind": "per-axis", "axis": g.axis}
    return {"kind": "per-tensor"}


def granularity_from_json(d) -> Granularity:
    if not isinstance(d, dict) or d.get("kind") not in ("per-tensor", "per-axis", "per-block"):
        raise ValueError(f"granularity must be {{'kind': 'per-tensor'|'per-axis'|'per-block', ...}}, got {d!r}")
    if d["kind"] == "per-tensor":
        return PerTensor()
    axis = d.get("axis")
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"granularity {d['kind']} needs an integer axis, got {axis!r}")
    if d["kind"] == "per-axis":
        return PerAxis(axis)
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"per-block granularity needs a positive integer size, got {size!r}")
    return PerBlock(axis, size)


def axis_of(g: Granularity) -> int | None:
    return None if isinstance(g, PerTensor) else g.axis


class Target(Enum):
    """Where the quantized model runs: onnxruntime's execution provider, and the
    providers a session lists behind it for the nodes it does not take."""

    CPU = ("cpu", "onnxruntime's CPU EP", ("CPUExecutionProvider",))
    CUDA = ("cuda", "onnxruntime's CUDA EP", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    TRT = ("trt", "onnxruntime's TensorRT EP",
           ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))

    def __init__(self, label, ep, providers):
        self.label = label
        self.ep = ep
        self.providers = providers

    @property
    def provider(self) -> str:
        """The execution provider this target means."""
        return self.providers[0]

    @classmethod
    def parse(cls, name) -> "Target":
        for member in cls:
            if member.label == name:
                return member
        raise ValueError(f"unknown target {name!r} (known: {', '.join(m.label for m in cls)})")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_saturates_u8s8() -> bool:
    """True on x86-64 without VNNI: onnxruntime's u8 x s8 kernels (AVX2 vpmaddubsw) add
    pairs of products into int16 and saturate with full 8-bit int8 weights. Two ways
    out: 7-bit int8 weights (-64..64 keep 2 * 255 * 64 below 32767), or uint8 weights,
    which run the exact u8 x u8 kernels. Measured on the bundled sample: 0.9035 top-1
    with 8-bit int8 weights, 0.9155 with 7-bit (fp32 0.9135)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_flags()
    if not flags:
        return False
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
