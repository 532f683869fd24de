"""TVM RPC for the TVM targets: a remote device that runs (and tunes) the artifact.

``TvmTarget.connect("HOST:PORT")`` talks to an RPC server on the device,
``connect("HOST:PORT:KEY")`` to an RPC tracker that hands out servers registered under
``KEY``. On the device (any machine with Python, numpy and the ``apache-tvm`` runtime)::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090
    python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key KEY   # with a tracker
    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190             # the tracker

``tvm_rpc_server.py`` beside this file is the same server without ``cloudpickle`` or
TVM's compiler library (what the aarch64 sysroot holds; it runs there under qemu-user).

A :class:`Remote` holds one session at a time, opened on first use. The library is
uploaded once per file version, loaded on the remote and run by a Relax VM on the
remote device; inputs go over and outputs come back as numpy arrays. Timings are the
remote's own ``time_evaluator`` (measured on the device, not across the network).
"""

from __future__ import annotations

import gc
import hashlib
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.errors import GraphoptError, UsageError

PROBE_TIMEOUT_S = 5.0
SESSION_TIMEOUT_S = 60.0  # a server serves one client at a time: wait this long for it
SERVER_COMMAND = "python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}"
TRACKER_SERVER_COMMAND = "python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}"
TRACKER_COMMAND = "python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}"
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):(?P<port>\d{1,5})"
                      r"(?::(?P<key>[^\s:]+))?$")


@dataclass(frozen=True)
class RpcAddress:
    """``HOST:PORT`` (an RPC server) or ``HOST:PORT:KEY`` (a tracker and a device key)."""

    host: str
    port: int
    key: str | None = None

    @classmethod
    def parse(cls, address: str) -> "RpcAddress":
        match = _ADDRESS.match(str(address).strip())
        port = int(match["port"]) if match else 0
        if not match or not 0 < port < 65536:
            raise UsageError(f"bad RPC address {address!r}: expected HOST:PORT (an RPC "
                             f"server) or HOST:PORT:KEY (an RPC tracker and device key)",
                             hint="e.g. --rpc 192.168.1.20:9090 or --rpc tracker:9190:rpi4")
        return cls(match["host"].strip("[]"), port, match["key"])

    @property
    def tracker(self) -> bool:
        return self.key is not None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f":{self.key}" if self.key else "")

    def start_hint(self) -> str:
        """What to start on the device (and where) for this address to answer."""
        if self.tracker:
            return (f"start the tracker ({TRACKER_COMMAND.format(port=self.port)}) and on "
                    f"the device a server registered with it: " +
                    TRACKER_SERVER_COMMAND.format(host=self.host, port=self.port,
                                                  key=self.key))
        return f"start the server on the device: {SERVER_COMMAND.format(port=self.port)}"


