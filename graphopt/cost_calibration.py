"""The cost model calibrated by measurement on the target.

The roofline (``graphopt.cost``) stays the prior: it knows how an op's work scales with
its shape. Measurement corrects it per op class (``cost.op_key``: family, dtype, kind)
and per size: each micro-benchmark (``graphopt.microbench``) gives one point, *the
measured time of one op over its roofline time*, and a node's correction is interpolated
between the points of its class in log-log space (clamped at the ends), so a 3x3
convolution of 8 channels and one of 512 get the efficiencies measured near their own
sizes. A class never measured borrows from its family, then from every measurement.
Two more terms come from the probes: the fixed cost of one inference (``base_s``) and
the dispatch cost of one node (``node_overhead_s``), which dominate tiny models.

A calibration is stored per device fingerprint (``Target.fingerprint``: the target, its
CPU model, ISA flags, threads and runtime version) in the cache folder, and ``optimize``
uses the one matching its target when present.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from graphopt.analysis import infer_all_shapes
from graphopt.cost import (QUANTIZE, SPAN, AnalyticCostModel, Cost, Device, int8_roofline,
                           op_key, op_span, op_width, roofline, tensor_bytes, weights_read)
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model
from graphopt.microbench import Probe
from graphopt.runtime_rules import fused_dequantize, layout_reorders

if typing.TYPE_CHECKING:
    from graphopt.target import Target

# Bumped whenever the probes or the fit change meaning: older files are then not used.
SCHEMA = 3
# A correction never goes below this (a probe faster than its roofline by more than this
# is noise around a near-zero time).
MIN_FACTOR = 0.05

Key = tuple[str, str, str]
# The op families whose time grows by ``Calibration.cold_s_per_byte`` per byte of weights
# read from beyond the cache (matrix products: what the cache probes measure; a 1x1
# convolution's weights cost a third as much per byte there, measured: 131 -> 152 us per
# 192 x 1152 layer at 7 x 7 from 4 to 55 MB of weights, where a product's penalty would
# have been 65 us: convolutions stay as fitted, but for those on 1 x 1 maps,
# ``_weight_reads``)
COLD_FAMILIES = frozenset({"matmul", "attention"})


def cache_dir() -> Path:
    """graphopt's cache folder: ``$GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt``,
    else ``~/.cache/graphopt``."""
    if os.environ.get("GRAPHOPT_CACHE_DIR"):
        return Path(os.environ["GRAPHOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graphopt"


@dataclass
class Calibration:
    """Measured corrections of the roofline on one device."""

    fingerprint: dict
    base_s: float = 0.0
    node_overhead_s: float = 0.0
    # "family/dtype/kind" -> [(roofline seconds of one op, measured / roofline, width,
    # span)]
    points: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)  # what was measured, for the record
    # Weights beyond the cache: a model whose weights total more than ``cache_bytes``
    # finds none of them in the cache from one run to the next, and every op pays
    # ``cold_s_per_byte`` for each byte of weights it reads, beyond its corrected
    # roofline (measured here: 128 x 384 x 384 products ran 209-235 us each in chains of
    # under 10 MB of weights, 245-260 us in chains of 19-57 MB)
    cache_bytes: float = math.inf
    cold_s_per_byte: float = 0.0

    def add(self, key: Key, roofline_s: float, factor: float, width: float = 1.0,
            span: float = SPAN) -> None:
        points = self.points.setdefault("/".join(key), [])
        points.append((roofline_s, max(factor, MIN_FACTOR), width, span))
        points.sort()

    def factor(self, key: Key, roofline_s: float, width: float = 1.0,
               span: float = SPAN) -> float:
        """The correction of an op of class ``key`` whose roofline time is ``roofline_s``
        and reduction width ``width`` (``cost.op_width``)."""
        points = self.points.get("/".join(key))
        if not points:  # the family at that dtype, then the family
            family = key[0]
            points = sorted(p for k, ps in self.points.items()
                            if k.split("/")[:2] == [family, key[1]] for p in ps) or \
                sorted(p for k, ps in self.points.items() if k.split("/")[0] == family
                       for p in ps)
        if points:
            return _interpolate(points, roofline_s, width, span)
        everything = [p[1] for ps in self.points.values() for p in ps]
        if not everything:  # nothing measured: the roofline as it is
            return 1.0
        return math.exp(sum(math.log(f) for f in everything) / len(everything))

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "fingerprint": self.fingerprint, "base_s": self.base_s,
                "node_overhead_s": self.node_overhead_s,
                "cache_bytes": None if math.isinf(self.cache_bytes) else self.cache_bytes,
                "cold_s_per_byte": self.cold_s_per_byte,
                "points": {k: [list(p) for p in v] for k, v in sorted(self.points.items())},
                "probes": self.probes}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        return cls(fingerprint=data["fingerprint"], base_s=float(data["base_s"]),
                   node_overhead_s=float(data["node_overhead_s"]),
                   points={k: [tuple(float(x) for x in p) for p in v]
                           for k, v in data["points"].items()},
                   probes=list(data.get("probes", [])),
                   cache_bytes=math.inf if data.get("cache_bytes") is None
                   else float(data["cache_bytes"]),
                   cold_s_per_byte=float(data.get("cold_s_per_byte", 0.0)))


def _interpolate(points: list[tuple[float, float, float, float]], seconds: float,
                 width: float, span: float = SPAN, nearest: int = 4) -> float:
    """The correction at (``seconds``, ``width``, ``span``): the geometric mean of the
    ``nearest`` points' corrections weighted by inverse squared distance in (log2 roofline
    time, log2 width, log2 span: ``cost.op_span``); a point at the same place is taken as
    it is. Between two points of one width
    this is their log-space midpoint blend; beyond the measured range it tends to the
    nearest point's correction."""
    x, w = math.log2(max(seconds, 1e-12)), math.log2(max(width, 1.0))
    scored = sorted((math.hypot(math.log2(max(r, 1e-12)) - x, math.log2(max(c, 1.0)) - w,
                                math.log2(sp / span)), math.log(f))
                    for r, f, c, sp in points)
    exact = [lf for d, lf in scored if d < 1e-9]
    if exact:
        return math.exp(sum(exact) / len(exact))
    near = scored[:nearest]
    weights = [1.0 / (d * d) for d, _ in near]
    return math.exp(sum(wt * lf for wt, (_, lf) in zip(weights, near)) / sum(weights))


