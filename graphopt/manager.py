"""The pass manager: runs a pipeline, checks the model after every pass, rolls back a pass
that breaks it, iterates to a fixpoint and records a trace.

Checks after a pass that changed the model:

* structure: the model exports (nodes in topological order, no cycle), passes the ONNX
  checker, and passes strict shape inference if the model before the pass did;
* numbers: a lossless pass must keep the outputs on the probe inputs within tolerance of
  the model before it; a lossy pass must keep them within the accuracy budget of the
  original (minimum cosine similarity, ``PassContext.tolerance``).

For lossless passes the numbers (an ONNX Runtime session per check: most of the checking
time on a large model) are by default checked once per fixpoint iteration, against the
model the iteration started from; when that fails, the iteration is run again from there
with a check after every pass, which finds and rolls back the pass at fault (and that
pass is checked after each run from then on). ``check_each_pass=True`` checks the numbers
after every pass from the start.

Structure is checked after every pass too, with one exception while numbers are
deferred: a lossless pass that leaves no tensor without a type that had one (it removed,
folded or rewired nodes, and gave what it made a type) needs no shape inference for the
passes after it, so its export, checker run and inference (about a tenth of a small
model's run) wait for the next check. A pass that fails while a change is still
unchecked cannot be rolled back alone: the iteration is run again with every check.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import background, spill, verify
from graphopt.errors import GraphoptError, UsageError, VerificationError
from graphopt.cost_calibration import judge_alternative
from graphopt.ir import Model, infer_shapes, proto_hash, skeleton, weight_bytes
from graphopt.metric import DEFAULT_BUDGET, get_metric
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.walk import tensor_map

DEFAULT_MAX_ITERATIONS = 8
BACKGROUND_MAX_BYTES = 1 << 30  # see _Reference
# Checks run while the manager waits for them: on every core (the background run of the
# original, while passes run, takes one). The outputs of ResNet-50, EfficientNet-B0,
# MobileNet-v2 and MiniLM at 1 and 2 threads are bit-identical; checks allow for
# rounding anyway.
CHECK_THREADS = min(os.cpu_count() or 1, 4)


@dataclass
class TraceEntry:
    pass_name: str
    iteration: int
    status: str  # "changed", "unchanged", "rolled-back" or "declined" (Pass.alternative)
    nodes_before: int
    nodes_after: int
    seconds: float
    cost_before_s: float | None = None
    cost_after_s: float | None = None
    stats: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.status == "changed"

    def to_dict(self) -> dict:
        return {**asdict(self), "changed": self.changed}


class Instrument(Protocol):
    """Hooks around each pass (progress display, dumps, profiling)."""

    def before_pass(self, p: Pass, iteration: int) -> None: ...

    def after_pass(self, p: Pass, entry: TraceEntry) -> None: ...


@dataclass
class _State:
    """The last accepted model: its proto, whether strict shape inference holds, outputs,
    and its estimated cost (computed once per accepted model: estimating may re-infer
    shapes, which costs as much as a check on a large model)."""

    proto: onnx.ModelProto
    shapes_ok: bool
    # outputs on the probe feeds: known, ``None`` (not run: ORT cannot run the model), or
    # the original's, still being run in the background (``_Reference``)
    known: list[verify.Feeds] | "_Reference" | None
    cost_s: float | None = None
    # The numbers of ``proto`` are not checked yet: ``outputs`` are those of the model the
    # iteration started from, which ``proto`` must still match.
    unchecked: bool = False
    # ``outputs`` are what a lossy pass measured and handed over, not the manager's run.
    handed_over: bool = False
    # Names of the variables without a type in ``proto`` as inferred (``None``: not
    # known; see ``_untyped``).
    untyped: frozenset[str] | None = None
    # The model changed since ``proto`` (by lossless passes whose structure check waits:
    # see the module docstring); ``proto`` cannot stand for it.
    stale: bool = False
    # Those structure checks are still to be done (``proto`` may be the model's export).
    pending: bool = False

    @property
    def outputs(self) -> list[verify.Feeds] | None:
        """The outputs, waiting for the background run of the original if need be."""
        return self.known.get() if isinstance(self.known, _Reference) else self.known


class _Reference:
    """The original model's outputs, run by ONNX Runtime in a background thread while the
    first passes run (ORT lets go of the GIL): the first check that needs them waits.
    A model of more than ``BACKGROUND_MAX_BYTES`` of weights is run at once instead: the
    session and the passes would hold its weights in memory together."""

    def __init__(self, proto: onnx.ModelProto, feeds: list[verify.Feeds], done):
        self._done, self._value = done, None
        if weight_bytes(proto) > BACKGROUND_MAX_BYTES:
            self._future: Future | None = Future()
            try:
                self._future.set_result(_run_feeds(proto, feeds))
            except Exception as exc:  # (reported by get(), as from the thread)
                self._future.set_exception(exc)
            return
        self._future = background.submit(_run_feeds, verify.serialized(proto), feeds)

    def get(self) -> list[verify.Feeds] | None:
        if self._future is not None:
            future, self._future = self._future, None
            try:
                self._value = future.result()
            except Exception as exc:  # ORT cannot run the model (custom ops, ...)
                self._done(None, exc)
            else:
                self._done(self._value, None)
        return self._value


class PassManager:
    def __init__(self, passes: Sequence[Pass], ctx: PassContext | None = None, *,
                 strict: bool = False, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                 tolerance: verify.Tolerance = verify.Tolerance(),
                 probe_feeds: list[verify.Feeds] | None = None,
                 instruments: Sequence[Instrument] = (), check_each_pass: bool = False,
                 forced: frozenset[str] = frozenset()):
        """``forced``: alternative passes (``Pass.alternative``) kept without asking the
        cost model (library use: a caller that has measured the form itself)."""
        self.passes = list(passes)
        self.forced = forced
        # verdicts on alternative rewrites: (pass, ops added, ops removed) -> (why
        # declined or None, the predicted figures)
        self._verdicts: dict[tuple, tuple[str | None, dict]] = {}
        self.ctx = ctx or PassContext()
        self.strict = strict
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.probe_feeds = probe_feeds
        self.instruments = list(instruments)
        self.check_each_pass = check_each_pass
        self.trace: list[TraceEntry] = []
        self.numeric_check: str = "not run"  # why numbers could not be checked, if so
        self._deferring = False  # numbers of lossless passes checked at iteration end
        self._suspects: set[str] = set()  # passes that broke the numbers: always checked
        self._initial: _State | None = None  # the input model's, once run
        self._final: _State | None = None  # the last accepted state, once run

    def run(self, model: Model) -> Model:
        """Optimize ``model`` in place (and return it).

        A lossy pass ends a stage: the lossless passes before it are iterated to their
        fixpoint, then it runs once (it is judged against the original, and rerunning a
        quantizer on its own output, or cleanups between, would not converge)."""
        state = self._initial = self._initial_state(model)
        iteration = 0
        for lossless, lossy in _stages(self.passes):
            for _ in range(self.max_iterations if lossless else 0):
                iteration += 1
                changed_any, state = self._iterate(lossless, model, state, iteration)
                if not changed_any:
                    break
            if lossy is not None:
                iteration += 1
                self._wait_for_original()  # the lossy pass reads ctx.check_*
                _, state = self._step(lossy, model, state, iteration)
        self._wait_for_original()  # numeric_check is final after the run
        self._final = state
        return model

    @property
    def original_outputs(self) -> list[verify.Feeds] | None:
        """The input model's outputs on ``probe_feeds`` (ORT, rewrites off), once run
        (``None`` when ORT cannot run it)."""
        return None if self._initial is None else self._initial.outputs

    @property
    def initial_types(self) -> onnx.ModelProto | None:
        """The model the run started from, exported with the types strict shape inference
        gave it (``None`` before the run, or when strict inference failed)."""
        state = self._initial
        return state.proto if state is not None and state.shapes_ok else None

    def _wait_for_original(self) -> None:
        if self._initial is not None:
            self._initial.outputs  # noqa: B018 - resolving it sets numeric_check, ctx

    def checked_outputs(self, final_hash: str) -> list[verify.Feeds] | None:
        """The outputs the manager itself ran, on ``probe_feeds``, of the last model it
        accepted, if that model's content hash is ``final_hash`` (the same graph and
        weights: running it again would give the same numbers); otherwise ``None``."""
        state = self._final
        if state is None or state.unchecked or state.handed_over or state.outputs is None:
            return None
        return state.outputs if proto_hash(state.proto) == final_hash else None

    def _iterate(self, passes: list[Pass], model: Model, state: _State,
                 iteration: int) -> tuple[bool, _State]:
        """One pass over the lossless ``passes``, numbers checked at its end (see the
        module docstring); returns whether anything changed and the new state."""
        start, first_entry = state, len(self.trace)
        self._deferring = state.known is not None and not self.check_each_pass
        try:
            changed_any = False
            for p in passes:
                if state.unchecked and p.name in self._suspects:
                    # so the suspect is judged alone
                    state = self._check_numbers(self._catch_up(model, state))
                elif state.stale and p.alternative:  # judged against its own start
                    state = self._snapshot(model, state)
                changed, state = self._step(p, model, state, iteration)
                changed_any |= changed
            if not state.unchecked:
                return changed_any, state
            return changed_any, self._check_numbers(self._catch_up(model, state))
        except _Rejected as exc:
            self.ctx.logger.info("iteration %d: %s; running it again with a check after "
                                 "every pass", iteration, exc)
        finally:
            self._deferring = False
        del self.trace[first_entry:]
        model.graph = Model.from_proto(start.proto).graph
        changed_any = False
        for p in passes:
            changed, start = self._step(p, model, start, iteration)
            changed_any |= changed
        return changed_any, start

    def _check_numbers(self, state: _State) -> _State:
        """Accept an iteration's unchecked result if its outputs still match."""
        if state.outputs is None:  # ORT turned out not to run the original
            return _State(state.proto, state.shapes_ok, None, state.cost_s,
                          untyped=state.untyped)
        try:
            outputs = _run_feeds(state.proto, self.probe_feeds, CHECK_THREADS)
        except Exception as exc:
            raise _Rejected(f"ONNX Runtime cannot run the result: {_first_line(exc)}")
        self._compare(state.outputs, outputs)
        return _State(state.proto, state.shapes_ok, outputs, state.cost_s,
                      untyped=state.untyped)

    def _catch_up(self, model: Model, state: _State) -> _State:
        """``state`` with the structure checks that waited (see the module docstring)
        done on ``model``, as unchecked; raises ``_Rejected`` for the iteration."""
        if not state.pending:
            return state
        proto = self._structure(model, state, None if state.stale else state.proto)
        return _State(proto, state.shapes_ok, state.known, state.cost_s, unchecked=True,
                      untyped=_untyped(model))

    def _snapshot(self, model: Model, state: _State) -> _State:
        """``state`` with ``model``'s export as its proto, its structure checks still
        pending: what a pass may be rolled back to."""
        try:
            proto = model.to_onnx(references=True)
        except Exception as exc:
            raise _Rejected(f"cannot export the graph: {_first_line(exc)}") from exc
        return _State(proto, state.shapes_ok, state.known, state.cost_s, unchecked=True,
                      untyped=state.untyped, pending=True)

    def _compare(self, before: list[verify.Feeds], after: list[verify.Feeds]) -> None:
        for b, a in zip(before, after):
            diff = verify.compare(b, a, self.tolerance)
            if not diff.ok:
                worst = diff.worst()
                raise _Rejected(f"output {worst.name!r} changed (max abs diff "
                                f"{worst.max_abs:.3g}{', ' + worst.note if worst.note else ''})")

    def _step(self, p: Pass, model: Model, state: _State,
              iteration: int) -> tuple[bool, _State]:
        for instrument in self.instruments:
            instrument.before_pass(p, iteration)
        entry, state = self._run_one(p, model, state, iteration)
        self.trace.append(entry)
        for instrument in self.instruments:
            instrument.after_pass(p, entry)
        return entry.changed, state

    # ------------------------------------------------------------------ internals
    def _initial_state(self, model: Model) -> _State:
        proto = model.to_onnx(references=True)
        inferred = _infer_strict(proto)
        shapes_ok = inferred is not None
        if shapes_ok:
            proto = inferred
            model.adopt_types(proto)
        try:
            feeds = self.probe_feeds or verify.probe_inputs(proto, seed=self.ctx.seed)
        except GraphoptError as exc:
            self.numeric_check = f"skipped: {exc}"
            return _State(proto, shapes_ok, None)
        self.probe_feeds = feeds
        try:
            outputs = _Reference(proto, feeds, self._reference_done)
        except Exception as exc:  # cannot even serialize it for ORT
            outputs = None
            self._reference_done(None, exc)
        return _State(proto, shapes_ok, outputs, untyped=_untyped(model))

    def _reference_done(self, outputs: list[verify.Feeds] | None,
                        error: Exception | None) -> None:
        if error is None:
            self.numeric_check = "ok"
            self.ctx.check_feeds, self.ctx.check_reference = self.probe_feeds, outputs
        elif isinstance(error, GraphoptError):
            self.numeric_check = f"skipped: {error}"
        else:  # ORT cannot run the model (custom ops, ...)
            self.numeric_check = f"skipped: ONNX Runtime cannot run the model: " \
                                 f"{_first_line(error)}"

    def _run_one(self, p: Pass, model: Model, state: _State,
                 iteration: int) -> tuple[TraceEntry, _State]:
        nodes_before = model.num_nodes()
        if state.cost_s is None:
            state.cost_s = self._cost(model, state)
        cost_before = state.cost_s
        start = time.perf_counter()
        entry = TraceEntry(p.name, iteration, "unchanged", nodes_before, nodes_before, 0.0,
                           cost_before, cost_before)
        # A lossy pass may score the model it starts from without running it again.
        self.ctx.check_current = None if p.lossless or state.unchecked else state.outputs
        try:
            result = p.run(model, self.ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
            entry.stats = dict(result.stats)
            if result.changed:  # new large weights (folded, quantized): to the run's file
                spill.refresh_active(model)
            if result.changed and p.alternative and p.name not in self.forced:
                declined = self._judge(model, state, entry)
                if declined:
                    model.graph = Model.from_proto(state.proto).graph
                    entry.status, entry.reason = "declined", declined
                    entry.seconds = time.perf_counter() - start
                    return entry, state
            if result.changed:
                if self._deferring and p.lossless and p.name not in self._suspects and \
                        state.untyped is not None and _untyped(model) <= state.untyped:
                    new_state = _State(state.proto, state.shapes_ok, state.known,
                                       unchecked=True, untyped=state.untyped, stale=True,
                                       pending=True)
                else:
                    new_state = self._check(p, model, state,
                                            None if p.lossless else result.outputs)
                entry.status = "changed"
                entry.nodes_after = model.num_nodes()
                new_state.cost_s = entry.cost_after_s = self._cost(model, new_state)
                state = new_state
        except _Rejected as exc:
            entry.reason = str(exc)
        except UsageError:
            raise  # the user's request cannot be done (e.g. replayed settings that do not fit)
        except Exception as exc:
            entry.reason = f"raised {type(exc).__name__}: {_first_line(exc)}"
        finally:
            self.ctx.check_current = None
        if entry.reason and state.pending:  # no checked model before this pass
            raise _Rejected(f"pass {p.name} failed after unchecked changes: {entry.reason}")
        entry.seconds = time.perf_counter() - start
        if entry.reason:
            model.graph = Model.from_proto(state.proto).graph
            entry.status = "rolled-back"
            entry.nodes_after = nodes_before
            entry.cost_after_s = cost_before
            self.ctx.logger.warning("pass %s rolled back: %s", p.name, entry.reason)
            if self.strict:
                raise VerificationError(f"pass {p.name!r} broke the model: {entry.reason}",
                                        hint="drop it with --skip, or run without --strict")
        return entry, state

    def _judge(self, model: Model, state: _State, entry: TraceEntry) -> str | None:
        """Why the alternative form just written is declined (``None``: keep it), by the
        cost model at the probe inputs' shapes."""
        shapes = self.ctx.input_shapes or ({name: list(np.shape(value)) for name, value
                                            in self.probe_feeds[0].items()}
                                           if self.probe_feeds else {})
        after = model.to_onnx(references=True)
        # The same rewrite in a later iteration (same ops added and removed) gets the same
        # verdict: judging re-infers shapes, seconds on a transformer.
        ops_before = Counter((n.domain, n.op_type) for n in state.proto.graph.node)
        ops_after = Counter((n.domain, n.op_type) for n in after.graph.node)
        key = (entry.pass_name, frozenset((ops_after - ops_before).items()),
               frozenset((ops_before - ops_after).items()))
        if key not in self._verdicts:
            self._verdicts[key] = judge_alternative(self.ctx.cost_model, self.ctx.device,
                                                    state.proto, after, shapes)
        reason, figures = self._verdicts[key]
        entry.stats.update(figures)
        return reason

    def _check(self, p: Pass, model: Model, state: _State,
               measured: list[verify.Feeds] | None = None) -> _State:
        """``model`` after ``p``: exportable, valid, shapes inferable, and its outputs on
        the probe feeds equal to the state's (lossless) or within the budget of the
        original's (lossy; ``measured``: the outputs the pass measured its result at)."""
        proto = self._structure(model, state)
        if self._deferring and p.lossless and p.name not in self._suspects:
            return _State(proto, state.shapes_ok, state.known, unchecked=True,
                          untyped=_untyped(model))
        outputs = None
        if state.outputs is not None:
            try:
                outputs = measured if _matches(measured, state.outputs) else \
                    _run_feeds(proto, self.probe_feeds, CHECK_THREADS)
            except Exception as exc:
                raise _Rejected(f"ONNX Runtime cannot run the result: {_first_line(exc)}")
            if p.lossless:
                try:
                    self._compare(state.outputs, outputs)
                except _Rejected:
                    self._suspects.add(p.name)
                    raise
            else:
                metric = get_metric(self.ctx.metric)
                floor = DEFAULT_BUDGET if self.ctx.tolerance is None else self.ctx.tolerance
                score = metric.score(self.original_outputs, outputs, self.probe_feeds)
                if score < floor:
                    raise _Rejected(f"{metric.name} {score:.5f} is below the budget {floor}")
        return _State(proto, state.shapes_ok, outputs,
                      handed_over=outputs is not None and outputs is measured,
                      untyped=_untyped(model))

    def _structure(self, model: Model, state: _State,
                   proto: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """``model`` exported (unless ``proto`` is its export), checked and (if strict
        inference held for ``state``) shape-inferred, its types adopted by ``model``;
        raises ``_Rejected``."""
        if proto is None:
            try:
                proto = model.to_onnx(references=True)
            except Exception as exc:
                raise _Rejected(f"cannot export the graph: {_first_line(exc)}") from exc
        try:
            onnx.checker.check_model(skeleton(proto))
        except onnx.checker.ValidationError as exc:
            raise _Rejected(f"ONNX checker: {_first_line(exc)}") from exc
        if state.shapes_ok:
            proto = _infer_strict(proto)
            if proto is None:
                raise _Rejected("strict shape inference fails after the pass")
        model.adopt_types(proto)
        return proto

    def _cost(self, model: Model, state: _State) -> float | None:
        """Estimated latency of ``model``, the model of ``state``: its shapes were just
        inferred when strict inference holds (what stays unknown, e.g. outputs of ops
        without a schema, would stay unknown again)."""
        if self.ctx.cost_model is None or self.ctx.device is None:
            return None
        return self.ctx.cost_model.estimate(model, self.ctx.device,
                                            infer=not state.shapes_ok).latency_s


def _stages(passes: Sequence[Pass]) -> list[tuple[list[Pass], Pass | None]]:
    """Split a pipeline after each lossy pass: [(lossless passes, lossy pass or None)]."""
    stages, current = [], []
    for p in passes:
        if p.lossless:
            current.append(p)
        else:
            stages.append((current, p))
            current = []
    if current or not stages:
        stages.append((current, None))
    return stages


class _Rejected(Exception):
    """A pass's result failed a check; the message says which."""


def _matches(outputs: list[verify.Feeds] | None, like: list[verify.Feeds]) -> bool:
    """Whether a pass's ``outputs`` have the form of ``like`` (per batch, the same
    output names and shapes): anything else is not taken on trust."""
    return outputs is not None and len(outputs) == len(like) and all(
        a.keys() == b.keys() and all(np.shape(a[k]) == np.shape(b[k]) for k in a)
        for a, b in zip(outputs, like))


def _untyped(model: Model) -> frozenset[str]:
    """Names of ``model``'s variables (any graph's) without a dtype or a shape."""
    return frozenset(t.name for g in model.all_graphs() for t in tensor_map(g).values()
                     if isinstance(t, gs.Variable) and (t.dtype is None or t.shape is None))


def _run_feeds(proto: onnx.ModelProto | verify.Serialized, feeds: list[verify.Feeds],
               threads: int = 1) -> list[verify.Feeds]:
    """Outputs on every batch of ``feeds`` (one ORT session for all of them)."""
    sess = verify.session(proto, threads=threads)
    return [verify.run(sess, f) for f in feeds]


def _infer_strict(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """The shape-inferred model, or ``None`` when strict inference fails."""
    try:
        return infer_shapes(proto, strict=True)
    except GraphoptError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