class Remote:
    """One device behind an RPC server or tracker: uploads, loads and runs libraries.

    ``device`` is the TVM device kind the VM runs on there (``"cpu"``, ``"cuda"``)."""

    def __init__(self, address: RpcAddress, device: str = "cpu"):
        self.address = address
        self.device_kind = device
        self._session = None
        self._vms: dict[tuple, object] = {}

    def __repr__(self) -> str:
        return f"Remote({str(self.address)!r}, device={self.device_kind!r})"

    # ------------------------------------------------------------------ sessions
    def check(self) -> None:
        """Fail now (GraphoptError saying what to start) if nothing answers: a direct
        server is connected to (the session is kept); a tracker must list a server under
        the key (no session is taken, so tuning can have the server)."""
        if self.address.tracker:
            self.tracker_servers()
        else:
            self.session()

    def session(self):
        if self._session is None:
            self._session = self._open()
        return self._session

    def release(self) -> None:
        """Drop the session (and the libraries loaded through it): the server is free
        for another client (the tuner asks the tracker for it)."""
        self._vms.clear()
        self._session = None
        gc.collect()  # the C++ session closes when its last handle goes

    def _probe(self) -> None:
        try:
            socket.create_connection((self.address.host, self.address.port),
                                     timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            what = "RPC tracker" if self.address.tracker else "RPC server"
            raise GraphoptError(f"no {what} answers at {self.address.host}:"
                                f"{self.address.port}: {exc.strerror or exc}",
                                hint=self.address.start_hint()) from exc

    def tracker_servers(self) -> int:
        """How many servers the tracker lists under the key (GraphoptError when none)."""
        from tvm import rpc

        self._probe()
        host, port, key = self.address.host, self.address.port, self.address.key
        try:
            tracker = rpc.connect_tracker(host, port)
            summary = tracker.summary()
            tracker.close()
        except Exception as exc:  # tvm raises RuntimeError/TVMError/OSError
            raise GraphoptError(f"{host}:{port} is not a TVM RPC tracker: "
                                f"{_first_line(exc)}", hint=self.address.start_hint()) from exc
        servers = [s for s in summary.get("server_info", [])
                   if str(s.get("key", "")).split(":", 1)[-1] == key]
        if not servers:
            keys = sorted({str(s.get("key", "")).split(":", 1)[-1]
                           for s in summary.get("server_info", [])})
            raise GraphoptError(
                f"the RPC tracker at {host}:{port} has no server registered under key "
                f"{key!r}" + (f" (keys: {', '.join(keys)})" if keys else " (none at all)"),
                hint="on the device: " + TRACKER_SERVER_COMMAND.format(host=host, port=port,
                                                                       key=key))
        return len(servers)

    def _open(self):
        from tvm import rpc

        self._probe()
        host, port, key = self.address.host, self.address.port, self.address.key
        if key is not None:
            self.tracker_servers()
        result: dict = {}

        def open_session():  # blocks while the server (or every server of the key) is busy
            try:
                result["session"] = rpc.connect(host, port) if key is None else \
                    rpc.connect_tracker(host, port).request(key)
            except Exception as exc:  # tvm raises RuntimeError/TVMError/OSError
                result["error"] = exc

        worker = threading.Thread(target=open_session, daemon=True)
        worker.start()
        worker.join(SESSION_TIMEOUT_S)
        if worker.is_alive():  # its session, if it ever comes, is dropped (and closed)
            busy = (f"every server under key {key!r} stayed busy" if key else
                    "the server stayed busy (it serves one client at a time)")
            raise GraphoptError(f"no TVM RPC session with {self.address} within "
                                f"{SESSION_TIMEOUT_S:.0f} s: {busy}",
                                hint="wait for the other client to finish" +
                                     ("" if key else ", or share the device through a "
                                                     "tracker (--rpc HOST:PORT:KEY)"))
        if "error" in result:
            raise GraphoptError(f"cannot open a TVM RPC session with {self.address}: "
                                f"{_first_line(result['error'])}",
                                hint=self.address.start_hint()) from result["error"]
        return result["session"]

    def device(self):
        return self.session().device(self.device_kind, 0)

    # ------------------------------------------------------------------ running
    def vm(self, library: Path):
        """The Relax VM of ``library`` on the remote device (uploaded and loaded once per
        file version and session)."""
        from tvm.runtime.vm import VirtualMachine

        library = Path(library)
        stat = library.stat()
        key = (str(library.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._vms:
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            remote_name = f"graphopt-{digest}{library.suffix}"
            sess = self.session()
            try:
                sess.upload(str(library), remote_name)
                module = sess.load_module(remote_name)
                self._vms[key] = VirtualMachine(module, self.device())
            except Exception as exc:
                self.release()
                raise GraphoptError(f"loading {library} on the RPC device {self.address} "
                                    f"failed: {_first_line(exc)}") from exc
        return self._vms[key]

    def run(self, library: Path, arrays: list[np.ndarray]) -> list[np.ndarray]:
        from graphopt.targets import tvm_runner

        vm = self.vm(library)
        try:
            return tvm_runner.run_vm(vm, arrays, self.device())
        except Exception as exc:
            self.release()
            raise GraphoptError(f"running {library} on the RPC device {self.address} "
                                f"failed: {_first_line(exc)}") from exc

    def measure(self, library: Path, arrays: list[np.ndarray], repeat: int) -> float:
        from graphopt.targets import tvm_runner

        vm = self.vm(library)
        try:
            return tvm_runner.time_vm(vm, arrays, self.device(), repeat)
        except Exception as exc:
            self.release()
            raise GraphoptError(f"timing {library} on the RPC device {self.address} "
                                f"failed: {_first_line(exc)}") from exc

    def time_kernels(self, library: Path, kernels: dict, repeat: int) -> dict[str, float]:
        """Median seconds of one call of each kernel of ``library`` (a library of TIR
        functions, ``tvm_kernels.export_kernels``) on the remote device, timed there on
        zero-filled arguments of the kernel's signature (``{name: [(shape, dtype)]}``):
        one warm-up call, then ``repeat`` timed ones."""
        from tvm import runtime

        library = Path(library)
        digest = hashlib.sha256(library.read_bytes()).hexdigest()[:16]
        sess = self.session()
        device = self.device()
        out: dict[str, float] = {}
        try:
            sess.upload(str(library), f"graphopt-kernels-{digest}{library.suffix}")
            module = sess.load_module(f"graphopt-kernels-{digest}{library.suffix}")
            for name, signature in kernels.items():
                args = [runtime.tensor(np.zeros(shape, dtype), device)
                        for shape, dtype in signature]
                timer = module.time_evaluator(name, device, number=1,
                                              repeat=max(1, repeat))
                out[name] = float(timer(*args).median)
                del args
        except Exception as exc:
            self.release()
            raise GraphoptError(f"timing the kernels of {library.name} on the RPC device "
                                f"{self.address} failed: {_first_line(exc)}") from exc
        return out


# ---------------------------------------------------------------------- tuning
def rpc_runner(address: RpcAddress, servers: int, timeout_s: int = 60):
    """MetaSchedule's runner measuring candidates on the servers the tracker hands out
    under the key (one worker per server)."""
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.RPCConfig(tracker_host=address.host, tracker_port=address.port,
                                 tracker_key=address.key, session_timeout_sec=timeout_s)
    return ms.runner.RPCRunner(rpc_config=config, max_workers=max(1, servers))


def export_shared(linker: str, module) -> str:
    """MetaSchedule builder export: a shared library linked here with ``linker`` (the
    preset's, so a cross build runs on a device that has no compiler)."""
    import os
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
    module.export_library(path, fcompile=cc.cross_compiler(linker))
    return path


def _first_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]
