"""Models with external data: weights stay in their file (memory-mapped, never copied
unless a pass changes them), checks and sessions never serialize them, saving copies
untouched tensors by byte range and appends new ones, and the input is left alone.

The small models have the structure of ``benchmarks/large_model.py`` (decomposed
LayerNorm, MatMul+bias, erf GELU, residual Add) and take the large-model path: saved
with external data, loaded from their path, and the save threshold lowered so outputs
are written with external data too. ``test_over_2gb`` runs the real 3.2 GB model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

import graphopt
from benchmarks.large_model import _CHECK, make_model, measure
from graphopt import data_files, external_data, ir, verify

HIDDEN = 256  # 256 KiB weights: over MIN_MAPPED_BYTES, so they stay in the file


@pytest.fixture
def small(tmp_path) -> Path:
    return make_model(tmp_path / "in", hidden=HIDDEN, blocks=2)


@pytest.fixture
def external_outputs(monkeypatch):
    """Write every output with external data, as a model over 2 GB would be."""
    monkeypatch.setattr(ir, "EXTERNAL_DATA_THRESHOLD", 0)


def file_state(folder: Path) -> dict[str, tuple]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def tensor_ranges(path: Path) -> dict[str, bytes]:
    """name -> bytes of every external tensor of the model at ``path``, read from its
    data file by offset and length."""
    proto = onnx.load(str(path), load_external_data=False)
    found = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            with open(path.parent / info["location"], "rb") as fh:
                fh.seek(int(info.get("offset", 0)))
                found[tensor.name] = fh.read(int(info["length"]))
    return found


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def feeds(seed: int = 3) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((2, 5, HIDDEN)).astype(np.float32)
    return {"x": x}


# ---------------------------------------------------------------------- loading
def test_weights_stay_in_their_file(small):
    model = graphopt.load(small)
    consts = {c.name: c for c in model.initializers()}
    assert isinstance(consts["b0_w0"]._values, external_data.MappedValues)
    assert not isinstance(consts["two"]._values, external_data.MappedValues)  # small
    values = consts["b0_w0"].values
    assert not values.flags.writeable and not values.flags.owndata  # a view of the map
    with pytest.raises(ValueError):
        values[0, 0] = 1.0
    np.testing.assert_array_equal(values, weights(small)["b0_w0"])

    proto = model.to_onnx(references=True)  # the loaded view exports as the reference
    refs = {t.name for t in proto.graph.initializer if external_data.extent(t)}
    assert {f"b{b}_w{i}" for b in range(2) for i in range(4)} <= refs
    assert proto.ByteSize() < 50_000
    assert not external_data.has_references(model.to_onnx())  # small: self-contained
    onnx.checker.check_model(model.to_onnx())


def test_checks_and_sessions_take_references(small):
    proto = graphopt.load(small).to_onnx(references=True)
    onnx.checker.check_model(ir.skeleton(proto))
    inferred = ir.infer_shapes(proto, strict=True)
    assert any(v.name == "b0_ln" for v in inferred.graph.value_info)
    got = verify.run(proto, feeds())["y"]
    want = verify.run(str(small), feeds())["y"]  # ORT on the file itself
    np.testing.assert_array_equal(got, want)


def test_hash_does_not_depend_on_where_weights_are(small):
    mapped = graphopt.load(small)
    inline = graphopt.load(onnx.load(str(small)))
    assert mapped.content_hash() == inline.content_hash() == mapped.clone().content_hash()


# ---------------------------------------------------------------------- optimizing
def test_optimize_writes_external_data_and_leaves_the_input(small, tmp_path,
                                                            external_outputs):
    before = file_state(small.parent)
    out = tmp_path / "out" / "model.onnx"
    result = graphopt.optimize(small, output=out)
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    ops = result.report["output"]["ops"]
    assert ops.get("LayerNormalization") == 2 and ops.get("BiasGelu") == 4

    assert file_state(small.parent) == before  # byte-identical, not even touched
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert out.stat().st_size < 50_000  # the weights are in model.onnx.data
    onnx.checker.check_model(str(out))

    # Read back: every weight as in the input, large ones at page boundaries.
    written, original = weights(out), weights(small)
    for name in (f"b{b}_w{i}" for b in range(2) for i in range(4)):
        np.testing.assert_array_equal(written[name], original[name])
    proto = onnx.load(str(out), load_external_data=False)
    for tensor in proto.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        if int(info.get("length", 0)) >= external_data.MIN_MAPPED_BYTES:
            assert int(info["offset"]) % data_files.PAGE == 0
    got, want = verify.run(str(out), feeds())["y"], verify.run(str(small), feeds())["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # The output loads the same way (and optimizing it again changes nothing).
    again = graphopt.optimize(out, output=tmp_path / "again" / "model.onnx")
    assert not any(e["changed"] for e in again.report["trace"])


def test_changed_weight_is_written_untouched_ones_keep_their_bytes(small, tmp_path):
    model = graphopt.load(small)
    const = next(c for c in model.initializers() if c.name == "b1_w2")
    const.values = const.values * 2  # what a pass does: a new array
    other = next(c for c in model.initializers() if c.name == "b0_w1")
    other.values  # read, not changed: still the reference on export  # noqa: B018
    out = graphopt.save(model, tmp_path / "out" / "model.onnx", external_data=True)

    before, after = tensor_ranges(small), tensor_ranges(out)
    doubled = np.frombuffer(after.pop("b1_w2"), np.float32).reshape(HIDDEN, HIDDEN)
    np.testing.assert_array_equal(doubled, 2 * weights(small)["b1_w2"])
    big = {n for n, b in before.items() if len(b) >= external_data.MIN_MAPPED_BYTES}
    assert big - {"b1_w2"} <= set(after)
    for name in big - {"b1_w2"}:
        assert after[name] == before[name], name


def test_folded_weight_is_appended(small, tmp_path, external_outputs):
    """A pass that makes a new weight (fold-constants on Transpose(W)): the new tensor
    is appended to the output's data file; the others are copied unchanged."""
    proto = onnx.load(str(small), load_external_data=False)
    mm = next(n for n in proto.graph.node if n.name == "b0_mm1")
    proto.graph.node.insert(list(proto.graph.node).index(mm),
                            oh.make_node("Transpose", ["b0_w1"], ["b0_w1_t"], name="b0_t"))
    mm.input[1] = "b0_w1_t"
    small.write_bytes(proto.SerializeToString())
    before = file_state(small.parent)

    out = tmp_path / "out" / "model.onnx"
    result = graphopt.optimize(small, output=out,
                               passes="fold-constants,eliminate-dead-code")
    assert result.report["verification"]["ok"] is True
    assert result.report["trace"][0]["stats"]["tensors_folded"] == 1
    assert file_state(small.parent) == before

    written = onnx.load(str(out), load_external_data=False)
    folded = next(n.input[1] for n in written.graph.node if n.name == "b0_mm1")
    np.testing.assert_array_equal(weights(out)[folded], weights(small)["b0_w1"].T)
    assert "b0_w1" not in weights(out)  # only the transpose read it
    same, after = tensor_ranges(small), tensor_ranges(out)
    for name in after.keys() & same.keys():
        assert after[name] == same[name], name
    np.testing.assert_allclose(verify.run(str(out), feeds())["y"],
                               verify.run(str(small), feeds())["y"], rtol=1e-4, atol=1e-4)


