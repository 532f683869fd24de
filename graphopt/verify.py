"""Numerical verification: run models in ONNX Runtime and compare their outputs.

ONNX Runtime runs with its own graph optimizations off, so what is compared is the
semantics of the graphs graphopt wrote, not ORT's rewrites of them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.errors import UsageError
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


def probe_inputs(proto: onnx.ModelProto, count: int = 1, seed: int = 0,
                 shapes: dict[str, list[int]] | None = None,
                 symbolic_size: int = DEFAULT_SYMBOLIC_SIZE) -> list[Feeds]:
    """Random inputs that fit the model: normal floats, small non-negative integers
    (valid as indices and masks), random booleans. Each symbolic dimension name gets one
    size across all inputs; ``shapes`` fixes an input's shape explicitly."""
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
                dims = [d if isinstance(d, int) and d > 0 else symbolic_size for d in shape]
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
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(dims).astype(dtype)
    raise UsageError(f"cannot make probe data of type {dtype}",
                     hint="pass real inputs with --data")


def session(proto: onnx.ModelProto | str | os.PathLike, optimize: bool = False,
            threads: int = 1, disabled_optimizers: tuple[str, ...] = ()
            ) -> ort.InferenceSession:
    """An ORT CPU session; ``optimize=False`` turns ORT's graph rewrites off,
    ``disabled_optimizers`` names ORT rewrites to leave out."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: fairer timings on a shared machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    kwargs = {"providers": ["CPUExecutionProvider"]}
    if disabled_optimizers:
        kwargs["disabled_optimizers"] = list(disabled_optimizers)
    if not isinstance(proto, onnx.ModelProto):
        return ort.InferenceSession(str(proto), options, **kwargs)
    if fits_in_protobuf(proto):
        return ort.InferenceSession(proto.SerializeToString(), options, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:  # ORT reads external data while loading
        path = Path(tmp) / "model.onnx"
        onnx.save_model(proto, path, save_as_external_data=True, location="model.data")
        return ort.InferenceSession(str(path), options, **kwargs)


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
    try:
        with np.load(path, allow_pickle=False) as data:
            return [{k: data[k] for k in data.files}]
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read input data ({exc})",
                         hint="give an .npz with one array per model input") from exc
