"""Fuzzing: random mutations of two small valid models (an MLP and a CNN built with
onnx.helper): bytes flipped in the serialized model, nodes dropped, inputs renamed, dtypes
and shapes changed. Every outcome must be a success whose output is verified, or a
``GraphoptError`` with a documented exit code (2, 3 or 4) and nothing written; never
another exception, and never a modified input. Seeded: the same cases every run."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.cli import main
from graphopt.errors import GraphoptError

CASES = 200
CLI_CASES = 12


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W1", (16, 32)), ("b1", (32,)), ("W2", (32, 8)),
                                   ("b2", (8,)))]
    weights.append(numpy_helper.from_array(np.array([-1, 8], np.int64), "shape"))
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h1"]),
             oh.make_node("Add", ["h1", "b1"], ["h2"]),
             oh.make_node("Relu", ["h2"], ["h3"]),
             oh.make_node("Identity", ["h3"], ["h4"]),
             oh.make_node("MatMul", ["h4", "W2"], ["h5"]),
             oh.make_node("Add", ["h5", "b2"], ["h6"]),
             oh.make_node("Reshape", ["h6", "shape"], ["y"])]
    graph = oh.make_graph(nodes, "mlp",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          weights)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("cw", (4, 3, 3, 3)), ("cb", (4,)), ("scale", (4,)),
                                   ("bias", (4,)), ("gw", (5, 4)), ("gb", (5,)))]
    weights += [numpy_helper.from_array(np.zeros(4, np.float32), "mean"),
                numpy_helper.from_array(np.ones(4, np.float32), "var")]
    nodes = [oh.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"]),
             oh.make_node("Relu", ["bn"], ["r"]),
             oh.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             oh.make_node("GlobalAveragePool", ["p"], ["gap"]),
             oh.make_node("Flatten", ["gap"], ["f"]),
             oh.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1)]
    graph = oh.make_graph(nodes, "cnn",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                          weights)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


DTYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
          TensorProto.INT64, TensorProto.INT32, TensorProto.INT8, TensorProto.BOOL,
          TensorProto.STRING, 0, 77]
DIMS = [0, 1, 2, 7, -1, 2**40, "sym"]
KINDS = ("flip", "drop", "rename", "dtype", "shape")


def mutate(model: onnx.ModelProto, rng: np.random.Generator) -> tuple[str, bytes]:
    """One random mutation of ``model``: (kind, serialized result)."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if kind == "flip":
        data = bytearray(m.SerializeToString())
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        return kind, bytes(data)
    if kind == "drop":
        del g.node[int(rng.integers(len(g.node)))]
    elif kind == "rename":
        old = g.input[0].name
        g.input[0].name = "renamed"
        if rng.random() < 0.5:  # consistently (a valid model) or not (a dangling name)
            for node in g.node:
                for i, name in enumerate(node.input):
                    if name == old:
                        node.input[i] = "renamed"
    elif kind == "dtype":
        dtype = int(DTYPES[int(rng.integers(len(DTYPES)))])
        where = int(rng.integers(3))
        if where == 0:
            g.input[0].type.tensor_type.elem_type = dtype
        elif where == 1:
            g.output[0].type.tensor_type.elem_type = dtype
        else:
            g.initializer[int(rng.integers(len(g.initializer)))].data_type = dtype
    else:  # shape
        if rng.random() < 0.5:
            dims = g.input[0].type.tensor_type.shape.dim
            dim = dims[int(rng.integers(len(dims)))]
            value = DIMS[int(rng.integers(len(DIMS)))]
            if value == "sym":
                dim.dim_param = "S"
            else:
                dim.dim_value = value
        else:
            tensor = g.initializer[int(rng.integers(len(g.initializer)))]
            tensor.dims[int(rng.integers(len(tensor.dims)))] = int(rng.integers(0, 9))
    return kind, m.SerializeToString()


