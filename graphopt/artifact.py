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
# MIN_REPEAT, at most MAX_REPEAT runs); artifact and ORT rounds alternate, ROUNDS of each
# when one run is fast (< ROUND_S / MAX_REPEAT), else one.
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
    ref_session = verify.session(reference)
    for done, f in enumerate(feeds):
        if progress is not None:  # (a browser or an emulator takes seconds a batch)
            progress(f"running the {target.name} artifact against ONNX Runtime (batches)",
                     done, len(feeds))
        try:
            got = target.run(artifact, f)
        except UsageError as exc:
            return {"ok": None, "ran": False,
                    "detail": str(exc) + (f" ({exc.hint})" if exc.hint else "")}
        except GraphoptError as exc:
            return {"ok": False, "ran": False, "detail": f"the artifact failed to run: {exc}"}
        want = verify.run(ref_session, f)
        if budget is None:
            comparison.outputs += verify.compare(want, got, tolerance).outputs
        else:
            worst_cosine = min(worst_cosine, *sample_cosines(want, got, batch_size(f)))
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
    (emulation)."""
    cores = os.cpu_count() or 1
    threads = min(getattr(target, "threads", None) or cores, cores)
    sess = verify.session(reference, optimize=True, threads=threads)
    first = target.measure(artifact, feeds, repeat=1)  # warms up; None: no device timing
    ort_first = _seconds(lambda: verify.run(sess, feeds))
    rounds = ROUNDS if max(first or 0.0, ort_first) * MAX_REPEAT < ROUND_S else 1
    artifact_times, ort_times = [], []
    for _ in range(rounds):  # interleaved: drift on a shared machine hits both sides
        if first is not None:
            artifact_times.append(target.measure(artifact, feeds, repeat=_repeat(first)))
        ort_times.append(statistics.median(_seconds(lambda: verify.run(sess, feeds))
                                           for _ in range(_repeat(ort_first))))
    seconds = statistics.median(artifact_times) if first is not None else None
    ort_s = statistics.median(ort_times)
    result = {"artifact_s": seconds, "ort_s": ort_s, "ort_threads": threads,
              "rounds": rounds,
              "ort_vs_artifact": None if seconds is None else ort_s / seconds}
    if seconds is None:
        result["note"] = "the artifact runs under emulation here: no device timing"
    return result


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
