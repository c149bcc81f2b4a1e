"""Block-wise 4-bit weights, pure numpy: round to nearest, HQQ and GPTQ, and the packing
onnxruntime's ``com.microsoft.MatMulNBits`` and ``GatherBlockQuantized`` read.

Everything works on a matrix ``M[R, C]`` quantized along C in blocks of ``block_size``
(one scale and zero point per row and block; the last block of a row may be short). A
MatMul weight ``W[K, N]`` is quantized along K, so ``M = W.T`` (``R = N``); an embedding
table ``T[V, D]`` along D, so ``M = T``.

Codes are stored unsigned, 0..15 ("nibbles"), ``w = (code - zp) * scale``:

* asymmetric (uint4): ``scale = (max(hi, 0) - min(lo, 0)) / 15``,
  ``zp = clamp(roundf(-min / scale), 0, 15)``;
* symmetric (int4 -8..7 stored with zero point 8, the kernel's default):
  ``scale = m / -8`` with ``m`` the block's value of largest magnitude, sign kept, so
  that value lands exactly on code 0 (-8) and all 16 levels are used; a block whose
  extreme is positive gets a negative scale. This is onnxruntime's own definition
  (``range2scale`` in onnxruntime/core/mlas/lib/q4_dq.cpp).

``code = clamp(roundf(w * float32(1 / scale) + zp), 0, 15)`` in float32 with rounding
half away from zero (``BlockwiseQuantizer::quantizeAndTranspose``, same file), so round
to nearest gives onnxruntime's quantizer's bytes. Worked example, asymmetric block
[-0.3, 0.0, 0.9]: scale = 1.2 / 15 = 0.08, zp = roundf(3.75) = 4, codes = [0, 4, 15],
dequantized [-0.32, 0.0, 0.88].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = 4
LEVELS = 15          # largest code
SYMMETRIC_ZP = 8     # MatMulNBits' default zero point for 4 bits
METHODS = ("rtn", "hqq", "gptq")
GPTQ_DAMP = 0.1
HQQ_TOLERANCE = 1e-5  # stop when an iteration lowers the total squared error by less than this share
F32 = np.float32


@dataclass(frozen=True)
class Quantized:
    """A quantized ``M[R, C]``: nibble codes [R, C], float32 scales [R, nb] and
    uint8 zero points [R, nb] (all 8 when symmetric)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    block_size: int

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.scales, self.zero_points, self.block_size)


