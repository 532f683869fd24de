"""``finetune``: recovery by knowledge distillation, and quantization-aware training, on
the compressed ONNX graph.

The original model is the teacher and the calibration data is the training set (no
labels). The compressed graph runs in PyTorch (``torch_graph.TorchGraph``: the ONNX graph
itself, node by node), and what compression touched trains:

1. Batches: the calibration batches cut to at most ``batch`` samples; one in
   ``hold_out`` is held out (when there are at least 4) and nothing fits to it. For a
   model with token inputs, ``augment`` variants of each other batch (tokens replaced,
   tails spliced: ``graphopt.augment``) join the training batches, the original's
   values on them the targets (with 256 sentences, MiniLM's re-fit otherwise fits its
   training sentences 7x better than held-out ones).
2. First the least-squares re-fit (``recover``'s ``refit``, unless ``refit=false``) on
   the other batches: a strong start that distillation refines, every layer moving to
   serve the model's outputs rather than its own.
3. Trainable (``scope``): the linear layers compression changed, every one downstream of
   them (their inputs moved) and those whose outputs it narrowed (the other side of a
   pruned site); ``changed``: only the first; ``all``: every linear layer. Quantized
   weights (``qat``; a DequantizeLinear of constants read as a MatMul/Gemm/Conv weight)
   train as float shadows through fake quantization, with their scales (LSQ) and their
   layer's bias. Pruned channels stay pruned (they are gone from the graph).
4. Loss: output distillation (``loss``: ``kl`` on softmax(logits / T), for classifiers;
   ``mse`` on each output normalised by its mean square on the teacher, for embeddings
   and regressions; ``cosine``; ``auto``: kl when the accuracy metric is top-1 agreement,
   else mse) plus ``features`` times the normalised squared error at the outputs of the
   changed (and quantized) layers, narrowed to the kept channels where compression
   narrowed an output, plus ``stream`` times that error at the normalized hidden states
   downstream of the changes (the outputs of LayerNormalization and its kin: every
   token's residual stream, as TinyBERT's hidden-state loss; a model without them, such
   as a CNN, has none).
5. Adam with each layer's step size ``lr`` times the RMS of its weights, warmed up over
   the first 5% of the budget and decayed as a cosine over it (``steps``, and ``time``
   in seconds, whichever ends first). ``lr`` unset: a short run (a tenth of the budget)
   at each of ``distil.LR_CANDIDATES`` from the same start, then, while the smallest
   tried wins, at one 4x smaller; the one with the lowest held-out loss trains on from
   where its short run stopped (weights, Adam's moments, the schedule: the short run
   was the first tenth of it), over the rest of the budget (the digits CNN wants 0.02,
   MiniLM's re-fit about 3e-4). A short run stops as soon as its held-out loss is twice
   the start's (``distil.DIVERGED``): that step size has lost.
6. Every epoch the model is scored on the held-out batches with the run's accuracy
   metric and the distillation loss; the best checkpoint is kept (by the metric, ties by
   the loss). When none beats the start, the result is ``recover``'s re-fit on every
   batch, held-out ones included: never worse than the training-free recovery. Training
   stops early once
   the metric is within the budget (``PassContext.tolerance``) and the held-out loss has
   not fallen by 1% below the run's lowest over a fifth of the budget.
7. The trained numbers are written back into the graph's initializers by name (integer
   codes in their ONNX type, int4 included): node list, names, types and shapes do not
   change (checked).

Deterministic for a seed (``PassContext.seed``) on a given machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.augment import embedding_tables, variants
from graphopt.capture import subset
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.metric import DEFAULT_METRIC, get_metric
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes.recover.layers import dirty_nodes, find_layers, linear_layer
from graphopt.passes.recover.recover import Recover
from graphopt.passes.recover.targets import Teacher

INSTALL_HINT = "pip install 'graphopt[train]' (PyTorch for the fine-tuning)"


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class Finetune(Pass):
    """Distil the original model into the compressed one (weights of changed layers)."""

    name = "finetune"
    family = "recovery"
    lossless = False

    @dataclass(frozen=True)
    class Options:
        steps: int = 1000  # optimizer steps, at most
        time: float = 0.0  # seconds of training, at most (0: no limit)
        # Adam's step size relative to each layer's weight RMS (None: the best of
        # LR_CANDIDATES after a short probe run of each)
        lr: float | None = None
        # output distillation: kl, mse, cosine (auto: kl under top1, cosine under the
        # cosine metrics, else mse)
        loss: str = "auto"
        temperature: float = 2.0  # of the kl loss
        features: float = 1.0  # weight of the feature matching at the changed layers
        # weight of the matching, token by token, of the normalized hidden states (the
        # outputs of LayerNormalization and its kin downstream of the changes)
        stream: float = 4.0
        scope: str = "downstream"  # which linear layers train: changed, downstream or all
        refit: bool = True  # least-squares re-fit first
        max_batches: int = 64  # calibration batches used, at most
        hold_out: int = 8  # one calibration batch in this many scores checkpoints
        qat: bool = True  # quantized weights (DequantizeLinear of constants) train too
        batch: int = 32  # samples a step, at most (larger calibration batches are split)
        # variants of each training batch, re-fitted and trained on too (token inputs:
        # graphopt.augment; images get none)
        augment: int = 4

        def __post_init__(self):
            for key in ("steps", "max_batches", "hold_out", "batch"):
                value = getattr(self, key)
                if not (isinstance(value, int) and value >= 1):
                    raise ValueError(f"{key} must be an integer >= 1, not {value!r}")
            if not (isinstance(self.augment, int) and self.augment >= 0):
                raise ValueError(f"augment must be an integer >= 0, not {self.augment!r}")
            for key in ("time", "features", "stream"):
                value = getattr(self, key)
                if not (isinstance(value, (int, float)) and value >= 0):
                    raise ValueError(f"{key} must be a number >= 0, not {value!r}")
            if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
                raise ValueError(f"lr must be a number > 0, not {self.lr!r}")
            for key in ("temperature",):
                value = getattr(self, key)
                if not (isinstance(value, (int, float)) and value > 0):
                    raise ValueError(f"{key} must be a number > 0, not {value!r}")
            if self.loss not in ("auto", "mse", "kl", "cosine"):
                raise ValueError(f"loss must be auto, kl, mse or cosine, not {self.loss!r}")
            if self.scope not in ("changed", "downstream", "all"):
                raise ValueError(f"scope must be changed, downstream or all, not "
                                 f"{self.scope!r}")
            for key in ("refit", "qat"):
                if not isinstance(getattr(self, key), bool):
                    raise ValueError(f"{key} must be true or false, not "
                                     f"{getattr(self, key)!r}")

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        if not torch_available():
            raise UsageError("the finetune pass needs PyTorch", hint=INSTALL_HINT)
        copies = self.options.augment
        # the least-squares start (keeps its teacher); the re-fit on all the data, when
        # training loses
        self._recover, self._fallback = Recover(augment=copies), Recover(augment=copies)
        self._teacher: Teacher | None = None  # the original's values, kept across runs
        # (calibration data, its batches and their variants, held-out indices, the
        # real training batches)
        self._split: tuple | None = None

    def quick(self) -> Pass:
        """What the compression driver ranks sites alone with: the training-free re-fit
        of the changed layers (training every site's every setting would cost a
        fine-tuning run each)."""
        return self._recover.quick()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        reference = getattr(ctx, "reference", None)
        if reference is None:
            return PassResult(False, {"reason": "no original model to distil from"})
        if not ctx.calibration:
            return PassResult(False, {"reason": "no calibration data"})
        opts = self.options
        if self._split is None or self._split[0] is not ctx.calibration:
            real = subset(minibatches(ctx.calibration, opts.batch), opts.max_batches)
            # held-out batches score checkpoints: nothing fits to them, the re-fit included
            count = max(1, len(real) // opts.hold_out) if len(real) >= 4 else 0
            held = [int((i + 0.5) * len(real) / count) for i in range(count)]
            train = [b for i, b in enumerate(real) if i not in held]
            tables = embedding_tables(reference) if opts.augment else {}
            extra = variants(train, list(tables), opts.augment, seed=ctx.seed, tables=tables)
            self._split = (ctx.calibration, real + extra, held, train)
        _, data, held, fit_on = self._split
        kept = dict(getattr(ctx, "kept", None) or {})
        stats: dict = {}
        if self._teacher is None or not self._teacher.serves(reference, data):
            self._teacher = Teacher(reference, data)
        teacher = self._teacher
        # what compression changed (before the re-fit moves the weights downstream)
        found, _ = find_layers(model.graph, teacher.ref.names)
        dirty, changed = dirty_nodes(model.graph, found, kept, teacher.ref)
        # distillation that beats nothing falls back to the re-fit of every batch
        snapshot = model.clone() if opts.refit and held else None
        if opts.refit:
            refit = self._recover.run(model, replace(ctx, calibration=fit_on))
            stats["refit"] = refit.stats.get("layers", {})
        if opts.scope == "all":
            train = list(found)
        elif opts.scope == "changed":
            train = [layer for layer in found if id(layer.node) in changed]
        else:
            train = [layer for layer in found
                     if id(layer.node) in dirty or layer.narrowing(kept) is not None]
        train += new_linears(model.graph, found, dirty)  # e.g. low-rank factors
        quantized = quantized_weights(model.graph, teacher.ref.names) if opts.qat else []
        if not quantized and (not train or not (dirty or opts.scope == "all")):
            stats["reason"] = "no layer differs from the original"
            if snapshot is not None:  # (what recover gives, as when training loses)
                stats["refit"] = self._fallback.run(snapshot, ctx).stats.get("layers", {})
                model.graph = snapshot.graph
            return PassResult(bool(opts.refit and _improved(stats.get("refit", {}))), stats)
        sites = [layer for layer in found if id(layer.node) in changed]
        stream = [n.outputs[0].name for n in model.graph.nodes
                  if id(n) in dirty and n.op in NORMALIZATIONS and n.outputs and
                  n.outputs[0].name in teacher.ref.names and n.outputs[0].name not in kept] \
            if opts.stream > 0 else []
        metric = get_metric(ctx.metric or DEFAULT_METRIC)
        if opts.loss == "auto":  # the metric's own form where it has one
            opts = replace(opts, loss=AUTO_LOSS.get(metric.name, "mse"))
        from graphopt.passes.recover.distil import distil  # (imports torch)

        result = distil(model, teacher, data, held, train, sites, kept, opts, metric=metric,
                        quantized=quantized, stream=stream,
                        tolerance=ctx.tolerance, seed=ctx.seed, report=ctx.step)
        stats.update(result)
        if not result["improved"] and snapshot is not None:
            fallback = self._fallback.run(snapshot, ctx)
            model.graph = snapshot.graph
            stats["refit"] = fallback.stats.get("layers", {})
            stats["kept"] = "the re-fit on every batch (no checkpoint beat it on the " \
                            "held-out batches)"
        return PassResult(True, stats)


# The output loss under each built-in metric (``loss=auto``; mse under any other):
# MiniLM at 40% FFN, mean cosine on held-out sentences 0.9699 with mse, 0.9701-0.9704 with
# cosine
AUTO_LOSS = {"top1": "kl", "cosine": "cosine", "mean-cosine": "cosine"}

# Ops whose outputs are a model's normalized hidden states (``stream``).
NORMALIZATIONS = frozenset({
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization"})


def new_linears(graph: gs.Graph, found: list, dirty: set[int]) -> list:
    """Linear layers compression made that the original lacks (their outputs are new:
    the factors of a low-rank decomposition), with weights of their own."""
    known = {id(layer.node) for layer in found} | \
        {id(layer.bias_node) for layer in found if layer.bias_node is not None}
    out = []
    for node in graph.nodes:
        if id(node) in dirty and id(node) not in known and \
                node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and \
                isinstance(node.inputs[1], gs.Constant):
            layer, _ = linear_layer(graph, node, node.inputs[1], None)
            if layer is not None:
                out.append(layer)
    return out


def minibatches(data: list[dict], size: int) -> list[dict]:
    """The batches of ``data`` cut into batches of at most ``size`` samples (every input
    sliced alike along its first axis, when all inputs share that length)."""
    out = []
    for batch in data:
        lengths = {np.shape(v)[0] if np.ndim(v) else None for v in batch.values()}
        n = lengths.pop() if len(lengths) == 1 else None
        if not n or n <= size:
            out.append(batch)
            continue
        parts = -(-n // size)
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        out += [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds, bounds[1:])]
    return out


def _improved(layers: dict) -> bool:
    return any(v.get("error_after", 1.0) < v.get("error_before", 1.0)
               for v in layers.values() if isinstance(v, dict))


@dataclass(eq=False)
class QuantizedWeight:
    """A weight stored quantized: DequantizeLinear(codes, scale[, zero point]) of
    constants of its own, read as the weight of a MatMul, Gemm or Conv (``layer``, whose
    output ``y``, after a MatMul's bias Add, is matched to the original's)."""

    node: gs.Node
    codes: gs.Constant
    scale: gs.Constant
    layer: gs.Node
    y: gs.Tensor
    bias: gs.Constant | None


def quantized_weights(graph: gs.Graph, ref_names: set[str]) -> list[QuantizedWeight]:
    out = []
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or len(node.inputs) < 2:
            continue
        codes, scale = node.inputs[0], node.inputs[1]
        zero = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if not (isinstance(codes, gs.Constant) and isinstance(scale, gs.Constant) and
                (zero is None or isinstance(zero, gs.Constant))):
            continue
        if len(codes.outputs) != 1 or len(scale.outputs) != 1 or \
                np.dtype(scale.dtype).kind != "f":
            continue
        readers = node.outputs[0].outputs
        if len(readers) != 1 or readers[0].op not in ("MatMul", "Gemm", "Conv") or \
                len(readers[0].inputs) < 2 or readers[0].inputs[1] is not node.outputs[0]:
            continue
        layer = readers[0]
        bias, y = None, layer.outputs[0]
        if len(layer.inputs) > 2 and isinstance(layer.inputs[2], gs.Constant):
            bias = layer.inputs[2]
        elif layer.op == "MatMul" and len(y.outputs) == 1 and y.outputs[0].op == "Add":
            add = y.outputs[0]
            other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            if isinstance(other, gs.Constant) and add.outputs[0].name in ref_names:
                bias, y = other, add.outputs[0]
        if bias is not None and (len(bias.outputs) != 1 or np.dtype(bias.dtype).kind != "f"):
            bias = None
        out.append(QuantizedWeight(node, codes, scale, layer, y, bias))
    return out
