"""--cache-dir: a result reused from the cache is the stored one, byte for byte."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import graphopt
from graphopt.result_cache import digest
from tests import digits


class Count:
    """Instrument counting the passes run."""

    def __init__(self):
        self.runs = 0

    def before_pass(self, p, iteration):
        self.runs += 1

    def after_pass(self, p, entry):
        pass


def test_a_second_run_comes_from_the_cache(tmp_path):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(digits.digits_cnn().SerializeToString())
    cache = tmp_path / "cache"
    first, second = Count(), Count()
    a = graphopt.optimize(str(model), output=tmp_path / "a.onnx", cache_dir=cache,
                          instruments=[first])
    b = graphopt.optimize(str(model), output=tmp_path / "b" / "a.onnx", cache_dir=cache,
                          instruments=[second])
    assert a.report["cache"]["hit"] is False and b.report["cache"]["hit"] is True
    assert first.runs > 10 and second.runs == 0  # nothing optimized the second time
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b" / "a.onnx").read_bytes()
    assert b.report["output_path"] == str(tmp_path / "b" / "a.onnx")
    assert b.report["output_hash"] == a.report["output_hash"]
    assert b.model.content_hash() == a.model.content_hash()


@pytest.mark.parametrize("change", ["model", "option", "data", "output name"])
def test_anything_that_changes_the_result_changes_the_key(tmp_path, change):
    model = tmp_path / "cnn.onnx"
    proto = digits.digits_cnn()
    model.write_bytes(proto.SerializeToString())
    cache = tmp_path / "cache"
    x = digits.digits_data()[0][:16]
    first = graphopt.optimize(str(model), output=tmp_path / "a.onnx", cache_dir=cache,
                              data=[{"input": x}])
    kwargs = dict(output=tmp_path / "b.onnx", cache_dir=cache, data=[{"input": x}])
    if change == "model":
        proto.graph.initializer[0].raw_data = bytes(len(proto.graph.initializer[0].raw_data))
        model.write_bytes(proto.SerializeToString())
        kwargs["output"] = tmp_path / "a2" / "a.onnx"
    elif change == "option":
        kwargs.update(output=tmp_path / "a2" / "a.onnx", skip=["fuse-conv-act"])
    elif change == "data":
        kwargs.update(output=tmp_path / "a2" / "a.onnx", data=[{"input": x + 1}])
    again = graphopt.optimize(str(model), **kwargs)
    assert again.report["cache"]["hit"] is False
    assert again.report["cache"]["key"] != first.report["cache"]["key"]


def test_digest_is_by_value():
    a = {"x": np.arange(4, dtype=np.float32), "y": [1, "two"]}
    assert digest(a) == digest({"y": [1, "two"], "x": np.arange(4, dtype=np.float32)})
    assert digest(a) != digest({"x": np.arange(4, dtype=np.float64), "y": [1, "two"]})


def test_cli_cache_dir(tmp_path):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(digits.digits_cnn().SerializeToString())
    reports = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(model),
                               "-o", str(out / "m.onnx"), "--report", str(out / "r.json"),
                               "--cache-dir", str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        reports.append(json.loads((out / "r.json").read_text()))
    assert [r["cache"]["hit"] for r in reports] == [False, True]
    assert "from the cache" in done.stderr
    assert (tmp_path / "a" / "m.onnx").read_bytes() == (tmp_path / "b" / "m.onnx").read_bytes()
    assert reports[1]["output_path"] == str(tmp_path / "b" / "m.onnx")