def test_weight_inside_a_subgraph(tmp_path, external_outputs):
    weight = np.random.default_rng(0).standard_normal((HIDDEN, HIDDEN)).astype(np.float32)

    def branch(name, op):
        return oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["m"]),
                              oh.make_node(op, ["m"], [f"{name}_out"])], name, [],
                             [oh.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT,
                                                        [2, HIDDEN])])

    graph = oh.make_graph(
        [oh.make_node("Identity", ["x0"], ["x"]),
         oh.make_node("If", ["c"], ["y"], then_branch=branch("then", "Relu"),
                      else_branch=branch("else", "Neg"))], "g",
        [oh.make_tensor_value_info("c", TensorProto.BOOL, []),
         oh.make_tensor_value_info("x0", TensorProto.FLOAT, [2, HIDDEN])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, HIDDEN])],
        [numpy_helper.from_array(weight, "W")])
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), src,
                    save_as_external_data=True, location="m.bin", size_threshold=0)
    result = graphopt.optimize(src, output=tmp_path / "out" / "m.onnx")
    assert result.report["verification"]["ok"] is True
    assert result.report["rolled_back"] == []
    x = np.ones((2, HIDDEN), np.float32)
    for c in (True, False):
        got = verify.run(str(tmp_path / "out" / "m.onnx"), {"c": np.array(c), "x0": x})["y"]
        want = x @ weight
        np.testing.assert_allclose(got, np.maximum(want, 0) if c else -want, rtol=1e-4,
                                   atol=1e-4)


