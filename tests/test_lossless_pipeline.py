"""End to end: the default (lossless) ``ort`` pipeline on every model of the zoo.

For each model: graphopt's own verification passes; the original and the optimized model,
run independently in ONNX Runtime on this test's own inputs (several batch sizes for the
dynamic ones, real tokenized sentences for MiniLM), agree; the node count does not grow;
symbolic dimensions stay symbolic; the result passes the ONNX checker.

``GRAPHOPT_TEST_PIPELINE="eliminate-dead-code"`` runs the same checks with another pass
list (to check the zoo itself while passes are missing); unset, the target's default
pipeline runs.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import pytest

import graphopt
from tests import zoo

PIPELINE = os.environ.get("GRAPHOPT_TEST_PIPELINE") or None
RTOL, ATOL = 1e-4, 1e-5
MINILM_MIN_COSINE = 0.9999


# ---------------------------------------------------------------- helpers
def graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            for sub in attr.graphs:
                yield from graphs(sub)


def node_count(proto: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in graphs(proto.graph))


def op_counts(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for g in graphs(proto.graph) for n in g.node)


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of every initializer and Constant-node tensor, subgraphs included."""
    total = 0
    for g in graphs(proto.graph):
        tensors = list(g.initializer) + [a.t for n in g.node for a in n.attribute
                                         if a.type == onnx.AttributeProto.TENSOR]
        total += sum(onnx.numpy_helper.to_array(t).nbytes for t in tensors)
    return total


def io_dims(values) -> dict[str, list]:
    return {v.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                     for d in v.type.tensor_type.shape.dim] for v in values}


