"""The planner: facts (+ calibrated ranges) -> Plan. Reads, decides, never mutates.

Rules are pure; the planner alone assembles their decisions, node by node in
topological order, and records a fusion (a Relu absorbed by its Conv, a bias
Add by its dynamic MatMul) only when both sides are final. A node kept float
reads float inputs: where a float node would read a quantized tensor that
onnxruntime must see unquantized (a node the user keeps float; a float
Conv/Gemm that onnxruntime's WeightBiasQuantization would otherwise quantize
per tensor), its producer cannot stay an integer kernel and is kept float too,
and the assembly runs again until nothing changes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

import onnx

from .config import QuantizeOptions
from .errors import ConfigError
from .graph import GraphView
from .graph.patterns import float_patterns
from .plans import Action, NodePlan, Plan, Role, TensorPlan
from .rules import RULES, Act, Bias, Context, Facts, Joined, NodeRule, Optional, Share, Skip, Weight
from .rules import dynamic as dynamic_rules
from .rules import trt as trt_rules
from .types import PerAxis, PerBlock, PerTensor, Precision, Target, cpu_saturates_u8s8

WBQ_OPS = ("Conv", "ConvTranspose", "Gemm")  # onnxruntime's WeightBiasQuantization targets

#: Ops people expect to be quantized, and why they stay float (inspect lists them as blockers).
BLOCKED = {
    "ConvTranspose": "onnxruntime 1.31's CPU EP fuses no QDQ ConvTranspose (checked: DequantizeLinear -> "
                     "ConvTranspose -> QuantizeLinear stays three nodes in its optimised graph) and its CPU build "
                     "registers no com.microsoft QLinearConvTranspose, so int8 would run float between Q/DQ: "
                     "stays float",
    "Einsum": "no integer Einsum kernel in onnxruntime, and this Einsum is not MatMul-shaped (pre-processing "
              "rewrites two-operand Einsums with batch, row, column and one contracted letter as MatMul): "
              "stays float",
    "LSTM": "no QDQ integer LSTM on the CPU EP (onnxruntime's quantize_dynamic rewrites it to the contrib "
            "DynamicQuantizeLSTM, which qtool does not emit yet): stays float",
    "GRU": "no integer GRU kernel in onnxruntime: stays float",
    "RNN": "no integer RNN kernel in onnxruntime: stays float",
    "If": "control flow nested inside a subgraph: qtool plans subgraphs one level deep, so its nodes stay float",
    "Loop": "control flow nested inside a subgraph: qtool plans subgraphs one level deep, so its nodes stay float",
    "Scan": "control flow nested inside a subgraph: qtool plans subgraphs one level deep, so its nodes stay float",
}


def analyse(model: onnx.ModelProto, options: QuantizeOptions, ranges=None,
            elsewhere: frozenset[str] = frozenset()) -> tuple[Facts, tuple[str, ...]]:
    """The facts every stage reads, computed once: graph view, float patterns,
    MAC counts, and the user's precision overrides matched to nodes (``elsewhere``:
    node names and op types of the model's other graphs, which overrides may name)."""
    view = GraphView(model)
    target = options.target_enum
    notes = []
    macs, why = node_macs(model)
    if why:
        notes.append(f"MAC counts unavailable ({why}): the rules that use them (cheap first layer, "
                     "dynamic mode's small-MatMul skip) are off")
    from .subgraphs import node_keys
    overrides = match_overrides(view, options, elsewhere | node_keys(model))
    if target is Target.TRT:
        _check_trt(options, overrides)
    kept = {name: "kept float on request (--precision NAME=fp32 or --exclude)" if p is Precision.FP32 else
            "fp16 on request (--precision NAME=fp16): float inputs cast to fp16, weights stored in fp16, "
            "outputs cast back" for name, p in overrides.items() if p in (Precision.FP32, Precision.FP16)}
    return Facts(view, options, float_patterns(view), ranges, macs, overrides, kept, target), tuple(notes)


TRT_NOTE = ("target trt: int8 Q/DQ placed for TensorRT's explicit quantization (NVIDIA ModelOpt's placement): "
            "symmetric int8 activations (zero point 0) and per-channel symmetric int8 weights whatever "
            "--activation-type/--weight-type say, Q/DQ on the inputs of Conv/ConvTranspose/Gemm/MatMul, pooling, "
            "residual Add (skip input only) and Concat (one scale with its output), biases and outputs float")


