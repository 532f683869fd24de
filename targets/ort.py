"""ONNX Runtime on the host CPU: the artifact is the optimized ``.onnx`` file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graphopt import verify
from graphopt.cost import Device
from graphopt.ir import Model, save, saved_files
from graphopt.target import Artifact, Capabilities, Target

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
    "fuse-skip-layer-norm",
    "fuse-bias-gelu",
    "eliminate-dead-code",
)

_CORES = os.cpu_count() or 1

# CPU flags (Linux /proc/cpuinfo names) of int8 dot-product instructions ONNX Runtime's
# MLAS kernels use: VNNI (AVX-512 or AVX), AMX, Arm dotprod (asimddp) / i8mm.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The host CPU's feature flags (empty where ``path`` is unreadable: not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def host_device(flags: frozenset[str] | None = None, cores: int = _CORES) -> Device:
    """The host CPU as the cost model sees it. int8 peaks: with VNNI/dotprod one
    instruction does 4 int8 MACs per 32-bit lane (4x float32); without, x86 needs
    VPMADDUBSW+VPMADDWD+VPADDD (Intel: ~1.33x float32 in theory) and ORT's MLAS measured
    ~2x float32 on ResNet-18 convolutions here (AVX2, 7-bit weights)."""
    flags = cpu_flags() if flags is None else flags
    fast = bool(flags & INT8_DOT_FLAGS) if flags else None
    # A 3 GHz AVX2 core: 2 FMA units x 8 float32 lanes x 2 FLOPs per cycle.
    fp32 = cores * 96e9
    return Device(name="host-cpu", peak_flops={"float32": fp32, "float16": fp32,
                                               "int8": fp32 * (4.0 if fast else 2.0)},
                  bandwidth=20e9, cores=cores, node_overhead_s=1.5e-6, int8_fast=fast)


class OrtTarget(Target):
    """ONNX Runtime, CPU execution provider."""

    name = "ort"
    description = "ONNX Runtime on this machine's CPU"
    produces = "an optimized .onnx file"
    device = host_device()
    capabilities = Capabilities(domains=frozenset({"", "com.microsoft"}),
                                dtypes=frozenset({"float32", "float16", "int8", "uint8"}))
    default_pipeline = LOSSLESS_PIPELINE

    def lower(self, model: Model, out: Path) -> Artifact:
        out = Path(out)
        path = out / "model.onnx" if out.is_dir() or not out.suffix else out
        save(model, path)
        return Artifact(target=self.name, path=path, files=saved_files(path), format="onnx")

    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return verify.run(verify.session(artifact.path, optimize=True), feeds)
