"""float16 conversion (``convert-fp16``): weights and compute in float16, the model's
interface in float32.

What changes, in one forward walk over the nodes (subgraphs included, in order):

* Each node that computes on float32 is *converted* (its float32 type variables become
  float16: inputs, outputs, and the attributes that set an output type, ``Cast.to`` and
  ``ConstantOfShape.value``) unless it must stay float32:

  - its op is in ``fp32_ops`` (numerically sensitive: exponentials, powers, square roots,
    reductions over long axes, normalizations, softmax, coordinate arithmetic; see
    ``DEFAULT_FP32_OPS``), or its name matches ``exclude``;
  - it computes shapes: its non-constant inputs all derive from ``Shape``/``Size``
    (float16 holds integers exactly only up to 2048);
  - it belongs to an int8 QDQ group: a Quantize/DequantizeLinear, or an op that reads
    a DequantizeLinear or feeds a QuantizeLinear (the runtime fuses the group into an
    int8 kernel; a Cast inside would stop that);
  - the op schema (ONNX's, or ONNX Runtime's for ``com.microsoft``) does not allow
    float16 there, the op is random, or it has subgraphs (If/Loop/Scan keep their
    interface; their bodies are converted like the main graph).

  Pure data-movement ops (Reshape, Transpose, Gather, Concat, ...) follow their data
  input: float16 when it is, float32 otherwise, so an fp32 island does not grow casts
  around every reshape.
* Where a tensor's type differs from what a reader wants, one ``Cast`` per tensor, type
  and graph is inserted (in the reader's graph: a subgraph reading an outer tensor casts
  it inside). Constants are converted instead (clipped to ±65504, float16's largest
  finite value, so ``finfo(float32).min`` masks stay finite); an initializer read both
  in float16 and float32 is kept in both types. Integer tensors never change.
* Every graph keeps its inputs and outputs float32 (``keep_io``): a Cast after each
  float32 input and before each output. ``keep_io=false`` makes the main graph's float
  inputs and outputs float16.
* Finally Cast pairs that cancel (float16 → float32 → float16, or float32 → float16 →
  float32 where the pair only rounds) and Casts to the type a tensor already has are
  removed, with whatever they leave unused.

Run again, the pass finds nothing left in float32 that it would convert.
"""

from __future__ import annotations

import fnmatch
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.rewrite import constant_value, consumers, remove_dead, tensor_names, unique_name
from graphopt.passes._patterns import dtype_of

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
FLOAT16_MAX = float(np.finfo(np.float16).max)

DEFAULT_FP32_OPS = (
    # overflow in float16 (exp(11) > 65504, x^2 for |x| > 256) or lose the small values
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf", "Softmax", "LogSoftmax",
    # accumulate over long axes
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "CumSum",
    # normalizations (statistics over the hidden size)
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupNormalization",
    "InstanceNormalization", "LpNormalization", "MeanVarianceNormalization",
    # coordinates and index arithmetic
    "Range", "Resize", "Upsample", "RoiAlign", "NonMaxSuppression", "GridSample",
)
# Ops that only move, select or copy values: they take the type of their data input.
FOLLOWERS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice",
    "Gather", "GatherElements", "GatherND", "Concat", "Split", "Expand", "Tile",
    "DepthToSpace", "SpaceToDepth", "ReverseSequence", "Compress", "ScatterND",
    "ScatterElements", "Pad", "MaxPool", "ReduceMax", "ReduceMin", "Max", "Min",
    "TopK", "Trilu", "Where",
})
# Ops whose float output type an attribute sets (random values, EyeLike's dtype).
ATTRIBUTE_TYPED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                             "RandomUniformLike", "Multinomial", "Bernoulli", "EyeLike"})
SHAPE_SOURCES = frozenset({"Shape", "Size"})
# int8 QDQ groups (DequantizeLinear -> op -> QuantizeLinear) stay float32 as they are:
# the runtime fuses them into int8 kernels, which a Cast in between would prevent.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_ONNX_TYPE = {F32: onnx.TensorProto.FLOAT, F16: onnx.TensorProto.FLOAT16}
_PRECISION = {np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.float64): 3}


