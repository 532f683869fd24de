"""The Apache TVM targets (x86, arm, arm-a76, arm-a55): presets are data on one class;
lowering writes model.so + model.onnx + manifest.json; the library runs here (x86) or under
qemu-user with the aarch64 sysroot (arm) and matches ONNX Runtime on the original model.

Skips, each with its reason: TVM not installed (``pip install 'graphopt[tvm]'``), no
aarch64 cross linker (``apt-get install g++-aarch64-linux-gnu``), no qemu-user or no
sysroot (``apt-get install qemu-user``, ``python -m graphopt.targets.tvm_sysroot``).

Each (target, model) is compiled once per session (module-scoped cache); compiling is
what costs (5-15 s a model on 2 cores), a run takes milliseconds here and ~3 s under qemu
(mostly starting the emulated Python).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import PluginError, UsageError
from graphopt.registry import create_target, target_registry
from tests import zoo
from tests.helpers import check_outputs, print_timings_at_exit

HAS_TVM = importlib.util.find_spec("tvm") is not None
CROSS_LINKER = "aarch64-linux-gnu-g++"
ATOL = 1e-4
EM_AARCH64 = 183
EM_X86_64 = 62

needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="Apache TVM is not installed "
                               "(pip install 'graphopt[tvm]')")
needs_cross = pytest.mark.skipif(shutil.which(CROSS_LINKER) is None,
                                 reason=f"no {CROSS_LINKER} (apt-get install "
                                        f"g++-aarch64-linux-gnu)")


def _qemu_missing() -> str | None:
    from graphopt.targets import tvm_sysroot

    if tvm_sysroot.qemu() is None:
        return "no qemu-aarch64 (apt-get install qemu-user)"
    root, why = tvm_sysroot.status()
    return None if root else f"{why} (python -m graphopt.targets.tvm_sysroot)"


needs_qemu = pytest.mark.skipif(_qemu_missing() is not None, reason=str(_qemu_missing()))


# ---------------------------------------------------------------- models and inputs
def _mobilenet():
    x = np.random.default_rng(0).standard_normal((2, *zoo.CNN_INPUT)).astype(np.float32)
    return zoo.mobilenet_cnn(), None, {"input": x}


def _bert():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, zoo.BERT_TINY_VOCAB, (2, 8)).astype(np.int64)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    # TVM's ONNX frontend cannot compile this export's dynamic-shape arithmetic (Range,
    # Where-computed Expand shapes) with symbolic batch/sequence: compile for 2x8.
    shapes = {"input_ids": [2, 8], "attention_mask": [2, 8]}
    return zoo.bert_tiny(), shapes, {"input_ids": ids, "attention_mask": mask}


MODELS = {"mobilenet_cnn": _mobilenet, "bert_tiny": _bert}
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """``lowered(target, model) -> (OptimizeResult, proto, feeds)``, compiled once."""
    cache = {}

    def lower(target: str, model: str):
        if (target, model) not in cache:
            proto, shapes, feeds = MODELS[model]()
            out = tmp_path_factory.mktemp(f"{target}-{model}") / "artifact"
            start = time.perf_counter()
            result = graphopt.optimize(proto, target=target, output=out, input_shapes=shapes)
            TIMINGS[f"optimize+lower {target} {model}"] = time.perf_counter() - start
            cache[target, model] = (result, proto, feeds)
        return cache[target, model]

    return lower


def _check_outputs(got: dict, want: dict) -> None:
    check_outputs(got, want, ATOL)


def _elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert header[4] == 2 and header[5] == 1, "not a 64-bit little-endian ELF"
    return struct.unpack_from("<H", header, 18)[0]


def _timed_run(target, artifact, feeds, label):
    start = time.perf_counter()
    out = target.run(artifact, feeds)
    TIMINGS[label] = time.perf_counter() - start
    return out


@pytest.fixture(scope="module", autouse=True)
def _report_timings(request):
    """Print the timings at the very end (after capture has stopped)."""
    yield
    print_timings_at_exit(request, "TVM target timings", dict(TIMINGS))


# ---------------------------------------------------------------- x86 (this machine)
@needs_tvm
@pytest.mark.parametrize("model", list(MODELS))
def test_x86_matches_ort(lowered, run_ort, model):
    result, proto, feeds = lowered("x86", model)
    artifact = result.artifact
    assert artifact.format == "tvm-relax-vm"
    assert _elf_machine(artifact.path) == EM_X86_64
    out = _timed_run(graphopt.get_target("x86"), artifact, feeds, f"run x86 {model}")
    _check_outputs(out, run_ort(proto, feeds))


@needs_tvm
def test_x86_keeps_the_symbolic_batch(lowered, run_ort):
    result, proto, _ = lowered("x86", "mobilenet_cnn")
    manifest = json.loads((result.artifact.path.parent / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "input", "shape": ["batch", 3, 32, 32],
                                   "dtype": "float32"}]
    x = np.random.default_rng(9).standard_normal((5, *zoo.CNN_INPUT)).astype(np.float32)
    _check_outputs(graphopt.get_target("x86").run(result.artifact, {"input": x}),
                   run_ort(proto, {"input": x}))


@needs_tvm
def test_manifest_describes_the_artifact(lowered):
    import tvm

    result, _, _ = lowered("x86", "bert_tiny")
    folder = result.artifact.path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx",
                                                        "model.so"]
    assert sorted(map(Path, result.report["artifact_files"])) == sorted(folder.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["target"] == "x86" and manifest["library"] == "model.so"
    assert manifest["artifact"] == "model.so"  # what graphopt.target.Target.open reads
    assert manifest["llvm_target"]["kind"] == "llvm"
    assert manifest["llvm_target"]["mcpu"] not in ("native", "")
    # --input-shape fixed the symbolic dims: the library is compiled for 2x8.
    assert manifest["inputs"] == [{"name": "input_ids", "shape": [2, 8], "dtype": "int64"},
                                  {"name": "attention_mask", "shape": [2, 8],
                                   "dtype": "int64"}]
    assert [o["name"] for o in manifest["outputs"]] == ["sentence_embedding",
                                                        "last_hidden_state"]
    assert manifest["outputs"][1]["shape"] == [2, 8, 64]
    import hashlib

    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert manifest["model_content_hash"] == result.report["output_hash"]
    assert manifest["toolchain"]["tvm"] == tvm.__version__
    assert manifest["graphopt_version"] == result.report["graphopt_version"]
    # Capabilities(domains={""}): no pass put a com.microsoft (or other) op in the model.
    assert {n.domain for n in onnx.load(folder / "model.onnx").graph.node} <= {"", "ai.onnx"}


@needs_tvm
def test_if_model_lowers_and_takes_both_branches(tmp_path, run_ort):
    """TVM 0.27's ONNX frontend converts If (to relax.If), so it is not refused."""
    proto = zoo.if_model()
    result = graphopt.optimize(proto, target="x86", output=tmp_path / "if")
    target = graphopt.get_target("x86")
    for feeds in zoo.if_model_feeds():
        _check_outputs(target.run(result.artifact, feeds), run_ort(proto, feeds))


