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


def on_target(plan, view: GraphView, target: Target) -> TargetReport:
    """Each node the int8 ``plan`` quantizes (main graph), as ``target``'s EP would run it, and each
    node ``--weights int4`` would give 4-bit weights (by qtool.weight_only's own eligibility)."""
    from .config import QuantizeOptions
    from .weight_only import Candidate, candidates
    # MatMulNBits/GatherBlockQuantized are no TensorRT layers (they would run on the CUDA EP behind it)
    int4 = {} if target is Target.TRT else {
        k: c for k, c in candidates(view, QuantizeOptions().block_size).items() if isinstance(c, Candidate)}
    rows = []
    for n in plan.nodes:
        node = view.by_name.get(n.name)
        if node is None or not (n.quantized or n.name in int4):
            continue
        rows.append(_row(n, node, target, int4.get(n.name), view))
    return TargetReport(target.label, target.ep, tuple(rows), _recommend(rows, target))


def _row(n, node, target: Target, c, view: GraphView) -> NodeOnTarget:
    """``c``: the node's int4 candidate, or None."""
    op = node.op_type
    choose = "int4 table" if c is not None and c.op_type == "Gather" else "int4 weights"
    if not n.quantized:
        # only weight-only candidates reach here: int8 keeps them float, int4 does not
        return NodeOnTarget(n.name, op, f"float (int8 plan: {n.reason})", False, choose, _int4_why(c, view, target))
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
        if c is not None:
            return NodeOnTarget(n.name, op, int8, False, choose, why + "; " + _int4_why(c, view, target))
        return NodeOnTarget(n.name, op, int8, False, "fp16", why + "; fp16 is the CUDA EP's fast float path")
    # TensorRT: explicit quantization, its own kernels from the Q/DQ placement
    return NodeOnTarget(n.name, op, f"TensorRT int8 {op} (from Q/DQ)", True, "int8",
                        "the TensorRT EP builds int8 kernels where Q/DQ sit (quantize with --target trt to place "
                        "them as TensorRT wants; needs trt_int8_enable, which qtool sets)")


def _int4_why(c, view: GraphView, target: Target) -> str:
    from .config import QuantizeOptions
    from .weight_only import cuda_miss, kn_of
    if c.op_type == "Gather":
        v, d = view.initializers[c.weight].dims
        return f"GatherBlockQuantized reads a 4-bit table blocked along its rows ({v} x {d}) on {target.ep}"
    k, n = kn_of(c, view)
    text = f"MatMulNBits takes 4-bit weights blocked along K (K {k}, N {n})"
    if target is Target.CUDA:
        miss = cuda_miss(c, view, QuantizeOptions(target="cuda", weights="int4"))
        text += miss or "; fast fpA-intB GEMM eligible with fp16 activations"
    return text


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
