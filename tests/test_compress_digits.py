"""Budgeted compression end to end on real data: the digits CNN pruned and recovered
without labels or gradients, then quantized, checked against held-out test images.

Calibration: the 1000 (unlabeled) training images; budget: mean output cosine >= 0.99
on 257 training-split images the network never saw; accuracy: the 540 test images."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt.analysis import summarize
from graphopt.ir import Model
from graphopt.pass_infra import PassContext
from graphopt.passes.prune.channels import PruneChannels
from graphopt.passes.recover.refit import refit
from graphopt.targets.ort import LOSSLESS_PIPELINE, OrtTarget, host_device
from tests.digits import TRAINED_ON, accuracy, digits_cnn, digits_data, validation_split


def macs(model) -> float:
    model = model if isinstance(model, Model) else Model.from_proto(model)
    return summarize(model, host_device()).flops / 2


def compress(**kwargs):
    xtr, _, _, _ = digits_data()
    xval, _ = validation_split()
    return graphopt.optimize(digits_cnn(), calibration={"input": xtr[:TRAINED_ON]},
                             validation={"input": xval}, metric="mean-cosine",
                             tolerance=0.99, goal="flops", **kwargs)


@pytest.fixture(scope="module")
def pruned():
    return compress(schemes={"prune": "channels"})


def test_prune_and_recover_keeps_a_fifth_of_the_macs_within_a_point(pruned):
    _, _, xte, yte = digits_data()
    original = digits_cnn()
    ratio = macs(pruned.model) / macs(original)
    loss = accuracy(original, xte, yte) - accuracy(pruned.model.to_onnx(), xte, yte)
    assert ratio <= 0.20, ratio
    assert loss <= 0.010, loss
    info = pruned.report["compression"]["passes"]["prune-channels"]
    assert info["score"] >= 0.99 and info["recovery"]  # recovered, measured, in budget
    # the threshold search's best, then refined one site at a time within the budget
    found = [t for t in info["search"] if "threshold" in t and t["ok"]]
    refined = [t for t in info["search"] if "refine" in t]
    assert found and refined and all(t["ok"] == (t["score"] >= 0.99) for t in refined)
    assert info["score"] == [t for t in info["search"] if t["ok"]][-1]["score"]
    assert pruned.report["verification"]["ok"] is True
    assert pruned.report["verification"]["metric"] == "mean-cosine"


def test_recovery_is_what_makes_it_work(pruned):
    """The same settings without the re-fit: much larger output error, and accuracy
    falls apart; with it, the error is a fraction."""
    xtr, _, xte, yte = digits_data()
    info = pruned.report["compression"]["passes"]["prune-channels"]
    choice = {name: site["setting"] for name, site in info["sites"].items()
              if site["changed"]}
    target = OrtTarget()
    ctx = PassContext(target=target, device=target.device,
                      calibration=[{"input": xtr[i:i + 100]} for i in range(0, TRAINED_ON, 100)])
    p = PruneChannels()
    base = Model.from_proto(digits_cnn())
    p.sites(base, ctx)
    plain = Model.from_proto(digits_cnn())
    applied = p.apply(plain, choice, ctx)
    recovered = plain.clone()
    refit(digits_cnn(), recovered, applied.kept, ctx.calibration)
    ref = _logits(digits_cnn(), xte)
    err_plain = _rel_error(ref, _logits(plain.to_onnx(), xte))
    err_recovered = _rel_error(ref, _logits(recovered.to_onnx(), xte))
    assert err_recovered < 0.5 * err_plain, (err_recovered, err_plain)
    assert accuracy(recovered.to_onnx(), xte, yte) > accuracy(plain.to_onnx(), xte, yte) + 0.05


def test_prune_then_int8_is_a_tenth_of_the_file(tmp_path):
    """Pruned, recovered, then int8 everywhere (for size: the cost model would keep
    layers float that int8 does not speed up at batch 1): <= 0.10x the file, <= 1.5
    points lost. Latency is measured in benchmarks/compress_digits.py."""
    _, _, xte, yte = digits_data()
    result = compress(passes=[*LOSSLESS_PIPELINE, "quantize-int8(require-speedup=false)"],
                      schemes={"prune": "channels"}, output=tmp_path / "small.onnx")
    original = digits_cnn()
    size = (tmp_path / "small.onnx").stat().st_size / len(original.SerializeToString())
    loss = accuracy(original, xte, yte) - accuracy(result.model.to_onnx(), xte, yte)
    assert size <= 0.10, size
    assert loss <= 0.015, loss
    statuses = {e["pass_name"]: e["status"] for e in result.report["trace"]}
    assert statuses["prune-channels"] == "changed" and statuses["quantize-int8"] == "changed"


def _logits(proto, x) -> np.ndarray:
    from graphopt import verify

    return verify.run(proto, {"input": x})["logits"].astype(np.float64)


def _rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))
