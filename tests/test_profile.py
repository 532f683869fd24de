"""graphopt profile: measured time per kernel beside the cost model's estimate."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import graphopt
from graphopt.profile import median_by_name
from tests import digits


def _event(cat, name, ts, dur, op=None):
    event = {"cat": cat, "name": name, "ts": ts, "dur": dur}
    if op:
        event["args"] = {"op_name": op}
    return event


def test_kernel_times_are_summed_per_run_and_the_warm_up_left_out():
    events = [_event("Session", "model_run", 0, 1000),  # warm-up: left out
              _event("Node", "conv_kernel_time", 10, 900, "Conv"),
              _event("Session", "model_run", 2000, 100),
              _event("Node", "conv_kernel_time", 2010, 50, "Conv"),
              _event("Node", "body_kernel_time", 2070, 5, "Add"),  # a loop body, twice
              _event("Node", "body_kernel_time", 2080, 5, "Add"),
              _event("Session", "model_run", 3000, 120),
              _event("Node", "conv_kernel_time", 3010, 70, "Conv"),
              _event("Node", "body_kernel_time", 3090, 20, "Add"),
              _event("Session", "model_run", 4000, 110),
              _event("Node", "conv_kernel_time", 4010, 60, "Conv"),
              _event("Node", "conv_fence_before", 4000, 1)]  # not a kernel
    times, run_s = median_by_name(events)
    assert run_s == pytest.approx(110e-6)
    assert times["conv"] == ("Conv", pytest.approx(60e-6))
    assert times["body"] == ("Add", pytest.approx(10e-6))  # runs: 10, 20, 0 -> median 10


def test_kernel_medians_past_the_median_run_are_scaled_to_it():
    """Medians do not add: kernels a (60, 10, 60) and b (10, 60, 60) have medians of 60
    each, 120 together, in runs whose median is 100. The rows still add up to the run,
    shared in proportion."""
    events = [_event("Session", "model_run", 0, 100),
              _event("Node", "a_kernel_time", 0, 60, "Conv"),
              _event("Node", "b_kernel_time", 60, 10, "Add"),
              _event("Session", "model_run", 1000, 100),
              _event("Node", "a_kernel_time", 1000, 60, "Conv"),
              _event("Node", "b_kernel_time", 1060, 10, "Add"),
              _event("Session", "model_run", 2000, 90),
              _event("Node", "a_kernel_time", 2000, 10, "Conv"),
              _event("Node", "b_kernel_time", 2010, 60, "Add"),
              _event("Session", "model_run", 3000, 130),
              _event("Node", "a_kernel_time", 3000, 60, "Conv"),
              _event("Node", "b_kernel_time", 3060, 60, "Add")]
    times, run_s = median_by_name(events)
    assert run_s == pytest.approx(100e-6)
    assert times["a"][1] == pytest.approx(50e-6) and times["b"][1] == pytest.approx(50e-6)


def test_profile_digits_cnn_adds_up_and_matches_nodes(tmp_path):
    """Batch 256: the kernels take nearly the whole run, the rows add up to the run, and
    the convolutions (re-laid out by ONNX Runtime, renamed ``<output>_nchwc``) are matched
    back to the graph's nodes with an estimate."""
    model = tmp_path / "cnn.onnx"
    model.write_bytes(digits.digits_cnn().SerializeToString())
    done = subprocess.run([sys.executable, "-m", "graphopt.cli", "profile", str(model),
                           "--input-shape", "input=256x1x8x8", "--threads", "1",
                           "--runs", "5", "--json", "--top", "50"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["input_shapes"] == {"input": [256, 1, 8, 8]}
    rows = result["by_op"]
    assert_rows_add_up(result)
    assert result["kernel_s"] >= 0.8 * result["run_s"]
    assert next(iter(rows)) == "Conv"  # the heaviest op type
    convs = [k for k in result["kernels"] if k["op"] == "Conv"]
    assert len(convs) == 3 and all(k["node"] and k["estimated_s"] > 0 for k in convs)
    assert all(k["bound"] in ("compute", "memory") and 0 < k["of_peak"] for k in convs)
    assert result["weight_bytes"] > 4 * 50_000 and result["peak_activation_bytes"] > 0


def test_profile_matches_int8_kernels_to_their_nodes(tmp_path):
    """ONNX Runtime names an int8 graph's kernels after their nodes with a suffix
    (``/3/Conv_token_4``, the QLinearConv of ``/3/Conv``) or a prefix (``fused /12/Gemm``):
    they are matched back to the nodes, with the cost model's estimate."""
    xtr = digits.digits_data()[0]
    quantized = graphopt.optimize(digits.digits_cnn(), target="ort", quantize="int8",
                                  calibration={"input": xtr[:256]}).model.to_onnx()
    model = tmp_path / "int8.onnx"
    model.write_bytes(quantized.SerializeToString())
    done = subprocess.run([sys.executable, "-m", "graphopt.cli", "profile", str(model),
                           "--input-shape", "input=64x1x8x8", "--threads", "1",
                           "--runs", "3", "--json", "--top", "50"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    kernels = json.loads(done.stdout)["kernels"]
    convs = [k for k in kernels if k["op"] == "QLinearConv"]
    assert len(convs) == 3, kernels
    assert all(k["node"] and k["node"] in k["name"] and k["estimated_s"] > 0 for k in convs)
    pools = [k for k in kernels if "MaxPool" in k["op"]]
    assert pools and all(k["node"] and k["estimated_s"] > 0 for k in pools)


def test_profile_refuses_a_target_without_a_profiler(tmp_path):
    model = tmp_path / "cnn.onnx"
    model.write_bytes(digits.digits_cnn().SerializeToString())
    done = subprocess.run([sys.executable, "-m", "graphopt.cli", "profile", str(model),
                           "-t", "litert"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no per-kernel profiler" in done.stderr


def test_profile_on_inputs_the_model_cannot_take_is_a_clear_error(tmp_path):
    """Token ids past the embedding table: ONNX Runtime fails inside the profiled run;
    the command says so (exit 2, the node and the reason), with no traceback."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="lookup")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])], [table])
    model = tmp_path / "m.onnx"
    model.write_bytes(helper.make_model(graph).SerializeToString())
    np.savez(tmp_path / "ids.npz", ids=np.array([[1, 2, 99]], np.int64))
    done = subprocess.run([sys.executable, "-m", "graphopt.cli", "profile", str(model),
                           "--data", str(tmp_path / "ids.npz")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "cannot run the model on --data" in done.stderr and "lookup" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="Apache TVM is not "
                    "installed (pip install graphopt[tvm])")
def test_profile_on_tvm_times_its_fused_kernels(tmp_path):
    """--target x86: the model compiled by TVM, its VM timed around every call: TVM's
    fused kernels (three conv2d for the digits CNN) and the VM's own calls add up, with
    what lies between them, to the measured run. An emulated target (arm under qemu
    here) is refused: its times would say nothing about the device."""
    model = tmp_path / "cnn.onnx"
    model.write_bytes(digits.digits_cnn().SerializeToString())
    common = [sys.executable, "-m", "graphopt.cli", "profile", str(model),
              "--input-shape", "input=64x1x8x8", "--runs", "5", "--json", "--top", "50"]
    done = subprocess.run([*common, "-t", "x86"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    rows = result["by_op"]
    assert_rows_add_up(result)
    assert rows["conv2d"]["count"] == 3 and "vm" in rows, rows
    assert rows["conv2d"]["measured_s"] > 0.3 * result["run_s"], rows
    assert all(k["measured_s"] > 0 for k in result["kernels"] if k["op"] == "conv2d")
    done = subprocess.run([*common, "-t", "arm"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "emulation" in done.stderr, done.stderr


def assert_rows_add_up(result: dict) -> None:
    """The per-op rows, "(between kernels)" included, add up to the measured run; the
    kernels' medians come from different runs, so with next to nothing between them they
    may add up to a little more than the median run (then nothing is between)."""
    rows = result["by_op"]
    kernels = sum(r["measured_s"] for k, r in rows.items() if k != "(between kernels)")
    assert kernels <= 1.02 * result["run_s"], (kernels, result["run_s"])
    assert sum(r["measured_s"] for r in rows.values()) == \
        pytest.approx(max(result["run_s"], kernels))
