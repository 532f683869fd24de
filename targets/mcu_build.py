"""Building and running the ``mcu`` target's C: on the host (any C99 compiler, strict
warnings as errors) and for a Cortex-M (``arm-none-eabi-gcc`` with newlib's semihosting
library, linked with a linker script whose flash and RAM are the preset's budget, run
under ``qemu-system-arm``).

Both builds link the same test harness (``mcu_kernels/harness.c``): it reads samples from
a file, runs the model on each and writes the outputs, so the comparison with ONNX Runtime
is one process per batch, whatever the runner. An emulated run says whether the code is
right on the instruction set, never how fast it is on a device.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.errors import GraphoptError, UsageError

KERNELS = Path(__file__).resolve().parent / "mcu_kernels"
KERNEL_FILES = ("graphopt_kernels.c", "graphopt_kernels_int8.c", "graphopt_kernels.h")
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Werror", "-pedantic")
ARM_GCC = "arm-none-eabi-gcc"
QEMU = "qemu-system-arm"
ARM_PACKAGES = "apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi"
QEMU_PACKAGE = "apt-get install qemu-system-arm"
# RAM the test image needs besides the model: the C library's heap (stdio buffers of the
# harness's two files) and the stack (kernels use a few hundred bytes; printf more).
HEAP_BYTES = 4096
STACK_BYTES = 4096
IN_FILE, OUT_FILE = "graphopt_in.bin", "graphopt_out.bin"
OK_LINE = "graphopt-harness: ok"
TIMEOUT_S = 300


@dataclass(frozen=True)
class ArmBoard:
    """What the Cortex-M build needs of a preset: compiler flags, the memory map's
    origins and the budget, and the emulated board (``None``: build only)."""

    cpu_flags: tuple[str, ...]
    flash_origin: int
    flash_bytes: int
    ram_origin: int
    ram_bytes: int
    qemu_machine: str | None


def host_compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "gcc") or shutil.which("cc")


def why_no_host() -> str | None:
    return None if host_compiler() else "no C compiler here (apt-get install gcc)"


@functools.lru_cache(maxsize=None)
def why_no_arm() -> str | None:
    if not shutil.which(ARM_GCC):
        return f"no {ARM_GCC} ({ARM_PACKAGES})"
    found = subprocess.run([ARM_GCC, "-print-file-name=librdimon.a"], capture_output=True,
                           text=True).stdout.strip()
    if not os.path.isabs(found):
        return f"no newlib for {ARM_GCC} ({ARM_PACKAGES})"
    return None


def why_no_qemu() -> str | None:
    return None if shutil.which(QEMU) else f"no {QEMU} ({QEMU_PACKAGE})"


# ---------------------------------------------------------------------- builds
def _compile(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        overflow = re.findall(r"region `(\w+)' overflowed by (\d+) bytes", done.stderr)
        if overflow:
            raise BudgetError(overflow, done.stderr)
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()][:6]
        raise GraphoptError(f"the {what} build of the generated C failed: " +
                            " | ".join(lines))


class BudgetError(UsageError):
    """The model's code, weights, arena and the harness do not fit the preset's memory."""

    def __init__(self, overflow: list[tuple[str, str]], stderr: str):
        self.overflow = {region: int(n) for region, n in overflow}
        named = ", ".join(f"{region} by {n} bytes" for region, n in self.overflow.items())
        super().__init__(f"the model does not fit the preset's memory: the Cortex-M link "
                         f"overflows {named}",
                         hint="quantize or prune the model, lower --input-shape, or use a "
                              "preset with more memory")


def _sources(folder: Path, work: Path, extra: tuple[str, ...]) -> list[str]:
    for name in ("harness.c", *extra):
        shutil.copyfile(KERNELS / name, work / name)
    return [str(folder / "model.c"), *(str(folder / n) for n in KERNEL_FILES if
                                       n.endswith(".c")),
            *(str(work / n) for n in ("harness.c", *extra))]


def build_host(folder: Path, work: Path, extra: tuple[str, ...] = ()) -> Path:
    """The host harness binary for the model in ``folder``; ``extra``: more compiler
    flags (``-DGRAPHOPT_PLAIN_KERNELS`` builds the plain reference loops)."""
    cc = host_compiler()
    if cc is None:
        raise UsageError(why_no_host())
    exe = work / "harness"
    _compile([cc, *CFLAGS, *extra, "-I", str(folder), *_sources(folder, work, ()), "-o",
              str(exe), "-lm"], "host")
    return exe


def linker_script(board: ArmBoard) -> str:
    text = (KERNELS / "link.ld.in").read_text()
    for key, value in (("FLASH_ORIGIN", board.flash_origin),
                       ("FLASH_BYTES", board.flash_bytes),
                       ("RAM_ORIGIN", board.ram_origin), ("RAM_BYTES", board.ram_bytes),
                       ("HEAP_BYTES", HEAP_BYTES), ("STACK_BYTES", STACK_BYTES)):
        text = text.replace(f"@{key}@", hex(value))
    return text


def build_arm(folder: Path, work: Path, board: ArmBoard) -> tuple[Path, dict]:
    """The Cortex-M image of the model in ``folder`` and its ``size`` (text, data, bss:
    flash is text + data, RAM data + bss + heap + stack). A model that does not fit the
    budget raises ``BudgetError`` naming the region and the overflow."""
    missing = why_no_arm()
    if missing:
        raise UsageError(missing)
    (work / "link.ld").write_text(linker_script(board))
    elf = work / "model.elf"
    _compile([ARM_GCC, *CFLAGS, *board.cpu_flags, "-ffunction-sections", "-fdata-sections",
              "--specs=rdimon.specs", "-nostartfiles", "-I", str(folder),
              *_sources(folder, work, ("startup.c",)), "-T", str(work / "link.ld"),
              "-Wl,--gc-sections", "-o", str(elf), "-lm"], "Cortex-M")
    out = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True,
                         text=True, check=True).stdout.splitlines()[1].split()
    text, data, bss = (int(v) for v in out[:3])
    return elf, {"text": text, "data": data, "bss": bss, "flash_used": text + data,
                 "ram_used": data + bss + HEAP_BYTES + STACK_BYTES,
                 "flash_budget": board.flash_bytes, "ram_budget": board.ram_bytes}


def folder_key(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("model.c", "model.h", *KERNEL_FILES):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


_BUILDS: dict[tuple, tuple[tempfile.TemporaryDirectory, Path]] = {}


def built(folder: Path, runner: str, board: ArmBoard | None) -> Path:
    """The harness for ``folder`` built for ``runner`` ("host" or "qemu"), cached per
    content of the folder's C files for the life of the process."""
    key = (folder_key(folder), runner, board)
    if key not in _BUILDS:
        work = tempfile.TemporaryDirectory(prefix="graphopt-mcu-")
        path = build_host(folder, Path(work.name)) if runner == "host" else \
            build_arm(folder, Path(work.name), board)[0]
        _BUILDS[key] = (work, path)
    return _BUILDS[key][1]


