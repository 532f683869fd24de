"""Budgeted compression: the contract every lossy compression pass is a client of.

A compression pass (pruning, low-rank, sparsity, a plugin's own technique) says only two
things: which **sites** a model has (a channel group, a head group, a layer's rank) with
the **settings** each can take, and how to **apply** chosen settings to a model. The core
does the rest, the same way for every technique:

1. measures the damage of each (site, setting) alone with the one accuracy metric
   (``graphopt.metric``) on the validation (else calibration) data, and what it saves by
   the cost model (latency on the target's device, FLOPs, parameters);
2. searches the settings: each site takes its strongest setting whose damage per unit
   saved is below a threshold; the threshold is bisected so the combined model, after
   recovery, meets the budget (every model it returns was measured to meet it); then
   what is left of the budget is spent one site's next setting at a time, best deals
   first, each step measured on the whole model (sites interact);
3. recovers each candidate before measuring it (``PassContext.recovery``: a pass of the
   recovery family re-fits the changed layers to the original model's outputs);
4. reports, per site: technique, setting, size before/after, damage alone, FLOPs and
   parameters saved, predicted latency change; and the measured score of the result.

A pass that takes a fixed setting from its options (``fixed_choice``), or is given a
previous run's settings (``PassContext.replay``, ``graphopt.replay``), skips the search;
its result is still recovered, measured and reported. A pass whose options fix how much
the whole model gives up but not where (``quota``: e.g. 40% of all FFN neurons) has the
core place it: each (site, setting) measured alone, then the settings that remove the
quota at the least summed damage (an exact multiple-choice knapsack over the measured
settings); the result is recovered, measured and reported, not held to the budget.

Optional hooks make a technique cheaper or stricter to drive without changing the
search: ``damages`` (every site's damage from one ONNX Runtime session), ``savings``
(what a setting saves, known without building a model), ``optimistic`` (measure every
site at its strongest setting at once first), ``evaluation_modes`` (measure with ONNX
Runtime's fused kernels too) and ``min_top1`` (a top-1 agreement to keep as well). The
search itself lives in ``graphopt.compression_driver``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from graphopt.cost import tensor_bytes
from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult

Kept = dict[str, tuple[int, np.ndarray]]


@dataclass
class Site:
    """A place a compression pass can compress, and the settings it can take.

    ``settings[0]`` leaves the site unchanged; the rest go from mildest to strongest.
    A ``refused`` site is listed in the report with the reason and never applied."""

    name: str
    kind: str
    settings: tuple = ()
    nodes: tuple[str, ...] = ()
    size: int | None = None
    refused: str | None = None
    info: dict = field(default_factory=dict, repr=False)

    @property
    def searchable(self) -> bool:
        return self.refused is None and len(self.settings) > 1


@dataclass(frozen=True)
class Saving:
    """What one (site, setting) saves against the site unchanged: predicted seconds on
    the target's device, FLOPs, parameters, and bytes of the weights as stored."""

    seconds: float = 0.0
    flops: float = 0.0
    params: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Quota:
    """How much of the whole model a pass's options remove, for the core to place where
    it hurts least: ``total`` units over all sites, ``removed(site, setting)`` the units
    one site's setting removes (e.g. neurons: the site's width minus the count kept)."""

    total: float
    removed: Callable[[Site, Any], float]

    @classmethod
    def of_counts(cls, sites: list["Site"], kept: Callable[[int], int]) -> "Quota":
        """For settings that are the count a site keeps (neurons, heads): as many units
        as keeping ``kept(size)`` of every site removes."""
        return cls(sum(s.size - kept(s.size) for s in sites),
                   lambda site, count: site.size - int(count))


@dataclass
class Applied:
    """What ``CompressionPass.apply`` did: stats for the report, and every tensor it
    narrowed: name -> (axis, indices kept, into that tensor as it was before the pass)."""

    stats: dict = field(default_factory=dict)
    kept: Kept = field(default_factory=dict)