def random_feeds(proto: onnx.ModelProto, sizes: dict[str, int], seed: int) -> dict:
    """Normal floats for every (non-initializer) input; symbolic dims take ``sizes``."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param]
                for d in ttype.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        assert np.issubdtype(dtype, np.floating), f"{value.name}: make feeds for {dtype}"
        feeds[value.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def batch_feeds(proto: onnx.ModelProto) -> list[dict]:
    """Batch sizes 1 and 3 (graphopt probes with 2)."""
    return [random_feeds(proto, {"batch": b, "N": b}, seed=b) for b in (1, 3)]


def bert_feeds(vocab: int) -> Callable[[onnx.ModelProto], list[dict]]:
    def make(_proto: onnx.ModelProto) -> list[dict]:
        rng = np.random.default_rng(5)
        feeds = []
        for batch, seq in ((1, 7), (3, 13)):
            ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
            mask = np.ones((batch, seq), dtype=np.int64)
            for row in range(1, batch):  # padded rows, as a tokenizer would make them
                mask[row, seq - 2 * row:] = 0
                ids[row, seq - 2 * row:] = 0
            feeds.append({"input_ids": ids, "attention_mask": mask})
        return feeds

    return make


def minilm_feeds(_proto: onnx.ModelProto) -> list[dict]:
    tokens = zoo.minilm_tokenize()
    one = zoo.minilm_tokenize(zoo.MINILM_SENTENCES[:1])
    return [tokens, one] + bert_feeds(30522)(_proto)


def override_feeds(proto: onnx.ModelProto) -> list[dict]:
    """Batches 1 and 3, the second also overriding the float initializers that are
    graph inputs (positive values: they include a BatchNormalization variance)."""
    feeds = batch_feeds(proto)
    rng = np.random.default_rng(11)
    inputs = {v.name for v in proto.graph.input}
    for t in proto.graph.initializer:
        if t.name in inputs and t.data_type == onnx.TensorProto.FLOAT:
            feeds[1][t.name] = (np.abs(rng.standard_normal(list(t.dims))) + 0.5).astype(np.float32)
    return feeds


def if_feeds(_proto: onnx.ModelProto) -> list[dict]:
    return zoo.if_model_feeds(batch=1) + zoo.if_model_feeds(batch=3, seed=1)


@dataclass
class Case:
    build: Callable[[], onnx.ModelProto]
    feeds: Callable[[onnx.ModelProto], list[dict]] = batch_feeds
    cosine: bool = False  # compare by cosine similarity (real model, long float chains)
    marks: tuple = field(default_factory=tuple)


CASES = {
    "resnet_cnn-torchscript": Case(lambda: zoo.resnet_cnn("torchscript")),
    "resnet_cnn-dynamo": Case(lambda: zoo.resnet_cnn("dynamo")),
    "resnet_cnn-torchscript-folded": Case(lambda: zoo.resnet_cnn("torchscript",
                                                                 fold_in_export=True)),
    "mobilenet_cnn-torchscript": Case(lambda: zoo.mobilenet_cnn("torchscript")),
    "mobilenet_cnn-dynamo": Case(lambda: zoo.mobilenet_cnn("dynamo")),
    "bert_tiny-torchscript": Case(lambda: zoo.bert_tiny("torchscript"),
                                  bert_feeds(zoo.BERT_TINY_VOCAB)),
    "bert_tiny-dynamo": Case(lambda: zoo.bert_tiny("dynamo"), bert_feeds(zoo.BERT_TINY_VOCAB)),
    "bert_minilm-torchscript": Case(lambda: zoo.bert_minilm("torchscript"), minilm_feeds,
                                    cosine=True, marks=(pytest.mark.slow,)),
    "bert_minilm-dynamo": Case(lambda: zoo.bert_minilm("dynamo"), minilm_feeds, cosine=True,
                               marks=(pytest.mark.slow,)),
    "mlp": Case(zoo.mlp),
    "opset9_model": Case(zoo.opset9_model),
    "opset9_model-initializers-as-inputs": Case(
        lambda: zoo.opset9_model(initializers_as_inputs=True), override_feeds),
    "dynamic_batch_model": Case(zoo.dynamic_batch_model),
    "if_model": Case(zoo.if_model, if_feeds),
}


def optimize(source) -> graphopt.OptimizeResult:
    return graphopt.optimize(source, target="ort", passes=PIPELINE)


def assert_outputs_match(expected: dict, got: dict, cosine: bool, where: str) -> None:
    assert list(got) == list(expected), where
    for name, ref in expected.items():
        out = got[name]
        assert out.shape == ref.shape and out.dtype == ref.dtype, f"{where}: {name}"
        if cosine:
            a = ref.reshape(ref.shape[0], -1).astype(np.float64)
            b = out.reshape(out.shape[0], -1).astype(np.float64)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            assert cos.min() > MINILM_MIN_COSINE, f"{where}: {name}: cosine {cos.min()}"
        else:
            np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL, err_msg=f"{where}: {name}")


def check_optimized(original: onnx.ModelProto, result: graphopt.OptimizeResult, case: Case,
                    run_ort, record_nodes) -> onnx.ModelProto:
    """Every check of the module's docstring; returns the optimized proto."""
    verification = result.report["verification"]
    assert verification["ok"] is True, verification
    optimized = result.model.to_onnx()
    onnx.checker.check_model(optimized, full_check=True)

    before, after = node_count(original), node_count(optimized)
    record_nodes(before, after)
    assert after <= before, f"node count grew: {before} -> {after}"

    # The interface is kept: same input/output names and order, and every dynamic
    # dimension (a symbol some graph input uses) is still that symbol wherever it was: no
    # dimension got pinned to the probe size. (An exporter's placeholder symbol on an
    # output, such as TorchScript's "Divsentence_embedding_dim_1", may become its value.)
    inits = {t.name for t in original.graph.initializer}
    inputs_before = io_dims(v for v in original.graph.input if v.name not in inits)
    inits = {t.name for t in optimized.graph.initializer}
    inputs_after = io_dims(v for v in optimized.graph.input if v.name not in inits)
    outputs_before, outputs_after = io_dims(original.graph.output), io_dims(optimized.graph.output)
    assert list(inputs_after) == list(inputs_before), "graph inputs changed"
    # Initializers listed as inputs can be overridden by the caller: they must stay inputs.
    assert [v.name for v in optimized.graph.input] == [v.name for v in original.graph.input]
    assert list(outputs_after) == list(outputs_before), "graph outputs changed"
    dynamic = {d for dims in inputs_before.values() for d in dims if isinstance(d, str)}
    for kind, want, got in (("input", inputs_before, inputs_after),
                            ("output", outputs_before, outputs_after)):
        for name, dims in want.items():
            assert len(got[name]) == len(dims), f"{kind} {name!r}: rank changed"
            for i, dim in enumerate(dims):
                if dim in dynamic:
                    assert got[name][i] == dim, \
                        f"{kind} {name!r} dim {i}: {dim!r} -> {got[name][i]!r}"
                elif isinstance(dim, int):
                    assert got[name][i] == dim, f"{kind} {name!r} dim {i} changed"

    for i, feeds in enumerate(case.feeds(original)):
        expected = run_ort(original, feeds)
        assert_outputs_match(expected, run_ort(optimized, feeds), case.cosine,
                             f"batch {i}, ORT graph optimizations off")
        # What users run: ORT's own optimizer on top of graphopt's output.
        assert_outputs_match(expected, run_ort(optimized, feeds, optimize=True), case.cosine,
                             f"batch {i}, ORT graph optimizations on")
    return optimized


# ---------------------------------------------------------------- tests
@functools.lru_cache(maxsize=None)
def optimized(name: str) -> tuple[onnx.ModelProto, graphopt.OptimizeResult]:
    """(original, result) of one zoo model, optimized once per session."""
    original = CASES[name].build()
    snapshot = original.SerializeToString()
    result = optimize(original)
    assert original.SerializeToString() == snapshot, "optimize() modified its input"
    return original, result


def case_params():
    return [pytest.param(n, marks=c.marks) for n, c in CASES.items()]


@pytest.mark.parametrize("name", case_params())
def test_lossless_pipeline(name, run_ort, record_nodes):
    original, result = optimized(name)
    optimized_proto = check_optimized(original, result, CASES[name], run_ort, record_nodes)
    if name.startswith("if_model"):
        assert op_counts(optimized_proto)["If"] == 1, "the If node is gone"
        if_node = next(n for n in optimized_proto.graph.node if n.op_type == "If")
        assert {a.name for a in if_node.attribute} == {"then_branch", "else_branch"}


