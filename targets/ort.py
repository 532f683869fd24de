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
    "fuse-pad-conv",
    "fuse-conv-bn",
    "fuse-conv-add",
    "fuse-conv-mul",
    "fuse-matmul-add",
    "eliminate-dead-code",
)

_CORES = os.cpu_count() or 1


class OrtTarget(Target):
    """ONNX Runtime, CPU execution provider."""

    name = "ort"
    description = "ONNX Runtime on this machine's CPU"
    produces = "an optimized .onnx file"
    # A 3 GHz AVX2 core: 2 FMA units x 8 float32 lanes x 2 FLOPs per cycle.
    device = Device(name="host-cpu", peak_flops={"float32": _CORES * 96e9,
                                                 "float16": _CORES * 96e9,
                                                 "int8": _CORES * 192e9},
                    bandwidth=20e9, cores=_CORES, node_overhead_s=1.5e-6)
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
