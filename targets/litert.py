"""LiteRT (TensorFlow Lite) on phones: ``lower`` writes a folder::

    out/model.tflite     the flatbuffer, written by graphopt from the optimized graph
                         (no TensorFlow, no converter): builtin operators only, NHWC
                         inside, the ONNX model's input/output names and layout outside
    out/manifest.json    inputs/outputs (shape, dtype, layout), the shapes the model was
                         lowered at, operators, Transposes left inside, hashes

``run`` loads the file in ``ai_edge_litert``'s interpreter (XNNPACK, as on a phone's CPU)
and ``optimize`` compares its outputs with ONNX Runtime on the original model.

TFLite tensors have static shapes here: symbolic dimensions are fixed at lowering, by
``--input-shape`` where given; otherwise a leading batch dimension shared by every input
and output is lowered at 1 (what an app feeds) and any other symbolic dimension (a
sequence) at the size probe inputs use. Both stay resizable (``-1`` in the shape
signature) where the ops allow (``tflite_dynamic``); else ``run`` feeds a larger batch one
sample at a time, and the manifest says why they are static.

The pipeline is the lossless one without ONNX Runtime's contrib fusions (FusedConv,
SkipLayerNormalization, Attention...): the target's capabilities are the ONNX ops the
writer maps (``tflite_ops.HANDLERS``), so a pass emitting anything else is left out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import verify
from graphopt.errors import GraphoptError, UsageError
from graphopt.ir import Model
from graphopt.pass_infra import parse_bool
from graphopt.paths import TEMP_PREFIX
from graphopt.target import (MANIFEST, Artifact, Capabilities, Target, folder_output,
                             move_in, sha256)
from graphopt.targets import litert_runtime
from graphopt.targets.ort import LOSSLESS_PIPELINE, host_device
from graphopt.targets.phones import PHONES
from graphopt.targets.shapes import bind_input_shapes
from graphopt.targets.tflite_lower import lower_graph
from graphopt.targets.tflite_ops import MAPPED_OPS
from graphopt.targets.tflite_writer import INSTALL_HINT
from graphopt.verify import DEFAULT_SYMBOLIC_SIZE

FORMAT = "graphopt-litert/1"
MODEL_FILE = "model.tflite"
IO_LAYOUTS = ("onnx", "nhwc")
IO_DTYPES = ("float32", "int8")
# Passes of the lossless pipeline that only write ops of the ONNX Runtime contrib domain
# (or forms the writer does not map): not worth listing for this target.
_CONTRIB_ONLY = {"fuse-conv-act", "fuse-silu", "fuse-attention", "fuse-skip-layer-norm",
                 "fuse-bias-gelu", "fuse-rms-norm"}


class LiteRtTarget(Target):
    """LiteRT's CPU interpreter with XNNPACK, as phones run ``.tflite`` files."""

    name = "litert"
    description = "LiteRT (TensorFlow Lite) .tflite for phones, verified in LiteRT's " \
                  "interpreter (XNNPACK) here"
    produces = "a folder: model.tflite, manifest.json"
    device = host_device(cores=1, blocked_layout=False)
    capabilities = Capabilities(domains=frozenset({""}),
                                ops=frozenset(("", op) for op in MAPPED_OPS),
                                dtypes=frozenset({"float32"}))
    default_pipeline = tuple(p for p in LOSSLESS_PIPELINE if p not in _CONTRIB_ONLY)
    compiled = True  # LiteRT runs it, not the ONNX Runtime the pass manager verified with
    # The quantizers decide with require-speedup, by default with the host cost model,
    # which prices ONNX Runtime's kernels: it left the zoo's MLP float at batch 2
    # (int8-dynamic) and the example CNN's head float (int8). quantize-int8 here asks
    # LiteRT instead: each layer timed alone, float against int8 (``int8_layer_costs``;
    # a 3-channel stem ran 3.6x slower in int8 on this machine). int8-dynamic does not:
    # two FC layers on the dynamic-range kernels ran at about float32's speed at 64x64
    # (0.71-1.08x over two runs on a shared machine) and 1.2-3.5x faster from 256x256 to
    # 128x384x1536 (1 thread; benchmarks/litert_target.py --fc-sweep), with a quarter of
    # the weight bytes; so it leaves no layer float for speed, only for the budget.
    # (reduce-range stays auto: XNNPACK's int8 kernels do not saturate on full-range
    # weights, but the quantizer measures its candidates in ONNX Runtime's fused
    # kernels, which do on x86 without VNNI, so 8-bit weights would be judged less
    # accurate there and kept float.)
    # full-integer: the residual Adds, averages and the head that read int8 values write
    # int8 too (as LiteRT's own converter does), not float between DEQUANTIZE and QUANTIZE.
    pass_defaults = {"quantize-int8": {"full-integer": True},
                     "quantize-int8-dynamic": {"require-speedup": False}}

    options = {"io_layout": "onnx (default): the ONNX model's layout at inputs and "
                            "outputs; nhwc: 4-D ones as NHWC (camera frames)",
               "io_dtype": "float32 (default); int8: a full-integer model's quantized "
                           "inputs and outputs as int8 tensors",
               "allow_custom": "false (default): an op without a TFLite mapping is "
                               "refused, named; true: it becomes a CUSTOM operator for a "
                               "kernel the app registers (stock LiteRT cannot run the "
                               "file, so it is not verified here)"}

    def __init__(self, threads: int | None = None, io_layout: str = "onnx",
                 name: str | None = None, io_dtype: str = "float32",
                 phone: str | None = None, allow_custom: bool | str = False):
        """``threads``: the interpreter's threads (default 1, a phone app's usual
        setting); ``io_layout="nhwc"`` exposes 4-D inputs and outputs as NHWC (camera
        frames) instead of the ONNX model's layout; ``name``: the registered alias;
        ``io_dtype="int8"``: in a full-integer model, inputs read only by a
        QuantizeLinear and quantized outputs are int8 tensors (their scale and zero point
        in the manifest) instead of float32 with a QUANTIZE/DEQUANTIZE; ``run`` still
        takes and gives float32. ``phone``: a row of ``PHONES``, the device the file is
        built for (its cost model decides), when that is not this machine.
        ``allow_custom``: ops without a mapping become CUSTOM operators (``tflite_unmapped``)
        instead of being refused."""
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, got {threads}")
        if io_dtype not in IO_DTYPES:
            raise UsageError(f"unknown io dtype {io_dtype!r}",
                             hint=f"choose one of {', '.join(IO_DTYPES)}")
        if io_layout not in IO_LAYOUTS:
            raise UsageError(f"unknown io layout {io_layout!r}",
                             hint=f"choose one of {', '.join(IO_LAYOUTS)}")
        if isinstance(allow_custom, str):
            try:
                allow_custom = parse_bool(allow_custom)
            except ValueError:
                raise UsageError(f"allow_custom must be true or false, not "
                                 f"{allow_custom!r}") from None
        self.allow_custom = bool(allow_custom)
        if phone is not None and phone not in PHONES:
            raise UsageError(f"unknown phone {phone!r}", hint=f"one of {', '.join(PHONES)}")
        self.threads = threads or 1
        self.io_layout = io_layout
        self.io_dtype = io_dtype
        if name is not None:
            self.name = name
        self.phone = PHONES.get(phone)
        if self.phone is None:
            self.device = host_device(cores=self.threads, blocked_layout=False)
        else:
            self.description = self.phone.description
            self.device = self.phone.device(self.threads)

    def with_threads(self, threads: int) -> "LiteRtTarget":
        return LiteRtTarget(threads, self.io_layout, self.name, self.io_dtype,
                            self._phone_name, self.allow_custom)

    def with_options(self, **values: str) -> "LiteRtTarget":
        super().with_options(**values)
        merged = {**self.option_values(), **values}
        return LiteRtTarget(self.threads, merged["io_layout"], self.name, merged["io_dtype"],
                            self._phone_name, merged["allow_custom"])

    @property
    def _phone_name(self) -> str | None:
        return None if self.phone is None else self.phone.name

    @property
    def untimed_note(self) -> str:
        if self.phone is None:
            return Target.untimed_note
        return f"the .tflite ran here in LiteRT on this machine's CPU to be verified, " \
               f"not on the {self.phone.name} device it is built for: no device timing"

    def option_values(self) -> dict[str, str]:
        return {"io_layout": self.io_layout, "io_dtype": self.io_dtype,
                "allow_custom": str(self.allow_custom).lower()}

    def availability(self) -> str | None:
        if importlib.util.find_spec("ai_edge_litert") is None:
            return f"the ai-edge-litert package is missing: {INSTALL_HINT}"
        return None

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "threads": self.threads,
                "ai_edge_litert": litert_runtime.litert_version()}

    def measure(self, artifact: Artifact, feeds: dict[str, np.ndarray], *,
                repeat: int = 20) -> float | None:
        """Seconds of a run here (``Target.measure``); ``None`` for a phone's file: this
        CPU's time says nothing about the phone's."""
        if self.phone is not None:
            return None
        return super().measure(artifact, feeds, repeat=repeat)

    def prepare(self, model: Model, input_shapes: dict[str, list[int]] | None) -> None:
        """``--input-shape`` fixes those inputs in the ``.tflite`` (and lets the pipeline
        fold the shape arithmetic); other symbolic dimensions are fixed at lowering."""
        bind_input_shapes(model, input_shapes)

    # ------------------------------------------------------------------ lowering
    def lower(self, model: Model, out: Path) -> Artifact:
        """Write the folder ``out`` atomically (staged beside it, then moved in); an op
        without a TFLite mapping is refused before anything is written."""
        out = folder_output(self.name, out, "model.tflite, manifest.json")
        missing = self.availability()
        if missing:
            raise UsageError(f"target {self.name!r} is not available here: {missing}")
        static, bound, per_sample = static_model(model)
        # a symbolic batch: lowered at 2 as well, to find what follows it (resizable);
        # other symbolic dimensions (a sequence) likewise, at twice their size
        at_2 = static_model(model, batch=2)[0] if per_sample else None
        others = len(bound) > (1 if per_sample else 0)  # symbolic besides the batch
        twice = static_model(model, sequence=2 * DEFAULT_SYMBOLIC_SIZE)[0] if others else None
        lowered = lower_graph(static, nhwc_io=self.io_layout == "nhwc",
                              int8_io=self.io_dtype == "int8", at_batch_2=at_2,
                              at_sequence_2=twice, symbols=_input_symbols(model),
                              allow_custom=self.allow_custom)
        del at_2, twice
        per_sample = per_sample and not lowered.resizable_batch
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=TEMP_PREFIX))
        try:
            (stage / MODEL_FILE).write_bytes(lowered.data)
            manifest = self._manifest(model, lowered, bound, per_sample, stage)
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            move_in(stage, out, [MODEL_FILE, MANIFEST], FORMAT)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return Artifact(target=self.name, path=out / MODEL_FILE,
                        files=[out / MODEL_FILE, out / MANIFEST], format="tflite")

    def _manifest(self, model: Model, lowered, bound: dict, per_sample: bool,
                  stage: Path) -> dict:
        from graphopt.api import graphopt_version

        return {
            "format": FORMAT,
            "target": self.name,
            "description": self.description,
            "artifact": MODEL_FILE,
            "artifact_format": "tflite",
            "inputs": lowered.inputs,
            "outputs": lowered.outputs,
            "io_layout": self.io_layout,
            "io_dtype": self.io_dtype,
            "precision": {"weights": lowered.weights, "compute": lowered.compute},
            "static_shapes": {
                "bound": bound,
                "per_sample_batch": per_sample,
                "resizable_batch": lowered.resizable_batch,
                **({"batch_static_because": lowered.static_reason}
                   if lowered.static_reason else {}),
                "resizable_sequence": lowered.resizable_sequence,
                **({"sequence_static_because": lowered.sequence_static_reason}
                   if lowered.sequence_static_reason else {}),
                "note": "symbolic dimensions were fixed at these sizes (--input-shape "
                        "fixes them explicitly)" +
                        ("; the batch is resizable (-1 in shape_signature)"
                         if lowered.resizable_batch else "") +
                        ("; the other symbolic dimensions are resizable (-1 in "
                         "shape_signature)" if lowered.resizable_sequence else "") +
                        ("; a larger batch runs one sample at a time" if per_sample else ""),
            },
            "operators": lowered.operators,
            "transposes": lowered.transposes,
            "builtin_only": not lowered.custom_ops,
            **({"custom_ops": lowered.custom_ops,
                "custom_note": "CUSTOM operators (custom codes: the ONNX op types; inputs "
                               "and outputs in the ONNX layout; attributes as a FlexBuffer "
                               "map): stock LiteRT does not run this file; the app "
                               "registers their kernels"} if lowered.custom_ops else {}),
            "graphopt_version": graphopt_version(),
            "model_content_hash": model.content_hash(),
            "files": [MODEL_FILE, MANIFEST],
            "sha256": {MODEL_FILE: sha256(stage / MODEL_FILE)},
            "toolchain": {"ai_edge_litert": litert_runtime.litert_version(),
                          "onnx": onnx.__version__,
                          "python": platform.python_version()},
        }

    # ------------------------------------------------------------------ running
    def run(self, artifact: Artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs of the ``.tflite`` in LiteRT's interpreter, named and laid out as
        the ONNX model's (NHWC artifacts get transposed feeds and outputs back)."""
        path = os.path.abspath(artifact.path)
        try:
            manifest, runner = litert_runtime.interpreter(path, os.stat(path).st_mtime_ns,
                                                          self.threads)
        except (ValueError, RuntimeError) as exc:  # the interpreter refuses the file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphoptError(f"LiteRT cannot load {path}: {first}") from exc
        inputs = {i["name"]: i for i in manifest["inputs"]}
        missing = set(inputs) - set(feeds)
        if missing:
            raise UsageError(f"no feed for input(s) {', '.join(sorted(missing))}")
        arrays = {}
        for name, spec in inputs.items():
            array = np.asarray(feeds[name])
            if spec["layout"] == "NHWC" and array.ndim == 4:
                array = array.transpose(0, 2, 3, 1)
            if "quantization" in spec:  # an int8 input: the codes of the float feed
                q = spec["quantization"]
                array = np.clip(np.round(array / q["scale"]) + q["zero_point"], -128, 127)
            arrays[name] = np.ascontiguousarray(array.astype(spec["dtype"], copy=False))
        chunks = litert_runtime.chunks(arrays, inputs,
                                       manifest["static_shapes"]["per_sample_batch"])
        results = [runner(chunk) for chunk in chunks]
        outputs = {}
        for spec in manifest["outputs"]:
            array = np.concatenate([r[spec["name"]] for r in results], axis=0) \
                if len(results) > 1 else results[0][spec["name"]]
            if spec["layout"] == "NHWC" and array.ndim == 4:
                array = array.transpose(0, 3, 1, 2)
            if "quantization" in spec:  # an int8 output: the real values of its codes
                q = spec["quantization"]
                array = ((array.astype(np.float32) - q["zero_point"]) *
                         np.float32(q["scale"])).astype(np.float32)
            outputs[spec["name"]] = array
        return outputs

    # The artifact check runs the .tflite and ONNX Runtime one after the other, never both
    # alive at once (``graphopt.artifact``): LiteRT's interpreter (XNNPACK packs its own
    # copy of the weights) and ONNX Runtime's sessions (prepacked weights when timed) each
    # hold about a model's weights, so side by side they needed ResNet-50's twice over.
    runtimes_apart = True

    def release(self, artifact: Artifact) -> None:
        """Free the interpreters ``run`` keeps for ``artifact`` (every thread count and
        file version): the artifact check calls it when it is done with LiteRT, before
        ONNX Runtime's session is made, so their weights are not in memory together."""
        path = os.path.abspath(artifact.path)
        for key in [k for k in litert_runtime.INTERPRETERS if k[0] == path]:
            del litert_runtime.INTERPRETERS[key]

    def int8_layer_costs(self, node) -> tuple[float, float] | None:
        """The layer alone in float and in int8, each lowered and timed in LiteRT here
        (``litert_layers``); ``None`` without LiteRT, where it cannot be built alone, or
        for a phone's file (its cost model decides)."""
        if self.availability() or self.phone is not None:
            return None
        from graphopt.targets.litert_layers import layer_costs

        return layer_costs(node, self.threads, self.fingerprint())

    def ran_on(self) -> str | None:
        return f"this machine's CPU in LiteRT {litert_runtime.litert_version()} (XNNPACK, " \
               f"{self.threads} thread{'s' if self.threads > 1 else ''})"


# ---------------------------------------------------------------------- static shapes
def static_model(model: Model, batch: int = 1, sequence: int = DEFAULT_SYMBOLIC_SIZE
                 ) -> tuple[onnx.ModelProto, dict[str, int], bool]:
    """A shape-inferred copy of ``model`` with every dimension fixed (a symbolic batch at
    ``batch``, any other symbolic dimension at ``sequence``), the erf/tanh GELU written as
    one ``Gelu`` (LiteRT has a builtin GELU but no Erf): ``(proto, the sizes symbolic
    dimensions were bound at, whether it has a symbolic batch: one that can be resized,
    or run one sample at a time)``."""
    work = model.clone()
    inputs = [t for t in work.graph.inputs if not isinstance(t, gs.Constant)]
    symbolic = {d for t in inputs for d in (t.shape or []) if isinstance(d, str)}
    batch_dim = _batch_dim(work, inputs)
    sizes = {d: batch if d == batch_dim else sequence for d in symbolic}
    shapes = {t.name: [sizes.get(d, d) if isinstance(d, str) else d for d in t.shape]
              for t in inputs if t.shape}
    for name, dims in shapes.items():
        if any(not isinstance(d, int) or d < 1 for d in dims):
            raise UsageError(f"input {name!r} has an unknown dimension: {dims}",
                             hint=f"fix it with --input-shape {name}=1x...")
    bind_input_shapes(work, shapes)
    # Weights in a data file (a spilled run, or a model loaded with external data) stay
    # references here: shape inference and the probe session never copy them, and the
    # lowering reads each through a memory map.
    proto = work.to_onnx(references=True)
    del proto.graph.value_info[:]
    proto = _complete_shapes(onnx.shape_inference.infer_shapes(proto, data_prop=True))
    work = Model.from_proto(proto)
    _fuse_gelu(work)
    proto = work.to_onnx(references=True)
    return proto, dict(sorted(sizes.items())), batch_dim is not None


def _complete_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Static shapes for the values ONNX's inference left open (it does not follow every
    exporter's shape arithmetic): measured by one ONNX Runtime run on zeros at the bound
    input shapes, with those values as extra outputs."""
    known = {v.name for v in proto.graph.value_info if _static(v)} | \
        {v.name for v in proto.graph.initializer} | {v.name for v in proto.graph.input}
    open_ = [o for node in proto.graph.node for o in node.output if o and o not in known]
    if not open_:
        return proto
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in open_)
    inits = {i.name for i in proto.graph.initializer}
    feeds = {}
    for v in proto.graph.input:
        if v.name not in inits:
            t = v.type.tensor_type
            feeds[v.name] = np.zeros([d.dim_value for d in t.shape.dim],
                                     onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    values = verify.session(probe).run(open_, feeds)  # rewrites off; references mapped
    measured = {n: v for n, v in zip(open_, values)}
    kept = [v for v in proto.graph.value_info if v.name not in measured]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    proto.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(
            np.asarray(v).dtype), np.shape(v)) for n, v in measured.items())
    return proto


def _static(value: onnx.ValueInfoProto) -> bool:
    t = value.type.tensor_type
    return bool(t.elem_type) and t.HasField("shape") and \
        all(d.HasField("dim_value") for d in t.shape.dim)


def _input_symbols(model: Model) -> dict[str, list[str | None]]:
    """Per graph input, the symbol of each dimension other than the batch (``None``
    for the batch and fixed sizes)."""
    inputs = [t for t in model.graph.inputs if not isinstance(t, gs.Constant)]
    batch = _batch_dim(model, inputs)
    return {t.name: [d if isinstance(d, str) and d and d != batch else None
                     for d in t.shape or []] for t in inputs}


def _batch_dim(model: Model, inputs) -> str | None:
    """The symbolic dimension leading every input and output and found nowhere else in
    them: a batch the ``.tflite`` can run one sample at a time."""
    tensors = [*inputs, *model.graph.outputs]
    if not tensors or any(not t.shape for t in tensors):
        return None
    first = tensors[0].shape[0]
    if not isinstance(first, str) or not first:
        return None
    for t in tensors:
        if t.shape[0] != first or first in list(t.shape[1:]):
            return None
    return first


def _fuse_gelu(model: Model) -> None:
    """0.5·x·(1 + erf(x/√2)) (and the tanh form) → one ``Gelu`` node, for the writer only
    (graphopt's ``fuse-gelu`` writes the standard op at opset 20 only)."""
    from graphopt.passes._patterns import Scope
    from graphopt.passes.fusion.gelu import match_gelu

    scope = Scope(model)
    for graph in scope.graphs:
        for node in list(graph.nodes):
            if node.op not in ("Erf", "Tanh") or node.domain not in ("", None, "ai.onnx") \
                    or not scope.alive(node):
                continue
            match = match_gelu(node, scope)
            if match:
                attrs = {"approximate": "tanh"} if match.approximate == "tanh" else {}
                scope.replace(match.nodes, "Gelu", [match.x], [match.output], attrs)


# The alias ``--target tflite``: the same target under LiteRT's former name.
TFLITE = LiteRtTarget(name="tflite")
# Phones: the same .tflite, built for their device (rows of ``PHONES``).
ANDROID_ARM64 = LiteRtTarget(name="android-arm64", phone="android-arm64")