@pytest.mark.parametrize("name", case_params())
def test_pipeline_reaches_fixpoint(name):
    """The manager repeats the pipeline until nothing changes: on these models that must
    happen before the iteration limit (a pass that always reports a change, or two passes
    undoing each other, would spin until it). And no pass broke a zoo model (a roll-back
    means a pass produced an invalid or different model)."""
    _, result = optimized(name)
    trace = result.report["trace"]
    last = max(e["iteration"] for e in trace)
    changed = [e["pass_name"] for e in trace if e["iteration"] == last and e["changed"]]
    assert not changed, f"still changing after {last} iterations: {changed}"
    assert not result.report["rolled_back"], [
        (e["pass_name"], e["reason"]) for e in trace if e["status"] == "rolled-back"]


@pytest.mark.parametrize("name", case_params())
def test_pipeline_does_not_grow_weights(name):
    """A lossless cleanup does not add weight bytes beyond small folded constants (shape
    vectors and the like); in particular no weight gets stored twice."""
    original, result = optimized(name)
    before, after = weight_bytes(original), weight_bytes(result.model.to_onnx())
    assert after <= before + max(4096, before // 100), f"weights grew: {before} -> {after}"


def test_lossless_pipeline_external_data(tmp_path, run_ort, record_nodes):
    """A model with external data, loaded from its path: optimized, saved with external
    data, reloaded; the source files are left alone."""
    path = zoo.external_data_model(tmp_path / "src")
    data_file = path.parent / zoo.EXTERNAL_DATA_FILE
    assert data_file.stat().st_size > 100_000
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, data_file)}
    original = onnx.load(str(path))  # external data loaded

    result = optimize(path)
    optimized = check_optimized(original, result, Case(lambda: original), run_ort,
                                record_nodes)

    out = tmp_path / "out" / "model.onnx"
    graphopt.save(result.model, out, external_data=True)
    data_files = [p for p in out.parent.iterdir() if p != out]
    assert data_files, "no external data file written"
    assert out.stat().st_size < 100_000, "the weights went into the .onnx file"
    reloaded = graphopt.load(out)
    onnx.checker.check_model(str(out))
    feeds = batch_feeds(original)
    for f in feeds:  # run from the paths: ORT resolves the external data itself
        assert_outputs_match(run_ort(path, f), run_ort(out, f), False, "saved with data")
        assert_outputs_match(run_ort(path, f), run_ort(reloaded.to_onnx(), f), False,
                             "reloaded")

    # Lowering through the target writes a loadable artifact too.
    lowered = graphopt.optimize(path, target="ort", passes=PIPELINE, output=tmp_path / "art")
    assert lowered.artifact is not None and lowered.artifact.path.is_file()
    for f in feeds:
        assert_outputs_match(run_ort(path, f), run_ort(lowered.artifact.path, f), False,
                             "lowered artifact")

    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digests} == digests
    assert node_count(optimized) <= node_count(original)


@pytest.mark.slow
def test_minilm_export_matches_sentence_transformers(run_ort):
    """The zoo's MiniLM is the real model: it embeds like sentence-transformers does."""
    pytest.importorskip("sentence_transformers")
    feeds = zoo.minilm_tokenize()
    got = run_ort(zoo.bert_minilm("torchscript"), feeds)["sentence_embedding"]
    ref = zoo.minilm_reference()
    assert got.shape == ref.shape == (len(zoo.MINILM_SENTENCES), 384)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > MINILM_MIN_COSINE


# Nodes the helper models contain by construction that a lossless cleanup removes.
REMOVABLE = {
    "opset9_model": zoo.OPSET9_REMOVABLE,
    "dynamic_batch_model": zoo.DYNAMIC_BATCH_REMOVABLE,
    "if_model": zoo.IF_MODEL_REMOVABLE,
}


@pytest.mark.skipif(PIPELINE is not None, reason="checks what the default pipeline removes")
@pytest.mark.parametrize("name", list(REMOVABLE))
def test_default_pipeline_removes_what_is_removable(name):
    original, result = optimized(name)
    optimized_proto = result.model.to_onnx()
    before, after = op_counts(original), op_counts(optimized_proto)
    removable = REMOVABLE[name]
    assert node_count(optimized_proto) <= node_count(original) - len(removable), \
        (before, after)
    for op in set(removable):  # every Identity / inference Dropout is gone, subgraphs too
        assert after[op] == 0, f"{after[op]} {op} node(s) left"
    if name == "dynamic_batch_model":
        # The feature size (8 * 6 * 6) is static: once folded, only the Shape that feeds
        # the symbolic batch size can be left.
        assert after["Shape"] <= 1, after
        assert after["Mul"] == 0, after
    if name == "if_model":
        assert after["If"] == 1
        # Each branch keeps its MatMul; Identity, Mul by 1 and Add of 0 are gone.
        assert after["MatMul"] == 2 and after["Add"] <= 1, after
    if name == "opset9_model":
        assert after["BatchNormalization"] <= 1, after
