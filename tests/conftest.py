"""Shared fixtures. (Several people edit this file: re-read it before changing it.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

# tests/ is a package (so ``from tests import zoo`` works from benchmarks/), which makes
# pytest put the repository root on sys.path, not tests/: keep ``from helpers import ...``
# working for the modules that import their siblings that way.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


# ---------------------------------------------------------------- ONNX Runtime
def ort_session(model: onnx.ModelProto | str | Path,
                optimize: bool = False) -> ort.InferenceSession:
    """A CPU session, independent of graphopt.verify. ``optimize=False`` turns ORT's own
    graph rewrites off, so what runs is the graph as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@pytest.fixture
def run_ort():
    """``run_ort(model_or_path, feeds, optimize=False) -> {output name: array}``.

    Sessions are kept for the test's duration, so running one model on several batches
    builds one session (a big model takes a while to load)."""
    sessions: dict = {}

    def run(model, feeds: dict[str, np.ndarray], optimize: bool = False) -> dict[str, np.ndarray]:
        key = (id(model) if isinstance(model, onnx.ModelProto) else str(model), optimize)
        if key not in sessions:
            sessions[key] = (model, ort_session(model, optimize))  # holds model: id stays valid
        sess = sessions[key][1]
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))

    return run


# ---------------------------------------------------------------- node-count records
_NODE_COUNTS: dict[str, tuple[int, int]] = {}


@pytest.fixture(scope="module")
def browser():
    """For the web target's tests: skip where it cannot lower and run here (no
    onnxruntime-web package, Chromium or playwright); close Chromium after the module."""
    from graphopt.targets import web_browser, web_install

    missing = web_install.why_missing()
    if missing:
        pytest.skip(f"{missing} (install: {web_install.install_command()})")
    missing = web_browser.why_unavailable()
    if missing:
        pytest.skip(missing)
    yield
    web_browser.close_all()


@pytest.fixture
def record_nodes(request, record_property):
    """``record_nodes(before, after)``: keep a test's node counts for the end-of-session
    table (and the JUnit XML properties)."""

    def record(before: int, after: int) -> None:
        _NODE_COUNTS[request.node.nodeid] = (before, after)
        record_property("nodes_before", before)
        record_property("nodes_after", after)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _NODE_COUNTS:
        return
    terminalreporter.section("graphopt node counts (before -> after)")
    width = max(len(k) for k in _NODE_COUNTS)
    for nodeid, (before, after) in sorted(_NODE_COUNTS.items()):
        terminalreporter.write_line(f"{nodeid:<{width}}  {before:5d} -> {after:5d} "
                                    f"({after - before:+d})")


# ---------------------------------------------------------------- cache folder
@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """graphopt's cache folder (cost calibrations) is empty and private to the test run:
    a calibration on the developer's machine must not change what the tests see."""
    import os

    folder = tmp_path_factory.mktemp("graphopt-cache")
    old = os.environ.get("GRAPHOPT_CACHE_DIR")
    os.environ["GRAPHOPT_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("GRAPHOPT_CACHE_DIR", None)
    else:
        os.environ["GRAPHOPT_CACHE_DIR"] = old


# ---------------------------------------------------------------- the planner on digits
@pytest.fixture(scope="session")
def digits_planned(tmp_path_factory):
    """The digits CNN through the CLI: --goal latency, no scheme named; calibration on
    unlabeled training images, the budget on 257 images it never saw (about 80 s: the
    planner tests and the HTML report's browser test share it). Returns the CLI result,
    the JSON report and the model written (None when the run failed) and the folder."""
    import json

    from click.testing import CliRunner

    from graphopt.cli import main
    from tests.digits import TRAINED_ON, digits_cnn, digits_data, validation_split

    folder = tmp_path_factory.mktemp("plan")
    xtr, _, _, _ = digits_data()
    xval, _ = validation_split()
    onnx.save(digits_cnn(), folder / "digits.onnx")
    np.savez(folder / "cal.npz", input=xtr[:TRAINED_ON])
    np.savez(folder / "val.npz", input=xval)
    result = CliRunner().invoke(main, [
        "optimize", str(folder / "digits.onnx"), "-o", str(folder / "out.onnx"),
        "--goal", "latency", "--calibration-data", str(folder / "cal.npz"),
        "--validation-data", str(folder / "val.npz"), "--metric", "mean-cosine",
        "--tolerance", "0.99", "--report", str(folder / "report.json"),
        "--threads", "1"],  # (timed by CPU time: what other work disturbs least)
        env={"COLUMNS": "250"})  # (rows unwrapped, to read the table back)
    ok = result.exit_code == 0
    report = json.loads((folder / "report.json").read_text()) if ok else None
    out = onnx.load(folder / "out.onnx") if ok else None
    return result, report, out, folder
