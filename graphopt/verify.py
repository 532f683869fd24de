"""Numerical verification: run models in ONNX Runtime and compare their outputs.

ONNX Runtime runs with its own graph optimizations off, so what is compared is the
semantics of the graphs graphopt wrote, not ORT's rewrites of them.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt import external_data
from graphopt.errors import ModelError, UsageError
from graphopt.ir import fits_in_protobuf

Feeds = dict[str, np.ndarray]

# Symbolic dimensions get this size in probe inputs: 2, not 1, so that a rewrite which
# breaks broadcasting over the batch shows up.
DEFAULT_SYMBOLIC_SIZE = 2


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass
class Comparison:
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def worst(self) -> OutputDiff | None:
        bad = [o for o in self.outputs if not o.ok]
        return bad[0] if bad else None

    def summary(self) -> dict:
        return {"ok": self.ok, "max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel,
                "outputs": [vars(o) for o in self.outputs]}


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-5


def input_specs(proto: onnx.ModelProto) -> list[tuple[str, np.dtype, list[int | str | None]]]:
    """(name, dtype, shape) of each real graph input (initializers excluded)."""
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in ttype.shape.dim] if ttype.HasField("shape") else None
        specs.append((value.name, dtype, shape))
    return specs


# Probe inputs are refused beyond this many elements per input (2**28: 1 GiB of float32,
# drawn as 2 GiB of float64), as a usage error naming the input, rather than an
# allocation that fails or swaps the machine to a halt.
MAX_PROBE_ELEMENTS = 2**28


class ProbeTooLarge(UsageError):
    """A probe input would be larger than ``MAX_PROBE_ELEMENTS``."""


def check_shapes(shapes: dict[str, list[int]] | None) -> None:
    """``--input-shape`` values: positive integer dimensions, at most
    ``MAX_PROBE_ELEMENTS`` elements."""
    for name, dims in (shapes or {}).items():
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
               for d in dims):
            raise UsageError(f"--input-shape {name}={'x'.join(map(str, dims))}: dimensions "
                             f"must be positive integers", hint=f"e.g. {name}=1x3x224x224")
        _check_size(name, [int(d) for d in dims])


def _check_size(name: str, dims: list[int]) -> None:
    if math.prod(dims) > MAX_PROBE_ELEMENTS:
        shape = "x".join(map(str, dims))
        raise ProbeTooLarge(f"input {name!r} of shape {shape} has {math.prod(dims):,} "
                            f"elements, more than probe inputs may have "
                            f"({MAX_PROBE_ELEMENTS:,})",
                            hint=f"give a smaller --input-shape {name}=..., or real inputs "
                                 f"with --data")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}",
                         hint="e.g. --seed 0")


def probe_inputs(proto: onnx.ModelProto, count: int = 1, seed: int = 0,
                 shapes: dict[str, list[int]] | None = None,
                 symbolic_size: int = DEFAULT_SYMBOLIC_SIZE) -> list[Feeds]:
    """Random inputs that fit the model: normal floats, small non-negative integers
    (valid as indices and masks), random booleans. Each symbolic dimension name gets one
    size across all inputs; ``shapes`` fixes an input's shape explicitly. An input of
    more than ``MAX_PROBE_ELEMENTS`` elements is a ``ProbeTooLarge`` (usage) error."""
    check_seed(seed)
    check_shapes(shapes)
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    specs = input_specs(proto)
    for name in shapes:
        if name not in {s[0] for s in specs}:
            valid = ", ".join(s[0] for s in specs)
            raise UsageError(f"--input-shape names {name!r}, which is not a model input",
                             hint=f"inputs: {valid}")
    batches = []
    for _ in range(count):
        feeds = {}
        for name, dtype, shape in specs:
            if name in shapes:
                dims = list(shapes[name])
            elif shape is None:
                raise UsageError(f"input {name!r} has no shape",
                                 hint=f"give one with --input-shape {name}=1x3x224x224")
            else:
                # A static 0 is a dimension of size 0 (ORT holds the model to it).
                dims = [d if isinstance(d, int) and d >= 0 else symbolic_size for d in shape]
            _check_size(name, dims)
            feeds[name] = random_array(rng, dtype, dims)
        batches.append(feeds)
    return batches


def random_array(rng: np.random.Generator, dtype: np.dtype, dims: list[int]) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.asarray(rng.random(dims) < 0.5)  # a 0-d comparison gives a scalar
    if np.issubdtype(dtype, np.integer):
        # 0s and 1s are valid indices and masks; a leading 1 on the last axis keeps a
        # mask from blanking a whole row (which would make every model look equal).
        values = rng.integers(0, 2, size=dims).astype(dtype)
        if values.ndim:
            values[..., 0] = 1
        return values
    if np.issubdtype(dtype, np.floating):  # (drawn in float32: half the time of float64)
        return rng.standard_normal(dims, dtype=np.float32).astype(dtype, copy=False)
    raise UsageError(f"cannot make probe data of type {dtype}",
                     hint="pass real inputs with --data")


def session(proto: onnx.ModelProto | Serialized | str | os.PathLike, optimize: bool = False,
            threads: int = 1, disabled_optimizers: tuple[str, ...] = (),
            profile_prefix: str | None = None) -> ort.InferenceSession:
    """An ORT CPU session; ``optimize=False`` turns ORT's graph rewrites off,
    ``disabled_optimizers`` names ORT rewrites to leave out.

    Weights a proto references in their external-data file (``graphopt.external_data``)
    are memory-mapped by ORT from there and read as the model runs. Sessions that check
    numbers (``optimize=False``) never prepack weights: a packed copy would double a
    large model's weights in memory, and packing changes float results (~1e-6), so a
    model and its copy must be run alike whatever form their weights take."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: fairer timings on a shared machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix is not None:  # ORT's profiler: a JSON trace at end_profiling()
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    kwargs = {"providers": ["CPUExecutionProvider"]}
    if disabled_optimizers:
        kwargs["disabled_optimizers"] = list(disabled_optimizers)
    if isinstance(proto, onnx.ModelProto):
        proto = serialized(proto)
    if not isinstance(proto, Serialized):
        return ort.InferenceSession(str(proto), options, **kwargs)
    if proto.path is not None:
        return ort.InferenceSession(str(proto.path), options, **kwargs)
    if proto.folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", proto.folder)
    return ort.InferenceSession(proto.data, options, **kwargs)


