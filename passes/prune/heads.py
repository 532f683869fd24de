"""``prune-heads``: remove attention heads of transformer attention blocks.

A site is one attention block (``passes.prune._attention``: decomposed Q/K/V → heads →
merge, or com.microsoft Attention); its settings are the numbers of heads kept for the
ratios of the options. Removing head h drops its D columns of the Q, K and V weights and
biases (the packed QKV weight of a fused node) and its D rows of the output projection;
the Reshape targets [.., H, D] and [.., H·D] (or ``num_heads``) get the new count; the
residual stream keeps its width and every tensor keeps its name, narrowed.

Importance, from calibration data (computed once per run):

* ``ablation`` (default): each head switched off alone inside one ONNX Runtime session
  of the model (its context multiplied by 0 — plus its mean, with ``compensate`` —
  before the output projection, which is exactly what pruning it does), scored by the
  relative squared change of the model's outputs. It measures what matters, the
  effect at the output through every later layer, at one run over the data per head.
* ``norm``: ‖context_h‖ · ‖Wo[rows of h]‖ (centered with ``compensate``), from one run.
* ``obs``: ZipLM's structured Optimal Brain Surgeon on the output projection (``_obs``):
  heads removed greedily by the error left after the re-fit, from one run.

``update`` (default, with data): the output projection's kept rows and bias are re-fit
by least squares from the Gram matrix of its input (ablation then gates each head off
with that re-fit, again exactly what pruning does); otherwise ``compensate`` (FLAP): its
bias gets Wo[removed rows]ᵀ · mean(context[removed]), what the removed heads
contributed on average.

``allocate`` makes ``ratio`` a share of all blocks' heads together (as many as the ratio
of each block would remove), placed by the core where the damage measured per block is
least (``CompressionPass.quota``; every head count is a setting then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from graphopt.capture import channel_stats, subset
from graphopt.compression import Applied, CompressionPass, Quota, Site
from graphopt.ir import Model
from graphopt.pass_infra import PassContext
from graphopt.passes.prune import _obs
from graphopt.passes.prune._attention import (AttentionBlock, find_attention_blocks,
                                              set_entry, shape_tail)
from graphopt.passes.prune._blocks import (Editor, compensation, cut_and_refit, expand,
                                           narrow_dim, narrow_region, tap_source, top)
from graphopt.passes.prune._gates import PointRunner, gates_score

IMPORTANCE = ("ablation", "norm", "obs")
RATIOS = (0.0, 0.25, 0.5, 0.75)


class PruneHeads(CompressionPass):
    """Remove the least important attention heads of transformer attention blocks."""

    name = "prune-heads"
    family = "pruning"
    technique = "prune"
    scheme = ("prune", "heads")
    scheme_order = 10

    @dataclass(frozen=True)
    class Options:
        ratio: float | None = None  # one fraction for every block (None: searched)
        ratios: tuple[float, ...] = RATIOS
        importance: str = "ablation"
        update: bool = True  # least-squares re-fit of the output projection (with data)
        compensate: bool = True  # mean compensation, when there is no update
        max_batches: int = 64  # calibration batches for the context statistics
        ablation_batches: int = 4  # of those, batches each head's ablation runs on
        # ``ratio`` of all blocks' heads together, placed per block where the measured
        # damage is least (``CompressionPass.quota``), instead of ``ratio`` of each block
        allocate: bool = False

        def __post_init__(self):
            if self.importance not in IMPORTANCE:
                raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}")
            if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
                raise ValueError("ratio must be in [0, 1)")
            if not self.ratios or any(not 0.0 <= r < 1.0 for r in self.ratios):
                raise ValueError("ratios must be fractions in [0, 1)")
            if self.allocate and self.ratio is None:
                raise ValueError("allocate needs a ratio (the share of all heads)")
            if self.max_batches < 1 or self.ablation_batches < 1:
                raise ValueError("max-batches and ablation-batches must be >= 1")

    def __init__(self, options: Any = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self._scores: dict[str, np.ndarray] = {}
        self._means: dict[str, np.ndarray] = {}
        self._grams: dict[str, np.ndarray] = {}
        self._method = self.options.importance
        self._ctx: PassContext | None = None

    # ------------------------------------------------------------------ contract
    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        self._ctx = ctx
        blocks = find_attention_blocks(model.graph)
        self._importance(model, [b for b in blocks if b.reason is None], ctx)
        out = []
        for b in blocks:
            if b.reason is not None:
                out.append(Site(b.name, "heads", (b.heads,), b.nodes, b.heads or None,
                                b.reason))
                continue
            ratios = self.options.ratios if not self.options.allocate else \
                [k / b.heads for k in range(b.heads)]  # allocating: every count
            settings = tuple(sorted({keep_heads(b.heads, r) for r in (0.0, *ratios)},
                                    reverse=True))
            out.append(Site(b.name, "heads", settings, b.nodes, b.heads,
                            info={"kind": b.kind, "head_size": b.head_size}))
        return out

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        if self.options.ratio is None or self.options.allocate:
            return None
        return {s.name: keep_heads(s.size, self.options.ratio) for s in sites}

    def quota(self, sites: list[Site]) -> Quota | None:
        """Allocating: as many heads as ``ratio`` of every block would remove."""
        if not self.options.allocate:
            return None
        return Quota.of_counts(sites, lambda size: keep_heads(size, self.options.ratio))

    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        blocks = {b.name: b for b in find_attention_blocks(model.graph)}
        missing = [n for n in choice if n in blocks and blocks[n].reason is None
                   and n not in self._scores]
        if missing:
            self._importance(model, [blocks[n] for n in missing], ctx)
        ed = Editor(model.graph)
        stats: dict = {"importance": self._method}
        kept_map: dict = {}
        for name, count in choice.items():
            b = blocks.get(name)
            if b is None:
                raise ValueError(f"no attention block {name!r}")
            if b.reason is not None:
                raise ValueError(f"attention block {name} cannot be pruned: {b.reason}")
            count = int(count)
            if count >= b.heads:
                continue
            kept = top(self._scores[name], count)
            if name in self._grams:
                kept_map.update(cut_and_refit(ed, b.out, self._grams[name],
                                              expand(kept, b.head_size),
                                              lambda: prune_heads(ed, b, kept, None)))
            else:
                kept_map.update(prune_heads(ed, b, kept, self._means.get(name)
                                            if self.options.compensate else None))
            stats[name] = {"heads": b.heads, "kept": count,
                           "kept_heads": [int(k) for k in kept]}
        ed.finish()
        return Applied(stats, kept_map)

    def damages(self, model: Model, sites: list[Site], data: list,
                score: Callable[[list], float]) -> dict | None:
        """Each (block, heads kept) alone in one session (heads gated off before the
        output projection: exactly pruning them)."""
        if not gates_score(self._ctx, bool(self._grams)):
            return None
        active = [s for s in sites if s.name in self._scores]
        if not active:
            return None
        blocks = {b.name: b for b in find_attention_blocks(model.graph)}
        points = {blocks[s.name].out.node.name: f"heads{i}" for i, s in enumerate(active)}
        runner = PointRunner(model, points, data, matrix=bool(self._grams))
        out = {}
        for i, s in enumerate(active):
            b = blocks[s.name]
            for count in s.settings[1:]:
                kept = top(self._scores[s.name], int(count))
                out[(s.name, count)] = score(runner.run({f"heads{i}": self.gate(b, kept)}))
        return out

    def gate(self, b: AttentionBlock, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask, offset) on the output projection's input that keep heads ``kept``
        (with the re-fit, the mask is a matrix: ``_obs.gate``)."""
        if b.name in self._grams:
            return _obs.gate(self._grams[b.name], expand(kept, b.head_size))
        mask = np.zeros(b.heads * b.head_size)
        mask[expand(kept, b.head_size)] = 1.0
        mean = self._means.get(b.name) if self.options.compensate else None
        offset = np.zeros_like(mask) if mean is None else (1.0 - mask) * mean
        return mask, offset

    # ------------------------------------------------------------------ importance
    def _importance(self, model: Model, blocks: list[AttentionBlock],
                    ctx: PassContext) -> None:
        data = subset(ctx.calibration, self.options.max_batches)
        method = self.options.importance if data else "weights"
        self._method = method
        if not blocks:
            return
        if not data:  # no data: the output projection's rows per head
            for b in blocks:
                rows = np.linalg.norm(b.out.weight.astype(np.float64), axis=1)
                self._scores[b.name] = (rows ** 2).reshape(b.heads, b.head_size).sum(1)
            return
        names = [b.out.node.inputs[0].name for b in blocks]
        gram = self.options.update or method == "obs"
        stats = channel_stats(tap_source(model, ctx.reference, names),
                              {n: -1 for n in names}, data, gram=gram)
        for b, n in zip(blocks, names):
            st = stats[n]
            self._means[b.name] = st.mean
            if gram:
                h = _obs.augmented_gram(st)
                if self.options.update and _obs.enough(st):
                    self._grams[b.name] = h
            if method == "obs":
                self._scores[b.name] = _obs.ranking(_obs.removal_order(
                    h, b.out.weight, b.out.bias, group=b.head_size))
                continue
            energy = st.var if self.options.compensate else st.sumsq / max(st.count, 1)
            rows = np.linalg.norm(b.out.weight.astype(np.float64), axis=1)
            self._scores[b.name] = np.sqrt(energy.reshape(b.heads, -1).sum(1)) * \
                np.sqrt((rows ** 2).reshape(b.heads, -1).sum(1))
        if method == "ablation":
            self._ablate(model, blocks, subset(data, self.options.ablation_batches))

    def _ablate(self, model: Model, blocks: list[AttentionBlock], data: list) -> None:
        points = {b.out.node.name: f"heads{i}" for i, b in enumerate(blocks)}
        runner = PointRunner(model, points, data, matrix=bool(self._grams))
        for i, b in enumerate(blocks):
            scores = np.zeros(b.heads)
            for h in range(b.heads):
                kept = np.array([k for k in range(b.heads) if k != h])
                scores[h] = runner.error({f"heads{i}": self.gate(b, kept)})
            self._scores[b.name] = scores


