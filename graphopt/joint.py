"""Joint compression: several compression passes searched as one under one budget
(``JointCompression``), and the pipeline step that forms them from consecutive
compression passes (``join_compression``). See ``graphopt.compression``."""

from __future__ import annotations

from typing import Any, Mapping

from graphopt.compression import Applied, CompressionPass, Site, compose_kept
from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext


class JointCompression(CompressionPass):
    """Several compression passes searched as one: their sites compete for one budget
    (a site of one pass may be worth more than a site of another), then each pass applies
    its share of the choice, in order. The pipeline forms it from consecutive compression
    passes, so ``--prune ffn,heads`` spends the budget where it buys the most."""

    family = "compression"

    def __init__(self, parts: list[CompressionPass]):
        super().__init__()
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.technique = "+".join(dict.fromkeys(p.technique for p in self.parts))

    def _split(self, name: str) -> tuple[CompressionPass, str]:
        prefix, _, rest = name.partition(":")
        return next(p for p in self.parts if p.name == prefix), rest

    def sites(self, model: Model, ctx: PassContext) -> list[Site]:
        out = []
        for part in self.parts:
            for site in part.sites(model, ctx):
                out.append(Site(f"{part.name}:{site.name}", site.kind, site.settings,
                                site.nodes, site.size, site.refused,
                                {**site.info, "technique": part.technique}))
        return out

    def apply(self, model: Model, choice: Mapping[str, Any], ctx: PassContext) -> Applied:
        stats, kept = {}, {}
        for part in self.parts:
            mine = {self._split(k)[1]: v for k, v in choice.items()
                    if self._split(k)[0] is part}
            if not mine:
                continue
            applied = part.apply(model, mine, ctx)
            stats[part.name] = applied.stats
            kept = compose_kept(kept, applied.kept)
        return Applied(stats, kept)

    def fixed_choice(self, sites: list[Site]) -> dict[str, Any] | None:
        fixed = {}
        for part in self.parts:
            mine = [s for s in sites if s.name.startswith(part.name + ":")]
            local = [Site(s.name.partition(":")[2], s.kind, s.settings, s.nodes, s.size,
                          s.refused, s.info) for s in mine]
            choice = part.fixed_choice(local)
            if choice is None:
                return None  # one part searches: all search together
            fixed.update({f"{part.name}:{k}": v for k, v in choice.items()})
        return fixed


def join_compression(passes: list[Pass]) -> list[Pass]:
    """``passes`` with each run of two or more consecutive compression passes joined into
    one ``JointCompression``."""
    out: list[Pass] = []
    run: list[CompressionPass] = []

    def flush():
        if len(run) > 1:
            out.append(JointCompression(run.copy()))
        else:
            out.extend(run)
        run.clear()

    for p in passes:
        if isinstance(p, CompressionPass) and not isinstance(p, JointCompression) \
                and p.joinable:
            run.append(p)
        else:
            flush()
            out.append(p)
    flush()
    return out