def _check_trt(options: QuantizeOptions, overrides: dict[str, Precision]) -> None:
    """TensorRT reads int8 Q/DQ (and fp8/int4, which qtool does not write): no uint8, no 16-bit."""
    if options.weight_type == "uint8":
        raise ConfigError("--target trt: TensorRT reads symmetric int8 weights only; drop --weight-type uint8")
    for name, precision in overrides.items():
        if precision.is_integer and precision is not Precision.INT8:
            raise ConfigError(f"--target trt: --precision {name}={precision.label}: TensorRT reads int8 Q/DQ only "
                              "(use int8, fp16 or fp32)")


def _lifted(view: GraphView) -> bool:
    """Whether this graph is a subgraph lifted out of its model (qtool.subgraphs.lift)."""
    return any(p.key == "qtool.lifted" for p in view.model.metadata_props)


def node_macs(model: onnx.ModelProto) -> tuple[dict[str, int], str | None]:
    """MACs of each Conv/MatMul/Gemm node at batch 1 (dynamic dims taken as 1),
    or ({}, why) when shapes cannot be resolved."""
    from .inspection import macs_by_node, static_view
    try:
        view, _ = static_view(model, {})
    except ValueError as exc:
        return {}, str(exc).splitlines()[0][:160]
    return macs_by_node(view), None


def unknown_key(flag: str, key: str, known) -> ConfigError:
    """The error for a node name or op type ``key`` that names nothing in the model, with the closest matches."""
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return ConfigError(f"{flag} {key!r} matches no node name or op type in the model{hint}")


def match_overrides(view: GraphView, options: QuantizeOptions,
                    elsewhere: frozenset[str] = frozenset()) -> dict[str, Precision]:
    """Node name -> precision from ``--precision`` and ``--exclude``; a name beats
    an op type; a key that matches nothing here nor ``elsewhere`` (another graph of
    the model: a subgraph, or the main graph) is an error listing the closest matches."""
    names = {view.node_name(n): n.op_type for n in view.nodes}
    op_types = set(names.values())
    by_type: dict[str, Precision] = {}
    by_name: dict[str, Precision] = {}
    for key, precision in options.overrides():
        if key in names:
            by_name[key] = precision
        elif key in op_types:
            by_type[key] = precision
        elif key in elsewhere:
            continue
        else:
            raise unknown_key("--precision/--exclude", key, list(names) + sorted(op_types))
    out = {name: by_type[op] for name, op in names.items() if op in by_type}
    out.update(by_name)
    from .rewrite.half_nodes import HALF_OPS
    for name, precision in out.items():
        if precision is Precision.FP16 and names[name] not in HALF_OPS:
            raise ConfigError(f"--precision {name}=fp16: {names[name]} is not among the ops qtool runs in fp16 "
                              f"({', '.join(HALF_OPS[:6])}, ...); use fp32")
    return out


def plan(facts: Facts, notes: tuple[str, ...] = ()) -> Plan:
    """Decide, node by node, what is quantized and why (no scales yet: see resolve)."""
    kept = dict(facts.kept_float)
    for _ in range(len(facts.view.nodes) + 1):
        assembly = _Assembly(replace(facts, kept_float=kept))
        assembly.run()
        forced = {k: v for k, v in assembly.producers_to_keep_float().items() if k not in kept}
        if not forced:
            break
        kept.update(forced)
    options = facts.options
    nodes = tuple(assembly.node_plans())
    target_note = (f"{facts.target.ep} on an x86-64 CPU without VNNI: its AVX2 u8 x s8 kernels saturate with 8-bit "
                   "int8 weights, so weights of integer matrix products are "
                   + ("on a 7-bit grid (onnxruntime's reduce_range)" if options.weight_type == "int8" else
                      "uint8 around zero point 128 (exact u8 x u8 kernels)" if options.weight_type == "uint8" else
                      "uint8 around zero point 128 for Conv (exact u8 x u8 kernels) and on a 7-bit int8 grid for "
                      "MatMul/Gemm (--weight-type int8|uint8 makes them all one kind)")
                   if assembly.reduced else None)
    if facts.target is Target.TRT:
        target_note = TRT_NOTE
    notes = tuple(notes) + assembly.unapplied_overrides(nodes) + ((target_note,) if target_note else ())
    return Plan(assembly.tensors, nodes, notes, options.mode, options.format, facts.target)


