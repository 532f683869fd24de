"""The TVM target presets: one table of data, one class (``TvmTarget``).

Each preset is registered as a target instance in graphopt's ``pyproject.toml``
(``arm = "graphopt.targets.presets:ARM"``). A new CPU is a new row, never a code path.

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
)}

X86 = TvmTarget(PRESETS["x86"])
ARM = TvmTarget(PRESETS["arm"])
ARM_A76 = TvmTarget(PRESETS["arm-a76"])
ARM_A55 = TvmTarget(PRESETS["arm-a55"])