# ---------------------------------------------------------------------- schemas
@dataclass(frozen=True)
class Signature:
    """Formal input/output type strings and each type variable's allowed types."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variadic_input: bool
    variadic_output: bool
    allowed: dict

    def input_type(self, index: int) -> str | None:
        if index < len(self.inputs):
            return self.inputs[index]
        return self.inputs[-1] if self.variadic_input and self.inputs else None

    def output_type(self, index: int) -> str | None:
        if index < len(self.outputs):
            return self.outputs[index]
        return self.outputs[-1] if self.variadic_output and self.outputs else None


def _signature_of(schema, type_attr: str) -> Signature:
    def variadic(params) -> bool:
        return bool(params) and "Variadic" in str(params[-1].option)

    return Signature(tuple(getattr(p, type_attr) for p in schema.inputs),
                     tuple(getattr(p, type_attr) for p in schema.outputs),
                     variadic(schema.inputs), variadic(schema.outputs),
                     {c.type_param_str: frozenset(c.allowed_type_strs)
                      for c in schema.type_constraints})


@functools.lru_cache(maxsize=None)
def _ort_schemas() -> dict:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        schemas: dict = {}
        for s in C.get_all_operator_schema():
            schemas.setdefault((s.domain, s.name), []).append(s)
        return schemas
    except Exception:  # an ONNX Runtime build without schema access
        return {}


@functools.lru_cache(maxsize=None)
def signature(op: str, domain: str, version: int) -> Signature | None:
    """The op's signature at ``version`` of its domain, or None when unknown."""
    if domain in ("", "ai.onnx"):
        try:
            return _signature_of(onnx.defs.get_schema(op, version, ""), "type_str")
        except onnx.defs.SchemaError:
            return None
    candidates = [s for s in _ort_schemas().get((domain, op), [])
                  if s.since_version <= version]
    if not candidates:
        return None
    return _signature_of(max(candidates, key=lambda s: s.since_version), "typeStr")


# ---------------------------------------------------------------------- the pass

def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    found = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def _ordered(graph: gs.Graph) -> Iterator[tuple[gs.Graph, gs.Node]]:
    """(graph, node) in topological order; a node's subgraphs right after it."""
    for node in list(graph.nodes):
        yield graph, node
        for sub in _subgraphs(node):
            yield from _ordered(sub)


def to_float16(value: np.ndarray) -> np.ndarray:
    """``value`` in float16, finite values clipped to float16's range."""
    value = np.asarray(value)
    finite = np.isfinite(value)
    clipped = np.where(finite, np.clip(value, -FLOAT16_MAX, FLOAT16_MAX), value)
    return clipped.astype(np.float16)


