"""Fresh, collision-free tensor and node names for inserted nodes."""

from __future__ import annotations

import onnx


class Names:
    def __init__(self, model: onnx.ModelProto):
        from ..subgraphs import all_names
        self.used = all_names(model)  # subgraphs too: a body must not define a name the outer graph uses

    def fresh(self, base: str) -> str:
        return fresh(self.used, base)


def fresh(used: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first not in ``used``, which it joins."""
    name, k = base, 1
    while name in used:
        name = f"{base}_{k}"
        k += 1
    used.add(name)
    return name
