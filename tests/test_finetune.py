"""Recovery by distillation (the ``finetune`` pass) on real data: the digits CNN pruned
past what the training-free re-fit holds, trained on 256 unlabeled calibration images
with the original as the teacher, measured on the 540 test images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch", reason="fine-tuning needs PyTorch (graphopt[train])")

import graphopt  # noqa: E402
from graphopt.ir import Model  # noqa: E402
from graphopt.pass_infra import PassContext  # noqa: E402
from graphopt.passes.prune.channels import PruneChannels  # noqa: E402
from graphopt.passes.recover.finetune import Finetune  # noqa: E402
from graphopt.passes.recover.recover import Recover  # noqa: E402
from graphopt.targets.ort import OrtTarget  # noqa: E402
from tests.digits import accuracy, digits_cnn, digits_data, validation_split  # noqa: E402
from tests.test_compress_digits import macs  # noqa: E402

CALIBRATION = 256


def _calibration() -> list[dict]:
    xtr = digits_data()[0]
    return [{"input": xtr[i:i + 32]} for i in range(0, CALIBRATION, 32)]


def _pruned(ratio: float, **ctx_args) -> tuple[Model, PassContext]:
    """The digits CNN with ``ratio`` of every prunable group's channels removed (channels
    kept in multiples of 8, whatever this CPU's vector width: AVX-512 would keep 16s)."""
    target = OrtTarget()
    ctx = PassContext(target=target, device=dataclasses.replace(target.device,
                                                                channel_multiple=8),
                      calibration=_calibration(),
                      reference=digits_cnn(), tolerance=0.99, **ctx_args)
    prune = PruneChannels(ratio=ratio)
    model = Model.from_proto(digits_cnn())
    sites = [s for s in prune.sites(model, ctx) if s.refused is None]
    ctx.kept = prune.apply(model, prune.fixed_choice(sites), ctx).kept
    return model, ctx


@pytest.fixture(scope="module")
def three_quarters():
    """(original accuracy, re-fitted model, fine-tuned model and its stats) at 75% of the
    channels pruned."""
    _, _, xte, yte = digits_data()
    refit, ctx = _pruned(0.75)
    Recover().run(refit, ctx)
    tuned, ctx = _pruned(0.75, metric="top1")
    result = Finetune().run(tuned, ctx)
    return accuracy(digits_cnn(), xte, yte), refit, tuned, result.stats


def test_distillation_holds_a_point_where_the_refit_does_not(three_quarters):
    """≤ 0.07x of the MACs: the least-squares re-fit alone loses more than a point of
    test accuracy; distillation after it, on the same 256 unlabeled images, at most one."""
    original, refit, tuned, stats = three_quarters
    _, _, xte, yte = digits_data()
    assert macs(tuned) / macs(digits_cnn()) <= 0.07
    refit_loss = original - accuracy(refit.to_onnx(), xte, yte)
    tuned_loss = original - accuracy(tuned.to_onnx(), xte, yte)
    assert refit_loss > 0.01, refit_loss
    assert tuned_loss <= 0.01, (tuned_loss, refit_loss)
    assert stats["loss"] == "kl"  # auto under the top-1 metric
    assert stats["score_after"] >= stats["score_before"]
    assert stats["held_out_loss_after"] < 0.8 * stats["held_out_loss_before"]


def test_only_weights_move(three_quarters):
    """Same nodes, same initializer names and shapes as the re-fitted model; only the
    trained layers' numbers differ."""
    _, refit, tuned, stats = three_quarters
    a, b = refit.to_onnx().graph, tuned.to_onnx().graph
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in a.node] == \
        [(n.op_type, n.name, list(n.input), list(n.output)) for n in b.node]
    ia = {t.name: _array(t) for t in a.initializer}
    ib = {t.name: _array(t) for t in b.initializer}
    assert {k: v.shape for k, v in ia.items()} == {k: v.shape for k, v in ib.items()}
    moved = [k for k in ia if not np.array_equal(ia[k], ib[k])]
    assert moved and len(moved) <= 2 * stats["trained_layers"]
    assert stats["parameters"] == sum(ib[k].size for k in moved)