class _Converter:
    """One run of the conversion over a model."""

    def __init__(self, model: Model, options):
        self.model = model
        self.options = options
        self.fp32_ops = frozenset(options.fp32_ops)
        self.graphs = list(model.all_graphs())
        self.names = tensor_names(self.graphs)
        self.node_names = {n.name for g in self.graphs for n in g.nodes if n.name}
        self.original: dict[int, np.dtype | None] = {}  # tensor id -> dtype before
        self.current: dict[int, np.dtype | None] = {}   # tensor id -> dtype now
        self.tainted: set[int] = set()
        self.casts: dict[tuple, gs.Tensor] = {}
        self.constants: dict[tuple, gs.Tensor] = {}
        self.graph_outputs = {id(t) for g in self.graphs for t in g.outputs}
        self.stats: Counter = Counter()
        self.kept: Counter = Counter()
        self.owner = {id(n): g for g in self.graphs for n in g.nodes}
        self.replaced: list[gs.Node] = []  # Constant nodes whose value was copied
        for graph in self.graphs:
            for tensor in graph.tensors().values():
                self.original[id(tensor)] = dtype_of(tensor)
                self.current[id(tensor)] = dtype_of(tensor)

    # ------------------------------------------------------------------ walk
    def run(self) -> None:
        main = self.model.graph
        main.toposort(recurse_subgraphs=True)
        if not self.options.keep_io:
            for tensor in main.inputs:
                if self.current.get(id(tensor)) == F32:
                    tensor.dtype = np.float16
                    self.current[id(tensor)] = F16
                    self.stats["interface_tensors"] += 1
        for graph, node in _ordered(main):
            self._visit(graph, node)
        for graph in self.graphs:
            self._restore_outputs(graph, graph is main and not self.options.keep_io)

    def _visit(self, graph: gs.Graph, node: gs.Node) -> None:
        inputs = [t for t in node.inputs if not t.is_empty()]
        tainted = self._taint(node, inputs)
        if node.op == "Constant":
            return
        relevant = any(self.original.get(id(t)) == F32 for t in [*inputs, *node.outputs])
        if not relevant:
            self._retype_inputs(graph, node, None, set())
            return
        sig = self._signature(node)
        convertible = self._convertible(node, sig) if sig is not None else set()
        if node.op == "Cast" and not self._casts_to_float16(node, tainted):
            self._retype_inputs(graph, node, sig, set())  # any input type does
            return
        reason = self._keep_reason(node, sig, convertible, tainted, inputs)
        if reason is None and node.op in FOLLOWERS and not self._follows_float16(node, sig,
                                                                                 convertible):
            reason = "follows a float32 input"
        if reason is not None:
            self.kept[reason] += 1
            self._retype_inputs(graph, node, sig, set())
            return
        changed = self._retype_inputs(graph, node, sig, convertible)
        if self._retype_outputs(node, sig, convertible) or changed:
            self.stats["converted_nodes"] += 1

    def _signature(self, node: gs.Node) -> Signature | None:
        domain = "" if (node.domain or "") in ("", "ai.onnx") else node.domain
        version = self.model.opset_imports.get(domain)
        if version is None:
            return None
        return signature(node.op, domain, version)

    def _taint(self, node: gs.Node, inputs: list[gs.Tensor]) -> bool:
        """Whether ``node`` computes shapes (marks its outputs so)."""
        if node.op in SHAPE_SOURCES:
            tainted = True
        else:
            variable = [t for t in inputs if constant_value(t) is None]
            tainted = bool(variable) and all(id(t) in self.tainted for t in variable)
        if tainted:
            self.tainted.update(id(t) for t in node.outputs)
        return tainted

    def _convertible(self, node: gs.Node, sig: Signature) -> set[str]:
        """Type variables bound to float32 that allow float16 and are set by an input
        (a variable only outputs bind is set by attributes: left alone)."""
        bound: dict[str, set] = {}
        from_inputs: set[str] = set()
        for i, tensor in enumerate(node.inputs):
            kind = sig.input_type(i)
            if tensor.is_empty() or kind not in sig.allowed:
                continue
            from_inputs.add(kind)
            dtype = self.original.get(id(tensor))
            if dtype is not None:
                bound.setdefault(kind, set()).add(dtype)
        for i, tensor in enumerate(node.outputs):
            kind = sig.output_type(i)
            dtype = self.original.get(id(tensor))
            if kind in sig.allowed and dtype is not None:
                bound.setdefault(kind, set()).add(dtype)
        return {kind for kind, types in bound.items()
                if types == {F32} and "tensor(float16)" in sig.allowed[kind]
                and (kind in from_inputs or node.op in ("Cast", "ConstantOfShape"))}

    def _keep_reason(self, node: gs.Node, sig: Signature | None, convertible: set[str],
                     tainted: bool, inputs: list[gs.Tensor]) -> str | None:
        if _subgraphs(node):
            return "has subgraphs"
        if node.op in QDQ_OPS or any(p.op == "DequantizeLinear" for t in inputs
                                     for p in t.inputs) or \
                any(r.op in QDQ_OPS for t in node.outputs for r in consumers(t)):
            return "in an int8 QDQ group"
        if node.op in self.fp32_ops or f"{node.domain}:{node.op}" in self.fp32_ops:
            return f"{node.op} is in fp32_ops"
        if node.name and any(fnmatch.fnmatchcase(node.name, p) for p in self.options.exclude):
            return "excluded"
        if tainted:
            return "computes shapes"
        if node.op in ATTRIBUTE_TYPED:
            return f"{node.op} sets its type by attribute"
        if sig is None:
            return f"no schema for {node.domain or 'ai.onnx'}::{node.op}"
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            if not isinstance(value, gs.Constant) or np.asarray(value.values).dtype != F32:
                return "ConstantOfShape of another type"
            return None
        if not convertible:
            return "no float16 variant"
        return None

    def _casts_to_float16(self, node: gs.Node, tainted: bool) -> bool:
        """Whether a Cast to float32 should now cast to float16: it is no shape
        arithmetic, writes no graph output and feeds some op that is not kept float32."""
        if node.attrs.get("to") != onnx.TensorProto.FLOAT or tainted or \
                node.name and any(fnmatch.fnmatchcase(node.name, p) for p in self.options.exclude):
            return False
        out = node.outputs[0]
        readers = consumers(out)
        return id(out) not in self.graph_outputs and bool(readers) and \
            not all(r.op in self.fp32_ops for r in readers)

    def _follows_float16(self, node: gs.Node, sig: Signature, convertible: set[str]) -> bool:
        data = [t for i, t in enumerate(node.inputs)
                if not t.is_empty() and sig.input_type(i) in convertible]
        variable = [t for t in data if constant_value(t) is None]
        return not variable or any(self.current.get(id(t)) == F16 for t in variable)

    # ------------------------------------------------------------------ retyping
    def _retype_inputs(self, graph: gs.Graph, node: gs.Node, sig: Signature | None,
                       convertible: set[str]) -> bool:
        """Give each input the type the node now wants (Cast or converted constant);
        returns whether any input changed."""
        wanted: dict[int, np.dtype] = {}
        groups: dict[str, list[int]] = {}
        for i, tensor in enumerate(node.inputs):
            if tensor.is_empty():
                continue
            kind = sig.input_type(i) if sig is not None else None
            if kind is not None and kind in sig.allowed:
                groups.setdefault(kind, []).append(i)
            elif self.original.get(id(tensor)) is not None:
                wanted[i] = self.original[id(tensor)]  # a fixed type: as it was
        for kind, indices in groups.items():
            outputs_bind = any(sig.output_type(j) == kind for j in range(len(node.outputs)))
            variable = {self.current.get(id(node.inputs[i])) for i in indices
                        if constant_value(node.inputs[i]) is None}
            if not outputs_bind:
                # Only inputs bind it (BatchNormalization's statistics, Equal, IsNaN): a
                # computed input keeps the type it has when the others can follow it;
                # constants follow (float16 when all are constants).
                if len(variable) > 1:
                    target = F16 if kind in convertible else None
                elif kind in convertible:
                    target = variable.pop() if variable else F16
                else:
                    continue
            else:
                target = F16 if kind in convertible else None
            for i in indices:
                original = self.original.get(id(node.inputs[i]))
                if target is not None:
                    wanted[i] = target
                elif original is not None:
                    wanted[i] = original
        changed = False
        for i, dtype in wanted.items():
            tensor = node.inputs[i]
            now = self.current.get(id(tensor))
            if dtype not in (F16, F32) or now == dtype or \
                    (now is not None and now not in (F16, F32)):
                continue
            node.inputs[i] = self._as_type(tensor, dtype, graph)
            changed = True
        return changed

    def _retype_outputs(self, node: gs.Node, sig: Signature, convertible: set[str]) -> bool:
        """Make the outputs bound to converted type variables float16 (and the
        attributes that set an output type); returns whether any output changed."""
        changed = False
        for i, tensor in enumerate(node.outputs):
            if sig.output_type(i) in convertible and self.current.get(id(tensor)) != F16:
                tensor.dtype = np.float16
                self.current[id(tensor)] = F16
                changed = True
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
            node.outputs[0].dtype = np.float16
            self.current[id(node.outputs[0])] = F16
            changed = True
        elif node.op == "ConstantOfShape":
            value = node.attrs["value"]
            node.attrs["value"] = gs.Constant(value.name, to_float16(value.values))
            node.outputs[0].dtype = np.float16
            self.current[id(node.outputs[0])] = F16
            changed = True
        return changed

    def _as_type(self, tensor: gs.Tensor, dtype: np.dtype, graph: gs.Graph) -> gs.Tensor:
        """``tensor`` converted to ``dtype``: a converted constant or a (shared) Cast."""
        value = constant_value(tensor)
        if value is not None and value.dtype in (F16, F32):
            key = (id(tensor), dtype.str)
            if key not in self.constants:
                converted = to_float16(value) if dtype == F16 else value.astype(dtype)
                const = gs.Constant(unique_name(self.names, f"{tensor.name}_{_suffix(dtype)}"),
                                    np.array(converted, order="C"))
                self.constants[key] = const
                self.current[id(const)] = dtype
                self.original[id(const)] = dtype
                self.stats["constants_converted"] += 1
                if tensor.inputs:
                    self.replaced.append(tensor.inputs[0])
            return self.constants[key]
        key = (id(tensor), dtype.str, id(graph))
        if key not in self.casts:
            out = gs.Variable(unique_name(self.names, f"{tensor.name}_{_suffix(dtype)}"),
                              dtype=dtype, shape=tensor.shape)
            graph.nodes.append(self._cast_node(tensor, out, dtype))
            self.casts[key] = out
            self.current[id(out)] = dtype
            self.original[id(out)] = dtype
        return self.casts[key]

    def _cast_node(self, src: gs.Tensor, dst: gs.Tensor, dtype: np.dtype) -> gs.Node:
        self.stats["casts_inserted"] += 1
        name = unique_name(self.node_names, f"{src.name}_to_{_suffix(dtype)}")
        return gs.Node("Cast", name=name, attrs={"to": _ONNX_TYPE[dtype]}, inputs=[src],
                       outputs=[dst])

    def _restore_outputs(self, graph: gs.Graph, float16_io: bool) -> None:
        """Each graph output back in its original type, or in float16 when
        ``float16_io`` (one Cast, the output name kept)."""
        for index, tensor in enumerate(list(graph.outputs)):
            original, now = self.original.get(id(tensor)), self.current.get(id(tensor))
            if original != F32 or now not in (F16, F32):
                continue
            target = F16 if float16_io else F32
            if float16_io:
                self.stats["interface_tensors"] += 1
            if now == target:
                continue
            name = tensor.name
            tensor.name = unique_name(self.names, f"{name}_{_suffix(now)}")
            restored = gs.Variable(name, dtype=target, shape=tensor.shape)
            graph.nodes.append(self._cast_node(tensor, restored, target))
            graph.outputs[index] = restored
            self.current[id(restored)] = self.original[id(restored)] = target

    def remove_replaced_constants(self) -> None:
        by_graph: dict[int, list[gs.Node]] = {}
        for node in self.replaced:
            graph = self.owner.get(id(node))
            if graph is not None:
                by_graph.setdefault(id(graph), []).append(node)
        for graph in self.graphs:
            if id(graph) in by_graph:
                remove_dead(by_graph[id(graph)], graph)

    # ------------------------------------------------------------------ cleanup
    def remove_redundant_casts(self) -> None:
        """Drop Casts to the type their input has and Cast pairs that cancel out."""
        for graph in self.graphs:
            dropped = []
            for node in list(graph.nodes):
                if node.op != "Cast" or not node.inputs or not node.outputs:
                    continue
                out = node.outputs[0]
                if id(out) in self.graph_outputs or any(out is t for t in graph.outputs):
                    continue
                to = _numpy_type(node.attrs.get("to"))
                src = node.inputs[0]
                replacement = None
                if to is not None and dtype_of(src) == to:
                    replacement = src
                elif src.inputs and src.inputs[0].op == "Cast" and src.inputs[0].inputs:
                    origin = src.inputs[0].inputs[0]
                    if dtype_of(origin) == to and to in _PRECISION and \
                            dtype_of(src) in _PRECISION:
                        replacement = origin
                if replacement is None:
                    continue
                for reader in consumers(out):
                    for i, t in enumerate(reader.inputs):
                        if t is out:
                            reader.inputs[i] = replacement
                self.stats["casts_removed"] += 1
                dropped.append(node)
            if dropped:
                remove_dead(dropped, graph)


