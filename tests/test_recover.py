"""Training-free recovery (passes/recover): least-squares re-fit of compressed layers to
the original model's outputs, on real data (scikit-learn digits).

The compressed models are made here by slicing weights (no pruning pass): the kept
channels are the largest by weight norm. Calibration: 640 unlabeled training images;
every figure checked is measured on the 540 held-out test images. Figures in comments
were measured with ``python -m pytest tests/test_recover.py``'s models."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import numpy_helper

from graphopt import verify
from graphopt.errors import UsageError
from graphopt.capture import tapped
from graphopt.ir import Model
from graphopt.pass_infra import PassContext
from graphopt.passes.recover import refit as refit_module
from graphopt.passes.recover.im2col import im2col
from graphopt.passes.recover.recover import Recover
from graphopt.passes.recover.refit import refit
from graphopt.passes.recover.targets import Teacher
from tests.digits import accuracy, digits_cnn, digits_data, digits_mlp
from tests.helpers import build_model

CALIBRATION = 640


# ============================================================================ helpers
def calibration(flat: bool = False, count: int = CALIBRATION, batch: int = 128) -> list:
    xtr = digits_data()[0][:count]
    xtr = xtr.reshape(len(xtr), -1) if flat else xtr
    return [{"input": xtr[i:i + batch]} for i in range(0, len(xtr), batch)]


def held_out(flat: bool = False):
    _, _, xte, yte = digits_data()
    return (xte.reshape(len(xte), -1) if flat else xte), yte


def logits(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return verify.run(proto, {"input": x})["logits"].astype(np.float64)


def rel_error(reference: onnx.ModelProto, proto: onnx.ModelProto, flat=False) -> float:
    x, _ = held_out(flat)
    a, b = logits(reference, x), logits(proto, x)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def acc(proto: onnx.ModelProto) -> float:
    x, y = held_out()
    return accuracy(proto, x, y)


def weights(proto):
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def set_weight(proto, name, value):
    t = next(t for t in proto.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))


def narrow(proto: onnx.ModelProto, producer: str, consumer: str, fraction: float = 0.5):
    """Drop ``fraction`` of ``producer``'s output channels (Conv or Gemm with transB):
    its weight rows and bias, any depthwise Conv on the way (channels and group) and the
    matching input channels of ``consumer`` (through a Flatten: each channel's block of
    features). Returns the kept map of every tensor narrowed on the way."""
    nodes = {n.name: n for n in proto.graph.node}
    readers = {i: n for n in proto.graph.node for i in n.input}
    w = weights(proto)
    prod = nodes[producer]
    channels = w[prod.input[1]].shape[0]
    score = np.linalg.norm(w[prod.input[1]].reshape(channels, -1), axis=1)
    idx = np.sort(np.argsort(-score, kind="stable")[:int(round(channels * (1 - fraction)))])
    set_weight(proto, prod.input[1], w[prod.input[1]][idx])
    set_weight(proto, prod.input[2], w[prod.input[2]][idx])
    kept, tensor, cols = {}, prod.output[0], idx
    while True:
        kept[tensor] = (1, cols)
        node = readers[tensor]
        if node.name == consumer:
            break
        if node.op_type == "Conv":  # depthwise: narrowed with its channels
            set_weight(proto, node.input[1], w[node.input[1]][idx])
            set_weight(proto, node.input[2], w[node.input[2]][idx])
            next(a for a in node.attribute if a.name == "group").i = len(idx)
        if node.op_type == "Flatten":
            spatial = int(np.prod(w[nodes[consumer].input[1]].shape[1:])) // channels
            cols = (idx[:, None] * spatial + np.arange(spatial)).reshape(-1)
        tensor = node.output[0]
    cons = nodes[consumer]
    set_weight(proto, cons.input[1], np.take(w[cons.input[1]], cols, axis=1))
    del proto.graph.value_info[:]  # shapes changed: let ORT infer them
    onnx.checker.check_model(proto, full_check=True)
    return kept


def pruned(original: onnx.ModelProto, cuts) -> tuple[Model, dict]:
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    kept = {}
    for producer, consumer in cuts:
        kept.update(narrow(proto, producer, consumer))
    return Model.from_proto(proto), kept


def refitted(original, model: Model, kept, flat=False, **kw) -> tuple[Model, dict]:
    out = model.clone()
    stats = refit(original, out, kept, calibration(flat), **kw)
    return out, stats


# ============================================================================ models
def quantized(original: onnx.ModelProto, bits: int = 8) -> Model:
    """Every Conv/Gemm weight rounded to ``bits``-bit levels (per tensor, symmetric),
    as int8 weight quantization would: same structure, no narrowing."""
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    w = weights(proto)
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            v = w[node.input[1]]
            step = np.abs(v).max() / (2 ** (bits - 1) - 1)
            set_weight(proto, node.input[1], np.round(v / step) * step)
    return Model.from_proto(proto)


def depthwise_net() -> onnx.ModelProto:
    """Built with onnx.helper (seeded random weights): Conv 1->8 (3x3, pad 1) -> ReLU ->
    depthwise Conv 8 (3x3, dilation 2, pad 2) -> ReLU -> Conv 1x1 8->6, output
    ``logits`` [batch, 6, 8, 8]."""
    rng = np.random.default_rng(0)

    def init(name, *shape, fan_in):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)

    inits = [init("w1", 8, 1, 3, 3, fan_in=9), init("b1", 8, fan_in=4),
             init("wd", 8, 1, 3, 3, fan_in=9), init("bd", 8, fan_in=4),
             init("wp", 6, 8, 1, 1, fan_in=8), init("bp", 6, fan_in=4)]
    nodes = [oh.make_node("Conv", ["input", "w1", "b1"], ["c1_out"], name="c1", pads=[1] * 4),
             oh.make_node("Relu", ["c1_out"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "wd", "bd"], ["dw_out"], name="dw", group=8,
                          pads=[2] * 4, dilations=[2, 2]),
             oh.make_node("Relu", ["dw_out"], ["r2"], name="relu2"),
             oh.make_node("Conv", ["r2", "wp", "bp"], ["logits"], name="pw")]
    return build_model(nodes, [oh.make_tensor_value_info("input", 1, ["b", 1, 8, 8])],
                       [oh.make_tensor_value_info("logits", 1, None)], inits)


def token_mlp() -> onnx.ModelProto:
    """Transformer-style FFN built with onnx.helper: each digit image is 8 tokens of 8
    pixels [batch, 8, 8]; MatMul 8->32 + Add bias -> ReLU -> MatMul 32->8 + Add bias."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in [
        ("W1", rng.standard_normal((8, 32)) / np.sqrt(8)), ("B1", rng.standard_normal(32) / 4),
        ("W2", rng.standard_normal((32, 8)) / np.sqrt(32)), ("B2", rng.standard_normal(8) / 4)]]
    nodes = [oh.make_node("MatMul", ["input", "W1"], ["mm1"], name="fc1"),
             oh.make_node("Add", ["mm1", "B1"], ["h1"], name="fc1_bias"),
             oh.make_node("Relu", ["h1"], ["a1"], name="act"),
             oh.make_node("MatMul", ["a1", "W2"], ["mm2"], name="fc2"),
             oh.make_node("Add", ["mm2", "B2"], ["logits"], name="fc2_bias")]
    return build_model(nodes, [oh.make_tensor_value_info("input", 1, ["b", 8, 8])],
                       [oh.make_tensor_value_info("logits", 1, None)], inits)


