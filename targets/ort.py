"""ONNX Runtime on the host CPU: the artifact is the optimized ``.onnx`` file, or with
``format="ort"`` ONNX Runtime's ``.ort`` file plus ``<file>.session.json``."""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from graphopt import verify
from graphopt.cost import Device
from graphopt.errors import UsageError
from graphopt.ir import Model, save, saved_files
from graphopt.paths import TEMP_PREFIX
from graphopt.registry import pass_registry
from graphopt.target import Artifact, Capabilities, Target, cpu_flags

# The lossless pipeline. Shape folding feeds constant folding; chains and no-ops expose
# more folding; fusions fold arithmetic into weights; dead code and duplicates are swept
# last. The manager repeats the whole list until nothing changes.
LOSSLESS_PIPELINE = (
    "eliminate-identity",
    "eliminate-noops",
    "fold-shapes",
    "fold-constants",
    "fold-reshape-targets",
    "merge-shape-chains",
    "eliminate-common-subexpressions",
    "merge-duplicate-initializers",
    "sink-transposes",
    "fuse-pad-conv",
    "fuse-conv-bn",
    "fuse-conv-add",
    "fuse-conv-mul",
    "fuse-matmul-add",
    "fold-transpose-into-gemm",
    "fuse-hard-swish",
    "fuse-silu",
    "fuse-conv-act",  # after the conv folds above: they match Conv, not FusedConv
    "fuse-layer-norm",
    "fuse-rms-norm",
    "fuse-gelu",
    "fuse-attention",
    # A choice of form (Pass.alternative): kept only where this device's calibrated cost
    # model predicts it faster. ONNX Runtime 1.32's SkipLayerNormalization CPU kernel
    # measured 5x slower than Add + LayerNormalization on an AVX2 CPU (296 vs 57 us at
    # [1, 128, 384], one thread).
    "fuse-skip-layer-norm",
    "fuse-bias-gelu",
    # After the activation and norm fusions: their patterns end in a Mul or Add by a
    # constant (GELU's 0.5, LayerNorm's scale and bias) that this fold would take.
    "fuse-affine-gemm",
    "eliminate-dead-code",
)

_CORES = os.cpu_count() or 1

NAME_MAX = 255  # bytes of a file name (Linux, macOS, Windows)


@functools.cache
def disabled_optimizers() -> tuple[str, ...]:
    """ONNX Runtime's own session rewrites into forms graphopt chooses by measurement
    (``Pass.runtime_rewrites`` of the installed alternatives), left out of every session
    this target measures and of the ``.ort`` files it writes (session.json records them):
    where the calibrated cost model declined a form (SkipLayerNormalization on an AVX2
    CPU: MiniLM ran 1.05x faster than its input with ORT's fusion off, 0.97x with it on),
    ORT must not put it back; where graphopt kept it, ORT finds nothing left to fuse."""
    loaded, _ = pass_registry().load_all()
    return tuple(sorted({rewrite for cls in loaded.values()
                         if getattr(cls, "alternative", False)
                         for rewrite in getattr(cls, "runtime_rewrites", {}).get("ort", ())}))

