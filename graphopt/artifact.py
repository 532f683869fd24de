"""Checking a lowered artifact: run it through its target and compare its outputs with
ONNX Runtime on the original model; time it next to ONNX Runtime where the run says
something about the device (not under emulation).

Both ``graphopt optimize --verify`` and ``graphopt verify ARTIFACT`` end here, for every
target alike: what differs between backends is ``Target.run`` / ``Target.measure``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import numpy as np
import onnx

from graphopt import verify
from graphopt.accuracy import batch_size, sample_cosines
from graphopt.errors import GraphoptError, UsageError
from graphopt.target import Artifact, Target

# Timing: each round repeats a run until about ROUND_S seconds were spent (at least
# MIN_REPEAT, at most MAX_REPEAT runs); artifact and ORT rounds alternate (one side's
# after the other's for targets that keep the two runtimes apart), ROUNDS of each when
# one run is fast (< ROUND_S / MAX_REPEAT), else one.
ROUND_S = 0.5
MIN_REPEAT, MAX_REPEAT = 3, 200
ROUNDS = 5


def check(target: Target, artifact: Artifact, reference: onnx.ModelProto,
          feeds: list[verify.Feeds], tolerance: verify.Tolerance,
          budget: float | None = None, progress=None) -> dict:
    """Outputs of ``artifact`` against ONNX Runtime on ``reference``, batch by batch:
    within rtol/atol, or, for a lossily optimized model (``budget``), a minimum per-sample
    output cosine. ``{"ok": None, "detail": why}`` when the artifact cannot run here (the
    target raised a UsageError: no emulator, no GPU, unlinked objects, ...).
    ``progress(what, done, total)`` is told before each batch."""
    comparison = verify.Comparison()
    worst_cosine = 1.0
    apart = _apart(target)
    ref_session = None if apart else verify.session(reference)
    ran = []  # apart: the artifact's outputs, compared once its runtime is freed
    try:
        for done, f in enumerate(feeds):
            if progress is not None:  # (a browser or an emulator takes seconds a batch)
                progress(f"running the {target.name} artifact against ONNX Runtime "
                         f"(batches)", done, len(feeds))
            try:
                got = target.run(artifact, f)
            except UsageError as exc:
                return {"ok": None, "ran": False,
                        "detail": str(exc) + (f" ({exc.hint})" if exc.hint else "")}
            except GraphoptError as exc:
                return {"ok": False, "ran": False,
                        "detail": f"the artifact failed to run: {exc}"}
            if apart:
                ran.append(got)
            else:
                worst_cosine = _compare(comparison, worst_cosine, verify.run(ref_session, f),
                                        got, f, tolerance, budget)
    finally:
        if apart:
            target.release(artifact)
    if apart:
        ref_session = verify.session(reference)
        for f, got in zip(feeds, ran):
            worst_cosine = _compare(comparison, worst_cosine, verify.run(ref_session, f),
                                    got, f, tolerance, budget)
    del ref_session
    if budget is not None:
        ok = worst_cosine >= budget
        return {"ok": ok, "ran": True, **_ran_on(target), "batches": len(feeds),
                "min_cosine": worst_cosine,
                "budget": budget, "detail": f"min output cosine {worst_cosine:.6f} "
                                            f"{'>=' if ok else '<'} budget {budget}"}
    worst = comparison.worst()
    detail = "outputs match ONNX Runtime on the original" if worst is None else \
        f"output {worst.name!r}: max abs diff {worst.max_abs:.3g} {worst.note}".strip()
    return {**comparison.summary(), "ran": True, **_ran_on(target), "detail": detail,
            "batches": len(feeds), "rtol": tolerance.rtol, "atol": tolerance.atol}


def latency(target: Target, artifact: Artifact, reference: onnx.ModelProto,
            feeds: verify.Feeds) -> dict:
    """Median latency of the artifact on its device and of ONNX Runtime (ORT_ENABLE_ALL)
    on ``reference``, both on ``feeds``: ORT on as many threads as the target runs with
    (``Target.threads``, e.g. LiteRT's one), else on this machine's cores. The
    artifact's figure is ``None`` where its target says timing here means nothing
    (emulation). Rounds alternate, unless the target keeps the runtimes apart
    (``_latency_apart``)."""
    cores = os.cpu_count() or 1
    threads = min(getattr(target, "threads", None) or cores, cores)
    if _apart(target):
        return _latency_apart(target, artifact, reference, feeds, threads)
    sess = verify.session(reference, optimize=True, threads=threads)
    first = target.measure(artifact, feeds, repeat=1)  # warms up; None: no device timing
    ort_first = _seconds(lambda: verify.run(sess, feeds))
    rounds = ROUNDS if max(first or 0.0, ort_first) * MAX_REPEAT < ROUND_S else 1
    artifact_times, ort_times = [], []
    for _ in range(rounds):  # interleaved: drift on a shared machine hits both sides
        if first is not None:
            artifact_times.append(target.measure(artifact, feeds, repeat=_repeat(first)))
        ort_times.append(_ort_round(sess, feeds, ort_first))
    return _latency(artifact_times if first is not None else None, ort_times, threads,
                    rounds, target.untimed_note)


def _latency_apart(target: Target, artifact: Artifact, reference: onnx.ModelProto,
                   feeds: verify.Feeds, threads: int) -> dict:
    """``latency`` for a target whose runtime and ONNX Runtime's session are never alive
    together (``runtimes_apart``): the same warm-up runs, rounds and medians, one side's
    rounds after the other's, each runtime freed before the other's is made (the target
    frees its own in ``release``). A slow artifact (one round each: what a large model
    gets) is timed first, so ONNX Runtime's session, whose freed memory the allocator
    may keep, comes last; a fast one after ONNX Runtime, whose first run decides the
    rounds. Drift on a shared machine may favour one side; ``order`` says which ran
    first."""
    try:
        first = target.measure(artifact, feeds, repeat=1)  # warms up; None: no timing
        artifact_times = None
        if first is not None and first * MAX_REPEAT >= ROUND_S:  # one round, whatever ORT
            artifact_times = [target.measure(artifact, feeds, repeat=_repeat(first))]
    finally:
        target.release(artifact)
    rounds, ort_times = _ort_rounds(reference, feeds, threads, first)
    order = "the artifact's rounds, then ONNX Runtime's (one runtime at a time)"
    if first is not None and artifact_times is None:
        order = "ONNX Runtime's rounds, then the artifact's (one runtime at a time)"
        try:
            artifact_times = [target.measure(artifact, feeds, repeat=_repeat(first))
                              for _ in range(rounds)]
        finally:
            target.release(artifact)
    result = _latency(artifact_times, ort_times, threads, rounds, target.untimed_note)
    result["order"] = order
    return result


def _ort_rounds(reference: onnx.ModelProto, feeds: verify.Feeds, threads: int,
                first: float | None) -> tuple[int, list[float]]:
    """``(rounds, ONNX Runtime's round medians)``: its session's warm-up run decides the
    rounds with the artifact's (``first``); the session, with its prepacked weights, is
    freed on return, before the artifact's runtime is made again."""
    sess = verify.session(reference, optimize=True, threads=threads)
    ort_first = _seconds(lambda: verify.run(sess, feeds))
    rounds = ROUNDS if max(first or 0.0, ort_first) * MAX_REPEAT < ROUND_S else 1
    return rounds, [_ort_round(sess, feeds, ort_first) for _ in range(rounds)]


def _ort_round(sess, feeds: verify.Feeds, ort_first: float) -> float:
    """The median seconds of one round of ONNX Runtime runs."""
    return statistics.median(_seconds(lambda: verify.run(sess, feeds))
                             for _ in range(_repeat(ort_first)))


def _latency(artifact_times: list[float] | None, ort_times: list[float], threads: int,
             rounds: int, untimed_note: str) -> dict:
    """The latency section from each side's round medians (``None``: no device timing,
    for the reason ``untimed_note``)."""
    seconds = statistics.median(artifact_times) if artifact_times is not None else None
    ort_s = statistics.median(ort_times)
    result = {"artifact_s": seconds, "ort_s": ort_s, "ort_threads": threads,
              "rounds": rounds,
              "ort_vs_artifact": None if seconds is None else ort_s / seconds}
    if seconds is None:
        result["note"] = untimed_note
    return result


def _apart(target: Target) -> bool:
    """Whether ``target`` asks that its runtime and ONNX Runtime never hold their weights
    at once (``Target.runtimes_apart``; it then frees its runtime in ``release``)."""
    return target.runtimes_apart


def _compare(comparison: verify.Comparison, worst_cosine: float, want, got,
             feeds: verify.Feeds, tolerance: verify.Tolerance, budget: float | None) -> float:
    """One batch's comparison: into ``comparison`` (rtol/atol), or the lowest per-sample
    cosine so far (``budget``)."""
    if budget is None:
        comparison.outputs += verify.compare(want, got, tolerance).outputs
        return worst_cosine
    return min(worst_cosine, *sample_cosines(want, got, batch_size(feeds)))


def _ran_on(target: Target) -> dict:
    """``{"ran_on": where}`` where the target says where its runs executed, else ``{}``."""
    where, details = target.ran_on(), target.run_details()
    return {**({} if where is None else {"ran_on": where}),
            **({"run_details": details} if details else {})}


def _repeat(one_run_s: float) -> int:
    return int(np.clip(ROUND_S / max(one_run_s, 1e-9), MIN_REPEAT, MAX_REPEAT))


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
