"""Weight-only block quantization of MatMul/Gemm weights and embedding tables
(``quantize-int4-weight``).

Each constant [K, N] weight is cut into blocks of ``block_size`` consecutive rows (input
features) per output column; a block stores ``bits``-bit codes, one scale and (unless
``symmetric``) one zero point: ``w ≈ (code - zero_point) * scale``. Activations stay in
float; only the weights shrink (int4, block 32: 4.5 bits a weight with the fp32 scale
and the 4-bit zero point, 0.16x of float32). An embedding table [V, D] read by a Gather
is cut the same way along D, one row's blocks at a time (``embeddings``).

Which weights shrink, and to how many bits, is chosen per weight under the accuracy
budget: the pass is a client of ``graphopt.compression``. Each weight is a site whose
settings are float, int8 and (``bits=4``) int4; the core measures each setting's damage
alone with the run's metric and gives the bits to the weights that cost the least
accuracy per byte saved (``require_speedup``: per predicted second saved, for the goal
latency), so a few sensitive weights stay int8 or float where all-int4 would break the
budget. ``per_layer=false`` puts every weight at ``bits`` (checked as a whole).

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
* embedding tables: ``com.microsoft.GatherBlockQuantized`` where the target runs it
  (only the gathered rows are dequantized), else ``DequantizeLinear`` (axis 1) feeding
  the Gather. A table that something else reads too (an output projection tied to it)
  stays float.

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
more damping generalizes better), so GPTQ is the default wherever there is calibration
data. ``benchmarks/quant_weight.py`` has the full table.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.compression import Applied, CompressionPass, Site
from graphopt.ir import Model
from graphopt.pass_infra import PassContext, PassResult
from graphopt.passes._patterns import MICROSOFT, upgrade_opset
from graphopt.passes.quantize._weight_blocks import CLIP_RATIOS, Blocks, gptq, output_error, rtn
from graphopt.passes.quantize._weight_emit import (Embedding, embeddings, emit_gather, emit_nbits,
                                          emit_qdq, gemm_bias)
from graphopt.passes.quantize._weights import Linear, capture, linears
from graphopt.rewrite import tensor_names

METHODS = ("rtn", "gptq", "awq")
FORMATS = ("auto", "nbits", "qdq")
QDQ_OPSET = 21  # DequantizeLinear with int4 and block_size


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
        method: str = "gptq"            # rtn | gptq | awq (rtn without calibration data)
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
        self._gather_format = self._format(ctx, "GatherBlockQuantized") \
            if self.options.embeddings else None
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
                after += emit_gather(model, item, blocks, names, node_names,
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
                after += emit_nbits(model, item, blocks, names, node_names,
                                          opts.accuracy_level, opts.fold_bias) \
                    if self._format_of == "nbits" else \
                    emit_qdq(item, blocks, names, node_names)
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
    def _format(self, ctx: PassContext, contrib_op: str = "MatMulNBits") -> str | None:
        """``nbits`` where the target runs ``contrib_op`` (com.microsoft), else ``qdq``
        where it runs DequantizeLinear, as the ``format`` option allows; else None."""
        fmt = self.options.format
        if fmt in ("auto", "nbits") and ctx.supports(contrib_op, MICROSOFT):
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
            elif fmt == "nbits" and item.node.op == "Gemm" and gemm_bias(item) is False:
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
        from graphopt.passes.quantize.smoothquant import apply_scales, smoothable_groups

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
