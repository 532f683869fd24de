"""Measured profile of a model on a target, beside the cost model's estimate.

The target times each kernel it runs (``Target.profile_nodes``; ONNX Runtime's profiler
for ``ort``). Kernels are matched back to the graph's nodes by name, or by the tensor
they write (ONNX Runtime names a kernel it re-laid out ``<output>_nchwc``); kernels a
runtime made itself (layout reorders, its own fusions) keep their own names. The time of
a run not spent in any kernel (session bookkeeping, allocation, dispatch) is its own row,
so the rows add up to the measured run.
"""

from __future__ import annotations

import bisect
import re
import resource
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from graphopt.analysis import peak_activation_bytes
from graphopt.cost import quantized, roofline, tensor_bytes
from graphopt.cost_calibration import cost_model_for, static_model
from graphopt.errors import UsageError
from graphopt.target import Target


@dataclass
class KernelTime:
    """One kernel of a run: measured seconds (median over runs) and, where it maps to a
    graph node, that node's estimate and roofline position."""

    name: str
    op: str
    measured_s: float
    node: str | None = None
    estimated_s: float | None = None
    flops: float = 0.0
    bytes: float = 0.0
    bound: str | None = None  # "compute" or "memory" by the roofline
    of_peak: float | None = None  # achieved FLOP/s (or bytes/s) over the device's peak


@dataclass
class Profile:
    target: str
    device: str
    cost_model: dict
    input_shapes: dict[str, list[int]]
    runs: int
    run_s: float  # median profiled run
    kernels: list[KernelTime] = field(default_factory=list)
    estimated_s: float = 0.0  # the cost model's whole-model estimate
    peak_activation_bytes: int = 0  # estimated from tensor lifetimes
    weight_bytes: int = 0
    peak_rss_bytes: int | None = None  # the process's peak resident memory after the runs

    @property
    def kernel_s(self) -> float:
        return sum(k.measured_s for k in self.kernels)

    @property
    def other_s(self) -> float:
        """Time of a run outside every kernel (0 when the kernels' medians, each over
        the runs on its own, add up to more than the median run: TVM's VM calls leave
        next to nothing between them)."""
        return max(self.run_s - self.kernel_s, 0.0)

    def by_op(self) -> dict[str, dict]:
        """Per kernel op type: count, measured and estimated seconds; a last row
        ``(between kernels)`` makes the rows add up to the measured run."""
        rows: dict[str, dict] = defaultdict(lambda: {"count": 0, "measured_s": 0.0,
                                                     "estimated_s": None})
        for k in self.kernels:
            row = rows[k.op]
            row["count"] += 1
            row["measured_s"] += k.measured_s
            if k.estimated_s is not None:
                row["estimated_s"] = (row["estimated_s"] or 0.0) + k.estimated_s
        ordered = dict(sorted(rows.items(), key=lambda kv: -kv[1]["measured_s"]))
        ordered["(between kernels)"] = {"count": 0, "measured_s": self.other_s,
                                        "estimated_s": None}
        return ordered

    def to_dict(self, top: int | None = None) -> dict:
        kernels = sorted(self.kernels, key=lambda k: -k.measured_s)
        return {"target": self.target, "device": self.device, "cost_model": self.cost_model,
                "input_shapes": self.input_shapes, "runs": self.runs,
                "run_s": self.run_s, "kernel_s": self.kernel_s,
                "between_kernels_s": self.other_s, "estimated_s": self.estimated_s,
                "by_op": self.by_op(), "peak_activation_bytes": self.peak_activation_bytes,
                "weight_bytes": self.weight_bytes, "peak_rss_bytes": self.peak_rss_bytes,
                "kernels": [asdict(k) for k in kernels[:top]]}


