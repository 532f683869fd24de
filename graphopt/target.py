"""The target interface: what a backend runs, how it lowers a model, how it runs the result.

Targets are plugins (entry-point group ``graphopt.targets``). The difference between
targets lives here, in data on each target, never in ``if target == ...`` chains.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from graphopt.cost import Device
from graphopt.ir import Model


@dataclass(frozen=True)
class Capabilities:
    """What a target runs. ``ops=None`` means every op of the listed domains."""

    domains: frozenset[str] = frozenset({""})
    ops: frozenset[tuple[str, str]] | None = None
    dtypes: frozenset[str] = frozenset({"float32"})

    def supports(self, op_type: str, domain: str = "") -> bool:
        domain = "" if domain == "ai.onnx" else domain
        if domain not in self.domains:
            return False
        return self.ops is None or (domain, op_type) in self.ops


@dataclass
class Artifact:
    """What ``lower`` produced: the main file plus everything written beside it."""

    target: str
    path: Path
    files: list[Path] = field(default_factory=list)
    format: str = "onnx"


class Target(ABC):
    """Base class of every target plugin."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    produces: ClassVar[str] = "an optimized .onnx file"
    device: ClassVar[Device]
    capabilities: ClassVar[Capabilities] = Capabilities()
    default_pipeline: ClassVar[tuple[str, ...]] = ()
    # Artifact formats ``lower(..., format=F)`` accepts (``--format``), the default first;
    # empty: the target has one format and ``lower`` takes no ``format`` keyword.
    formats: ClassVar[tuple[str, ...]] = ()

    def supports(self, op_type: str, domain: str = "") -> bool:
        return self.capabilities.supports(op_type, domain)

    def availability(self) -> str | None:
        """``None`` when the backend can be used here, else what to install."""
        return None

    def prepare(self, model: Model, input_shapes: dict[str, list[int]] | None) -> None:
        """Adapt the working copy in place before the pipeline runs. ``input_shapes`` are
        the shapes given for probing (``--input-shape``); a compiler that wants static
        shapes may fix them here so the pipeline folds the shape arithmetic. Default:
        nothing."""

    @abstractmethod
    def lower(self, model: Model, out: Path) -> Artifact:
        """Write the artifact for ``model`` at ``out``."""

    @abstractmethod
    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the artifact here on ``feeds`` and return its outputs by name."""