def _array(t):
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def test_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        model, ctx = _pruned(0.5, seed=3)
        Finetune(steps=60).run(model, ctx)
        runs.append({t.name: _array(t) for t in model.to_onnx().graph.initializer})
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_budgets_stop_training():
    model, ctx = _pruned(0.5)
    stats = Finetune(steps=25, lr=0.01).run(model, ctx).stats
    assert stats["steps"] == 25 and stats["stopped_by"] == "steps"
    model, ctx = _pruned(0.5)
    stats = Finetune(steps=100000, time=2.0).run(model, ctx).stats  # probes included
    assert stats["stopped_by"] == "time" and stats["seconds"] < 4.0
    assert set(stats["lr_probes"]) == {"0.02", "0.005", "0.00125"}
    model, ctx = _pruned(0.5)
    ctx.tolerance = 0.5  # met at once: stops when the held-out loss stops falling
    stats = Finetune(steps=3000, lr=0.01).run(model, ctx).stats
    assert stats["stopped_by"] == "plateau" and stats["steps"] < 3000


def test_the_search_goes_further_with_finetuning():
    """Through graphopt.optimize under the same budget (mean cosine ≥ 0.99 on 257 unseen
    training-split images): with distillation as the recovery the search keeps fewer
    MACs than with the training-free re-fit, and the report carries the training."""
    xtr, _, xte, yte = digits_data()
    xval, _ = validation_split()

    def run(recovery):
        return graphopt.optimize(digits_cnn(), calibration={"input": xtr[:CALIBRATION]},
                                 validation={"input": xval}, metric="mean-cosine",
                                 tolerance=0.99, goal="flops", schemes={"prune": "channels"},
                                 recovery=recovery)

    plain = run("recover")
    tuned = run("finetune(loss=kl, steps=300)")
    info = tuned.report["compression"]["passes"]["prune-channels"]
    assert info["meets_budget"] and info["recovery"]["steps"] > 0
    assert 0 < len(info["recovery"]["curve"]) <= 20
    assert macs(tuned.model) < 0.8 * macs(plain.model), (macs(tuned.model), macs(plain.model))
    loss = accuracy(digits_cnn(), xte, yte) - accuracy(tuned.model.to_onnx(), xte, yte)
    assert loss <= 0.015, loss


def test_the_planner_fine_tunes_its_best_structural_candidate():
    """The planner with ``recovery=finetune``: its candidates are searched with the
    re-fit, then the best structural one is planned again with fine-tuning, which holds
    more compression under the same budget and is chosen (goal flops: exact)."""
    xtr, _, _, _ = digits_data()
    xval, _ = validation_split()
    spec = "finetune(loss=kl, steps=300)"
    result = graphopt.optimize(digits_cnn(), calibration={"input": xtr[:CALIBRATION]},
                               validation={"input": xval}, metric="mean-cosine",
                               tolerance=0.99, goal="flops", plan=True,
                               schemes={"prune": ["channels"]}, recovery=spec)
    plan = result.report["plan"]
    *searched, recovered = plan["candidates"]
    assert all("recovery" not in c for c in searched), searched
    refit = min((c for c in searched if c["meets_budget"] and c["changed"]),
                key=lambda c: c["flops"])
    assert recovered["recovery"] == spec and recovered["label"] == \
        f"{refit['label']}, recovered by {spec}"
    assert [s["pass"] for s in recovered["stages"]] == [s["pass"] for s in refit["stages"]]
    assert recovered["meets_budget"] and recovered["flops"] < 0.8 * refit["flops"], plan
    assert plan["chosen"] == recovered["label"]
    info = result.report["compression"]["passes"]["prune-channels"]
    assert info["recovery"]["steps"] > 0 and macs(result.model) < 0.8 * macs(digits_cnn())


def test_recovery_must_be_a_recovery_pass():
    from graphopt.errors import UsageError

    xtr = digits_data()[0]
    with pytest.raises(UsageError, match="not a recovery pass"):
        graphopt.optimize(digits_cnn(), calibration={"input": xtr[:64]},
                          schemes={"prune": "channels"}, recovery="fold-constants")


def _cli_inputs(tmp_path):
    from tests.test_cli import EXAMPLE

    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", input=x)
    return EXAMPLE, tmp_path / "cal.npz"


def test_cli_recover_finetune(tmp_path):
    """``--recover 'finetune(...)'`` on the bundled example: verified, exit 0, and the
    report's compression section carries the training (steps, loss curve)."""
    import json

    from tests.test_cli import cli

    example, cal = _cli_inputs(tmp_path)
    out = cli("optimize", example, "-o", tmp_path / "m.onnx", "--report", tmp_path / "r.json",
              "--prune", "channels", "--calibration-data", cal, "--tolerance", "0.9",
              "--metric", "mean-cosine", "--recover", "finetune(steps=200)",
              "--finetune-steps", "20", cwd=tmp_path)  # the flag wins over the spec
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    info = report["compression"]["passes"]["prune-channels"]
    assert info["meets_budget"] and 0 < info["recovery"]["steps"] <= 20
    assert info["recovery"]["curve"]
    bad = cli("optimize", example, "-o", tmp_path / "n.onnx", "--prune", "channels",
              "--calibration-data", cal, "--finetune-time", "5", cwd=tmp_path)
    assert bad.returncode == 2 and "--recover finetune" in bad.stderr
    assert not (tmp_path / "n.onnx").exists()