def case(seed: int) -> tuple[str, str, bytes]:
    rng = np.random.default_rng(seed)
    name, base = ("mlp", mlp()) if seed % 2 == 0 else ("cnn", cnn())
    kind, data = mutate(base, rng)
    return name, kind, data


def files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_base_models_optimize_and_verify(tmp_path):
    for make in (mlp, cnn):
        result = graphopt.optimize(make(), output=tmp_path / f"{make.__name__}.onnx")
        assert result.report["verification"]["ok"] is True


def test_fuzz_api(tmp_path):
    outcomes: collections.Counter = collections.Counter()
    for seed in range(CASES):
        name, kind, data = case(seed)
        work = tmp_path / str(seed)
        work.mkdir()
        source = work / "in.onnx"
        source.write_bytes(data)
        out = work / "out"
        label = f"case {seed} ({name}, {kind})"
        try:
            result = graphopt.optimize(source, output=out / "o.onnx")
        except GraphoptError as exc:
            assert exc.exit_code in (2, 3, 4), f"{label}: exit {exc.exit_code}: {exc}"
            assert str(exc) and "\n" not in str(exc), f"{label}: not one line: {exc!r}"
            assert not out.exists(), f"{label}: {files_below(out)} written on failure"
            outcomes[(kind, exc.exit_code)] += 1
        except Exception as exc:  # noqa: BLE001 - what the test is about
            pytest.fail(f"{label}: {type(exc).__name__}: {exc}")
        else:
            assert result.report["verification"]["ok"] is True, \
                f"{label}: not verified: {result.report['verification']}"
            _assert_same_outputs(data, out / "o.onnx", label)
            assert files_below(out) == ["o.onnx"], f"{label}: {files_below(out)}"
            outcomes[(kind, 0)] += 1
        assert source.read_bytes() == data, f"{label}: the input was modified"
        assert files_below(work) in (["in.onnx"], ["in.onnx", "out", "out/o.onnx"])
    # not vacuous: every kind of mutation ran, and both outcomes occurred
    assert {k for k, _ in outcomes} == set(KINDS), outcomes
    assert sum(v for (_, code), v in outcomes.items() if code == 0) >= 30, outcomes
    assert sum(v for (_, code), v in outcomes.items() if code == 3) >= 60, outcomes
    assert sum(v for (_, code), v in outcomes.items() if code == 2) >= 3, outcomes


def _assert_same_outputs(original: bytes, optimized: Path, label: str) -> None:
    """Independently of the report: the written model gives the original's outputs."""
    before = onnx.ModelProto()
    before.ParseFromString(original)
    after = onnx.load(optimized)
    feeds = verify.probe_inputs(before, seed=7)[0]
    want, got = verify.run(before, feeds), verify.run(after, feeds)
    assert want.keys() == got.keys(), label
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=label)


def test_fuzz_cli(tmp_path):
    """A handful of the cases through the command line: exit code 0 with the model and a
    verified report, or 2/3/4 with a one-line error and nothing written."""
    codes = collections.Counter()
    for seed in range(CLI_CASES):
        _, kind, data = case(seed)
        work = tmp_path / str(seed)
        work.mkdir()
        (work / "in.onnx").write_bytes(data)
        with contextlib.chdir(work):
            result = CliRunner().invoke(main, ["optimize", "in.onnx", "-o", "out/o.onnx",
                                               "--report", "out/r.json"])
        label = f"case {seed} ({kind}): {result.stderr}"
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{label}: {result.exception!r}"
        assert result.exit_code in (0, 2, 3, 4), label
        if result.exit_code == 0:
            assert json.loads((work / "out" / "r.json").read_text())["verification"]["ok"]
            assert files_below(work / "out") == ["o.onnx", "r.json"]
        else:
            assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
            assert files_below(work) == ["in.onnx"], label
        assert hashlib.sha256((work / "in.onnx").read_bytes()).digest() == \
            hashlib.sha256(data).digest()
        codes[result.exit_code] += 1
    assert codes[0] and codes[3], codes