def tokens(count: int | None = None, train: bool = True) -> np.ndarray:
    xtr, _, xte, _ = digits_data()
    x = xtr[:count] if train else xte
    return x.reshape(len(x), 8, 8)


def structure(proto: onnx.ModelProto):
    nodes = [(n.name, n.op_type, list(n.input), list(n.output),
              [onnx.helper.printable_attribute(a) for a in n.attribute]) for n in proto.graph.node]
    inits = [(t.name, list(t.dims), t.data_type) for t in proto.graph.initializer]
    return nodes, sorted(inits)


def fitted(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if "rows" in v and v["mode"] != "unchanged"}


# ============================================================================ (a) MLP
def test_mlp_half_of_the_first_hidden_layer_dropped():
    original = digits_mlp()
    model, kept = pruned(original, [("/0/Gemm", "/2/Gemm")])
    assert set(kept) == {"/0/Gemm_output_0", "/1/Relu_output_0"}
    assert len(kept["/0/Gemm_output_0"][1]) == 128
    out, stats = refitted(original, model, kept, flat=True)
    before, after = rel_error(original, model.to_onnx(), True), rel_error(original, out.to_onnx(),
                                                                        True)
    x, y = held_out(flat=True)
    acc0, acc1, acc2 = (accuracy(p, x, y) for p in (original, model.to_onnx(), out.to_onnx()))
    assert after < before / 5, (before, after)  # measured 0.409 -> 0.020
    assert acc2 > acc1 and acc2 >= acc0 - 0.015, (acc0, acc1, acc2)  # 97.4 / 95.7 -> 97.2
    # fc1 only lost rows: it computes the original's values (narrowed): not tapped
    assert stats["/0/Gemm"]["mode"] == "unchanged" and "rows" not in stats["/0/Gemm"]
    assert stats["/2/Gemm"]["mode"] == "least squares"
    assert stats["/2/Gemm"]["rows"] == CALIBRATION and stats["/2/Gemm"]["columns"] == 129
    assert stats["/2/Gemm"]["error_after"] < stats["/2/Gemm"]["error_before"] / 10
    # 640 rows for 257 unknowns: too few for a full fit, the bias is corrected
    assert stats["/4/Gemm"]["mode"].startswith("bias correction (too few rows")
    assert stats["/4/Gemm"]["error_after"] <= stats["/4/Gemm"]["error_before"]


