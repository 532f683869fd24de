"""NVIDIA TensorRT: a TensorRT-ready ONNX model and, where TensorRT and a CUDA GPU are
present, the engine built from it. ``lower`` writes a folder::

    out/model.onnx      TensorRT-ready ONNX: default domain only, ops TensorRT's ONNX parser
                        imports, explicit int8 quantization in TensorRT's form (signed int8,
                        zero point 0), input shapes fixed or covered by a profile
    out/model.plan      the serialized engine (only where tensorrt + a CUDA GPU are present)
    out/manifest.json   target, device, inputs/outputs, optimization profiles, precision,
                        hashes, toolchain; without an engine, the trtexec command that
                        builds it on the device (``build_command``)

Precision lives in the graph, not in builder flags. The engine is built as a *strongly
typed* network: TensorRT runs each tensor in the type the ONNX gives it, so what graphopt
verified with ONNX Runtime (``--quantize fp16``: float16 with float32 islands; ``--quantize
int8``: Q/DQ around the quantized layers) is what the engine computes. The weakly typed
alternative (``BuilderFlag.FP16``/``INT8``: TensorRT may pick lower precision per layer) was
deprecated in TensorRT 10.12 and removed in 11, is not allowed together with strong typing,
and would run precisions no one verified. TF32 is off unless ``TensorRtTarget(tf32=True)``:
it rounds float32 matmul/conv inputs to 10 mantissa bits.

Symbolic input dimensions that ``--input-shape`` did not fix get one optimization profile:
``(min, opt, max)`` per dimension name from ``profiles``, else ``batch_profile`` (axis 0,
default 1/1/8) or ``dim_profile`` (other axes, default 1/128/512).

The op table is that of TensorRT's ONNX parser (onnx-tensorrt ``docs/operators.md``, 10.15),
restricted to the installed TensorRT's version, or to 10.0 where TensorRT is not installed
here (``tensorrt_version`` overrides it): the ONNX then parses on every TensorRT 10.

``tensorrt`` and ``cuda-python`` are imported only inside the methods that build or run
engines: importing graphopt never imports them.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import tempfile
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.cost import Device
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model, save, saved_files
from graphopt.target import (MANIFEST, Artifact, Capabilities, Target, all_nodes, graph_inputs,
                             read_manifest, sha256, value_info)
from graphopt.targets.ort import LOSSLESS_PIPELINE
from graphopt.targets.shapes import bind_input_shapes

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.plan"
FORMAT = "graphopt-tensorrt/1"
INSTALL_HINT = "pip install 'graphopt[tensorrt]'"
BASELINE = (10, 0)  # the oldest TensorRT the extra allows: the table used without one here

# Default-domain ops TensorRT 10's ONNX parser imports (onnx-tensorrt docs/operators.md,
# rows marked Y; per-op restrictions, e.g. 2-D/3-D pooling only, are the parser's to check).
_OPS_10_0 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization
LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Added to the parser after 10.0 (onnx-tensorrt docs/Changelog.md).
_OPS_SINCE = {
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15), "TensorScatter": (10, 15),
}
# Tensor types TensorRT takes (int8 only as a quantized type, uint8 only as network I/O).
DTYPES = frozenset({"float32", "float16", "bfloat16", "int8", "int32", "int64", "bool",
                    "uint8"})
# Types a Q/DQ pair may quantize to (zero point 0).
_QUANTIZED = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT4: "int4",
              onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn"}

# An A100-class data-center GPU (SXM, 108 SMs): dense tensor-core peaks; TensorRT fuses
# most elementwise work into its neighbours, so per-node overhead is small.
DEVICE = Device(name="NVIDIA GPU (A100-class), TensorRT",
                peak_flops={"float32": 19.5e12, "float16": 312e12, "bfloat16": 312e12,
                            "int8": 624e12},
                bandwidth=1.6e12, cores=108, node_overhead_s=2e-6, int8_fast=True)


class TensorRtTarget(Target):
    """TensorRT on an NVIDIA GPU: a TensorRT-ready ONNX plus, where possible, its engine."""

    name = "tensorrt"
    description = "NVIDIA TensorRT on a CUDA GPU (TensorRT-ready ONNX + engine)"
    device = DEVICE
    default_pipeline = LOSSLESS_PIPELINE
    compiled = True
    # TensorRT's explicit quantization: symmetric signed int8 activations (zero point 0),
    # full-range per-channel weights (no 7-bit reduce-range: GPUs have int8 dot products),
    # no int8 embedding tables (TensorRT gathers int8 only as a quantized type).
    pass_defaults = {"quantize-int8": {"symmetric-activations": True, "per-channel": True,
                                       "reduce-range": "false", "embeddings": False}}

    def __init__(self, tensorrt_version: str | None = None,
                 profiles: dict[str, tuple[int, int, int]] | None = None,
                 batch_profile: tuple[int, int, int] = (1, 1, 8),
                 dim_profile: tuple[int, int, int] = (1, 128, 512),
                 tf32: bool = False, workspace_bytes: int | None = None):
        self.tensorrt_version = tensorrt_version
        self.profiles = dict(profiles or {})
        self.batch_profile = tuple(batch_profile)
        self.dim_profile = tuple(dim_profile)
        self.tf32 = tf32
        self.workspace_bytes = workspace_bytes
        for triple in (self.batch_profile, self.dim_profile, *self.profiles.values()):
            if len(triple) != 3 or not 1 <= triple[0] <= triple[1] <= triple[2]:
                raise UsageError(f"a TensorRT profile is (min, opt, max) with "
                                 f"1 <= min <= opt <= max, got {tuple(triple)}")

    def __repr__(self) -> str:
        return "TensorRtTarget()"

    # ------------------------------------------------------------------ capabilities
    def op_table_version(self) -> tuple[int, int]:
        """The TensorRT version whose parser the op table is for."""
        text = self.tensorrt_version or installed_version()
        return _major_minor(text) if text else BASELINE

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return _capabilities(self.op_table_version())

    def availability(self) -> str | None:
        """``None``: lowering (the TensorRT-ready ONNX and manifest) needs nothing beyond
        graphopt. What building and running engines here lacks is ``engine_availability``
        (``run_availability``, shown by ``graphopt targets``)."""
        return None

    def run_availability(self) -> str | None:
        return self.engine_availability(run=True)

    def engine_availability(self, run: bool = False, hints: bool = True) -> str | None:
        """``None`` when engines can be built (``run``: and run) here, else precisely what
        is missing: the tensorrt package, cuda-python (running only), a CUDA driver/GPU."""
        install = f" ({INSTALL_HINT})" if hints else ""
        missing = []
        if importlib.util.find_spec("tensorrt") is None:
            missing.append(f"the tensorrt package is not installed{install}")
        if run and _cudart_module() is None:
            missing.append(f"cuda-python is not installed{install}")
        count, why = cuda_devices()
        if not count:
            missing.append(why)
        return "; ".join(missing) or None

    produces = ("a folder: model.onnx (TensorRT-ready), manifest.json, and model.plan (the "
                "engine) where TensorRT and a CUDA GPU are present")

    def unsupported_ops(self, model: Model | onnx.ModelProto) -> Counter:
        """``{"com.microsoft::FusedConv": 1, "NonMaxUnpool": 2, ...}``: the nodes (main
        graph and subgraphs) TensorRT's ONNX parser does not import."""
        proto = model.to_onnx() if isinstance(model, Model) else model
        caps = self.capabilities
        missing: Counter = Counter()
        for node in all_nodes(proto.graph):
            domain = "" if node.domain == "ai.onnx" else node.domain
            if not caps.supports(node.op_type, domain):
                missing[f"{domain}::{node.op_type}" if domain else node.op_type] += 1
        return missing

    # ------------------------------------------------------------------ shapes
    def prepare(self, model: Model, input_shapes: dict[str, list[int]] | None) -> None:
        """``--input-shape`` fixes those inputs (and every dimension they bind) for the
        engine; symbolic dimensions left get an optimization profile when lowering."""
        bind_input_shapes(model, input_shapes)

    def optimization_profile(self, proto: onnx.ModelProto) -> dict[str, dict[str, list[int]]]:
        """``{input: {"min": [...], "opt": [...], "max": [...]}}`` for the inputs with
        symbolic dimensions (empty when every input shape is static)."""
        sizes: dict[str, tuple[int, int, int]] = {}
        profile = {}
        for value in graph_inputs(proto):
            shape = value_info(value)["shape"]
            if shape is None:
                raise UsageError(f"target 'tensorrt': input {value.name!r} has no known rank",
                                 hint=f"give its shape: --input-shape {value.name}=...")
            if all(isinstance(d, int) and d > 0 for d in shape):
                continue
            dims = []
            for axis, d in enumerate(shape):
                if isinstance(d, int) and d > 0:
                    dims.append((d, d, d))
                    continue
                key = d if isinstance(d, str) else f"{value.name}:{axis}"
                if key not in sizes:
                    sizes[key] = tuple(self.profiles.get(key) or (
                        self.batch_profile if axis == 0 else self.dim_profile))
                dims.append(sizes[key])
            profile[value.name] = {k: [t[i] for t in dims]
                                   for i, k in enumerate(("min", "opt", "max"))}
        return profile

    # ------------------------------------------------------------------ lowering
    def lower(self, model: Model, out: Path) -> Artifact:
        """Write the TensorRT-ready ONNX, the manifest and (where TensorRT and a CUDA GPU
        are present) the engine into the folder ``out``, atomically: staged beside it and
        moved in, nothing written when anything fails."""
        out = Path(out)
        if out.suffix in (".onnx", ".plan", ".engine") or out.is_file():
            raise UsageError(f"target {self.name!r} writes a directory (model.onnx, "
                             f"manifest.json, model.plan), not {str(out)!r}",
                             hint="give -o a folder")
        missing = self.unsupported_ops(model)
        if missing:
            listed = ", ".join(f"{op} ({n} node{'s' * (n > 1)})"
                               for op, n in sorted(missing.items()))
            major, minor = self.op_table_version()
            raise UsageError(f"target {self.name!r}: TensorRT {major}.{minor}'s ONNX parser "
                             f"does not import {listed}",
                             hint="use --target ort, which runs every ONNX op")
        proto, converted = tensorrt_ready(model.to_onnx())
        quantized = _check_quantization(proto)
        profile = self.optimization_profile(proto)
        log = logging.getLogger("graphopt")
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tensorrt-"))
        try:
            model_path = save(proto, stage / MODEL_FILE)
            command = trtexec_command(profile, self.tf32, self.workspace_bytes)
            why_not = self.engine_availability()
            build = None
            if why_not is None:
                build = self._build_engine(model_path, profile, stage / ENGINE_FILE)
            else:
                log.warning("target tensorrt: no engine built here (%s); %s/%s is "
                            "TensorRT-ready, build the engine on the device with: %s",
                            why_not, out, MODEL_FILE, command)
            files = [p.name for p in saved_files(model_path)] + \
                ([ENGINE_FILE] if build else [])
            manifest = self._manifest(proto, model, stage, files, profile, quantized,
                                      converted, command, build, why_not)
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            files.append(MANIFEST)
            _move_in(stage, out, files, stale=[ENGINE_FILE])
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        main = ENGINE_FILE if build else MODEL_FILE
        return Artifact(target=self.name, path=out / main, files=[out / f for f in files],
                        format="tensorrt-engine" if build else "tensorrt-onnx")

    def _manifest(self, proto, model: Model, stage: Path, files: list[str], profile: dict,
                  quantized: dict, converted: dict, command: str, build: dict | None,
                  why_not: str | None) -> dict:
        from graphopt.api import graphopt_version

        float16 = _has_float16(proto)
        major, minor = self.op_table_version()
        count, _ = cuda_devices()
        return {
            "format": FORMAT,
            "target": self.name,
            "description": self.description,
            "device": {"name": self.device.name, "peak_flops": self.device.peak_flops,
                       "bandwidth": self.device.bandwidth,
                       "cuda_gpus_here": count, "built_on": (build or {}).get("gpu")},
            "artifact": ENGINE_FILE if build else MODEL_FILE,
            "artifact_format": "tensorrt-engine" if build else "tensorrt-onnx",
            "model": MODEL_FILE,
            "engine": ENGINE_FILE if build else None,
            "engine_note": None if build else
            f"no engine built here: {why_not}; build it on the device (same TensorRT "
            f"version and GPU model as will run it) with build_command",
            "build_command": command,
            "builder": {
                "network": "strongly typed (precision from the ONNX types)",
                "precision": {"float32": True, "float16": float16,
                              "int8": bool(quantized["nodes"])},
                "flags": ["TF32"] if self.tf32 else [],
                "cleared_flags": [] if self.tf32 else ["TF32"],
                "workspace_bytes": self.workspace_bytes,
            },
            "quantization": quantized,
            "tensorrt_ready": converted,
            "inputs": [value_info(v) for v in graph_inputs(proto)],
            "outputs": [value_info(v) for v in proto.graph.output],
            "optimization_profiles": [profile] if profile else [],
            "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                          None),
            "op_table": f"TensorRT {major}.{minor} ONNX parser",
            "graphopt_version": graphopt_version(),
            "model_content_hash": model.content_hash(),
            "sha256": {name: sha256(stage / name) for name in files},
            "toolchain": {"tensorrt": (build or {}).get("tensorrt") or installed_version(),
                          "onnx": onnx.__version__, "cuda_driver": cuda_driver_version(),
                          "python": platform.python_version()},
        }

    def _build_engine(self, model_path: Path, profile: dict, plan: Path) -> dict:
        """Parse ``model_path`` with TensorRT's ONNX parser into a strongly typed network,
        build and serialize the engine to ``plan``."""
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is not None:  # always on (and the flag ignored) in TensorRT 11
            flags |= 1 << int(strongly_typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model_path)):
            errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise GraphoptError(f"target {self.name!r}: TensorRT {trt.__version__}'s ONNX "
                                f"parser rejected the model: " + "; ".join(errors),
                                hint="use --target ort, or fix the node named")
        config = builder.create_builder_config()
        if not self.tf32 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if profile:
            opt = builder.create_optimization_profile()
            for name, shapes in profile.items():
                opt.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
            config.add_optimization_profile(opt)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise GraphoptError(f"target {self.name!r}: TensorRT {trt.__version__} failed to "
                                f"build the engine (its log above says why)",
                                hint="use --target ort, or report the TensorRT error")
        with open(plan, "wb") as fh:
            fh.write(memoryview(serialized))
        return {"tensorrt": trt.__version__, "gpu": gpu_name()}

    # ------------------------------------------------------------------ running
    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session(artifact)
        hosts = session.bind(feeds)
        session.execute()
        return session.fetch(hosts)

    def measure(self, artifact: Artifact, feeds: dict[str, np.ndarray], *,
                repeat: int = 20) -> float | None:
        """Median seconds of one engine execution on the GPU (CUDA events around
        ``execute_async_v3``; host-device copies excluded), after one warm-up run."""
        session = self._session(artifact)
        hosts = session.bind(feeds)
        session.execute()
        session.fetch(hosts)
        return statistics.median(session.time_execute() for _ in range(max(1, repeat)))

    def _session(self, artifact: Artifact) -> "_EngineSession":
        path = Path(artifact.path)
        folder = path.parent if path.is_file() else path
        manifest = read_manifest(folder)
        if not manifest.get("engine"):
            raise UsageError(f"{folder} holds no TensorRT engine "
                             f"({manifest.get('engine_note') or 'none was built'})",
                             hint=f"build it on a machine with TensorRT and a CUDA GPU: "
                                  f"cd {folder} && {manifest.get('build_command')}, then set "
                                  f"\"engine\" in {MANIFEST}, or lower again there")
        missing = self.engine_availability(run=True)
        if missing:
            raise UsageError(f"running a TensorRT engine here needs: {missing}")
        engine = folder / manifest["engine"]
        return _session(str(engine.resolve()), engine.stat().st_mtime_ns)


