"""The ``web`` target: a folder that runs in a browser with ONNX Runtime Web (wasm), run
here in the system's headless Chromium and compared with ONNX Runtime on the original.

Skips (with the reason) where the ``onnxruntime-web`` npm package
(``python -m graphopt.targets.web_install``), Chromium or playwright is missing; the
tests of refusals need none of them. One Chromium serves the whole module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import pytest
from onnx import numpy_helper

import graphopt
from graphopt.accuracy import sample_cosines
from graphopt.errors import UsageError, VerificationError
from graphopt.target import sha256
from graphopt.targets import web_browser, web_install
from graphopt.targets.ort import LOSSLESS_PIPELINE
from graphopt.targets.web import MAX_IR_VERSION, WebTarget
from tests.zoo import mlp
from tests.helpers import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"


@pytest.fixture
def package():
    missing = web_install.why_missing()
    if missing:
        pytest.skip(f"{missing} (install: {web_install.install_command()})")


def small_cnn() -> onnx.ModelProto:
    """The bundled example CNN (Conv+BN+Relu x3, GAP, Gemm; input [batch, 3, 32, 32]) at
    opset 17: int8 quantization needs per-axis DequantizeLinear (opset 13)."""
    return onnx.version_converter.convert_version(onnx.load(EXAMPLE), 17)




def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ============================================================================ float
def test_mlp_runs_in_chromium_like_ort_with_no_network(browser, tmp_path, run_ort):
    model, out = mlp(), tmp_path / "mlp"
    result = graphopt.optimize(model, target="web", output=out)
    check = result.report["artifact"]
    assert check["ok"] is True and check["ran"], check
    assert "Chromium" in check["ran_on"] and "onnxruntime-web" in check["ran_on"]
    assert check["latency"]["artifact_s"] > 0 and check["latency"]["ort_s"] > 0

    target = WebTarget()
    artifact = target.open(out)
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    got, want = target.run(artifact, {"x": x}), run_ort(model, {"x": x})
    assert list(got) == ["y"] and got["y"].dtype == np.float32 and got["y"].shape == (5, 10)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-5)
    assert target.measure(artifact, {"x": x}, repeat=5) > 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["target"], manifest["model"], manifest["artifact"]) == \
        ("web", "model.onnx", "index.html")
    assert manifest["inputs"] == [{"name": "x", "shape": ["N", 32], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "y", "shape": ["N", 10], "dtype": "float32"}]
    assert manifest["external_data"] == []
    runtime = manifest["onnxruntime_web"]
    assert runtime["version"] == web_install.package_version(web_install.candidate()[0])
    assert runtime["files"] == [f"ort-web/{n}" for n in web_install.DIST_FILES]
    assert sorted(manifest["files"]) == tree(out)
    assert all(sha256(out / name) == digest for name, digest in manifest["sha256"].items())
    assert onnx.load(out / "model.onnx").ir_version <= MAX_IR_VERSION
    assert "ort-web/ort.wasm.min.mjs" in (out / "run.js").read_text()

    two = WebTarget(threads=2)  # wasm threads: workers, SharedArrayBuffer
    np.testing.assert_allclose(two.run(two.open(out), {"x": x})["y"], want["y"], rtol=1e-4,
                               atol=1e-5)
    assert "2 threads" in two.ran_on()
    for threads in (None, 2):
        page = web_browser.page(out, threads)  # the pages the checks above ran in
        assert page.facts["cross_origin_isolated"] is True
        assert any(u.endswith("/ort-web/ort-wasm-simd-threaded.wasm") for u in page.requests)
        assert all(u.startswith(page.server.url) for u in page.requests), page.requests
        assert page.server.url.startswith("http://127.0.0.1:") and page.refused == []

    # The check can fail: a changed weight in the folder is found in the browser's outputs.
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    proto = onnx.load(tampered / "model.onnx")
    bias = next(t for t in proto.graph.initializer if numpy_helper.to_array(t).shape == (10,))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.5, bias.name))
    onnx.save(proto, tampered / "model.onnx")
    with pytest.raises(VerificationError, match=r"model\.onnx \(changed\)"):
        graphopt.verify_artifact(tampered, reference=model, timing=False)
    # ... by the manifest's hashes first; with those made to agree, by the browser itself.
    manifest["sha256"]["model.onnx"] = sha256(tampered / "model.onnx")
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationError, match="does not match ONNX Runtime"):
        graphopt.verify_artifact(tampered, reference=model, timing=False)


def test_small_cnn_with_weights_in_chunks_runs_in_chromium(browser, tmp_path, monkeypatch,
                                                           run_ort):
    monkeypatch.setenv("GRAPHOPT_EXTERNAL_DATA_THRESHOLD", "8192")
    model, out = small_cnn(), tmp_path / "cnn"
    result = graphopt.optimize(model, target="web", output=out)
    assert result.report["artifact"]["ok"] is True, result.report["artifact"]

    manifest = json.loads((out / "manifest.json").read_text())
    chunks = manifest["external_data"]
    assert len(chunks) >= 2 and sorted(manifest["files"]) == tree(out)
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    held: dict[str, int] = {}
    for t in proto.graph.initializer:
        where = {e.key: e.value for e in t.external_data}
        if where:
            held[where["location"]] = held.get(where["location"], 0) + 1
            assert int(where["offset"]) + int(where["length"]) <= \
                (out / where["location"]).stat().st_size
    assert sorted(held) == sorted(chunks)
    for name in chunks:  # under the limit, or one tensor bigger than it on its own
        assert (out / name).stat().st_size <= 8192 or held[name] == 1, (name, held)

    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = WebTarget().run(WebTarget().open(out), {"input": x})
    want = run_ort(model, {"input": x})
    assert got["logits"].dtype == np.float32 and got["logits"].shape == (4, 10)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)


# ============================================================================ int8
def test_int8_qdq_model_runs_in_chromium_like_native_ort(browser, tmp_path, run_ort):
    rng = np.random.default_rng(3)
    calibration = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    validation = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    model, out = small_cnn(), tmp_path / "int8"
    result = graphopt.optimize(
        model, target="web", output=out, quantize="int8", tolerance=0.98,
        passes=[*LOSSLESS_PIPELINE, "quantize-int8(require-speedup=false)"],
        calibration={"input": calibration}, validation={"input": validation})
    assert result.report["compression"]["passes"]["quantize-int8"]["status"] == "changed"
    check = result.report["artifact"]
    assert check["ok"] is True and check["min_cosine"] >= 0.98, check
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops

    # Against the QDQ graph as written (ORT with its rewrites off: DequantizeLinear ->
    # float op -> QuantizeLinear), within one quantization step of the head's input.
    # Not native ORT's fused int8 kernels: on AVX2 without VNNI they saturate 16-bit
    # sums (VPMADDUBSW) on full-range weights and were 0.57 off here; wasm's were 3e-6.
    x = {"input": rng.standard_normal((16, 3, 32, 32)).astype(np.float32)}
    got = WebTarget().run(WebTarget().open(out), x)
    proto = onnx.load(out / "model.onnx")
    as_written = run_ort(proto, x)
    float_out = run_ort(model, x)
    producers = {o: n for n in proto.graph.node for o in n.output}
    head = next(n for n in proto.graph.node if n.op_type in ("Gemm", "MatMul"))
    step = float(numpy_helper.to_array(next(
        t for t in proto.graph.initializer if t.name == producers[head.input[0]].input[1])))
    assert got["logits"].dtype == np.float32 and got["logits"].shape == (16, 10)
    assert min(sample_cosines(as_written, got, 16)) >= 0.999
    assert np.abs(got["logits"] - as_written["logits"]).max() <= step
    assert np.abs(float_out["logits"] - as_written["logits"]).max() > step  # int8 ran


# ============================================================================ refusals
def test_output_folder_holding_the_input_or_the_input_itself_is_refused(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    onnx.save(mlp(), site / "m.onnx")
    before = (site / "m.onnx").read_bytes()
    inside = cli("optimize", "site/m.onnx", "--target", "web", "-o", "site", cwd=tmp_path)
    assert inside.returncode == 2 and "lies inside it" in inside.stderr, inside.stderr
    same = cli("optimize", "site/m.onnx", "--target", "web", "-o", "site/m.onnx",
               cwd=tmp_path)
    assert same.returncode == 2 and "would overwrite" in same.stderr, same.stderr
    assert (site / "m.onnx").read_bytes() == before and tree(tmp_path) == ["site/m.onnx"]
    with pytest.raises(UsageError, match="writes a folder"):
        WebTarget().lower(graphopt.load(site / "m.onnx"), tmp_path / "out.onnx")


def test_missing_package_names_the_install_command_and_writes_nothing(tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv(web_install.ENV, str(tmp_path / "node_modules" / "onnxruntime-web"))
    onnx.save(mlp(), tmp_path / "m.onnx")
    result = cli("optimize", "m.onnx", "--target", "web", "-o", "out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "onnxruntime-web" in result.stderr and \
        "python -m graphopt.targets.web_install" in result.stderr, result.stderr
    assert tree(tmp_path) == ["m.onnx"] and not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="web_install"):
        WebTarget().lower(graphopt.load(tmp_path / "m.onnx"), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_without_chromium_the_artifact_is_checked_in_node(package, tmp_path, monkeypatch,
                                                          run_ort):
    """No browser, but Node.js: the folder's own wasm runtime runs there, and the report
    says where; WebGPU still needs a browser."""
    from graphopt.targets import web_node

    if web_node.why_unavailable():
        pytest.skip(web_node.why_unavailable())
    monkeypatch.setenv(web_browser.CHROMIUM_ENV, str(tmp_path / "no-chromium"))
    assert WebTarget().run_availability() is None
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    result = graphopt.optimize(mlp(), target="web", output=tmp_path / "out",
                               data=[{"x": x}])
    check = result.report["artifact"]
    assert check["ok"] is True and "Node.js" in check["ran_on"] and \
        "no browser" in check["ran_on"], check
    assert check["latency"]["artifact_s"] > 0
    got = WebTarget(runner="node").run(WebTarget().open(tmp_path / "out"), {"x": x})
    np.testing.assert_allclose(got["y"], run_ort(mlp(), {"x": x})["y"], rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(UsageError, match="WebGPU needs a browser"):
        WebTarget(ep="webgpu", runner="node")


def test_without_chromium_the_artifact_is_reported_unverified(package, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv(web_browser.CHROMIUM_ENV, str(tmp_path / "no-chromium"))
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # and no Node.js either
    assert "Chromium is missing" in WebTarget().run_availability()
    assert "Node.js is missing" in WebTarget().run_availability()
    onnx.save(mlp(), tmp_path / "m.onnx")
    result = graphopt.optimize(tmp_path / "m.onnx", target="web", output=tmp_path / "out")
    check = result.report["artifact"]
    assert check["ok"] is None and "Chromium is missing" in check["detail"], check
    required = cli("optimize", "m.onnx", "--target", "web", "-o", "out2", "--verify",
                   cwd=tmp_path)
    assert required.returncode == 2 and "Chromium is missing" in required.stderr
    assert not (tmp_path / "out2").exists()
