"""``recover``: the recovery pass (least-squares re-fit of changed layers, see
``passes.recover.refit``). The budgeted-compression driver runs it on every compressed
candidate (``PassContext.recovery``); in a pipeline it re-fits against the original."""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes.recover.refit import refit


class Recover(Pass):
    """Re-fit compressed layers so they reproduce the original model's outputs."""

    name = "recover"
    family = "recovery"
    lossless = False

    @dataclass(frozen=True)
    class Options:
        ridge: float = 1e-2  # λ as a fraction of the mean diagonal of X̃ᵀX̃
        max_batches: int = 64
        bias_only: bool = False
        scope: str = "downstream"  # or "changed": only the layers compression changed

        def __post_init__(self):
            if self.ridge < 0 or self.max_batches < 1:
                raise ValueError("ridge must be >= 0 and max-batches >= 1")
            if self.scope not in ("downstream", "changed"):
                raise ValueError("scope must be downstream or changed")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if ctx.reference is None:
            return PassResult(False, {"reason": "no original model to recover towards"})
        if not ctx.calibration:
            return PassResult(False, {"reason": "no calibration data"})
        layers = refit(ctx.reference, model, ctx.kept or {},
                       list(ctx.calibration[: self.options.max_batches]),
                       ridge=self.options.ridge, bias_only=self.options.bias_only,
                       scope=self.options.scope)
        changed = any(v.get("error_after", 1.0) < v.get("error_before", 1.0)
                      for v in layers.values())
        return PassResult(changed, {"layers": layers})