# CPU flags (Linux /proc/cpuinfo names) of int8 dot-product instructions ONNX Runtime's
# MLAS kernels use: VNNI (AVX-512 or AVX), AMX, Arm dotprod (asimddp) / i8mm.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def host_device(flags: frozenset[str] | None = None, cores: int = _CORES,
                blocked_layout: bool = True) -> Device:
    """The host CPU as ONNX Runtime's cost model sees it (``blocked_layout=False``: for a
    runtime without ORT's NCHWc layout, e.g. LiteRT's XNNPACK). int8 peaks: with
    VNNI/dotprod one instruction does 4 int8 MACs per 32-bit lane (4x float32); without,
    x86 needs VPMADDUBSW+VPMADDWD+VPADDD (Intel: ~1.33x float32 in theory) and ORT's
    MLAS measured ~2x float32 on ResNet-18 convolutions here (AVX2, 7-bit weights)."""
    flags = cpu_flags() if flags is None else flags
    fast = bool(flags & INT8_DOT_FLAGS) if flags else None
    # A 3 GHz AVX2 core: 2 FMA units x 8 float32 lanes x 2 FLOPs per cycle.
    fp32 = cores * 96e9
    return Device(name="host-cpu", peak_flops={"float32": fp32, "float16": fp32,
                                               "int8": fp32 * (4.0 if fast else 2.0)},
                  bandwidth=20e9, cores=cores, node_overhead_s=1.5e-6, int8_fast=fast,
                  channel_multiple=16 if "avx512f" in (flags or ()) else 8,
                  blocked_layout=blocked_layout and bool({"avx2", "avx512f"} & (flags or set())))


class OrtTarget(Target):
    """ONNX Runtime, CPU execution provider."""

    name = "ort"
    description = "ONNX Runtime on this machine's CPU"
    produces = "an optimized .onnx file"
    device = host_device()
    capabilities = Capabilities(domains=frozenset({"", "com.microsoft"}),
                                dtypes=frozenset({"float32", "float16", "int8", "uint8"}))
    default_pipeline = LOSSLESS_PIPELINE
    formats = ("onnx", "ort")
    onnxruntime_kernels = True

    def __init__(self, threads: int | None = None):
        """``threads``: ONNX Runtime's intra-op threads for runs, timings and the cost
        model's device (default: every core)."""
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        self.threads = threads or _CORES
        if threads is not None:
            self.device = host_device(cores=self.threads)

    def with_threads(self, threads: int) -> "OrtTarget":
        return OrtTarget(threads=threads)

    def fingerprint(self) -> dict:
        import onnxruntime as ort

        return {**super().fingerprint(), "onnxruntime": ort.__version__,
                "threads": self.threads}

    def profile_nodes(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      runs: int) -> tuple[dict[str, tuple[str, float]], float]:
        """ONNX Runtime's profiler over ``runs`` runs (plus one warm-up), in a session as
        this target's artifacts get one."""
        from graphopt.profile import median_by_name

        with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as tmp:
            session = self._session(proto, profile_prefix=str(Path(tmp) / "ort"))
            for _ in range(runs + 1):
                session.run(None, feeds)
            trace = session.end_profiling()
            events = json.loads(Path(trace).read_text())
        return median_by_name(events)

    def _session(self, proto: onnx.ModelProto, profile_prefix: str | None = None):
        """A session for ``proto`` as this target's artifacts get one."""
        return verify.session(proto, optimize=True, threads=self.threads,
                              disabled_optimizers=disabled_optimizers(),
                              profile_prefix=profile_prefix)

    def time_model(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
        """Seconds of one run (the lowest of three rounds' medians). With one thread ORT
        computes on the calling thread, so its CPU time is timed (what other jobs on a
        shared machine disturb least); else wall time."""
        session = self._session(proto)
        clock = time.thread_time if self.threads == 1 else time.perf_counter
        for _ in range(3):
            session.run(None, feeds)
        medians = []
        for _ in range(3):  # the least disturbed of three rounds
            times: list[float] = []
            deadline = time.perf_counter() + 0.1
            while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
                start = clock()
                session.run(None, feeds)
                times.append(clock() - start)
            medians.append(statistics.median(times))
        return min(medians)

    def lower(self, model: Model, out: Path, *, format: str = "onnx") -> Artifact:
        out = Path(out)
        if format == "ort":
            return self._lower_ort(model, out / "model.ort" if out.is_dir() or not out.suffix
                                   else out)
        path = out / "model.onnx" if out.is_dir() or not out.suffix else out
        save(without_value_info(model), path)
        return Artifact(target=self.name, path=path, files=saved_files(path), format="onnx")

    def _lower_ort(self, model: Model, path: Path) -> Artifact:
        """ONNX Runtime's own conversion (what ``onnxruntime.tools.convert_onnx_models_to_ort``
        does, level ``all``): a session at ORT_ENABLE_ALL saves its optimized graph in ORT
        format. ENABLE_ALL includes the NCHWc layout rewrite, which is specific to this
        CPU's vector width: the ``ort`` target is this machine. ``<path>.session.json``
        records the options the file was made with."""
        import onnxruntime as ort

        path.parent.mkdir(parents=True, exist_ok=True)
        meta = path.with_name(path.name + ".session.json")
        if len(os.fsencode(meta.name)) > NAME_MAX:
            raise UsageError(f"output name {path.name[:40]}... is too long: {meta.name[:40]}... "
                             f"(beside it) would exceed {NAME_MAX} bytes",
                             hint="choose a shorter output name")
        with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
            source = save(model, Path(tmp) / "model.onnx")
            # Short temporary names (not derived from the output's): a name near the
            # file system's 255-byte limit still has room for the random part.
            fd, staged = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".ort")
            os.close(fd)
            staged_meta = None
            try:
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                options.optimized_model_filepath = staged
                options.add_session_config_entry("session.save_model_format", "ORT")
                options.log_severity_level = 3
                ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=list(disabled_optimizers()))
                session_info = {
                    "format": "ort",
                    "onnxruntime": ort.__version__,
                    "providers": ["CPUExecutionProvider"],
                    "graph_optimization_level": "ORT_ENABLE_ALL",
                    "disabled_optimizers": list(disabled_optimizers()),
                    "note": "graph already optimized at this level, NCHWc layout included "
                            "(this CPU); load with this onnxruntime version or a newer one "
                            "reading the same ORT format version",
                }
                fd, staged_meta = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(session_info, indent=2) + "\n")
                for done in (staged, staged_meta):
                    os.chmod(done, 0o644)  # mkstemp makes 0600; save() gives 0644 too
                os.replace(staged, path)
                os.replace(staged_meta, meta)
            finally:
                for leftover in (staged, staged_meta):
                    if leftover and os.path.exists(leftover):
                        os.unlink(leftover)
        return Artifact(target=self.name, path=path, files=[path, meta], format="ort")

    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        path = Path(artifact.path)
        return verify.run(_session(str(path.resolve()), path.stat().st_mtime_ns,
                                   self.threads), feeds)


