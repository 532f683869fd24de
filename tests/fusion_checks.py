"""Checks the transformer fusion tests share: run a pass as the manager would, compare with
ONNX Runtime on the original, and targets that lack com.microsoft."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
from onnx import TensorProto, numpy_helper

import graphopt
from graphopt import verify
from graphopt.cost import Device
from graphopt.pass_infra import Pass, PassContext, PassResult
from graphopt.target import Artifact, Capabilities, Target
from graphopt.targets.ort import OrtTarget
from helpers import apply_passes, assert_pass_unchanged

FLOAT = TensorProto.FLOAT
TOL = verify.Tolerance(rtol=1e-4, atol=1e-5)


class PlainOnnxTarget(Target):
    """A target that runs standard ONNX ops only (no com.microsoft)."""

    name = "plain-onnx"
    device = Device(name="test", peak_flops={"float32": 1e9}, bandwidth=1e9)
    capabilities = Capabilities(domains=frozenset({""}))

    def lower(self, model, out: Path) -> Artifact:  # pragma: no cover - not lowered
        raise NotImplementedError

    def run(self, artifact, feeds):  # pragma: no cover
        raise NotImplementedError


class NoNormTarget(PlainOnnxTarget):
    """Standard ONNX without the normalization and GELU ops."""

    name = "no-norm"
    capabilities = Capabilities(domains=frozenset({""}), ops=frozenset(
        {("", op) for op in ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "ReduceMean", "Erf",
                             "Tanh", "Reciprocal", "Cast", "MatMul", "Identity")}))


def ort_ctx() -> PassContext:
    return PassContext(target=OrtTarget())


def plain_ctx() -> PassContext:
    return PassContext(target=PlainOnnxTarget())


def f32(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def i64(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def const(name: str, value, dtype=np.float32) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], name=f"{name}_const",
                        value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name))


def vi(name: str, shape, elem=FLOAT) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem, shape)


def apply(proto: onnx.ModelProto, *passes: Pass, ctx: PassContext | None = None,
          batches=(1, 3), tol: verify.Tolerance = TOL) -> tuple[onnx.ModelProto, list[PassResult]]:
    """``helpers.apply_passes`` with the ORT target's context and ``tol``."""
    return apply_passes(proto, *passes, ctx=ctx or ort_ctx(), batches=batches,
                        rtol=tol.rtol, atol=tol.atol)


def assert_unchanged(proto: onnx.ModelProto, p: Pass, ctx: PassContext | None = None) -> dict:
    """``p`` finds nothing to do (``helpers.assert_pass_unchanged``, ORT context)."""
    return assert_pass_unchanged(proto, p, ctx or ort_ctx())


def optimize_checked(proto: onnx.ModelProto, passes: str, **kwargs) -> graphopt.OptimizeResult:
    """graphopt.optimize with the manager's checks: verified, nothing rolled back."""
    result = graphopt.optimize(proto, passes=passes, **kwargs)
    assert result.report["verification"]["ok"] is True, result.report["verification"]
    assert result.report["rolled_back"] == [], [
        (e["pass_name"], e["reason"]) for e in result.report["trace"] if e["reason"]]
    return result


def ops_in(proto: onnx.ModelProto, domain: str) -> dict[str, int]:
    """Op counts of ``domain`` nodes over the main graph."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if (node.domain or "") == domain:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def assert_embeddings_match(original: onnx.ModelProto, optimized: onnx.ModelProto,
                            feeds: dict[str, np.ndarray]) -> None:
    """Sentence embeddings agree: cosine > 0.9999 per sentence and allclose 1e-4."""
    ref = verify.run(original, feeds)["sentence_embedding"].astype(np.float64)
    got = verify.run(optimized, feeds)["sentence_embedding"].astype(np.float64)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.9999, cos
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def bert_feeds(vocab: int) -> list[dict]:
    """Two BERT batches (1x5 and 3x9 tokens), the last sentence of each half padding."""
    r = np.random.default_rng(1)
    feeds = []
    for batch, seq in ((1, 5), (3, 9)):
        mask = np.ones((batch, seq), dtype=np.int64)
        mask[-1, seq // 2:] = 0
        feeds.append({"input_ids": r.integers(1, vocab, (batch, seq)), "attention_mask": mask})
    return feeds


def assert_same(original, optimized, feeds_list):
    for feeds in feeds_list:
        diff = verify.compare(verify.run(original, feeds), verify.run(optimized, feeds),
                              verify.Tolerance(rtol=1e-4, atol=1e-4))
        assert diff.ok, diff.summary()