# ---------------------------------------------------------------------- TensorRT-ready ONNX
def tensorrt_ready(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """The model in the form TensorRT's explicit quantization takes; numerically the same.

    * a Q/DQ pair with uint8 zero point 128 becomes int8 with zero point 0 (symmetric
      activations: ``sat(round(x/s)) + 128`` in [0, 255] is ``sat(round(x/s))`` in
      [-128, 127], shifted; the dequantized values are identical);
    * a DequantizeLinear of a constant int32 tensor (a bias quantized for ONNX Runtime's
      integer kernels) becomes the float32 constant it computes: TensorRT quantizes only to
      int8/int4/fp8 and folds biases itself.

    Returns the new model and what was converted."""
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    graph = result.graph
    inits = {t.name: t for t in graph.initializer}
    types = {v.name: v for v in [*graph.value_info, *graph.output]}
    outputs = {v.name for v in graph.output}
    to_int8: set[str] = set()
    folded = 0
    keep = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            keep.append(node)
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and \
                inits[node.input[0]].data_type == onnx.TensorProto.INT32 and \
                node.input[1] in inits and node.output[0] not in outputs:
            graph.initializer.append(_fold_dequantize(node, inits))
            folded += 1
            continue
        if zero is not None and zero.data_type == onnx.TensorProto.UINT8 and \
                np.all(numpy_helper.to_array(zero) == 128):
            to_int8.add(zero.name)
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                to_int8.add(node.input[0])
            if node.op_type == "QuantizeLinear" and node.output[0] in types:
                types[node.output[0]].type.tensor_type.elem_type = onnx.TensorProto.INT8
        keep.append(node)
    for name in to_int8:  # only Q/DQ read these (zero points and uint8 weights)
        value = numpy_helper.to_array(inits[name]).astype(np.int16) - 128
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.int8), name))
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in all_nodes(graph) for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used and t.name not in outputs]
    for t in unused:
        graph.initializer.remove(t)
    return result, {"uint8_zero_point_128_to_int8": len(to_int8),
                    "int32_bias_dequantize_folded": folded}


