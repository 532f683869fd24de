"""Microcontrollers (Cortex-M class): portable C99 with a static memory plan. ``lower``
writes a folder::

    out/model.c, model.h        the model: weights ``static const`` (flash), one ``static``
                                arena, one kernel call per op; the API and sizes in model.h
                                (``io=arena``: inputs and outputs in the arena too,
                                addressed by graphopt_model_input/output)
    out/graphopt_kernels*.c, .h the kernels model.c calls (float32, and int8 for QDQ models
                                from ``--quantize int8``; copied, no library)
    out/model.onnx              the optimized ONNX the C was generated from (the reference
                                ``graphopt verify out/`` compares with)
    out/manifest.json           inputs/outputs, op order, the memory plan (arena bytes and
                                every tensor's offset, against the naive no-reuse sum),
                                weight bytes, the preset's budget and the Cortex-M build's
                                ``size`` where arm-none-eabi-gcc is installed

The model is compiled at static shapes (``--input-shape`` binds dynamic dimensions) and
only when every node has a kernel: an unsupported op is a usage error naming the node,
before anything is written; so is a model whose arena or weights exceed the preset's RAM
or flash, or whose Cortex-M image does not link in them.

Presets are rows of data (``PRESETS``), one class (``McuTarget``): a new board is a row.
``run`` builds the harness and runs it under ``qemu-system-arm`` on the preset's board
where the Arm toolchain and qemu are installed, else with the host's C compiler; neither
time says anything about a device, so ``measure`` returns ``None``.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from graphopt.cost import Device
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model, save
from graphopt.paths import TEMP_PREFIX
from graphopt.target import (MANIFEST, Artifact, Capabilities, Target, folder_output,
                             move_in, read_manifest, sha256)
from graphopt.targets import mcu_build
from graphopt.targets.mcu_build import ArmBoard
from graphopt.targets.mcu_codegen import HEADER, SOURCE, generate
from graphopt.targets.mcu_ops import KERNELS, lower_graph
from graphopt.targets.mcu_plan import (Plan, Step, memory_greedy_order, overlaps,
                                        plan_best_order, plan_memory)
from graphopt.targets.ort import LOSSLESS_PIPELINE
from graphopt.targets.shapes import bind_input_shapes

FORMAT = "graphopt-mcu/1"
MODEL_FILE = "model.onnx"
IO_PLACES = ("caller", "arena")
KiB, MiB = 1024, 1024 * 1024

# The lossless pipeline without the passes that write ops these kernels lack (com.microsoft
# FusedConv/QuickGelu/Gelu/Attention..., LayerNormalization, Transpose): what stays
# removes nodes or folds arithmetic into weights (HardSwish from its decomposed form is
# one kernel here too), which is what a microcontroller wants. Conv + Relu/Clip is fused
# later, by the C generator, into the convolution's clamp.
_NOT_HERE = {"sink-transposes", "fuse-conv-act", "fuse-silu",
             "fuse-layer-norm", "fuse-rms-norm", "fuse-gelu", "fuse-attention",
             "fuse-skip-layer-norm", "fuse-bias-gelu"}
MCU_PIPELINE = tuple(p for p in LOSSLESS_PIPELINE if p not in _NOT_HERE)


@dataclass(frozen=True)
class McuPreset:
    """A microcontroller class: its budget, its core's nominal throughput for the cost
    model (the ISA's peak: generic C reaches a fraction of it) and the Cortex-M build."""

    name: str
    description: str
    core: str
    clock_hz: float
    flops_per_cycle: dict  # dtype -> FLOPs (2 per MAC) per cycle
    board: ArmBoard

    @property
    def ram_bytes(self) -> int:
        return self.board.ram_bytes

    @property
    def flash_bytes(self) -> int:
        return self.board.flash_bytes

    def device(self) -> Device:
        return Device(name=f"{self.core} @ {self.clock_hz / 1e6:.0f} MHz",
                      peak_flops={k: v * self.clock_hz
                                  for k, v in self.flops_per_cycle.items()},
                      bandwidth=4 * self.clock_hz, cores=1, node_overhead_s=2e-6,
                      int8_fast=True, channel_multiple=4)


PRESETS: dict[str, McuPreset] = {p.name: p for p in (
    McuPreset(
        name="cortex-m4",
        description="Arm Cortex-M4F microcontroller (STM32F4 class: 256 KiB RAM, 1 MiB "
                    "flash), portable C99; verified under qemu-system-arm mps2-an386",
        core="Cortex-M4F", clock_hz=168e6,
        # FPv4-SP: a fused multiply-add every 3 cycles; SMLAD: 2 int16 MACs per cycle
        flops_per_cycle={"float32": 2 / 3, "int8": 4.0},
        board=ArmBoard(cpu_flags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard",
                                  "-mfpu=fpv4-sp-d16"),
                       flash_origin=0x0, flash_bytes=1 * MiB, ram_origin=0x20000000,
                       ram_bytes=256 * KiB, qemu_machine="mps2-an386")),
    McuPreset(
        name="cortex-m55",
        description="Arm Cortex-M55 with Helium (Corstone-300 class: 512 KiB code/weight "
                    "TCM, 512 KiB data TCM), portable C99; verified under qemu-system-arm "
                    "mps3-an547",
        core="Cortex-M55", clock_hz=400e6,
        # Helium (dual-beat): 4 float32 or 16 int8 MACs every 2 cycles
        flops_per_cycle={"float32": 4.0, "int8": 16.0},
        board=ArmBoard(cpu_flags=("-mcpu=cortex-m55", "-mthumb", "-mfloat-abi=hard"),
                       flash_origin=0x0, flash_bytes=512 * KiB, ram_origin=0x20000000,
                       ram_bytes=512 * KiB, qemu_machine="mps3-an547")),
)}


