"""TVM RPC (``--rpc HOST:PORT[:KEY]``): artifacts run, are timed and tuned on a device
behind a TVM RPC server or tracker. Real servers on loopback, each in its own process
group (killed when the module's tests are done):

* ``python -m tvm.exec.rpc_server`` runs x86 artifacts (this machine plays the device);
* ``python -m tvm.exec.rpc_tracker`` with a server registered under a key (needs
  ``tornado``, as TVM's tracker does);
* the runtime-only ``graphopt/targets/tvm_rpc_server.py`` under qemu-aarch64 in the
  aarch64 sysroot runs ``arm`` artifacts: the whole real-device flow, with qemu as the
  board (what it times is emulation, which is why the test asserts no figure).

Skips, each with its reason, when TVM, tornado, the cross linker, qemu or the sysroot is
missing. Tuning over RPC is ``slow`` (MetaSchedule's worker start-up alone takes minutes
on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import GraphoptError, UsageError
from tests import zoo
from tests.helpers import check_outputs, print_timings_at_exit

HAS_TVM = importlib.util.find_spec("tvm") is not None
HAS_TORNADO = importlib.util.find_spec("tornado") is not None
CROSS_LINKER = "aarch64-linux-gnu-g++"
ATOL = 1e-4
KEY = "graphopt-test"
START_TIMEOUT_S = 90

needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="Apache TVM is not installed "
                               "(pip install 'graphopt[tvm]')")
needs_tornado = pytest.mark.skipif(not HAS_TORNADO, reason="TVM's RPC tracker needs "
                                   "tornado (pip install tornado)")


def _qemu_missing() -> str | None:
    from graphopt.targets import tvm_sysroot

    if shutil.which(CROSS_LINKER) is None:
        return f"no {CROSS_LINKER} (apt-get install g++-aarch64-linux-gnu)"
    if tvm_sysroot.qemu() is None:
        return "no qemu-aarch64 (apt-get install qemu-user)"
    root, why = tvm_sysroot.status()
    return None if root else f"{why} (python -m graphopt.targets.tvm_sysroot)"


# ---------------------------------------------------------------- servers on loopback
def _free_port() -> int:
    """A port free now, with the next one free too (servers are given [port, port+1))."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            return port
    raise RuntimeError("no free port")


class _Process:
    """A server started in its own process group, its output in a log file."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_for_port(self, port: int, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n"
                                   f"{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"nothing listens on {port} after {timeout} s:\n{self.output()}")


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    """``start(name, cmd, port, env=None) -> _Process`` once it listens on ``port``
    (``None``: at once); all stopped at the end of the module (also when a test fails)."""
    started: list[_Process] = []
    logs = tmp_path_factory.mktemp("rpc-logs")

    def start(name: str, cmd: list[str], port: int | None,
              env: dict | None = None) -> _Process:
        proc = _Process(cmd, logs / f"{name}.log", env)
        started.append(proc)
        try:
            if port is not None:
                proc.wait_for_port(port)
        except RuntimeError as exc:
            pytest.fail(f"{name}: {exc}")
        return proc

    def stop_all():
        for proc in reversed(started):
            proc.stop()

    request.addfinalizer(stop_all)
    return start


def _server_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
            str(port), "--port-end", str(port + 1), *extra]


@pytest.fixture(scope="module")
def rpc_server(servers) -> str:
    """``127.0.0.1:PORT`` of TVM's RPC server (this machine as the device)."""
    port = _free_port()
    servers("rpc_server", _server_cmd(port), port)
    return f"127.0.0.1:{port}"


def _connected(request, target: str, address: str):
    """``graphopt.get_target(target).connect(address)``, its session released when the
    module is done. A server serves one client at a time, so the tests share this one
    target per server instead of connecting again."""
    remote = graphopt.get_target(target).connect(address)
    request.addfinalizer(remote.remote.release)
    return remote


@pytest.fixture(scope="module")
def x86_remote(request, rpc_server):
    return _connected(request, "x86", rpc_server)


@pytest.fixture(scope="module")
def x86_tracked(request, tracker):
    return _connected(request, "x86", tracker)


@pytest.fixture(scope="module")
def arm_remote(request, qemu_server):
    return _connected(request, "arm", qemu_server)