def num_blocks(columns: int, block_size: int) -> int:
    return -(-columns // block_size)


def blocked(m: np.ndarray, block_size: int) -> np.ndarray:
    """``m[R, C]`` as [R, nb, block_size], the short last block padded with zeros."""
    rows, cols = m.shape
    nb = num_blocks(cols, block_size)
    out = np.zeros((rows, nb * block_size), dtype=m.dtype)
    out[:, :cols] = m
    return out.reshape(rows, nb, block_size)


def _valid(cols: int, block_size: int) -> np.ndarray:
    """[nb, block_size] mask of real (not padding) positions."""
    nb = num_blocks(cols, block_size)
    return (np.arange(nb * block_size) < cols).reshape(nb, block_size)


def roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: to nearest, halves away from zero (numpy's rint rounds them to even).
    Exact in the input's own float type: a half is exactly ``|x - trunc(x)| == 0.5``."""
    x = np.asarray(x)
    whole = np.trunc(x)
    return np.where(np.abs(x - whole) == 0.5, whole + np.sign(x), np.rint(x))


def block_params(m: np.ndarray, block_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest (scales float32 [R, nb], zero points uint8 [R, nb]) from each block's range."""
    b = blocked(np.asarray(m, dtype=F32), block_size)
    valid = _valid(m.shape[1], block_size)
    lo = np.where(valid, b, np.inf).min(axis=2)
    hi = np.where(valid, b, -np.inf).max(axis=2)
    if symmetric:
        extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo).astype(F32)
        return (extreme / F32(-SYMMETRIC_ZP)).astype(F32), np.full(extreme.shape, SYMMETRIC_ZP, np.uint8)
    lo, hi = np.minimum(lo, 0).astype(F32), np.maximum(hi, 0).astype(F32)
    scale = ((hi - lo) / F32(LEVELS)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(scale != 0, F32(0) - lo / np.where(scale != 0, scale, F32(1)), lo).astype(F32)
    return scale, np.clip(roundf(zp), 0, LEVELS).astype(np.uint8)


def reciprocal(scales: np.ndarray) -> np.ndarray:
    """float32 1/scale, 0 where the scale is 0 (an all-zero block: every code is the zero point)."""
    s = np.asarray(scales, dtype=F32)
    with np.errstate(divide="ignore"):
        return np.where(s != 0, F32(1) / np.where(s != 0, s, F32(1)), F32(0)).astype(F32)


def quantize_codes(m: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """uint8 codes [R, C] of ``m`` with the given per-block scales and zero points."""
    rows, cols = m.shape
    codes = _codes(blocked(np.asarray(m, dtype=F32), block_size), reciprocal(scales), zero_points)
    return codes.reshape(rows, -1)[:, :cols]


def _codes(b: np.ndarray, recip: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """Codes of blocked float32 values [R, nb, bs]: ``clamp(roundf(w * recip + zp), 0, 15)`` in float32."""
    t = b * recip[..., None]
    t += np.asarray(zero_points, F32)[..., None]
    return _round_codes(t)


def _round_codes(t: np.ndarray) -> np.ndarray:
    """``clamp(roundf(t), 0, 15)`` of float32 ``t`` as uint8."""
    r = np.rint(t)
    r += (t - r == F32(0.5))  # a positive half that rint took down to even goes up, as roundf's;
    return np.clip(r, 0, LEVELS).astype(np.uint8)  # a negative one clamps to 0 either way


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """float32 ``(code - zp) * scale``, as MatMulNBits computes it."""
    rows, cols = codes.shape
    b = blocked(codes.astype(F32), block_size)
    out = ((b - np.asarray(zero_points, F32)[..., None]) * np.asarray(scales, F32)[..., None]).astype(F32)
    return out.reshape(rows, -1)[:, :cols]


def rtn(m: np.ndarray, block_size: int, symmetric: bool) -> Quantized:
    """Round to nearest from each block's range (onnxruntime's quantizer, bit for bit)."""
    scales, zps = block_params(m, block_size, symmetric)
    return Quantized(quantize_codes(m, scales, zps, block_size), scales, zps, block_size)


# --------------------------------------------------------------------------- HQQ

def hqq(m: np.ndarray, block_size: int, symmetric: bool, iters: int = 20, p: float = 0.7,
        beta: float = 10.0, kappa: float = 1.01) -> Quantized:
    """Half-quadratic quantization (Badri & Shaji 2023), data-free.

    Alternates, per block: codes for the current (scale, zero); an l_p-sparse error
    ``E = shrink(W - dequant, beta)`` that absorbs the outliers; then the zero point and
    scale that best fit ``W - E`` (the paper's closed-form zero update, here also a
    least-squares scale, where onnxruntime's HQQ updates the zero only, scale fixed).
    Unlike the paper (and onnxruntime's HQQ), zero points stay integers, because
    MatMulNBits' prepacked fast path takes only uint8 zero points
    (contrib_ops/cpu/quantization/matmul_nbits.cc, ``has_unquantized_zero_point_``):
    each update is rounded. Starts from round to nearest and keeps, per block, the
    parameters with the smallest squared reconstruction error seen, so it is never
    worse than round to nearest on that measure. Symmetric: the zero point stays 8.
    """
    w = blocked(np.asarray(m, dtype=F32), block_size)
    valid = _valid(m.shape[1], block_size)[None]
    count = valid.sum(axis=2).astype(F32)
    best_s, best_z = block_params(m, block_size, symmetric)
    best_err = _block_error(w, valid, best_s, best_z)
    s, z = best_s.copy(), best_z.astype(F32)
    for _ in range(iters):
        q = _codes(w, reciprocal(s), z).astype(F32)
        centred = q - z[..., None]
        target = w - _shrink(w - centred * s[..., None], beta, p)
        if not symmetric:
            safe = np.where(s == 0, F32(1), s)[..., None]
            z = np.clip(roundf(np.where(valid, q - target / safe, 0).sum(axis=2) / count), 0, LEVELS).astype(F32)
            centred = q - z[..., None]
        centred = np.where(valid, centred, 0)
        denom = (centred * centred).sum(axis=2)
        s = np.where(denom > 0, (centred * target).sum(axis=2) / np.where(denom > 0, denom, 1), s).astype(F32)
        beta *= kappa
        err = _block_error(w, valid, s, z)
        better = err < best_err
        before = best_err.sum()
        best_s[better], best_z[better], best_err[better] = s[better], z[better], err[better]
        if before - best_err.sum() <= HQQ_TOLERANCE * before:
            break  # converged (on MiniLM's weights within ~10 iterations)
    return Quantized(quantize_codes(m, best_s, best_z, block_size), best_s, best_z, block_size)


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The l_p (p < 1) proximal step of HQQ: soft-thresholding with a magnitude-dependent threshold."""
    a = np.abs(x)
    return np.sign(x) * np.maximum(a - F32(1.0 / beta) * np.power(a + F32(1e-8), F32(p - 1)), F32(0))


def _block_error(w: np.ndarray, valid: np.ndarray, scales: np.ndarray, zps: np.ndarray) -> np.ndarray:
    """Squared reconstruction error per block [R, nb] of the blocked ``w`` with these parameters."""
    z = np.asarray(zps, F32)
    deq = (_codes(w, reciprocal(scales), z).astype(F32) - z[..., None]) * np.asarray(scales, F32)[..., None]
    diff = np.where(valid, deq - w, F32(0))
    return np.einsum("rbk,rbk->rb", diff, diff, dtype=np.float64)


# --------------------------------------------------------------------------- GPTQ

def gptq(m: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool, damp: float = GPTQ_DAMP,
         lazy: int = 128) -> Quantized:
    """GPTQ (Frantar et al. 2022) for ``M[R, C]`` with ``hessian = X^T X`` over the C inputs.

    Quantizes column by column; each column's error, scaled by the inverse Hessian's
    Cholesky factor, is spread over the columns not yet quantized, so the layer's output
    on the calibration inputs moves as little as possible. Columns go in descending order
    of the Hessian's diagonal ("act order": the inputs with the most energy first, while
    the most columns are left to absorb their error); the blocks' scales and zero points
    are fixed beforehand from the original weights (round to nearest: "static groups"),
    so the blocks stay contiguous along K as MatMulNBits needs (no g_idx). Dampening:
    ``damp`` times the mean diagonal is added to the diagonal; an input that was always
    zero gets a unit diagonal (its weights are rounded to nearest, nothing to compensate).
    Updates are applied lazily in chunks of ``lazy`` columns, as in the paper.
    """
    rows, cols = m.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian is {hessian.shape}, expected ({cols}, {cols})")
    order = np.argsort(-np.diag(hessian), kind="stable")
    u = _inverse_cholesky(hessian[np.ix_(order, order)], damp)
    w = np.asarray(m, dtype=np.float64)[:, order]
    scales, zps = block_params(m, block_size, symmetric)
    recip, zf = reciprocal(scales), zps.astype(F32)
    codes = np.zeros((rows, cols), np.uint8)
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        w1, err1 = w[:, i1:i2].copy(), np.zeros((rows, i2 - i1))
        for i in range(i2 - i1):
            col, g = order[i1 + i], order[i1 + i] // block_size
            c = _round_codes(w1[:, i].astype(F32) * recip[:, g] + zf[:, g])
            codes[:, col] = c
            e = (w1[:, i] - (c.astype(F32) - zf[:, g]) * scales[:, g]) / u[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(e, u[i1 + i, i1 + i:i2])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return Quantized(codes, scales, zps, block_size)


def _inverse_cholesky(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of the dampened Hessian's inverse."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    inverse = np.linalg.inv(h)
    return np.linalg.cholesky((inverse + inverse.T) / 2).T


def quantize(m: np.ndarray, block_size: int, symmetric: bool, method: str = "rtn",
             hessian: np.ndarray | None = None) -> Quantized:
    """``m[R, C]`` with one of :data:`METHODS` (gptq needs ``hessian``)."""
    if method == "rtn":
        return rtn(m, block_size, symmetric)
    if method == "hqq":
        return hqq(m, block_size, symmetric)
    if method == "gptq":
        if hessian is None:
            raise ValueError("gptq needs the inputs' Hessian (X^T X)")
        return gptq(m, hessian, block_size, symmetric, GPTQ_DAMP)
    raise ValueError(f"unknown int4 method {method!r} (known: {', '.join(METHODS)})")


# --------------------------------------------------------------------------- packing

def pack_nibbles(codes: np.ndarray, pad: int = 0) -> np.ndarray:
    """[..., C] codes 0..15 -> [..., ceil(C/2)] uint8, the first of each pair in the low nibble
    (an odd C gets ``pad`` in the last high nibble)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (1,), pad, np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: [..., ceil(count/2)] -> [..., count]."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out[..., :count]


def matmul_nbits_b(codes: np.ndarray, block_size: int) -> np.ndarray:
    """MatMulNBits' input B: uint8 [N, k_blocks, block_size / 2] from codes [N, K]; the last
    block padded with code 0 (onnxruntime's quantizer leaves those nibbles 0 too; the kernel
    reads only K values)."""
    rows, cols = codes.shape
    padded = blocked(codes.astype(np.uint8), block_size)
    return pack_nibbles(padded).reshape(rows, num_blocks(cols, block_size), block_size // 2)


def packed_zero_points(zero_points: np.ndarray) -> np.ndarray:
    """Zero points [R, nb] -> uint8 [R, ceil(nb/2)], packed like the codes (MatMulNBits'
    and uint8 GatherBlockQuantized's layout); an odd nb's unused nibble holds 8, as
    onnxruntime's quantizer writes it."""
    return pack_nibbles(zero_points, pad=SYMMETRIC_ZP)