def _not_float32(tensor: str, elem_type: int | None) -> str:
    if elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        kind = "fp16" if elem_type == onnx.TensorProto.FLOAT16 else "bf16"
        return (f"input {tensor} is {kind}: qtool quantizes float32 graphs only so far; convert the model to "
                "fp32 first, or keep it as it is")
    return f"input {tensor} is not float32 (or its type is unknown)"


def _weight_precision(weight_type: str, saturates: bool, act: Precision, op_type: str) -> Precision:
    """``auto``: int8, except Conv weights where onnxruntime's u8 x s8 kernels would
    saturate (x86-64 without VNNI): uint8 there, run by exact u8 x u8 kernels,
    because a 7-bit grid costs Convs dearly and MatMuls nothing measurable
    (this machine: EfficientNet-Lite0 top-1 agreement 0.754 with 7-bit weights,
    0.895 with uint8; all-MiniLM-L6-v2 retrieval 0.5651 either way, 7-bit at
    0.74x fp32 latency against 0.86x). uint8 weights only beside uint8
    activations: onnxruntime's integer kernels have no int8 x uint8 form."""
    if act is not Precision.UINT8:
        return Precision.INT8
    if weight_type == "auto":
        return Precision.UINT8 if saturates and op_type == "Conv" else Precision.INT8
    return Precision.parse(weight_type)


def calibration_tensors(facts: Facts) -> list[str]:
    """The activations a table for this model must hold: the float inputs and
    outputs of every node a rule exists for (float patterns included, which a
    ``--precision NAME=uint8`` may quantize), so that any later
    ``--precision``/``--exclude`` works from the same table."""
    if facts.options.mode == "dynamic":
        return []
    view = facts.view
    ops = set(RULES) | (set(trt_rules.RULES) if facts.target is Target.TRT else set())
    wanted = {}
    for node in view.nodes:
        if node.op_type not in ops:
            continue
        for t in list(node.input) + list(node.output):
            if t and not view.is_initializer(t) and view.is_float(t):
                wanted.setdefault(t)
    return list(wanted)