@pytest.fixture(scope="module")
def tracker(servers) -> str:
    """``127.0.0.1:PORT:KEY``: TVM's tracker with one server registered under KEY."""
    if not HAS_TORNADO:
        pytest.skip("TVM's RPC tracker needs tornado (pip install tornado)")
    from tvm import rpc

    port, server_port = _free_port(), _free_port()
    servers("rpc_tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                            "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
            port)
    # Not probed by connecting: a server that sees a connection close before the
    # handshake drops its tracker link and registers again. Wait for the registration.
    server = servers("tracked_server", _server_cmd(server_port, "--tracker",
                                                   f"127.0.0.1:{port}", "--key", KEY), None)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.proc.poll() is None:
        session = rpc.connect_tracker("127.0.0.1", port)
        registered = [s for s in session.summary()["server_info"]
                      if s["key"] == f"server:{KEY}"]
        session.close()
        if registered:
            return f"127.0.0.1:{port}:{KEY}"
        time.sleep(0.5)
    pytest.fail(f"no server registered under {KEY!r} at the tracker:\n{server.output()}")


@pytest.fixture(scope="module")
def qemu_server(servers) -> str:
    """``127.0.0.1:PORT`` of the runtime-only RPC server on the emulated aarch64 device."""
    missing = _qemu_missing() if HAS_TVM else "Apache TVM is not installed"
    if missing:
        pytest.skip(missing)
    from graphopt.targets import tvm_sysroot

    port = _free_port()
    root, _ = tvm_sysroot.status()
    servers("qemu_rpc_server", tvm_sysroot.rpc_server_command(root, port, cpu="cortex-a72"),
            port, env=tvm_sysroot.qemu_env())
    return f"127.0.0.1:{port}"


# ---------------------------------------------------------------- artifacts
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """``lowered(target) -> (artifact, proto, feeds)`` for mobilenet_cnn, compiled once
    (optimized by graphopt, lowered here: nothing run by the lowering itself)."""
    cache = {}

    def lower(target: str):
        if target not in cache:
            proto = zoo.mobilenet_cnn()
            x = np.random.default_rng(0).standard_normal((2, *zoo.CNN_INPUT)).astype(
                np.float32)
            tgt = graphopt.get_target(target)
            start = time.perf_counter()
            model = graphopt.optimize(proto, target=target).model
            artifact = tgt.lower(model, tmp_path_factory.mktemp(target) / "artifact")
            TIMINGS[f"optimize+lower {target} mobilenet_cnn"] = time.perf_counter() - start
            cache[target] = (artifact, proto, {"input": x})
        return cache[target]

    return lower


@pytest.fixture(scope="module", autouse=True)
def _report_timings(request):
    """Print the timings at the very end (after capture has stopped)."""
    yield
    print_timings_at_exit(request, "TVM RPC timings", dict(TIMINGS))


def _check_outputs(got: dict, want: dict) -> None:
    check_outputs(got, want, ATOL)


def _timed(label: str, fn):
    start = time.perf_counter()
    value = fn()
    TIMINGS[label] = time.perf_counter() - start
    return value


# ---------------------------------------------------------------- addresses and errors
def test_addresses_parse_or_are_usage_errors():
    from graphopt.targets.tvm_rpc import RpcAddress

    assert RpcAddress.parse("10.0.0.7:9090") == RpcAddress("10.0.0.7", 9090, None)
    assert RpcAddress.parse("tracker.lan:9190:rpi4") == RpcAddress("tracker.lan", 9190,
                                                                   "rpi4")
    assert RpcAddress.parse("[::1]:9090").host == "::1"
    assert str(RpcAddress.parse("h:1:k")) == "h:1:k"
    for bad in ("", "host", "host:", ":9090", "host:port", "host:99999", "host:0",
                "a:1:k:x", "host:9090:"):
        with pytest.raises(UsageError, match="bad RPC address"):
            RpcAddress.parse(bad)


@needs_tvm
def test_connect_to_a_bad_address_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="'127.0.0.1'"):
        graphopt.get_target("x86").connect("127.0.0.1")


