"""The TVM target presets: one table of data, one class (``TvmTarget``).

Each preset is registered as a target instance in graphopt's ``pyproject.toml``
(``arm = "graphopt.targets.presets:ARM"``). A new CPU is a new row, never a code path.

A GPU is a row with an ``accelerator`` (TVM's device target; ``llvm`` is then its host).
Another GPU is another row, e.g. an H100 (``accelerator={"kind": "cuda", "arch":
"sm_90"}``, 132 SMs) registered by a distribution as
``TvmTarget(replace(PRESETS["cuda"], name="cuda-h100", accelerator=..., cores=132, ...))``
in its ``graphopt.targets`` entry points.

Device figures are nominal, for the cost model's ranking, not measurements:
FLOP/s per core = SIMD FMA pipes x lanes x 2 x clock. float16 on cores without FP16
arithmetic (ARMv8.0) counts as float32; int8 without dot-product instructions as 2x float32.
"""

from __future__ import annotations

from graphopt.targets.tvm import TvmPreset, TvmTarget

_AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}

PRESETS: dict[str, TvmPreset] = {p.name: p for p in (
    TvmPreset(
        name="x86",
        description="this x86-64 machine's CPU, compiled with Apache TVM (LLVM -mcpu=native)",
        device_name="host x86-64 CPU ({cores} cores)",
        llvm={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "native"},
        cross_prefix=None, runner="local",
        # a 3 GHz AVX2 core: 2 FMA pipes x 8 float32 lanes x 2 FLOPs (as the ort target)
        peak_flops_per_core={"float32": 96e9, "float16": 96e9, "int8": 192e9},
        bandwidth=20e9, cores=None),
    TvmPreset(
        name="arm",
        description="64-bit Arm Linux, Cortex-A72 class (e.g. Raspberry Pi 4), NEON; "
                    "Apache TVM, runs here under qemu-aarch64",
        device_name="4x Cortex-A72 @ 1.5 GHz",
        llvm={**_AARCH64, "mcpu": "cortex-a72", "mattr": ["+neon"]},
        cross_prefix="aarch64-linux-gnu-", runner="qemu-aarch64", qemu_cpu="cortex-a72",
        # 2 NEON FMA pipes x 4 float32 lanes x 2 x 1.5 GHz; no FP16 arithmetic, no dotprod
        peak_flops_per_core={"float32": 24e9, "float16": 24e9, "int8": 48e9},
        bandwidth=4e9, cores=4),
    TvmPreset(
        name="arm-a76",
        description="64-bit Arm Linux, Cortex-A76 class (e.g. Raspberry Pi 5), NEON + "
                    "dotprod; Apache TVM, runs here under qemu-aarch64",
        device_name="4x Cortex-A76 @ 2.4 GHz",
        llvm={**_AARCH64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]},
        cross_prefix="aarch64-linux-gnu-", runner="qemu-aarch64", qemu_cpu="cortex-a76",
        # 2 NEON FMA pipes x 4 lanes x 2 x 2.4 GHz; FP16 2x; SDOT 2 x 16 MACs
        peak_flops_per_core={"float32": 38.4e9, "float16": 76.8e9, "int8": 153.6e9},
        bandwidth=10e9, cores=4),
    TvmPreset(
        name="arm-a55",
        description="64-bit Arm Linux, Cortex-A55 class (little cores, e.g. RK3566), NEON; "
                    "Apache TVM, runs here under qemu-aarch64",
        device_name="4x Cortex-A55 @ 1.8 GHz",
        llvm={**_AARCH64, "mcpu": "cortex-a55", "mattr": ["+neon"]},
        # qemu 7.2 has no cortex-a55 model; cortex-a76 is the same ISA level (v8.2-A,
        # fp16, dotprod), so an instruction beyond v8.2-A still traps.
        cross_prefix="aarch64-linux-gnu-", runner="qemu-aarch64", qemu_cpu="cortex-a76",
        # 1 NEON FMA pipe x 4 lanes x 2 x 1.8 GHz; FP16 2x; SDOT 16 MACs
        peak_flops_per_core={"float32": 14.4e9, "float16": 28.8e9, "int8": 57.6e9},
        bandwidth=4e9, cores=4),
    TvmPreset(
        name="cuda",
        description="NVIDIA GPU (CUDA, default sm_80: A100 class), Apache TVM with its "
                    "default GPU schedules; x86-64 Linux host; runs where TVM sees a GPU "
                    "(here, or --rpc to a GPU machine's RPC server)",
        device_name="NVIDIA A100-class GPU (sm_80, 108 SMs)",
        accelerator={"kind": "cuda", "arch": "sm_80"},
        llvm={"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        cross_prefix=None, runner="local",
        # Per SM of an A100 (1.41 GHz): TVM's default (dlight) schedules run on the CUDA
        # cores, not the tensor cores, so float16 is 4x and int8 (dp4a) 4x float32, not
        # the tensor-core 312/624 TFLOP/s; HBM2 1.555 TB/s (40 GB part).
        peak_flops_per_core={"float32": 19.5e12 / 108, "float16": 78e12 / 108,
                             "int8": 78e12 / 108},
        bandwidth=1.555e12, cores=108, node_overhead_s=5e-6, int8_fast=True),
)}

X86 = TvmTarget(PRESETS["x86"])
CUDA = TvmTarget(PRESETS["cuda"])
ARM = TvmTarget(PRESETS["arm"])
ARM_A76 = TvmTarget(PRESETS["arm-a76"])
ARM_A55 = TvmTarget(PRESETS["arm-a55"])