def profile(proto: onnx.ModelProto, target: Target, feeds: dict[str, np.ndarray],
            runs: int = 20) -> Profile:
    """Run ``proto`` ``runs`` times on ``target`` with its profiler and put each kernel's
    median time beside the cost model's estimate at the feeds' shapes."""
    if runs < 1:
        raise UsageError(f"runs must be >= 1, got {runs}")
    measured = target.profile_nodes(proto, feeds, runs)
    if measured is None:
        raise UsageError(f"target {target.name!r} has no per-kernel profiler",
                         hint="profile with --target ort")
    times, run_s = measured
    shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
    model = static_model(proto, shapes)
    cost_model, info = cost_model_for(target)
    device = target.device
    cost = cost_model.estimate(model, device, infer=False)
    estimates = {n.name: n for n in cost.nodes}
    nodes = {n.name: n for n in model.graph.nodes}
    producers = {t.name: n for n in model.graph.nodes for t in n.outputs}
    kernels = []
    for name, (op, seconds) in times.items():
        node = nodes.get(name) or nodes.get(_node_name(name)) or \
            producers.get(name.removesuffix("_nchwc"))
        kernel = KernelTime(name=name, op=op, measured_s=seconds)
        if node is not None and node.name in estimates:
            flops, moved, _ = roofline(node, device)
            estimate = estimates[node.name]
            compute_s = flops / device.peak("int8" if quantized(node) else "float32")
            memory_s = moved / device.bandwidth
            kernel.node, kernel.estimated_s = node.name, estimate.latency_s
            kernel.flops, kernel.bytes = flops, moved
            if flops or moved:
                kernel.bound = "compute" if compute_s >= memory_s else "memory"
                kernel.of_peak = (compute_s if kernel.bound == "compute" else memory_s) / \
                    seconds if seconds > 0 else None
        kernels.append(kernel)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Profile(target=target.name, device=device.name, cost_model=info,
                   input_shapes=shapes, runs=runs, run_s=run_s, kernels=kernels,
                   estimated_s=cost.latency_s,
                   peak_activation_bytes=peak_activation_bytes(model.graph),
                   weight_bytes=sum(tensor_bytes(t) for t in model.initializers()),
                   peak_rss_bytes=rss * (1 if sys.platform == "darwin" else 1024))


def _node_name(kernel: str) -> str:
    """The graph node ONNX Runtime named a kernel after: its QDQ rewrite appends
    ``_token_<n>`` (``/3/Conv_token_4``: the QLinearConv of node ``/3/Conv``), its
    activation fusion prefixes ``fused `` (``fused /12/Gemm``)."""
    return re.sub(r"_token_\d+$", "", kernel.removeprefix("fused "))


def median_by_name(events: list[dict]) -> tuple[dict[str, tuple[str, float]], float]:
    """``({kernel name: (op, median seconds per run)}, median run seconds)`` from
    ONNX Runtime profiler events (Chrome trace format). A kernel's time in a run is the
    sum of its invocations in that run (a loop body runs many times); the first run is
    left out as warm-up when there are several. When the kernels' medians add up to more
    than the median run (medians do not add), they are scaled down to it in proportion."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")
    if not windows:
        raise UsageError("the profiler recorded no run")
    starts = [start for start, _ in windows]
    per: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    ops: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        run = bisect.bisect_right(starts, event["ts"]) - 1
        if run < 0 or event["ts"] > windows[run][1]:
            continue
        name = event["name"][:-len("_kernel_time")]
        per[name][run] += event["dur"] * 1e-6
        ops[name] = event.get("args", {}).get("op_name", "?")
    first = 1 if len(windows) > 1 else 0
    counted = range(first, len(windows))
    times = {name: (ops[name], statistics.median(runs.get(i, 0.0) for i in counted))
             for name, runs in per.items()}
    run_s = statistics.median((end - start) * 1e-6 for start, end in windows[first:])
    return fit_to_run(times, run_s), run_s


def fit_to_run(times: dict[str, tuple[str, float]], run_s: float
               ) -> dict[str, tuple[str, float]]:
    """``times`` ({kernel: (op, seconds)}) scaled down in proportion when they add up
    past ``run_s``: medians of the parts, or parts timed on their own, can add up past
    the whole's median; the run is shared out in their proportions (rows add up)."""
    total = sum(seconds for _, seconds in times.values())
    if total > run_s > 0:
        scale = run_s / total
        return {name: (op, seconds * scale) for name, (op, seconds) in times.items()}
    return times