def test_the_ort_target_has_no_rpc():
    with pytest.raises(UsageError, match="--rpc"):
        graphopt.get_target("ort").connect("127.0.0.1:9090")


@needs_tvm
def test_nothing_listening_names_the_address_and_what_to_start():
    port = _free_port()
    with pytest.raises(GraphoptError) as err:
        graphopt.get_target("x86").connect(f"127.0.0.1:{port}")
    assert not isinstance(err.value, UsageError)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert f"python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}" in err.value.hint
    with pytest.raises(GraphoptError) as err:
        graphopt.get_target("arm").connect(f"127.0.0.1:{port}:rpi4")
    assert "tracker" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
    assert f"--tracker 127.0.0.1:{port} --key rpi4" in err.value.hint


# ---------------------------------------------------------------- RPC server (x86)
@needs_tvm
def test_x86_artifact_runs_over_rpc_and_matches_ort(lowered, x86_remote, rpc_server,
                                                    run_ort):
    artifact, proto, feeds = lowered("x86")
    remote = x86_remote
    assert repr(remote) == f"TvmTarget('x86', remote={rpc_server!r})"
    assert remote.name == "x86" and remote.remote is not None
    assert graphopt.get_target("x86").remote is None  # the registered target is unchanged
    out = _timed("run x86 over RPC (first: upload + load)", lambda: remote.run(artifact,
                                                                                feeds))
    _check_outputs(out, run_ort(proto, feeds))
    _timed("run x86 over RPC (loaded)", lambda: remote.run(artifact, feeds))
    _timed("run x86 here", lambda: graphopt.get_target("x86").run(artifact, feeds))
    # The symbolic batch survives the trip: another batch size, same library.
    x5 = np.random.default_rng(5).standard_normal((5, *zoo.CNN_INPUT)).astype(np.float32)
    _check_outputs(remote.run(artifact, {"input": x5}), run_ort(proto, {"input": x5}))


@needs_tvm
def test_measure_over_rpc_is_the_devices_time(lowered, x86_remote):
    artifact, _, feeds = lowered("x86")
    seconds = x86_remote.measure(artifact, feeds, repeat=10)
    local = graphopt.get_target("x86").measure(artifact, feeds, repeat=10)
    TIMINGS["measure x86 over RPC (remote time_evaluator)"] = seconds
    TIMINGS["measure x86 here (time_evaluator)"] = local
    assert isinstance(seconds, float) and 0 < seconds < 1
    assert isinstance(local, float) and 0 < local < 1


@needs_tvm
def test_profile_over_rpc_times_the_same_kernels_on_the_device(x86_remote):
    """``graphopt profile --rpc``: the VM's per-call hook cannot reach a remote VM, so
    each kernel is timed by the device itself. The kernels are the ones the local
    profile sees (the VM's bytecode calls them; a reshape the build turned into a view
    is not one), each with a time, and they account for most of the run timed there;
    the rest is the VM's own calls."""
    from graphopt.profile import profile

    proto = zoo.mobilenet_cnn()
    feeds = {"input": np.random.default_rng(0).standard_normal(
        (4, *zoo.CNN_INPUT)).astype(np.float32)}
    local = _timed("profile mobilenet_cnn here",
                   lambda: profile(proto, graphopt.get_target("x86"), feeds, runs=5))
    remote = _timed("profile mobilenet_cnn over RPC",
                    lambda: profile(proto, x86_remote, feeds, runs=5))
    kernels = {k.name: k for k in remote.kernels}
    assert set(kernels) == {k.name for k in local.kernels if k.op != "vm"}
    assert all(k.measured_s > 0 for k in kernels.values()), remote.kernels
    assert {k.name: k.op for k in local.kernels if k.op != "vm"} == \
        {k.name: k.op for k in remote.kernels}
    total = sum(k.measured_s for k in kernels.values())
    assert 0.5 * remote.run_s < total <= remote.run_s * (1 + 1e-9), (total, remote.run_s)


@needs_tvm
def test_an_opened_artifact_folder_runs_over_rpc(lowered, x86_remote, run_ort):
    artifact, proto, feeds = lowered("x86")
    folder = artifact.path.parent
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["artifact"] == manifest["library"] == "model.so"
    remote = x86_remote
    opened = remote.open(folder)
    assert opened.path == artifact.path and opened.format == artifact.format
    _check_outputs(remote.run(opened, feeds), run_ort(proto, feeds))


