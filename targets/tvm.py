"""Apache TVM (Relax) on CPUs and GPUs: the artifact is a compiled shared library for the
device (for a GPU preset: host code plus the kernels' CUDA source, which TVM's CUDA
runtime compiles when the library loads on the GPU).

One class, ``TvmTarget``; what differs between ``x86``, ``arm``, ``arm-a76``, ... is data,
a ``TvmPreset`` (``graphopt.targets.presets`` holds the table). ``lower`` writes a
directory::

    out/model.onnx      the optimized model the library was compiled from
    out/model.so        the Relax VM executable for the preset's triple (model.tar of
                        unlinked objects when no linker for the triple is installed)
    out/manifest.json   target, device, LLVM target, inputs/outputs, hashes, toolchain

``run`` executes it here: in this process for ``runner="local"``, under qemu-user with the
aarch64 sysroot (``python -m graphopt.targets.tvm_sysroot``) for ``"qemu-aarch64"``; on
the device itself through TVM RPC for a target returned by ``connect("HOST:PORT[:KEY]")``
(``--rpc``; ``graphopt.targets.tvm_rpc``), which also tunes there. Timings under emulation
say nothing about the device and are never reported as such (``measure`` gives None).

TVM is imported only inside the methods that need it: importing graphopt never imports
TVM, and ``availability()`` says what to install when it is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from graphopt.cost import Device
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model, save, saved_files
from graphopt.target import (MANIFEST, Artifact, Capabilities, Target, all_nodes, graph_inputs,
                             read_manifest, sha256, value_info)
from graphopt.targets.ort import LOSSLESS_PIPELINE
from graphopt.targets.shapes import bind_input_shapes
from graphopt.targets.tvm_rpc import (TRACKER_COMMAND, TRACKER_SERVER_COMMAND, Remote,
                                      RpcAddress)

MODEL_FILE = "model.onnx"
LIBRARY = "model.so"
OBJECTS = "model.tar"
TUNING = "tuning"  # MetaSchedule database beside the library (reused when lowering again)
TUNING_FILES = ("database_workload.json", "database_tuning_record.json")
FORMAT = "graphopt-tvm-relax-vm/1"
INSTALL_HINT = "pip install 'graphopt[tvm]'"
# Ops the TVM ONNX frontend converts although they are not in its converter map.
_DIRECTLY_HANDLED = frozenset({"If", "Constant"})
# Used only when TVM is not installed (the real list is read from the frontend).
_KNOWN_UNSUPPORTED = frozenset({
    "Loop", "Scan", "LSTM", "GRU", "RNN", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "Swish", "DeformConv", "STFT", "DFT", "ReverseSequence", "Col2Im", "CumProd",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
    "Multinomial", "SequenceMap", "StringNormalizer", "TfIdfVectorizer", "RotaryEmbedding",
})


@dataclass(frozen=True)
class TvmPreset:
    """Everything a TVM target is. Device figures are for the whole chip at its nominal
    clock; ``cores=None`` means this machine's core count (the ``x86`` host preset)."""

    name: str
    description: str
    device_name: str
    # The LLVM target in TVM's dict form; "mcpu": "native" is resolved to this host's CPU.
    llvm: dict = field(hash=False)
    # Prefix of the cross toolchain that links the library ("aarch64-linux-gnu-" uses
    # aarch64-linux-gnu-g++); None: the host's C++ compiler.
    cross_prefix: str | None
    runner: Literal["local", "qemu-aarch64"]
    peak_flops_per_core: dict = field(hash=False)  # dtype -> FLOP/s of one core
    bandwidth: float  # bytes/s from DRAM
    cores: int | None
    qemu_cpu: str | None = None  # qemu-user -cpu model to run it with (closest qemu has)
    node_overhead_s: float = 1e-6
    # The device code target in TVM's dict form (e.g. {"kind": "cuda", "arch": "sm_80"});
    # ``llvm`` is then its host. None: the CPU target alone. A GPU target gets TVM's
    # default GPU schedules (dlight) before it is built, and runs on that device kind.
    accelerator: dict | None = field(default=None, hash=False)
    int8_fast: bool | None = None  # int8 dot products (cost model); None: unknown

    @property
    def device_kind(self) -> str:
        """The TVM device the VM runs on: "cpu", or the accelerator's kind ("cuda")."""
        return self.accelerator["kind"] if self.accelerator else "cpu"

    @property
    def linker(self) -> str:
        return f"{self.cross_prefix}g++" if self.cross_prefix else \
            (os.environ.get("CXX") or "g++")

    def device(self) -> Device:
        cores = self.cores or os.cpu_count() or 1
        return Device(name=self.device_name.format(cores=cores),
                      peak_flops={k: v * cores for k, v in self.peak_flops_per_core.items()},
                      bandwidth=self.bandwidth, cores=cores,
                      node_overhead_s=self.node_overhead_s, int8_fast=self.int8_fast)