# ============================================================================ (b) CNN
@pytest.mark.parametrize("cuts,first_fitted", [
    ([("/3/Conv", "/7/Conv")], "/7/Conv"),  # conv2's channels, conv3's inputs
    ([("/7/Conv", "/12/Gemm")], "/12/Gemm"),  # conv3's: MaxPool -> Flatten -> Gemm
    ([("/3/Conv", "/7/Conv"), ("/7/Conv", "/12/Gemm")], "/7/Conv"),
])
def test_cnn_half_of_the_channels_dropped(cuts, first_fitted):
    original = digits_cnn()
    model, kept = pruned(original, cuts)
    if ("/7/Conv", "/12/Gemm") in cuts:  # the Gemm's features go in blocks of 2x2
        axis, cols = kept["/11/Flatten_output_0"]
        channels = kept["/7/Conv_output_0"][1]
        assert axis == 1 and np.array_equal(cols.reshape(-1, 4) // 4, np.repeat(
            channels[:, None], 4, axis=1))
    out, stats = refitted(original, model, kept)
    before, after = rel_error(original, model.to_onnx()), rel_error(original, out.to_onnx())
    acc0, acc1, acc2 = acc(original), acc(model.to_onnx()), acc(out.to_onnx())
    assert after < before / 5, (before, after)  # measured 0.55-0.76 -> 0.06-0.09
    assert acc2 > acc1 and acc2 >= acc0 - 0.015, (acc0, acc1, acc2)
    assert stats["/0/Conv"]["mode"] == "unchanged"
    assert stats[first_fitted]["mode"] == "least squares"
    for name, s in fitted(stats).items():
        assert s["error_after"] < s["error_before"], name
    assert stats[first_fitted]["error_after"] < stats[first_fitted]["error_before"] / 3


