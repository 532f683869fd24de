"""The target interface: what a backend runs, how it lowers a model, how it runs the result.

Targets are plugins (entry-point group ``graphopt.targets``). The difference between
targets lives here, in data on each target, never in ``if target == ...`` chains.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx

from graphopt.cost import Device
from graphopt.errors import UsageError, VerificationError
from graphopt.ir import Model

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

# CPU flags (Linux /proc/cpuinfo names) that change which kernels a runtime picks: what a
# cost calibration depends on besides the CPU model.
ISA_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                       "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
                       "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "sve2", "fphp"})


def _cpuinfo(path: str, keys: tuple[str, ...]) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The host CPU's feature flags (empty where ``path`` is unreadable: not Linux)."""
    return frozenset((_cpuinfo(path, ("flags", "Features")) or "").split())


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The host CPU's model name (``platform.processor()`` where /proc is absent)."""
    import platform

    return _cpuinfo(path, ("model name", "Model", "CPU part")) or platform.processor() or \
        platform.machine()


# A compiled artifact is a folder holding this file: ``target`` names the target that
# wrote it, ``artifact`` the main file beside it and ``artifact_format`` its
# ``Artifact.format``.
MANIFEST = "manifest.json"


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
    # The report's reason where ``measure`` gives no time (the artifact runs here, but
    # not on the device it is built for).
    untimed_note: ClassVar[str] = "the artifact runs under emulation here: no device timing"
    produces: ClassVar[str] = "an optimized .onnx file"
    device: ClassVar[Device]
    capabilities: ClassVar[Capabilities] = Capabilities()
    default_pipeline: ClassVar[tuple[str, ...]] = ()
    # Options the target wants of a pass, by pass name ({"quantize-int8": {"symmetric-
    # activations": True}}): applied wherever the pass is built for this target, options
    # the user gives win.
    pass_defaults: ClassVar[dict[str, dict]] = {}
    # Artifact formats ``lower(..., format=F)`` accepts (``--format``), the default first;
    # empty: the target has one format and ``lower`` takes no ``format`` keyword.
    formats: ClassVar[tuple[str, ...]] = ()
    # ``lower(..., tune_trials=N)`` is accepted: the target tunes kernels by measurement.
    tunable: ClassVar[bool] = False
    # The artifact is code compiled from the optimized ONNX (not that ONNX itself), so
    # ``optimize`` runs it against the original by default where it can run here.
    compiled: ClassVar[bool] = False
    # The artifact runs on ONNX Runtime's CPU kernels (the ``ort`` target; ``ort-mobile``,
    # compiled to a .ort file, too): int8 passes then write what those kernels compute
    # exactly (7-bit weights where their 16-bit sums would saturate, this machine's
    # fused kernels in the score). Targets that are not ``compiled`` run ORT anyway.
    onnxruntime_kernels: ClassVar[bool] = False
    # The artifact check never holds the target's runtime and ONNX Runtime's session at
    # once (each holds about a model's weights): the artifact runs first, ``release``
    # frees its runtime, then ONNX Runtime runs; timing goes one side after the other.
    runtimes_apart: ClassVar[bool] = False
    # Settings of the artifact ``--target-option KEY=VALUE`` gives (``with_options``):
    # name -> what it does and the values it takes.
    options: ClassVar[dict[str, str]] = {}

    def supports(self, op_type: str, domain: str = "") -> bool:
        return self.capabilities.supports(op_type, domain)

    def availability(self) -> str | None:
        """``None`` when the target can lower models here, else what to install."""
        return None

    def run_availability(self) -> str | None:
        """``None`` when its artifacts can also run here (verification, timing), else
        what is missing (an emulator, a GPU, a runtime library)."""
        return self.availability()

    def prepare(self, model: Model, input_shapes: dict[str, list[int]] | None) -> None:
        """Adapt the working copy in place before the pipeline runs. ``input_shapes`` are
        the shapes given for probing (``--input-shape``); a compiler that wants static
        shapes may fix them here so the pipeline folds the shape arithmetic. Default:
        nothing."""

    def connect(self, address: str) -> "Target":
        """This target with its artifacts run (and tuned) on a remote device at
        ``address`` (``HOST:PORT[:KEY]``, ``--rpc``). Default: the target runs only here."""
        raise UsageError(f"target {self.name!r} runs its artifacts on this machine only; "
                         f"--rpc is for targets that run on a remote device")

    @abstractmethod
    def lower(self, model: Model, out: Path) -> Artifact:
        """Write the artifact for ``model`` at ``out``."""

    @abstractmethod
    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the artifact here on ``feeds`` and return its outputs by name."""

    def open(self, path: Path) -> Artifact:
        """The artifact at ``path`` as ``lower`` wrote it: a file, or a folder with a
        manifest naming its main file."""
        path = Path(path)
        if path.is_dir():
            manifest = read_manifest(path)
            main = manifest.get("artifact")
            if not main or not (path / main).is_file():
                raise UsageError(f"{path / MANIFEST} names no artifact file that exists "
                                 f"(artifact: {main!r})")
            check_hashes(path, manifest)  # a file changed since lowering is found here
            return Artifact(target=self.name, path=path / main,
                            files=sorted(p for p in path.rglob("*") if p.is_file()),
                            format=manifest.get("artifact_format", "unknown"))
        if not path.is_file():
            raise UsageError(f"no artifact at {path}")
        return Artifact(target=self.name, path=path, files=[path], format=path.suffix[1:])

    def with_options(self, **values: str) -> "Target":
        """This target with the artifact settings ``values`` (``--target-option``).
        Default: the target has none, so any is a usage error naming it."""
        unknown = sorted(set(values) - set(self.options))
        if unknown:
            raise UsageError(f"target {self.name!r} has no option {unknown[0]!r}",
                             hint=f"its options: {', '.join(self.options)}" if self.options
                             else "this target takes no --target-option")
        return self

    def option_values(self) -> dict[str, str]:
        """The settings of ``options`` this instance has (what the result depends on)."""
        return {}

    def run_details(self) -> dict:
        """Facts about the last ``run`` beyond ``ran_on`` that the report keeps (e.g. which
        nodes ran on which processor); default: none."""
        return {}

    def with_threads(self, threads: int) -> "Target":
        """This target running on ``threads`` threads (``--threads``). Default: the
        target has no such setting."""
        raise UsageError(f"target {self.name!r} has no thread setting")

    def fingerprint(self) -> dict:
        """What a calibration of this target's cost model depends on (``graphopt
        calibrate`` stores one per fingerprint). Default: the target, its device and
        this machine's CPU; a target that runs elsewhere or has a runtime version to
        record overrides it."""
        return {"target": self.name, "device": self.device.name, "cpu": cpu_model(),
                "isa": sorted(cpu_flags() & ISA_FLAGS), "cores": self.device.cores}

    def time_model(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        """Seconds of one run of ``proto`` on the target's device (the cost model's
        calibration times micro-benchmarks with it). Default: lowered into a temporary
        folder, then ``measure``; a target whose measurements say nothing about its
        device (emulation) cannot calibrate."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="graphopt-time-") as tmp:
            artifact = self.lower(Model.from_proto(proto), Path(tmp) / "out")
            seconds = self.measure(artifact, feeds)
        if seconds is None:
            raise UsageError(f"target {self.name!r} cannot time models on its device here")
        return seconds

    def release(self, artifact: Artifact) -> None:
        """Free what ``run``/``measure`` keep for ``artifact`` (a loaded interpreter);
        default: nothing is kept."""

    def ran_on(self) -> str | None:
        """Where the last ``run``/``measure`` of an artifact executed, for the report's
        ``artifact`` section (``"this machine's Chromium 139 ..."``); ``None``: nothing
        to add to the target's device."""
        return None

    def int8_layer_costs(self, node: "gs.Node") -> tuple[float, float] | None:
        """Measured ``(float seconds, int8 seconds)`` of one run of layer ``node`` (Conv,
        Gemm or MatMul with a constant weight, static shapes) on this target's own
        kernels, for ``quantize-int8``'s ``require-speedup`` (int8 in the QDQ form it
        writes; a model input the layer reads is quantized in its time); ``None``: not
        measured here, the cost model's estimates decide. Default: ``None``."""
        return None

    def profile_nodes(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      runs: int) -> tuple[dict[str, tuple[str, float]], float] | None:
        """Per-kernel times of ``runs`` runs of ``proto`` on the device: ``({kernel
        name: (op type, median seconds per run)}, median seconds of a run)``, or
        ``None`` where the target has no profiler (``graphopt profile``)."""
        return None

    def measure(self, artifact: Artifact, feeds: dict[str, np.ndarray], *,
                repeat: int = 20) -> float | None:
        """Median seconds of one run of the artifact on the device it is built for, or
        ``None`` where no run here says anything about that device (emulation). Default:
        wall time of ``run`` here after one warm-up run."""
        self.run(artifact, feeds)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self.run(artifact, feeds)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def folder_output(target: str, out, contents: str) -> Path:
    """``out`` as the folder a target writes (``contents``: what goes in, for the
    message); a path naming a file, or with a file's suffix, is a usage error."""
    out = Path(out)
    if (out.suffix and not out.is_dir()) or out.is_file():
        raise UsageError(f"target {target!r} writes a folder ({contents}), not {str(out)!r}",
                         hint="give -o a folder name without a suffix")
    return out


