"""``recover``: the recovery pass (least-squares re-fit of changed layers, see
``passes.recover.refit``). The budgeted-compression driver runs it on every compressed
candidate (``PassContext.recovery``); in a pipeline it re-fits against the original."""

from __future__ import annotations

from dataclasses import dataclass, replace

from graphopt.augment import embedding_tables, variants
from graphopt.capture import subset
from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes.recover.refit import refit
from graphopt.passes.recover.targets import Teacher


class Recover(Pass):
    """Re-fit compressed layers so they reproduce the original model's outputs."""

    name = "recover"
    family = "recovery"
    lossless = False

    @dataclass(frozen=True)
    class Options:
        ridge: float = 1e-2  # λ as a fraction of the mean diagonal of X̃ᵀX̃
        choose_ridge: bool = True  # per layer, from a grid, on held-out batches
        max_batches: int = 64  # calibration batches used, at most
        bias_only: bool = False  # correct biases only (b += E[y_orig − y_comp])
        scope: str = "downstream"  # or "changed": only the layers compression changed
        prior: str = "current"  # the ridge shrinks towards the compressed weights, or "zero"
        # variants of each batch fitted too (token inputs: graphopt.augment); the ranking
        # of sites alone (quick()) fits the real batches only
        augment: int = 0

        def __post_init__(self):
            if not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
                raise ValueError(f"ridge must be a number >= 0, not {self.ridge!r}")
            if not (isinstance(self.max_batches, int) and self.max_batches >= 1):
                raise ValueError(f"max-batches must be an integer >= 1, not "
                                 f"{self.max_batches!r}")
            if not isinstance(self.choose_ridge, bool):
                raise ValueError(f"choose-ridge must be true or false, not "
                                 f"{self.choose_ridge!r}")
            if not (isinstance(self.augment, int) and self.augment >= 0):
                raise ValueError(f"augment must be an integer >= 0, not {self.augment!r}")
            if not isinstance(self.bias_only, bool):
                raise ValueError(f"bias-only must be true or false, not {self.bias_only!r}")
            if self.scope not in ("downstream", "changed"):
                raise ValueError(f"scope must be downstream or changed, not {self.scope!r}")
            if self.prior not in ("current", "zero"):
                raise ValueError(f"prior must be current or zero, not {self.prior!r}")

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        # The original's activations, kept across the candidates the driver recovers.
        self._teacher: Teacher | None = None
        self._variants: tuple | None = None  # (real batches, reference, seed, all, origins)

    def quick(self) -> "Recover":
        """The cheaper variant the compression driver ranks sites alone with: only the
        layers compression changed are re-fitted (a wave or two instead of every layer
        downstream), sharing this pass's cached original
        activations."""
        fast = Recover(replace(self.options, scope="changed", augment=0))
        fast._teacher = self._teacher
        return fast

    def _augmented(self, data: list[dict], reference, seed: int
                   ) -> tuple[list[dict], list[int]]:
        """``data`` and ``augment`` variants of each batch (``graphopt.augment``: none
        for a model without token inputs), with each batch's origin (the index of its
        real batch); the same objects for the same batches, so the teacher's values on
        them serve again."""
        cached = self._variants
        if cached is not None and cached[1] is reference and cached[2] == seed and \
                len(cached[0]) == len(data) and all(a is b for a, b in zip(cached[0], data)):
            return cached[3], cached[4]
        tables = embedding_tables(reference)
        extra = variants(data, list(tables), self.options.augment, seed=seed, tables=tables)
        out = list(data) + extra
        origins = list(range(len(data))) + [k % len(data) for k in range(len(extra))]
        self._variants = (list(data), reference, seed, out, origins)
        return out, origins

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        reference = getattr(ctx, "reference", None)
        if reference is None:
            return PassResult(False, {"reason": "no original model to recover towards"})
        if not ctx.calibration:
            return PassResult(False, {"reason": "no calibration data"})
        data = subset(ctx.calibration, self.options.max_batches)
        origins = None
        if self.options.augment:
            data, origins = self._augmented(data, reference, ctx.seed)
        if self._teacher is None or not self._teacher.serves(reference, data):
            self._teacher = Teacher(reference, data)
        layers = refit(reference, model, dict(getattr(ctx, "kept", None) or {}), data,
                       ridge=float(self.options.ridge), bias_only=self.options.bias_only,
                       scope=self.options.scope, prior=self.options.prior,
                       teacher=self._teacher, choose_ridge=self.options.choose_ridge,
                       origins=origins)
        changed = any(v.get("error_after", 1.0) < v.get("error_before", 1.0)
                      for v in layers.values())
        stats = {"layers": layers}
        if origins is not None:
            stats["augmented_batches"] = len(data) - len(set(origins))
        return PassResult(changed, stats)