# ============================================================================ (c) depthwise
def test_depthwise_conv_fitted_per_channel():
    original = depthwise_net()
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    rng = np.random.default_rng(2)
    wd = weights(proto)["wd"]
    set_weight(proto, "wd", wd + 0.3 * np.abs(wd).mean() * rng.standard_normal(wd.shape))
    model = Model.from_proto(proto)
    out, stats = refitted(original, model, {})
    assert stats["c1"]["mode"] == "unchanged"
    dw = stats["dw"]
    assert dw["mode"] == "least squares per channel" and dw["columns"] == 10
    assert dw["rows"] == CALIBRATION * 64
    assert dw["error_after"] < dw["error_before"] / 10, dw  # measured 0.162 -> 0.0045
    before, after = rel_error(original, model.to_onnx()), rel_error(original, out.to_onnx())
    assert after < before / 10, (before, after)  # measured 0.046 -> 0.0007
    assert structure(out.to_onnx()) == structure(model.to_onnx())


def test_depthwise_conv_narrowed_with_its_channels_stays_exact():
    original = depthwise_net()
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    kept = narrow(proto, "c1", "pw")  # the depthwise Conv loses the same channels
    assert set(kept) == {"c1_out", "r1", "dw_out", "r2"}
    model = Model.from_proto(proto)
    out, stats = refitted(original, model, kept)
    assert stats["dw"]["mode"] == "unchanged" and "rows" not in stats["dw"]
    assert stats["pw"]["mode"] == "least squares" and stats["pw"]["columns"] == 5
    assert stats["pw"]["error_after"] < stats["pw"]["error_before"]
    assert rel_error(original, out.to_onnx()) < rel_error(original, model.to_onnx())
    group = next(a.i for n in out.to_onnx().graph.node if n.name == "dw"
                 for a in n.attribute if a.name == "group")
    assert group == 4


def test_matmul_with_bias_add_on_tokens():
    original = token_mlp()
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    w = weights(proto)
    idx = np.sort(np.argsort(-np.linalg.norm(w["W1"], axis=0))[:16])
    set_weight(proto, "W1", w["W1"][:, idx])
    set_weight(proto, "B1", w["B1"][idx])
    set_weight(proto, "W2", w["W2"][idx])
    kept = {"mm1": (-1, idx), "h1": (2, idx), "a1": (2, idx)}
    model = Model.from_proto(proto)
    data = [{"input": tokens(CALIBRATION)[i:i + 128]} for i in range(0, CALIBRATION, 128)]
    out = model.clone()
    stats = refit(original, out, kept, data)
    assert stats["fc1"]["mode"] == "unchanged"
    assert stats["fc2"]["mode"] == "least squares" and stats["fc2"]["rows"] == CALIBRATION * 8
    x = {"input": tokens(train=False)}
    want = verify.run(original, x)["logits"]
    err = [np.linalg.norm(verify.run(p, x)["logits"] - want) / np.linalg.norm(want)
           for p in (model.to_onnx(), out.to_onnx())]
    assert err[1] < err[0] / 3, err


def test_shared_weight_is_skipped_with_the_reason():
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "W")
    nodes = [oh.make_node("MatMul", ["input", "W"], ["a"], name="m1"),
             oh.make_node("Relu", ["a"], ["r"], name="relu"),
             oh.make_node("MatMul", ["r", "W"], ["logits"], name="m2")]
    proto = build_model(nodes, [oh.make_tensor_value_info("input", 1, ["b", 8, 8])],
                        [oh.make_tensor_value_info("logits", 1, None)], [w])
    stats = refit(proto, Model.from_proto(proto), {}, [{"input": tokens(64)}])
    assert stats == {"m1": {"skipped": "weight shared with another node"},
                     "m2": {"skipped": "weight shared with another node"}}


# ============================================================================ (d) structure
def test_refit_moves_numbers_only():
    original = digits_cnn()
    model, kept = pruned(original, [("/3/Conv", "/7/Conv"), ("/7/Conv", "/12/Gemm")])
    before = model.to_onnx()
    out, stats = refitted(original, model, kept)
    after = out.to_onnx()
    assert structure(after) == structure(before)
    onnx.checker.check_model(after, full_check=True)
    w0, w1 = weights(before), weights(after)
    moved = {k for k in w0 if not np.array_equal(w0[k], w1[k])}
    touched = {t for n in after.graph.node if n.name in fitted(stats) for t in n.input[1:]}
    assert moved and moved <= touched, (moved, touched)
    assert all(w1[k].dtype == np.float32 for k in w1)