# ---------------------------------------------------------------- arm (aarch64)
@needs_tvm
@needs_cross
@pytest.mark.parametrize("model", list(MODELS))
def test_arm_library_is_aarch64(lowered, model):
    result, _, _ = lowered("arm", model)
    path = result.artifact.path
    assert path.name == "model.so" and _elf_machine(path) == EM_AARCH64
    if shutil.which("readelf"):
        header = subprocess.run(["readelf", "-h", str(path)], capture_output=True,
                                text=True, check=True).stdout
        assert "AArch64" in header
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["llvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert manifest["llvm_target"]["mcpu"] == "cortex-a72"
    assert "+neon" in manifest["llvm_target"]["mattr"]
    assert manifest["runner"] == "qemu-aarch64"


@needs_tvm
@needs_cross
@needs_qemu
@pytest.mark.parametrize("model", list(MODELS))
def test_arm_under_qemu_matches_ort(lowered, run_ort, model):
    result, proto, feeds = lowered("arm", model)
    out = _timed_run(graphopt.get_target("arm"), result.artifact, feeds,
                     f"run arm {model} (qemu, not device speed)")
    _check_outputs(out, run_ort(proto, feeds))


@needs_tvm
def test_without_a_linker_the_objects_are_kept_with_the_link_command(tmp_path):
    from dataclasses import replace

    from graphopt.targets.presets import PRESETS
    from graphopt.targets.tvm import TvmTarget

    target = TvmTarget(replace(PRESETS["arm"], cross_prefix="no-such-toolchain-"))
    result = graphopt.optimize(zoo.mlp(), target=target, output=tmp_path / "out")
    folder = tmp_path / "out"
    assert result.artifact.path == folder / "model.tar"
    assert not (folder / "model.so").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["library"] == "model.tar"
    assert "no-such-toolchain-g++ -shared" in manifest["link_command"]
    with pytest.raises(UsageError, match="unlinked"):
        target.run(result.artifact, {"x": np.zeros((2, 32), np.float32)})
    if shutil.which(CROSS_LINKER):  # the command links a working aarch64 library
        command = manifest["link_command"].replace("no-such-toolchain-", "aarch64-linux-gnu-")
        subprocess.run(command, shell=True, cwd=folder, check=True)
        assert _elf_machine(folder / "model.so") == EM_AARCH64


def _loop_model() -> onnx.ModelProto:
    """y = x added 3 times by a Loop (an op TVM's ONNX frontend does not convert)."""
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "x"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", f32, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", f32, ["N", 4])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)],
        "loop_model", [helper.make_tensor_value_info("x", f32, ["N", 4])],
        [helper.make_tensor_value_info("y", f32, ["N", 4])],
        [numpy_helper.from_array(np.array(3, np.int64), "trip"),
         numpy_helper.from_array(np.array(True), "cond")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@needs_tvm
def test_unsupported_op_is_a_usage_error_and_nothing_is_written(tmp_path):
    onnx.save(_loop_model(), tmp_path / "loop.onnx")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", "loop.onnx",
                           "--target", "arm", "-o", str(out), "--report", "r.json"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Loop" in proc.stderr and "--target ort" in proc.stderr
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx"]


def test_unsupported_ops_are_named_with_domains():
    from graphopt.targets.presets import ARM

    model = _loop_model()
    model.graph.node.append(helper.make_node("FusedConv", ["x"], ["z"], domain="com.microsoft"))
    missing = ARM.unsupported_ops(model)
    assert missing == {"Loop": 1, "com.microsoft::FusedConv": 1}
    assert not ARM.supports("FusedConv", "com.microsoft")
    assert ARM.supports("Conv") and not ARM.supports("Loop")


# ---------------------------------------------------------------- presets and plugins
def test_presets_are_one_class_configured_by_data():
    from graphopt.targets.presets import PRESETS
    from graphopt.targets.tvm import TvmTarget

    registry = target_registry()
    for name in ("x86", "arm", "arm-a76", "arm-a55"):
        plugin = registry.get(name)
        assert isinstance(plugin, TvmTarget) and plugin.preset is PRESETS[name]
        assert graphopt.get_target(name) is plugin and plugin.name == name
    assert PRESETS["arm-a76"].llvm["mattr"] == ["+neon", "+dotprod"]
    assert PRESETS["arm-a55"].llvm["mcpu"] == "cortex-a55"
    assert graphopt.get_target("arm").device.cores == 4
    arm, ort = graphopt.get_target("arm"), graphopt.get_target("ort")
    assert arm.default_pipeline == ort.default_pipeline  # the capability filter differs


def test_importing_graphopt_and_the_presets_does_not_import_tvm():
    code = ("import sys, graphopt; from graphopt.targets import presets; "
            "t = graphopt.get_target('arm'); t.availability(); repr(t.device); "
            "assert 'tvm' not in sys.modules, 'tvm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_availability_says_what_to_install(monkeypatch, tmp_path):
    import graphopt.targets.tvm as tvm_target
    from graphopt.targets.presets import ARM

    real = tvm_target.importlib.util.find_spec
    monkeypatch.setattr(tvm_target.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tvm" else real(name, *a))
    assert "pip install 'graphopt[tvm]'" in ARM.availability()
    with pytest.raises(UsageError, match=r"graphopt\[tvm\]"):
        graphopt.optimize(zoo.mlp(), target="arm", output=tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_input_shapes_bind_symbolic_dims_everywhere():
    from graphopt.targets.presets import X86

    model = graphopt.load(zoo.dynamic_batch_model())
    X86.prepare(model, {"x": [3, 4, 6, 6]})
    assert model.graph.inputs[0].shape == [3, 4, 6, 6]
    assert model.graph.outputs[0].shape == [3, 10]
    with pytest.raises(UsageError, match="fixes it"):
        X86.prepare(graphopt.load(zoo.dynamic_batch_model()), {"x": [3, 5, 6, 6]})


def test_a_distribution_can_register_a_preset_instance(tmp_path, monkeypatch):
    """A third party adds a CPU by data: an instance of TvmTarget in an entry point."""
    pkg = tmp_path / "myboard"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import replace
        from graphopt.targets.presets import PRESETS
        from graphopt.targets.tvm import TvmTarget

        BOARD = TvmTarget(replace(PRESETS["arm-a76"], name="my-board", cores=8))
        MISNAMED = TvmTarget(PRESETS["arm"])
        NOT_A_TARGET = object()
    '''))
    info = tmp_path / "myboard-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myboard\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [graphopt.targets]
        my-board = myboard:BOARD
        misnamed = myboard:MISNAMED
        not-a-target = myboard:NOT_A_TARGET
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = target_registry()
    board = create_target(registry, "my-board")
    assert board.name == "my-board" and board.device.cores == 8
    assert board.preset.llvm["mcpu"] == "cortex-a76"
    with pytest.raises(PluginError, match=r"declares name 'arm'.*") as err:
        registry.get("misnamed")
    with pytest.raises(PluginError, match="not a Target subclass or instance") as err2:
        registry.get("not-a-target")
    for exc in (err.value, err2.value):
        assert "myboard" in str(exc) and "entry point" in str(exc)


@needs_tvm
@pytest.mark.slow
def test_local_tuning_reports_its_progress(tmp_path, run_ort):
    """--tune-trials on this machine (about 2 minutes on 2 cores, mostly MetaSchedule's
    worker processes importing TVM): the progress callback hears every measured candidate
    against the budget, the database lands in the folder, and the tuned library still
    computes the model."""
    from tests.test_target_tvm_rpc import _gemm_relu

    events = []
    proto = _gemm_relu()
    result = graphopt.optimize(proto, target="x86", output=tmp_path / "tuned", tune_trials=4,
                               input_shapes={"x": [4, 64]},
                               progress=lambda what, done, total: events.append(
                                   (what, done, total)))
    tuning = [e for e in events if e[0].startswith("tuning kernels on this machine")]
    assert tuning and tuning[-1][1:] == (4, 4), events
    assert [d for _, d, _ in tuning] == sorted(d for _, d, _ in tuning)
    manifest = json.loads((tmp_path / "tuned" / "manifest.json").read_text())
    assert manifest["tuning"]["trials"] == 4
    assert result.report["artifact"]["ok"] is True, result.report["artifact"]
