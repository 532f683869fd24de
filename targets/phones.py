"""Phones a ``.tflite`` is built for, as rows of data (``--target android-arm64``): the
device the litert target's cost model prices for each. A new phone is a new row and an
entry point (``graphopt.targets``), never a code path."""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.cost import Device


@dataclass(frozen=True)
class Phone:
    """A phone a ``.tflite`` is built for, as a row of data: the device its cost model
    prices (nominal figures, for ranking, not measurements). LiteRT runs the file here
    only to verify it; this CPU's time says nothing of the phone's."""

    name: str
    description: str
    core: str
    peak_flops_per_core: dict[str, float]
    bandwidth: float  # bytes/s

    def device(self, threads: int) -> Device:
        return Device(f"{threads}x {self.core}", {k: v * threads for k, v in
                                                   self.peak_flops_per_core.items()},
                      self.bandwidth, cores=threads, int8_fast=True, channel_multiple=4)


PHONES: dict[str, Phone] = {p.name: p for p in (
    Phone("android-arm64",
          "LiteRT (TensorFlow Lite) .tflite for Android phones, 64-bit Arm big cores "
          "(Cortex-A76/A78 class: NEON, dotprod, XNNPACK); verified here in LiteRT, "
          "not timed (this CPU is not the phone's)",
          "Cortex-A76-class phone core @ 2.4 GHz",
          # as the arm-a76 preset: 2 NEON FMA pipes x 4 lanes x 2 x 2.4 GHz; FP16 2x;
          # SDOT 2 x 16 MACs
          {"float32": 38.4e9, "float16": 76.8e9, "int8": 153.6e9}, bandwidth=10e9),
)}