class CalibratedCostModel(AnalyticCostModel):
    """The roofline, corrected per op class and size by a ``Calibration``, plus the
    measured per-node and per-inference overheads."""

    calibrated = True

    def __init__(self, calibration: Calibration):
        self.calibration = calibration

    def measured(self, node: gs.Node, device: Device) -> bool:
        return "/".join(op_key(node, device)) in self.calibration.points

    def int8_latency(self, node: gs.Node, device: Device, dynamic: bool) -> float:
        op_s, quant_s = int8_roofline(node, device, dynamic)
        family, _, kind = op_key(node, device)
        cal = self.calibration
        if dynamic and family == "matmul" and kind == "weights":
            # DynamicQuantizeMatMul: quantizing its input is part of the measured class
            key = (family, "int8", "dynamic")
            if "/".join(key) in cal.points:
                return cal.node_overhead_s + cal.factor(key, op_s + quant_s, op_width(
                    node)) * (op_s + quant_s)
        return 2 * cal.node_overhead_s + \
            cal.factor((family, "int8", kind), op_s, op_width(node), op_span(node)) * op_s + \
            cal.factor(QUANTIZE, quant_s) * quant_s

    def latency(self, node: gs.Node, roofline_s: float, device: Device) -> float:
        return self.calibration.node_overhead_s + \
            self.calibration.factor(op_key(node, device), roofline_s, op_width(node),
                                    op_span(node)) * roofline_s

    def pass_latency(self, key: Key, seconds: float, device: Device) -> float:
        return self.calibration.factor(key, seconds) * seconds

    def reorder_latency(self, kind: str, tensor: gs.Tensor, device: Device) -> float:
        seconds = 2.0 * tensor_bytes(tensor) / device.bandwidth
        return self.calibration.node_overhead_s + \
            self.calibration.factor(("layout", "float32", kind), seconds) * seconds

    def estimate(self, model: Model, device: Device, *, infer: bool = True) -> Cost:
        cost = super().estimate(model, device, infer=infer)
        cost.latency_s += self.calibration.base_s
        cal = self.calibration
        if cal.cold_s_per_byte:
            nodes = [node for graph in model.all_graphs() for node in graph.nodes]
            reads = [_weight_reads(node, device) for node in nodes]
            if sum(read for read, _ in reads) > cal.cache_bytes:  # from memory, every run
                for (_, streamed), node_cost in zip(reads, cost.nodes):
                    node_cost.latency_s += cal.cold_s_per_byte * streamed
                    cost.latency_s += cal.cold_s_per_byte * streamed
        return cost