# ============================================================================ (e) int8-like
@pytest.mark.parametrize("make,flat", [(digits_cnn, False), (digits_mlp, True)])
def test_rounded_weights_get_closer_to_the_original(make, flat):
    original = make()
    model = quantized(original, bits=8)
    out, stats = refitted(original, model, {}, flat=flat)
    before = rel_error(original, model.to_onnx(), flat)
    after = rel_error(original, out.to_onnx(), flat)
    assert after < before / 2, (before, after)  # measured CNN 0.0065 -> 0.0004
    assert all(s["mode"] != "unchanged" for s in stats.values())  # every weight moved
    x, y = held_out(flat)
    assert accuracy(out.to_onnx(), x, y) >= accuracy(original, x, y) - 0.005


def test_ridge_towards_zero_is_the_plain_formula():
    """prior="zero": W = YX̃ᵀ(X̃X̃ᵀ + λI)⁻¹, checked against numpy on the captured data."""
    original = digits_mlp()
    model, kept = pruned(original, [("/0/Gemm", "/2/Gemm")])
    out = model.clone()
    stats = refit(original, out, kept, calibration(True), prior="zero", layers={"/2/Gemm"})
    assert set(stats) == {"/2/Gemm"}
    x = np.concatenate([verify.run(tapped(model.to_onnx(), ["/1/Relu_output_0"]), b)
                        ["/1/Relu_output_0"] for b in calibration(True)]).astype(np.float64)
    y = np.concatenate([verify.run(tapped(original, ["/2/Gemm_output_0"]), b)
                        ["/2/Gemm_output_0"] for b in calibration(True)]).astype(np.float64)
    xa = np.hstack([x, np.ones((len(x), 1))])
    lam = 1e-2 * np.mean(np.diag(x.T @ x))
    reg = xa.T @ xa + lam * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    p = np.linalg.solve(reg, xa.T @ y)
    got = weights(out.to_onnx())
    np.testing.assert_allclose(got["2.weight"], p[:-1].T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["2.bias"], p[-1], rtol=1e-4, atol=1e-5)


# ============================================================================ (f) bias only
@pytest.mark.parametrize("make,cuts,flat", [
    (digits_mlp, [("/0/Gemm", "/2/Gemm")], True),
    (digits_cnn, [("/3/Conv", "/7/Conv"), ("/7/Conv", "/12/Gemm")], False)])
def test_bias_only_improves_the_error(make, cuts, flat):
    original = make()
    model, kept = pruned(original, cuts)
    out, stats = refitted(original, model, kept, flat=flat, bias_only=True)
    before = rel_error(original, model.to_onnx(), flat)
    after = rel_error(original, out.to_onnx(), flat)
    assert after < 0.95 * before, (before, after)  # MLP 0.409 -> 0.293, CNN 0.755 -> 0.696
    assert fitted(stats) and all(s["mode"] == "bias correction (asked)"
                                 for s in fitted(stats).values())
    w0, w1 = weights(model.to_onnx()), weights(out.to_onnx())
    moved = {k for k in w0 if not np.array_equal(w0[k], w1[k])}
    assert moved and all(w0[k].ndim == 1 for k in moved)  # biases only


# ============================================================================ (g) the pass
def test_recover_pass_through_the_context():
    original = digits_cnn()
    model, kept = pruned(original, [("/3/Conv", "/7/Conv"), ("/7/Conv", "/12/Gemm")])
    direct = model.clone()
    want = refit(original, direct, kept, calibration())
    ctx = PassContext(reference=original, calibration=calibration(), kept=kept)
    recover = Recover()
    first = model.clone()
    result = recover.run(first, ctx)
    assert result.changed and result.stats["layers"] == want
    assert rel_error(original, first.to_onnx()) == rel_error(original, direct.to_onnx())
    teacher = recover._teacher
    assert teacher.runs == 1  # the original ran once, for every wave
    again = model.clone()  # the next candidate: the original's values are reused
    assert recover.run(again, ctx).stats["layers"] == want and teacher.runs == 1
    assert recover._teacher is teacher

    empty = Recover().run(model.clone(), PassContext(reference=original, kept=kept))
    assert not empty.changed and empty.stats["reason"] == "no calibration data"
    lost = Recover().run(model.clone(), PassContext(calibration=calibration(), kept=kept))
    assert not lost.changed and "original" in lost.stats["reason"]
    few = Recover(max_batches=1, bias_only=True).run(model.clone(), ctx)
    assert few.stats["layers"]["/7/Conv"]["rows"] == 128 * 16
    for bad in ({"ridge": -1.0}, {"max_batches": 0}, {"scope": "all"}, {"prior": "one"}):
        with pytest.raises(UsageError, match=next(iter(bad)).replace("_", "-")):
            Recover(**bad)


