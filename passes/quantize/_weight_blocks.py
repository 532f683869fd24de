"""Block quantization math of weight-only quantization (``quantize-int4-weight``):
round-to-nearest and GPTQ over blocks of ``block_size`` rows of a [K, N] weight, the
expected output error ``tr(dW^T H dW)``, and the packed layouts ONNX Runtime's
MatMulNBits and ONNX's DequantizeLinear-21 read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

LAZY_COLUMNS = 128  # GPTQ updates the rest of the matrix once per this many columns


# ====================================================================== block quantization
@dataclass
class Blocks:
    """A [K, N] weight quantized in blocks along K: ``(codes - zero_points) * scales``."""

    codes: np.ndarray        # [k_blocks * block_size, N] uint8, unsigned codes
    scales: np.ndarray       # [k_blocks, N] float64
    zero_points: np.ndarray  # [k_blocks, N] uint8 (2^(bits-1) everywhere when symmetric)
    bits: int
    block_size: int
    k: int
    symmetric: bool

    def dequantize(self) -> np.ndarray:
        """The [K, N] weight the codes stand for."""
        scale = np.repeat(self.scales, self.block_size, axis=0)
        zero = np.repeat(self.zero_points.astype(np.float64), self.block_size, axis=0)
        return ((self.codes.astype(np.float64) - zero) * scale)[:self.k]


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def block_params(w: np.ndarray, bits: int, symmetric: bool,
                 dtype: np.dtype = np.dtype(np.float32),
                 ratios: tuple[float, ...] = (1.0,)) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each column of a [rows, N] block. Symmetric: the value of
    largest magnitude maps to code 0 (``-2^(bits-1)``), so the grid uses all 2^bits
    codes; asymmetric: [min(w, 0), max(w, 0)] spans the codes. With several ``ratios``
    the range is also shrunk by each and, per column, the one with the least squared
    rounding error is kept (clipping a rare extreme buys resolution for the rest).
    Scales are rounded to ``dtype`` (what the model stores), so codes are computed
    against the stored scale."""
    best_scale = best_zero = best_error = None
    for ratio in ratios:
        scale, zero = _range_params(w, bits, symmetric, dtype, ratio)
        if len(ratios) == 1:
            return scale, zero
        error = np.sum((w - (to_codes(w, scale, zero, bits) - zero) * scale) ** 2, axis=0)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
        else:
            better = error < best_error
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
            best_error = np.where(better, error, best_error)
    return best_scale, best_zero


def _range_params(w: np.ndarray, bits: int, symmetric: bool, dtype: np.dtype,
                  ratio: float) -> tuple[np.ndarray, np.ndarray]:
    if symmetric:
        half = 1 << (bits - 1)
        idx = np.argmax(np.abs(w), axis=0)
        extreme = w[idx, np.arange(w.shape[1])] * ratio
        scale = extreme / -half
        zero = np.full(w.shape[1], half, dtype=np.float64)
    else:
        top = (1 << bits) - 1
        lo = np.minimum(w.min(axis=0), 0.0) * ratio
        hi = np.maximum(w.max(axis=0), 0.0) * ratio
        scale = (hi - lo) / top
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-lo / safe), 0, top)
    scale = scale.astype(dtype).astype(np.float64)
    scale[scale == 0] = 1.0  # an all-zero block: any scale represents it exactly
    return scale, zero


def to_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale) + zero, 0, (1 << bits) - 1)


def _padded(weight: np.ndarray, block_size: int) -> np.ndarray:
    k = weight.shape[0]
    rows = math.ceil(k / block_size) * block_size
    out = np.zeros((rows, weight.shape[1]), dtype=np.float64)
    out[:k] = weight
    return out


def rtn(weight: np.ndarray, bits: int, block_size: int, symmetric: bool,
        dtype: np.dtype = np.dtype(np.float32), ratios: tuple[float, ...] = (1.0,)) -> Blocks:
    """Round-to-nearest block quantization of a [K, N] weight."""
    w = _padded(weight, block_size)
    n_blocks = w.shape[0] // block_size
    blocks = w.reshape(n_blocks, block_size, -1)
    scales = np.empty((n_blocks, w.shape[1]))
    zeros = np.empty((n_blocks, w.shape[1]))
    for b in range(n_blocks):
        scales[b], zeros[b] = block_params(blocks[b], bits, symmetric, dtype, ratios)
    codes = to_codes(blocks, scales[:, None, :], zeros[:, None, :], bits)
    return Blocks(codes.reshape(w.shape).astype(np.uint8), scales, zeros.astype(np.uint8),
                  bits, block_size, weight.shape[0], symmetric)


def gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, block_size: int,
         symmetric: bool, damp: float = 0.01, dtype: np.dtype = np.dtype(np.float32),
         ratios: tuple[float, ...] = (1.0,), act_order: bool = False) -> Blocks:
    """GPTQ block quantization of a [K, N] weight given ``H = 2 X^T X / n`` ([K, K]).

    ``act_order``: quantize the input channels in decreasing order of ``diag(H)`` (the
    most active first, while the most weights are left to absorb their error), with
    "static groups": block scales fixed beforehand from the unquantized weights, so the
    blocks stay contiguous along K (no ``g_idx``)."""
    k = weight.shape[0]
    # float32 like the reference implementation: the K x K algebra dominates the time
    wt = _padded(weight, block_size).T.astype(np.float32)  # [N, Kp]: rows = outputs
    n, kp = wt.shape
    h = np.zeros((kp, kp), dtype=np.float32)
    h[:k, :k] = hessian
    diagonal = np.einsum("ii->i", h)  # a view
    diagonal[diagonal <= 0] = 1.0  # dead inputs (always 0) and the padding
    n_blocks = kp // block_size
    scales = np.empty((n_blocks, n))
    zeros = np.empty((n_blocks, n))
    order = np.arange(kp)
    if act_order:
        for b in range(n_blocks):
            scales[b], zeros[b] = block_params(wt[:, b * block_size:(b + 1) * block_size].T,
                                               bits, symmetric, dtype, ratios)
        order = np.argsort(-np.diag(h), kind="stable")
        wt, h = wt[:, order], h[np.ix_(order, order)]
    upper = _inverse_cholesky(h, damp)
    codes = np.zeros((n, kp), dtype=np.uint8)
    lazy = max(block_size, LAZY_COLUMNS // block_size * block_size)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        w1 = wt[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            b = order[col] // block_size
            if not act_order and col % block_size == 0:
                scales[b], zeros[b] = block_params(w1[:, i:i + block_size].T, bits,
                                                   symmetric, dtype, ratios)
            scale, zero = scales[b], zeros[b]
            w = w1[:, i]
            q = to_codes(w, scale, zero, bits)
            codes[:, order[col]] = q
            err = (w - (q - zero) * scale) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        wt[:, i2:] -= err1 @ upper[i1:i2, i2:]
    return Blocks(codes.T.copy(), scales, zeros.astype(np.uint8), bits, block_size, k,
                  symmetric)


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + damping)^-1 (``H^-1 = U^T U``), raising the
    damping tenfold until the factorization succeeds. With P the order reversal,
    ``U = P L^-1 P`` where ``L`` is the lower Cholesky factor of ``P H P``: one
    factorization and one triangular inverse."""
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(6):
        damped = h.copy()
        np.einsum("ii->i", damped)[:] += damp * (10 ** attempt) * mean_diag
        try:
            lower = np.linalg.cholesky(damped[::-1, ::-1])
        except np.linalg.LinAlgError:
            continue
        return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])
    raise np.linalg.LinAlgError("the Hessian stays singular after damping")


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2 x 2 block recursion (matrix products:
    a third of a general inverse's work)."""
    n = len(lower)
    if n <= 256:
        return np.linalg.inv(lower)
    half = n // 2
    top = _lower_inverse(lower[:half, :half])
    bottom = _lower_inverse(lower[half:, half:])
    out = np.zeros_like(lower)
    out[:half, :half] = top
    out[half:, half:] = bottom
    out[half:, :half] = -(bottom @ lower[half:, :half]) @ top
    return out


def output_error(weight: np.ndarray, dequantized: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(dW^T H dW)``: the expected squared output error of using ``dequantized``."""
    delta = dequantized - weight
    return float(np.sum(delta * (hessian @ delta)))


# ====================================================================== packing
def pack_nbits(blocks: Blocks) -> tuple[np.ndarray, np.ndarray | None]:
    """``B`` ([N, k_blocks, blob]) and packed ``zero_points`` (None when symmetric) of
    MatMulNBits: values of a block along K, two 4-bit values a byte, low nibble first."""
    kp, n = blocks.codes.shape
    n_blocks = kp // blocks.block_size
    codes = blocks.codes.T.reshape(n, n_blocks, blocks.block_size)
    zeros = None if blocks.symmetric else blocks.zero_points.T.copy()  # [N, k_blocks]
    if blocks.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        if zeros is not None:
            if n_blocks % 2:
                zeros = np.concatenate([zeros, np.zeros((n, 1), dtype=np.uint8)], axis=1)
            zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    return np.ascontiguousarray(codes.astype(np.uint8)), \
        None if zeros is None else np.ascontiguousarray(zeros.astype(np.uint8))


def subbyte_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A gs.Constant of a 4-bit ml_dtypes array. onnx-graphsurgeon 0.6 would write such
    an array's unpacked bytes; handing it the packed TensorProto avoids that."""
    return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(values, name)))


def qdq_constants(blocks: Blocks) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes ([K, N]) and zero points ([k_blocks, N]) as DequantizeLinear-21 wants them:
    int4/int8 without zero point when symmetric, uint4/uint8 with one otherwise."""
    import ml_dtypes

    codes = blocks.codes[:blocks.k].astype(np.int16)
    if blocks.symmetric:
        codes = codes - (1 << (blocks.bits - 1))
        kind = ml_dtypes.int4 if blocks.bits == 4 else np.int8
        return codes.astype(kind), None
    kind = ml_dtypes.uint4 if blocks.bits == 4 else np.uint8
    return codes.astype(kind), blocks.zero_points.astype(kind)