def _weight_reads(node: gs.Node, device: Device) -> tuple[int, int]:
    """``(bytes of weights node reads in a run, those of them it pays
    Calibration.cold_s_per_byte for when they are beyond the cache)``: a matrix product's
    or attention's, or a convolution's with one output position per image (a
    squeeze-excite block's 1x1 convolution on a 1 x 1 map is a matrix-vector product:
    EfficientNet-B0's 48 <-> 1152-channel ones took 21-26 us in a profile, predicted 6-7
    without it)."""
    read = weights_read(node)
    family = op_key(node, device)[0] if read else ""
    shape = node.outputs[0].shape if family == "conv" and node.outputs else None
    streams = family in COLD_FAMILIES or (
        bool(shape) and len(shape) > 2 and all(d == 1 for d in shape[2:]))
    return read, read if streams else 0


# --------------------------------------------------------------------------- fitting
Measure = Callable[[onnx.ModelProto, dict], float]


def _nodes(proto: onnx.ModelProto, device: Device) -> list[Unit]:
    """``(op_key, roofline seconds, pays overhead, width, span, weights read, weights
    streamed)`` per node of ``proto`` (``_weight_reads``)."""
    model = _shaped(proto)
    out = []
    for node in model.graph.nodes:
        out.append((op_key(node, device), roofline(node, device)[2], not fused_dequantize(node),
                    op_width(node), op_span(node), *_weight_reads(node, device)))
    for kind, tensor in layout_reorders(model.graph, device):  # the runtime's own nodes
        out.append((("layout", "float32", kind), 2.0 * tensor_bytes(tensor) / device.bandwidth,
                    True, 1.0, float(SPAN), 0, 0))
    return out


Unit = tuple[Key, float, bool, float, float, int, int]


def _extra(long: list, short: list) -> list[Unit]:
    """The nodes the long chain has beyond the short one."""
    return list((Counter(long) - Counter(short)).elements())


