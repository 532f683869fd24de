"""The training behind ``finetune`` (see ``passes.recover.finetune`` for the method):
the compressed graph run by PyTorch, distilled from the original's values on the
calibration batches, checkpoints scored on held-out ones, and the best written back into
the graph's initializers."""

from __future__ import annotations

import copy
import time

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.ir import Model
from graphopt.passes.recover.finetune import QuantizedWeight
from graphopt.passes.recover.targets import Teacher
from graphopt.passes.recover.torch_graph import TorchGraph, to_torch

# A stop within the budget needs the held-out loss not to have fallen by 1% over this
# fraction of the step budget (and at least PATIENCE evaluations).
PATIENCE, PATIENCE_FRACTION = 5, 0.2
LR_CANDIDATES = (0.02, 0.005, 0.00125)  # relative step sizes probed when lr is not given
SMALLER, SMALLEST = 4.0, 1e-5  # when the smallest probed wins, a SMALLER times smaller one
# is probed too (down to SMALLEST)
PROBE = 0.1  # of the budget (steps, time) each probe runs
# a probe whose held-out loss passes this multiple of the start's stops there (MiniLM's
# re-fit at step size 0.02: 4.2x by the probe's end, a tenth of the budget spent on it)
DIVERGED = 2.0
# Halfway through (the warm-up's end), a probe whose held-out loss is above the best
# probe's at the same point of its run stops ("trailing": MiniLM's at 7.8e-5 behind the
# one at 3.1e-4). One above the start's is not judged lost there: fake-quantized int4
# weights first lose ground (5x the start's loss), then end at a quarter of it.
JUDGED = 0.5  # of a probe's length
WARMUP = 0.05  # of the budget, over which the step size rises linearly from 0
CURVE_POINTS = 20  # evaluations of the loss curve in the report, at most