# ---------------------------------------------------------------------- runs
def run_harness(binary: Path, runner: str, board: ArmBoard | None,
                samples: list[np.ndarray], output_floats: int) -> np.ndarray:
    """Run the harness on ``samples`` (each the packed inputs of one run, float32) and
    return the packed outputs, one row per sample."""
    with tempfile.TemporaryDirectory(prefix="graphopt-mcu-run-") as tmp:
        tmp = Path(tmp)
        with open(tmp / IN_FILE, "wb") as fh:
            fh.write(struct.pack("<I", len(samples)))
            for s in samples:
                fh.write(np.ascontiguousarray(s, dtype="<f4").tobytes())
        if runner == "host":
            cmd = [str(binary)]
        else:
            cmd = [QEMU, "-M", board.qemu_machine, "-nographic", "-monitor", "none",
                   "-serial", "null", "-semihosting-config", "enable=on,target=native",
                   "-kernel", str(binary)]
        try:
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise GraphoptError(f"the {runner} run did not finish in {TIMEOUT_S} s") from exc
        if done.returncode != 0 or f"{OK_LINE} {len(samples)}" not in done.stdout:
            said = (done.stdout + done.stderr).strip().splitlines()[-3:]
            raise GraphoptError(f"the {runner} run failed (exit {done.returncode}): "
                                f"{' | '.join(said) or 'no output'}")
        data = np.fromfile(tmp / OUT_FILE, dtype="<f4")
    if data.size != len(samples) * output_floats:
        raise GraphoptError(f"the {runner} run wrote {data.size} floats, expected "
                            f"{len(samples) * output_floats}")
    return data.reshape(len(samples), output_floats)