@dataclass
class _Assembly:
    """One topological pass: rule decisions assembled into tensor and node records."""

    facts: Facts
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    decided: list = field(default_factory=list)          # (node, decision, precision)
    quantized: dict[str, str] = field(default_factory=dict)
    optional: dict[str, str] = field(default_factory=dict)
    fused: dict[str, str] = field(default_factory=dict)  # absorbed node -> absorbing node
    precisions: dict[str, Precision] = field(default_factory=dict)  # node -> its decided precision
    joined: dict[str, str] = field(default_factory=dict)  # Concat input -> the Concat whose scale it takes (trt)
    reduced: bool = False

    @property
    def trt(self) -> bool:
        return self.facts.target is Target.TRT

    def run(self) -> None:
        view = self.facts.view
        self.ctx = Context(self.facts, self.quantized, self.optional, self.fused, self.joined)
        self.raw = {name for name, p in self.facts.overrides.items() if p in (Precision.FP32, Precision.FP16)}
        for node in view.nodes:
            decision = self._decide(node)
            if isinstance(decision, Skip):
                self.decided.append((node, decision, Precision.FLOAT))
                self.precisions[view.node_name(node)] = Precision.FLOAT
                continue
            precision = self._precision(node)
            if decision.fuses:
                self.fused[decision.fuses] = view.node_name(node)
            joins = any(isinstance(spec, Joined) for spec in decision.inputs.values())
            if joins:  # the inputs take the output's parameters: record it first
                self._record_output(node, decision, precision)
            self._record_inputs(node, decision, precision)
            if not joins:
                self._record_output(node, decision, precision)
            self.decided.append((node, decision, precision))
            self.precisions[view.node_name(node)] = precision
        for out, producer in self.optional.items():
            self.tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SKIP,
                                           f"output of {producer}: float (no quantized consumer; int8 kernel with "
                                           "float output)")

    # -- decisions ---------------------------------------------------------------
    def _decide(self, node: onnx.NodeProto):
        ctx, facts = self.ctx, self.facts
        name = ctx.node_key(node)
        if name in facts.kept_float:
            return Skip(facts.kept_float[name])
        if node.domain not in ("", "ai.onnx"):
            return Skip(f"op from domain {node.domain!r} is not quantized")
        wanted = facts.overrides.get(name)
        if name in ctx.patterns and not (wanted is not None and wanted.is_integer):
            return Skip(f"part of a {ctx.patterns[name]} pattern: stays float (quantizing its small ops loses "
                        "accuracy; --precision NAME=uint8 quantizes it)")
        dynamic = ctx.options.mode == "dynamic"
        rule = (dynamic_rules.RULES if dynamic else trt_rules.RULES if self.trt else RULES).get(node.op_type)
        if rule is None and self.trt:
            return trt_rules.other(node)
        if rule is None:
            if node.op_type in ("If", "Loop", "Scan") and not _lifted(ctx.view):
                return Skip("control flow: the node runs float itself; the nodes of its subgraphs are planned "
                            "on their own (see their plans)")
            if node.op_type in BLOCKED:
                return Skip(BLOCKED[node.op_type])
            if dynamic:
                return Skip("dynamic mode quantizes MatMul/Gemm weights and embedding tables only")
            return Skip(f"no int8 kernel for {node.op_type} on {facts.target.ep}; stays float")
        decision = self._dynamic_here(node) or rule(node, ctx)
        if isinstance(decision, NodeRule):
            for index, spec in decision.inputs.items():
                tensor = node.input[index]
                if isinstance(spec, Act) and not ctx.view.is_float(tensor) and not ctx.is_int8_capable(tensor):
                    return Skip(_not_float32(tensor, ctx.view.elem_type(tensor)))
            mixed = self._mixed(node, decision)
            if mixed and ctx.options.format == "qoperator":
                return Skip(f"QOperator kernels take one 8-bit type for inputs and output: {mixed}")
        return decision

    def _dynamic_here(self, node) -> NodeRule | None:
        """In a static plan, a MatMul/Gemm chosen to run dynamically (``Facts.dynamic``), and the bias
        Add it folds in; None where the dynamic rule refuses it (the static rule decides then)."""
        ctx = self.ctx
        if self.facts.options.mode == "dynamic" or not self.facts.dynamic:
            return None
        if node.op_type == "Add" and ctx.fused_by(node) in self.facts.dynamic:
            return dynamic_rules.bias_add(node, ctx)
        if node.op_type not in ("MatMul", "Gemm") or ctx.node_key(node) not in self.facts.dynamic:
            return None
        decision = dynamic_rules.linear(node, ctx)
        if isinstance(decision, Skip):
            return None
        return replace(decision, reason=f"{decision.reason} (dynamic inside the static model)")

    def _mixed(self, node, decision: NodeRule) -> str:
        """An 8-bit activation input whose type differs from this node's (int8 vs uint8)."""
        precision = self._precision(node)
        for index, spec in decision.inputs.items():
            t = self.tensors.get(node.input[index])
            if isinstance(spec, Act) and t is not None and t.quantized and t.precision.bits == 8 \
                    and precision.bits == 8 and t.precision is not precision:
                return f"input {t.name} is {t.precision.label}, the node {precision.label}"
        return ""

    def _precision(self, node: onnx.NodeProto) -> Precision:
        """The activation precision of a quantized node: its absorbing node's (a
        fused Relu), the user's override, or the options' activation type."""
        name = self.ctx.node_key(node)
        if name in self.fused:  # one kernel, one output type
            return self.precisions[self.fused[name]]
        if name in self.facts.overrides:
            return self.facts.overrides[name]
        return Precision.INT8 if self.trt else self.facts.options.activation_precision

    # -- tensors -----------------------------------------------------------------
    def _record_inputs(self, node, decision: NodeRule, precision: Precision) -> None:
        name = self.ctx.node_key(node)
        options = self.facts.options
        for index, spec in decision.inputs.items():
            tensor = node.input[index]
            if isinstance(spec, Joined):
                self._join(tensor, node, precision)
            elif isinstance(spec, Act):
                self._quantize_activation(tensor, f"input of {name}", precision)
            elif isinstance(spec, dynamic_rules.Dynamic):
                if self.facts.options.mode == "dynamic" or not self._carries_q(tensor):  # else quantized for static readers
                    self.tensors[tensor] = TensorPlan(tensor, Role.ACTIVATION, Action.DYNAMIC,
                                                      f"input of {name}: uint8 per batch", Precision.UINT8)
            elif isinstance(spec, Weight):
                dynamic = any(isinstance(s, dynamic_rules.Dynamic) for s in decision.inputs.values())
                act = Precision.UINT8 if dynamic else precision  # DynamicQuantizeLinear is uint8
                self.tensors[tensor] = self._weight(tensor, name, spec, act, options)
            elif isinstance(spec, Bias):
                w_spec = decision.inputs[spec.weight_index]
                self.tensors[tensor] = TensorPlan(
                    tensor, Role.BIAS, Action.DERIVE, f"bias of {name}: s_x * s_w, zero point 0", Precision.INT32,
                    PerAxis(0) if w_spec.axis is not None else PerTensor(), True,
                    source=node.input[spec.input_index], weight=node.input[spec.weight_index])

    def _weight(self, tensor: str, node: str, spec: Weight, act: Precision, options) -> TensorPlan:
        granularity = PerTensor() if spec.axis is None else PerBlock(spec.axis, spec.block) if spec.block \
            else PerAxis(spec.axis)
        if self.trt:  # no CPU saturation workaround: TensorRT's int8 kernels take full 8-bit weights
            what = "per tensor" if spec.axis is None else f"per axis {spec.axis}"
            return TensorPlan(tensor, Role.WEIGHT, Action.QUANTIZE, f"weight of {node}, {what}, symmetric int8 "
                              "(TensorRT)", Precision.INT8, granularity, True, transpose=spec.transpose)
        # the u8 x s8 saturation is the CPU EP's (AVX2 kernels): on CUDA int8 Q/DQ is computed in float
        saturates = spec.matmul and act.bits == 8 and self.facts.target is Target.CPU and cpu_saturates_u8s8()
        op = self.facts.view.by_name[node].op_type
        precision = spec.precision or _weight_precision(options.weight_type, saturates, act, op)
        reduce = saturates and precision is Precision.INT8
        self.reduced |= saturates
        what = "per tensor" if spec.axis is None else f"per block of {spec.block} along axis {spec.axis}" \
            if spec.block else f"per axis {spec.axis}"
        how = ""
        if saturates:
            how = ", 7-bit grid (CPU without VNNI)" if reduce else ", uint8 around 128 (exact u8 x u8 kernels: CPU without VNNI)"
        if options.weight_type == "uint8" and precision is not Precision.UINT8 and spec.precision is None:
            how += f" (int8, not uint8: onnxruntime has no {act.label}-activation x uint8-weight kernel)"
        return TensorPlan(tensor, Role.WEIGHT, Action.QUANTIZE, f"weight of {node}, {what}{how}",
                          precision, granularity, spec.symmetric,
                          transpose=spec.transpose, reduce_range=reduce)

    def _quantize_activation(self, tensor: str, why: str, precision: Precision) -> None:
        """Mark an activation quantized; an optional output (MatMul/Gemm) is promoted;
        a tensor two nodes want at different widths gets the wider one."""
        if tensor in self.optional:
            producer = self.optional.pop(tensor)
            why = f"output of {producer} (quantized because a quantized consumer reads it)"
        elif tensor in self.tensors and self.tensors[tensor].action not in (Action.SKIP, Action.DYNAMIC):
            t = self._root(tensor)  # a shared tensor widens where its parameters come from
            if t.action is Action.QUANTIZE and t.role is Role.ACTIVATION and precision.bits > t.precision.bits:
                self.tensors[t.name] = replace(t, precision=precision, reason=f"{t.reason}; {precision.label} "
                                               f"because {why.split(' of ')[-1]} asks for it")
            return
        self.tensors[tensor] = TensorPlan(tensor, Role.ACTIVATION, Action.QUANTIZE, why, precision,
                                          symmetric=self.trt or self.facts.options.activation_symmetric)
        self.quantized[tensor] = why

    def _join(self, tensor: str, node, precision: Precision) -> None:
        """A Concat input takes the parameters of the Concat's output (TensorRT's concat
        elimination), whatever it had: the output's range covers every input's."""
        name, out = self.ctx.node_key(node), node.output[0]
        before = self.tensors.get(tensor)
        why = (f"{before.reason}; " if before is not None and before.action is not Action.SKIP else "") + \
            f"input of {name}: takes the parameters of its output {out} (TensorRT: one scale across a Concat)"
        self.tensors[tensor] = TensorPlan(tensor, Role.ACTIVATION, Action.SHARE, why, precision,
                                          symmetric=self.tensors[out].symmetric, source=out)
        self.quantized[tensor] = why
        self.joined[tensor] = name

    def _record_output(self, node, decision: NodeRule, precision: Precision) -> None:
        out = node.output[0]
        name = self.ctx.node_key(node)
        if isinstance(decision.output, Act):
            self._quantize_activation(out, f"output of {name}", precision)
        elif isinstance(decision.output, Optional):
            self.optional[out] = name
        elif isinstance(decision.output, Share):
            src = node.input[decision.output.input_index]
            if src in self.optional:
                self._quantize_activation(src, "", precision)
            root = self.tensors[src]
            self.tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SHARE, decision.output_reason,
                                           root.precision, symmetric=root.symmetric, source=src)
            self.quantized[out] = name
        elif out and self.ctx.view.is_float(out):
            self.tensors[out] = TensorPlan(out, Role.ACTIVATION, Action.SKIP, f"output of {name}: {decision.output_reason}")

    def unapplied_overrides(self, nodes: tuple[NodePlan, ...]) -> tuple[str, ...]:
        """Say which --precision requests the plan could not honour, and why."""
        shares = {self.ctx.node_key(n) for n, d, _ in self.decided if isinstance(d, NodeRule)
                  and isinstance(d.output, Share)}
        missed = []
        for n in nodes:
            wanted = self.facts.overrides.get(n.name)
            if wanted is None or wanted in (Precision.FP32, Precision.FP16) or n.precision is wanted:
                continue
            why = (f"fused into {n.fused_into}, whose type it takes" if n.fused_into else
                   "it runs on its input's data and shares its parameters" if n.name in shares else n.reason)
            missed.append(f"{n.name}={wanted.label} ({n.precision.label}: {why})")
        if not missed:
            return ()
        more = f" and {len(missed) - 3} more" if len(missed) > 3 else ""
        return (f"--precision not applied to {len(missed)} node(s): {'; '.join(missed[:3])}{more}",)

    def _root(self, tensor: str) -> TensorPlan:
        t, seen = self.tensors[tensor], set()
        while t.action is Action.SHARE and t.source in self.tensors and t.source not in seen:
            seen.add(t.source)
            t = self.tensors[t.source]
        return t

    # -- float readers -------------------------------------------------------------
    def _carries_q(self, tensor: str) -> bool:
        t = self.tensors.get(tensor)
        return t is not None and t.role is Role.ACTIVATION and t.action in (Action.QUANTIZE, Action.SHARE)

    def raw_reads(self, node, decision) -> tuple[str, ...]:
        """Quantized tensors that float ``node`` (or a dynamic kernel in a static plan) must read unquantized."""
        if isinstance(decision, NodeRule):
            if self.facts.options.mode == "dynamic":
                return ()
            return tuple(node.input[i] for i, spec in decision.inputs.items()
                         if isinstance(spec, dynamic_rules.Dynamic) and self._carries_q(node.input[i]))
        if not isinstance(decision, Skip):
            return ()
        view = self.facts.view
        quantized = [t for t in dict.fromkeys(node.input) if t and not view.is_initializer(t) and self._carries_q(t)]
        if self.ctx.node_key(node) in self.raw or self._reads_float(node):
            return tuple(quantized)
        # a tensor that a float node produced exists in float anyway: a float reader takes it as it is
        # rather than through the quantized readers' DequantizeLinear (MiniLM's residual Adds read the
        # LayerNorm outputs the next MatMuls quantize); an integer kernel's output is left alone, since a
        # float reader of it would stop onnxruntime fusing that kernel (producers_to_keep_float)
        # (not for TensorRT, which like onnxruntime's quantizer under ModelOpt reads every consumer's Q/DQ)
        return () if self.trt else tuple(t for t in quantized if self._float_produced(t))

    def _float_produced(self, tensor: str) -> bool:
        producer = self.facts.view.producer.get(tensor)
        if producer is None:
            return True  # a graph input
        return self.precisions.get(self.facts.view.node_name(producer)) is Precision.FLOAT

    def _reads_float(self, node) -> bool:
        """A float node that must read unquantized inputs: for TensorRT every linear op kept float
        (ModelOpt's classify_partially_quantized_weighted_ops: no Q/DQ before a float Conv/Gemm/MatMul),
        on the CPU one onnxruntime would otherwise quantize per tensor."""
        return node.op_type in trt_rules.LINEAR if self.trt else self._wbq_would_fire(node)

    def _wbq_would_fire(self, node) -> bool:
        """onnxruntime's WeightBiasQuantization (core/optimizer/qdq_transformer/
        weight_bias_quantization.cc) quantizes a float Conv/ConvTranspose/Gemm's
        weight per tensor when its input comes from a DequantizeLinear and its
        output reaches a QuantizeLinear through single-consumer Relu/Clip only."""
        view = self.facts.view
        if node.op_type not in WBQ_OPS or len(node.input) < 2 or not view.is_initializer(node.input[1]):
            return False
        if not view.is_float(node.input[1]) or not self._carries_q(node.input[0]):
            return False
        current = node
        while len([o for o in current.output if o]) == 1:
            out = current.output[0]
            if self._carries_q(out):  # a branch to a float reader stops the transformer
                return not any(self.ctx.node_key(c) in self.raw for c in view.consumers.get(out, []))
            nxt = view.sole_consumer(out)
            if nxt is None or nxt.op_type not in ("Relu", "Clip"):
                return False
            current = nxt
        return False

    def producers_to_keep_float(self) -> dict[str, str]:
        """Quantized nodes whose int8 output a float node reads unquantized: with a
        float reader beside its QuantizeLinear onnxruntime cannot fuse them. Not for TensorRT:
        there a tensor's Q/DQ belongs to its quantized readers, never to its producer's kernel."""
        if self.trt:
            return {}
        view = self.facts.view
        decisions = {self.ctx.node_key(n): d for n, d, _ in self.decided}
        forced = {}
        for node, decision, _ in self.decided:
            for t in self.raw_reads(node, decision):
                producer = view.producer.get(t)
                if producer is None or not isinstance(decisions.get(self.ctx.node_key(producer)), NodeRule):
                    continue
                pname = self.ctx.node_key(producer)
                owner = self.fused.get(pname, pname)  # a fused Relu's output is its Conv's int8 output
                forced[owner] = (f"kept float: its output {t} is read unquantized by {self.ctx.node_key(node)}, "
                                 "and a float reader beside the QuantizeLinear stops onnxruntime fusing it into an "
                                 "integer kernel")
        return forced

    def _wide(self, node, reads: list[str]) -> str:
        """What 16-bit activations mean on the target (onnxruntime's integer kernels are 8-bit)."""
        wide = [t for t in reads if t in self.tensors and self.tensors[t].quantized
                and self.tensors[t].precision.bits == 16]
        if not wide or self.fused.get(self.ctx.node_key(node)):
            return ""
        domain = "ai.onnx" if self.facts.view.opset("") >= 21 else "com.microsoft (opset < 21)"
        return (f"; 16-bit {wide[0]}: {self.facts.target.ep} has no 16-bit integer {node.op_type}, so it runs "
                f"float between 16-bit QuantizeLinear/DequantizeLinear ({domain}): accuracy, not speed")

    def node_plans(self) -> list[NodePlan]:
        out = []
        for node, decision, precision in self.decided:
            name = self.ctx.node_key(node)
            if isinstance(decision, Skip):
                half = self.facts.overrides.get(name) is Precision.FP16 and name in self.facts.kept_float
                out.append(NodePlan(name, node.op_type, Precision.FP16 if half else Precision.FLOAT, decision.reason,
                                    float_inputs=self.raw_reads(node, decision)))
                continue
            reads = [node.input[i] for i in decision.inputs if node.input[i]]
            if isinstance(decision.output, Share):
                reads.append(node.input[decision.output.input_index])
            reads = [t for t in reads if t in self.tensors and self.tensors[t].quantized
                     and self.tensors[t].role is not Role.BIAS]
            if isinstance(decision.output, Share):
                precision = self._root(node.output[0]).precision
            outs = list(node.output) + ([self.facts.view.by_name[decision.fuses].output[0]] if decision.fuses else [])
            mixed = self._mixed(node, decision)
            note = (f"; {mixed}: onnxruntime fuses only matching 8-bit types, so it runs float between Q/DQ"
                    if mixed else "")
            out.append(NodePlan(name, node.op_type, precision, decision.reason + self._wide(node, reads + outs) + note,
                                decision.kernel,
                                self.fused.get(name, ""), tuple(dict.fromkeys(reads)), self.raw_reads(node, decision),
                                decision.bias))
        return out
