"""MatMul-shaped Einsum -> (Transpose) MatMul (Transpose), so that it is quantized as a MatMul.

onnxruntime has no integer Einsum kernel (its CPU Einsum runs float32 only, and the QDQ
selectors know no Einsum), but its integer MatMul kernels are fast. An Einsum of two operands
is MatMul-shaped when every letter is either a batch letter (in both operands and the output),
a row letter (first operand and output), a column letter (second operand and output) or the one
contracted letter (both operands, not the output), with no letter repeated inside a term.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .. import model as model_io
from ..graph import GraphView
from ..rewrite.names import fresh as _fresh


def _terms(equation: str) -> tuple[str, str, str] | None:
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    return ops[0], ops[1], out


def matmul_form(equation: str, rank_a: int | None, rank_b: int | None):
    """(perm_a, perm_b, perm_out) in operand dims (None: no Transpose), or None when the
    Einsum is not MatMul-shaped. Leading ``...`` dims (same in all three terms, or absent
    from a 2-D second operand) stay leading and are broadcast by MatMul."""
    terms = _terms(equation)
    if terms is None:
        return None
    a, b, out = terms
    ell = [t.startswith("...") for t in (a, b, out)]
    if any("..." in t[3:] if s else "..." in t for t, s in zip((a, b, out), ell)):
        return None  # an ellipsis anywhere but in front
    a, b, out = (t[3:] if s else t for t, s in zip((a, b, out), ell))
    if ell[0] != ell[2] or (ell[1] and not ell[0]):
        return None
    if any(len(set(t)) != len(t) or not t.isalpha() for t in (a, b, out) if t) or not a or not b:
        return None
    if set(out) - set(a) - set(b) or (set(a) | set(b)) - set(out) - (set(a) & set(b)):
        return None  # a letter summed inside one operand, or an output letter from nowhere
    batch = [c for c in out if c in a and c in b]
    rows = [c for c in out if c in a and c not in b]
    cols = [c for c in out if c in b and c not in a]
    k = [c for c in a if c in b and c not in out]
    if len(k) != 1 or len(cols) != 1 or (batch and len(rows) != 1) or (not batch and ell[1]) \
            or (not rows and (batch or not ell[0])):
        return None
    if ell[0] and ell[1] and rank_a is not None and rank_b is not None and rank_a - len(a) != rank_b - len(b):
        return None
    lead_a = _lead(ell[0], rank_a, a)
    lead_b = _lead(ell[1], rank_b, b)
    if lead_a is None or lead_b is None:
        return None
    want_a = batch + rows + k
    want_b = batch + k + cols
    got = batch + rows + cols
    perm_a = _perm(a, want_a, lead_a)
    perm_b = _perm(b, want_b, lead_b)
    perm_out = _perm(got, list(out), lead_a)
    unknown = (perm_a == "rank" or perm_b == "rank" or perm_out == "rank")
    return None if unknown else (perm_a, perm_b, perm_out)


def _lead(has_ellipsis: bool, rank: int | None, letters: str) -> int | None:
    if not has_ellipsis:
        return 0
    return -1 if rank is None else rank - len(letters)


def _perm(have, want, lead: int):
    """The Transpose perm taking ``have`` letter order to ``want`` (None when equal);
    "rank" when one is needed but the leading ellipsis rank is unknown."""
    if list(have) == list(want):
        return None
    if lead < 0:
        return "rank"
    return list(range(lead)) + [lead + list(have).index(c) for c in want]


def rewrite_einsum(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Rewrite each MatMul-shaped two-operand Einsum as MatMul, transposing a constant
    operand in place and other operands with Transpose nodes."""
    view = GraphView(model)
    if not any(n.op_type == "Einsum" for n in view.nodes):
        return model, None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    from ..subgraphs import all_names
    used = all_names(m)  # tensor and node names, subgraphs too
    nodes, rewritten, kept = [], 0, 0
    for node in m.graph.node:
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            nodes.append(node)
            continue
        equation = view.attr(node, "equation", b"")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        form = matmul_form(equation, view.rank(node.input[0]), view.rank(node.input[1]))
        if form is None:
            nodes.append(node)
            kept += 1
            continue
        perm_a, perm_b, perm_out = form
        base = node.name or node.output[0]
        a, b = node.input
        operands = []
        for name, perm, tag in ((a, perm_a, "a"), (b, perm_b, "b")):
            if perm is None:
                operands.append(name)
            elif name in inits and _read_once(view, name) and list(node.input).count(name) == 1:
                t = inits[name]
                arr = model_io.tensor_array(t).transpose(perm)
                t.CopyFrom(numpy_helper.from_array(arr, name))
                operands.append(name)
            else:
                out = _fresh(used, f"{base}_{tag}_transposed")
                nodes.append(helper.make_node("Transpose", [name], [out], perm=perm, name=_fresh(used, out)))
                operands.append(out)
        if perm_out is None:
            nodes.append(helper.make_node("MatMul", operands, [node.output[0]], name=node.name or None))
        else:
            mm = _fresh(used, f"{base}_matmul")
            nodes.append(helper.make_node("MatMul", operands, [mm], name=node.name or None))
            nodes.append(helper.make_node("Transpose", [mm], [node.output[0]], perm=perm_out,
                                          name=_fresh(used, f"{base}_transpose")))
        rewritten += 1
    if not rewritten:
        return model, None
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    note = f"{rewritten} MatMul-shaped Einsum node(s) rewritten as MatMul"
    return m, note + (f"; {kept} other Einsum node(s) kept" if kept else "")


def _read_once(view: GraphView, name: str) -> bool:
    """A constant only this Einsum reads (not a graph input or output too): transposed in place."""
    return len(view.consumers.get(name, [])) == 1 and name not in view.graph_outputs \
        and name not in {i.name for i in view.graph.input}