@dataclass
class Serialized:
    """A model in the form an ORT session loads: its bytes and the folder their external
    data references are relative to, or (a model over 2 GB) a file saved with external
    data in a temporary folder that lives as long as this object."""

    data: bytes = b""
    folder: str | None = None
    path: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = None


def serialized(proto: onnx.ModelProto) -> Serialized:
    """``proto`` ready for ``session`` (which may then run in another thread: ``proto``
    is not touched again)."""
    if fits_in_protobuf(proto):
        return Serialized(*external_data.runtime_model(proto))
    from graphopt.ir import save

    tmp = tempfile.TemporaryDirectory()  # ORT reads external data while loading
    return Serialized(path=save(proto, Path(tmp.name) / "model.onnx", external_data=True),
                      _tmp=tmp)


def run(model: onnx.ModelProto | ort.InferenceSession, feeds: Feeds) -> Feeds:
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = [o.name for o in sess.get_outputs()]
    # Initializers listed as inputs are overridable: ORT lists them apart from inputs.
    accepted = {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    values = sess.run(names, {k: v for k, v in feeds.items() if k in accepted})
    return dict(zip(names, values))


def compare(reference: Feeds, candidate: Feeds, tol: Tolerance = Tolerance()) -> Comparison:
    """Compare two sets of outputs by name: shapes, dtypes and values within tolerance."""
    result = Comparison()
    for name, ref in reference.items():
        if name not in candidate:
            result.outputs.append(OutputDiff(name, np.inf, np.inf, False, "output missing"))
            continue
        got = np.asarray(candidate[name])
        ref = np.asarray(ref)
        if ref.shape != got.shape:
            result.outputs.append(OutputDiff(name, np.inf, np.inf, False,
                                             f"shape {got.shape} != {ref.shape}"))
            continue
        if ref.dtype != got.dtype:
            result.outputs.append(OutputDiff(name, np.inf, np.inf, False,
                                             f"dtype {got.dtype} != {ref.dtype}"))
            continue
        if ref.size == 0:
            result.outputs.append(OutputDiff(name, 0.0, 0.0, True))
            continue
        if not (np.issubdtype(ref.dtype, np.number) or ref.dtype == np.bool_):
            same = bool(np.array_equal(ref, got))
            result.outputs.append(OutputDiff(name, 0.0 if same else np.inf,
                                             0.0 if same else np.inf, same))
            continue
        r = ref.astype(np.float64)
        g = got.astype(np.float64)
        same = (r == g) | (np.isnan(r) & np.isnan(g))  # equal infinities and NaNs match
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(r - g))
        diff = np.where(np.isnan(diff), np.inf, diff)
        max_abs = float(diff.max())
        with np.errstate(invalid="ignore", divide="ignore"):
            max_rel = float(np.nan_to_num(diff / np.maximum(np.abs(r), 1e-12), nan=0.0).max())
        if np.issubdtype(ref.dtype, np.floating):
            ok = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(np.nan_to_num(r))))
        else:
            ok = max_abs == 0.0
        result.outputs.append(OutputDiff(name, max_abs, max_rel, ok))
    return result