def test_waves_tap_each_layer_once(monkeypatch):
    original = digits_cnn()
    model, kept = pruned(original, [("/3/Conv", "/7/Conv"), ("/7/Conv", "/12/Gemm")])
    runs, students = [], []
    real = refit_module.Student.batches

    def counted(self, proto, names):
        runs.append(sorted(names))
        students.append(self)
        return real(self, proto, names)

    monkeypatch.setattr(refit_module.Student, "batches", counted)
    teacher = Teacher(original, calibration())
    refit(original, model.clone(), kept, teacher.data, teacher=teacher)
    # conv1 and conv2 (rows dropped only) are exact: never tapped; one run per wave
    assert runs == [["/6/MaxPool_output_0"], ["/11/Flatten_output_0"], ["/13/Relu_output_0"]]
    assert teacher.runs == 1  # the original's targets of all three waves in one run
    # each wave ran on from where the last stopped: no node of the model ran twice
    assert len(set(students)) == 1
    upstream = tapped(model.to_onnx(), ["/13/Relu_output_0"]).graph.node
    assert students[0].nodes_run == len(upstream) < len(model.to_onnx().graph.node)
    runs.clear()
    stats = refit(original, model.clone(), kept, teacher.data, scope="changed",
                  teacher=teacher)
    assert runs == [["/6/MaxPool_output_0"], ["/11/Flatten_output_0"]]
    assert "/14/Gemm" not in stats and teacher.runs == 1


def test_refit_is_fast_on_the_digits_cnn():
    original = digits_cnn()
    model, kept = pruned(original, [("/3/Conv", "/7/Conv"), ("/7/Conv", "/12/Gemm")])
    data = calibration(count=256)
    seconds = []
    for _ in range(3):  # best of 3: the machine is shared
        start = time.perf_counter()
        refit(original, model.clone(), kept, data)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 1.0, seconds