class McuTarget(Target):
    """A microcontroller preset: C99 code generation, static memory plan, float32 and
    int8 kernels. ``runner``: "host" (the host's C compiler), "qemu" (the preset's board,
    emulated) or ``None``: qemu where installed, else the host."""

    produces = "a folder: model.c, model.h, graphopt_kernels*.c/.h, model.onnx, manifest.json"
    capabilities = Capabilities(domains=frozenset({""}),
                                ops=frozenset(("", op) for op in KERNELS),
                                dtypes=frozenset({"float32", "int8", "uint8"}))
    default_pipeline = MCU_PIPELINE
    compiled = True

    options = {"io": "caller (default): inputs and outputs in the caller's buffers, "
                     "outside the arena; arena: in the arena, planned like any tensor (RAM "
                     "is the arena alone; graphopt_model_input/output give their addresses)"}

    def __init__(self, preset: McuPreset, runner: str | None = None, io: str = "caller"):
        if runner not in (None, "host", "qemu"):
            raise UsageError(f"unknown runner {runner!r}", hint="host or qemu")
        if io not in IO_PLACES:
            raise UsageError(f"unknown io place {io!r}",
                             hint=f"choose one of {', '.join(IO_PLACES)}")
        self.preset, self.runner, self.io = preset, runner, io
        self.name, self.description = preset.name, preset.description
        self.device = preset.device()
        self._ran_on: str | None = None

    def __repr__(self) -> str:
        return f"McuTarget({self.preset.name!r}, runner={self.runner!r}, io={self.io!r})"

    def with_runner(self, runner: str | None) -> "McuTarget":
        return McuTarget(self.preset, runner, self.io)

    def with_budget(self, ram_bytes: int, flash_bytes: int) -> "McuTarget":
        """This preset with another memory budget (a board with less or more memory)."""
        board = replace(self.preset.board, ram_bytes=ram_bytes, flash_bytes=flash_bytes)
        return McuTarget(replace(self.preset, board=board), self.runner, self.io)

    def with_options(self, **values: str) -> "McuTarget":
        super().with_options(**values)
        return McuTarget(self.preset, self.runner, values.get("io", self.io))

    def option_values(self) -> dict[str, str]:
        return {"io": self.io}

    # ------------------------------------------------------------------ availability
    def _chosen_runner(self) -> str:
        if self.runner:
            return self.runner
        emulated = self.preset.board.qemu_machine and not (
            mcu_build.why_no_arm() or mcu_build.why_no_qemu())
        return "qemu" if emulated else "host"

    def run_availability(self) -> str | None:
        """Running needs the host's C compiler, or for ``runner="qemu"`` the Arm
        toolchain with newlib and qemu-system-arm."""
        if self._chosen_runner() == "host":
            return mcu_build.why_no_host()
        if not self.preset.board.qemu_machine:
            return f"preset {self.preset.name!r} names no emulated board"
        return mcu_build.why_no_arm() or mcu_build.why_no_qemu()

    def prepare(self, model: Model, input_shapes: dict[str, list[int]] | None) -> None:
        """Bind ``--input-shape``; a dimension still dynamic after that is refused: the
        C code is compiled for one shape."""
        bind_input_shapes(model, input_shapes)
        for tensor in model.graph.inputs:
            shape = tensor.shape
            if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
                example = "x".join(str(d) if isinstance(d, int) and d > 0 else "1"
                                   for d in (shape or [1]))
                raise UsageError(f"target {self.name!r} compiles static shapes: input "
                                 f"{tensor.name!r} has shape {list(shape or [])}",
                                 hint=f"give it with --input-shape {tensor.name}={example}")

    # ------------------------------------------------------------------ lowering
    def lower(self, model: Model, out: Path) -> Artifact:
        """Write the folder ``out`` atomically (staged beside it, moved in): nothing is
        written when a node has no kernel or the model does not fit the budget."""
        out = folder_output(self.name, out, "model.c, model.h, manifest.json, ...")
        proto = model.to_onnx()
        program = lower_graph(proto)
        io_names = {n for n, _ in program.inputs} | {n for n, _ in program.outputs}
        order, plan = plan_program(program, in_arena=self.io == "arena")
        reordered = order != sorted(order)
        program.ops = [program.ops[i] for i in order]
        bad = overlaps(plan)
        if bad:  # the planner's own invariant: a bug, never the user's input
            raise GraphoptError(f"internal error: the memory plan overlaps {bad[:3]}")
        header, source, weight_bytes = generate(program, plan, proto.graph.name or "model",
                                                io_in_arena=self.io == "arena")
        io_bytes = sum(program.nbytes(n) for n in io_names)
        self._check_budget(plan.arena_bytes, 0 if self.io == "arena" else io_bytes,
                           weight_bytes)
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=TEMP_PREFIX))
        try:
            (stage / HEADER).write_text(header)
            (stage / SOURCE).write_text(source)
            for name in mcu_build.KERNEL_FILES:
                shutil.copyfile(mcu_build.KERNELS / name, stage / name)
            save(proto, stage / MODEL_FILE)
            arm = self._arm_build(stage)
            files = [SOURCE, HEADER, *mcu_build.KERNEL_FILES, MODEL_FILE]
            manifest = self._manifest(proto, model, program, plan, weight_bytes, io_bytes,
                                      arm, stage, files)
            manifest["memory"]["order"] = "memory-greedy" if reordered else "graph"
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            files.append(MANIFEST)
            move_in(stage, out, files, FORMAT)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return Artifact(target=self.name, path=out / SOURCE, files=[out / f for f in files],
                        format="c99")

    def _check_budget(self, arena: int, io_bytes: int, weights: int) -> None:
        """``io_bytes``: the inputs and outputs outside the arena (0 when inside)."""
        p = self.preset
        if arena + io_bytes > p.ram_bytes:
            parts = f"arena {arena} + inputs/outputs {io_bytes}" if io_bytes else \
                f"the arena, inputs and outputs included"
            raise UsageError(f"the model needs {arena + io_bytes} bytes of RAM ({parts}); "
                             f"{p.name} has {p.ram_bytes}", hint="quantize or prune the "
                             "model, lower --input-shape, or use a preset with more RAM")
        if weights > p.flash_bytes:
            raise UsageError(f"the model's weights are {weights} bytes; {p.name} has "
                             f"{p.flash_bytes} bytes of flash",
                             hint="quantize or prune the model, or use a preset with more "
                                  "flash")

    def _arm_build(self, folder: Path) -> dict:
        """Link the Cortex-M image in the preset's budget (``BudgetError`` when it does
        not fit) and return its ``size``; skipped with the reason without the toolchain."""
        missing = mcu_build.why_no_arm()
        if missing:
            return {"built": False, "detail": missing}
        with tempfile.TemporaryDirectory(prefix="graphopt-mcu-") as work:
            _, size = mcu_build.build_arm(folder, Path(work), self.preset.board)
        return {"built": True, "cpu_flags": list(self.preset.board.cpu_flags), **size}

    def _manifest(self, proto, model, program, plan, weight_bytes, io_bytes, arm, stage,
                  files) -> dict:
        from graphopt.api import graphopt_version

        return {
            "format": FORMAT, "target": self.name, "description": self.description,
            "artifact": SOURCE, "artifact_format": "c99", "model": MODEL_FILE,
            "header": HEADER,
            "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in program.inputs],
            "outputs": [{"name": n, "shape": s, "dtype": "float32"}
                        for n, s in program.outputs],
            "memory": {"arena_bytes": plan.arena_bytes, "naive_bytes": program.naive_bytes,
                       "largest_tensor_bytes": plan.largest_bytes,
                       "io_bytes": io_bytes, "io_in_arena": self.io == "arena",
                       "ram_bytes": plan.arena_bytes + (0 if self.io == "arena" else
                                                        io_bytes),
                       "weight_bytes": weight_bytes,
                       "ram_budget": self.preset.ram_bytes,
                       "flash_budget": self.preset.flash_bytes},
            "ops": [{"kernel": op.kind, "node": op.node, "op_type": op.op_type,
                     **({"fused": op.params["fused"]} if op.params.get("fused") else {}),
                     "inputs": op.inputs, "outputs": op.outputs,
                     "offsets": [plan.offset(t) for t in op.outputs]}
                    for op in program.ops],
            "plan": plan.to_dict(),
            "arm_build": arm,
            "board": {"qemu_machine": self.preset.board.qemu_machine,
                      "flash_origin": self.preset.board.flash_origin,
                      "ram_origin": self.preset.board.ram_origin},
            "graphopt_version": graphopt_version(),
            "model_content_hash": model.content_hash(),
            "files": files + [MANIFEST],
            "sha256": {name: sha256(stage / name) for name in files},
            "toolchain": {"onnx": onnx.__version__, "python": platform.python_version()},
        }

    # ------------------------------------------------------------------ running
    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of the C code on ``feeds``. Inputs at the compiled shape run once;
        inputs whose first dimension is a multiple of a compiled batch of 1 run sample
        by sample (one process for all), and the outputs are stacked."""
        folder = Path(artifact.path).parent
        manifest = read_manifest(folder)
        if manifest.get("format") != FORMAT:
            raise UsageError(f"{folder} is not an mcu artifact folder",
                             hint="lower the model with --target mcu")
        ins, outs = manifest["inputs"], manifest["outputs"]
        count = _sample_count(ins, feeds)
        samples = [np.concatenate([np.asarray(feeds[i["name"]], np.float32).reshape(
            count, -1)[k] for i in ins]) for k in range(count)]
        runner = self._chosen_runner()
        missing = self.run_availability()
        if missing:
            raise UsageError(f"cannot run the mcu artifact here: {missing}")
        board = self.preset.board
        binary = mcu_build.built(folder, runner, board if runner == "qemu" else None)
        rows = mcu_build.run_harness(binary, runner, board, samples,
                                     sum(math.prod(o["shape"]) for o in outs))
        self._ran_on = (f"qemu-system-arm {board.qemu_machine} ({self.preset.core}, "
                        f"emulated)" if runner == "qemu" else "this machine's C compiler "
                        "(host build of the C99)")
        result, at = {}, 0
        for o in outs:
            size = math.prod(o["shape"])
            part = rows[:, at:at + size].reshape(count, *o["shape"])
            result[o["name"]] = part[0] if count == 1 else \
                part.reshape(count * o["shape"][0], *o["shape"][1:])
            at += size
        return result

    def measure(self, artifact: Artifact, feeds: dict[str, np.ndarray], *,
                repeat: int = 20) -> float | None:
        """``None``: neither the host build nor the emulator times a microcontroller."""
        return None

    def ran_on(self) -> str | None:
        return self._ran_on


def plan_program(program, in_arena: bool) -> tuple[list[int], Plan]:
    """``(op order, memory plan)`` of a lowered program. ``in_arena``: its inputs and
    outputs are planned in the arena too (inputs written before the first op, outputs
    alive to the end, reused like any tensor otherwise, as TFLite Micro does); else they
    are the caller's buffers."""
    steps = [op.step() for op in program.ops]
    sizes = {t: program.nbytes(t) for t in program.shapes}
    ins, outs = tuple(n for n, _ in program.inputs), tuple(n for n, _ in program.outputs)
    if not in_arena:
        return plan_best_order(steps, sizes, set(ins) | set(outs))
    best: tuple[list[int], Plan] | None = None
    for order in (list(range(len(steps))), memory_greedy_order(steps, sizes,
                                                               set(ins) | set(outs))):
        plan = plan_memory([Step("(inputs)", (), ins), *(steps[i] for i in order),
                            Step("(outputs)", outs, ())], sizes, set())
        if best is None or plan.arena_bytes < best[1].arena_bytes:
            best = (order, plan)
    return best


def _sample_count(ins: list[dict], feeds: dict[str, np.ndarray]) -> int:
    counts = set()
    for spec in ins:
        if spec["name"] not in feeds:
            raise UsageError(f"no input {spec['name']!r} given to the mcu artifact")
        got, want = list(np.shape(feeds[spec["name"]])), spec["shape"]
        if got == want:
            counts.add(1)
        elif want and want[0] == 1 and got[1:] == want[1:] and got:
            counts.add(got[0])
        else:
            raise UsageError(f"input {spec['name']!r} has shape {got}; the C code was "
                             f"compiled for {want}",
                             hint="lower again with --input-shape for this shape")
    if len(counts) > 1:
        raise UsageError(f"the inputs give different batch sizes: {sorted(counts)}")
    return counts.pop() if counts else 1


CORTEX_M4 = McuTarget(PRESETS["cortex-m4"])
CORTEX_M55 = McuTarget(PRESETS["cortex-m55"])
# ``--target mcu``: the default microcontroller, a Cortex-M4F.
MCU = McuTarget(replace(PRESETS["cortex-m4"], name="mcu"))
