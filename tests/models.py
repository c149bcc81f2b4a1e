"""Small test models built from ONNX text with seeded weights (a committed script)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, parser


def _with_weights(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = parser.parse_model(text)
    for name, value in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def small_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-Flatten-Gemm(transB)-Relu-Gemm, dynamic batch."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : OPSET]>
    cnn (float[N, 3, 16, 16] x) => (float[N, 10] logits) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
        c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
        r2 = Relu (c2)
        f = Flatten <axis = 1> (r2)
        g1 = Gemm <transB = 1> (f, w3, b3)
        r3 = Relu (g1)
        logits = Gemm (r3, w4, b4)
    }
    """
    w = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.2, (16, 8, 3, 3)), "b2": rng.normal(0, 0.1, 16),
        "w3": rng.normal(0, 0.05, (32, 16 * 8 * 8)), "b3": rng.normal(0, 0.1, 32),
        "w4": rng.normal(0, 0.2, (32, 10)), "b4": rng.normal(0, 0.1, 10),
    }
    return _with_weights(text.replace("OPSET", str(opset)), w)


def matmul_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul+Add+Relu, Transpose/Reshape data movement, MatMul of two activations."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    mlp (float[B, 4, 16] x) => (float[B, 4, 4] y) {
        h = MatMul (x, w1)
        hb = Add (h, b1)
        hr = Relu (hb)
        h2 = MatMul (hr, w2)
        t = Transpose <perm = [0, 2, 1]> (h2)
        y = MatMul (h2, t)
    }
    """
    w = {"w1": rng.normal(0, 0.3, (16, 32)), "b1": rng.normal(0, 0.1, 32), "w2": rng.normal(0, 0.2, (32, 8))}
    return _with_weights(text, w)


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def random_inputs(model: onnx.ModelProto, n: int, seed: int = 1, **dims) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = [n if d.dim_param in ("N", "B") else d.dim_value or dims.get(d.dim_param, 1)
                 for d in inp.type.tensor_type.shape.dim]
        out[inp.name] = rng.normal(0, 1, shape).astype(np.float32)
    return out


def dynamic_conv(seed: int = 0) -> onnx.ModelProto:
    """Conv over images of any height/width, pooled to a fixed-size output."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    dyn (float[N, 3, H, W] x) => (float[N, 4] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c)
        c2 = Conv (r, w2, b2)
        p = GlobalAveragePool (c2)
        y = Flatten <axis = 1> (p)
    }
    """
    w = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
         "w2": rng.normal(0, 0.3, (4, 8, 1, 1)), "b2": rng.normal(0, 0.1, 4)}
    return _with_weights(text, w)


def log_then_conv(seed: int = 0) -> onnx.ModelProto:
    """Log of the input feeds a Conv: negative inputs make a NaN activation; a zero branch is constant."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    logconv (float[N, 2, 4, 4] x) => (float[N, 48] o) {
        l = Log (x)
        z = Mul (x, zero)
        s = Add (l, z)
        y = Conv (s, w, b)
        zc = Conv (z, w, b)
        t = Add (y, zc)
        o = Flatten (t)
    }
    """
    model = _with_weights(text, {"w": rng.normal(0, 0.3, (3, 2, 1, 1)), "b": rng.normal(0, 0.1, 3),
                                 "zero": np.zeros(1)})
    return model


def outlier_channel_cnn(seed: int = 0, outlier: float = 100.0) -> onnx.ModelProto:
    """A CNN with one badly quantizable node: a per-channel Mul (a folded BatchNorm's scale, as real
    exports have) makes channel 0 of ``m`` ``outlier`` times wider than the rest, and ``/conv_b``'s
    weights undo it, so the float function is ordinary but ``m``'s per-tensor int8 grid crushes
    channels 1-7 on their way into ``/conv_b``."""
    rng = np.random.default_rng(seed)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    outlier (float[N, 3, 16, 16] x) => (float[N, 10] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        ra = Relu (a)
        m = Mul (ra, s)
        b = Conv <pads = [1, 1, 1, 1]> (m, wb, bb)
        rb = Relu (b)
        c = Conv <pads = [1, 1, 1, 1]> (rb, wc, bc)
        rc = Relu (c)
        g = GlobalAveragePool (rc)
        f = Flatten (g)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    s = np.ones((8, 1, 1))
    s[0] = outlier
    wb = rng.normal(0, 0.25, (8, 8, 3, 3))
    wb[:, 0] /= outlier
    model = _with_weights(text, {"wa": rng.normal(0, 0.4, (8, 3, 3, 3)), "ba": rng.normal(0, 0.1, 8), "s": s,
                                 "wb": wb, "bb": rng.normal(0, 0.1, 8), "wc": rng.normal(0, 0.25, (8, 8, 3, 3)),
                                 "bc": rng.normal(0, 0.1, 8), "wg": rng.normal(0, 0.5, (10, 8)),
                                 "bg": rng.normal(0, 0.1, 10)})
    names = {"a": "/conv_a", "m": "/scale/Mul", "b": "/conv_b", "c": "/conv_c", "y": "/head/Gemm"}
    for node in model.graph.node:
        node.name = names.get(node.output[0], f"/{node.op_type.lower()}_{node.output[0]}")
    return model
