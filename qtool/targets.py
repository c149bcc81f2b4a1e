"""What onnxruntime runs, per execution provider, for each node qtool would quantize.

``qtool inspect MODEL --target T`` answers before any quantizing: on the CPU EP an int8
Conv becomes a fused QLinearConv; on the CUDA EP the same Q/DQ pair stays a real
QuantizeLinear/DequantizeLinear around a float Conv (fake-quant, slower than fp32), so
fp16 or int4 weights are what to choose there; the TensorRT EP builds int8 kernels from
Q/DQ itself. The rules come from onnxruntime's source (docs/design.md cites the files):

- ``core/optimizer/qdq_transformer/selectors_actions/qdq_selector_action_transformer.cc``:
  the QDQ fusions and, per rule, the EPs it applies to. Conv/MatMul/Gemm/Add/Mul/Concat/
  Where and the unary QLinear rules list the CPU EP (and DML/ACL), never CUDA; the only
  rule that lists CUDA is DQMatMulToMatMulNBits (int4/uint4 weights blocked along K).
- ``contrib_ops/cuda/quantization/matmul_nbits.cc`` and ``gather_block_quantized.cc``:
  CUDA kernels for 4-bit MatMul weights and embedding tables; the fast fpA-intB GEMM needs
  fp16/bf16 activations, 4 bits, block 32/64/128, N % 64 == 0 and K % block == 0.
- ``contrib_ops/cpu/quantization/matmul_nbits.cc``: MatMulNBits on the CPU EP too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .graph import GraphView
from .types import Target

#: QDQ groups the CPU EP fuses into one integer kernel (qdq_selector_action_transformer.cc).
CPU_FUSED = {"Conv": "QLinearConv", "MatMul": "QLinearMatMul or MatMulIntegerToFloat", "Gemm": "QGemm",
             "Add": "QLinearAdd", "Mul": "QLinearMul", "Concat": "QLinearConcat", "Where": "QLinearWhere",
             "AveragePool": "QLinearAveragePool", "GlobalAveragePool": "QLinearGlobalAveragePool",
             "LeakyRelu": "QLinearLeakyRelu", "Sigmoid": "QLinearSigmoid", "Softmax": "QLinearSoftmax"}
#: Ops whose Q/DQ the CPU EP drops so that they move int8 data (DropQDQNodesRules, SplitQDQRules).
CPU_DROPPED = ("Expand", "Flatten", "Gather", "GatherElements", "Reshape", "Slice", "Squeeze", "Tile", "Transpose",
               "Unsqueeze", "MaxPool", "ReduceMax", "ReduceMin", "Resize", "Split", "ArgMax")
#: fast fpA-intB GEMM of MatMulNBits on CUDA (contrib_ops/cuda/quantization/matmul_nbits.cc)
CUDA_INT4_N_MULTIPLE = 64


@dataclass(frozen=True)
class NodeOnTarget:
    """One node qtool's int8 plan would quantize: what ``target``'s EP runs for it, what to choose."""

    name: str
    op_type: str
    int8: str       # what the EP runs for this node's int8 Q/DQ group
    fused: bool     # an integer kernel (True) or float between Q/DQ (False)
    choose: str     # the precision to choose on this target
    why: str


@dataclass(frozen=True)
class TargetReport:
    target: str
    ep: str
    nodes: tuple[NodeOnTarget, ...]
    recommendation: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def fused(self) -> int:
        return sum(1 for n in self.nodes if n.fused)


def matmul_weight(node, view: GraphView) -> tuple[int, int] | None:
    """(K, N) of a MatMul whose B is a constant 2-D float weight (MatMulNBits' pattern), else None."""
    if node.op_type != "MatMul" or len(node.input) < 2:
        return None
    init = view.initializers.get(node.input[1])
    if init is None or len(init.dims) != 2:
        return None
    return int(init.dims[0]), int(init.dims[1])


def embedding_table(node, view: GraphView) -> tuple[int, int] | None:
    """(V, D) of a Gather of a constant 2-D table along axis 0, else None."""
    if node.op_type != "Gather" or not node.input:
        return None
    init = view.initializers.get(node.input[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if init is None or len(init.dims) != 2 or axis != 0:
        return None
    return int(init.dims[0]), int(init.dims[1])


def on_target(plan, view: GraphView, target: Target) -> TargetReport:
    """Each node the int8 ``plan`` quantizes (main graph), as ``target``'s EP would run it."""
    rows = []
    for n in plan.nodes:
        node = view.by_name.get(n.name)
        if node is None:
            continue
        kn = matmul_weight(node, view)
        table = embedding_table(node, view)
        if target is Target.TRT:  # MatMulNBits/GatherBlockQuantized are not TensorRT layers (CUDA EP behind it)
            kn = table = None
        if not n.quantized and kn is None and table is None:
            continue
        rows.append(_row(n, node, target, kn, table))
    return TargetReport(target.label, target.ep, tuple(rows), _recommend(rows, target))


def _row(n, node, target: Target, kn, table) -> NodeOnTarget:
    op = node.op_type
    if not n.quantized:
        # only weight-only candidates reach here: int8 keeps them float, int4 does not
        int8 = f"float (int8 plan: {n.reason})"
        if kn is not None:
            return NodeOnTarget(n.name, op, int8, False, "int4 weights", _int4_why(kn, target))
        return NodeOnTarget(n.name, op, int8, False, "int4 table", _table_why(table, target))
    if n.fused_into and target is not Target.CUDA:
        return NodeOnTarget(n.name, op, f"fused into {n.fused_into}'s kernel", True, "int8",
                            f"the EP folds this {op} into the kernel of the node before it")
    if target is Target.CPU:
        if op in CPU_FUSED:
            return NodeOnTarget(n.name, op, f"fused {CPU_FUSED[op]}", True, "int8",
                                "onnxruntime's CPU EP fuses this Q/DQ group into an integer kernel")
        if op in CPU_DROPPED:
            return NodeOnTarget(n.name, op, "int8 data movement (Q/DQ dropped)", True, "int8",
                                "the CPU EP drops the Q/DQ pair and moves int8 data")
        return NodeOnTarget(n.name, op, f"float {op} between Q/DQ", False, "fp32",
                            "no CPU fusion rule for this op: int8 would add Q/DQ kernels around a float op")
    if target is Target.CUDA:
        int8 = f"float {op} between Q/DQ (fake-quant)"
        why = ("the CUDA EP has no QDQ fusion for this op and no QLinear kernel: int8 adds Q/DQ kernels "
               "around the float op, slower than fp32")
        if kn is not None:
            return NodeOnTarget(n.name, op, int8, False, "int4 weights", why + "; " + _int4_why(kn, target))
        if table is not None:
            return NodeOnTarget(n.name, op, int8, False, "int4 table", why + "; " + _table_why(table, target))
        return NodeOnTarget(n.name, op, int8, False, "fp16", why + "; fp16 is the CUDA EP's fast float path")
    # TensorRT: explicit quantization, its own kernels from the Q/DQ placement
    return NodeOnTarget(n.name, op, f"TensorRT int8 {op} (from Q/DQ)", True, "int8",
                        "the TensorRT EP builds int8 kernels where Q/DQ sit (quantize with --target trt to place "
                        "them as TensorRT wants; needs trt_int8_enable, which qtool sets)")


def _int4_why(kn, target: Target) -> str:
    k, n = kn
    text = f"MatMulNBits takes 4-bit weights blocked along K (K {k}, N {n})"
    if target is Target.CUDA:
        fast = n % CUDA_INT4_N_MULTIPLE == 0 and k % 32 == 0
        text += ("; fast fpA-intB GEMM eligible with fp16 activations" if fast else
                 f"; N % {CUDA_INT4_N_MULTIPLE} != 0 or K % 32 != 0: GEMV or dequantise + cuBLAS path")
    return text


def _table_why(table, target: Target) -> str:
    v, d = table
    return f"GatherBlockQuantized reads a 4-bit table blocked along its rows ({v} x {d}) on {target.ep}"


def _recommend(rows: list[NodeOnTarget], target: Target) -> str:
    int4 = sum(1 for r in rows if r.choose.startswith("int4"))
    if target is Target.CUDA:
        return ("--target cuda (fp16: the whole model in half precision, ops that need fp32 kept fp32)"
                + (f"; --weights int4 for the {int4} MatMul weights / embedding tables" if int4 else ""))
    if target is Target.TRT:
        return "--target trt (int8 Q/DQ placed for TensorRT's explicit quantization)"
    fused = sum(1 for r in rows if r.fused)
    slow = sum(1 for r in rows if r.choose == "fp32")
    return (f"int8 (the default): {fused} node(s) fuse into integer kernels"
            + (f", {slow} would run float between Q/DQ" if slow else "")
            + (f"; --weights int4 shrinks {int4} MatMul weight(s) / tables (MatMulNBits, CPU kernel too)"
               if int4 else ""))


def format_target(r: TargetReport, top: int = 40) -> list[str]:
    lines = [f"target      {r.target} ({r.ep}): {r.fused} of {len(r.nodes)} node(s) would run integer kernels "
             "with int8 Q/DQ"]
    if r.nodes:
        wn = min(max(len(n.name) for n in r.nodes), 48)
        wi = max(len(n.int8) for n in r.nodes)
        lines.append(f"  {'node':<{wn}}  {'op':<12} {'int8 on this EP':<{wi}}  choose")
        for n in r.nodes[:top]:
            lines.append(f"  {n.name[:wn]:<{wn}}  {n.op_type:<12} {n.int8:<{wi}}  {n.choose}")
        if len(r.nodes) > top:
            lines.append(f"  ... {len(r.nodes) - top} more (--json lists all, with reasons)")
        reasons = dict.fromkeys(n.why for n in r.nodes)
        lines += [f"  why: {w}" for w in list(reasons)[:4]]
    lines.append(f"recommend   {r.recommendation}")
    return lines