def _suffix(dtype: np.dtype) -> str:
    return "fp16" if dtype == F16 else "fp32"


def _numpy_type(onnx_type) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(onnx_type)))
    except (TypeError, ValueError, KeyError):
        return None


def _weight_bytes(model: Model) -> int:
    return sum(int(np.asarray(t.values).nbytes) for t in model.initializers()
               if np.asarray(t.values).dtype in (F16, F32))


class ConvertFloat16(Pass):
    """Convert float32 weights and compute to float16, keeping float32 inputs/outputs."""

    name = "convert-fp16"
    scheme = ("quantize", "fp16")
    scheme_order = 90  # after pruning and low-rank: quantize what is left
    family = "quantization"
    lossless = False
    emits = (("", "Cast"),)

    @dataclass(frozen=True)
    class Options:
        fp32_ops: tuple[str, ...] = DEFAULT_FP32_OPS  # ops kept in float32 ("Op" or "domain:Op")
        exclude: tuple[str, ...] = ()                 # node names kept (fnmatch patterns)
        keep_io: bool = True                          # graph inputs/outputs stay float32

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = _weight_bytes(model)
        converter = _Converter(model, self.options)
        converter.run()
        converter.remove_redundant_casts()
        converter.remove_replaced_constants()
        stats = dict(converter.stats)
        changed = bool(stats.get("converted_nodes") or stats.get("casts_inserted"))
        stats.update(weight_bytes_before=before, weight_bytes_after=_weight_bytes(model))
        if converter.kept:
            stats["kept_float32"] = dict(converter.kept)
        return PassResult(changed=changed, stats=stats)
