"""Typed options for every stage, and TOML presets that set them.

A preset is a TOML file with up to three tables, ``[calibrate]``, ``[quantize]``
and ``[eval]``, whose keys are the fields below. Unknown tables or keys and
values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse", "auto")
ACTIVATION_TYPES = ("int8", "uint8")
WEIGHT_TYPES = ("auto", "int8", "uint8")
FORMATS = ("qdq", "qoperator")
TARGETS = ("cpu", "cuda", "trt")
WEIGHT_RECIPES = ("int8", "int4", "fp16")
INT4_METHODS = ("rtn", "hqq", "gptq")
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class CalibrateOptions:
    """How statistics are collected.

    method: minmax | entropy | percentile | mse | auto. bins: histogram bins for the
    histogram methods. percentile: kept mass in percent. symmetric: a range
    symmetric around zero. moving_average: minmax only, average per-batch
    extremes with ``averaging_constant`` instead of keeping the global ones.
    auto: per activation, the range of minmax, percentile, mse or entropy that
    gives the least error at the model's outputs, measured on the first
    ``auto_samples`` samples (see qtool.calib.auto).
    """

    method: str = "minmax"
    batch_size: int = 32
    limit: int | None = None
    bins: int = 2048
    percentile: float = 99.999
    symmetric: bool = False
    moving_average: bool = False
    averaging_constant: float = 0.01
    auto_samples: int = 16

    def __post_init__(self):
        _choice("calibrate.method", self.method, CALIBRATION_METHODS)
        _positive("calibrate.auto_samples", self.auto_samples)
        _positive("calibrate.batch_size", self.batch_size)
        if self.limit is not None:
            _positive("calibrate.limit", self.limit)
        _positive("calibrate.bins", self.bins)
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"calibrate.percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ConfigError(f"calibrate.averaging_constant must be in (0, 1], got {self.averaging_constant}")


@dataclass(frozen=True)
class QuantizeOptions:
    """What the planner may quantize and how.

    mode: static (activation ranges from calibration) or dynamic (weights only;
    activations quantized at run time, no calibration data).
    format: qdq (QuantizeLinear/DequantizeLinear around float ops) or qoperator
    (QLinearConv, QLinearMatMul, QLinearAdd ... in one node each).
    per_channel: one weight scale per output channel (Conv axis 0, MatMul/Gemm
    output features). activation_type: uint8 (default) or int8 activations,
    asymmetric unless activation_symmetric. uint8 is the default because on
    x86-64 onnxruntime runs QDQ Conv as U8S8 and converts int8 activations to
    uint8 only where a QuantizeLinear feeds a single DequantizeLinear; a tensor
    with several consumers (residuals, branches) then keeps its Conv in float.
    weight_type: auto (default), int8 or uint8 weights, symmetric (uint8 around
    zero point 128). On x86-64 without VNNI onnxruntime's u8 x s8 kernels
    saturate: there int8 weights of integer matrix products go on a 7-bit grid,
    uint8 ones run exact u8 x u8 kernels (slower), and auto means uint8 for
    Conv, int8 (7-bit) for MatMul/Gemm (measured: docs/benchmarks.md);
    elsewhere auto means int8.
    precision: per-node overrides ``"NAME_OR_OPTYPE=P"`` with P one of fp32,
    int8, uint8, int16, uint16 (a node name beats an op type). exclude: node
    names or op types kept float (a synonym for ``NAME=fp32``).
    preprocess: constant folding, Constant->initializer, BatchNorm and Pad
    folding before planning (opset upgrade and shape inference always run).
    external_data: write weights to ``<output>.data`` (None: only when the
    model is too big for one protobuf, 2 GiB).
    target: where the model runs (cpu, cuda: onnxruntime's CUDA EP, trt: its
    TensorRT EP); it decides what is fast and so the recipe's default.
    weights: the recipe. int8: integer kernels (static or dynamic, as
    ``mode``); int4: weight-only block-wise 4-bit MatMul weights
    (MatMulNBits) and embedding tables, activations float; fp16: the model in
    half precision with the ops that need fp32 kept fp32 (``keep_fp32``, and
    those measured to need it). None: fp16 on cuda, int8 elsewhere; on cuda,
    int4 runs with fp16 activations. block_size, int4_method (rtn, hqq: data
    free; gptq: needs calibration data; None: gptq when data is given, else rtn) and int4_symmetric shape the int4
    weights. keep_io_types: an fp16 model keeps fp32 inputs and outputs.
    algorithms: accuracy algorithms (qtool.algorithms): model ones run on the fp32
    model before calibration and planning ("cle", "smoothquant"; a table or plan
    made with others is refused), weight ones on the resolved plan with the
    calibration data ("rounding", "bias_correction"); ("auto",): those that
    apply (qtool.algorithms.choose), each kept where it measured a gain.
    dynamic: MatMul/Gemm nodes (names or op types) quantized dynamically inside
    the static model (activations quantized at run time); ``("auto",)``: those
    whose output error measured on the calibration data is lower that way (see
    qtool.mixed).
    """

    format: str = "qdq"
    mode: str = "static"
    per_channel: bool = True
    activation_type: str = "uint8"
    activation_symmetric: bool = False
    weight_type: str = "auto"
    precision: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    preprocess: bool = True
    external_data: bool | None = None
    target: str = "cpu"
    weights: str | None = None
    block_size: int = 32
    int4_method: str | None = None
    int4_symmetric: bool = False
    keep_fp32: tuple[str, ...] = ()
    keep_io_types: bool = True
    algorithms: tuple[str, ...] = ()
    dynamic: tuple[str, ...] = ()

    def __post_init__(self):
        _choice("quantize.format", self.format, FORMATS)
        from .algorithms import KNOWN
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        for name in self.algorithms:
            if name not in KNOWN + ("auto",):
                raise ConfigError(f"quantize.algorithms: unknown {name!r} (known: {', '.join(KNOWN)}, auto, or none)")
        if "auto" in self.algorithms and len(self.algorithms) > 1:
            raise ConfigError("quantize.algorithms: auto chooses among all of them: give it alone")
        _choice("quantize.target", self.target, TARGETS)
        if self.weights is not None:
            _choice("quantize.weights", self.weights, WEIGHT_RECIPES)
        if self.int4_method is not None:
            _choice("quantize.int4_method", self.int4_method, INT4_METHODS)
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"quantize.block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                              f"got {self.block_size!r}")
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))
        if self.target == "trt" and self.format == "qoperator":
            raise ConfigError("--target trt: TensorRT builds its int8 engine from Q/DQ pairs and reads no "
                              "QOperator kernels (QLinearConv, ...); use --format qdq")
        object.__setattr__(self, "dynamic", tuple(self.dynamic))
        if self.dynamic and (self.mode != "static" or self.format != "qdq" or self.target != "cpu"):
            raise ConfigError("--dynamic (MatMul/Gemm quantized at run time inside a static model) is for static "
                              "QDQ models on the CPU EP: drop --mode dynamic / --format qoperator / --target")
        if self.target == "trt" and self.mode == "dynamic":
            raise ConfigError("--target trt: TensorRT has no dynamic quantization; quantize in static mode "
                              "(--table or --data)")
        if self.target == "trt" and self.recipe == "int4":
            raise ConfigError("--target trt with --weights int4: MatMulNBits is no TensorRT layer (it would run on "
                              "the CUDA EP behind TensorRT); use --target cuda for int4 weights, or int8 for trt")
        if self.recipe != "int8" and (self.mode == "dynamic" or self.format == "qoperator"):
            raise ConfigError(f"--weights {self.recipe} quantizes no activations: --mode dynamic and --format "
                              "qoperator are int8 choices")
        _choice("quantize.mode", self.mode, ("static", "dynamic"))
        _choice("quantize.activation_type", self.activation_type, ACTIVATION_TYPES)
        _choice("quantize.weight_type", self.weight_type, WEIGHT_TYPES)
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "precision", tuple(self.precision))
        overrides = self.overrides()
        wide = [key for key, p in overrides if p.bits == 16]
        if wide and (self.mode == "dynamic" or self.format == "qoperator"):
            raise ConfigError(f"16-bit activations ({wide[0]}) exist only as QDQ: use --format qdq in static mode")

    @property
    def recipe(self) -> str:
        """``weights``, or the target's default: fp16 on cuda (int8 QDQ there is fake-quantized), int8 elsewhere."""
        if self.weights is not None:
            return self.weights
        return "fp16" if self.target == "cuda" else "int8"

    @property
    def target_enum(self):
        """``target`` as a :class:`qtool.types.Target`."""
        from .types import Target
        return Target.parse(self.target)

    @property
    def activation_precision(self):
        """``activation_type`` as a :class:`qtool.types.Precision`."""
        from .types import Precision
        return Precision.parse(self.activation_type)

    def overrides(self) -> list[tuple[str, object]]:
        """(name or op type, precision) pairs: ``exclude`` first, then ``precision`` in order."""
        from .types import NODE_PRECISIONS, Precision
        pairs = [(key, Precision.FP32) for key in self.exclude]
        allowed = ", ".join(p.label for p in NODE_PRECISIONS)
        for item in self.precision:
            key, sep, value = item.rpartition("=")
            if not sep or not key:
                raise ConfigError(f"quantize.precision {item!r}: expected NAME_OR_OPTYPE=PRECISION ({allowed})")
            try:
                precision = Precision.parse(value.strip())
            except ValueError:
                precision = None
            if precision not in NODE_PRECISIONS:
                raise ConfigError(f"quantize.precision {item!r}: precision must be one of {allowed}")
            pairs.append((key.strip(), precision))
        return pairs