class TvmTarget(Target):
    """A CPU or GPU compiled to by Apache TVM; behaviour fully determined by ``preset`` (and,
    for a target returned by ``connect``, the remote device it runs on)."""

    produces = "a folder: model.so (TVM Relax VM), model.onnx, manifest.json"
    default_pipeline = LOSSLESS_PIPELINE
    tunable = True
    compiled = True

    def __init__(self, preset: TvmPreset, remote: Remote | None = None):
        self.preset = preset
        self.name = preset.name
        self.description = preset.description
        self.device = preset.device()
        self.remote = remote

    def __repr__(self) -> str:
        where = f", remote={str(self.remote.address)!r}" if self.remote else ""
        return f"TvmTarget({self.preset.name!r}{where})"

    def connect(self, address: str) -> "TvmTarget":
        """This preset with its artifacts run (and tuned) on the device behind ``address``:
        ``HOST:PORT``, a TVM RPC server; ``HOST:PORT:KEY``, an RPC tracker handing out the
        servers registered under ``KEY`` (tuning needs this form). A malformed address is
        a UsageError; nothing answering there a GraphoptError saying what to start on the
        device (``python -m tvm.exec.rpc_server ...``)."""
        parsed = RpcAddress.parse(address)
        if self.availability():
            raise UsageError(f"target {self.name!r} cannot connect to {parsed}: "
                             f"{self.availability()}")
        remote = Remote(parsed, device=self.preset.device_kind)
        remote.check()
        return TvmTarget(self.preset, remote)

    # ------------------------------------------------------------------ capabilities
    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        """The default ONNX domain only (no com.microsoft fusions), restricted to the ops
        the installed TVM's ONNX frontend converts (all of them when TVM is missing)."""
        return _capabilities(frontend_ops())

    def availability(self) -> str | None:
        if importlib.util.find_spec("tvm") is None:
            return f"Apache TVM is not installed ({INSTALL_HINT})"
        return None

    def run_availability(self) -> str | None:
        """What running an artifact here lacks: qemu-user and the aarch64 sysroot
        (``qemu-aarch64`` presets), a GPU TVM sees (GPU presets); ``None`` when connected
        to a remote device (it runs there)."""
        missing = self.availability()
        if missing or self.remote is not None:
            return missing
        if self.preset.runner == "qemu-aarch64":
            from graphopt.targets import tvm_sysroot

            if tvm_sysroot.qemu() is None:
                return "no qemu-aarch64 (apt-get install qemu-user), or --rpc to a device"
            root, why = tvm_sysroot.status()
            return None if root else f"{why} (python -m graphopt.targets.tvm_sysroot)"
        if self.preset.device_kind != "cpu":
            try:
                self._check_local_device()
            except UsageError:
                return (f"no {self.preset.device_kind.upper()} GPU here; --rpc to a GPU "
                        f"machine's RPC server")
        return None

    def unsupported_ops(self, model: Model | onnx.ModelProto) -> Counter:
        """``{"Loop": 2, "com.microsoft::FusedConv": 1, ...}``: the nodes (main graph and
        subgraphs) that TVM's ONNX frontend cannot import."""
        proto = model.to_onnx() if isinstance(model, Model) else model
        ops = frontend_ops()
        missing: Counter = Counter()
        for node in all_nodes(proto.graph):
            domain = "" if node.domain == "ai.onnx" else node.domain
            if domain:
                missing[f"{domain}::{node.op_type}"] += 1
            elif (node.op_type not in ops) if ops is not None else \
                    (node.op_type in _KNOWN_UNSUPPORTED):
                missing[node.op_type] += 1
        return missing

    # ------------------------------------------------------------------ shapes
    def prepare(self, model: Model, input_shapes: dict[str, list[int]] | None) -> None:
        """``--input-shape`` fixes those inputs' shapes in the compiled library: every
        symbolic dimension they bind becomes that number throughout the graph, so the
        pipeline folds the shape arithmetic (TVM handles static shapes best, and some
        dynamic-shape exports import only that way). Without it, symbolic dims stay."""
        bind_input_shapes(model, input_shapes)

    # ------------------------------------------------------------------ lowering
    def llvm_target(self) -> dict:
        """The preset's LLVM target, resolved for this build ("native" CPU, core count)."""
        target = dict(self.preset.llvm)
        if target.get("mcpu") == "native":
            target["mcpu"] = host_cpu()
            missing = hidden_features()
            if missing:
                target["mattr"] = [*target.get("mattr", []), *missing]
        if not self.preset.accelerator:  # a GPU's "cores" (SMs) are not the host's
            target.setdefault("num-cores", self.device.cores)
        return target

    def tvm_target(self):
        """The ``tvm.target.Target`` built for: the LLVM target, or the accelerator with
        the LLVM target as its host."""
        import tvm

        if self.preset.accelerator:
            return tvm.target.Target(dict(self.preset.accelerator), host=self.llvm_target())
        return tvm.target.Target(self.llvm_target())

    def lower(self, model: Model, out: Path, *, tune_trials: int = 0,
              progress=None) -> Artifact:
        """Compile ``model`` into the folder ``out``. ``tune_trials > 0`` first tunes the
        kernels with MetaSchedule and keeps the database in ``out/tuning``; a database
        already there is applied (and extended by tuning). Candidates are measured on this
        machine for ``runner="local"`` presets, else on the device through the RPC tracker
        this target is connected to (``connect("HOST:PORT:KEY")``); static shapes only;
        minutes even for small budgets; ``progress(what, done, total)`` is told as the
        candidates are measured."""
        out = Path(out)
        if out.suffix in (".onnx", ".so", ".tar") or out.is_file():
            raise UsageError(f"target {self.name!r} writes a directory (model.so, model.onnx, "
                             f"manifest.json), not {str(out)!r}", hint="give -o a folder")
        missing = self.unsupported_ops(model)
        if missing:
            listed = ", ".join(f"{op} ({n} node{'s' * (n > 1)})" for op, n in
                               sorted(missing.items()))
            raise UsageError(f"target {self.name!r}: TVM's ONNX frontend cannot import {listed}",
                             hint="use --target ort, which runs every ONNX op")
        if self.availability():
            raise UsageError(f"target {self.name!r} is not available here: "
                             f"{self.availability()}")
        proto = model.to_onnx()
        if tune_trials > 0:
            self._check_tunable()
        if tune_trials > 0 and any(
                not all(isinstance(d, int) for d in (value_info(v)["shape"] or [None]))
                for v in graph_inputs(proto)):
            raise UsageError(f"target {self.name!r}: tuning needs static input shapes",
                             hint=_shape_hint(proto))
        with tempfile.TemporaryDirectory(prefix="graphopt-tvm-") as tmp:
            tmp = Path(tmp)
            tuning = None
            if tune_trials > 0 or (out / TUNING / TUNING_FILES[1]).is_file():
                tuning = tmp / TUNING
                tuning.mkdir()
                for name in TUNING_FILES:
                    if (out / TUNING / name).is_file():
                        shutil.copy2(out / TUNING / name, tuning / name)
            library, link, tuned = self._compile(proto, tmp, tuning, tune_trials, progress)
            model_path = save(proto, tmp / MODEL_FILE)
            manifest = self._manifest(proto, model, tmp, model_path, library, link)
            manifest["tuning"] = tuned
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            names = [p.name for p in saved_files(model_path)] + [library.name, MANIFEST]
            if tuning is not None:
                names += [f"{TUNING}/{n}" for n in TUNING_FILES if (tuning / n).is_file()]
            out.mkdir(parents=True, exist_ok=True)
            for stale in (LIBRARY, OBJECTS):  # never leave a previous build's library
                if stale != library.name and (out / stale).exists():
                    (out / stale).unlink()
            for name in names:
                (out / name).parent.mkdir(exist_ok=True)
                shutil.move(str(tmp / name), str(out / name))
        files = [out / n for n in names]
        return Artifact(target=self.name, path=out / library.name, files=files,
                        format="tvm-relax-vm" if library.name == LIBRARY else
                        "tvm-relax-vm-objects")

    def _check_tunable(self) -> None:
        """Tuning measures candidates on the device: here (local presets), or on servers
        an RPC tracker hands out (MetaSchedule's RPC runner needs a tracker)."""
        if self.remote is not None and not self.remote.address.tracker:
            address = self.remote.address
            server = TRACKER_SERVER_COMMAND.format(host="TRACKER_HOST", port=9190, key="KEY")
            raise UsageError(
                f"target {self.name!r}: tuning over RPC needs a tracker (--rpc "
                f"HOST:PORT:KEY), not the server at {address}",
                hint=f"start a tracker ({TRACKER_COMMAND.format(port=9190)}) and on the "
                     f"device {server}")
        if self.remote is None and self.preset.device_kind != "cpu":
            self._check_local_device()  # MetaSchedule measures on the GPU
        if self.remote is None and self.preset.runner != "local":
            raise UsageError(f"target {self.name!r}: tuning measures candidates on the "
                             f"device itself, and this machine is not one",
                             hint="connect to the device through an RPC tracker: --rpc "
                                  "TRACKER_HOST:9190:KEY, or lower without tuning")

    def _tune(self, mod, target, work_dir: Path, trials: int, progress=None) -> dict:
        """Tune here (LocalRunner), or on the tracker's servers: candidates are linked
        here with the preset's linker (the device needs no compiler) and measured there.
        Our own session is released first: the tuner asks the tracker for the servers."""
        if self.remote is None:
            return _tune(mod, target, work_dir, trials, progress=progress)
        import functools

        from graphopt.targets import tvm_rpc

        self.remote.release()
        servers = self.remote.tracker_servers()
        linker = shutil.which(self.preset.linker)
        if linker is None:
            raise UsageError(f"target {self.name!r}: tuning over RPC links each candidate "
                             f"here with {self.preset.linker}, which is not installed")
        return _tune(mod, target, work_dir, trials,
                     runner=tvm_rpc.rpc_runner(self.remote.address, servers),
                     f_export=functools.partial(tvm_rpc.export_shared, linker),
                     where=f"RPC tracker {self.remote.address}", progress=progress)

    def _compile(self, proto: onnx.ModelProto, tmp: Path, tuning: Path | None = None,
                 trials: int = 0, progress=None) -> tuple[Path, str | None, dict | None]:
        """Import, optimize (Relax: legalize + fuse), tune or apply a tuning database,
        build and export; returns the library (or object archive), for an archive the
        command that links it, and what tuning did."""
        executable, _, tuned = self._build(proto, tuning, trials, progress)
        path, link = self._export(executable, tmp)
        return path, link, tuned

    def _build(self, proto: onnx.ModelProto, tuning: Path | None = None, trials: int = 0,
               progress=None) -> tuple:
        """(the VM executable, the Relax module it was built from, what tuning did)."""
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        target = self.tvm_target()
        hint = _shape_hint(proto)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = from_onnx(proto, keep_params_in_input=False)
        except Exception as exc:  # the frontend raises anything on what it cannot import
            raise GraphoptError(
                f"target {self.name!r}: TVM's ONNX frontend failed on the model: "
                f"{type(exc).__name__}: {_first_line(exc)}", hint=hint) from exc
        try:
            with target:
                # Inference forms of training ops, then legalize to TIR, fold and fuse:
                # tvm.compile's default pipeline alone does not fuse on CPU targets.
                mod = relax.transform.DecomposeOpsForInference()(mod)
                mod = relax.get_pipeline("zero")(mod)
            tuned = None
            if tuning is not None:
                tuned = self._tune(mod, target, tuning, trials, progress) if trials > 0 else \
                    {"trials": 0, "database": "applied the one already in the folder"}
                with target:
                    mod = relax.transform.MetaScheduleApplyDatabase(str(tuning))(mod)
            if self.preset.accelerator:  # kernels no tuning record scheduled
                with target:
                    mod = _gpu_default_schedules()(mod)
            executable = tvm.compile(mod, target=target)
        except GraphoptError:
            raise
        except Exception as exc:
            raise GraphoptError(f"target {self.name!r}: TVM failed to compile the model: "
                                f"{type(exc).__name__}: {_first_line(exc)}",
                                hint=hint) from exc
        return executable, mod, tuned

    def _export(self, executable, tmp: Path) -> tuple[Path, str | None]:
        """The executable as the library (or, without the preset's linker here, the
        object archive and the command that links it)."""
        from tvm.support import cc

        linker = shutil.which(self.preset.linker)
        if linker is None:
            # No linker for the triple: ship the objects and say how to link them.
            path = tmp / OBJECTS
            executable.export_library(str(path))
            link = (f"mkdir -p objs && tar -xf {OBJECTS} -C objs && "
                    f"{self.preset.linker} -shared -fPIC -o {LIBRARY} objs/*.o")
            return path, link
        path = tmp / LIBRARY
        executable.export_library(str(path), fcompile=cc.cross_compiler(linker))
        return path, None

    def _manifest(self, proto, model: Model, tmp: Path, model_path: Path, library: Path,
                  link: str | None) -> dict:
        from graphopt.api import graphopt_version

        return {
            "format": FORMAT,
            "target": self.name,
            "description": self.description,
            "device": {"name": self.device.name, "peak_flops": self.device.peak_flops,
                       "bandwidth": self.device.bandwidth, "cores": self.device.cores},
            "llvm_target": self.llvm_target(),
            "triple": self.llvm_target().get("mtriple"),
            "device_target": self.preset.accelerator,
            "device_kind": self.preset.device_kind,
            "runner": self.preset.runner,
            "library": library.name,
            "artifact": library.name,
            "artifact_format": "tvm-relax-vm" if library.name == LIBRARY else
                               "tvm-relax-vm-objects",
            "link_command": link,
            "model": MODEL_FILE,
            "entry": "main",
            "inputs": [value_info(v) for v in graph_inputs(proto)],
            "outputs": [value_info(v) for v in proto.graph.output],
            "graphopt_version": graphopt_version(),
            "model_content_hash": model.content_hash(),
            "sha256": {p.name: sha256(p) for p in [*saved_files(model_path), library]},
            "toolchain": toolchain(self.preset.linker),
        }

    # ------------------------------------------------------------------ running
    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        path = Path(artifact.path)
        manifest = read_manifest(path.parent)
        if manifest.get("link_command"):
            raise UsageError(f"{path} holds unlinked objects (no {self.preset.linker} was "
                             f"installed when it was built)",
                             hint=f"link it in {path.parent}: {manifest['link_command']}")
        arrays = _ordered_inputs(manifest, feeds)
        if self.remote is not None:
            results = self.remote.run(path, arrays)
        elif self.preset.runner == "local":
            self._check_local_device()
            results = _local_vm(str(path), path.stat().st_mtime_ns,
                                self.preset.device_kind).run(arrays)
        else:
            results = self._run_qemu(path, arrays)
        names = [o["name"] for o in manifest["outputs"]]
        if len(results) != len(names):
            raise GraphoptError(f"the library returned {len(results)} outputs, the manifest "
                                f"lists {len(names)}")
        return dict(zip(names, results))

    def measure(self, artifact: Artifact, feeds: dict[str, np.ndarray], *,
                repeat: int = 20) -> float | None:
        """Median seconds of one run on the device, timed by TVM's ``time_evaluator``
        where the VM runs (one warm-up, then ``repeat`` timed calls; copying inputs in
        and outputs out is not in the figure):

        * connected (``--rpc``): on the remote device, by the remote itself: device time,
          without the network round trip;
        * ``runner="local"``: here, in this process (this machine is the device);
        * ``runner="qemu-aarch64"``: ``None``: emulated time says nothing about the
          device (connect to one with ``--rpc`` to time it)."""
        path = Path(artifact.path)
        manifest = read_manifest(path.parent)
        arrays = _ordered_inputs(manifest, feeds)
        if self.remote is not None:
            return self.remote.measure(path, arrays, repeat)
        if self.preset.runner != "local":
            return None
        if manifest.get("link_command"):
            self.run(artifact, feeds)  # raises the UsageError that says how to link it
        self._check_local_device()
        return _local_vm(str(path), path.stat().st_mtime_ns,
                         self.preset.device_kind).time(arrays, repeat)

    def profile_nodes(self, proto: onnx.ModelProto, feeds: dict[str, np.ndarray],
                      runs: int) -> tuple[dict[str, tuple[str, float]], float]:
        """Per-kernel times of the model compiled at the feeds' shapes. Here: its VM
        timed around each call (``tvm_runner.profile_vm``; TVM 0.27's Relax VM has no
        profiler of its own, its instrument hook is what remains), the VM's own calls
        (allocation, shape checks) as rows of op ``vm``. Over ``--rpc``: each kernel
        timed by the remote device itself (``tvm_kernels``), the run by its VM there.
        Kernels are TVM's fused functions (``fused_conv2d_add_relu``: op ``conv2d``),
        named as TVM names them, so they match no graph node and carry no estimate."""
        from graphopt.cost_calibration import static_model
        from graphopt.targets import tvm_runner
        from graphopt.targets.tvm_kernels import kernel_op, profile_remote

        if self.remote is None and self.preset.runner != "local":
            raise UsageError(f"target {self.name!r} runs under emulation here: its kernel "
                             "times would say nothing about the device",
                             hint="connect to the device with --rpc HOST:PORT, or run "
                                  "graphopt profile on it")
        if self.remote is None:
            self._check_local_device()
        shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
        static = static_model(proto, shapes).to_onnx()
        arrays = [feeds[v.name] for v in graph_inputs(static)]
        with tempfile.TemporaryDirectory(prefix="graphopt-tvm-profile-") as tmp:
            executable, mod, _ = self._build(static)
            library, link = self._export(executable, Path(tmp))
            if link:
                raise UsageError(f"target {self.name!r}: no {self.preset.linker} here to "
                                 "link the library it would profile")
            if self.remote is not None:
                return profile_remote(self.remote, executable, mod, library, arrays, runs,
                                      shutil.which(self.preset.linker))
            vm = tvm_runner.load_vm(str(library), self._tvm_device())
            calls, run_s = tvm_runner.profile_vm(vm, arrays, runs, self._tvm_device())
        return {symbol: (kernel_op(symbol), seconds)
                for symbol, (_, seconds) in calls.items()}, run_s

    def _tvm_device(self):
        import tvm

        return tvm.device(self.preset.device_kind, 0)

    def _check_local_device(self) -> None:
        """A GPU preset runs here only where TVM sees such a GPU (the PyPI wheel carries
        the CUDA runtime; the kernels' CUDA source is compiled when the library loads)."""
        kind = self.preset.device_kind
        if kind == "cpu":
            return
        import tvm

        if not tvm.device(kind, 0).exist:
            raise UsageError(f"target {self.name!r} runs on a {kind.upper()} GPU and TVM "
                             f"sees none here",
                             hint="run it on a GPU machine, or connect to one: start "
                                  "python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090 "
                                  "there and give --rpc GPU_HOST:9090")

    def _run_qemu(self, library: Path, arrays: list[np.ndarray]) -> list[np.ndarray]:
        from graphopt.targets import tvm_sysroot

        emulator = tvm_sysroot.qemu()
        root, why = tvm_sysroot.status()
        if emulator is None or root is None:
            need = []
            if emulator is None:
                need.append("qemu-user (apt-get install qemu-user)")
            if root is None:
                need.append(f"the aarch64 sysroot ({why}; build it with "
                            f"python -m graphopt.targets.tvm_sysroot)")
            raise UsageError(f"running a {self.name!r} artifact here needs " +
                             " and ".join(need),
                             hint="or copy the artifact folder to an aarch64 device")
        runner = Path(__file__).with_name("tvm_runner.py")
        with tempfile.TemporaryDirectory(prefix="graphopt-qemu-") as tmp:
            inputs, outputs = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
            np.savez(inputs, **{f"input_{i}": a for i, a in enumerate(arrays)})
            cmd = tvm_sysroot.qemu_command(root, emulator, self.preset.qemu_cpu) + [
                str(runner), str(library.resolve()), str(inputs), str(outputs)]
            proc = subprocess.run(cmd, env=tvm_sysroot.qemu_env(), capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
                raise GraphoptError(f"running {library} under qemu-aarch64 failed "
                                    f"(exit {proc.returncode}):\n{tail}")
            with np.load(outputs, allow_pickle=False) as data:
                return [data[f"output_{i}"] for i in range(len(data.files))]


# ---------------------------------------------------------------------- tuning
def _import_tensor_intrinsics() -> None:
    """MetaSchedule builder workers import these on first use; on a slow machine that
    alone (TVMScript parsing hundreds of intrinsics) outlasts the default 30 s build
    timeout, so every candidate fails. Importing them in the worker initializer, which
    no timeout covers, avoids that."""
    import tvm.s_tir.tensor_intrin  # noqa: F401


@functools.lru_cache(maxsize=None)
def _pooled_builder_class():
    """A MetaSchedule builder whose worker processes live for the whole tuning run.

    TVM's ``LocalBuilder`` starts a new process pool for every batch of candidates, and
    each new worker imports ``tvm.s_tir.tensor_intrin`` (TVMScript-parsing hundreds of
    intrinsics: 30-100 s on a 2-core machine). With one batch per task that cost
    dominated tuning. Workers here pay it once, in the initializer (which no build
    timeout covers). Tuning runs are short, so the leak that made TVM restart its pool
    does not matter here."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self, timeout_sec: float, max_workers: int | None = None,
                     f_export=None):
            super().__init__()
            self.timeout_sec = timeout_sec
            self.f_export = f_export
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          initializer=_import_tensor_intrinsics)

        def build(self, build_inputs):
            results = []
            args = [(None, self.f_export, b.mod, b.target, lb._serialize_params(b.params))
                    for b in build_inputs]
            for res in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), args):
                if res.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(
                        None, f"build timed out after {self.timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {res.value}"))
            return results

    return PooledBuilder


def _tune(mod, target, work_dir: Path, trials: int, runner=None, f_export=None,
          where: str = "this machine", progress=None) -> dict:
    """MetaSchedule-tune every fused kernel of ``mod``, candidates measured by ``runner``
    (default: here, ``LocalRunner``); the JSON database in ``work_dir`` (possibly holding
    earlier records) is extended. ``f_export`` exports a built candidate (default: an
    object archive, linked where it is loaded)."""
    import time

    from tvm.s_tir import meta_schedule as ms

    # MetaSchedule prints its task table to stdout at its logger's level: warnings only
    # (the full log goes to work_dir/logs, removed afterwards).
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(
        logging.DEBUG if logging.getLogger("graphopt").isEnabledFor(logging.DEBUG)
        else logging.WARNING)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    per_task = max(4, -(-trials // max(1, len(tasks))))
    cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    start = time.perf_counter()
    ms.relax_integration.tune_relax(
        mod, params={}, target=target, work_dir=str(work_dir), max_trials_global=trials,
        max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task),
        builder=_pooled_builder_class()(timeout_sec=120, f_export=f_export),
        runner=runner or ms.runner.LocalRunner(timeout_sec=60), cost_model=cost_model,
        measure_callbacks=[*ms.MeasureCallback.create("default"),
                           *([_progress_callback(progress, trials, where)] if progress
                             else [])],
        seed=0)
    shutil.rmtree(work_dir / "logs", ignore_errors=True)
    return {"trials": trials, "tasks": len(tasks), "trials_per_task": per_task,
            "cost_model": cost_model, "measured_on": where,
            "seconds": round(time.perf_counter() - start, 1)}


def _progress_callback(progress, trials: int, where: str):
    """A MetaSchedule measure callback telling ``progress`` how many candidates have been
    measured, out of the trial budget."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self):
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            self.done += len(measure_candidates)
            progress(f"tuning kernels on {where} (candidates measured)",
                     min(self.done, trials), trials)

    return Progress()


# ---------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _capabilities(ops: frozenset[str] | None) -> Capabilities:
    return Capabilities(domains=frozenset({""}),
                        ops=None if ops is None else frozenset(("", op) for op in ops),
                        dtypes=frozenset({"float32", "float16", "int8", "uint8"}))


@functools.lru_cache(maxsize=None)
def frontend_ops() -> frozenset[str] | None:
    """The default-domain ops the installed TVM ONNX frontend converts (None: no TVM)."""
    if importlib.util.find_spec("tvm") is None:
        return None
    try:
        from tvm.relax.frontend.onnx import onnx_frontend
    except Exception:  # a broken TVM install: lowering will report it
        return None
    return frozenset(onnx_frontend._get_convert_map()) | _DIRECTLY_HANDLED


def host_cpu() -> str:
    """This machine's CPU as LLVM names it (e.g. ``znver3``), else generic ``x86-64``."""
    try:
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu()
    except Exception:
        return "x86-64"
    return cpu if cpu and cpu != "generic" else "x86-64"


# ISA extensions whose absence from /proc/cpuinfo LLVM's CPU name cannot tell: a virtual
# machine may report an AVX-512 CPU model (e.g. znver4) while hiding AVX-512 from its
# guests, and code compiled for the model name then dies of an illegal instruction.
_CHECKED_FEATURES = {"avx512f": "avx512f", "avx2": "avx2", "fma": "fma", "avx": "avx"}


def hidden_features() -> list[str]:
    """LLVM ``-feature`` attributes for extensions the host CPU model has but this
    machine does not offer (empty where /proc/cpuinfo cannot be read)."""
    from graphopt.targets.ort import cpu_flags

    flags = cpu_flags()
    if not flags or platform.machine() not in ("x86_64", "AMD64"):
        return []
    return [f"-{llvm}" for flag, llvm in _CHECKED_FEATURES.items() if flag not in flags]


class _LocalVm:
    def __init__(self, path: str, kind: str = "cpu"):
        import tvm

        from graphopt.targets import tvm_runner

        self._runner = tvm_runner
        self.device = tvm.device(kind, 0)
        self.vm = tvm_runner.load_vm(path, self.device)

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self._runner.run_vm(self.vm, arrays, self.device)

    def time(self, arrays: list[np.ndarray], repeat: int) -> float:
        return self._runner.time_vm(self.vm, arrays, self.device, repeat=repeat)


@functools.lru_cache(maxsize=8)
def _local_vm(path: str, mtime_ns: int, kind: str = "cpu") -> _LocalVm:
    """One loaded library per file version (loading costs more than a small run)."""
    return _LocalVm(path, kind)


def _gpu_default_schedules():
    """TVM's default GPU schedules (``tvm.s_tir.dlight``, as ``relax.get_pipeline`` uses
    for CUDA): every kernel needs one to bind threads. A rule that fails on a kernel
    (dlight's Matmul asserts on some fused convolution epilogues) leaves it to the next
    rule; ``Fallback`` schedules anything."""
    from tvm.s_tir import dlight as dl

    class _Tolerant(dl.ScheduleRule):
        def __init__(self, rule):
            self.rule = rule

        def apply(self, func, target, tunable):
            try:
                return self.rule.apply(func, target, tunable)
            except Exception:  # dlight asserts on what it does not match
                return None

    return dl.ApplyDefaultSchedule(*[_Tolerant(rule) for rule in (
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
        dl.gpu.Fallback())])


def _ordered_inputs(manifest: dict, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    arrays = []
    for spec in manifest["inputs"]:
        name = spec["name"]
        if name not in feeds:
            raise UsageError(f"no value for input {name!r}",
                             hint=f"inputs: {', '.join(i['name'] for i in manifest['inputs'])}")
        arrays.append(np.ascontiguousarray(feeds[name], dtype=spec["dtype"]))
    return arrays


def _shape_hint(proto: onnx.ModelProto) -> str:
    """What to try when TVM fails: static shapes if any input has symbolic dims."""
    symbolic = {v.name: value_info(v)["shape"] for v in graph_inputs(proto)}
    symbolic = {k: v for k, v in symbolic.items()
                if v is None or any(not isinstance(d, int) for d in v)}
    if not symbolic:
        return "rerun with --debug for TVM's traceback, or use --target ort"
    example = " ".join(
        f"--input-shape {name}=" + "x".join(str(d) if isinstance(d, int) else "N"
                                            for d in (shape or ["N"]))
        for name, shape in symbolic.items())
    return (f"TVM handles static shapes best; fix the symbolic dimensions with {example} "
            f"(N: the size to compile for), or use --target ort")


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def toolchain(linker: str) -> dict:
    import tvm

    info = {"tvm": tvm.__version__, "apache-tvm-ffi": _dist_version("apache-tvm-ffi"),
            "llvm": None, "linker": linker, "linker_version": None,
            "onnx": onnx.__version__, "python": platform.python_version()}
    try:
        from tvm.target import codegen

        info["llvm"] = str(codegen.llvm_version_major())  # only the major is exposed
    except Exception:
        pass
    if shutil.which(linker):
        try:
            proc = subprocess.run([linker, "--version"], capture_output=True, text=True,
                                  timeout=30)
            info["linker_version"] = (proc.stdout.splitlines() or [""])[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors carry a C++ traceback first; the message is the last line.
    return (lines[-1] if lines else type(exc).__name__)[:500]

