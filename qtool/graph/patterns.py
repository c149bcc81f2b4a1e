"""Recognise normalisation and activation functions written out as elementwise chains.

Exporters write LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add),
GELU as Div/Erf/Add/Mul/Mul or Pow/Mul/Add/Mul/Tanh/Add/Mul/Mul, and Swish as
x·Sigmoid(x). Quantizing each small op of such a chain is the classic way a
static int8 transformer collapses, so the planner keeps every node of a
recognised chain in float. Each matcher anchors on one distinctive node and
walks to its neighbours; it returns the node names it claims.
"""

from __future__ import annotations

import onnx

from .view import GraphView

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "ReduceMean", "Reciprocal",
               "Neg", "Cast"}


def float_patterns(view: GraphView) -> dict[str, str]:
    """Map node name -> pattern name for every node of a recognised chain."""
    claimed: dict[str, str] = {}
    for node in view.nodes:
        for matcher, label in ((_layernorm, "LayerNorm"), (_gelu_erf, "GELU (Erf)"), (_gelu_tanh, "GELU (Tanh)"),
                               (_swish, "Swish/SiLU"), (_hardswish, "HardSwish")):
            for n in matcher(node, view) or ():
                claimed.setdefault(view.node_name(n), label)
    return claimed


def _users(view: GraphView, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    return view.consumers.get(node.output[0], [])


def _producer(view: GraphView, tensor: str) -> onnx.NodeProto | None:
    return view.producer.get(tensor)


def _chain_between(view: GraphView, start: onnx.NodeProto, stop: set[str], limit: int = 12) -> list[onnx.NodeProto]:
    """Elementwise nodes reachable forward from ``start`` until a node consuming one of ``stop``."""
    seen, frontier, out = set(), [start], []
    while frontier and len(out) < limit:
        n = frontier.pop()
        key = view.node_name(n)
        if key in seen or n.op_type not in ELEMENTWISE:
            continue
        seen.add(key)
        out.append(n)
        if any(o in stop for o in n.output):
            continue
        frontier.extend(_users(view, n))
    return out


def _layernorm(node: onnx.NodeProto, view: GraphView):
    """ReduceMean(x) -> Sub(x, mean) -> ... -> Div(sub, Sqrt(var + eps)) [-> Mul(gamma) -> Add(beta)]."""
    if node.op_type != "ReduceMean":
        return None
    subs = [u for u in _users(view, node) if u.op_type == "Sub" and u.input[1] == node.output[0]]
    if not subs:
        return None
    sub = subs[0]
    divs = [u for u in _users(view, sub) if u.op_type == "Div"]
    if not divs:
        return None
    div = divs[0]
    chain = [node, sub, div]
    var_src = _producer(view, div.input[1])
    walk = [var_src] if var_src is not None else []
    while walk:
        n = walk.pop()
        if n is None or n in chain or n.op_type not in ELEMENTWISE:
            continue
        chain.append(n)
        walk.extend(_producer(view, i) for i in n.input if i and not view.is_initializer(i) and i != sub.output[0])
    tail = _users(view, div)
    if len(tail) == 1 and tail[0].op_type == "Mul" and any(view.is_initializer(i) for i in tail[0].input):
        chain.append(tail[0])
        after = _users(view, tail[0])
        if len(after) == 1 and after[0].op_type == "Add" and any(view.is_initializer(i) for i in after[0].input):
            chain.append(after[0])
    return chain if any(n.op_type == "Sqrt" for n in chain) else None


def _gelu_erf(node: onnx.NodeProto, view: GraphView):
    """x * 0.5 * (1 + Erf(x / sqrt(2))) in any association order."""
    if node.op_type != "Erf":
        return None
    pre = _producer(view, node.input[0])
    chain = [node]
    x = None
    if pre is not None and pre.op_type in ("Div", "Mul") and any(view.is_initializer(i) for i in pre.input):
        chain.append(pre)
        x = next(i for i in pre.input if not view.is_initializer(i))
    after = _chain_between(view, node, set(), limit=4)
    for n in after:
        if n is not node and n.op_type in ("Add", "Mul"):
            chain.append(n)
    if x is not None:
        chain += [u for u in view.consumers.get(x, []) if u.op_type == "Mul" and u not in chain
                  and any(_producer(view, i) in chain for i in u.input)]
    return chain if len(chain) >= 3 else None


def _gelu_tanh(node: onnx.NodeProto, view: GraphView):
    """0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))."""
    if node.op_type != "Tanh":
        return None
    chain = [node]
    walk = [_producer(view, node.input[0])]
    while walk and len(chain) < 10:
        n = walk.pop()
        if n is None or n in chain or n.op_type not in ("Mul", "Add", "Pow"):
            continue
        chain.append(n)
        walk.extend(_producer(view, i) for i in n.input if i and not view.is_initializer(i))
    if not any(n.op_type == "Pow" or n.op_type == "Mul" for n in chain[1:]):
        return None
    chain += [n for n in _chain_between(view, node, set(), limit=4) if n is not node and n.op_type in ("Add", "Mul")]
    return chain if len(chain) >= 4 else None


def _swish(node: onnx.NodeProto, view: GraphView):
    """Mul(x, Sigmoid(x))."""
    if node.op_type != "Sigmoid":
        return None
    x = node.input[0]
    muls = [u for u in _users(view, node) if u.op_type == "Mul" and x in u.input]
    return [node] + muls if muls else None


def _hardswish(node: onnx.NodeProto, view: GraphView):
    """Mul(x, HardSigmoid(x)) (the HardSwish op itself has no rule and stays float)."""
    if node.op_type != "HardSigmoid":
        return None
    x = node.input[0]
    muls = [u for u in _users(view, node) if u.op_type == "Mul" and x in u.input]
    return [node] + muls
