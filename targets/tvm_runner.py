"""Run a graphopt TVM artifact (a Relax VM library) on inputs.

Standalone on purpose: it needs only numpy and the TVM *runtime*, not graphopt, so the
same file runs in this process (``run_library``) and under qemu-user inside the aarch64
sysroot (``graphopt.targets.tvm_sysroot``)::

    qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11 -I tvm_runner.py \\
        model.so inputs.npz outputs.npz

``inputs.npz`` holds ``input_0``, ``input_1``, ... in the order of the VM's ``main``
parameters (the model's graph inputs; the manifest lists them); ``outputs.npz`` gets
``output_0``, ``output_1``, ... in the order of the model's graph outputs.
"""

from __future__ import annotations

import os
import sys

ENTRY = "main"


def load_vm(lib_path: str, device=None):
    """A Relax VM for the library at ``lib_path`` on ``device`` (default: the CPU)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(tvm.runtime.load_module(str(lib_path)), device or tvm.cpu())


def _tensors(arrays: list, device) -> list:
    import numpy as np
    import tvm

    return [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]


def run_vm(vm, arrays: list, device=None) -> list:
    """Call ``main`` on numpy arrays (graph-input order) copied to ``device`` (default:
    the CPU; an RPC session's device runs it remotely); numpy arrays back. The stateful
    calls (set_input, invoke_stateful, get_outputs) fetch a tuple of outputs field by
    field, which also works over RPC (a returned tuple arrives there as an opaque ref)."""
    import numpy as np
    import tvm

    vm.set_input(ENTRY, *_tensors(arrays, device or tvm.cpu()))
    vm.invoke_stateful(ENTRY)
    return [np.array(t.numpy()) for t in _outputs(vm.module)]


def _outputs(module, *index) -> list:
    """The outputs of the last ``invoke_stateful``, nested tuples flattened. (Not
    ``VirtualMachine.get_outputs``: its recursive closure is a reference cycle holding
    the VM, so over RPC the session would outlive the target until a GC pass, and a
    server, which serves one client at a time, would refuse the next one until then.)"""
    arity = module["get_output_arity"](ENTRY, *index)
    if arity == -1:
        return [module["get_output"](ENTRY, *index)]
    return [t for i in range(arity) for t in _outputs(module, *index, i)]


def time_vm(vm, arrays: list, device=None, repeat: int = 20) -> float:
    """Median seconds of one ``main`` call, timed where the VM runs (TVM's
    time_evaluator: one warm-up call, then ``repeat`` timed ones; over RPC the remote
    times itself, so the network is not in the figure)."""
    import tvm

    device = device or tvm.cpu()
    vm.set_input(ENTRY, *_tensors(arrays, device))
    timer = vm.time_evaluator("invoke_stateful", device, number=1, repeat=max(1, repeat))
    return float(timer(ENTRY).median)


def profile_vm(vm, arrays: list, runs: int, device=None) -> tuple[dict, float]:
    """Per-call times of ``runs`` calls of ``main`` (after one warm-up), taken by the
    VM's instrument hook around every call it makes (kernels and its own builtins):
    ``({symbol: (calls per run, median seconds per run)}, median seconds of a run)``.
    The hook is a Python call before and after each kernel, a few microseconds that
    land between the kernels, not in them."""
    import statistics
    import time

    import tvm

    device = device or tvm.cpu()
    vm.set_input(ENTRY, *_tensors(arrays, device))
    clock = time.perf_counter
    started: dict = {}
    current: dict = {}

    def instrument(func, symbol, before, ret, *args):
        if before:
            started[symbol] = clock()
        else:
            calls, total = current.get(symbol, (0, 0.0))
            current[symbol] = (calls + 1, total + clock() - started.pop(symbol))
        return 0

    vm.set_instrument(instrument)
    per_run: list[dict] = []
    run_times: list[float] = []
    try:
        for i in range(runs + 1):
            current.clear()
            start = clock()
            vm.invoke_stateful(ENTRY)
            elapsed = clock() - start
            if i:  # the first run warms up
                per_run.append(dict(current))
                run_times.append(elapsed)
    finally:
        vm.set_instrument(None)
    symbols = {s for run in per_run for s in run}
    out = {s: (max(run.get(s, (0, 0.0))[0] for run in per_run),
               statistics.median(run.get(s, (0, 0.0))[1] for run in per_run))
           for s in symbols}
    return out, statistics.median(run_times)


def run_library(lib_path: str, arrays: list) -> list:
    return run_vm(load_vm(lib_path), arrays)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: tvm_runner.py LIB INPUTS.npz OUTPUTS.npz", file=sys.stderr)
        return 2
    # Only the runtime is needed (and the sysroot ships no compiler library).
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import numpy as np

    lib, inputs, outputs = argv
    with np.load(inputs, allow_pickle=False) as data:
        arrays = [data[f"input_{i}"] for i in range(len(data.files))]
    results = run_library(lib, arrays)
    np.savez(outputs, **{f"output_{i}": r for i, r in enumerate(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
