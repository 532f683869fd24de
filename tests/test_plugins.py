"""A separate distribution adds a pass through entry points, exactly like graphopt's own.

The distribution is a temporary folder holding a package and its ``.dist-info`` (what pip
would install), put on ``PYTHONPATH`` / ``sys.path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

import graphopt
from graphopt.errors import PluginError
from graphopt.registry import Registry, pass_registry
from graphopt.pass_infra import Pass

PLUGIN_SOURCE = textwrap.dedent('''
    from graphopt import Pass, PassResult
    from graphopt.rewrite import bypass, walk


    class EliminateDoubleNeg(Pass):
        """Neg(Neg(x)) -> x."""

        name = "eliminate-double-neg"
        family = "cleanup"
        lossless = True

        def run(self, model, ctx):
            removed = 0
            for graph, node in walk(model.all_graphs()):
                inner = node.inputs[0].inputs[0] if node.op == "Neg" and node.inputs[0].inputs else None
                if inner is None or inner.op != "Neg" or len(node.inputs[0].outputs) != 1:
                    continue
                if bypass(node, graph) and bypass(inner, graph):
                    removed += 2
            return PassResult(changed=removed > 0, stats={"removed": removed})


    class NotAPass:
        name = "not-a-pass"
''')


def make_distribution(root: Path) -> Path:
    package = root / "negplugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PLUGIN_SOURCE)
    info = root / "negplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: negplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [graphopt.passes]
        eliminate-double-neg = negplugin:EliminateDoubleNeg
        broken-import = negplugin_missing_module:Whatever
        not-a-pass = negplugin:NotAPass
    """))
    return root


def double_neg_model() -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("Neg", ["x"], ["a"]), oh.make_node("Neg", ["a"], ["b"]),
         oh.make_node("Relu", ["b"], ["y"])],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    root = make_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    return root


def run_cli(args, plugin_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(plugin_root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_cli_lists_and_runs_third_party_pass(plugin_path, tmp_path):
    onnx.save(double_neg_model(), tmp_path / "m.onnx")
    listing = run_cli(["passes"], plugin_path, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "eliminate-double-neg" in listing.stdout and "negplugin" in listing.stdout
    assert "fold-constants" in listing.stdout  # the built-ins still list beside it

    result = run_cli(["optimize", "m.onnx", "-o", "out.onnx", "--passes",
                      "eliminate-double-neg", "--report", "r.json"], plugin_path, tmp_path)
    assert result.returncode == 0, result.stderr
    optimized = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in optimized.graph.node] == ["Relu"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["ok"] is True
    assert report["trace"][0]["stats"]["removed"] == 2


def test_broken_plugins_are_named_and_do_not_break_others(plugin_path):
    registry = pass_registry()
    assert {"broken-import", "not-a-pass", "eliminate-double-neg"} <= set(registry.names())
    with pytest.raises(PluginError) as missing:
        registry.get("broken-import")
    assert "negplugin" in str(missing.value) and "negplugin_missing_module" in str(missing.value)
    with pytest.raises(PluginError, match="not a Pass subclass"):
        registry.get("not-a-pass")
    loaded, errors = registry.load_all()
    assert set(errors) == {"broken-import", "not-a-pass"}
    assert "eliminate-double-neg" in loaded and "eliminate-dead-code" in loaded

    result = graphopt.optimize(double_neg_model(), passes="eliminate-double-neg")
    assert [n.op for n in result.model.graph.nodes] == ["Relu"]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    from graphopt import verify
    np.testing.assert_allclose(verify.run(result.model.to_onnx(), {"x": x})["y"],
                               np.maximum(x, 0))


def test_cli_broken_plugin_exit_code(plugin_path, tmp_path):
    onnx.save(double_neg_model(), tmp_path / "m.onnx")
    result = run_cli(["optimize", "m.onnx", "-o", "out.onnx", "--passes", "broken-import"],
                     plugin_path, tmp_path)
    assert result.returncode == 2
    assert "negplugin" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.onnx").exists()
    long_listing = run_cli(["passes", "--long"], plugin_path, tmp_path)
    assert long_listing.returncode == 0
    assert "broken" in long_listing.stdout


def test_listing_does_not_import_plugins(plugin_path):
    before = set(sys.modules)
    registry = Registry("graphopt.passes", Pass, "pass")
    assert "eliminate-double-neg" in registry.names()
    assert registry.info("eliminate-double-neg").distribution == "negplugin"
    assert "negplugin" not in set(sys.modules) - before