def test_cli_recover_finetune_without_torch_says_what_to_install(tmp_path):
    """Without PyTorch: exit 2 naming the extra, before any output is written."""
    import subprocess
    import sys

    example, cal = _cli_inputs(tmp_path)
    code = ("import sys; sys.modules['torch'] = None; from graphopt.cli import main; "
            "sys.argv[0] = 'graphopt'; main()")
    out = subprocess.run([sys.executable, "-c", code, "optimize", str(example), "-o",
                          str(tmp_path / "m.onnx"), "--prune", "channels",
                          "--calibration-data", str(cal), "--recover", "finetune"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "graphopt[train]" in out.stderr
    assert not (tmp_path / "m.onnx").exists()


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - p_logits.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q_logits - q_logits.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def test_quantization_aware_training_of_int4_weights():
    """The digits MLP with int4 weights (symmetric, one scale per output column, round to
    nearest): fine-tuning trains the float shadows and the scales with fake quantization
    and writes codes and scales back into the same int4 initializers. On the 540 test
    images the output divergence from the original falls several-fold and no accuracy is
    lost against post-training quantization."""
    from onnx import TensorProto

    from graphopt import verify
    from tests.digits import digits_mlp

    xtr, _, xte, yte = digits_data()
    x, xt = xtr.reshape(len(xtr), -1)[:CALIBRATION], xte.reshape(len(xte), -1)
    quantize = "quantize-int4-weight(format=qdq,symmetric=true,block_size=256,min_size=0," \
               "per_layer=false,method=rtn," \
               "clip_search=false)"

    def run(passes):
        result = graphopt.optimize(digits_mlp(), passes=["fold-constants", *passes],
                                   calibration={"input": x}, metric="top1", tolerance=0.01)
        return result, result.model.to_onnx()

    _, ptq = run([quantize])
    result, qat = run([quantize, "finetune"])
    ref = verify.run(verify.session(digits_mlp()), {"input": xt})["logits"]
    out = {name: verify.run(verify.session(m), {"input": xt})["logits"]
           for name, m in (("ptq", ptq), ("qat", qat))}
    assert _kl(ref, out["qat"]) < 0.3 * _kl(ref, out["ptq"]), \
        (_kl(ref, out["qat"]), _kl(ref, out["ptq"]))
    acc = {k: float((v.argmax(1) == yte).mean()) for k, v in out.items()}
    assert acc["qat"] >= acc["ptq"]
    assert float((ref.argmax(1) == yte).mean()) - acc["qat"] <= 0.01
    # same graph; int4 codes stay int4, in the same initializers
    assert [(n.op_type, n.name, list(n.input)) for n in ptq.graph.node] == \
        [(n.op_type, n.name, list(n.input)) for n in qat.graph.node]
    types = {t.name: t.data_type for t in qat.graph.initializer}
    assert types == {t.name: t.data_type for t in ptq.graph.initializer}
    codes = [t.name for t in qat.graph.initializer if t.data_type == TensorProto.INT4]
    assert len(codes) == 3
    stats = next(e["stats"] for e in result.report["trace"] if e["pass_name"] == "finetune")
    assert stats["quantized_weights"] == 3
    ptq_init = {t.name: t for t in ptq.graph.initializer}
    moved = [t.name for t in qat.graph.initializer
             if t.raw_data != ptq_init[t.name].raw_data]
    assert set(codes) <= set(moved)


def test_low_rank_factors_train():
    """decompose-low-rank's factors are layers the original lacks; fine-tuning trains
    them too, and the output error on unseen images falls below the re-fit's."""
    from graphopt import verify
    from tests.digits import digits_mlp

    xtr, _, xte, _ = digits_data()
    x, xt = xtr.reshape(len(xtr), -1)[:CALIBRATION], xte.reshape(len(xte), -1)
    decompose = "decompose-low-rank(rank_ratio=0.25,require_speedup=false,min_size=0)"

    def run(recovery):
        result = graphopt.optimize(digits_mlp(), passes=["fold-constants", decompose],
                                   calibration={"input": x}, metric="top1",
                                   tolerance=0.01, recovery=recovery)
        return result, verify.run(verify.session(result.model.to_onnx()),
                                  {"input": xt})["logits"]

    ref = verify.run(verify.session(digits_mlp()), {"input": xt})["logits"]
    _, refit_out = run("recover")
    result, tuned_out = run("finetune")
    stats = result.report["compression"]["passes"]["decompose-low-rank"]["recovery"]
    factors = sum(n.op_type == "MatMul" for n in result.model.to_onnx().graph.node)
    assert factors >= 2 and stats["trained_layers"] >= factors
    assert _kl(ref, tuned_out) < 0.7 * _kl(ref, refit_out), (_kl(ref, tuned_out),
                                                             _kl(ref, refit_out))


def test_never_worse_than_the_refit():
    """Training that beats no checkpoint on the held-out batches (here a step size far
    too large) leaves exactly what ``recover`` gives on every batch."""
    tuned, ctx = _pruned(0.5)
    stats = Finetune(steps=40, lr=50.0).run(tuned, ctx).stats
    assert not stats["improved"] and "kept" in stats
    plain, ctx = _pruned(0.5)
    Recover().run(plain, ctx)
    a = {t.name: _array(t) for t in tuned.to_onnx().graph.initializer}
    b = {t.name: _array(t) for t in plain.to_onnx().graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_output_loss_follows_the_metric():
    """``loss=auto``: the cosine of each sample's outputs under the cosine metrics (what
    they score), KL under top1 (the fixture above), mse under a metric of the user's;
    a sample's lone number has no cosine to train (its sign's), so it is matched by mse."""
    import torch

    from graphopt.passes.recover.distil import _output_loss

    def agreement(reference, candidate, feeds):  # a metric of the user's
        return 1.0

    for metric, loss in (("mean-cosine", "cosine"), ("cosine", "cosine"), (agreement, "mse")):
        model, ctx = _pruned(0.5, metric=metric)
        assert Finetune(steps=4, lr=0.01).run(model, ctx).stats["loss"] == loss
    opts = Finetune.Options(loss="cosine")
    got, want = torch.tensor([[1.0, 2.0], [3.0, 1.0]]), torch.tensor([[2.0, 4.0], [1.0, 3.0]])
    cosine = float(_output_loss(got, want, 1.0, opts))
    assert abs(cosine - (1 - 0.6) / 2) < 1e-6  # the first rows agree, the second 0.6
    lone, target = torch.tensor([[2.0], [-1.0]]), torch.tensor([[1.0], [1.0]])
    assert abs(float(_output_loss(lone, target, 2.0, opts)) - (1 + 4) / 2 / 2) < 1e-6


def test_progress_reports_each_training_run():
    """``PassContext.step`` hears each training run's share of its budget: the learning
    rate probes, then the run itself, counting up to 100 (the CLI shows the time left)."""
    seen = []
    model, ctx = _pruned(0.5, progress=lambda *call: seen.append(call))
    stats = Finetune(steps=60).run(model, ctx).stats
    runs: dict[str, list[int]] = {}
    for what, done, total in seen:
        assert what.startswith("fine-tuning at lr") and total == 100
        runs.setdefault(what, []).append(done)
    assert len([w for w in runs if "(probe)" in w]) == len(stats["lr_probes"]) == 3
    final = [done for w, done in ((w, d) for w in runs if "(probe)" not in w
                                  for d in runs[w])]
    assert final == sorted(final) and final[-1] == 100 and len(final) >= 30


def test_stream_matching_brings_the_hidden_states_closer():
    """``stream=W`` matches, token by token, the normalized hidden states (LayerNorm
    outputs) downstream of the pruned FFNs: on held-out token batches they end closer to
    the original's than with the outputs and the pruned layers' outputs matched alone."""
    import onnx

    from graphopt import verify
    from graphopt.passes.prune.ffn import PruneFfn
    from tests import zoo
    from tests.helpers import bert_token_feeds

    from graphopt.passes.prune._blocks import find_ffn_blocks

    from tests.test_prune_transformer import cleanup_passes, stage

    # cleaned up (the FFN blocks found), FFNs that matter: down projections x6
    strong = Model.from_proto(stage(cleanup_passes(), zoo.bert_tiny()))
    for b in find_ffn_blocks(strong.graph):
        weight = b.down.node.inputs[1]
        if not hasattr(weight, "values"):  # behind a Transpose
            weight = weight.inputs[0].inputs[0]
        weight.values = np.asarray(weight.values) * 6.0
    # the sentence embedding alone, as MiniLM's: no output per token
    strong.graph.outputs = [t for t in strong.graph.outputs if t.name == "sentence_embedding"]
    proto = strong.to_onnx()
    calibration = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=16, batch=8, sequence=16,
                                   seed=1)
    held = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=3, batch=4, sequence=13, seed=2)

    def tuned(stream: float) -> tuple[onnx.ModelProto, dict]:
        target = OrtTarget()
        ctx = PassContext(target=target, device=target.device, calibration=calibration,
                          reference=proto)
        prune = PruneFfn(ratio=0.75)
        model = Model.from_proto(proto)
        sites = [s for s in prune.sites(model, ctx) if s.refused is None]
        ctx.kept = prune.apply(model, prune.fixed_choice(sites), ctx).kept
        stats = Finetune(steps=400, lr=0.02, augment=0, refit=False,
                         stream=stream).run(model, ctx).stats
        return model.to_onnx(), stats

    plain, _ = tuned(0.0)
    matched, stats = tuned(4.0)
    names = stats["stream"]
    # the first block's LayerNorm after its FFN, the second's after attention and FFN
    assert names is not None and len(names) == 3

    def hidden(model: onnx.ModelProto) -> list[dict]:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
        sess = verify.session(model)
        return [verify.run(sess, f) for f in held]

    want = hidden(proto)

    def error(model) -> float:
        got = hidden(model)
        return float(np.mean([((g[n] - w[n]) ** 2).mean() / (w[n] ** 2).mean()
                              for g, w in zip(got, want) for n in names]))

    assert error(matched) < 0.9 * error(plain), (error(matched), error(plain))


def test_a_diverging_probe_stops_early(monkeypatch):
    """A step-size probe whose held-out loss passes twice the start's stops there (the
    budget goes to the others); the step size chosen is one that did not diverge."""
    from graphopt.passes.recover import distil

    monkeypatch.setattr(distil, "LR_CANDIDATES", (50.0, 0.02, 0.005))
    model, ctx = _pruned(0.5)
    stats = Finetune(steps=200).run(model, ctx).stats
    probe_steps = max(2 * 7, int(distil.PROBE * 200))  # 8 batches, one held out
    stopped = stats["lr_probes_stopped"]
    assert stopped is not None and stopped["50.0"]["why"] == "diverged", stats["lr_probes"]
    assert [k for k, v in stopped.items() if v["why"] == "diverged"] == ["50.0"]
    assert stopped["50.0"]["steps"] < probe_steps
    assert stats["lr"] != 50.0 and stats["lr_probes"]["50.0"] > 2 * min(
        stats["lr_probes"].values())


def test_trailing_probes_stop_halfway(monkeypatch):
    """Halfway through its length, a probe whose held-out loss is above the best probe's
    at the same point stops (here a step size far too small); one that holds its own
    runs on, and one above the start's loss is not judged by that (fake quantization
    first loses ground: see the int4 test)."""
    from graphopt.passes.recover import distil

    monkeypatch.setattr(distil, "LR_CANDIDATES", (0.01, 1e-5))
    model, ctx = _pruned(0.5)
    stats = Finetune(steps=400).run(model, ctx).stats
    probe_steps = int(distil.PROBE * 400)
    assert stats["lr"] == 0.01 and "0.01" not in (stats["lr_probes_stopped"] or {}), stats
    assert stats["lr_probes_stopped"]["1e-05"] == {"steps": probe_steps // 2,
                                                   "why": "trailing"}, stats


def test_the_chosen_step_size_trains_on_from_its_probe(monkeypatch):
    """The winning probe was the first tenth of the run it stands for: the training goes
    on from where it stopped, so the optimizer steps of the whole pass are the probes'
    and the rest of the budget's, not a whole budget more."""
    import torch

    from graphopt.passes.recover import distil

    calls = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **k: calls.append(1) or step(self, *a, **k))
    model, ctx = _pruned(0.5)
    stats = Finetune(steps=200).run(model, ctx).stats
    probe_steps = max(2 * 7, int(distil.PROBE * 200))  # 8 batches, one held out
    stopped = stats["lr_probes_stopped"] or {}
    probed = sum(stopped[lr]["steps"] if lr in stopped else probe_steps
                 for lr in stats["lr_probes"])
    assert stats["steps"] == 200 and stats["stopped_by"] == "steps"
    assert len(calls) == probed + 200 - probe_steps, (len(calls), stats["lr_probes"])
    assert stats["curve"][0]["step"] <= probe_steps  # the probe's evaluations lead it