@needs_tvm
def test_tuning_through_a_plain_server_says_a_tracker_is_needed(x86_remote, tmp_path):
    with pytest.raises(UsageError, match="needs a tracker") as err:
        x86_remote.lower(graphopt.load(_gemm_relu()), tmp_path / "out", tune_trials=4)
    assert "rpc_tracker" in err.value.hint and "--key" in err.value.hint
    assert not (tmp_path / "out").exists()


@needs_tvm
def test_tuning_an_arm_target_without_rpc_is_refused(tmp_path):
    with pytest.raises(UsageError, match="device itself") as err:
        graphopt.get_target("arm").lower(graphopt.load(_gemm_relu()), tmp_path / "out",
                                         tune_trials=4)
    assert "--rpc" in err.value.hint
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tracker
@needs_tvm
@needs_tornado
def test_x86_artifact_runs_through_a_tracker(lowered, x86_tracked, run_ort):
    artifact, proto, feeds = lowered("x86")
    _check_outputs(_timed("run x86 through the tracker (request + upload + load)",
                          lambda: x86_tracked.run(artifact, feeds)), run_ort(proto, feeds))
    assert x86_tracked.measure(artifact, feeds, repeat=5) > 0


@needs_tvm
@needs_tornado
def test_an_unknown_key_at_the_tracker_is_named(tracker):
    """(Asking the tracker takes no session: the server stays free.)"""
    host_port = tracker.rsplit(":", 1)[0]
    with pytest.raises(GraphoptError, match="no server registered under key 'nope'") as err:
        graphopt.get_target("x86").connect(f"{host_port}:nope")
    assert KEY in str(err.value) and "--key nope" in err.value.hint


def _gemm_relu(batch: int = 4, k: int = 64, n: int = 32):
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
         helper.make_node("Relu", ["h"], ["y"])], "gemm_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_tvm
@needs_tornado
@pytest.mark.slow
def test_tuning_measures_candidates_through_the_tracker(x86_tracked, tracker, tmp_path,
                                                        run_ort):
    """MetaSchedule's RPC runner measures on the tracker's server (about 2.5 minutes on
    2 cores, mostly MetaSchedule's worker processes importing TVM). ``lower`` releases
    the target's own session first, so the tuner gets the one server."""
    proto = _gemm_relu()
    remote = x86_tracked
    out = tmp_path / "tuned"
    artifact = _timed("tune (4 trials over RPC) + lower Gemm+Relu",
                      lambda: remote.lower(graphopt.load(proto), out, tune_trials=4))
    assert sorted(p.name for p in (out / "tuning").iterdir()) == [
        "database_tuning_record.json", "database_workload.json"]
    assert (out / "tuning" / "database_tuning_record.json").read_text().strip()
    tuning = json.loads((out / "manifest.json").read_text())["tuning"]
    assert tuning["trials"] == 4 and tuning["measured_on"] == f"RPC tracker {tracker}"
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    _check_outputs(remote.run(artifact, {"x": x}), run_ort(proto, {"x": x}))


# ---------------------------------------------------------------- arm on qemu as the device
@needs_tvm
def test_arm_artifact_runs_on_the_emulated_device_over_rpc(lowered, arm_remote, run_ort):
    """The real-device flow for ARM: an aarch64 RPC server (the sysroot's Python and TVM
    runtime under qemu-aarch64, as a board would run it) gets the library over RPC."""
    artifact, proto, feeds = lowered("arm")
    remote = arm_remote
    out = _timed("run arm over RPC on qemu (first: upload + load)",
                 lambda: remote.run(artifact, feeds))
    _check_outputs(out, run_ort(proto, feeds))
    _timed("run arm over RPC on qemu (loaded)", lambda: remote.run(artifact, feeds))
    # Timing through RPC is the remote's own clock (here: emulation, so no figure is
    # asserted); without RPC an arm target has no device to time on.
    assert remote.measure(artifact, feeds, repeat=3) > 0
    assert graphopt.get_target("arm").measure(artifact, feeds) is None
