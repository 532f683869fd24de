"""``finetune``: recovery by knowledge distillation on the compressed ONNX graph.

The original model is the teacher and the calibration data is the training set (no
labels). The compressed graph runs in PyTorch (``torch_graph.TorchGraph``: the ONNX graph
itself, node by node), and the weights and biases of the linear layers compression
touched train:

1. First the least-squares re-fit (``recover``'s ``refit``, unless ``refit=false``): a
   strong start; distillation then goes beyond what a layer-by-layer fit can reach,
   because every layer moves to serve the model's outputs.
2. Trainable: the layers compression changed, every layer downstream of them (their
   inputs moved) and the layers whose outputs compression narrowed (the other side of
   a pruned site); ``scope="all"``: every linear layer. Pruned channels stay pruned (they
   are gone from the graph), and nothing but these initializers moves.
3. Loss: output distillation (``loss``: ``kl`` on softmax(logits / T), for classifiers;
   ``mse`` on the outputs, each normalised by its mean square on the teacher, for
   embeddings and regressions; ``cosine``; ``auto``: kl when the accuracy metric is top-1
   agreement, else mse), plus
   ``features`` times the normalised squared error at the outputs of the changed layers
   (layer-wise feature matching, narrowed to the kept channels where compression
   narrowed an output).
4. Adam, its step size per layer ``lr`` times the RMS of the layer's weights (one
   setting suits layers and models of any weight scale), decayed as a cosine over the step budget (``steps``, and
   ``time`` in seconds, whichever ends first). Every epoch the model is scored on held
   out calibration batches (one in ``hold_out``) with the run's accuracy metric and the
   distillation loss; the best checkpoint is kept (by the metric, ties by the loss), and
   training stops early once the metric is within the budget (``PassContext.tolerance``)
   and the held-out loss has stopped falling.
5. The trained numbers are written back into the graph's initializers by name: node
   list, names and shapes do not change (checked).

Deterministic for a seed (``PassContext.seed``) on a given machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.capture import subset
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.metric import DEFAULT_METRIC, get_metric
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes.recover.layers import dirty_nodes, find_layers
from graphopt.passes.recover.recover import Recover
from graphopt.passes.recover.targets import Teacher

# A stop within the budget needs the held-out loss not to have fallen by 1% over this
# fraction of the step budget (and at least PATIENCE evaluations).
PATIENCE, PATIENCE_FRACTION = 5, 0.2
CURVE_POINTS = 20  # evaluations of the loss curve in the report, at most
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
        lr: float = 0.02  # Adam's step at the start, relative to each layer's weight RMS
        loss: str = "auto"  # output distillation: kl, mse, cosine (auto: kl under top1)
        temperature: float = 2.0  # of the kl loss
        features: float = 1.0  # weight of the feature matching at the changed layers
        scope: str = "downstream"  # which linear layers train: changed, downstream or all
        refit: bool = True  # least-squares re-fit first
        max_batches: int = 64  # calibration batches used, at most
        hold_out: int = 8  # one calibration batch in this many scores checkpoints

        def __post_init__(self):
            for key in ("steps", "max_batches", "hold_out"):
                value = getattr(self, key)
                if not (isinstance(value, int) and value >= 1):
                    raise ValueError(f"{key} must be an integer >= 1, not {value!r}")
            for key in ("time", "features"):
                value = getattr(self, key)
                if not (isinstance(value, (int, float)) and value >= 0):
                    raise ValueError(f"{key} must be a number >= 0, not {value!r}")
            for key in ("lr", "temperature"):
                value = getattr(self, key)
                if not (isinstance(value, (int, float)) and value > 0):
                    raise ValueError(f"{key} must be a number > 0, not {value!r}")
            if self.loss not in ("auto", "mse", "kl", "cosine"):
                raise ValueError(f"loss must be auto, kl, mse or cosine, not {self.loss!r}")
            if self.scope not in ("changed", "downstream", "all"):
                raise ValueError(f"scope must be changed, downstream or all, not "
                                 f"{self.scope!r}")
            if not isinstance(self.refit, bool):
                raise ValueError(f"refit must be true or false, not {self.refit!r}")

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        if not torch_available():
            raise UsageError("the finetune pass needs PyTorch", hint=INSTALL_HINT)
        self._recover = Recover()  # the least-squares start (keeps its teacher cache)
        self._teacher: Teacher | None = None  # the original's values, kept across runs

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
        data = subset(ctx.calibration, opts.max_batches)
        kept = dict(getattr(ctx, "kept", None) or {})
        # held-out batches score checkpoints: nothing fits to them, the re-fit included
        held = list(range(len(data)))[opts.hold_out - 1::opts.hold_out] \
            if len(data) >= 4 else []
        stats: dict = {}
        if self._teacher is None or not self._teacher.serves(reference, data):
            self._teacher = Teacher(reference, data)
        teacher = self._teacher
        # what compression changed (before the re-fit moves the weights downstream)
        found, _ = find_layers(model.graph, teacher.ref.names)
        dirty, changed = dirty_nodes(model.graph, found, kept, teacher.ref)
        if opts.refit:
            fit_on = [b for i, b in enumerate(data) if i not in held]
            refit = self._recover.run(model, replace(ctx, calibration=fit_on))
            stats["refit"] = refit.stats.get("layers", {})
        narrowed = {n for layer in found for n in layer.target_names() if n in kept}
        if opts.scope == "all":
            train = list(found)
        elif opts.scope == "changed":
            train = [layer for layer in found if id(layer.node) in changed]
        else:
            train = [layer for layer in found if id(layer.node) in dirty or
                     any(n in narrowed for n in layer.target_names())]
        if not train or not (dirty or opts.scope == "all"):
            stats["reason"] = "no layer differs from the original"
            return PassResult(bool(opts.refit and _improved(stats.get("refit", {}))), stats)
        sites = [layer for layer in found if id(layer.node) in changed]
        metric = get_metric(ctx.metric or DEFAULT_METRIC)
        if opts.loss == "auto":
            opts = replace(opts, loss="kl" if metric.name == "top1" else "mse")
        result = distil(model, teacher, data, held, train, sites, kept, opts, metric=metric,
                        tolerance=ctx.tolerance, seed=ctx.seed)
        stats.update(result)
        return PassResult(True, stats)


def _improved(layers: dict) -> bool:
    return any(v.get("error_after", 1.0) < v.get("error_before", 1.0)
               for v in layers.values() if isinstance(v, dict))


def distil(model: Model, teacher: Teacher, data: list[dict], held: list[int], train,
           sites, kept: dict,
           opts: Finetune.Options, metric, tolerance: float | None, seed: int) -> dict:
    """Train the weights and biases of the layers ``train`` of ``model`` (in place) to
    reproduce ``teacher``'s outputs, and its values at the outputs of ``sites``, on
    ``data``; see the module docstring. Returns the statistics for the report."""
    import torch

    from graphopt.passes.recover.torch_graph import TorchGraph, to_torch

    proto = model.to_onnx()
    outputs = [o.name for o in proto.graph.output]
    features = [(layer.y.name, _narrowing(layer, kept)) for layer in sites] \
        if opts.features > 0 else []
    wanted = list(dict.fromkeys([*outputs, *(name for name, _ in features)]))
    targets = [{k: to_torch(v) for k, v in values.items()}
               for values in teacher.batches(wanted)]
    params = sorted({c.name for layer in train
                     for c in (layer.weight, layer.bias) if c is not None})
    net = TorchGraph(proto, trainable=params)
    feeds = [{k: to_torch(v) for k, v in batch.items()} for batch in data]
    fit_on = [i for i in range(len(data)) if i not in held] or list(range(len(data)))
    scales = {name: float(torch.stack([(t[name].double() ** 2).mean() for t in targets])
                          .mean()) or 1.0 for name in wanted}

    def loss_of(got: dict, want: dict) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for name in outputs:
            total = total + _output_loss(got[name], want[name], scales[name], opts)
        if features:
            part = sum(((got[name] - _narrow(want[name], axes)) ** 2).mean() / scales[name]
                       for name, axes in features)
            total = total + opts.features * part / len(features)
        return total

    check_on = held or fit_on
    reference = [{k: targets[i][k].numpy() for k in outputs} for i in check_on]
    check_feeds = [data[i] for i in check_on]

    def evaluate() -> tuple[float, float]:
        """(the metric, the distillation loss) on the held-out batches."""
        got, loss = [], 0.0
        with torch.no_grad():
            for i in check_on:
                values = net(feeds[i], wanted)
                loss += float(loss_of(values, targets[i])) / len(check_on)
                got.append({k: values[k].numpy() for k in outputs})
        return metric.score(reference, got, check_feeds), loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    groups = []
    for layer in train:  # one step size per layer, scaled to its weights' magnitude
        rms = float(np.sqrt(np.mean(np.square(np.asarray(layer.weight.values,
                                                         dtype=np.float64))))) or 1.0
        names = [c.name for c in (layer.weight, layer.bias) if c is not None]
        groups.append({"params": [net.params[net.keys[n]] for n in names],
                       "lr": opts.lr * rms, "base": opts.lr * rms})
    optimizer = torch.optim.Adam(groups)
    before, held_loss = evaluate()
    loss_before = held_loss
    best, best_values, lowest = (before, -held_loss), net.values(), held_loss
    curve: list[dict] = []
    start, step, reason, stale = time.perf_counter(), 0, "steps", 0
    patience = max(PATIENCE, int(PATIENCE_FRACTION * opts.steps / max(1, len(fit_on))))

    def progress() -> float:  # of the budget: steps, or time when that ends first
        elapsed = (time.perf_counter() - start) / opts.time if opts.time else 0.0
        return min(1.0, max(step / opts.steps, elapsed))

    while progress() < 1.0:
        epoch_loss = []
        for i in rng.permutation(fit_on):
            decay = 0.5 * (1 + np.cos(np.pi * progress()))
            for group in optimizer.param_groups:
                group["lr"] = group["base"] * decay
            optimizer.zero_grad()
            loss = loss_of(net(feeds[i], wanted), targets[i])
            loss.backward()
            optimizer.step()
            epoch_loss.append(float(loss.detach()))
            step += 1
            if progress() >= 1.0:
                break
        now, held_loss = evaluate()
        curve.append({"step": step, "loss": float(np.mean(epoch_loss)),
                      "held_out_loss": held_loss, "score": now})
        # the best checkpoint: by the metric, then (a saturated metric such as top-1
        # on a few batches ties) by the held-out distillation loss
        improved = held_loss < 0.99 * lowest
        lowest = min(lowest, held_loss)
        if (now, -held_loss) > best:
            best, best_values = (now, -held_loss), net.values()
        stale = 0 if improved else stale + 1
        if progress() >= 1.0:
            reason = "time" if step < opts.steps else "steps"
            break
        if tolerance is not None and best[0] >= tolerance and stale >= patience:
            reason = "plateau"  # within the budget, and the loss no longer falls
            break
    seconds = time.perf_counter() - start
    nodes_before = [(n.op, n.name) for n in model.graph.nodes]
    _write_back(model, best_values)
    assert [(n.op, n.name) for n in model.graph.nodes] == nodes_before
    return {"steps": step, "seconds": round(seconds, 2), "stopped_by": reason,
            "trained_layers": len(train), "parameters": int(sum(v.size for v in
                                                                best_values.values())),
            "loss": opts.loss, "metric": metric.name, "held_out_batches": len(held),
            "score_before": before, "score_after": best[0],
            "held_out_loss_before": loss_before, "held_out_loss_after": -best[1], "curve": _thinned(curve)}


def _thinned(curve: list, points: int = CURVE_POINTS) -> list:
    """At most ``points`` evaluations, evenly spread, the last one kept."""
    if len(curve) <= points:
        return curve
    picks = np.unique(np.linspace(0, len(curve) - 1, points).round().astype(int))
    return [curve[i] for i in picks]


def _output_loss(got, want, scale: float, opts) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    if not got.is_floating_point():
        return torch.zeros(())
    if opts.loss == "kl" and got.dim() >= 1 and got.shape[-1] > 1:
        t = opts.temperature
        return F.kl_div(F.log_softmax(got / t, -1), F.log_softmax(want / t, -1),
                        log_target=True, reduction="batchmean") * t * t
    if opts.loss == "cosine" and got.dim() >= 1:
        a, b = got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1)
        return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()
    return ((got - want) ** 2).mean() / scale


def _narrowing(layer, kept: dict):
    for name in layer.target_names():
        if name in kept:
            return kept[name]
    return None


def _narrow(value, axes):
    import torch

    if axes is None:
        return value
    axis, idx = axes
    return torch.index_select(value, axis % value.dim(), torch.as_tensor(np.asarray(idx)))


def _write_back(model: Model, values: dict[str, np.ndarray]) -> None:
    tensors = model.graph.tensors()
    for name, value in values.items():
        const = tensors[name]
        if not isinstance(const, gs.Constant) or tuple(const.shape) != value.shape:
            raise RuntimeError(f"initializer {name} changed shape while training")
        const.values = value.astype(np.asarray(const.values).dtype)