def without_value_info(model: Model) -> onnx.ModelProto:
    """The model without shape annotations of intermediate tensors (graph inputs and
    outputs keep theirs; ONNX Runtime infers the rest at load). Annotated, ORT 1.32 at
    ORT_ENABLE_ALL proves the residual Add's operands equal in shape and fuses
    Add + LayerNormalization into its slow SkipLayerNormalization (see LOSSLESS_PIPELINE):
    MiniLM ran 0.978x the input's speed with them, 1.054x without; resnet18 and
    mobilenet_v2 the same either way (benchmarks/ort_target.py)."""
    proto = model.to_onnx(references=True)  # (save reads them in as it writes)
    del proto.graph.value_info[:]
    return proto


def artifact_session(path: str | os.PathLike, threads: int = _CORES):
    """An ORT session for a file this target wrote, with the session options it expects
    (``<file>.session.json`` of a ``.ort`` file): ORT_ENABLE_ALL, ``threads`` threads."""
    meta = Path(str(path) + ".session.json")
    disabled = json.loads(meta.read_text()).get("disabled_optimizers", []) \
        if meta.is_file() else []
    return verify.session(path, optimize=True, threads=threads,
                          disabled_optimizers=tuple(disabled))


@functools.lru_cache(maxsize=8)
def _session(path: str, mtime_ns: int, threads: int = _CORES):
    """One session per file version (creating one costs more than a small model's run)."""
    return artifact_session(path, threads)