def keep_heads(heads: int, ratio: float) -> int:
    """Heads kept when ``ratio`` of ``heads`` go (at least one)."""
    return int(min(heads, max(1, round(heads * (1.0 - ratio)))))


def prune_heads(ed: Editor, b: AttentionBlock, kept: np.ndarray,
                mean: np.ndarray | None) -> dict:
    """Keep heads ``kept`` of block ``b``; with ``mean`` (of the output projection's
    input), compensate the removed ones in its bias. Returns the kept map."""
    h, d = len(kept), b.head_size
    cols = expand(kept, d)
    removed = np.setdiff1d(np.arange(b.heads * d), cols)
    delta = compensation(b.out, removed, mean) if mean is not None else None
    kept_map: dict = {}
    if b.kind == "fused":
        node = b.node
        sizes = list(node.attrs.get("qkv_hidden_sizes", []) or []) or \
            [b.heads * d] * 3
        offsets = np.cumsum([0] + sizes[:2])
        packed = np.concatenate([o + expand(kept, s // b.heads)
                                 for o, s in zip(offsets, sizes)])
        ed.take(node, 1, packed, 1)
        if len(node.inputs) > 2 and node.inputs[2].name:
            ed.take(node, 2, packed, -1)
        if len(node.inputs) > 5 and node.inputs[5].name:  # attention bias [.., H, S, S]
            ed.take(node, 5, kept, -3)
        node.attrs["num_heads"] = h
        if node.attrs.get("qkv_hidden_sizes"):
            node.attrs["qkv_hidden_sizes"] = [s // b.heads * h for s in sizes]
    else:
        for lin in b.projections:
            ed.take(lin.node, 1, cols, 1)
            if lin.bias_add is not None:
                ed.take(lin.bias_add, lin.bias_index, cols, -1)
            for t in lin.outputs:
                narrow_dim(t, -1, h * d)
                kept_map[t.name] = (-1, cols)
        for split in b.splits:
            (value, where), _ = shape_tail(split, 2)
            if value > 0:
                set_entry(ed, where, h)
        for tensor, axis in b.axes:
            narrow_dim(tensor, axis, h)
            kept_map[tensor.name] = (axis, np.asarray(kept))
        for node, i, axis in b.head_params:
            ed.take(node, i, kept, axis)
        value, where = shape_tail(b.merge, 1)[0]
        if value > 0:
            set_entry(ed, where, h * d)
    kept_map.update(narrow_region(ed, b.context, cols))
    if delta is not None and np.any(delta):
        ed.add_bias(b.out, delta)
    return kept_map