# ============================================================================ im2col
@pytest.mark.parametrize("attrs,shape,kernel", [
    ({"pads": [1, 1, 1, 1]}, (2, 3, 8, 8), (3, 3)),
    ({"pads": [0, 1, 2, 1], "strides": [2, 1]}, (2, 3, 7, 8), (3, 2)),
    ({"pads": [2, 2, 2, 2], "dilations": [2, 2], "strides": [2, 2]}, (1, 2, 9, 9), (3, 3)),
    ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (1, 2, 7, 6), (4, 3)),
    ({"auto_pad": "SAME_LOWER"}, (1, 2, 5, 5), (2, 2)),
    ({"auto_pad": "VALID", "strides": [3]}, (2, 4, 11), (3,)),
])
def test_im2col_matches_onnx_runtime_conv(attrs, shape, kernel):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, shape[1], *kernel)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    proto = build_model([oh.make_node("Conv", ["x", "w", "b"], ["y"], name="c", **attrs)],
                        [oh.make_tensor_value_info("x", 1, list(shape))],
                        [oh.make_tensor_value_info("y", 1, None)],
                        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    want = verify.run(proto, {"x": x})["y"]
    node = next(n for n in Model.from_proto(proto).graph.nodes)
    rows = im2col(x, node) @ w.reshape(5, -1).T.astype(np.float64) + b
    got = np.moveaxis(rows.reshape(want.shape[0], *want.shape[2:], 5), -1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_tap_runs_only_what_it_needs():
    """ORT runs every node of a graph whatever is fetched: a tapped model keeps only
    the nodes its taps depend on, including tensors read from inside an If branch."""
    from onnx import TensorProto, helper

    def branch(name, source):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)
        return helper.make_graph([helper.make_node("Identity", [source], [f"{name}_out"])],
                                 name, [], [out])

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Sin", ["x"], ["unused"]),
             helper.make_node("If", ["cond"], ["c"], then_branch=branch("then", "a"),
                              else_branch=branch("else", "b")),
             helper.make_node("Exp", ["c"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.array([-1.0, 0.5, 2.0], np.float32), "cond": np.array(False)}
    probe = tapped(model, ["c"])
    assert [n.op_type for n in probe.graph.node] == ["Relu", "Neg", "If"]
    np.testing.assert_array_equal(verify.run(probe, feeds)["c"], [-0.0, -0.5, -2.0])
    assert [n.op_type for n in tapped(model, ["a"]).graph.node] == ["Relu"]
    assert len(tapped(model, ["y", "unused"]).graph.node) == 5


def test_the_teacher_keeps_what_fits_soonest_wanted_first():
    """Over its budget the teacher keeps the tensors wanted soonest (not nothing): the
    next wave is served without a run, the one beyond the budget costs a run, and every
    value is the original's (ORT's fused kernels: to float rounding)."""
    original = digits_cnn()
    data = calibration()
    names = ["/0/Conv_output_0", "/3/Conv_output_0", "/7/Conv_output_0"]
    want = [dict(zip(names, v)) for v in zip(*[
        [verify.run(tapped(original, [n]), b)[n] for b in data] for n in names])]
    sizes = {n: sum(w[n].nbytes for w in want) for n in names}
    teacher = Teacher(original, data, budget=sizes[names[0]] + sizes[names[1]] + 1)
    for batch, ref in zip(teacher.batches(names[:1], prefetch=names[1:]), want):
        np.testing.assert_allclose(batch[names[0]], ref[names[0]], rtol=1e-5, atol=1e-5)
    assert teacher.runs == 1 and set(teacher.store) == set(names[:2])
    assert teacher.nbytes == sizes[names[0]] + sizes[names[1]]
    for batch, ref in zip(teacher.batches(names[1:2]), want):
        np.testing.assert_allclose(batch[names[1]], ref[names[1]], rtol=1e-5, atol=1e-5)
    assert teacher.runs == 1  # served from memory
    for batch, ref in zip(teacher.batches(names[2:]), want):
        np.testing.assert_allclose(batch[names[2]], ref[names[2]], rtol=1e-5, atol=1e-5)
    assert teacher.runs == 2 and names[2] not in teacher.store  # over the budget


# ============================================================================ ridge choice
def test_ridge_chosen_on_held_out_batches_generalizes_better():
    """``choose_ridge``: each layer's ridge strength is the grid value whose fit on four
    batches in five best predicts the fifth; the layer is then fitted on all of them.
    On the 540 unseen test images the output error is below the fixed default's
    (measured 0.0203 -> 0.0194 here; on MiniLM with 40% of the FFN pruned, 256
    sentences, the validation cosine goes 0.944 -> 0.952)."""
    from graphopt.passes.recover.fit import RIDGE_GRID

    original = digits_mlp()
    model, kept = pruned(original, [("/0/Gemm", "/2/Gemm")])
    data = calibration(True, count=700, batch=50)
    fixed, chosen = model.clone(), model.clone()
    refit(original, fixed, kept, data)
    stats = refit(original, chosen, kept, data, choose_ridge=True)
    assert stats["/2/Gemm"]["ridge"] in RIDGE_GRID
    assert rel_error(original, chosen.to_onnx(), True) < \
        rel_error(original, fixed.to_onnx(), True)
    # too few batches to hold one out: the given ridge, as before
    few = model.clone()
    stats = refit(original, few, kept, calibration(True, count=700, batch=100),
                  choose_ridge=True)
    assert "ridge" not in stats["/2/Gemm"]
