"""One accuracy metric for lossy passes: the pass manager judges a lossy pass with the
same per-sample metric as the final verification, so a pass that damages one sample is
rolled back by the manager instead of failing the final check."""

from __future__ import annotations


import numpy as np
import onnx.helper as oh
import pytest
from onnx import TensorProto

import graphopt
from graphopt import Pass, PassResult
from graphopt.errors import UsageError
from graphopt.metric import get_metric
from graphopt.rewrite import make_constant
from tests.helpers import build_model, min_cosine



def relu_model():
    """y = Relu(x) over [N, 16]."""
    return build_model([oh.make_node("Relu", ["x"], ["y"], name="relu")],
                       [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                       [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])])


class ClipLarge(Pass):
    """A lossy pass that caps activations at 3: harmless for ordinary samples, ruinous
    for the one sample whose values are large."""

    name = "clip-large"
    family = "test"
    lossless = False

    def run(self, model, ctx):
        graph = model.graph
        for node in graph.nodes:
            if node.op == "Relu":
                node.op = "Clip"
                node.inputs.append(make_constant(graph, "lo", np.float32(0)))
                node.inputs.append(make_constant(graph, "hi", np.float32(3)))
                return PassResult(True)
        return PassResult(False)


def data(damaged: bool):
    """200 ordinary samples in [0, 1) and, when ``damaged``, one sample with a 6 that
    Clip halves: whole-batch cosine stays above 0.99, that sample's falls to 0.966."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 16)).astype(np.float32)
    if damaged:
        x[7] = 0.5
        x[7, 5] = 6.0
    return {"x": x}


def test_one_damaged_sample_is_rolled_back_by_the_manager():
    feeds = data(damaged=True)
    whole = min_cosine([{"y": np.maximum(feeds["x"], 0)}],
                       [{"y": np.clip(feeds["x"], 0, 3)}])
    assert whole > 0.99  # what a whole-tensor cosine would have accepted
    result = graphopt.optimize(relu_model(), passes=[ClipLarge()], calibration=feeds,
                               tolerance=0.99)
    entry = result.report["trace"][-1]
    assert entry["pass_name"] == "clip-large" and entry["status"] == "rolled-back"
    assert "below the budget" in entry["reason"]
    assert result.report["verification"]["ok"] is True  # unchanged model, verified
    assert [n.op for n in result.model.graph.nodes] == ["Relu"]


def test_ordinary_data_keeps_the_pass_and_verification_uses_the_same_metric():
    feeds = data(damaged=False)
    result = graphopt.optimize(relu_model(), passes=[ClipLarge()], calibration=feeds,
                               tolerance=0.99)
    assert result.report["trace"][-1]["status"] == "changed"
    v = result.report["verification"]
    assert v["ok"] is True and v["metric"] == "cosine" and v["score"] >= 0.99


def test_metric_choice_changes_the_verdict():
    """top1 ignores the magnitude the clip destroys on sample 7 as long as the argmax
    stays: the same damaged data passes under top1 and fails under cosine."""
    feeds = data(damaged=True)
    result = graphopt.optimize(relu_model(), passes=[ClipLarge()], calibration=feeds,
                               tolerance=0.9, metric="top1")
    statuses = {e["pass_name"]: e["status"] for e in result.report["trace"]}
    ref = np.maximum(feeds["x"], 0)
    agree = (ref.argmax(1) == np.clip(feeds["x"], 0, 3).argmax(1)).mean()
    assert agree >= 0.9 and statuses["clip-large"] == "changed"
    assert result.report["verification"]["metric"] == "top1"
    assert result.report["verification"]["score"] == pytest.approx(agree)


def test_metrics():
    ref = [{"y": np.array([[1.0, 0.0], [0.0, 1.0]])}]
    got = [{"y": np.array([[1.0, 0.0], [1.0, 1.0]])}]
    feeds = [{"x": np.zeros((2, 2))}]
    assert get_metric("cosine").score(ref, got, feeds) == pytest.approx(np.sqrt(0.5))
    assert get_metric("mean-cosine").score(ref, got, feeds) == \
        pytest.approx((1 + np.sqrt(0.5)) / 2)
    assert get_metric("top1").score(ref, got, feeds) == pytest.approx(0.5)
    assert get_metric(lambda r, c, f: 0.25).score(ref, got, feeds) == 0.25
    with pytest.raises(UsageError, match="unknown metric"):
        get_metric("bogus metric")
    with pytest.raises(UsageError, match="cannot import"):
        get_metric("no_such_module_xyz:score")


def test_static_batch_model_quantizes_with_any_number_of_samples():
    """A model exported with a fixed batch of 1 gets its calibration samples one by one
    (they were stacked into batches of 8 and the quantizer was rolled back)."""
    from tests.test_quant_int8 import mlp_inputs, outlier_mlp

    proto = outlier_mlp()
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    x = mlp_inputs(8, seed=1)
    result = graphopt.optimize(proto, quantize="int8", calibration={"x": x}, tolerance=0.98)
    entry = next(e for e in result.report["trace"] if e["pass_name"] == "quantize-int8")
    assert entry["status"] == "changed", entry["reason"]
    v = result.report["verification"]
    assert v["ok"] is True and v["batches"] == 8 and v["score"] >= 0.98


def test_calibration_is_batched_for_the_shapes_a_target_binds():
    """A target that fixes ``--input-shape`` in the model before the pipeline (compiled
    targets do) gets calibration in that batch: it was stacked for the original's dynamic
    batch, which the bound model refused, and the quantizer was rolled back."""
    from graphopt.targets.ort import OrtTarget
    from graphopt.targets.shapes import bind_input_shapes
    from tests.test_quant_int8 import mlp_inputs, outlier_mlp

    class BindingTarget(OrtTarget):
        def prepare(self, model, input_shapes):
            bind_input_shapes(model, input_shapes)

    x = mlp_inputs(8, seed=1)
    result = graphopt.optimize(outlier_mlp(), target=BindingTarget(), quantize="int8",
                               calibration={"x": x}, tolerance=0.98,
                               input_shapes={"x": [1, x.shape[1]]})
    entry = next(e for e in result.report["trace"] if e["pass_name"] == "quantize-int8")
    assert entry["status"] == "changed", entry["reason"]
    assert result.model.graph.inputs[0].shape[0] == 1
    v = result.report["verification"]
    assert v["ok"] is True and v["score"] >= 0.98


class Spy(Pass):
    """A lossy pass that changes nothing but records the data it was given."""

    name = "spy"
    family = "test"
    lossless = False
    seen: dict = {}

    def run(self, model, ctx):
        Spy.seen = {"calibration": np.concatenate([b["x"] for b in ctx.calibration]),
                    "validation": None if ctx.validation is None else
                    np.concatenate([b["x"] for b in ctx.validation])}
        return PassResult(False)


def test_without_validation_data_a_fifth_of_the_calibration_is_held_out():
    """Passes fit to the calibration data (recovery, importance), so their accuracy is
    measured on samples they never saw: 40 of 200, disjoint, and the report says so."""
    feeds = data(damaged=False)
    result = graphopt.optimize(relu_model(), passes=[Spy()], calibration=feeds)
    cal, val = Spy.seen["calibration"], Spy.seen["validation"]
    assert (len(cal), len(val)) == (160, 40)
    assert not {r.tobytes() for r in cal} & {r.tobytes() for r in val}
    assert np.array_equal(np.sort(np.concatenate([cal, val]), axis=0),
                          np.sort(feeds["x"], axis=0))
    assert "held out of the calibration data" in result.report["compression"]["data"]

    few = {"x": feeds["x"][:9]}  # too few to split: accuracy on the calibration data
    small = graphopt.optimize(relu_model(), passes=[Spy()], calibration=few)
    assert len(Spy.seen["calibration"]) == 9 and Spy.seen["validation"] is None
    assert small.report["compression"]["data"].startswith("calibration data (9")

    given = graphopt.optimize(relu_model(), passes=[Spy()], calibration=feeds,
                              validation={"x": feeds["x"][:30]})
    assert (len(Spy.seen["calibration"]), len(Spy.seen["validation"])) == (200, 30)
    assert "held out" not in given.report["compression"]["data"]


class HandsOver(ClipLarge):
    """ClipLarge that hands the manager outputs for its result on ``ctx.check_feeds``:
    the true ones (``lie=False``: ``np.clip`` of the inputs, what the model computes),
    or the original's (``lie=True``), or a wrong form (``lie="shape"``)."""

    name = "hands-over"
    lie: bool | str = False

    def run(self, model, ctx):
        result = super().run(model, ctx)
        feeds = ctx.check_feeds
        HandsOver.seen = (feeds, ctx.check_reference)
        if self.lie == "shape":
            result.outputs = [{"y": np.zeros((1, 16), np.float32)} for _ in feeds]
        elif self.lie:
            result.outputs = ctx.check_reference
        else:
            result.outputs = [{"y": np.clip(f["x"], 0, 3)} for f in feeds]
        return result