def distil(model: Model, teacher: Teacher, data: list[dict], held: list[int], train,
           sites, kept: dict,
           opts, metric, tolerance: float | None, seed: int,
           quantized: list[QuantizedWeight] = (), report=None,
           stream: list[str] = ()) -> dict:
    """Train the weights and biases of the layers ``train`` of ``model`` (in place) to
    reproduce ``teacher``'s outputs, and its values at the outputs of ``sites``, on
    ``data`` (``opts``: ``Finetune.Options``). Returns the statistics for the report.
    ``report(what, done, total)`` (``PassContext.step``) hears how far each training run
    is, in percent of its budget (steps, or time when that ends first). ``stream``: more
    tensors matched, each normalized by its mean square, with weight ``opts.stream``."""
    proto = model.to_onnx()
    outputs = [o.name for o in proto.graph.output]
    features = [(layer.y.name, layer.narrowing(kept)) for layer in sites] + \
        [(q.y.name, None) for q in quantized if q.y.name in teacher.ref.names]
    features = list({name: (name, axes) for name, axes in features}.values()) \
        if opts.features > 0 else []
    stream = [name for name in dict.fromkeys(stream) if name not in outputs]
    streamed = [(name, None) for name in stream]
    wanted = list(dict.fromkeys([*outputs, *(name for name, _ in features), *stream]))
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
        for weight, matched in ((opts.features, features), (opts.stream, streamed)):
            if matched:
                part = sum(((got[name] - _narrow(want[name], axes)) ** 2).mean() /
                           scales[name] for name, axes in matched)
                total = total + weight * part / len(matched)
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
            stop_time: float | None = None, resume: dict | None = None,
            rival: list | None = None) -> dict:
        """From the starting weights, Adam at ``lr`` over the budget (``opts.steps`` and
        ``seconds``); a probe is cut short after ``stop_after`` steps or ``stop_time``
        seconds, its schedule still that of the whole budget, and its ``state`` is where
        it stopped (``track``: its held-out losses by the share of its length run). A
        probe is judged at ``JUDGED`` of its length against the ``rival`` track.
        ``resume``: such a state, the run going on from it (the same schedule,
        ``seconds`` what is left of the budget's time)."""
        optimizer = _adam([{"params": ps, "lr": lr * rms, "base": lr * rms}
                           for ps, rms in sizes])
        run = {"best": (before, -loss_before), "values": None, "curve": [], "step": 0,
               "reason": "steps", "lowest": np.inf, "track": [(0.0, loss_before)]}
        with torch.no_grad():
            for k, v in (initial if resume is None else resume["params"]).items():
                net.params[k].copy_(v)
        first, done_before = 0, 0.0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            first = run["step"] = resume["step"]
            done_before, run["lowest"] = resume["progress"], resume["lowest"]
            run["curve"] = list(resume["curve"])
            if resume["scored"] > run["best"]:  # (the weights just copied in)
                run["best"], run["values"] = resume["scored"], net.values()
        start, stale = time.perf_counter(), 0

        def progress() -> float:  # of the budget: steps, or time when that ends first
            elapsed = (time.perf_counter() - start) / seconds if seconds else 0.0
            steps = (run["step"] - first) / max(1, opts.steps - first)
            return min(1.0, done_before + (1 - done_before) * max(steps, elapsed))

        def cut() -> bool:
            return progress() >= 1.0 or (stop_after is not None and share() >= 1.0)

        def share() -> float:  # of a probe's length
            return max(run["step"] / stop_after, (time.perf_counter() - start) / stop_time
                       if stop_time else 0.0)

        judge = stop_after is not None  # (a probe, not judged yet)
        judged = None  # (score, held-out loss) of a probe stopped by its judgement

        while not cut():
            epoch_loss = []
            for i in rng.permutation(fit_on):
                done = progress()
                decay = 0.5 * (1 + np.cos(np.pi * done)) * min(1.0, (done + 1e-9) / WARMUP)
                for group in optimizer.param_groups:
                    group["lr"] = group["base"] * decay
                optimizer.zero_grad()
                loss = loss_of(net(feeds[i], wanted), targets[i])
                loss.backward()
                optimizer.step()
                epoch_loss.append(float(loss.detach()))
                run["step"] += 1
                if report is not None:
                    report(f"fine-tuning at lr {lr:.3g}{' (probe)' if stop_after else ''},"
                           f" % of its budget", min(100, int(100 * progress())), 100)
                if judge and share() >= JUDGED and not cut():  # (within the epoch: the
                    judge = False  # data's order is the one an unjudged probe sees)
                    scored = evaluate()
                    if rival and scored[1] > np.interp(share(), *zip(*rival)):
                        run["reason"], judged = "trailing", scored
                        break
                    run["track"].append((share(), scored[1]))
                if cut():
                    break
            score, held_loss = judged or evaluate()
            run["curve"].append({"step": run["step"], "loss": float(np.mean(epoch_loss)),
                                 "held_out_loss": held_loss, "score": score})
            run["last"] = held_loss
            # the best checkpoint: by the metric, then (a saturated metric such as top-1
            # on a few batches ties) by the held-out distillation loss. The plateau is
            # the run's own: a run that first loses ground (the step size rising from
            # a re-fit's optimum) and regains it is still falling.
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
            if stop_after is None:
                continue
            run["track"].append((share(), held_loss))
            if held_loss > DIVERGED * loss_before:
                run["reason"] = "diverged"  # a probe: this step size is out of the race
                break
            if run["reason"] == "trailing":
                break
        run["seconds"] = time.perf_counter() - start
        if stop_after is not None and run["reason"] != "diverged" and run["curve"]:
            last = run["curve"][-1]
            run["state"] = {
                "params": {k: v.detach().clone() for k, v in net.params.items()},
                "optimizer": copy.deepcopy(optimizer.state_dict()), "step": run["step"],
                "progress": progress(), "lowest": run["lowest"], "curve": run["curve"],
                "scored": (last["score"], -last["held_out_loss"])}
        return run

    start = time.perf_counter()
    probes, stopped, tracks = {}, {}, {}
    lr, seconds, resume = opts.lr, opts.time, None
    if lr is None:  # a short run at each candidate step size; the lowest held-out loss wins
        probe_steps = max(2 * len(fit_on), int(PROBE * opts.steps))
        candidates = list(LR_CANDIDATES)
        winner = None  # (step size, state) of the best probe: the training goes on from it
        while candidates:
            candidate = candidates.pop(0)
            finished = [c for c in probes if str(c) not in stopped or
                        stopped[str(c)]["why"] != "diverged"]
            rival = tracks[min(finished, key=lambda c: (probes[c], -c))] if finished else None
            probe = fit(candidate, opts.time, stop_after=probe_steps,
                        stop_time=PROBE * opts.time if opts.time else None, rival=rival)
            probes[candidate], tracks[candidate] = probe.get("last", loss_before), \
                probe["track"]
            if probe["reason"] in ("diverged", "trailing"):
                stopped[str(candidate)] = {"steps": probe["step"], "why": probe["reason"]}
            best_lr = min(probes, key=lambda c: (probes[c], -c))
            if best_lr == candidate and "state" in probe:
                winner = (candidate, probe["state"])
            if not candidates and best_lr == min(probes) and best_lr / SMALLER >= SMALLEST \
                    and len(probes) > 1:
                candidates.append(best_lr / SMALLER)
        lr = min(probes, key=lambda c: (probes[c], -c))
        resume = winner[1] if winner is not None and winner[0] == lr else None
        if opts.time:
            seconds = max(opts.time - (time.perf_counter() - start), 0.3 * opts.time)
    run = fit(lr, seconds, resume=resume)
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
            "stream": stream or None,
            "parameters": int(sum(v.size for v in
                                                                best_values.values())),
            "lr": lr, "lr_probes": {str(k): v for k, v in probes.items()} or None,
            "lr_probes_stopped": stopped or None,  # step size: the steps it ran, and why
            "loss": opts.loss,
            "metric": metric.name, "held_out_batches": len(held),
            "score_before": before, "score_after": best[0],
            "held_out_loss_before": loss_before, "held_out_loss_after": -best[1], "curve": _thinned(curve)}


