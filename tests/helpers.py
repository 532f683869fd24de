"""Shared test helpers (append only: several test modules use this file)."""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import onnx.helper as oh

from graphopt import verify
from graphopt.ir import Model, load
from graphopt.pass_infra import Pass, PassContext, PassResult


def build_model(nodes, inputs, outputs, initializers=(), opset: int = 17,
                ir_version: int | None = None) -> onnx.ModelProto:
    """A checked model from onnx.helper parts; ``inputs``/``outputs`` are value infos (an
    output made with shape ``None`` gets its inferred shape)."""
    graph = oh.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    if ir_version is not None:
        proto.ir_version = ir_version
    if any(not o.type.tensor_type.HasField("shape") for o in proto.graph.output):
        inferred = onnx.shape_inference.infer_shapes(proto).graph.output
        del proto.graph.output[:]
        proto.graph.output.extend(inferred)
    onnx.checker.check_model(proto)
    return proto


def count_ops(proto: onnx.ModelProto) -> Counter:
    """Op types over the main graph and every subgraph."""
    counts: Counter = Counter()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(proto.graph)
    return counts


def run_pass(p: Pass, proto: onnx.ModelProto) -> tuple[Model, PassResult]:
    """Run ``p`` the way the manager does: on the loaded, shape-inferred model."""
    model = load(proto)
    model.infer_shapes()
    result = p.run(model, PassContext())
    assert isinstance(result, PassResult)
    return model, result


def apply_pass(p: Pass, proto: onnx.ModelProto,
               feeds: list[verify.Feeds] | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run ``p``, then check the result: it passes the ONNX checker, keeps its output
    names and gives exactly the original's outputs in ONNX Runtime (random inputs unless
    ``feeds`` are given)."""
    model, result = run_pass(p, proto)
    after = model.to_onnx()
    onnx.checker.check_model(after)
    assert [o.name for o in after.graph.output] == [o.name for o in proto.graph.output]
    assert_same_outputs(proto, after, feeds)
    return after, result


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto,
                        feeds: list[verify.Feeds] | None = None) -> None:
    for batch in feeds or verify.probe_inputs(before, count=2):
        expected, got = verify.run(before, batch), verify.run(after, batch)
        assert verify.compare(expected, got).ok, verify.compare(expected, got).summary()
        for name, value in expected.items():  # lossless cleanups keep values exactly
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def apply_passes(proto: onnx.ModelProto, *passes: Pass, ctx: PassContext | None = None,
                 batches=(1, 3), rtol: float = 1e-4, atol: float = 1e-5):
    """Run ``passes`` in order the way the manager does (loaded, shape-inferred model),
    then check the result: ONNX checker, strict shape inference, output names kept, and
    outputs within rtol/atol of the original in ONNX Runtime, with every symbolic
    dimension set to each size in ``batches``. Returns (result proto, [PassResult])."""
    model = load(proto)
    model.infer_shapes()
    results = [p.run(model, ctx or PassContext()) for p in passes]
    after = model.to_onnx()
    onnx.checker.check_model(after)
    onnx.shape_inference.infer_shapes(after, strict_mode=True)
    assert [o.name for o in after.graph.output] == [o.name for o in proto.graph.output]
    for size in batches:
        for feeds in verify.probe_inputs(proto, count=2, seed=size, symbolic_size=size):
            diff = verify.compare(verify.run(proto, feeds), verify.run(after, feeds),
                                  verify.Tolerance(rtol=rtol, atol=atol))
            assert diff.ok, diff.summary()
    return after, results


def assert_pass_unchanged(proto: onnx.ModelProto, p: Pass,
                          ctx: PassContext | None = None) -> dict:
    """``p`` finds nothing to do: no change, nothing fused, the same op histogram.
    Returns the pass's stats."""
    model = load(proto)
    model.infer_shapes()
    before = count_ops(model.to_onnx())
    result = p.run(model, ctx or PassContext())
    assert not result.changed and result.stats.get("fused", 0) == 0, result.stats
    assert count_ops(model.to_onnx()) == before
    return result.stats


