"""``finetune``: recovery by knowledge distillation, and quantization-aware training, on
the compressed ONNX graph.

The original model is the teacher and the calibration data is the training set (no
labels). The compressed graph runs in PyTorch (``torch_graph.TorchGraph``: the ONNX graph
itself, node by node), and what compression touched trains:

1. Batches: the calibration batches cut to at most ``batch`` samples; one in
   ``hold_out`` is held out (when there are at least 4) and nothing fits to it.
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
   narrowed an output.
5. Optionally (``augment`` > 0) half the steps train on new inputs made from a batch
   (token ids replaced by others from the calibration data, float inputs mixed with
   another sample), which the original, run in PyTorch alongside, labels on the fly.
   Off by default: it did not help on the digits networks or MiniLM (measured).
6. Adam with each layer's step size ``lr`` times the RMS of its weights, warmed up over
   the first 5% of the budget and decayed as a cosine over it (``steps``, and ``time``
   in seconds, whichever ends first). ``lr`` unset: a short run (a tenth of the budget)
   at each of ``LR_CANDIDATES`` from the same start, and the one with the lowest held-out
   loss trains (the digits CNN wants 0.02, MiniLM's refit 0.00125 or less).
7. Every epoch the model is scored on the held-out batches with the run's accuracy
   metric and the distillation loss; the best checkpoint is kept (by the metric, ties by
   the loss). When none beats the start, the result is ``recover``'s re-fit on every
   batch, held-out ones included: never worse than the training-free recovery. Training
   stops early once
   the metric is within the budget (``PassContext.tolerance``) and the held-out loss has
   not fallen by 1% over a fifth of the budget.
8. The trained numbers are written back into the graph's initializers by name (integer
   codes in their ONNX type, int4 included): node list, names, types and shapes do not
   change (checked).

Deterministic for a seed (``PassContext.seed``) on a given machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.capture import subset
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.metric import DEFAULT_METRIC, get_metric
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.passes.recover.layers import dirty_nodes, find_layers, linear_layer
from graphopt.passes.recover.recover import Recover
from graphopt.passes.recover.targets import Teacher

# A stop within the budget needs the held-out loss not to have fallen by 1% over this
# fraction of the step budget (and at least PATIENCE evaluations).
PATIENCE, PATIENCE_FRACTION = 5, 0.2
LR_CANDIDATES = (0.02, 0.005, 0.00125)  # relative step sizes probed when lr is not given
PROBE = 0.1  # of the budget (steps, time) each probe runs
WARMUP = 0.05  # of the budget, over which the step size rises linearly from 0
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
        # Adam's step size relative to each layer's weight RMS (None: the best of
        # LR_CANDIDATES after a short probe run of each)
        lr: float | None = None
        loss: str = "auto"  # output distillation: kl, mse, cosine (auto: kl under top1)
        temperature: float = 2.0  # of the kl loss
        features: float = 1.0  # weight of the feature matching at the changed layers
        scope: str = "downstream"  # which linear layers train: changed, downstream or all
        refit: bool = True  # least-squares re-fit first
        max_batches: int = 64  # calibration batches used, at most
        hold_out: int = 8  # one calibration batch in this many scores checkpoints
        augment: float = 0.0  # token ids replaced in augmented batches (0: none)
        qat: bool = True  # quantized weights (DequantizeLinear of constants) train too
        batch: int = 32  # samples a step, at most (larger calibration batches are split)

        def __post_init__(self):
            for key in ("steps", "max_batches", "hold_out", "batch"):
                value = getattr(self, key)
                if not (isinstance(value, int) and value >= 1):
                    raise ValueError(f"{key} must be an integer >= 1, not {value!r}")
            if not (isinstance(self.augment, (int, float)) and 0 <= self.augment < 1):
                raise ValueError(f"augment must be a fraction in [0, 1), not "
                                 f"{self.augment!r}")
            for key in ("time", "features"):
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
        self._recover = Recover()  # the least-squares start (keeps its teacher cache)
        self._fallback = Recover()  # the re-fit on all the data, when training loses
        self._teacher: Teacher | None = None  # the original's values, kept across runs
        self._split: tuple | None = None  # (calibration data, its training batches)

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
            self._split = (ctx.calibration,
                           subset(minibatches(ctx.calibration, opts.batch), opts.max_batches))
        data = self._split[1]
        kept = dict(getattr(ctx, "kept", None) or {})
        # held-out batches score checkpoints: nothing fits to them, the re-fit included
        count = max(1, len(data) // opts.hold_out) if len(data) >= 4 else 0
        held = [int((i + 0.5) * len(data) / count) for i in range(count)]
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
        train += new_linears(model.graph, found, dirty)  # e.g. low-rank factors
        quantized = quantized_weights(model.graph, teacher.ref.names) if opts.qat else []
        if not quantized and (not train or not (dirty or opts.scope == "all")):
            stats["reason"] = "no layer differs from the original"
            if snapshot is not None:  # (what recover gives, as when training loses)
                stats["refit"] = self._fallback.run(snapshot, ctx).stats.get("layers", {})
                model.graph = snapshot.graph
            return PassResult(bool(opts.refit and _improved(stats.get("refit", {}))), stats)
        sites = [layer for layer in found if id(layer.node) in changed]
        metric = get_metric(ctx.metric or DEFAULT_METRIC)
        if opts.loss == "auto":
            opts = replace(opts, loss="kl" if metric.name == "top1" else "mse")
        result = distil(model, teacher, data, held, train, sites, kept, opts, metric=metric,
                        quantized=quantized,
                        tolerance=ctx.tolerance, seed=ctx.seed)
        stats.update(result)
        if not result["improved"] and snapshot is not None:
            fallback = self._fallback.run(snapshot, ctx)
            model.graph = snapshot.graph
            stats["refit"] = fallback.stats.get("layers", {})
            stats["kept"] = "the re-fit on every batch (no checkpoint beat it on the " \
                            "held-out batches)"
        return PassResult(True, stats)


def new_linears(graph: gs.Graph, found: list, dirty: set[int]) -> list:
    """Linear layers compression made that the original lacks (their outputs are new:
    the factors of a low-rank decomposition), with weights of their own."""
    known = {id(layer.node) for layer in found} | \
        {id(layer.bias_node) for layer in found if layer.bias_node is not None}
    names = {t.name for t in graph.tensors().values()}
    out = []
    for node in graph.nodes:
        if id(node) in dirty and id(node) not in known and \
                node.op in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1 and \
                isinstance(node.inputs[1], gs.Constant):
            layer, _ = linear_layer(graph, node, node.inputs[1], names)
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


def distil(model: Model, teacher: Teacher, data: list[dict], held: list[int], train,
           sites, kept: dict,
           opts: Finetune.Options, metric, tolerance: float | None, seed: int,
           quantized: list["QuantizedWeight"] = ()) -> dict:
    """Train the weights and biases of the layers ``train`` of ``model`` (in place) to
    reproduce ``teacher``'s outputs, and its values at the outputs of ``sites``, on
    ``data``; see the module docstring. Returns the statistics for the report."""
    import torch

    from graphopt.passes.recover.torch_graph import TorchGraph, to_torch

    proto = model.to_onnx()
    outputs = [o.name for o in proto.graph.output]
    features = [(layer.y.name, _narrowing(layer, kept)) for layer in sites] + \
        [(q.y.name, None) for q in quantized if q.y.name in teacher.ref.names]
    features = list({name: (name, axes) for name, axes in features}.values()) \
        if opts.features > 0 else []
    wanted = list(dict.fromkeys([*outputs, *(name for name, _ in features)]))
    targets = [{k: to_torch(v) for k, v in values.items()}
               for values in teacher.batches(wanted)]
    params = sorted({c.name for layer in train
                     for c in (layer.weight, layer.bias) if c is not None} |
                    {c.name for q in quantized for c in (q.scale, q.bias) if c is not None})
    net = TorchGraph(proto, trainable=params,
                     fake_quant=[q.node.outputs[0].name for q in quantized])
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
    augment = Augmenter(teacher.proto, [data[i] for i in fit_on], opts.augment, rng) \
        if opts.augment > 0 else None
    if augment is not None and not augment.usable:
        augment = None
    teacher_net = None
    if augment is not None:
        try:
            teacher_net = TorchGraph(teacher.proto)
        except ValueError:  # an op without a torch form: the recorded batches only
            augment = None
    sizes = []  # (parameters, their magnitude): each layer steps relative to its weights
    for layer in train:
        rms = float(np.sqrt(np.mean(np.square(np.asarray(layer.weight.values,
                                                         dtype=np.float64))))) or 1.0
        names = [c.name for c in (layer.weight, layer.bias) if c is not None]
        sizes.append(([net.params[net.keys[n]] for n in names], rms))
    for q, site in zip(quantized, net.fake.values()):  # shadow weight, bias; scales
        shadow = net.params[site.key]
        group = [shadow] + ([net.params[net.keys[q.bias.name]]] if q.bias is not None else [])
        sizes.append((group, float(shadow.detach().square().mean().sqrt()) or 1.0))
        scale = net.params[net.keys[q.scale.name]]
        sizes.append(([scale], float(scale.detach().square().mean().sqrt()) or 1.0))
    initial = {k: v.detach().clone() for k, v in net.params.items()}
    before, loss_before = evaluate()
    patience = max(PATIENCE, int(PATIENCE_FRACTION * opts.steps / max(1, len(fit_on))))

    def fit(lr: float, seconds: float, stop_after: int | None = None,
            stop_time: float | None = None) -> dict:
        """From the starting weights, Adam at ``lr`` over the budget (``opts.steps`` and
        ``seconds``); a probe is cut short after ``stop_after`` steps or ``stop_time``
        seconds, its schedule still that of the whole budget."""
        with torch.no_grad():
            for k, v in initial.items():
                net.params[k].copy_(v)
        optimizer = torch.optim.Adam([{"params": ps, "lr": lr * rms, "base": lr * rms}
                                      for ps, rms in sizes])
        run = {"best": (before, -loss_before), "values": None, "curve": [], "step": 0,
               "reason": "steps", "lowest": loss_before}
        start, stale = time.perf_counter(), 0

        def progress() -> float:  # of the budget: steps, or time when that ends first
            elapsed = (time.perf_counter() - start) / seconds if seconds else 0.0
            return min(1.0, max(run["step"] / opts.steps, elapsed))

        def cut() -> bool:
            return progress() >= 1.0 or (stop_after is not None and (
                run["step"] >= stop_after or
                (stop_time and time.perf_counter() - start >= stop_time)))

        while not cut():
            epoch_loss = []
            for i in rng.permutation(fit_on):
                done = progress()
                decay = 0.5 * (1 + np.cos(np.pi * done)) * min(1.0, (done + 1e-9) / WARMUP)
                for group in optimizer.param_groups:
                    group["lr"] = group["base"] * decay
                optimizer.zero_grad()
                if augment is not None and rng.random() < 0.5:  # a new batch of inputs
                    new = {k: to_torch(v) for k, v in augment(data[i]).items()}
                    with torch.no_grad():
                        want = teacher_net(new, wanted)
                    loss = loss_of(net(new, wanted), want)
                else:
                    loss = loss_of(net(feeds[i], wanted), targets[i])
                loss.backward()
                optimizer.step()
                epoch_loss.append(float(loss.detach()))
                run["step"] += 1
                if cut():
                    break
            score, held_loss = evaluate()
            run["curve"].append({"step": run["step"], "loss": float(np.mean(epoch_loss)),
                                 "held_out_loss": held_loss, "score": score})
            run["last"] = held_loss
            # the best checkpoint: by the metric, then (a saturated metric such as top-1
            # on a few batches ties) by the held-out distillation loss
            improved = held_loss < 0.99 * run["lowest"]
            run["lowest"] = min(run["lowest"], held_loss)
            if stop_after is None and (score, -held_loss) > run["best"]:
                run["best"], run["values"] = (score, -held_loss), net.values()
            stale = 0 if improved else stale + 1
            if progress() >= 1.0:
                run["reason"] = "time" if run["step"] < opts.steps else "steps"
                break
            if stop_after is None and tolerance is not None and \
                    run["best"][0] >= tolerance and stale >= patience:
                run["reason"] = "plateau"  # within the budget, the loss no longer falls
                break
        run["seconds"] = time.perf_counter() - start
        return run

    start = time.perf_counter()
    probes = {}
    lr, seconds = opts.lr, opts.time
    if lr is None:  # a short run at each candidate step size; the lowest held-out loss wins
        probe_steps = max(2 * len(fit_on), int(PROBE * opts.steps))
        for candidate in LR_CANDIDATES:
            probe = fit(candidate, opts.time, stop_after=probe_steps,
                        stop_time=PROBE * opts.time if opts.time else None)
            probes[candidate] = probe.get("last", loss_before)
        lr = min(LR_CANDIDATES, key=lambda c: (probes[c], -c))
        if opts.time:
            seconds = max(opts.time - (time.perf_counter() - start), 0.3 * opts.time)
    run = fit(lr, seconds)
    best, step, reason = run["best"], run["step"], run["reason"]
    best_values = run["values"]
    if best_values is None:  # no checkpoint beat the start: keep the starting weights
        with torch.no_grad():
            for k, v in initial.items():
                net.params[k].copy_(v)
        best_values = net.values()
    seconds = time.perf_counter() - start
    curve = run["curve"]
    nodes_before = [(n.op, n.name) for n in model.graph.nodes]
    _write_back(model, best_values, net.types)
    assert [(n.op, n.name) for n in model.graph.nodes] == nodes_before
    return {"steps": step, "seconds": round(seconds, 2), "stopped_by": reason,
            "improved": run["values"] is not None,
            "trained_layers": len(train), "quantized_weights": len(quantized),
            "parameters": int(sum(v.size for v in
                                                                best_values.values())),
            "lr": lr, "lr_probes": {str(k): v for k, v in probes.items()} or None,
            "loss": opts.loss, "augmented": augment.kinds if augment else None,
            "metric": metric.name, "held_out_batches": len(held),
            "score_before": before, "score_after": best[0],
            "held_out_loss_before": loss_before, "held_out_loss_after": -best[1], "curve": _thinned(curve)}


def _thinned(curve: list, points: int = CURVE_POINTS) -> list:
    """At most ``points`` evaluations, evenly spread, the last one kept."""
    if len(curve) <= points:
        return curve
    picks = np.unique(np.linspace(0, len(curve) - 1, points).round().astype(int))
    return [curve[i] for i in picks]


class Augmenter:
    """New training inputs made from calibration batches, which the teacher labels as it
    goes (distillation needs no labels, only inputs near the real ones): in token-id
    inputs (those that index a constant table with Gather: an embedding) a ``fraction``
    of the ids is replaced by ids drawn from the calibration data; float inputs are mixed
    with another sample of the batch (mixup, a uniform weight per sample). Other inputs
    (masks, positions) are left as they are."""

    def __init__(self, proto, data: list[dict], fraction: float, rng):
        graph = proto.graph
        tables = {t.name for t in graph.initializer}
        ids = {n.input[1] for n in graph.node if n.op_type == "Gather" and
               len(n.input) > 1 and n.input[0] in tables}
        self.fraction, self.rng = fraction, rng
        self.pools: dict[str, np.ndarray] = {}
        self.mix: set[str] = set()
        for inp in graph.input:
            values = [b[inp.name] for b in data if inp.name in b]
            if not values:
                continue
            if inp.name in ids and values[0].dtype.kind in "iu":
                self.pools[inp.name] = np.concatenate([v.reshape(-1) for v in values])
            elif values[0].dtype.kind == "f" and values[0].ndim >= 1:
                self.mix.add(inp.name)
        self.kinds = sorted({"ids" if self.pools else "", "mixup" if self.mix else ""} - {""})

    @property
    def usable(self) -> bool:
        return bool(self.pools or self.mix)

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        for name, pool in self.pools.items():
            v = batch[name]
            swap = self.rng.random(v.shape) < self.fraction
            out[name] = np.where(swap, self.rng.choice(pool, v.shape), v).astype(v.dtype)
        if self.mix:
            n = len(next(iter(batch[k] for k in self.mix)))
            perm = self.rng.permutation(n)
            for name in self.mix:
                v = batch[name]
                lam = self.rng.random((n,) + (1,) * (v.ndim - 1)).astype(v.dtype)
                out[name] = lam * v + (1 - lam) * v[perm]
        return out


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


def _write_back(model: Model, values: dict[str, np.ndarray], types: dict[str, int]) -> None:
    """Trained numbers into the initializers of the same names (sub-byte integer codes
    packed as their ONNX type)."""
    import ml_dtypes
    from onnx_graphsurgeon.ir.tensor import LazyValues

    subbyte = {onnx.TensorProto.INT2: ml_dtypes.int2, onnx.TensorProto.UINT2: ml_dtypes.uint2,
               onnx.TensorProto.INT4: ml_dtypes.int4, onnx.TensorProto.UINT4: ml_dtypes.uint4}
    tensors = model.graph.tensors()
    for name, value in values.items():
        const = tensors[name]
        if not isinstance(const, gs.Constant) or tuple(const.shape) != value.shape:
            raise RuntimeError(f"initializer {name} changed shape while training")
        kind = types.get(name)
        if kind in subbyte:
            const.values = LazyValues(onnx.numpy_helper.from_array(
                value.astype(subbyte[kind]), name))
        else:
            const.values = value.astype(np.asarray(const.values).dtype)


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
