"""``prune-ffn``: remove intermediate neurons of transformer feed-forward blocks.

A site is one FFN block (``passes.prune._blocks``: linear → GELU in any form → linear);
its settings are the numbers of neurons kept, rounded to a multiple (16: what GEMM
kernels like) for the ratios of the options. Removing neuron j drops column j of W1
(and b1, and any per-neuron constant of the activation such as BiasGelu's bias) and row
j of W2; every tensor between keeps its name, narrowed.

Importance, from calibration activations X of the intermediate tensor (the down
projection's input), computed once per run:

* ``wanda`` (default): ‖X_j‖₂ · ‖W2[j, :]‖₂, the size of what neuron j contributes;
* ``fluctuation`` (FLAP): Var(X_j) · ‖W2[j, :]‖₂², what is left of it after
  compensation (the part a bias cannot absorb);
* ``magnitude``: ‖W1[:, j]‖₂ · ‖W2[j, :]‖₂ (weights only);
* ``obs`` (ZipLM's structured Optimal Brain Surgeon, ``_obs``): neurons removed greedily
  by the output error left after the optimal re-fit of W2, from the Gram matrix of X.

``update`` (default, with data): W2's kept rows and b2 are re-fit by least squares from
the Gram matrix of X, so the kept neurons take over what the removed ones carried as
far as they correlate with them; otherwise ``compensate`` (FLAP): b2 += W2[removed, :]ᵀ ·
mean(X[removed]), so the block's output keeps its mean.

``allocate`` makes ``ratio`` a share of all blocks' neurons together (as many as the
ratio of each block would remove), placed by the core where the damage measured per
block is least (``CompressionPass.quota``; Kwon et al. 2022 and the 4,096-sentence
searches found MiniLM's last blocks far more sensitive than its middle ones). Under
recovery with too few calibration rows for the update, the blocks are scored alone with
a more damped re-fit standing in for the recovery's.
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
from graphopt.passes.prune._blocks import (Editor, FfnBlock, compensation, cut_and_refit,
                                           find_ffn_blocks, keep_count, narrow_region,
                                           tap_source, top)
from graphopt.passes.prune._gates import PointRunner, gates_score

IMPORTANCE = ("obs", "wanda", "fluctuation", "magnitude")
RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
PROXY_DAMP = 0.1  # ridge of a re-fit from too few rows, relative to the mean diagonal


class PruneFfn(CompressionPass):
    """Remove the least important intermediate neurons of transformer FFN blocks."""

    name = "prune-ffn"
    family = "pruning"
    technique = "prune"
    scheme = ("prune", "ffn")
    scheme_order = 10

    @dataclass(frozen=True)
    class Options:
        ratio: float | None = None  # one fraction for every block (None: searched)
        ratios: tuple[float, ...] = RATIOS
        multiple: int = 16  # neurons kept are a multiple of this (0: any count)
        importance: str = "obs"
        update: bool = True  # least-squares re-fit of the down projection (with data)
        compensate: bool = True  # mean compensation, when there is no update
        max_batches: int = 64  # calibration batches for the statistics
        # ``ratio`` of all blocks' neurons together, placed per block where the measured
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
                raise ValueError("allocate needs a ratio (the share of all neurons)")
            if self.multiple < 0 or self.max_batches < 1:
                raise ValueError("multiple must be >= 0 and max-batches >= 1")

    def __init__(self, options: Any = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self._scores: dict[str, np.ndarray] = {}
        self._means: dict[str, np.ndarray] = {}
        self._grams: dict[str, np.ndarray] = {}
        # Gram matrices too thin for the update, standing in (more damped) for the
        # recovery's re-fit when blocks are scored alone under recovery
        self._proxies: dict[str, np.ndarray] = {}
        self._method = self.options.importance
        self._ctx: PassContext | None = None

    # ------------------------------------------------------------------ contract
    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        self._ctx = ctx
        blocks = find_ffn_blocks(model.graph)
        self._importance(model, [b for b in blocks if b.reason is None], ctx)
        out = []
        for b in blocks:
            if b.reason is not None:
                out.append(Site(b.name, "neurons", (b.width,), b.nodes, b.width, b.reason))
                continue
            settings = tuple(sorted({keep_count(b.width, r, self.options.multiple)
                                     for r in (0.0, *self._ratios())}, reverse=True))
            out.append(Site(b.name, "neurons", settings, b.nodes, b.width,
                            info={"activation": b.activation.name}))
        return out

    def _ratios(self) -> tuple[float, ...]:
        """The ratios each block's settings come from; allocating, a finer grid (1/16
        steps up to twice the ratio) and the ratio itself."""
        if not self.options.allocate:
            return self.options.ratios
        top_ = min(15, int(np.ceil(32 * self.options.ratio)))
        return tuple(sorted({*self.options.ratios, self.options.ratio,
                             *(k / 16 for k in range(1, top_ + 1))}))

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        if self.options.ratio is None or self.options.allocate:
            return None
        return {s.name: keep_count(s.size, self.options.ratio, self.options.multiple)
                for s in sites}

    def quota(self, sites: list[Site]) -> Quota | None:
        """Allocating: as many neurons as ``ratio`` of every block would remove."""
        if not self.options.allocate:
            return None
        return Quota.of_counts(sites, lambda size: keep_count(size, self.options.ratio,
                                                              self.options.multiple))

    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        blocks = {b.name: b for b in find_ffn_blocks(model.graph)}
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
                raise ValueError(f"no FFN block {name!r}")
            if b.reason is not None:
                raise ValueError(f"FFN block {name} cannot be pruned: {b.reason}")
            count = int(count)
            if count >= b.width:
                continue
            kept = top(self._scores[name], count)
            if name in self._grams:
                kept_map.update(cut_and_refit(ed, b.down, self._grams[name], kept,
                                              lambda: prune_block(ed, b, kept, None)))
            else:
                kept_map.update(prune_block(ed, b, kept, self._means.get(name)
                                            if self.options.compensate else None))
            stats[name] = {"neurons": b.width, "kept": count}
        ed.finish()
        return Applied(stats, kept_map)

    def damages(self, model: Model, sites: list[Site], data: list,
                score: Callable[[list], float]) -> dict | None:
        """Each (block, setting) alone, in one session: the down projection's input is
        gated (x·mask + offset), which is exactly pruning with compensation."""
        proxy = bool(self._proxies) and self._ctx is not None and \
            self._ctx.recovery is not None
        if not gates_score(self._ctx, bool(self._grams) or proxy):
            return None
        active = [s for s in sites if s.name in self._scores]
        if not active:
            return None
        blocks = {b.name: b for b in find_ffn_blocks(model.graph)}
        points = {blocks[s.name].down.node.name: f"ffn{i}" for i, s in enumerate(active)}
        runner = PointRunner(model, points, data, matrix=bool(self._grams) or proxy)
        out = {}
        for i, s in enumerate(active):
            for count in s.settings[1:]:
                mask, offset = self.gate(s.name, s.size, int(count), proxy)
                out[(s.name, count)] = score(runner.run({f"ffn{i}": (mask, offset)}))
        return out

    def gate(self, name: str, width: int, count: int, proxy: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
        """(mask, offset) on a block's intermediate tensor that prune it to ``count``
        (with the re-fit, the mask is a matrix: ``_obs.gate``; ``proxy``: a damped re-fit
        from a thin Gram matrix stands in for the recovery's)."""
        if name in self._grams:
            return _obs.gate(self._grams[name], top(self._scores[name], count))
        if proxy and name in self._proxies:
            return _obs.gate(self._proxies[name], top(self._scores[name], count),
                             damp=PROXY_DAMP)
        mask = np.zeros(width)
        mask[top(self._scores[name], count)] = 1.0
        mean = self._means.get(name) if self.options.compensate else None
        offset = np.zeros(width) if mean is None else (1.0 - mask) * mean
        return mask, offset

    # ------------------------------------------------------------------ importance
    def _importance(self, model: Model, blocks: list[FfnBlock], ctx: PassContext) -> None:
        method = self.options.importance
        data = subset(ctx.calibration, self.options.max_batches)
        stats = {}
        gram = self.options.update or method == "obs"
        if data and blocks:
            names = [b.activation.name for b in blocks]
            stats = channel_stats(tap_source(model, ctx.reference, names),
                                  {n: -1 for n in names}, data, gram=gram)
        elif method != "magnitude":
            method = "magnitude"  # no data: weights only
        self._method = method
        for b in blocks:
            w2 = np.linalg.norm(b.down.weight.astype(np.float64), axis=1)
            st = stats.get(b.activation.name)
            if st is not None:
                self._means[b.name] = st.mean
                if gram:
                    h = _obs.augmented_gram(st)
                    if self.options.update and _obs.enough(st):
                        self._grams[b.name] = h
                    elif self.options.update:
                        self._proxies[b.name] = h
            if method == "obs":
                self._scores[b.name] = _obs.ranking(_obs.removal_order(
                    h, b.down.weight, b.down.bias))
            elif method == "wanda":
                self._scores[b.name] = st.norm * w2
            elif method == "fluctuation":
                self._scores[b.name] = st.var * w2 ** 2
            else:
                w1 = np.linalg.norm(b.up.weight.astype(np.float64), axis=0)
                self._scores[b.name] = w1 * w2


def prune_block(ed: Editor, b: FfnBlock, kept: np.ndarray,
                mean: np.ndarray | None) -> dict:
    """Keep neurons ``kept`` of block ``b``; with ``mean`` (of the intermediate tensor),
    compensate the removed ones in the down projection's bias. Returns the kept map."""
    removed = np.setdiff1d(np.arange(b.width), kept)
    delta = compensation(b.down, removed, mean) if mean is not None and len(removed) \
        else None
    ed.take(b.up.node, 1, kept, 1)
    kept_map = narrow_region(ed, b.region, kept)
    if delta is not None and np.any(delta):
        ed.add_bias(b.down, delta)
    return kept_map
