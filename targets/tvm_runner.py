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


def _flatten(value) -> list:
    """The VM returns a tensor, or a (nested) array of them for several outputs."""
    if hasattr(value, "numpy"):
        return [value]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out


def load_vm(lib_path: str):
    """A Relax VM on the CPU for the library at ``lib_path``."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())


def run_vm(vm, arrays: list) -> list:
    """Call ``main`` on numpy arrays (graph-input order); numpy arrays back."""
    import numpy as np
    import tvm

    result = vm[ENTRY](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    return [np.array(t.numpy()) for t in _flatten(result)]


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