class CompressionPass(Pass):
    """Base class of lossy compression passes (see the module docstring)."""

    lossless = False
    technique: ClassVar[str] = "compress"
    # Whether ``join_compression`` may search this pass's sites together with its
    # neighbours' (a pass that cannot apply on top of another's narrowing says no).
    joinable: ClassVar[bool] = True
    # Whether the recovery pass re-fits what this pass changed (a quantizer that rounds
    # with its own error compensation, GPTQ, is not re-fitted in float).
    recoverable: ClassVar[bool] = True
    # Whether the core first measures every site at its strongest setting that saves
    # anything, as one model, and stops there when it meets the budget: for techniques
    # that usually damage little everywhere (int8), measuring each site alone first
    # would run the data once per site for nothing.
    optimistic: ClassVar[bool] = False
    # Whether candidates are measured on the batches the pass manager checks the result
    # on (``PassContext.check_feeds``, against the original's outputs there), so the
    # manager takes the measured outputs instead of running the result again.
    measures_check_feeds: ClassVar[bool] = False

    def search_goal(self, ctx: PassContext) -> str:
        """What a site's setting is judged to save (``latency``, ``flops``, ``size``):
        the run's goal, unless the pass serves another (weight-only quantization saves
        bytes whatever the goal, unless told to be faster too)."""
        return ctx.goal

    @abstractmethod
    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        """Every site of ``model``, refused ones with their reason."""

    @abstractmethod
    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        """Give each site named in ``choice`` that setting, editing ``model`` in place."""

    def damages(self, model: Model, sites: list[Site], data: list,
                score: Callable[[list], float]) -> dict[tuple[str, Any], float] | None:
        """Optional: the score of every (site, setting) alone, measured faster than one
        model per pair (e.g. masks or switches in one ONNX Runtime session):
        ``score(outputs)`` turns the outputs of a run over ``data`` (one dict per batch)
        into the metric's score. ``None`` (default): the core builds and measures each
        pair. Pairs left out are built and measured by the core."""
        return None

    def savings(self, model: Model, sites: list[Site], ctx: PassContext
                ) -> dict[tuple[str, Any], Saving] | None:
        """Optional: what each (site, setting) saves, known without building a model per
        pair (e.g. the cost model's time per layer). ``None`` (default): the core builds
        each pair and costs the whole model."""
        return None

    def evaluation_modes(self, ctx: PassContext) -> tuple[bool, ...]:
        """ONNX Runtime graph optimizations each candidate is measured with, the worse
        score counting: ``(False,)`` the graph as written (default); a pass whose result
        ONNX Runtime runs through fused kernels with other numerics (int8's saturating
        sums) adds ``True``."""
        return (False,)

    def min_top1(self, ctx: PassContext) -> float | None:
        """A top-1 agreement with the original ([batch, classes] outputs) the result must
        keep besides the metric's budget (``None``: none)."""
        return None

    def not_sites(self) -> dict[str, int]:
        """Optional: places that are not sites at all, counted by why (e.g. a MatMul of
        two activations has no weight to quantize), after ``sites``; for the report."""
        return {}

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        """The settings the options fix (e.g. one ratio for every site), or ``None`` to let
        the core search them under the budget."""
        return None

    def quota(self, sites: list[Site]) -> Quota | None:
        """The amount the options fix for the whole model but not per site (``None``,
        default: none). Asked only when ``fixed_choice`` fixes nothing."""
        return None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from graphopt.compression_driver import Driver

        return Driver(self, ctx).run(model)


def weight_bytes(model: Model) -> int:
    """Bytes the model's constants take as stored (4-bit types packed two a byte)."""
    return sum(tensor_bytes(t) for t in model.initializers())


def nearest_setting(site: Site, value: float) -> Any:
    """The setting of ``site`` closest to ``value`` (numeric settings)."""
    return min(site.settings, key=lambda s: (abs(float(s) - value), -float(s)))


def compose_kept(earlier: Kept, later: Kept) -> Kept:
    """Narrowings of two passes in a row as one map into the original tensors."""
    out = dict(earlier)
    for name, (axis, idx) in later.items():
        if name in earlier:
            first_axis, first = earlier[name]
            out[name] = (axis, np.asarray(first)[np.asarray(idx)])
        else:
            out[name] = (axis, np.asarray(idx))
    return out