def test_copy_falls_back_to_reads(small, tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = graphopt.save(graphopt.load(small), tmp_path / "o" / "model.onnx",
                        external_data=True)
    before, after = tensor_ranges(small), tensor_ranges(out)
    for name, data in before.items():
        assert after[name] == data


# ---------------------------------------------------------------------- over 2 GB
def _room(path: Path) -> bool:
    free_disk = shutil.disk_usage(path).free
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return free_disk > 12e9 and memory > 12e9


@pytest.mark.slow
def test_over_2gb(tmp_path):
    """The 3.2 GB model of the benchmark (~90 s here): optimized by the CLI in a child
    process at a peak RSS of at most 1.5x its weights, verified, written with external
    data, the input byte-identical afterwards."""
    if not _room(tmp_path):
        pytest.skip("needs 12 GB of free disk and of memory")
    model = make_model(tmp_path / "in")
    weights_bytes = Path(str(model) + ".data").stat().st_size
    assert weights_bytes > 2**31
    before = file_state(model.parent)
    out = tmp_path / "out" / "model.onnx"
    report = tmp_path / "report.json"
    run = measure([sys.executable, "-m", "graphopt.cli", "optimize", str(model), "-o",
                   str(out), "--report", str(report)])
    assert run["exit"] == 0, run["stderr"][-2000:]
    peak = run["peak_rss_gb"] * 2**30
    assert peak <= 1.5 * weights_bytes, f"peak RSS {peak / 1e9:.2f} GB"
    summary = json.loads(report.read_text())
    assert summary["verification"]["ok"] is True and summary["rolled_back"] == []
    assert file_state(model.parent) == before
    assert (out.parent / "model.onnx.data").stat().st_size >= weights_bytes * 0.99
    assert out.stat().st_size < 100_000
    check = subprocess.run([sys.executable, "-c", _CHECK, str(model), str(out), "4096"],
                           capture_output=True, text=True, check=True)
    assert json.loads(check.stdout)["ok"] is True


def test_one_weight_under_two_names(small, tmp_path):
    """A pass that gives a mapped weight's values to a second constant: both export as
    references under their own names."""
    model = graphopt.load(small)
    w = next(c for c in model.initializers() if c.name == "b0_w1")
    mm = next(n for n in model.graph.nodes if n.name == "b1_mm1")
    mm.inputs[1] = type(w)("b1_w1_copy", w.values)  # b1_mm1 now reads b0_w1's values
    proto = model.to_onnx(references=True)
    refs = {t.name: external_data.extent(t) for t in proto.graph.initializer}
    assert refs["b1_w1_copy"] == refs["b0_w1"] is not None
    out = graphopt.save(model, tmp_path / "o" / "model.onnx", external_data=True)
    written = weights(out)
    np.testing.assert_array_equal(written["b1_w1_copy"], written["b0_w1"])


def _spilling_small_models(monkeypatch, tmp: Path) -> list[int]:
    """Spill from 1 KiB of weights, temporary files under ``tmp``: the list of bytes
    each ``data_files.move_out_constants`` moved (filled as the run goes)."""
    from graphopt import spill

    monkeypatch.setattr(spill, "SPILL_BYTES", 1024)
    moved = []
    move_out = data_files.move_out_constants
    monkeypatch.setattr(data_files, "move_out_constants",
                        lambda *a, **k: moved.append(move_out(*a, **k)) or moved[-1])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    tmp.mkdir()
    return moved


def test_large_inline_weights_spill_to_a_temporary_file_for_the_run(tmp_path, monkeypatch):
    """A model's inline weights go to a temporary data file for the run (exports then
    carry references, not bytes); the result reads them back, the file goes, and what is
    written is byte-identical to a run without the spill."""
    from graphopt import external_data, spill
    from graphopt.ir import load
    from tests.zoo import mlp

    model = mlp(hidden=256)
    alone = spill.Spill(load(model), min_bytes=1024)
    assert alone.moved > 200_000 and alone.folder.is_dir()
    assert external_data.has_references(alone.model.to_onnx(references=True))
    released = alone.release(alone.model)
    assert not alone.folder.exists()
    assert not external_data.has_references(released.to_onnx(references=True))
    assert released.to_onnx().SerializeToString() == load(model).to_onnx().SerializeToString()

    plain = graphopt.optimize(model, output=tmp_path / "plain.onnx")
    moved = _spilling_small_models(monkeypatch, tmp_path / "tmp")
    spilled = graphopt.optimize(model, output=tmp_path / "spilled.onnx")
    assert (tmp_path / "spilled.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    assert spilled.model.to_onnx().SerializeToString() == \
        plain.model.to_onnx().SerializeToString()
    assert moved and moved[0] > 200_000  # the run did work on references
    assert not list((tmp_path / "tmp").iterdir())  # the temporary data file is gone


@pytest.mark.parametrize("target", ["ort", "litert"])
def test_weights_the_passes_write_spill_too(tmp_path, monkeypatch, target):
    """A torch-exported ResNet-style CNN: folding its BatchNorms writes a new weight for
    every convolution. Those go to the run's temporary folder too (``Spill.refresh``),
    so verification and the target's lowering read references; what is written is
    byte-identical to a run without the spill, and the temporary files are gone."""
    from graphopt import external_data
    from graphopt.targets.litert import LiteRtTarget
    from tests import zoo

    if target == "litert" and LiteRtTarget().availability():
        pytest.skip(LiteRtTarget().availability())
    model = zoo.resnet_cnn()
    name = "model.tflite" if target == "litert" else "model.onnx"
    plain = tmp_path / "plain" / name if target == "ort" else tmp_path / "plain"
    graphopt.optimize(model, target=target, output=plain)
    moved = _spilling_small_models(monkeypatch, tmp_path / "tmp")
    spilled = tmp_path / "spilled" / name if target == "ort" else tmp_path / "spilled"
    result = graphopt.optimize(model, target=target, output=spilled)
    assert len(moved) == 2 and moved[0] > 100_000 and moved[1] > 100_000, moved
    assert (tmp_path / "spilled" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    assert result.report["artifact" if target == "litert" else "verification"]["ok"] is True
    assert not external_data.has_references(result.model.to_onnx(references=True))
    assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("make", ["mlp", "resnet_cnn", "if_model"])
def test_writing_references_inline_gives_the_serialized_bytes(tmp_path, make):
    """``data_files.write_inline`` copies referenced weights from their files into
    place as it writes: the file is byte for byte what reading them into the proto and
    serializing it gives, and the proto is left as it was."""
    from graphopt import external_data, spill
    from graphopt.ir import load
    from tests import zoo

    model = load(zoo.mlp(hidden=256) if make == "mlp" else getattr(zoo, make)())
    alone = spill.Spill(model, min_bytes=1024)
    proto = alone.model.to_onnx(references=True)
    assert external_data.has_references(proto) == (make != "if_model")
    before = proto.SerializeToString()
    data_files.write_inline(proto, tmp_path / "inline.onnx")
    assert proto.SerializeToString() == before
    expected = onnx.ModelProto()
    expected.CopyFrom(proto)
    external_data.materialize(expected)
    assert (tmp_path / "inline.onnx").read_bytes() == expected.SerializeToString()
    assert onnx.load(tmp_path / "inline.onnx") == expected