def _fold_dequantize(node: onnx.NodeProto, inits: dict) -> onnx.TensorProto:
    q = numpy_helper.to_array(inits[node.input[0]])
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[node.input[2]]) \
        if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, dtype=q.dtype)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and q.ndim > 0:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    # as ONNX Runtime computes it: float(q - zero) * scale in float32
    value = (q.astype(np.int64) - zero.astype(np.int64)).astype(np.float32) * scale
    return numpy_helper.from_array(value.astype(np.float32), node.output[0])


def _check_quantization(proto: onnx.ModelProto) -> dict:
    """Every Q/DQ must be what TensorRT takes: zero point 0 of a quantized type (int8,
    int4, fp8). Returns a summary for the manifest; a UsageError names the offenders."""
    inits = {t.name: t for t in proto.graph.initializer}
    bad, kinds = [], Counter()
    per_channel = 0
    for node in all_nodes(proto.graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None:  # no zero point: Q makes uint8; DQ reads its input's type
            source = inits.get(node.input[0])
            if node.op_type == "QuantizeLinear" or (source is not None and
                                                    source.data_type not in _QUANTIZED):
                dtype = onnx.TensorProto.UINT8 if source is None else source.data_type
                bad.append(f"{node.name or node.output[0]} ({node.op_type} of "
                           f"{onnx.TensorProto.DataType.Name(dtype).lower()})")
            continue
        value = numpy_helper.to_array(zero)
        if zero.data_type not in _QUANTIZED or np.any(value.astype(np.float64) != 0):
            bad.append(f"{node.name or node.output[0]} ({node.op_type}, "
                       f"{onnx.TensorProto.DataType.Name(zero.data_type).lower()} zero point "
                       f"{value.reshape(-1)[:1].tolist()[0] if value.size else '?'})")
            continue
        kinds[_QUANTIZED[zero.data_type]] += 1
        scale = inits.get(node.input[1])
        per_channel += scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1
    if bad:
        raise UsageError(
            f"target 'tensorrt': TensorRT quantizes symmetrically (signed, zero point 0); "
            f"{len(bad)} Q/DQ node(s) are not: {', '.join(bad[:5])}"
            + (", ..." if len(bad) > 5 else ""),
            hint="quantize with --quantize int8 for this target (its quantize-int8 "
                 "defaults are symmetric-activations=true, reduce-range=false)")
    return {"nodes": sum(kinds.values()), "types": dict(kinds), "per_channel": per_channel,
            "zero_points": "all 0"}


def trtexec_command(profile: dict, tf32: bool = False, workspace_bytes: int | None = None) -> str:
    """The trtexec command that builds ``model.plan`` from ``model.onnx`` as ``lower``
    would (run in the artifact folder)."""
    args = ["trtexec", f"--onnx={MODEL_FILE}", f"--saveEngine={ENGINE_FILE}", "--stronglyTyped"]
    if not tf32:
        args.append("--noTF32")
    if workspace_bytes:
        args.append(f"--memPoolSize=workspace:{max(1, workspace_bytes >> 20)}M")
    for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        if profile:
            args.append(flag + "=" + ",".join(
                f"{_trtexec_name(name)}:{'x'.join(map(str, shapes[key]))}"
                for name, shapes in profile.items()))
    return " ".join(shlex.quote(a) for a in args)


def _trtexec_name(name: str) -> str:
    return name if all(c.isalnum() or c in "_./-" for c in name) else f"'{name}'"


# ---------------------------------------------------------------------- the engine runtime
class _EngineSession:
    """A deserialized engine, its execution context, a CUDA stream and device buffers
    (grown as needed), kept for repeated runs."""

    def __init__(self, path: str):
        import tensorrt as trt

        self.trt, self.cudart = trt, _cudart_module()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise GraphoptError(f"TensorRT {trt.__version__} cannot load the engine {path} "
                                f"(built by another TensorRT version or for another GPU?)",
                                hint="rebuild it on this machine: lower again here, or run "
                                     "the manifest's build_command")
        self.context = self.engine.create_execution_context()
        self.stream = _cuda(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers: dict[str, tuple[int, int]] = {}
        self._host_inputs: list[np.ndarray] = []

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes or not ptr:
            if ptr:
                _cuda(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_cuda(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def bind(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, int]]:
        trt, cudart = self.trt, self.cudart
        self._host_inputs = []
        for name in self.inputs:
            if name not in feeds:
                raise UsageError(f"no value for input {name!r}",
                                 hint=f"inputs: {', '.join(self.inputs)}")
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            array = np.ascontiguousarray(feeds[name], dtype=dtype)
            self._host_inputs.append(array)  # alive until the copies are done
            if not self.context.set_input_shape(name, array.shape):
                raise UsageError(f"input {name!r} of shape {list(array.shape)} is outside the "
                                 f"engine's optimization profile (see the manifest)")
            if self.engine.get_tensor_location(name) == trt.TensorLocation.HOST:  # shape tensors
                self.context.set_tensor_address(name, array.ctypes.data)
                continue
            ptr = self._device(name, array.nbytes)
            _cuda(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                         self.stream), "cudaMemcpyAsync")
            self.context.set_tensor_address(name, ptr)
        hosts = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise GraphoptError(f"output {name!r} has a data-dependent shape {shape}: "
                                    f"not supported by graphopt's TensorRT runner")
            host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            ptr = self._device(name, host.nbytes)
            self.context.set_tensor_address(name, ptr)
            hosts[name] = (host, ptr)
        return hosts

    def execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise GraphoptError("TensorRT failed to enqueue the engine (execute_async_v3)")

    def fetch(self, hosts: dict[str, tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
        cudart = self.cudart
        for host, ptr in hosts.values():
            _cuda(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                         self.stream), "cudaMemcpyAsync")
        _cuda(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._host_inputs = []
        return {name: host for name, (host, _) in hosts.items()}

    def time_execute(self) -> float:
        """Seconds of one ``execute`` on the GPU, by CUDA events on the stream."""
        cudart = self.cudart
        start = _cuda(cudart.cudaEventCreate(), "cudaEventCreate")
        end = _cuda(cudart.cudaEventCreate(), "cudaEventCreate")
        try:
            _cuda(cudart.cudaEventRecord(start, self.stream), "cudaEventRecord")
            self.execute()
            _cuda(cudart.cudaEventRecord(end, self.stream), "cudaEventRecord")
            _cuda(cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
            return float(_cuda(cudart.cudaEventElapsedTime(start, end),
                               "cudaEventElapsedTime")) / 1e3
        finally:
            cudart.cudaEventDestroy(start)
            cudart.cudaEventDestroy(end)


@functools.lru_cache(maxsize=4)
def _session(path: str, mtime_ns: int) -> _EngineSession:
    """One loaded engine per file version (deserializing costs more than a small run)."""
    return _EngineSession(path)


def _cudart_module():
    """cuda-python's runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart`` in
    cuda-python < 12.6), or None when not installed."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart

        return cudart
    except ImportError:
        return None


def _cuda(result, what: str):
    """The value of a cuda-python call's ``(error, value...)`` tuple; raises on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        raise GraphoptError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


# ---------------------------------------------------------------------- CUDA driver probing
@functools.lru_cache(maxsize=None)
def _libcuda():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def cuda_devices() -> tuple[int, str | None]:
    """(number of CUDA GPUs, why there is none), through the CUDA driver API (no extra
    Python package needed)."""
    lib = _libcuda()
    if lib is None:
        return 0, "no CUDA driver (libcuda.so.1 not found: no NVIDIA GPU driver installed)"
    rc = lib.cuInit(0)
    if rc != 0:
        return 0, f"the CUDA driver found no usable GPU (cuInit error {rc})"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return 0, "no CUDA GPU visible (cuDeviceGetCount: 0)"
    return count.value, None


@functools.lru_cache(maxsize=None)
def cuda_driver_version() -> str | None:
    """The CUDA version the driver supports, e.g. ``"12.4"`` (None: no driver)."""
    lib = _libcuda()
    value = ctypes.c_int(0)
    if lib is None or lib.cuDriverGetVersion(ctypes.byref(value)) != 0 or not value.value:
        return None
    return f"{value.value // 1000}.{value.value % 1000 // 10}"


def gpu_name() -> str | None:
    count, _ = cuda_devices()
    if not count:
        return None
    lib, device, name = _libcuda(), ctypes.c_int(0), ctypes.create_string_buffer(256)
    if lib.cuDeviceGet(ctypes.byref(device), 0) != 0 or \
            lib.cuDeviceGetName(name, 256, device) != 0:
        return None
    return name.value.decode(errors="replace")


def installed_version() -> str | None:
    """The installed TensorRT's version from package metadata (nothing imported)."""
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11",
                 "tensorrt-cu13-bindings", "tensorrt-cu12-bindings"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


# ---------------------------------------------------------------------- helpers
def _major_minor(text: str) -> tuple[int, int]:
    parts = (text.split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        raise UsageError(f"cannot read the TensorRT version {text!r} (want e.g. 10.8)") from None


@functools.lru_cache(maxsize=None)
def _capabilities(release: tuple[int, int]) -> Capabilities:
    ops = _OPS_10_0 | {op for op, since in _OPS_SINCE.items() if release >= since}
    return Capabilities(domains=frozenset({""}), ops=frozenset(("", op) for op in ops),
                        dtypes=DTYPES)


def _parser_error(error) -> str:
    """One TensorRT ONNX parser error, naming the node."""
    def call(attr):
        try:
            value = getattr(error, attr)
            return value() if callable(value) else value
        except Exception:
            return None

    where = call("node_name") or (f"node #{call('node')}" if call("node") not in (None, -1)
                                  else None)
    op = call("node_operator")
    head = f"node {where}" + (f" ({op})" if op else "") if where else "the model"
    return f"{head}: {call('desc') or error}"


def _has_float16(proto: onnx.ModelProto) -> bool:
    half = onnx.TensorProto.FLOAT16
    graph = proto.graph
    if any(t.data_type == half for t in graph.initializer):
        return True
    if any(v.type.tensor_type.elem_type == half
           for v in [*graph.input, *graph.output, *graph.value_info]):
        return True
    return any(n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute)
               for n in all_nodes(graph))


def _move_in(stage: Path, out: Path, files: list[str], stale: list[str]) -> None:
    """Move the staged ``files`` into ``out``: the whole folder at once when ``out`` does
    not exist yet, else file by file (each ``os.replace`` atomic), removing ``stale``
    files of an earlier lowering that this one did not write."""
    if not out.exists():
        os.chmod(stage, 0o755)
        os.replace(stage, out)
        return
    for name in stale:
        if name not in files and (out / name).exists():
            (out / name).unlink()
    for name in files:
        os.replace(stage / name, out / name)