def fit(probes: list[Probe], measure: Measure, device: Device, fingerprint: dict,
        progress: Callable[[int, int, str], None] | None = None,
        passes: int = 1) -> Calibration:
    """Time every probe with ``measure`` and fit a ``Calibration``. The first probe
    must be the overhead probe (a chain of one-element ops). ``passes``: times each
    probe is timed, in that many passes over all of them, its fastest time kept (a shared
    machine slows down for tens of seconds at a time: a probe timed once may land in
    such a spell, and its class then looks slower than the rest)."""
    times: list[list[float]] = [[math.inf, math.inf] for _ in probes]
    nodes: list[tuple[list, list]] = []  # (the short model's, the long one's extra)
    footprints: list[int] = []  # weights the longest model reads in a run
    for done in range(passes):
        for index, probe in enumerate(probes):
            if progress:
                progress(done * len(probes) + index, passes * len(probes), probe.name)
            short = probe.build(1)  # (built again each pass: a few hold 40 MB of weights)
            times[index][0] = min(times[index][0], measure(*short))
            long = probe.build(probe.length) if probe.chain else None
            if long:
                times[index][1] = min(times[index][1], measure(*long))
            if done == 0:
                short_nodes = _nodes(short[0], device)
                long_nodes = _nodes(long[0], device) if long else short_nodes
                nodes.append((short_nodes, _extra(long_nodes, short_nodes)
                              if long else short_nodes))
                footprints.append(sum(u[5] for u in long_nodes))
    cal = Calibration(fingerprint=fingerprint)
    cache = [(footprints[i], (times[i][1] - times[i][0]) / (p.length - 1),
              sum(u[6] for u in nodes[i][1]) / (p.length - 1))
             for i, p in enumerate(probes) if p.measures == "cache"]
    if cache:
        cal.cache_bytes, cal.cold_s_per_byte = _cache(cache)
    for index, (probe, (short_nodes, unit)) in enumerate(zip(probes, nodes)):
        short_t, long_t = times[index]
        unit_t = long_t - short_t if probe.chain else short_t - cal.base_s
        record = {"probe": probe.name, "short_s": short_t, "unit_s": unit_t}
        if probe.measures == "cache":  # (the cache's measure, not a point of its class)
            record.update(weights=footprints[index])
            cal.probes.append(record)
            continue
        if footprints[index] > cal.cache_bytes:  # its weights come from beyond the cache
            unit_t -= cal.cold_s_per_byte * sum(u[6] for u in unit)
        if index == 0:  # the overhead probe: one node per copy, no work to speak of
            cal.node_overhead_s = max(unit_t / max(len(unit), 1), 0.0)
            cal.base_s = max(short_t - cal.node_overhead_s * len(short_nodes), 0.0)
            cal.probes.append(record)
            continue
        # The probe measures the class it names, else the one with most roofline time in
        # the extra copies; the other nodes there (a Quantize before an int8 Conv) are
        # predicted as calibrated.
        totals: dict[Key, float] = {}
        for key, seconds, *_ in unit:
            totals[key] = totals.get(key, 0.0) + seconds
        named = [k for k in totals if k[0] == probe.measures]
        target = named[0] if named else max(totals, key=lambda k: totals[k])
        targets = [(s, w, sp) for k, s, _, w, sp, *_ in unit if k == target]
        rest = sum(cal.factor(k, s, w, sp) * s for k, s, _, w, sp, *_ in unit if k != target)
        overheads = cal.node_overhead_s * sum(1 for _, _, paid, *_ in unit if paid)
        work = sum(s for s, *_ in targets)
        if work <= 0:
            continue
        factor = (unit_t - overheads - rest) / work
        # one point per width the probe's ops have (a chain of expansions and projections
        # measures both at one correction)
        for width, span in sorted({(w, sp) for _, w, sp in targets}):
            group = [s for s, w, sp in targets if (w, sp) == (width, span)]
            cal.add(target, sum(group) / len(group), factor, width, span)
        # the class's share of the time measured: the fit's error on it is the error of
        # the rest's prediction divided by this (small for a first layer's conv)
        share = factor * work / unit_t if unit_t > 0 else 0.0
        record.update(key="/".join(target), roofline_s=work / len(targets), factor=factor,
                      share=round(share, 4), widths=sorted({w for _, w, _ in targets}))
        cal.probes.append(record)
    if progress:
        progress(passes * len(probes), passes * len(probes), "done")
    return cal


def _cache(chains: list[tuple[int, float, int]]) -> tuple[float, float]:
    """``(cache_bytes, cold_s_per_byte)`` from chains of one weighted op at growing weights
    (``(the chain's weights, seconds per op, weight bytes per op)``): the ops of the two
    smallest chains run warm, of the two largest cold; the cache ends between the last
    chain under halfway from warm to cold and the first over it. No step of a twentieth
    of the warm time: no cache to speak of (``inf``, 0)."""
    chains = sorted(chains)
    warm = min(t for _, t, _ in chains[:2])
    cold = min(t for _, t, _ in chains[-2:])
    if cold - warm < 0.05 * warm:
        return math.inf, 0.0
    over = next(i for i, (_, t, _) in enumerate(chains) if t > (warm + cold) / 2 and
                all(t2 > (warm + cold) / 2 for _, t2, _ in chains[i:]))
    cache = math.sqrt(chains[over - 1][0] * chains[over][0]) if over else chains[0][0] / 2
    return cache, (cold - warm) / chains[-1][2]


def static_latency(cost_model: AnalyticCostModel, proto: onnx.ModelProto, device: Device,
                   shapes: dict[str, list[int]]) -> float:
    """Predicted latency of ``proto`` with its inputs at ``shapes``."""
    return cost_model.estimate(static_model(proto, shapes), device, infer=False).latency_s