def load_feeds(path: str | os.PathLike) -> list[Feeds]:
    """Inputs from an ``.npz`` whose arrays are named like the model inputs (one batch)."""
    hint = "give an .npz with one array per model input (numpy.savez)"
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, BadZipFile, EOFError, ...
        raise UsageError(f"{path}: cannot read input data ({_first_line(exc)})",
                         hint=hint) from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UsageError(f"{path}: an .npz file is expected, this is a single .npy array",
                         hint=hint)
    try:
        with data:
            feeds = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - a damaged member
        raise UsageError(f"{path}: cannot read input data ({_first_line(exc)})",
                         hint=hint) from exc
    if not feeds:
        raise UsageError(f"{path}: holds no arrays", hint=hint)
    return [feeds]


# Op domains ONNX Runtime implements; a model with ops of another domain (custom ops) may
# need a library ORT has not loaded here, so failing to run it says nothing about it.
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                         "ai.onnx.preview.training", "ai.onnx.training",
                         "com.ms.internal.nhwc", "com.microsoft.experimental"})


def check_runs(proto: onnx.ModelProto, feeds: list[Feeds] | None, *, data_given: bool,
               shapes: dict[str, list[int]] | None = None) -> None:
    """Explain why ONNX Runtime could not run ``proto`` (the checks found it could not):
    ``ModelError`` when it cannot load the model, or cannot run it on inputs of the
    shapes the model declares; ``UsageError`` when it fails on the ``--data`` given or on
    probe inputs whose symbolic dimensions were guessed. A model with ops of a domain ORT
    does not implement (custom ops) is not judged, nor one ORT runs."""
    local = {f.domain for f in proto.functions}
    if any(n.domain not in ORT_DOMAINS and n.domain not in local
           for g in _graphs(proto.graph) for n in g.node):
        return
    try:
        sess = session(proto)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ModelError(f"ONNX Runtime cannot load the model: {_ort_message(exc)}",
                         hint="the model is invalid (types or shapes that do not fit "
                              "its ops?)") from exc
    if not feeds:
        return
    try:
        for f in feeds:
            run(sess, f)
    except Exception as exc:  # noqa: BLE001
        why = _ort_message(exc)
        if data_given:
            raise UsageError(f"ONNX Runtime cannot run the model on --data: {why}",
                             hint="give inputs the model takes") from exc
        guessed = [name for name, _, shape in input_specs(proto)
                   if name not in (shapes or {}) and
                   any(not isinstance(d, int) or d < 0 for d in shape or [])]
        if guessed:
            raise UsageError(f"ONNX Runtime cannot run the model on probe inputs whose "
                             f"symbolic dimensions are {DEFAULT_SYMBOLIC_SIZE}: {why}",
                             hint=f"give real inputs with --data, or shapes with "
                                  f"--input-shape {guessed[0]}=...") from exc
        raise ModelError(f"ONNX Runtime cannot run the model on inputs of the shapes it "
                         f"declares: {why}", hint="the model is invalid") from exc


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _ort_message(exc: BaseException) -> str:
    """ORT's message without its ``[ONNXRuntimeError] : 1 : FAIL :`` prefix."""
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", _first_line(exc))


def check_runtime(proto: onnx.ModelProto) -> None:
    """Raise ``ModelError`` when ONNX Runtime refuses the model's IR version or an opset
    it imports (a newer one than this ONNX Runtime knows): it could not run the model."""
    imports = tuple(sorted((o.domain, o.version) for o in proto.opset_import))
    problem = _runtime_refuses(imports, proto.ir_version)
    if problem:
        raise ModelError(f"ONNX Runtime {ort.__version__} cannot run this model: {problem}",
                         hint="export the model with an older opset, or upgrade "
                              "onnxruntime")


@functools.lru_cache(maxsize=64)
def _runtime_refuses(imports: tuple[tuple[str, int], ...], ir_version: int) -> str | None:
    """Why ORT refuses a model of these opset imports and IR version (``None``: it
    accepts them), found by loading an empty model that has them."""
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    probe = onnx.helper.make_model(
        onnx.helper.make_graph([], "opset-probe", [value], [value]),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in imports])
    probe.ir_version = ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(probe.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        text = str(exc)
        found = re.search(r"Opset (\d+) is under development.*?Current official support "
                          r"for domain (\S+) is till opset (\d+)", text, re.S)
        if found:
            return f"it imports {found[2]} opset {found[1]}, newer than the opset " \
                   f"{found[3]} it supports"
        found = re.search(r"Unsupported model IR version: \d+, max supported IR version: "
                          r"\d+", text)
        return found[0] if found else _first_line(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
