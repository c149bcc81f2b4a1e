"""Which ops run in fp16, and which of their inputs and outputs become fp16.

``HALF_OPS``: the default-domain ops qtool runs in half precision. Each has a float16
kernel on onnxruntime's CUDA EP (the registrations listed for CUDAExecutionProvider in
onnxruntime's ``docs/OperatorKernels.md``, generated from
``core/providers/cuda/cuda_execution_provider.cc``) and ONNX type constraints that allow
``tensor(float16)``. Left out on purpose: Range, RoiAlign, NonMaxSuppression, GridSample
(no float16 CUDA kernel), Celu (ONNX allows float only), LSTM/GRU/RNN (not measured here),
control flow (If/Loop/Scan: their bodies are planned on their own).

On the CPU EP (onnxruntime 1.31.1, x86-64, measured by running each op on fp16 tensors and
reading the optimised graph) only ``CPU_HALF_KERNELS`` run in fp16; every other op of
``HALF_OPS`` runs in float32 between Casts that onnxruntime's InsertCastTransformer adds, so
an fp16 model is valid there but slower, not faster.

Which inputs and outputs of a node become fp16 follows its ONNX schema: every type
parameter bound to float32 in this node whose constraint allows float16 (``T`` of Add,
``T``/``T1``/``T2`` of BatchNormalization), except those onnxruntime reads as float32
whatever the model says: Resize's roi (``UpsampleBase::ParseRoiData`` copies it as float,
``core/providers/cpu/tensor/upsamplebase.h``); fixed types (Resize scales are
``tensor(float)``) and integer inputs (Reshape's shape, Gather's indices) never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import onnx

FLOAT = onnx.TensorProto.FLOAT
HALF = onnx.TensorProto.FLOAT16
MS = "com.microsoft"

#: Default-domain (and a few com.microsoft) ops qtool runs in fp16; the most common first.
HALF_OPS = (
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid",
    "Tanh", "Softmax", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "HardSigmoid",
    "HardSwish", "Erf", "LayerNormalization", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    "Abs", "Neg", "Reciprocal", "Sqrt", "Exp", "Log", "Pow", "PRelu", "Elu", "Selu", "Softplus", "Softsign",
    "Gelu", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Min", "Max", "Sum", "GlobalMaxPool",
    "BatchNormalization", "InstanceNormalization", "LRN", "LogSoftmax", "Einsum",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Where",
    "Split", "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Pad", "Resize",
    "DepthToSpace", "SpaceToDepth", "Identity", "Dropout", "CumSum", "TopK", "ScatterND", "ScatterElements",
    "Trilu", "ConstantOfShape", "Constant", "Cast",
    # com.microsoft, float16 on the CUDA EP (docs/OperatorKernels.md); every float input and output is T
    "FusedMatMul", "FastGelu", "BiasGelu",
)

#: Of HALF_OPS, those onnxruntime 1.31.1's CPU EP runs in fp16 on x86-64 (no Casts inserted).
CPU_HALF_KERNELS = frozenset((
    "Round", "Sign", "Identity", "Flatten", "Transpose", "Max", "Min", "LayerNormalization", "Clip", "Concat",
    "Split", "Slice", "Gather", "GatherElements", "GatherND", "Reshape", "Squeeze", "Unsqueeze", "Expand",
    "ConstantOfShape", "Constant", "ScatterND", "Cast", "MatMulNBits", "GatherBlockQuantized"))

#: Weight-only int4 kernels (com.microsoft) whose float inputs and outputs may be fp16: MatMulNBits
#: (A, scales, bias and a float zero point are T1) and GatherBlockQuantized (scales and output are T2).
INT4_KERNELS = {"MatMulNBits": ((0, 2, 3, 5), (0,)), "GatherBlockQuantized": ((2,), (0,))}

#: Type parameters onnxruntime reads as float32 whatever their declared type.
_FLOAT32_PARAMS = {"Resize": {"T2"}}

#: Inputs read as any type: they need no Cast whichever version of a tensor they get.
AGNOSTIC_INPUTS = {"Shape": 0, "Size": 0, "Cast": 0}

_SCALAR_ATTR_TYPES = {"value_float": FLOAT, "value_floats": FLOAT, "value_int": onnx.TensorProto.INT64,
                      "value_ints": onnx.TensorProto.INT64, "value_string": onnx.TensorProto.STRING,
                      "value_strings": onnx.TensorProto.STRING}


@dataclass(frozen=True)
class Slots:
    """The input and output positions of a node that become fp16."""

    inputs: frozenset[int]
    outputs: frozenset[int]


def is_agnostic(node: onnx.NodeProto, k: int) -> bool:
    return node.domain in ("", "ai.onnx") and AGNOSTIC_INPUTS.get(node.op_type) == k


def half_slots(node: onnx.NodeProto, opset: int, types: dict[str, int]) -> Slots | None:
    """The positions of ``node`` that become fp16 when it runs in half precision (empty when it
    has no float32 tensor to convert), or None when it cannot run in fp16 (not in HALF_OPS,
    or its schema does not allow float16 where it has float32 tensors)."""
    if node.domain == MS and node.op_type in INT4_KERNELS:
        ins, outs = INT4_KERNELS[node.op_type]
        return Slots(_floats(node.input, ins, types), _floats(node.output, outs, types))
    if node.op_type not in HALF_OPS:
        return None
    if node.domain == MS:
        every = range(max(len(node.input), len(node.output)))
        return Slots(_floats(node.input, every, types), _floats(node.output, every, types))
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Cast":
        return Slots(frozenset(), frozenset({0}) if _attr(node, "to") == FLOAT else frozenset())
    if node.op_type in ("Constant", "ConstantOfShape"):
        return Slots(frozenset(), frozenset({0}) if types.get(node.output[0]) == FLOAT else frozenset())
    schema = _schema(node.op_type, opset)
    if schema is None:
        return None
    params = _params(schema)
    ins = [(k, _formal(schema.inputs, k)) for k in range(len(node.input))]
    outs = [(k, _formal(schema.outputs, k)) for k in range(len(node.output))]
    bound = {p for names, pairs in ((node.input, ins), (node.output, outs)) for k, p in pairs
             if p in params and names[k] and types.get(names[k]) == FLOAT}
    if any("tensor(float16)" not in params[p] for p in bound):
        return None
    half = bound - _FLOAT32_PARAMS.get(node.op_type, set())
    return Slots(frozenset(k for k, p in ins if p in half and node.input[k]),
                 frozenset(k for k, p in outs if p in half and node.output[k]))


def _floats(names, positions, types) -> frozenset[int]:
    return frozenset(k for k in positions if k < len(names) and names[k] and types.get(names[k]) == FLOAT)


@lru_cache(maxsize=None)
def _schema(op_type: str, opset: int):
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="")
    except onnx.defs.SchemaError:
        return None


def _params(schema) -> dict[str, tuple[str, ...]]:
    return {c.type_param_str: tuple(c.allowed_type_strs) for c in schema.type_constraints}


def _formal(formals, k: int) -> str | None:
    """The type string of the formal parameter actual position ``k`` binds to (a variadic last one takes the rest)."""
    if k < len(formals):
        return formals[k].type_str
    if formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return formals[-1].type_str
    return None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def elem_types(graph: onnx.GraphProto, opset: int) -> dict[str, int]:
    """Element type of every tensor of ``graph`` (its subgraphs are opaque): recorded types
    (initializers, inputs, value_info, outputs), then, node by node, what each op's schema or
    attributes give for an output left unrecorded (the Q/DQ and contrib nodes a rewriter added)."""
    types: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    for node in graph.node:
        for k, o in enumerate(node.output):
            if o and o not in types:
                found = _output_type(node, k, types, opset)
                if found:
                    types[o] = found
    return types


_MS_OUTPUT_FROM = {"MatMulNBits": 0, "GatherBlockQuantized": 2, "MatMulIntegerToFloat": 2,
                   "DynamicQuantizeMatMul": 0, "FusedMatMul": 0, "FastGelu": 0, "BiasGelu": 0, "Gelu": 0,
                   "QuickGelu": 0}


def _output_type(node: onnx.NodeProto, k: int, types: dict[str, int], opset: int) -> int | None:
    """The element type of output ``k`` of ``node`` from its attributes, schema and input types."""
    def of(i):
        return types.get(node.input[i]) if i < len(node.input) and node.input[i] else None
    op = node.op_type
    if node.domain == MS:
        return of(_MS_OUTPUT_FROM[op]) if op in _MS_OUTPUT_FROM else None
    if node.domain not in ("", "ai.onnx"):
        return None
    if op == "Cast":
        return _attr(node, "to")
    if op == "DequantizeLinear":
        return of(1)
    if op == "QuantizeLinear":
        return of(2) or _attr(node, "output_dtype") or onnx.TensorProto.UINT8
    if op in ("Constant", "ConstantOfShape"):
        for a in node.attribute:
            if a.name == "value":
                return a.t.data_type
            if a.name in _SCALAR_ATTR_TYPES:
                return _SCALAR_ATTR_TYPES[a.name]
        return FLOAT if op == "ConstantOfShape" else None
    schema = _schema(op, opset)
    if schema is None:
        return None
    formal = _formal(schema.outputs, k)
    params = _params(schema)
    if formal not in params:
        return _fixed(formal)
    if len(params[formal]) == 1:
        return _fixed(params[formal][0])
    for i in range(len(node.input)):
        if _formal(schema.inputs, i) == formal and of(i):
            return of(i)
    return None


_FIXED = {"tensor(float)": FLOAT, "tensor(float16)": HALF, "tensor(int64)": onnx.TensorProto.INT64,
          "tensor(int32)": onnx.TensorProto.INT32, "tensor(bool)": onnx.TensorProto.BOOL,
          "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(uint8)": onnx.TensorProto.UINT8,
          "tensor(int8)": onnx.TensorProto.INT8}


def _fixed(type_str: str | None) -> int | None:
    return _FIXED.get(type_str)