# ---------------------------------------------------------------- quantization calibration
# Real sentences for calibrating the MiniLM quantization tests and benchmarks; none of
# them is in ``zoo.MINILM_SENTENCES`` (what the tests evaluate on).
CALIBRATION_SENTENCES = (
    "The weather today is sunny with a light breeze.",
    "She plays the violin in the city orchestra every weekend.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password?",
    "The cat slept on the warm windowsill all afternoon.",
    "Neural networks learn representations from data.",
    "He ordered a coffee and a croissant at the small cafe.",
    "The museum opens at nine and closes at five.",
    "Rain is expected to continue through the weekend in the north.",
    "Please send me the report by Friday.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Astronomers discovered a new planet orbiting a distant star.",
    "Our team won the championship after a tough season.",
    "The train was delayed because of a signal failure.",
    "Children were playing football in the park.",
    "This laptop has a long battery life and a bright screen.",
    "The doctor recommended more sleep and less coffee.",
    "A strong earthquake shook the coastal town last night.",
    "Which programming language should I learn first?",
    "The committee postponed its decision until next month.",
    "Fresh vegetables are sold at the farmers market on Saturdays.",
    "The old bridge was closed for repairs.",
    "My grandmother tells wonderful stories about her childhood.",
    "The company reported record profits this quarter.",
    "Turn left at the second traffic light and the hotel is on your right.",
    "Bees are essential for pollinating many crops.",
    "The film won three awards at the festival.",
    "I forgot my umbrella at the office again.",
    "Scientists are studying how glaciers melt.",
    "The library offers free courses in photography.",
    "He fixed the leaking pipe under the kitchen sink.",
    "Electric cars are becoming cheaper every year.",
    "The children built a sandcastle on the beach.",
    "Can you recommend a good book about history?",
    "The concert was cancelled due to the storm.",
    "She is training for a marathon in the spring.",
    "The new policy will affect thousands of workers.",
    "A bowl of hot soup is perfect on a cold evening.",
    "The software update fixed several security issues.",
    "They hiked to the top of the mountain at sunrise.",
    "The price of gold rose again this morning.",
    "Dolphins communicate with clicks and whistles.",
    "The teacher explained the theorem with a simple drawing.",
    "Our flight to Lisbon leaves at seven in the morning.",
    "The garden is full of roses and tulips in May.",
    "He apologized for being late to the meeting.",
    "Vaccines have saved millions of lives.",
    "The river flooded the fields after heavy rain.",
)


def minilm_calibration(count: int = len(CALIBRATION_SENTENCES)) -> list[dict]:
    """Calibration feeds for MiniLM: one sentence per feed (no padding tokens)."""
    from tests import zoo

    return [zoo.minilm_tokenize((s,)) for s in CALIBRATION_SENTENCES[:count]]


def bert_token_feeds(vocab: int, count: int = 2, batch: int = 2, sequence: int = 16,
                     seed: int = 0) -> list[dict]:
    """Random-token BERT feeds (``input_ids``, full ``attention_mask``)."""
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, vocab, (batch, sequence)).astype(np.int64),
             "attention_mask": np.ones((batch, sequence), dtype=np.int64)}
            for _ in range(count)]


def check_outputs(got: dict, want: dict, atol: float) -> None:
    """Same output names and shapes, values within ``atol`` (rtol 0)."""
    assert set(got) == set(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name], ref, rtol=0, atol=atol, err_msg=name)


def print_timings_at_exit(request, title: str, timings: dict[str, float]) -> None:
    """Print ``timings`` (seconds, filled by the tests) after pytest's output capture has
    stopped, under ``title``; for module-scoped autouse fixtures."""

    def show():
        if timings:
            width = max(map(len, timings))
            import sys

            sys.stderr.write(f"{title}:\n" + "".join(
                f"  {key:<{width}}  {seconds * 1e3:10.1f} ms\n"
                for key, seconds in timings.items()))

    request.config.add_cleanup(show)


def min_cosine(reference: list[dict], candidate: list[dict]) -> float:
    """The lowest cosine similarity of whole output tensors, over batches and outputs."""
    worst = 1.0
    for ref, got in zip(reference, candidate):
        for name, r in ref.items():
            a = np.asarray(r, dtype=np.float64).ravel()
            b = np.asarray(got[name], dtype=np.float64).ravel()
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            cos = (1.0 if np.array_equal(a, b) else 0.0) if denom == 0 else float(a @ b / denom)
            worst = min(worst, cos)
    return worst


def store_calibration(target, skip_layer_norm: float | None) -> None:
    """A cost calibration of ``target``'s device (in the cache folder the environment
    names) where Add and LayerNormalization run at the roofline and SkipLayerNormalization
    at ``skip_layer_norm`` times it (``None``: not measured)."""
    from graphopt.cost_calibration import Calibration, calibration_path, save_calibration

    cal = Calibration(fingerprint=target.fingerprint(), base_s=5e-6, node_overhead_s=1e-6)
    for seconds in (1e-6, 1e-3):
        cal.add(("elementwise", "float32", "Add"), seconds, 1.0)
        cal.add(("norm", "float32", "LayerNormalization"), seconds, 1.0)
        if skip_layer_norm is not None:
            cal.add(("norm", "float32", "SkipLayerNormalization"), seconds, skip_layer_norm)
    save_calibration(cal, calibration_path(target.fingerprint()))


def cli(*args, cwd) -> SimpleNamespace:
    """``graphopt ARGS`` in-process, in ``cwd``: returncode, stdout, stderr (an escaped
    exception's traceback appended, as the process would print it)."""
    from click.testing import CliRunner

    from graphopt.cli import main

    with contextlib.chdir(cwd):
        result = CliRunner().invoke(main, [str(a) for a in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=stderr)
