"""The kernels of a TVM build, and their timing on a remote device (``graphopt profile
--rpc``).

The Relax VM's instrument hook (``tvm_runner.profile_vm``) times each call in the process
that owns the VM, so it cannot reach a VM behind an RPC server. What can: the remote's
own ``time_evaluator`` on each kernel, given arguments of the kernel's shapes. So the
kernels are read from the build: which TIR functions the VM's bytecode calls and how
often (``calls``), their argument shapes from the Relax module's ``call_tir`` sites
(``signatures``; static, since the model is compiled at the feeds' shapes), and the
kernels alone are exported as a library of their own (``export_kernels``) that the
remote loads and times one function at a time (``Remote.time_kernels``). A run's time
is the VM's, timed on the device; what the kernels do not account for (the VM's own
calls: allocation, shape checks) is the profile's "between kernels" row.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

Signature = list[tuple[list[int], str]]  # (shape, dtype) of each argument, outputs last

_CALL = re.compile(r"^\s*call\s+(\S+)\s+in:", re.MULTILINE)


def signatures(mod) -> dict[str, Signature]:
    """The argument shapes and dtypes of every TIR function the Relax ``main`` of
    ``mod`` calls (``call_tir``: inputs, then outputs). A function called at symbolic
    shapes is left out (its arguments cannot be made)."""
    import tvm
    from tvm import relax
    from tvm.relax.analysis import post_order_visit

    call_tir = tvm.ir.Op.get("relax.call_tir")
    out: dict[str, Signature] = {}

    def tensors(ty) -> Signature:
        if isinstance(ty, relax.TupleType):
            return [t for field in ty.fields for t in tensors(field)]
        shape = getattr(ty, "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
            raise ValueError("symbolic shape")
        return [([int(v) for v in values], str(ty.dtype))]

    def visit(expr) -> None:
        if not (isinstance(expr, relax.Call) and expr.op.same_as(call_tir)):
            return
        try:
            args = [t for arg in expr.args[1].fields for t in tensors(arg.ty)]
            args += [t for ty in expr.ty_args for t in tensors(ty)]
        except (ValueError, AttributeError):
            return
        out.setdefault(expr.args[0].name_hint, args)

    post_order_visit(mod["main"].body, visit)
    return out


def kernel_op(symbol: str) -> str:
    """What a VM call computes, from its symbol: ``fused_conv2d1_add_relu`` -> ``conv2d``,
    ``matmul2`` -> ``matmul``, ``vm.builtin.alloc_tensor`` -> ``vm``."""
    if symbol.startswith("vm."):
        return "vm"
    first = symbol.removeprefix("fused_").split("_")[0]
    return first.rstrip("0123456789") or symbol


def calls(executable) -> Counter:
    """How many times a run calls each function (kernels and the VM's builtins), read
    from the VM's bytecode."""
    return Counter(_CALL.findall(executable.as_text()))


def export_kernels(executable, path: Path, linker: str) -> Path:
    """The build's kernels alone (the VM executable's compiled library) as a shared
    library at ``path``, linked by ``linker``."""
    from tvm.support import cc

    executable.mod.imports[0].export_library(str(path), fcompile=cc.cross_compiler(linker))
    return path


def profile_remote(remote, executable, mod, library: Path, arrays: list, runs: int,
                   linker: str) -> tuple[dict[str, tuple[str, float]], float]:
    """``Target.profile_nodes`` on ``remote`` (a ``tvm_rpc.Remote``) of the build
    ``executable`` (from the Relax module ``mod``; ``library``: its VM library): each
    kernel the VM calls timed there ``runs`` times, its median times its calls per run,
    and the whole run timed there; parts adding up past the run are scaled to it."""
    from graphopt.profile import fit_to_run

    counts = calls(executable)
    kernels = {name: sig for name, sig in signatures(mod).items() if counts.get(name)}
    path = export_kernels(executable, library.with_name("kernels.so"), linker)
    times = remote.time_kernels(path, kernels, runs)
    run_s = remote.measure(library, arrays, runs)
    return fit_to_run({name: (kernel_op(name), counts[name] * seconds)
                       for name, seconds in times.items()}, run_s), run_s