def _adam(groups: list[dict]) -> torch.optim.Adam:
    """Adam, fused into one kernel where PyTorch has it for the CPU (2.4 on): a quarter
    of each step's time on MiniLM at batch 8 went to the unfused update of its 7.8 M
    trained parameters (22 ms a step; 6 ms fused)."""
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups)


def _thinned(curve: list, points: int = CURVE_POINTS) -> list:
    """At most ``points`` evaluations, evenly spread, the last one kept."""
    if len(curve) <= points:
        return curve
    picks = np.unique(np.linspace(0, len(curve) - 1, points).round().astype(int))
    return [curve[i] for i in picks]


def _output_loss(got, want, scale: float, opts) -> torch.Tensor:
    if not got.is_floating_point():
        return torch.zeros(())
    if opts.loss == "kl" and got.dim() >= 1 and got.shape[-1] > 1:
        t = opts.temperature
        return F.kl_div(F.log_softmax(got / t, -1), F.log_softmax(want / t, -1),
                        log_target=True, reduction="batchmean") * t * t
    if opts.loss == "cosine" and got.dim() >= 1 and got[0].numel() > 1:
        # (a sample's lone number has the cosine of its sign: no gradient, mse instead)
        a, b = got.reshape(got.shape[0], -1), want.reshape(want.shape[0], -1)
        return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-12)).mean()
    return ((got - want) ** 2).mean() / scale


def _narrow(value, axes):
    if axes is None:
        return value
    axis, idx = axes
    return torch.index_select(value, axis % value.dim(), torch.as_tensor(np.asarray(idx)))


def _write_back(model: Model, values: dict[str, np.ndarray], types: dict[str, int]) -> None:
    """Trained numbers into the initializers of the same names (sub-byte integer codes
    packed as their ONNX type)."""
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