def read_manifest(folder: Path) -> dict:
    """The manifest of the artifact folder ``folder`` (a UsageError names what is wrong)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the artifact manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("target"), str):
        raise UsageError(f"{path} is not a graphopt artifact manifest (no \"target\")")
    return manifest


# ---------------------------------------------------------------------- manifest helpers
def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs, IR < 4)."""
    inits = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def value_info(value: onnx.ValueInfoProto) -> dict:
    """``{"name", "shape", "dtype"}`` of a graph input/output as a manifest lists it:
    symbolic dimensions by name (``None`` where unnamed), dtype as numpy names it."""
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name \
        if tensor.elem_type else None
    return {"name": value.name, "shape": shape, "dtype": dtype}


def all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            for sub in attr.graphs:
                yield from all_nodes(sub)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_hashes(folder: Path, manifest: dict) -> None:
    """Every file the manifest of the artifact folder ``folder`` hashes (``sha256``) is
    there with that hash; else a ``VerificationError`` naming each file missing or
    changed since it was written."""
    bad = []
    for name, digest in sorted(manifest.get("sha256", {}).items()):
        path = folder / name
        if not path.resolve().is_relative_to(folder.resolve()):
            bad.append(f"{name} (outside the folder)")
        elif not path.is_file():
            bad.append(f"{name} (missing)")
        elif sha256(path) != digest:
            bad.append(f"{name} (changed)")
    if bad:
        raise VerificationError(f"{folder} does not match its {MANIFEST}: "
                                f"{', '.join(bad)} since it was written",
                                hint=f"lower the model again with --target "
                                     f"{manifest.get('target', '...')}")


def move_in(stage: Path, out: Path, files: list[str], format_id: str) -> None:
    """A target's staged folder ``stage`` moved to ``out``: in one rename when ``out``
    does not exist, else its ``files`` one by one (each ``os.replace`` atomic; list the
    manifest last), removing files an earlier lowering of the same ``format_id`` listed
    in its manifest that this one did not write."""
    if not out.exists():
        os.chmod(stage, 0o755)  # mkdtemp makes 0700
        os.replace(stage, out)
        return
    try:
        old = read_manifest(out)
        stale = old.get("files", []) if old.get("format") == format_id else []
    except UsageError:
        stale = []
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / name, out / name)
    for name in stale:
        path = out / name
        if name not in files and path.resolve().is_relative_to(out.resolve()):
            path.unlink(missing_ok=True)