@dataclass(frozen=True)
class EvalOptions:
    """Gates and timing for ``qtool eval``; a gate left as None is not checked.

    min_speedup gates the median per-pair speedup (reference_ms / candidate_ms of
    interleaved runs); min_snr, in dB, the lowest SNR over the outputs.
    """

    provider: str = "cpu"
    batch_size: int = 64
    threads: int | None = None
    warmup: int = 5
    repeats: int = 30
    max_drop: float | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    max_task_drop: float | None = None
    task: str | None = None
    min_speedup: float | None = None
    min_snr: float | None = None

    def __post_init__(self):
        if self.min_speedup is not None and not self.min_speedup > 0:
            raise ConfigError(f"eval.min_speedup must be a positive number, got {self.min_speedup!r}")
        _choice("eval.provider", self.provider, TARGETS)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.repeats", self.repeats)
        if self.threads is not None:
            _positive("eval.threads", self.threads)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"eval.warmup must be a non-negative integer, got {self.warmup!r}")


@dataclass(frozen=True)
class Preset:
    calibrate: CalibrateOptions = field(default_factory=CalibrateOptions)
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)


SECTIONS = {"calibrate": CalibrateOptions, "quantize": QuantizeOptions, "eval": EvalOptions}


def _choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _positive(key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _check_type(key: str, value, annotation: str):
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool}
    base = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return value
    if base.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return tuple(value)
    kind = expected[base]
    if isinstance(value, bool) and base != "bool" or not isinstance(value, kind):
        raise ConfigError(f"{key} must be {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value


def build(cls, values: dict, section: str):
    """Make ``cls`` from a dict, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {section}.{key} (known: {', '.join(fields)})")
        kwargs[key] = _check_type(f"{section}.{key}", value, str(fields[key].type))
    return cls(**kwargs)


def load_preset(path: str | Path) -> Preset:
    from .model import read_text_file
    p = Path(path)
    data = read_text_file(p, tomllib.loads, ConfigError, "preset", "valid TOML", (tomllib.TOMLDecodeError,))
    parts = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{p}: unknown table [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: {section} must be a table")
        try:
            parts[section] = build(SECTIONS[section], values, section)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    return Preset(**parts)


def override(options, **changes):
    """Replace the fields given (not None) in a frozen options record."""
    real = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(options, **real) if real else options
