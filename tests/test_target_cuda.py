"""The ``cuda`` preset: a row of data (an accelerator target on the TVM class), lowered
here with no GPU; the library carries the kernels' CUDA source (TVM's PyPI compiler
embeds source; TVM's CUDA runtime compiles it when the library loads on the GPU), which
``nvcc`` compiles for the preset's arch; running needs a GPU (or ``--rpc`` to one).

Skips, each with its reason: TVM not installed, no ``nvcc`` (the device-code check), no
CUDA GPU (the run).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest

import graphopt
from graphopt.errors import UsageError
from graphopt.registry import target_registry
from tests import zoo

HAS_TVM = importlib.util.find_spec("tvm") is not None
NVCC = shutil.which("nvcc")
EM_CUDA = 190
ATOL = 1e-4
# Where the embedded CUDA module's source begins (TVM prepends this guard to its source)
SOURCE_START = b"\n#ifdef __CUDACC_RTC__"

needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="Apache TVM is not installed "
                               "(pip install 'graphopt[tvm]')")


def _gpu_here() -> bool:
    if not HAS_TVM:
        return False
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no CUDA runtime at all
        return False


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    proto = zoo.mobilenet_cnn()
    target = graphopt.get_target("cuda")
    model = graphopt.optimize(proto, target="cuda").model
    start = time.perf_counter()
    artifact = target.lower(model, tmp_path_factory.mktemp("cuda") / "artifact")
    seconds = time.perf_counter() - start
    x = np.random.default_rng(0).standard_normal((2, *zoo.CNN_INPUT)).astype(np.float32)
    return artifact, proto, {"input": x}, seconds


def test_cuda_is_a_preset_row():
    from graphopt.targets.presets import PRESETS
    from graphopt.targets.tvm import TvmTarget

    plugin = target_registry().get("cuda")
    assert isinstance(plugin, TvmTarget) and plugin.preset is PRESETS["cuda"]
    preset = PRESETS["cuda"]
    assert preset.accelerator == {"kind": "cuda", "arch": "sm_80"}
    assert preset.device_kind == "cuda" and preset.llvm["kind"] == "llvm"
    device = plugin.device
    assert device.cores == 108 and device.peak("float32") == pytest.approx(19.5e12)
    assert device.peak("float16") > device.peak("float32") and device.bandwidth > 1e12
    assert PRESETS["x86"].device_kind == "cpu"


@needs_tvm
def test_lowering_embeds_cuda_kernels_for_the_preset_arch(lowered):
    artifact, _, _, seconds = lowered
    folder = artifact.path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx",
                                                        "model.so"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["artifact"] == "model.so"
    assert manifest["device_target"] == {"kind": "cuda", "arch": "sm_80"}
    assert manifest["device_kind"] == "cuda"
    assert manifest["llvm_target"]["mtriple"] == "x86_64-linux-gnu"
    assert "num-cores" not in manifest["llvm_target"]  # 108 SMs are not host cores
    source = _embedded_cuda_source(artifact.path.read_bytes())
    assert source.count(b'extern "C" __global__') >= 10
    assert b"threadIdx.x" in source and b"blockIdx.x" in source  # dlight bound threads
    assert seconds < 120


@needs_tvm
@pytest.mark.skipif(NVCC is None, reason="no nvcc (the CUDA toolkit) to compile the "
                                         "embedded device code with")
def test_the_embedded_kernels_compile_for_sm_80_with_nvcc(lowered, tmp_path):
    artifact, _, _, _ = lowered
    (tmp_path / "kernels.cu").write_bytes(_embedded_cuda_source(artifact.path.read_bytes()))
    proc = subprocess.run([NVCC, "-arch=sm_80", "-cubin", "-o", "kernels.cubin",
                           "kernels.cu"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cubin = (tmp_path / "kernels.cubin").read_bytes()
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == EM_CUDA


@needs_tvm
@pytest.mark.skipif(_gpu_here(), reason="a CUDA GPU is present: the run test covers it")
def test_running_without_a_gpu_says_so(lowered):
    artifact, _, feeds, _ = lowered
    target = graphopt.get_target("cuda")
    assert "no CUDA GPU here" in target.run_availability()
    for call in (lambda: target.run(artifact, feeds),
                 lambda: target.measure(artifact, feeds)):
        with pytest.raises(UsageError, match="CUDA GPU") as err:
            call()
        assert "--rpc" in err.value.hint and "rpc_server" in err.value.hint


@needs_tvm
@pytest.mark.skipif(not _gpu_here(), reason="no CUDA GPU here (tvm.cuda(0).exist)")
def test_cuda_artifact_runs_on_the_gpu_and_matches_ort(lowered, run_ort):
    artifact, proto, feeds, _ = lowered
    target = graphopt.get_target("cuda")
    out = target.run(artifact, feeds)
    want = run_ort(proto, feeds)
    for name, ref in want.items():
        np.testing.assert_allclose(out[name], ref, rtol=0, atol=ATOL, err_msg=name)
    assert target.measure(artifact, feeds, repeat=5) > 0


def _embedded_cuda_source(library: bytes) -> bytes:
    """The CUDA source TVM serialized into the library (a length-prefixed string)."""
    start = library.find(SOURCE_START)
    assert start > 8, "no CUDA source embedded in the library"
    length = struct.unpack_from("<Q", library, start - 8)[0]
    assert 0 < length <= len(library) - start
    return library[start:start + length]