def static_model(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> Model:
    """``proto`` loaded with its inputs at ``shapes`` (symbolic dimensions fixed) and every
    intermediate shape inferred again: what the cost model estimates a deployment by."""
    return _shaped(with_input_shapes(proto, shapes))


def with_input_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``proto`` with its inputs at ``shapes`` and no intermediate or output
    shapes left to contradict them."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    for value in fixed.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            dim.Clear()
    return fixed


def judge_alternative(cost_model, device: Device | None, before: onnx.ModelProto,
                      after: onnx.ModelProto, shapes: dict[str, list[int]]) -> tuple[str | None, dict]:
    """Whether to keep a rewrite that only changes the form of a computation
    (``Pass.alternative``): ``(None, figures)`` to keep it, ``(why not, figures)`` to
    decline it. Kept only where a calibrated cost model measured the new op classes on
    this device and predicts the whole model faster at the input ``shapes``."""
    if cost_model is None or device is None or not getattr(cost_model, "calibrated", False):
        return ("a choice of form, kept only where measured faster: this device has no "
                "cost calibration (graphopt calibrate)"), {}
    old = Counter((n.domain, n.op_type) for n in before.graph.node)
    new_model = static_model(after, shapes)
    unmeasured = sorted({n.op for n in new_model.graph.nodes if old[(n.domain or "", n.op)] == 0
                         and not cost_model.measured(n, device)})
    if unmeasured:
        return (f"{', '.join(unmeasured)} not measured on this device (graphopt calibrate "
                f"measures it)"), {}
    before_s = static_latency(cost_model, before, device, shapes)
    after_s = cost_model.estimate(new_model, device, infer=False).latency_s
    figures = {"predicted_before_s": before_s, "predicted_after_s": after_s,
               "at_shapes": shapes}
    if after_s >= before_s:
        return (f"predicted slower on {device.name}: {after_s * 1e6:.1f} us against "
                f"{before_s * 1e6:.1f} us without it (inputs {shapes})"), figures
    return None, figures


# --------------------------------------------------------------------------- storage
def calibration_path(fingerprint: dict, folder: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps({"schema": SCHEMA, **fingerprint},
                                       sort_keys=True).encode()).hexdigest()[:16]
    name = str(fingerprint.get("target", "target")).replace("/", "_")
    return (folder or cache_dir()) / "calibration" / f"{name}-{digest}.json"


def save_calibration(cal: Calibration, path: Path) -> Path:
    """Write ``cal`` at ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(cal.to_dict(), indent=1, sort_keys=True) + "\n")
    os.replace(staged, path)
    return path


def read_calibration(path: Path) -> Calibration:
    try:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')}, this graphopt reads {SCHEMA}")
        return Calibration.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read the cost calibration {path}: {exc}",
                         hint="run `graphopt calibrate` again") from exc


def find_calibration(target: "Target", folder: Path | None = None) -> tuple[Calibration, Path] | None:
    """The stored calibration of ``target``'s device here, if any."""
    try:
        fingerprint = target.fingerprint()
    except GraphoptError:
        return None
    path = calibration_path(fingerprint, folder)
    if not path.is_file():
        return None
    return read_calibration(path), path


def cost_model_for(target: "Target") -> tuple[AnalyticCostModel, dict]:
    """The cost model ``optimize`` uses for ``target`` and what the report says of it:
    the calibrated one where a calibration of this device is stored, else the roofline."""
    found = find_calibration(target)
    if found is None:
        return AnalyticCostModel(), {"kind": "roofline", "calibrated": False}
    cal, path = found
    return CalibratedCostModel(cal), {"kind": "roofline calibrated by measurement",
                                      "calibrated": True, "calibration": str(path),
                                      "probes": len(cal.probes)}


def calibrate(target: "Target", probes: list[Probe], folder: Path | None = None,
              progress: Callable[[int, int, str], None] | None = None,
              passes: int = 1) -> tuple[Calibration, Path]:
    """Measure ``probes`` on ``target`` (``passes`` times each, ``fit``), fit, store;
    returns the calibration and its path."""
    missing = target.run_availability()
    if missing:
        raise UsageError(f"target {target.name!r} cannot run models here to calibrate: "
                         f"{missing}")
    fingerprint = target.fingerprint()
    cal = fit(probes, target.time_model, target.device, fingerprint, progress, passes)
    return cal, save_calibration(cal, calibration_path(fingerprint, folder))


def errors(model: CalibratedCostModel | AnalyticCostModel, device: Device,
           samples: list[tuple[onnx.ModelProto, float]]) -> list[float]:
    """Relative errors (predicted / measured - 1) of ``model`` on measured samples."""
    return [model.estimate(_shaped(proto), device, infer=False).latency_s / measured - 1
            for proto, measured in samples]


def _shaped(proto: onnx.ModelProto) -> Model:
    """``proto`` (graphopt's own export: checked when the user's model was loaded, its
    weights possibly references to a data file) with every shape inferred."""
    model = Model.from_proto(proto)
    infer_all_shapes(model)
    return model

