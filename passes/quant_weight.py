"""Weight-only block quantization of MatMul/Gemm weights (``quantize-int4-weight``).

Each constant [K, N] weight is cut into blocks of ``block_size`` consecutive rows (input
features) per output column; a block stores ``bits``-bit codes, one scale and (unless
``symmetric``) one zero point: ``w ≈ (code - zero_point) * scale``. Activations stay in
float; only the weights shrink (int4, block 32: 4.5 bits a weight with the fp32 scale
and the 4-bit zero point, 0.16x of float32).

What is emitted, per target:

* ``com.microsoft.MatMulNBits`` when the target runs it (ONNX Runtime): inputs ``A``,
  ``B`` (uint8 [N, k_blocks, block_size * bits / 8], codes of one block packed along K,
  low nibble first), ``scales`` ([N, k_blocks], A's type), ``zero_points`` (uint8
  [N, ceil(k_blocks * bits / 8)], packed the same way; omitted when symmetric, meaning
  2^(bits-1)), ``bias`` ([N]: a Gemm's C, or the constant vector of an ``Add`` that alone
  reads a MatMul's result); attributes ``K``, ``N``, ``bits``, ``block_size`` and
  ``accuracy_level`` (when not 0).
* otherwise the standard form: ``DequantizeLinear`` (opset 21: int4/uint4/int8/uint8
  weights, blocked ``block_size`` along axis 0) feeding the original MatMul/Gemm. Models
  older than opset 21 are upgraded (checked ``onnx.version_converter``, opset 13 and
  newer); when that fails, nothing changes and the stats say why.

Scales: symmetric blocks map their value of largest magnitude to the extreme code
(-2^(bits-1)), asymmetric ones span [min(w, 0), max(w, 0)]; with ``clip_search`` the
range is also tried shrunk to 95 ... 75 % and, per block and column, the one with the
least squared rounding error kept.

Rounding methods:

* ``rtn``: round to nearest.
* ``gptq``: GPTQ (Frantar et al. 2022). For each weight, ``H = 2 X^T X / n`` from the
  calibration activations ``X`` of its input (``ctx.calibration`` run through ONNX
  Runtime with those tensors as extra outputs); with damping ``damp * mean(diag H)``,
  the upper Cholesky factor ``U`` of ``H^-1`` drives a column-by-column quantization
  along K in which each column's rounding error, divided by ``U[k, k]``, is spread over
  the columns not yet quantized (``W[:, k:] -= err * U[k, k:]``), lazily in batches of
  128 columns. With ``act_order`` the columns go in decreasing ``diag(H)`` with block
  scales fixed beforehand ("static groups", so blocks stay contiguous); without it a
  block's scale is chosen when its first column is reached. Activations are those of the
  float model (not sequential).
* ``awq``: activation-aware scaling (Lin et al. 2023). For weights whose input can
  absorb a per-channel scale (a normalization or a Mul by a constant, see
  ``smooth-quant``), ``s = mean|x|^a`` is searched over ``a`` in [0, 1] to minimise
  ``tr(dW^T H dW)`` with ``dW = W - Q(diag(s) W) / s``; the input is divided by ``s`` and
  the weight, multiplied by ``s``, rounded to nearest. Other weights get ``rtn``.

Without calibration data ``gptq`` and ``awq`` fall back to ``rtn`` (the stats say so).
Weights in subgraphs are quantized with ``rtn`` (their inputs cannot be captured).

Defaults, measured on all-MiniLM-L6-v2 (int4, block 32, 48 calibration sentences,
embedding cosine to float32 on 24 other sentences, mean / min): asymmetric beats
symmetric (rtn 0.978 / 0.971 against 0.973 / 0.959) for 3 % more bytes; GPTQ with
act_order and damping 0.1 reaches 0.991 / 0.987, against 0.986 / 0.978 with the
reference's 0.01 and natural order (tens of sentences make a poorly conditioned H, and
more damping generalizes better). ``benchmarks/quant_weight.py`` has the full table.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.compression import Applied, CompressionPass, Site
from graphopt.ir import Model
from graphopt.pass_infra import PassContext, PassResult
from graphopt.passes._patterns import MICROSOFT, is_default_domain, upgrade_opset
from graphopt.passes._weights import Linear, capture, drop_feeders, linears
from graphopt.rewrite import constant_value, consumers, remove_node, tensor_names, unique_name

METHODS = ("rtn", "gptq", "awq")
FORMATS = ("auto", "nbits", "qdq")
QDQ_OPSET = 21  # DequantizeLinear with int4 and block_size
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


def _subbyte_constant(name: str, values: np.ndarray) -> gs.Constant:
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


# ====================================================================== the pass
@dataclass
class Embedding:
    """A Gather of rows of a constant [V, D] table (axis 0)."""

    node: gs.Node
    graph: gs.Graph
    table: np.ndarray  # [V, D], float
    source: gs.Constant

    @property
    def k(self) -> int:
        return int(self.table.shape[1])

    @property
    def n(self) -> int:
        return int(self.table.shape[0])


def embeddings(model: Model, misses: Counter) -> list[Embedding]:
    """Every Gather of a constant 2-D float table along its rows, that alone reads it
    (a table tied to an output projection would be stored twice); ``misses`` counts why
    other Gathers of constants are not."""
    found = []
    for graph in model.all_graphs():
        for node in graph.nodes:
            if node.op != "Gather" or not is_default_domain(node) or \
                    not isinstance(node.inputs[0], gs.Constant):
                continue
            table = node.inputs[0]
            value = np.asarray(table.values)
            if value.ndim != 2 or value.dtype not in (np.float32, np.float16):
                misses["table is not a 2-D float matrix"] += 1
            elif int(node.attrs.get("axis", 0)) != 0:
                misses["Gather along the table's columns"] += 1
            elif len(consumers(table)) > 1 or table in graph.outputs:
                misses["table also read elsewhere"] += 1
            else:
                found.append(Embedding(node, graph, value, table))
    return found


class QuantizeWeightInt4(CompressionPass):
    """Weight-only block quantization (int4/int8) of MatMul/Gemm weights and embedding
    tables, chosen per weight under the accuracy budget (a client of
    ``graphopt.compression``): each weight is a site whose settings are float (32 bits),
    int8 and int4 (with ``bits=4``). The core measures each weight's damage alone and
    gives the most bytes to the weights that cost the least accuracy; ``per_layer=false``
    quantizes every weight to ``bits`` (the result checked as a whole)."""

    name = "quantize-int4-weight"
    scheme = ("quantize", "int4-weight")
    scheme_order = 90  # after pruning and low-rank: quantize what is left
    family = "quantization"
    technique = "weight quantization"
    joinable = False  # it applies on the fused graph, after the structural passes
    recoverable = False  # GPTQ compensates its own rounding; no float re-fit
    # MatMulNBits / GatherBlockQuantized are emitted only where the target runs them.
    emits = (("", "DequantizeLinear"),)

    @dataclass(frozen=True)
    class Options:
        bits: int = 4                   # 4 or 8
        block_size: int = 32            # a power of two, >= 16
        symmetric: bool = False         # True: no zero points (code 2^(bits-1) is 0)
        method: str = "rtn"             # rtn | gptq | awq
        min_size: int = 4096            # weights with fewer elements stay float
        exclude: tuple[str, ...] = ()   # node or weight names (fnmatch patterns)
        format: str = "auto"            # auto | nbits (MatMulNBits) | qdq (DequantizeLinear)
        accuracy_level: int = 0         # MatMulNBits accuracy_level (4: int8 compute)
        damp: float = 0.1               # GPTQ damping, a fraction of mean(diag(H))
        clip_search: bool = True        # per block, shrink the range if that rounds better
        act_order: bool = True          # GPTQ: most active input channels first
        fold_bias: bool = True          # MatMulNBits takes a following Add's bias
        embeddings: bool = True         # also embedding tables (Gather of a constant)
        per_layer: bool = True          # bits per weight under the budget (else all)
        require_speedup: bool = False   # judge by the goal's latency, not by bytes

        def __post_init__(self) -> None:
            if self.bits not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, not {self.bits}")
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise ValueError(f"block_size must be a power of two >= 16, "
                                 f"not {self.block_size}")
            if self.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(METHODS)}, "
                                 f"not {self.method!r}")
            if self.format not in FORMATS:
                raise ValueError(f"format must be one of {', '.join(FORMATS)}, "
                                 f"not {self.format!r}")
            if not 0 <= self.accuracy_level <= 4:
                raise ValueError("accuracy_level must be 0..4")

    # ------------------------------------------------------------------ the contract
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        self._format_of = self._format(ctx)
        self._gather_format = self._embedding_format(ctx)
        self._blocks: dict = {}        # (site, bits, method, weight digest) -> Blocks
        self._statistics: tuple | None = None  # (hessians, means) by input name
        self._awq: dict = {}           # member node names -> scale or None
        if self._format_of is None:
            return PassResult(False, {"compression": {
                "technique": self.technique,
                "reason": "the target runs neither MatMulNBits nor DequantizeLinear"}})
        return super().run(model, ctx)

    def search_goal(self, ctx: PassContext) -> str:
        return ctx.goal if self.options.require_speedup else "size"

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        if self.options.per_layer:
            return None
        return {s.name: s.settings[-1] for s in sites}

    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        opts = self.options
        misses: Counter = Counter()
        refused: dict[str, str] = {}
        lins, embs = self._find(model, misses, refused)
        upgrade = None
        if self._needs_qdq(lins, embs) and model.opset < QDQ_OPSET:
            upgrade = upgrade_opset(model.clone(), QDQ_OPSET)
        settings = (32, 8, 4) if opts.bits == 4 else (32, 8)
        out = []
        for name, item in {**lins, **embs}.items():
            kind = "embedding" if isinstance(item, Embedding) else "weight"
            why = upgrade and f"blocked DequantizeLinear needs opset {QDQ_OPSET}: {upgrade}"
            if kind == "embedding" and self._gather_format is None:
                why = "the target runs neither GatherBlockQuantized nor DequantizeLinear"
            out.append(Site(name, kind, settings, (item.node.name,), item.k * item.n,
                            why or None, {"weight": item.source.name}))
        out.extend(Site(name, "weight", (32,), (name,), refused=why)
                   for name, why in refused.items())
        self._misses = dict(misses)
        return out

    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        opts = self.options
        chosen = {k: int(v) for k, v in choice.items() if int(v) != 32}
        stats: dict = {"quantized": 0, "block_size": opts.block_size}
        lins, embs = self._find(model, Counter(), {})
        if self._needs_qdq([lins[k] for k in chosen if k in lins],
                           [embs[k] for k in chosen if k in embs]) and \
                model.opset < QDQ_OPSET:
            why = upgrade_opset(model, QDQ_OPSET)
            if why:
                raise ValueError(f"blocked DequantizeLinear needs opset {QDQ_OPSET}: {why}")
            lins, embs = self._find(model, Counter(), {})
        method = opts.method
        if method != "rtn" and not ctx.calibration:
            stats["note"] = f"no calibration data: {method} fell back to rtn"
            method = "rtn"
        hessians, means = self._hessians(model, lins, ctx) if method != "rtn" else ({}, {})
        errors = {method: 0.0, "rtn": 0.0}  # tr(dW^T H dW), and what rtn would give
        for name, bits in chosen.items():
            lin = lins.get(name)
            if lin is not None and lin.x.name in hessians and \
                    hessians[lin.x.name].shape[0] == lin.k:
                weight = _effective_weight(lin)
                errors["rtn"] += output_error(weight, self._quantized(
                    name, weight, bits, "rtn", None, lin.weight.dtype).dequantize(),
                    hessians[lin.x.name])
        awq = self._apply_awq(model, {k: lins[k] for k in chosen if k in lins},
                              hessians, means, stats) if method == "awq" else {}
        names = tensor_names(model.all_graphs())
        node_names = {n.name for g in model.all_graphs() for n in g.nodes if n.name}
        before = after = 0
        used: Counter = Counter()
        by_bits: Counter = Counter()
        for name, bits in chosen.items():
            item = lins.get(name) or embs[name]
            if isinstance(item, Embedding):
                blocks = self._quantized(name, item.table.T.astype(np.float64), bits,
                                         "rtn", None, item.table.dtype)
                before += item.table.nbytes
                after += _emit_gather(model, item, blocks, names, node_names,
                                      self._gather_format)
                used["rtn"] += 1
            else:
                weight = _effective_weight(item)
                hessian = awq.get(id(item.node), hessians.get(item.x.name))
                if hessian is not None and hessian.shape[0] != item.k:
                    hessian = None  # (an earlier pass narrowed it)
                use = "gptq" if method == "gptq" and hessian is not None else "rtn"
                blocks = self._quantized(name, weight, bits, use, hessian, item.weight.dtype)
                used["awq" if id(item.node) in awq else use] += 1
                if hessian is not None:
                    errors[method] += output_error(weight, blocks.dequantize(), hessian)
                before += item.weight.nbytes
                after += _emit_nbits_node(model, item, blocks, names, node_names,
                                          opts.accuracy_level, opts.fold_bias) \
                    if self._format_of == "nbits" else \
                    _emit_qdq_node(item, blocks, names, node_names)
            by_bits[bits] += 1
        if hessians and method != "rtn":
            stats["proxy_output_error"] = {k: float(f"{v:.6g}") for k, v in errors.items()}
        stats.update(quantized=len(chosen), bits=dict(sorted(by_bits.items())),
                     embeddings=sum(1 for k in chosen if k in embs),
                     format=self._format_of, method=dict(used),
                     weight_bytes_before=before, weight_bytes_after=after)
        return Applied(stats)

    def not_sites(self) -> dict[str, int]:
        return self._misses

    # ------------------------------------------------------------------ selection
    def _format(self, ctx: PassContext) -> str | None:
        fmt = self.options.format
        if fmt in ("auto", "nbits") and ctx.supports("MatMulNBits", MICROSOFT):
            return "nbits"
        if fmt in ("auto", "qdq") and ctx.supports("DequantizeLinear", ""):
            return "qdq"
        return None

    def _embedding_format(self, ctx: PassContext) -> str | None:
        if not self.options.embeddings:
            return None
        fmt = self.options.format
        if fmt in ("auto", "nbits") and ctx.supports("GatherBlockQuantized", MICROSOFT):
            return "nbits"
        if fmt in ("auto", "qdq") and ctx.supports("DequantizeLinear", ""):
            return "qdq"
        return None

    def _needs_qdq(self, lins, embs) -> bool:
        return bool((lins and self._format_of == "qdq") or
                    (embs and self._gather_format == "qdq"))

    def _find(self, model: Model, misses: Counter, refused: dict
              ) -> tuple[dict[str, Linear], dict[str, Embedding]]:
        """The weights to quantize by site name; ``refused``: name -> why not."""
        opts = self.options
        fmt = self._format_of
        lins: dict[str, Linear] = {}
        embs: dict[str, Embedding] = {}
        found: list = list(linears(model, misses))
        if opts.embeddings:
            found += embeddings(model, misses)
        for item in found:
            names = (item.node.name or "", item.source.name or "")
            name = _site_name(item, lins, embs)
            if any(fnmatch.fnmatchcase(n, pat) for pat in opts.exclude for n in names if n):
                refused[name] = "excluded"
            elif item.k * item.n < opts.min_size:
                misses["smaller than min_size"] += 1
            elif isinstance(item, Embedding):
                if item.k % opts.block_size:
                    refused[name] = f"width {item.k} is not a multiple of block_size"
                else:
                    embs[name] = item
            elif fmt == "nbits" and item.node.op == "Gemm" and _gemm_bias(item) is False:
                refused[name] = "Gemm bias is not a constant vector"
            elif fmt == "nbits" and item.x.dtype is not None and \
                    np.dtype(item.x.dtype) != item.weight.dtype:
                refused[name] = "activation and weight types differ"
            else:
                lins[name] = item
        return lins, embs

    # ------------------------------------------------------------------ numbers
    def _quantized(self, name: str, weight: np.ndarray, bits: int, method: str,
                   hessian: np.ndarray | None, dtype: np.dtype) -> Blocks:
        """The blocks of ``weight`` ([K, N], float64), computed once per run."""
        opts = self.options
        digest = hashlib.blake2b(weight.tobytes(), digest_size=16).hexdigest()
        key = (name, bits, method, digest, weight.shape)
        if key not in self._blocks:
            ratios = CLIP_RATIOS if opts.clip_search else (1.0,)
            self._blocks[key] = gptq(weight, hessian, bits, opts.block_size, opts.symmetric,
                                     opts.damp, dtype, ratios, opts.act_order) \
                if method == "gptq" else \
                rtn(weight, bits, opts.block_size, opts.symmetric, dtype, ratios)
        return self._blocks[key]

    def _hessians(self, model: Model, lins: dict[str, Linear], ctx: PassContext
                  ) -> tuple[dict, dict]:
        """``H`` and mean |x| of each weight's input (main graph), captured once per run
        on the first model the pass applies to (the model the sites came from)."""
        if self._statistics is None:
            captured = [lin for lin in lins.values() if lin.graph is model.graph]
            self._statistics = collect_statistics(model, captured, ctx.calibration)
        return self._statistics

    def _apply_awq(self, model: Model, chosen: dict[str, Linear], hessians: dict,
                   means: dict, stats: dict) -> dict[int, np.ndarray]:
        """Activation-aware scales for the groups of chosen weights whose input can
        absorb them (searched once per group and run): the scaled nodes' ids, each with
        the Hessian of its rescaled input."""
        from graphopt.passes.smoothquant import apply_scales, smoothable_groups

        wanted = {id(lin.node): lin for lin in chosen.values()}
        scaled: dict[int, np.ndarray] = {}
        names = tensor_names(model.all_graphs())
        groups, _ = smoothable_groups(model)
        count = 0
        for group in groups:
            members = [wanted.get(id(lin.node)) for lin in group.linears]
            if any(m is None or m.x.name not in hessians for m in members) or \
                    group.x.name not in means:
                continue
            hessian = hessians[members[0].x.name]
            key = tuple(m.node.name for m in members)
            if key not in self._awq:
                self._awq[key] = awq_search(members, hessian, means[group.x.name],
                                            self.options)
            scale = self._awq[key]
            if scale is None:
                continue
            group.linears = members  # share the Linear objects: their weights get scaled
            apply_scales(group, scale, names)
            for lin in members:
                scaled[id(lin.node)] = hessian / np.outer(scale, scale)
            count += 1
        stats["awq_groups"] = count
        return scaled


def _site_name(item, lins: dict, embs: dict) -> str:
    name = item.node.name or item.source.name or "weight"
    base, i = name, 1
    while name in lins or name in embs:
        name, i = f"{base}#{i}", i + 1
    return name


def _effective_weight(lin: Linear) -> np.ndarray:
    """The [K, N] weight the node applies (a Gemm's alpha included), in float64."""
    weight = lin.weight.astype(np.float64)
    if lin.node.op == "Gemm":
        weight = weight * float(lin.node.attrs.get("alpha", 1.0))
    return weight


def awq_search(group: list[Linear], hessian: np.ndarray, mean_abs: np.ndarray,
               opts, grid: int = 20) -> np.ndarray | None:
    """The per-input-channel scale ``s = mean|x|^a`` (normalized) minimising the summed
    ``tr(dW^T H dW)`` over the weights of ``group``; None when ``a = 0`` is best."""
    weights = [_effective_weight(lin) for lin in group]
    magnitude = np.maximum(mean_abs.astype(np.float64), 1e-8)
    best, best_error = None, math.inf
    for step in range(grid + 1):
        alpha = step / grid
        scale = magnitude ** alpha
        scale = scale / math.sqrt(scale.max() * scale.min())
        error = 0.0
        for w in weights:
            q = rtn(w * scale[:, None], opts.bits, opts.block_size, opts.symmetric)
            error += output_error(w, q.dequantize() / scale[:, None], hessian)
        if error < best_error:
            best, best_error = (None if step == 0 else scale), error
    return best


def collect_statistics(model: Model, found: list[Linear], feeds) -> tuple[dict, dict]:
    """``H = 2 X^T X / n`` and mean |X| per input channel for the input ``X`` of each
    weight, over the calibration ``feeds``."""
    sums: dict[str, np.ndarray] = {}
    abs_sums: dict[str, np.ndarray] = {}
    rows: Counter = Counter()

    def consume(name: str, value: np.ndarray) -> None:
        x = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
        sums[name] = sums.get(name, 0.0) + x.T @ x
        abs_sums[name] = abs_sums.get(name, 0.0) + np.abs(x).sum(axis=0)
        rows[name] += x.shape[0]

    capture(model, [lin.x for lin in found], feeds, consume)
    hessians = {n: 2.0 * s / max(rows[n], 1) for n, s in sums.items()}
    means = {n: s / max(rows[n], 1) for n, s in abs_sums.items()}
    return hessians, means


# ====================================================================== rewriting
def _gemm_bias(lin: Linear) -> np.ndarray | None | bool:
    """A Gemm's ``beta * C`` as an [N] vector; None without C; False when C is not a
    constant that broadcasts as a vector."""
    node = lin.node
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return None
    value = constant_value(node.inputs[2])
    if value is None or value.size not in (1, lin.n) or value.ndim > 2 or \
            (value.ndim == 2 and value.shape[0] != 1):
        return False
    beta = float(node.attrs.get("beta", 1.0))
    return (np.broadcast_to(value.reshape(-1), (lin.n,)) * beta).astype(lin.weight.dtype)


def _add_bias(lin: Linear, graphs: list[gs.Graph]) -> tuple[gs.Node, np.ndarray] | None:
    """The Add that alone reads a MatMul's result and adds a constant [N] vector."""
    out = lin.node.outputs[0]
    readers = consumers(out)
    if len(readers) != 1 or any(out in g.outputs for g in graphs):
        return None
    add = readers[0]
    if add.op != "Add" or not is_default_domain(add) or len(add.inputs) != 2 or \
            not any(add is n for n in lin.graph.nodes):
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    value = constant_value(other)
    rank = len(out.shape) if out.shape is not None else None
    if value is None or value.dtype != lin.weight.dtype or value.size != lin.n or \
            value.shape[-1:] != (lin.n,) or rank is None or value.ndim > rank:
        return None
    return add, value.reshape(-1)


def _emit_nbits_node(model: Model, lin: Linear, blocks: Blocks, names: set[str],
                     node_names: set[str], accuracy_level: int, fold_bias: bool) -> int:
    packed, zeros = pack_nbits(blocks)
    hint = lin.source.name or lin.node.name or "weight"
    dtype = lin.weight.dtype
    scales = blocks.scales.T.astype(dtype)
    inputs = [lin.x, gs.Constant(unique_name(names, f"{hint}_Q{blocks.bits}"), packed),
              gs.Constant(unique_name(names, f"{hint}_scales"), np.ascontiguousarray(scales))]
    size = packed.nbytes + scales.nbytes
    if zeros is not None:
        inputs.append(gs.Constant(unique_name(names, f"{hint}_zero_points"), zeros))
        size += zeros.nbytes
    graphs = list(model.all_graphs())
    bias, output, removed = None, lin.node.outputs[0], [lin.node]
    if lin.node.op == "Gemm":
        bias = _gemm_bias(lin)
    elif fold_bias:
        found = _add_bias(lin, graphs)
        if found is not None:
            add, bias = found
            output = add.outputs[0]
            removed.append(add)
    if bias is not None:
        while len(inputs) < 5:
            inputs.append(gs.Variable.empty())
        inputs.append(gs.Constant(unique_name(names, f"{hint}_bias"),
                                  np.ascontiguousarray(bias.astype(dtype))))
    attrs = {"K": lin.k, "N": lin.n, "bits": blocks.bits, "block_size": blocks.block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    base = lin.node.name or "MatMul"
    node = gs.Node("MatMulNBits", name=unique_name(node_names, f"{base}_Q{blocks.bits}"),
                   domain=MICROSOFT, attrs=attrs, inputs=[], outputs=[])
    index = next(i for i, n in enumerate(lin.graph.nodes) if n is lin.node)
    for old in removed:
        old.outputs.clear()
    node.inputs.extend(inputs)
    node.outputs.append(output)
    for old in removed:
        remove_node(old, lin.graph)
    lin.graph.nodes.insert(min(index, len(lin.graph.nodes)), node)
    drop_feeders(lin)
    model.require_opset(MICROSOFT, 1)
    return size


def _emit_qdq_node(lin: Linear, blocks: Blocks, names: set[str], node_names: set[str]) -> int:
    codes, zeros = qdq_constants(blocks)
    hint = lin.source.name or lin.node.name or "weight"
    dtype = lin.weight.dtype
    quant = _subbyte_constant if blocks.bits == 4 else gs.Constant
    inputs = [quant(unique_name(names, f"{hint}_Q{blocks.bits}"), codes),
              gs.Constant(unique_name(names, f"{hint}_scale"),
                          np.ascontiguousarray(blocks.scales.astype(dtype)))]
    size = lin.k * lin.n * blocks.bits // 8 + inputs[1].values.nbytes
    if zeros is not None:
        inputs.append(quant(unique_name(names, f"{hint}_zero_point"), zeros))
        size += zeros.size * blocks.bits // 8
    weight = gs.Variable(unique_name(names, f"{hint}_dequantized"), dtype=dtype,
                         shape=[lin.k, lin.n])
    dq = gs.Node("DequantizeLinear",
                 name=unique_name(node_names, f"{lin.node.name or 'weight'}_DQ"),
                 attrs={"axis": 0, "block_size": blocks.block_size}, inputs=inputs,
                 outputs=[weight])
    lin.graph.nodes.append(dq)
    lin.node.inputs[1] = weight
    if lin.node.op == "Gemm":  # the dequantized weight is [K, N] and carries alpha
        lin.node.attrs["transB"] = 0
        lin.node.attrs["alpha"] = 1.0
    drop_feeders(lin)
    return size




def _emit_gather(model: Model, emb: Embedding, blocks: Blocks, names: set[str],
                 node_names: set[str], fmt: str) -> int:
    """Replace an embedding table [V, D] by its codes, quantized in blocks along D
    (``blocks`` quantized ``table.T``): ``com.microsoft.GatherBlockQuantized`` (``nbits``:
    only the gathered rows are dequantized) or ``DequantizeLinear`` (axis 1) feeding the
    Gather. Returns the bytes stored."""
    import ml_dtypes

    hint = emb.source.name or emb.node.name or "table"
    dtype = emb.table.dtype
    scales = gs.Constant(unique_name(names, f"{hint}_scales"),
                         np.ascontiguousarray(blocks.scales.T.astype(dtype)))  # [V, D/B]
    if fmt == "nbits":
        codes = blocks.codes[:blocks.k].T  # [V, D], unsigned
        zeros = None if blocks.symmetric else blocks.zero_points.T
        if blocks.bits == 4:  # int4 without zero points (0), uint4 with them
            kind = ml_dtypes.uint4
            if blocks.symmetric:
                codes, kind = codes.astype(np.int16) - 8, ml_dtypes.int4
            quant = _subbyte_constant
        else:  # uint8; without zero points ORT takes 128, the symmetric offset
            kind, quant = np.uint8, gs.Constant
        inputs = [quant(unique_name(names, f"{hint}_Q{blocks.bits}"),
                        np.ascontiguousarray(codes.astype(kind))),
                  emb.node.inputs[1], scales]
        if zeros is not None:
            inputs.append(quant(unique_name(names, f"{hint}_zero_points"),
                                np.ascontiguousarray(zeros.astype(kind))))
        node = gs.Node("GatherBlockQuantized", domain=MICROSOFT,
                       name=unique_name(node_names, f"{emb.node.name or 'Gather'}_Q"),
                       attrs={"bits": blocks.bits, "block_size": blocks.block_size,
                              "gather_axis": 0, "quantize_axis": 1},
                       inputs=[], outputs=[])
        index = next(i for i, n in enumerate(emb.graph.nodes) if n is emb.node)
        output = emb.node.outputs[0]
        emb.node.outputs.clear()
        node.inputs.extend(inputs)
        node.outputs.append(output)
        remove_node(emb.node, emb.graph)
        emb.graph.nodes.insert(min(index, len(emb.graph.nodes)), node)
        model.require_opset(MICROSOFT, 1)
    else:
        codes, zeros = qdq_constants(blocks)  # [D, V], [D/B, V]
        quant = _subbyte_constant if blocks.bits == 4 else gs.Constant
        inputs = [quant(unique_name(names, f"{hint}_Q{blocks.bits}"),
                        np.ascontiguousarray(codes.T)), scales]
        if zeros is not None:
            inputs.append(quant(unique_name(names, f"{hint}_zero_point"),
                                np.ascontiguousarray(zeros.T)))
        table = gs.Variable(unique_name(names, f"{hint}_dequantized"), dtype=dtype,
                            shape=list(emb.table.shape))
        emb.graph.nodes.append(gs.Node(
            "DequantizeLinear", name=unique_name(node_names, f"{emb.node.name or 'Gather'}_DQ"),
            attrs={"axis": 1, "block_size": blocks.block_size}, inputs=inputs,
            outputs=[table]))
        emb.node.inputs[0] = table
    v, d = emb.table.shape
    zero_bytes = 0 if blocks.symmetric else blocks.zero_points.size * blocks.bits // 8
    return v * d * blocks.bits // 8 + int(blocks.scales.size * dtype.itemsize) + zero_bytes