@pytest.mark.parametrize("lie", [False, True, "shape"])
def test_a_lossy_pass_hands_its_measured_outputs_to_the_manager(monkeypatch, lie):
    """The manager gives lossy passes the batches it checks on and the original's
    outputs there (``ctx.check_feeds``, ``ctx.check_reference``), and scores the outputs
    a pass measured its result at instead of running the result again. Outputs of the
    wrong form are not taken. The final verification runs the result itself: a pass
    handing over the original's outputs for a damaged model is not reported as verified
    (the manager keeps it; optimize raises)."""
    from graphopt import manager as manager_module
    from graphopt.errors import VerificationError

    runs = []
    real = manager_module._run_feeds
    monkeypatch.setattr(manager_module, "_run_feeds",
                        lambda proto, feeds, *a: runs.append(len(feeds)) or real(proto, feeds, *a))
    monkeypatch.setattr(HandsOver, "lie", lie)
    feeds = data(damaged=True)
    if lie is True:
        with pytest.raises(VerificationError, match="below the budget|does not match"):
            graphopt.optimize(relu_model(), passes=[HandsOver()], calibration=feeds,
                              tolerance=0.99)
        assert len(runs) == 1  # the original only: the lie was taken by the manager
        return
    result = graphopt.optimize(relu_model(), passes=[HandsOver()], calibration=feeds,
                               tolerance=0.99)
    check_feeds, reference = HandsOver.seen
    assert reference is not None and len(reference) == len(check_feeds)
    np.testing.assert_array_equal(np.concatenate([r["y"] for r in reference]),
                                  np.maximum(np.concatenate([f["x"] for f in check_feeds]), 0))
    entry = result.report["trace"][-1]
    assert entry["status"] == "rolled-back" and "below the budget" in entry["reason"]
    # the original, and the result only when the handed-over outputs had the wrong form
    assert len(runs) == (1 if lie is False else 2), runs
