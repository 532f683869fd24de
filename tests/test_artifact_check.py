"""Checking written artifacts (``graphopt verify ARTIFACT``, ``optimize --verify``):
the generic path every target shares, exercised with the ORT target and with a small
compiled-target plugin defined here (a folder with manifest.json whose ``run`` can be made
to run wrong, or not at all)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphopt
from graphopt import verify
from graphopt.errors import UsageError, VerificationError
from graphopt.ir import Model, save
from graphopt.target import MANIFEST, Artifact, Target, read_manifest
from graphopt.targets.ort import OrtTarget
from tests import zoo

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


class FolderTarget(Target):
    """A compiled target in miniature: a folder with model.onnx + manifest.json, run in
    ONNX Runtime with ``offset`` added to every float output (0: correct), or refusing to
    run here (``runnable=False``) as a target without its device would."""

    name = "folder"
    device = OrtTarget.device
    compiled = True

    def __init__(self, offset: float = 0.0, runnable: bool = True):
        self.offset, self.runnable = offset, runnable

    def lower(self, model: Model, out: Path) -> Artifact:
        out.mkdir(parents=True, exist_ok=True)
        path = save(model, out / "model.onnx")
        (out / MANIFEST).write_text(json.dumps(
            {"target": "folder", "artifact": "model.onnx", "artifact_format": "folder",
             "model": "model.onnx",
             "inputs": [{"name": "input", "shape": [3, 3, 32, 32], "dtype": "float32"}]}))
        return Artifact(self.name, path, [path, out / MANIFEST], format="folder")

    def run(self, artifact, feeds):
        if not self.runnable:
            raise UsageError("this machine has no such device", hint="use --rpc")
        out = verify.run(onnx.load(artifact.path), feeds)
        return {k: v + np.float32(self.offset) if v.dtype == np.float32 else v
                for k, v in out.items()}


def test_compiled_target_artifact_is_run_compared_and_timed(tmp_path):
    result = graphopt.optimize(EXAMPLE, target=FolderTarget(), output=tmp_path / "a")
    check = result.report["artifact"]
    assert check["ok"] is True and check["ran"] and check["max_abs_diff"] < 1e-4
    latency = check["latency"]
    assert latency["artifact_s"] > 0 and latency["ort_s"] > 0
    assert latency["ort_vs_artifact"] == pytest.approx(latency["ort_s"] / latency["artifact_s"])
    assert latency["ort_threads"] == (os.cpu_count() or 1)  # no thread setting: every core


def test_ort_is_timed_on_the_threads_the_target_runs_with(tmp_path):
    """A target with a thread setting (LiteRT runs on one thread by default) is timed
    beside ONNX Runtime on as many threads: the ratio compares like with like."""
    one = FolderTarget()
    one.threads = 1
    result = graphopt.optimize(EXAMPLE, target=one, output=tmp_path / "a")
    assert result.report["artifact"]["latency"]["ort_threads"] == 1


def test_wrong_artifact_fails_and_is_removed(tmp_path):
    with pytest.raises(VerificationError, match="does not match"):
        graphopt.optimize(EXAMPLE, target=FolderTarget(offset=0.5), output=tmp_path / "a")
    assert not (tmp_path / "a" / "model.onnx").exists()
    assert not (tmp_path / "a" / MANIFEST).exists()


def test_artifact_that_cannot_run_here_is_reported_or_refused(tmp_path):
    result = graphopt.optimize(EXAMPLE, target=FolderTarget(runnable=False),
                               output=tmp_path / "a")
    assert result.report["artifact"]["ok"] is None
    assert "no such device" in result.report["artifact"]["detail"]
    with pytest.raises(UsageError, match="cannot run .* here to verify it"):
        graphopt.optimize(EXAMPLE, target=FolderTarget(runnable=False),
                          output=tmp_path / "b", verify_artifact=True)


def test_ort_artifacts_are_not_rerun_unless_asked(tmp_path):
    plain = graphopt.optimize(EXAMPLE, target="ort", output=tmp_path / "m.onnx")
    assert "artifact" not in plain.report
    checked = graphopt.optimize(EXAMPLE, target="ort", output=tmp_path / "m.ort",
                                format="ort", verify_artifact=True)
    assert checked.report["artifact"]["ok"] is True
    assert checked.report["artifact"]["latency"]["artifact_s"] > 0


def test_verify_folder_uses_manifest_shapes_and_model(tmp_path):
    graphopt.optimize(EXAMPLE, target=FolderTarget(), output=tmp_path / "a")
    # verify_artifact reads the target name from the manifest; register-free: pass it.
    check = graphopt.verify_artifact(tmp_path / "a", target=FolderTarget())
    assert check.ok is True and check.report["reference"].endswith("model.onnx")
    # probe inputs take the manifest's static shape (batch 3), not the default 2
    assert check.artifact.path == tmp_path / "a" / "model.onnx"
    assert check.artifact.format == "folder"
    check = graphopt.verify_artifact(tmp_path / "a", EXAMPLE, target=FolderTarget(offset=1.0),
                                     tolerance=0.5, timing=False)  # cosine budget
    assert check.ok is True and 0.5 <= check.report["min_cosine"] < 1.0
    with pytest.raises(VerificationError):
        graphopt.verify_artifact(tmp_path / "a", EXAMPLE, target=FolderTarget(offset=1.0))


def test_cli_verify_matches_and_detects_a_tampered_artifact(tmp_path):
    optimized = tmp_path / "m.onnx"
    assert cli("optimize", EXAMPLE, "-o", optimized, cwd=tmp_path).returncode == 0
    ok = cli("verify", optimized, "--reference", EXAMPLE, "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["max_abs_diff"] < 1e-4
    assert report["latency"]["artifact_s"] > 0 and report["latency"]["ort_s"] > 0

    proto = onnx.load(optimized)  # flip the sign of one weight tensor
    biggest = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    biggest.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(biggest), biggest.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, tampered)
    bad = cli("verify", tampered, "--reference", EXAMPLE, "--no-timing", cwd=tmp_path)
    assert bad.returncode == 4, bad.stderr
    assert "does not match" in bad.stderr and "logits" in bad.stderr


def test_cli_verify_bad_input_is_a_clear_usage_error(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "m.onnx")
    no_ref = cli("verify", tmp_path / "m.onnx", cwd=tmp_path)
    assert no_ref.returncode == 2 and "--reference" in no_ref.stderr
    (tmp_path / "folder").mkdir()
    no_manifest = cli("verify", tmp_path / "folder", cwd=tmp_path)
    assert no_manifest.returncode == 2 and "manifest" in no_manifest.stderr
    (tmp_path / "folder" / MANIFEST).write_text('{"format": 1}')
    with pytest.raises(UsageError, match="no \"target\""):
        read_manifest(tmp_path / "folder")
    (tmp_path / "folder" / MANIFEST).write_text('{"target": "ort", "artifact": "gone.so"}')
    missing = cli("verify", tmp_path / "folder", "-r", EXAMPLE, cwd=tmp_path)
    assert missing.returncode == 2 and "gone.so" in missing.stderr


def test_tuning_and_rpc_are_refused_by_targets_without_them(tmp_path):
    with pytest.raises(UsageError, match="does not tune"):
        graphopt.optimize(EXAMPLE, target="ort", output=tmp_path / "m.onnx", tune_trials=8)
    with pytest.raises(UsageError, match="--rpc"):
        graphopt.optimize(EXAMPLE, target="ort", output=tmp_path / "m.onnx",
                          rpc="127.0.0.1:9090")
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "m.onnx", "--tune-trials", "4",
                 cwd=tmp_path)
    assert result.returncode == 2 and "does not tune" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_quantized_artifact_is_checked_against_the_budget(tmp_path):
    proto = zoo.mlp()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((16, 32)).astype(np.float32)} for _ in range(2)]
    result = graphopt.optimize(proto, target=FolderTarget(), output=tmp_path / "q",
                               passes="quantize-int8-dynamic(require-speedup=false)",
                               calibration=calib, tolerance=0.98)
    sites = result.report["compression"]["passes"]["quantize-int8-dynamic"]["sites"]
    assert any(e["changed"] for e in sites.values())
    check = result.report["artifact"]
    assert check["ok"] is True and check["budget"] == 0.98
    assert 0.98 <= check["min_cosine"] < 1.0
    # verify later, against the float original: the budget it was written with applies
    assert read_manifest(tmp_path / "q")["accuracy_budget"] == 0.98
    again = graphopt.verify_artifact(tmp_path / "q", proto, target=FolderTarget(),
                                     data=calib)
    assert again.ok is True and again.report["budget"] == 0.98
    with pytest.raises(VerificationError):  # a float tolerance, asked for, still applies
        graphopt.verify_artifact(tmp_path / "q", proto, target=FolderTarget(), data=calib,
                                 tolerance=verify.Tolerance())


def test_messages_with_brackets_reach_the_terminal_intact(tmp_path):
    """Install hints such as pip install 'graphopt[tvm]' are not eaten as rich markup."""
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "m.onnx", "--passes",
                 "no-such-pass[x]", cwd=tmp_path)
    assert result.returncode == 2 and "no-such-pass[x]" in result.stderr
