"""The pass API: what a pass is, what it receives and what it returns.

A pass is a small class::

    class EliminateIdentity(Pass):
        name = "eliminate-identity"
        family = "cleanup"
        lossless = True

        @dataclass(frozen=True)
        class Options:
            keep_dropout: bool = False

        def run(self, model, ctx) -> PassResult:
            ...
            return PassResult(changed=removed > 0, stats={"removed": removed})

A pass does one thing. It never verifies itself, prints, or reads global state: the
``PassManager`` owns verification, iteration, timing and logging.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from graphopt.errors import UsageError

if typing.TYPE_CHECKING:
    import onnx

    from graphopt.cost import CostModel, Device
    from graphopt.metric import Metric
    from graphopt.ir import Model
    from graphopt.target import Target


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    # A lossy pass that measured the very model it returns on ``ctx.check_feeds`` (ONNX
    # Runtime, rewrites off) hands those outputs over: the manager's check scores them
    # instead of running the model again. (The final verification runs it regardless.)
    outputs: list[dict[str, np.ndarray]] | None = None


@dataclass
class PassContext:
    """Everything a pass may consult, passed in explicitly (never global)."""

    target: "Target | None" = None
    cost_model: "CostModel | None" = None
    device: "Device | None" = None
    calibration: list[dict[str, np.ndarray]] | None = None
    # Data a lossy pass measures its damage on (default: ``calibration``), and the
    # accuracy budget: the minimum output cosine similarity to the original.
    validation: list[dict[str, np.ndarray]] | None = None
    tolerance: float | None = None
    # The one accuracy metric of lossy passes (graphopt.metric; None: the default), the
    # original model lossy passes are judged against, and what compression optimizes for
    # ("latency" on the device by the cost model, "flops" or "size").
    metric: "Metric | None" = None
    reference: "onnx.ModelProto | None" = None
    goal: str = "latency"
    # The input shapes costs are estimated at (the verification inputs': --data,
    # --input-shape or the probes'), for passes that choose by cost per layer.
    input_shapes: dict[str, list[int]] | None = None
    # The recovery pass run on every compressed candidate (None: no recovery), and the
    # tensors compression narrowed so far: name -> (axis, indices into the original).
    recovery: "Pass | None" = None
    kept: dict = field(default_factory=dict)
    seed: int = 0
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("graphopt"))
    # Told how a long step advances: (what, done, total; total 0 when not known ahead).
    # The CLI shows it with the time left; library callers pass their own (or nothing).
    progress: Callable[[str, int, int], None] | None = None
    # What the pass manager checks lossy passes on (and the result is verified on), and
    # the outputs of the model it started from on them (ORT, rewrites off): set before
    # the first pass runs when numbers can be checked. A lossy pass that measures its
    # candidates on these batches needs no reference run of its own.
    check_feeds: list[dict[str, np.ndarray]] | None = None
    check_reference: list[dict[str, np.ndarray]] | None = None
    # The outputs on ``check_feeds`` of the model a lossy pass starts from (ORT, rewrites
    # off), when the manager has them checked; None otherwise.
    check_current: list[dict[str, np.ndarray]] | None = None
    # Settings a previous run chose (``graphopt.replay``): compression pass name ->
    # {site: setting}; a pass named here applies them instead of searching.
    replay: dict[str, dict[str, Any]] | None = None
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def step(self, what: str, done: int, total: int = 0) -> None:
        """Report progress of a long step (a measurement per site, a search's models)."""
        if self.progress is not None:
            self.progress(what, done, total)

    def supports(self, op_type: str, domain: str = "") -> bool:
        """Whether the target runs ``op_type`` (every op, when there is no target)."""
        return self.target is None or self.target.supports(op_type, domain)


class Pass(ABC):
    """Base class of every pass. Subclasses set the class attributes and ``run``."""

    name: ClassVar[str]
    family: ClassVar[str]
    lossless: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions
    # Ops (domain, op_type) the pass may emit; the pipeline drops a pass whose ops the
    # target does not run.
    emits: ClassVar[tuple[tuple[str, str], ...]] = ()
    # A lossy pass may declare a command-line scheme: (flag, value) makes ``--flag value``
    # append it (``("quantize", "int8")``, ``("prune", "channels")``). When several
    # schemes are asked, passes with a lower ``scheme_order`` run first.
    scheme: ClassVar[tuple[str, str] | None] = None
    scheme_order: ClassVar[int] = 50
    # A scheme's further settings the planner tries as techniques of their own, by name:
    # {"smoothed": {"smooth": True}} (int8 after SmoothQuant) is measured beside the plain
    # pass, and chosen only where it pays.
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # The rewrite only chooses another form of the same computation (a runtime's fused
    # kernel for the ops it replaces) that is not faster everywhere: the pass manager keeps
    # it where the target's cost model, calibrated by measurement on the device, predicts
    # it faster, and declines it otherwise (``graphopt calibrate``).
    alternative: ClassVar[bool] = False
    # For an ``alternative``: the rewrites a target's runtime makes into the same form by
    # itself, per target name (``{"ort": ("SkipLayerNormFusion",)}``). That target keeps
    # them off in the sessions it measures and the artifacts it writes, so the form the
    # pass manager chose by measurement (kept or declined) is the form that runs.
    runtime_rewrites: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = make_options(type(self), kwargs)
        elif kwargs:
            raise TypeError("pass either an Options instance or keyword options, not both")
        self.options = options

    @abstractmethod
    def run(self, model: "Model", ctx: PassContext) -> PassResult:
        """Transform ``model`` in place and say whether anything changed."""

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}"
                         for f in dataclasses.fields(self.options))
        return f"{self.name}({opts})"


def option_fields(pass_cls: type[Pass]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(pass_cls.Options)}


def make_options(pass_cls: type[Pass], raw: dict[str, Any]) -> Any:
    """Build ``pass_cls.Options`` from names and (possibly string) values, validating both.

    Option names may use dashes or underscores. Unknown names are an error that lists the
    valid ones; values are converted to the declared field type.
    """
    fields = option_fields(pass_cls)
    hints = typing.get_type_hints(pass_cls.Options)
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            valid = ", ".join(sorted(f.replace("_", "-") for f in fields)) or "none"
            raise UsageError(f"pass {pass_cls.name!r} has no option {key!r}",
                             hint=f"valid options: {valid}")
        values[name] = _convert(pass_cls.name, key, value, hints[name])
    try:
        return pass_cls.Options(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass {pass_cls.name!r}: {exc}") from exc


def parse_bool(value: str) -> bool:
    """A yes/no setting as written on the command line (a pass's or a target's option):
    true/false, 1/0, yes/no; anything else is a ValueError."""
    lowered = value.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
    return lowered in ("true", "1", "yes")


def _convert(pass_name: str, key: str, value: Any, kind: Any) -> Any:
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        non_none = [a for a in args if a is not type(None)]
        if value.lower() == "none" and type(None) in args:
            return None
        kind = non_none[0]
    try:
        if kind is bool:
            return parse_bool(value)
        if kind in (int, float, str):
            return kind(value)
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            return tuple(item(v) for v in value.split(";") if v)
    except ValueError:
        raise UsageError(f"pass {pass_name!r}: option {key!r} expects "
                         f"{getattr(kind, '__name__', kind)}, got {value!r}") from None
    return value
