"""ONNX Runtime Mobile: ``--target ort-mobile`` writes what an app's build of ONNX
Runtime needs, in a folder::

    out/model.ort                    the optimized graph in ONNX Runtime's ORT format,
                                     made for an Arm phone's CPU
    out/required_operators.config    the operators it uses: an app build passes it to
                                     ONNX Runtime's ``build.sh --minimal_build
                                     --include_ops_by_config`` to keep only their kernels
    out/manifest.json                inputs/outputs, how the file was made, sha256 of each

``model.ort`` is made the way ONNX Runtime's converter makes it for Arm
(``python -m onnxruntime.tools.convert_onnx_models_to_ort --target_platform arm``,
"fixed" optimization style): a session at ORT_ENABLE_ALL that saves its graph in ORT
format, without the NCHWc layout rewrite (blocked for an x86 CPU's vector width) and
with QDQ int8 left to the int8 kernels Arm builds have (``session.qdqisint8allowed``).
graphopt's own rewrites that ORT would undo stay off (``disabled_optimizers``), as for the
``ort`` target. The operator list is ONNX Runtime's own reading of the ``.ort`` file
(``create_config_from_models``).

The runtime here is this machine's ONNX Runtime (a full build): ``run`` loads
``model.ort`` with the session options an app would use, so ``optimize`` and ``graphopt
verify out/ -r model.onnx`` check the file itself against ONNX Runtime on the original;
timings are this CPU's, not a phone's.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx

from graphopt import verify
from graphopt.ir import Model, save
from graphopt.ort_tools import ort_tool
from graphopt.paths import TEMP_PREFIX
from graphopt.target import (MANIFEST, Artifact, folder_output, graph_inputs, move_in,
                             read_manifest, sha256, value_info)
from graphopt.targets.ort import OrtTarget, disabled_optimizers

FORMAT = "graphopt-ort-mobile/1"
MODEL_FILE = "model.ort"
CONFIG_FILE = "required_operators.config"
# What convert_onnx_models_to_ort leaves out for --target_platform arm, and the session
# option it sets there.
ARM_DISABLED = ("NchwcTransformer",)
ARM_CONFIG = {"session.qdqisint8allowed": "1"}


class OrtMobileTarget(OrtTarget):
    """ONNX Runtime Mobile on a phone: the ``.ort`` file and its operator list."""

    name = "ort-mobile"
    description = ("ONNX Runtime Mobile (an app's reduced build): ORT format for Arm, "
                   "verified in this machine's ONNX Runtime")
    produces = f"a folder: {MODEL_FILE}, {CONFIG_FILE}, {MANIFEST}"
    formats = ("ort",)
    compiled = True  # the artifact is not the ONNX model: run and check it

    def with_threads(self, threads: int) -> "OrtMobileTarget":
        return OrtMobileTarget(threads=threads)

    def lower(self, model: Model, out: Path, *, format: str = "ort") -> Artifact:
        out = folder_output(self.name, out, f"{MODEL_FILE}, {CONFIG_FILE}")
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=TEMP_PREFIX))
        try:
            with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
                source = save(model, Path(tmp) / "model.onnx")
                made = _write_ort(source, stage / MODEL_FILE)
            tool = ort_tool("ort_format_model.utils")
            logging.getLogger(tool.log.name).setLevel(logging.WARNING)  # not "Created..."
            tool.create_config_from_models([stage / MODEL_FILE], stage / CONFIG_FILE,
                                           enable_type_reduction=False)
            _drop_paths(stage / CONFIG_FILE)
            proto = model.to_onnx(references=True)
            files = [MODEL_FILE, CONFIG_FILE]
            manifest = {
                "format": FORMAT,
                "target": self.name,
                "description": self.description,
                "artifact": MODEL_FILE,
                "artifact_format": "ort",
                "operators_config": CONFIG_FILE,
                "operators": _operators(stage / CONFIG_FILE),
                "inputs": [value_info(v) for v in graph_inputs(proto)],
                "outputs": [value_info(v) for v in proto.graph.output],
                "session": made,
                "model_content_hash": model.content_hash(),
                "files": files + [MANIFEST],
                "sha256": {name: sha256(stage / name) for name in files},
                "toolchain": {"onnx": onnx.__version__, "python": platform.python_version()},
            }
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            move_in(stage, out, [*files, MANIFEST], FORMAT)
        finally:
            if stage.exists():
                for leftover in stage.iterdir():
                    leftover.unlink()
                stage.rmdir()
        return Artifact(target=self.name, path=out / MODEL_FILE,
                        files=[out / f for f in (MODEL_FILE, CONFIG_FILE, MANIFEST)],
                        format="ort")

    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        path = Path(artifact.path)
        return verify.run(_session(str(path.resolve()), path.stat().st_mtime_ns,
                                   self.threads), feeds)

    def measure(self, artifact: Artifact, feeds: dict[str, np.ndarray], *,
                repeat: int = 20) -> float | None:
        return super(OrtTarget, self).measure(artifact, feeds, repeat=repeat)


def _write_ort(source: Path, path: Path) -> dict:
    """``model.ort`` of the ONNX file ``source``, as the converter makes it for Arm;
    returns the session settings the manifest records (and ``run`` uses)."""
    import onnxruntime as ort

    disabled = [*ARM_DISABLED, *disabled_optimizers()]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    for key, value in ARM_CONFIG.items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled)
    return {"made_by": f"onnxruntime {ort.__version__}", "target_platform": "arm",
            "graph_optimization_level": "ORT_ENABLE_ALL", "optimization_style": "fixed",
            "disabled_optimizers": disabled, "config_entries": dict(ARM_CONFIG)}


@functools.lru_cache(maxsize=8)
def _session(path: str, mtime_ns: int, threads: int):
    """A session for a ``model.ort`` this target wrote, with the settings it was made
    with (its manifest's), one per file version."""
    import onnxruntime as ort

    made = read_manifest(Path(path).parent).get("session", {})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in made.get("config_entries", {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=made.get("disabled_optimizers", []))


def _drop_paths(config: Path) -> None:
    """ORT's config starts with comment lines naming the model files it was read from
    (here a temporary folder): name the file alone, so the output does not depend on
    where it was made."""
    lines = config.read_text().splitlines()
    kept = [f"# - {MODEL_FILE}" if line.startswith("# - ") else line for line in lines]
    config.write_text("\n".join(kept) + "\n")


def _operators(config: Path) -> dict[str, list[str]]:
    """``domain;opset;Op1,Op2`` lines of the config as ``{"domain:opset": [ops]}``."""
    ops = {}
    for line in config.read_text().splitlines():
        if line and not line.startswith("#"):
            domain, opset, names = line.split(";", 2)
            ops[f"{domain}:{opset}"] = names.split(",")
    return ops
